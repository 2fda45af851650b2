"""The placement planner: which nodes should hold each shard, and the moves to get there.

Sans-I/O and pure: :func:`plan` takes the current holders of every shard and
the nodes (zone, weight, state) and returns the target assignment, the
primaries and the moves. Same input, same plan, on any machine.

What a plan guarantees, in order of precedence:

1. No node holds two replicas of a shard.
2. No zone holds two replicas of a shard while the nodes that hold or may
   hold replicas span at least RF zones; with fewer zones, replicas spread
   as evenly over the zones as their node counts allow.
3. Only ``active`` nodes with a positive weight receive replicas. ``draining``
   and ``dead`` nodes lose theirs. ``down`` nodes (dead, but still inside the
   re-replication delay) keep exactly what they hold and get nothing new.
4. Replicas per active node are within one of the ideal: weight-proportional
   water-filling where a zone never gets more than rule 2 lets it hold, a
   node never more than one replica per shard, and a shard that needs every
   slot it may use sits on all of them (those are floors).
5. Primaries per node likewise, among each shard's active replicas, whenever
   the replica placement allows it.
6. Fewest copies: every replica that may stay, stays; the rounding of the
   ideal gives the extra replica to the nodes that already hold more; a join
   copies only to the new node and a leave only away from the leaver
   whenever the counts alone require nothing else.

How: a greedy pass (keep, fill the largest deficits, then shed from nodes
over quota, cheapest remedy first, see :meth:`_Planner.balance`), and, when
the cluster is small enough, an exact min-cost flow that replaces the greedy
answer if it copies less or balances where the greedy could not. The greedy
alone is exact on the regular layouts measured by bench/rebalance.py.

When fewer active nodes (or zones) than RF exist, a shard gets as many
replicas as fit and the plan reports the ``shortfall``; it never fails for
that. Nodes left off balance (layouts with no placement within one of the
ideal) are listed in ``Plan.unbalanced``. The engine in
:mod:`services.sharding.migration` carries a plan out.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from phantom_bus.errors import BadRequest
from services.sharding.flow import FORCE, MinCostFlow

NodeState = Literal["active", "draining", "dead", "down"]
NODE_STATES: tuple[NodeState, ...] = ("active", "draining", "dead", "down")

_EPS = 1e-9
# Intermediate nodes tried per stuck replica when no direct transfer exists;
# bounds the planner's worst case on pathological zone layouts.
_CHAIN_WIDTH = 64
# Most (shards to fill x nodes under quota) for which fill() orders the shards
# by how constrained they are; beyond this the order is the input order.
_SORT_BUDGET = 200_000
# Candidates pick() chooses among (by hash), so that shards spread over many
# node combinations instead of a few fixed groups.
_SPREAD = 4
# Nodes make_room() expands per stuck replica; bounds its cost on large clusters.
_AUGMENT_WIDTH = 64
# Most (shards x active nodes) for which the plan is also solved exactly as a
# min-cost flow (tens of milliseconds at this size); larger clusters rely on
# the greedy alone, which is exact on regular layouts (see bench/rebalance.py).
_EXACT_BUDGET = 1200


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node as the planner sees it. Weight 0 means "no replicas" (like draining)."""

    zone: str = ""
    weight: float = 1.0
    state: NodeState = "active"


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """A shard to place: its replication factor and the nodes that hold it now."""

    id: str
    rf: int
    holders: tuple[str, ...] = ()
    primary: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a shard should live: its nodes (kept ones first) and its primary."""

    nodes: tuple[str, ...]
    primary: str | None


@dataclass(frozen=True, slots=True)
class Move:
    """One step from the current assignment toward the target.

    ``copy`` moves give ``to_node`` a new replica (``from_node`` None: a new
    replica for an under-replicated shard) and then drop ``from_node``'s.
    ``handoff`` says the primary role passes from ``from_node`` to ``to_node``;
    with ``copy=False`` it is a role change between two existing replicas.
    ``to_node`` None drops ``from_node``'s replica with no replacement.
    """

    shard: str
    from_node: str | None
    to_node: str | None
    handoff: bool = False
    copy: bool = True


@dataclass(frozen=True)
class Plan:
    """A plan: targets per shard, the moves, and what could not be satisfied."""

    targets: dict[str, Target]
    moves: tuple[Move, ...]
    # Replicas per shard that could not be placed (too few active nodes/zones).
    shortfall: dict[str, int] = field(default_factory=dict)
    # Replica and primary counts per active node, and the real-valued ideals.
    quotas: dict[str, int] = field(default_factory=dict)
    primary_quotas: dict[str, int] = field(default_factory=dict)
    ideal: dict[str, float] = field(default_factory=dict)
    primary_ideal: dict[str, float] = field(default_factory=dict)
    # Nodes the planner could not bring to their quota (pathological zones).
    unbalanced: tuple[str, ...] = ()

    @property
    def copies(self) -> int:
        """Replicas that must be copied (the data moves)."""
        return sum(1 for m in self.moves if m.copy)

    @property
    def handoffs(self) -> int:
        """Primary role changes."""
        return sum(1 for m in self.moves if m.handoff)


def plan(shards: Sequence[ShardSpec], nodes: Mapping[str, NodeSpec], avoid: Collection[tuple[str, str]] = ()) -> Plan:
    """Plan the placement of ``shards`` on ``nodes``.

    ``holders`` of each shard are its current replicas (a node unknown to
    ``nodes`` counts as gone). ``avoid`` lists ``(shard, node)`` pairs that must
    not receive a new replica (copies that kept failing). Raises
    :class:`BadRequest` for malformed input.
    """
    _validate(shards, nodes)
    return _Planner(shards, nodes, frozenset(avoid)).run()


def _validate(shards: Sequence[ShardSpec], nodes: Mapping[str, NodeSpec]) -> None:
    for name, spec in nodes.items():
        if not isinstance(name, str) or not name:
            raise BadRequest(f"node ids must be non-empty strings, got {name!r}")
        w = spec.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise BadRequest(f"node {name}: weight must be a finite number >= 0, got {w!r}")
        if spec.state not in NODE_STATES:
            raise BadRequest(f"node {name}: state {spec.state!r} is not one of {', '.join(NODE_STATES)}")
        if not isinstance(spec.zone, str):
            raise BadRequest(f"node {name}: zone must be a string, got {spec.zone!r}")
    seen: set[str] = set()
    for sh in shards:
        if sh.id in seen:
            raise BadRequest(f"shard {sh.id} is listed twice")
        seen.add(sh.id)
        if type(sh.rf) is not int or sh.rf < 1:
            raise BadRequest(f"shard {sh.id}: rf must be an integer >= 1, got {sh.rf!r}")


def _mix(a: int, b: int) -> int:
    """A fixed pseudo-random 32-bit mix of two indices (deterministic on every machine)."""
    h = (a * 0x9E3779B1 + b * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    h = (h * 0x297A2D39) & 0xFFFFFFFF
    return h ^ (h >> 15)


def waterfill(
    total: float, weights: Sequence[float], caps: Sequence[float], floors: Sequence[float] | None = None
) -> list[float]:
    """Split ``total`` in proportion to ``weights``, each share kept within ``[floor, cap]``.

    Returns ``x_i = clamp(level * w_i, floor_i, cap_i)`` for the level at which
    the shares add up to ``total`` (all floors or all caps when ``total`` is
    outside their sums). Weights must be > 0 and floors <= caps.
    """
    n = len(weights)
    lo = [0.0] * n if floors is None else [float(f) for f in floors]
    hi = [float(c) for c in caps]
    if n == 0:
        return []
    if total <= sum(lo):
        return lo
    if total >= sum(hi):
        return hi

    def filled(level: float) -> float:
        return sum(min(max(level * w, a), b) for w, a, b in zip(weights, lo, hi, strict=True))

    # The sum is piecewise linear in the level, with kinks where a share meets
    # its floor or cap: find the segment that reaches total, then solve it.
    kinks = sorted(
        {a / w for w, a in zip(weights, lo, strict=True)} | {b / w for w, b in zip(weights, hi, strict=True)}
    )
    left, right = 0, len(kinks) - 1
    while left < right:  # last kink whose sum is <= total
        mid = (left + right + 1) // 2
        if filled(kinks[mid]) <= total:
            left = mid
        else:
            right = mid - 1
    base = kinks[left]
    fixed = 0.0
    free = 0.0
    for w, a, b in zip(weights, lo, hi, strict=True):
        if base * w < a or (a == b):
            fixed += a
        elif base * w >= b:
            fixed += b
        else:
            free += w
    level = base if free <= 0 else (total - fixed) / free
    return [min(max(level * w, a), b) for w, a, b in zip(weights, lo, hi, strict=True)]


class _Planner:
    """One planning run over integer indices (nodes sorted by id, shards in input order)."""

    def __init__(
        self, shards: Sequence[ShardSpec], nodes: Mapping[str, NodeSpec], avoid: frozenset[tuple[str, str]]
    ) -> None:
        self.specs = shards
        self.names = sorted(nodes)
        self.idx = {n: i for i, n in enumerate(self.names)}
        zones = sorted({nodes[n].zone for n in self.names})
        zid = {z: i for i, z in enumerate(zones)}
        self.zones = zones
        self.zone = [zid[nodes[n].zone] for n in self.names]
        self.weight = [float(nodes[n].weight) for n in self.names]
        self.active = [nodes[n].state == "active" and nodes[n].weight > 0 for n in self.names]
        self.down = [nodes[n].state == "down" for n in self.names]
        self.act = [i for i, a in enumerate(self.active) if a]
        self.n_z = [0] * len(zones)
        self.w_z = [0.0] * len(zones)
        for i in self.act:
            self.n_z[self.zone[i]] += 1
            self.w_z[self.zone[i]] += self.weight[i]
        self.active_zones = [z for z in range(len(zones)) if self.n_z[z]]
        self.n_down = [0] * len(zones)
        for i, d in enumerate(self.down):
            if d:
                self.n_down[self.zone[i]] += 1
        # Avoid pairs as (shard index, node index), built once shards are indexed.
        self._avoid_raw = avoid
        self.avoid: set[tuple[int, int]] = set()
        self._caps: dict[int, int] = {}

    # -- helpers -----------------------------------------------------------------

    def zone_cap(self, rf: int) -> int:
        """Most replicas of one shard per zone: 1 with enough zones, else the least that fits.

        Zones and nodes count whether active or down: a down node's replicas
        stay, so they must not push a live one out of its zone.
        """
        cap = self._caps.get(rf)
        if cap is None:
            holding = [a + d for a, d in zip(self.n_z, self.n_down, strict=True)]
            want = min(rf, sum(holding))
            cap = 1
            while sum(min(cap, k) for k in holding) < want:
                cap += 1
            self._caps[rf] = cap
        return cap

    def valid(self, shard: int, node: int, leaving: int = -1) -> bool:
        """Whether node ``node`` may take a replica of shard ``shard`` (``leaving`` gives one up)."""
        if node in self.member_set[shard] or (shard, node) in self.avoid:
            return False
        z = self.zone[node]
        used = self.zc[shard].get(z, 0)
        if leaving >= 0 and self.zone[leaving] == z:
            used -= 1
        return used < self.cap[shard]

    def add(self, shard: int, node: int) -> None:
        self.members[shard].append(node)
        self.member_set[shard].add(node)
        z = self.zone[node]
        self.zc[shard][z] = self.zc[shard].get(z, 0) + 1
        self.count[node] += 1
        self.node_shards[node].add(shard)
        if node not in self.cand_set[shard]:
            self.new[shard].add(node)
        self.push(node)

    def remove(self, shard: int, node: int) -> None:
        self.members[shard].remove(node)
        self.member_set[shard].discard(node)
        z = self.zone[node]
        self.zc[shard][z] -= 1
        self.count[node] -= 1
        self.node_shards[node].discard(shard)
        self.new[shard].discard(node)
        self.push(node)

    def push(self, node: int) -> None:
        d = self.quota[node] - self.count[node] if self.quota else 0
        if d > 0:
            heapq.heappush(self.heap, (-d, node))

    def pick(self, shard: int, leaving: int = -1) -> int:
        """A node with one of the largest deficits that may take shard ``shard``; -1 if none.

        Among the first few candidates the choice is a hash of (shard, node):
        always taking the lowest node id would put shards on the same node
        groups over and over, and then a leaving node's replicas could only go
        to a few nodes (and recovery would read from a few).
        """
        held: list[tuple[int, int]] = []
        found: list[int] = []
        while self.heap and len(found) < _SPREAD:
            d, i = heapq.heappop(self.heap)
            if -d != self.quota[i] - self.count[i]:
                continue  # stale entry; a current one is in the heap
            held.append((d, i))
            if i != leaving and self.valid(shard, i, leaving):
                found.append(i)
        for entry in held:
            heapq.heappush(self.heap, entry)
        if not found:
            return -1
        best = max(self.quota[i] - self.count[i] for i in found)
        return max((i for i in found if self.quota[i] - self.count[i] >= best - 1), key=lambda i: _mix(shard, i))

    # -- the run -----------------------------------------------------------------

    def run(self) -> Plan:
        self.classify()
        self.compute_ideal()
        self.keep()
        self.fill()
        unbalanced = self.balance()
        placed = sum(1 for r in self.r if r)
        if placed * len(self.act) <= _EXACT_BUDGET:
            # Small enough to solve exactly: keep the greedy answer unless the
            # exact one is balanced where it is not, or copies less.
            exact = _exact(self)
            if exact is not None and (unbalanced or exact[1] < self.copy_count()):
                self.adopt(exact[0])
                unbalanced = []
        self.assign_primaries()
        return self.result(unbalanced)

    def copy_count(self) -> int:
        return sum(len(n) for n in self.new)

    def adopt(self, members: list[list[int]]) -> None:
        """Replace the replica placement with ``members`` (active nodes per shard)."""
        for s in range(len(self.specs)):
            for i in list(self.members[s]):
                self.remove(s, i)
        for s, nodes in enumerate(members):
            for i in nodes:
                self.add(s, i)

    def classify(self) -> None:
        specs = self.specs
        S = len(specs)
        N = len(self.names)
        self.sid = [sh.id for sh in specs]
        sidx = {sid: s for s, sid in enumerate(self.sid)}
        for shard_id, node in self._avoid_raw:
            if shard_id in sidx and node in self.idx:
                self.avoid.add((sidx[shard_id], self.idx[node]))
        self.old: list[list[str]] = []
        self.old_primary: list[int] = []
        self.cand: list[list[int]] = []  # active holders, before any drop
        self.cand_set: list[set[int]] = []
        self.pinned: list[list[int]] = []
        self.cap = [0] * S
        self.r = [0] * S
        self.zc: list[dict[int, int]] = [{} for _ in range(S)]
        self.shortfall = [0] * S
        self.cur = [0] * N
        self.zone_floor = [0] * len(self.zones)
        self.zone_all = [0] * len(self.zones)
        base: dict[int, int] = {}
        for s, sh in enumerate(specs):
            seen: set[str] = set()
            old: list[str] = []
            cand: list[int] = []
            pin: list[int] = []
            for h in sh.holders:
                if h in seen:
                    continue
                seen.add(h)
                old.append(h)
                i = self.idx.get(h, -1)
                if i < 0:
                    continue
                if self.active[i]:
                    cand.append(i)
                    self.cur[i] += 1
                elif self.down[i]:
                    pin.append(i)
            self.old.append(old)
            self.cand_set.append(set(cand))
            p = self.idx.get(sh.primary, -1) if sh.primary is not None else -1
            self.old_primary.append(p)
            self.cand.append(cand)
            self.pinned.append(pin)
            cap = self.zone_cap(sh.rf)
            self.cap[s] = cap
            for i in pin:
                z = self.zone[i]
                self.zc[s][z] = self.zc[s].get(z, 0) + 1
            if cap not in base:
                base[cap] = sum(min(cap, self.n_z[z]) for z in self.active_zones)
            room = base[cap]
            for z, used in self.zc[s].items():
                if self.n_z[z]:
                    room -= min(cap, self.n_z[z]) - min(max(cap - used, 0), self.n_z[z])
            need = max(0, sh.rf - len(pin))
            self.r[s] = min(need, room)
            self.shortfall[s] = need - self.r[s]
            if self.r[s] and self.r[s] == room:
                # The shard needs every slot it may use: each zone must hold its
                # share of it, and a zone with no more nodes than that share
                # must hold it on every node. These are floors for the ideal.
                for z in self.active_zones:
                    take = min(max(cap - self.zc[s].get(z, 0), 0), self.n_z[z])
                    self.zone_floor[z] += take
                    if take and take == self.n_z[z]:
                        self.zone_all[z] += 1

    def compute_ideal(self) -> None:
        N = len(self.names)
        S = len(self.specs)
        R = sum(self.r)
        placed = [s for s in range(S) if self.r[s] > 0]
        self.node_cap = len(placed)
        # Zone capacity: one shard can put at most min(cap - pinned there, nodes) in a zone.
        cap_z = [0] * len(self.zones)
        by_cap: dict[int, int] = {}
        for s in placed:
            by_cap[self.cap[s]] = by_cap.get(self.cap[s], 0) + 1
        for z in self.active_zones:
            cap_z[z] = sum(k * min(c, self.n_z[z]) for c, k in by_cap.items())
        for s in placed:
            c = self.cap[s]
            for z, used in self.zc[s].items():
                if self.n_z[z]:
                    cap_z[z] -= min(c, self.n_z[z]) - min(max(c - used, 0), self.n_z[z])
        self.cap_z = cap_z
        x = [0.0] * N
        if R and self.act:
            az = self.active_zones
            xz = waterfill(R, [self.w_z[z] for z in az], [cap_z[z] for z in az], [self.zone_floor[z] for z in az])
            members: dict[int, list[int]] = {z: [] for z in az}
            for i in self.act:
                members[self.zone[i]].append(i)
            for z, total in zip(az, xz, strict=True):
                nodes = members[z]
                share = waterfill(
                    total,
                    [self.weight[i] for i in nodes],
                    [self.node_cap] * len(nodes),
                    [self.zone_all[z]] * len(nodes),
                )
                for i, v in zip(nodes, share, strict=True):
                    x[i] = v
        self.x = x
        self.total = R
        self.quota: list[int] = []  # rounded once keep() knows which replicas stay

    def round(
        self, ideals: list[float], cur: list[int], total: int, node_cap: list[int], cap_z: list[int] | None
    ) -> list[int]:
        """Round ideals to integers summing to ``total``: floor or ceil of each, never more.

        Ceilings go first to nodes that already hold more than the floor, so
        rounding itself never forces a move; then to nodes that receive
        replicas anyway, so that fewer nodes are disturbed.
        """
        N = len(self.names)
        q = [0] * N
        zsum = [0] * len(self.zones)
        for i in self.act:
            q[i] = min(math.floor(ideals[i] + _EPS), node_cap[i])
            zsum[self.zone[i]] += q[i]
        extra = total - sum(q)
        order = sorted(
            (i for i in self.act if ideals[i] - q[i] > _EPS and q[i] < node_cap[i]),
            key=lambda i: (0 if cur[i] > q[i] else 1 if cur[i] < q[i] else 2, -(ideals[i] - q[i]), i),
        )
        for i in order:
            if extra <= 0:
                break
            z = self.zone[i]
            if cap_z is not None and zsum[z] + 1 > cap_z[z]:
                continue
            q[i] += 1
            zsum[z] += 1
            extra -= 1
        # Float edge cases only: settle the remainder on the least-rounded nodes.
        while extra > 0:
            room = [
                i
                for i in self.act
                if q[i] < node_cap[i] and (cap_z is None or zsum[self.zone[i]] < cap_z[self.zone[i]])
            ]
            if not room:
                break
            i = max(room, key=lambda j: (ideals[j] - q[j], -j))
            q[i] += 1
            zsum[self.zone[i]] += 1
            extra -= 1
        while extra < 0:
            i = min((j for j in self.act if q[j] > 0), key=lambda j: (ideals[j] - q[j], j))
            q[i] -= 1
            zsum[self.zone[i]] -= 1
            extra += 1
        return q

    def keep(self) -> None:
        """Keep every active holder that rules 1-2 and the shard's replica count allow."""
        S = len(self.specs)
        N = len(self.names)
        self.members: list[list[int]] = [[] for _ in range(S)]
        self.member_set: list[set[int]] = [set() for _ in range(S)]
        self.new: list[set[int]] = [set() for _ in range(S)]
        self.node_shards: list[set[int]] = [set() for _ in range(N)]
        self.dropped: list[list[int]] = [[] for _ in range(S)]
        self.count = list(self.cur)
        self.heap: list[tuple[int, int]] = []
        for s in range(S):
            cand = self.cand[s]
            if not cand:
                continue
            op = self.old_primary[s]

            def drop_first(i: int, op: int = op) -> tuple[float, bool, int]:
                return (self.count[i] - self.x[i], i != op, i)

            keep: list[int] = []
            by_zone: dict[int, list[int]] = {}
            for i in cand:
                by_zone.setdefault(self.zone[i], []).append(i)
            for z, group in by_zone.items():
                room = max(0, self.cap[s] - self.zc[s].get(z, 0))
                if len(group) > room:
                    group.sort(key=drop_first, reverse=True)
                    for i in group[: len(group) - room]:
                        self.count[i] -= 1
                    group = group[len(group) - room :]
                keep.extend(group)
            if len(keep) > self.r[s]:
                keep.sort(key=drop_first, reverse=True)
                for i in keep[: len(keep) - self.r[s]]:
                    self.count[i] -= 1
                keep = keep[len(keep) - self.r[s] :]
            kept = set(keep)
            for i in cand:  # preserve the holders' order
                if i in kept:
                    self.count[i] -= 1  # add() counts it again
                    self.add(s, i)
                else:
                    self.dropped[s].append(i)
        # Round after the forced drops, so that the ceilings go to the nodes
        # that keep the most and rounding itself forces no copy.
        self.quota = self.round(self.x, self.count, self.total, [self.node_cap] * N, self.cap_z)
        self.heap = []
        for i in self.act:
            self.push(i)
        self.swap_drops()

    def swap_drops(self) -> None:
        """Revisit which holder a shard dropped, so that nodes over quota drop instead.

        Each shard decided alone which of its holders to drop; a node left
        over quota can still hand its replica's drop to a dropped holder of the
        same shard, along a chain that ends at a node under quota. Every such
        chain saves one copy.
        """
        if not any(self.dropped):
            return
        for o in [i for i in self.act if self.count[i] > self.quota[i]]:
            while self.count[o] > self.quota[o]:
                parent: dict[int, tuple[int, int]] = {o: (-1, -1)}
                queue = [o]
                found = -1
                head = 0
                while head < len(queue) and found < 0:
                    v = queue[head]
                    head += 1
                    for s in sorted(self.node_shards[v]):
                        for d in self.dropped[s]:
                            if d in parent or not self.valid(s, d, v):
                                continue
                            parent[d] = (s, v)
                            if self.count[d] < self.quota[d]:
                                found = d
                                break
                            queue.append(d)
                        if found >= 0:
                            break
                if found < 0:
                    break
                node = found
                while node != o:
                    s, giver = parent[node]
                    self.remove(s, giver)
                    self.dropped[s].remove(node)
                    self.dropped[s].append(giver)
                    self.add(s, node)
                    node = giver

    def fill(self) -> None:
        """Give every shard its missing replicas, on the nodes with the largest deficit.

        When the work is small enough to sort, the shards with the fewest
        possible receivers go first, so that they are not crowded out.
        """
        order = [s for s in range(len(self.specs)) if self.r[s] > len(self.members[s])]
        under = [u for u in self.act if self.count[u] < self.quota[u]]
        if len(order) * len(under) <= _SORT_BUDGET:
            choices = {s: sum(1 for u in under if self.valid(s, u)) for s in order}
            order.sort(key=lambda s: (choices[s], s))
        for s in order:
            for _ in range(self.r[s] - len(self.members[s])):
                i = self.pick(s)
                if i < 0:
                    i = self.make_room(s)
                if i < 0:
                    i = self.least_loaded(s)
                if i < 0:
                    self.shortfall[s] += 1
                    continue
                self.add(s, i)

    def make_room(self, shard: int) -> int:
        """A node for shard ``shard`` after shifting copies this plan makes anyway, or -1.

        When every node with a deficit already holds ``shard``, a new copy placed
        on some node ``m`` that ``shard`` could use may move on to a node with a
        deficit, freeing ``m`` (breadth first, so the chain is the shortest).
        Only copies made by this plan move, so this costs no extra copy.
        """
        parent: dict[int, tuple[int, int]] = {}
        queue: list[int] = []
        for m in self.act:
            if self.valid(shard, m):
                parent[m] = (shard, -1)
                queue.append(m)
        head = 0
        while head < len(queue) and head < _AUGMENT_WIDTH:
            m = queue[head]
            head += 1
            for t in sorted(t for t in self.node_shards[m] if m in self.new[t]):
                if t == shard:
                    continue
                for v in self.act:
                    if v in parent or not self.valid(t, v, m):
                        continue
                    parent[v] = (t, m)
                    if self.count[v] < self.quota[v]:
                        node = v
                        while True:
                            moving, source = parent[node]
                            if source < 0:
                                return node
                            self.transfer(moving, source, node)
                            node = source
                    queue.append(v)
        return -1

    def least_loaded(self, shard: int) -> int:
        """Any valid node, least over its quota; used only when no node with a deficit fits.

        Nodes that stay within one of their ideal come first: balance() can
        then settle the difference by trading quota instead of copying.
        """
        best = -1
        best_key = (0, 0, 0)
        for i in self.act:
            if self.valid(shard, i):
                key = (max(0, self.count[i] + 1 - math.ceil(self.x[i] - _EPS)), self.count[i] - self.quota[i], i)
                if best < 0 or key < best_key:
                    best, best_key = i, key
        return best

    def candidates(self, giver: int) -> list[int]:
        """Shards node ``giver`` could give up, cheapest first: new copies, replicas, primaries."""
        return sorted(
            self.node_shards[giver],
            key=lambda s: (0 if giver in self.new[s] else (2 if self.old_primary[s] == giver else 1), s),
        )

    def balance(self) -> list[int]:
        """Bring nodes over quota down, cheapest remedy first.

        1. retarget a copy this plan already makes, directly or by passing
           it to a node whose own new copy moves on (free);
        2. trade a unit of quota with a node under quota (free; both stay
           within one of their ideal);
        3. move a replica the node holds to a node under quota, or to one whose
           quota can take a unit from a node under quota (one copy);
        4. trade quota with a node that can then shed directly (one copy);
        5. move a replica through an intermediate node (two copies);
        6. trade quota with any node that can spare it (it then sheds one).
        """
        stuck: list[int] = []
        work = sorted(
            (i for i in self.act if self.count[i] > self.quota[i]),
            key=lambda i: (self.quota[i] - self.count[i], i),
        )
        relaxes = 2 * len(self.act)  # bounds step 5's trades
        retries = 2  # a node stuck early may move once the others have
        while work:
            # Most constrained first: a node with few shards that anyone under
            # quota could take must not find them taken by nodes with many.
            o = min(work, key=lambda i: (self.options(i), work.index(i)))
            work.remove(o)
            cands = self.candidates(o)
            fresh = [s for s in cands if o in self.new[s]]
            kept = [s for s in cands if o not in self.new[s]]
            while self.count[o] > self.quota[o]:
                if self.shed(o, fresh) or self.chain(o, fresh_only=True):
                    continue
                if self.relax(o, self.x, self.quota, self.count, under_only=True) >= 0:
                    continue
                if self.shed(o, kept) or self.shed_flex(o):
                    continue
                # A chain costs two copies; handing a unit of quota to a node that
                # can shed directly costs one.
                donor = self.relax(o, self.x, self.quota, self.count, direct=True) if relaxes > 0 else -1
                if donor < 0 and self.chain(o):
                    continue
                if donor < 0 and relaxes > 0:
                    donor = self.relax(o, self.x, self.quota, self.count)
                if donor < 0:
                    stuck.append(o)
                    break
                relaxes -= 1
                if self.count[donor] > self.quota[donor] and donor not in work:
                    work.append(donor)
            if not work and stuck and retries:
                retries -= 1
                work, stuck = stuck, []
        return stuck

    def options(self, giver: int, limit: int = 8) -> int:
        """How many of ``giver``'s shards some node under quota could take (counted up to ``limit``)."""
        under = [u for u in self.act if self.count[u] < self.quota[u]]
        found = 0
        for s in self.node_shards[giver]:
            if any(self.valid(s, u, giver) for u in under):
                found += 1
                if found >= limit:
                    break
        return found

    def shed(self, giver: int, shards: list[int]) -> bool:
        """Transfer the first of ``shards`` still on ``giver`` that a node under quota can take."""
        while shards:
            s = shards.pop(0)
            if giver not in self.member_set[s]:
                continue
            u = self.pick(s, leaving=giver)
            if u >= 0:
                self.transfer(s, giver, u)
                return True
        return False

    def shed_flex(self, giver: int) -> bool:
        """Move one of ``giver``'s replicas to a node at quota that may still grow to its ceiling,
        paid for by a unit of quota from a node under quota."""
        x, quota, count = self.x, self.quota, self.count
        donors = [d for d in self.act if count[d] < quota[d] and quota[d] - 1 >= math.floor(x[d] + _EPS)]
        if not donors:
            return False
        growable = [v for v in self.act if v != giver and quota[v] + 1 <= math.ceil(x[v] - _EPS)]
        for s in self.candidates(giver):
            for v in growable:
                if not self.valid(s, v, giver):
                    continue
                d = next((d for d in donors if d != v), -1)
                if d < 0:
                    continue
                quota[d] -= 1
                quota[v] += 1
                self.transfer(s, giver, v)
                return True
        return False

    def relax(
        self,
        giver: int,
        ideals: list[float],
        quota: list[int],
        count: list[int],
        under_only: bool = False,
        direct: bool = False,
    ) -> int:
        """Trade one unit of quota from another node to ``giver``, both staying within one.

        Rounding picks the ceilings before it knows which replicas are pinned
        in place (the replacement for a lost replica can only go where the
        shard is not yet); this repairs that choice without moving anything.
        The donor is preferably under its quota; otherwise it now has one
        replica to shed. Returns the donor, or -1 if no trade keeps both
        within one of their ideal.
        """
        if quota[giver] + 1 > math.ceil(ideals[giver] - _EPS):
            return -1
        best = -1
        best_key = (0, 0, 0)
        for u in self.act:
            if u == giver or quota[u] - 1 < math.floor(ideals[u] + _EPS):
                continue
            if under_only and count[u] >= quota[u]:
                continue
            if direct and not self.options(u, limit=1):
                continue
            key = (0 if count[u] < quota[u] else 1, count[u] - quota[u], u)
            if best < 0 or key < best_key:
                best, best_key = u, key
        if best < 0:
            return -1
        quota[best] -= 1
        quota[giver] += 1
        self.push(best)
        return best

    def transfer(self, shard: int, giver: int, taker: int) -> None:
        # When the giver's replica is itself a new copy in this plan, this retargets the
        # copy and costs no extra move; candidates() offers those first.
        self.remove(shard, giver)
        self.add(shard, taker)

    def chain(self, giver: int, fresh_only: bool = False) -> bool:
        """Two-hop transfer giver -> m -> u when no node under quota can take any of the giver's shards.

        With ``fresh_only`` both hops retarget copies this plan makes anyway.
        """
        mids = sorted((i for i in self.act if i != giver), key=lambda i: (self.count[i] - self.quota[i], i))
        for s in self.candidates(giver):
            if fresh_only and giver not in self.new[s]:
                break  # candidates() lists the fresh ones first
            tried = 0
            for m in mids:
                if not self.valid(s, m, giver):
                    continue
                tried += 1
                for t in self.candidates(m):
                    if fresh_only and m not in self.new[t]:
                        break
                    if t == s:
                        continue
                    u = self.pick(t, leaving=m)
                    if u >= 0:
                        self.transfer(t, m, u)
                        self.transfer(s, giver, m)
                        return True
                if tried >= _CHAIN_WIDTH:
                    break
        return False

    def assign_primaries(self) -> None:
        """One primary per shard among its active replicas, each node within one of its ideal.

        Current primaries are kept up to the node's ceiling; the rest go to the
        replica with the most room; nodes left below their floor take primaries
        over the shortest chain of hand-offs.
        """
        S = len(self.specs)
        N = len(self.names)
        shards = [s for s in range(S) if self.members[s]]
        px = [0.0] * N
        sole = [0] * N  # shards whose only active replica is on the node: a forced primary
        for s in shards:
            if len(self.members[s]) == 1:
                sole[self.members[s][0]] += 1
        if shards:
            share = waterfill(
                len(shards),
                [self.weight[i] for i in self.act],
                [float(self.count[i]) for i in self.act],
                [float(sole[i]) for i in self.act],
            )
            for i, v in zip(self.act, share, strict=True):
                px[i] = v
        self.px = px
        lo = [min(math.floor(v + _EPS), c) for v, c in zip(px, self.count, strict=True)]
        hi = [min(math.ceil(v - _EPS), c) for v, c in zip(px, self.count, strict=True)]
        self.plo, self.phi = lo, hi
        self.prim = [-1] * S
        self.owned: list[set[int]] = [set() for _ in range(N)]
        pcount = self.pcount = [0] * N
        for s in shards:
            op = self.old_primary[s]
            if op >= 0 and op in self.member_set[s] and pcount[op] < hi[op]:
                self.set_primary(s, op)
        for s in shards:
            if self.prim[s] >= 0:
                continue
            best = -1
            best_key = (0, 0, 0, 0)
            for i in self.members[s]:
                if pcount[i] >= hi[i]:
                    continue
                key = (pcount[i] - lo[i], pcount[i] - hi[i], 1 if i in self.new[s] else 0, i)
                if best < 0 or key < best_key:
                    best, best_key = i, key
            if best >= 0:
                self.set_primary(s, best)
            elif not self.augment(s):
                self.set_primary(s, min(self.members[s], key=lambda i: (pcount[i] - hi[i], i)))
        for u in self.act:
            while pcount[u] < lo[u] and self.raise_primaries(u):
                pass

    def set_primary(self, shard: int, node: int) -> None:
        old = self.prim[shard]
        if old >= 0:
            self.owned[old].discard(shard)
            self.pcount[old] -= 1
        self.prim[shard] = node
        self.owned[node].add(shard)
        self.pcount[node] += 1

    def augment(self, shard: int) -> bool:
        """Make room for shard ``shard`` under every ceiling via a chain of reassignments."""
        parent: dict[int, tuple[int, int]] = {}
        queue: list[int] = []
        for i in self.members[shard]:
            if i not in parent:
                parent[i] = (shard, -1)
                queue.append(i)
        head = 0
        while head < len(queue):
            m = queue[head]
            head += 1
            if self.pcount[m] < self.phi[m]:
                node = m
                while True:
                    t, prev = parent[node]
                    self.set_primary(t, node)
                    if prev < 0:
                        return True
                    node = prev
            for t in sorted(self.owned[m]):
                for m2 in self.members[t]:
                    if m2 not in parent:
                        parent[m2] = (t, m)
                        queue.append(m2)
        return False

    def raise_primaries(self, receiver: int) -> bool:
        """Give node ``receiver`` one more primary from a node above its floor, by the shortest chain."""
        parent: dict[int, tuple[int, int]] = {receiver: (-1, -1)}
        queue = [receiver]
        head = 0
        while head < len(queue):
            v = queue[head]
            head += 1
            for t in sorted(self.node_shards[v]):
                m = self.prim[t]
                if m < 0 or m in parent:
                    continue
                parent[m] = (t, v)
                if self.pcount[m] > self.plo[m]:
                    node = m
                    while node != receiver:
                        t2, taker = parent[node]
                        self.set_primary(t2, taker)
                        node = taker
                    return True
                queue.append(m)
        return False

    def result(self, stuck: list[int]) -> Plan:
        names = self.names
        targets: dict[str, Target] = {}
        moves: list[Move] = []
        shortfall: dict[str, int] = {}
        for s, sid in enumerate(self.sid):
            tset = {names[i] for i in self.members[s]} | {names[i] for i in self.pinned[s]}
            old = self.old[s]
            old_set = set(old)
            nodes = [h for h in old if h in tset]
            nodes += [names[i] for i in self.members[s] if names[i] not in old_set]
            primary = names[self.prim[s]] if self.prim[s] >= 0 else None
            targets[sid] = Target(tuple(nodes), primary)
            if self.shortfall[s]:
                shortfall[sid] = self.shortfall[s]
            moves.extend(_diff(sid, old, nodes, self.specs[s].primary, primary))
        act = self.act
        return Plan(
            targets=targets,
            moves=tuple(moves),
            shortfall=shortfall,
            quotas={names[i]: self.quota[i] for i in act},
            primary_quotas={names[i]: self.pcount[i] for i in act},
            ideal={names[i]: self.x[i] for i in act},
            primary_ideal={names[i]: self.px[i] for i in act},
            unbalanced=tuple(names[i] for i in stuck),
        )


