"""One planning run: the planner's state over integer indices, its bookkeeping and the result."""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence

from services.sharding.placement import exact
from services.sharding.placement.greedy import balance, fill, keep
from services.sharding.placement.primaries import assign_primaries
from services.sharding.placement.quotas import compute_ideal
from services.sharding.placement.specs import Move, NodeSpec, Plan, ShardSpec, Target, validate

# Candidates pick() chooses among (by hash), so that shards spread over many
# node combinations instead of a few fixed groups.
_SPREAD = 4


def plan(shards: Sequence[ShardSpec], nodes: Mapping[str, NodeSpec], avoid: Collection[tuple[str, str]] = ()) -> Plan:
    """Plan the placement of ``shards`` on ``nodes``.

    ``holders`` of each shard are its current replicas (a node unknown to
    ``nodes`` counts as gone). ``avoid`` lists ``(shard, node)`` pairs that must
    not receive a new replica (copies that kept failing). Raises
    :class:`BadRequest` for malformed input.
    """
    validate(shards, nodes)
    return _Planner(shards, nodes, frozenset(avoid)).run()


def _mix(a: int, b: int) -> int:
    """A fixed pseudo-random 32-bit mix of two indices (deterministic on every machine)."""
    h = (a * 0x9E3779B1 + b * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    h = (h * 0x297A2D39) & 0xFFFFFFFF
    return h ^ (h >> 15)


class _Planner:
    """One planning run over integer indices (nodes sorted by id, shards in input order)."""

    # Set by the passes of the other modules (quotas, greedy, primaries) as they run.
    node_cap: int
    cap_z: list[int]
    x: list[float]
    total: int
    count: list[int]
    quota: list[int]
    heap: list[tuple[int, int]]
    members: list[list[int]]
    member_set: list[set[int]]
    new: list[set[int]]
    node_shards: list[set[int]]
    dropped: list[list[int]]
    owned: list[set[int]]
    prim: list[int]
    pcount: list[int]
    px: list[float]
    plo: list[int]
    phi: list[int]

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
        compute_ideal(self)
        keep(self)
        fill(self)
        unbalanced = balance(self)
        placed = sum(1 for r in self.r if r)
        if placed * len(self.act) <= exact._EXACT_BUDGET:
            # Small enough to solve exactly: keep the greedy answer unless the
            # exact one is balanced where it is not, or copies less.
            solved = exact.solve(self)
            if solved is not None and (unbalanced or solved[1] < self.copy_count()):
                self.adopt(solved[0])
                unbalanced = []
        assign_primaries(self)
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
