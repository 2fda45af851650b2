"""The exact solver: the plan with the fewest copies as a min-cost flow, for small clusters."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from services.sharding.flow import FORCE, MinCostFlow
from services.sharding.placement.quotas import _EPS

if TYPE_CHECKING:
    from services.sharding.placement.planner import _Planner

# Most (shards x active nodes) for which the plan is also solved exactly as a
# min-cost flow (tens of milliseconds at this size); larger clusters rely on
# the greedy alone, which is exact on regular layouts (see bench/rebalance.py).
_EXACT_BUDGET = 1200


def solve(pl: _Planner) -> tuple[list[list[int]], int] | None:
    """The placement with the fewest copies and every node within one of its ideal.

    source -> shard (its replicas) -> (shard, zone) (the room the zone has
    for it) -> node (cost 0 if it holds the shard, 1 for a copy) -> sink, each
    node carrying between the floor and the ceiling of its ideal. Returns the
    active nodes per shard and the copies, or None if no such placement exists.
    """
    net = MinCostFlow()
    source, sink = net.vertex(), net.vertex()
    node_v = {i: net.vertex() for i in pl.act}
    floors = 0
    for i, v in node_v.items():
        lo = math.floor(pl.x[i] + _EPS)
        floors += lo
        net.bounded(v, sink, lo, max(lo, math.ceil(pl.x[i] - _EPS)))
    by_zone: dict[int, list[int]] = {}
    for i in pl.act:
        by_zone.setdefault(pl.zone[i], []).append(i)
    # A copy costs ``unit`` plus up to 16 for landing on a node that already holds
    # its ideal: among plans with the fewest copies, the copies go to the nodes
    # furthest below their ideal (a joiner, rather than an old node).
    unit = 17 * sum(pl.r) + 1
    landing = {i: max(0, min(16, 8 + round(4 * (pl.cur[i] - pl.x[i])))) for i in pl.act}
    carriers: list[tuple[int, int, tuple[int, int]]] = []  # (shard, node, edge) to read the answer
    total = 0
    for s in range(len(pl.specs)):
        if not pl.r[s]:
            continue
        total += pl.r[s]
        sv = net.vertex()
        net.edge(source, sv, pl.r[s])
        pinned_z: dict[int, int] = {}
        for i in pl.pinned[s]:
            pinned_z[pl.zone[i]] = pinned_z.get(pl.zone[i], 0) + 1
        for z, nodes in by_zone.items():
            room = min(max(pl.cap[s] - pinned_z.get(z, 0), 0), len(nodes))
            if not room:
                continue
            zv = net.vertex()
            net.edge(sv, zv, room)
            for i in nodes:
                if (s, i) in pl.avoid and i not in pl.cand_set[s]:
                    continue
                cost = 0 if i in pl.cand_set[s] else unit + landing[i]
                carriers.append((s, i, net.edge(zv, node_v[i], 1, cost)))
    flow, cost = net.run(source, sink, total)
    if flow != total or cost > -FORCE * floors + FORCE // 2:
        return None
    members: list[list[int]] = [[] for _ in pl.specs]
    copies = 0
    for s, i, handle in carriers:
        if net.used(handle):
            members[s].append(i)
            copies += i not in pl.cand_set[s]
    for s, nodes in enumerate(members):  # keep the holders' order, new nodes last
        order = {i: pos for pos, i in enumerate(pl.cand[s])}
        nodes.sort(key=lambda i: (order.get(i, len(order)), i))
    return members, copies
