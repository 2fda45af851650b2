"""The primary role: how many primaries each node should lead, and who leads each shard."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from services.sharding.placement.quotas import _EPS, waterfill

if TYPE_CHECKING:
    from services.sharding.placement.planner import _Planner


def assign_primaries(pl: _Planner) -> None:
    """One primary per shard among its active replicas, each node within one of its ideal.

    Current primaries are kept up to the node's ceiling; the rest go to the
    replica with the most room; nodes left below their floor take primaries
    over the shortest chain of hand-offs.
    """
    S = len(pl.specs)
    N = len(pl.names)
    shards = [s for s in range(S) if pl.members[s]]
    px = [0.0] * N
    sole = [0] * N  # shards whose only active replica is on the node: a forced primary
    for s in shards:
        if len(pl.members[s]) == 1:
            sole[pl.members[s][0]] += 1
    if shards:
        share = waterfill(
            len(shards),
            [pl.weight[i] for i in pl.act],
            [float(pl.count[i]) for i in pl.act],
            [float(sole[i]) for i in pl.act],
        )
        for i, v in zip(pl.act, share, strict=True):
            px[i] = v
    pl.px = px
    lo = [min(math.floor(v + _EPS), c) for v, c in zip(px, pl.count, strict=True)]
    hi = [min(math.ceil(v - _EPS), c) for v, c in zip(px, pl.count, strict=True)]
    pl.plo, pl.phi = lo, hi
    pl.prim = [-1] * S
    pl.owned = [set() for _ in range(N)]
    pcount = pl.pcount = [0] * N
    for s in shards:
        op = pl.old_primary[s]
        if op >= 0 and op in pl.member_set[s] and pcount[op] < hi[op]:
            set_primary(pl, s, op)
    for s in shards:
        if pl.prim[s] >= 0:
            continue
        best = -1
        best_key = (0, 0, 0, 0)
        for i in pl.members[s]:
            if pcount[i] >= hi[i]:
                continue
            key = (pcount[i] - lo[i], pcount[i] - hi[i], 1 if i in pl.new[s] else 0, i)
            if best < 0 or key < best_key:
                best, best_key = i, key
        if best >= 0:
            set_primary(pl, s, best)
        elif not augment(pl, s):
            set_primary(pl, s, min(pl.members[s], key=lambda i: (pcount[i] - hi[i], i)))
    for u in pl.act:
        while pcount[u] < lo[u] and raise_primaries(pl, u):
            pass


def set_primary(pl: _Planner, shard: int, node: int) -> None:
    old = pl.prim[shard]
    if old >= 0:
        pl.owned[old].discard(shard)
        pl.pcount[old] -= 1
    pl.prim[shard] = node
    pl.owned[node].add(shard)
    pl.pcount[node] += 1


def augment(pl: _Planner, shard: int) -> bool:
    """Make room for shard ``shard`` under every ceiling via a chain of reassignments."""
    parent: dict[int, tuple[int, int]] = {}
    queue: list[int] = []
    for i in pl.members[shard]:
        if i not in parent:
            parent[i] = (shard, -1)
            queue.append(i)
    head = 0
    while head < len(queue):
        m = queue[head]
        head += 1
        if pl.pcount[m] < pl.phi[m]:
            node = m
            while True:
                t, prev = parent[node]
                set_primary(pl, t, node)
                if prev < 0:
                    return True
                node = prev
        for t in sorted(pl.owned[m]):
            for m2 in pl.members[t]:
                if m2 not in parent:
                    parent[m2] = (t, m)
                    queue.append(m2)
    return False


def raise_primaries(pl: _Planner, receiver: int) -> bool:
    """Give node ``receiver`` one more primary from a node above its floor, by the shortest chain."""
    parent: dict[int, tuple[int, int]] = {receiver: (-1, -1)}
    queue = [receiver]
    head = 0
    while head < len(queue):
        v = queue[head]
        head += 1
        for t in sorted(pl.node_shards[v]):
            m = pl.prim[t]
            if m < 0 or m in parent:
                continue
            parent[m] = (t, v)
            if pl.pcount[m] > pl.plo[m]:
                node = m
                while node != receiver:
                    t2, taker = parent[node]
                    set_primary(pl, t2, taker)
                    node = taker
                return True
            queue.append(m)
    return False