def _diff(sid: str, old: list[str], new: list[str], old_primary: str | None, new_primary: str | None) -> list[Move]:
    """Pair the replicas a shard loses with the ones it gains, as moves."""
    new_set = set(new)
    old_set = set(old)
    removed = [h for h in old if h not in new_set]
    added = [h for h in new if h not in old_set]
    moves: list[Move] = []
    if old_primary not in old_set:
        old_primary = None
    handed = False
    if new_primary is not None and old_primary is not None and new_primary in added and old_primary in removed:
        moves.append(Move(sid, old_primary, new_primary, handoff=True, copy=True))
        removed.remove(old_primary)
        added.remove(new_primary)
        handed = True
    for a, b in zip(removed, added, strict=False):
        moves.append(Move(sid, a, b, handoff=False, copy=True))
    for a in removed[len(added) :]:
        moves.append(Move(sid, a, None, handoff=False, copy=False))
    for b in added[len(removed) :]:
        moves.append(Move(sid, None, b, handoff=False, copy=True))
    if not handed and old_primary is not None and new_primary is not None and new_primary != old_primary:
        moves.append(Move(sid, old_primary, new_primary, handoff=True, copy=False))
    return moves


def _exact(pl: _Planner) -> tuple[list[list[int]], int] | None:
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
