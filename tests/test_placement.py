"""The placement planner: invariants after every membership change, and the fewest moves.

The oracle below restates the placement rules independently of the planner:
ideals by bisection instead of sorted water-filling, and the least number of
copies any plan within one of those ideals needs. That least number comes from
a min-cost flow solved by networkx's network simplex (fast enough for the large
property tests, and another algorithm and implementation than the planner's
own successive shortest paths), which is itself checked against an exhaustive
search over every plan on small clusters, so the fewest-moves assertions do
not rest on the planner's own method.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, replace

import networkx as nx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from phantom_bus.errors import BadRequest
from services.sharding.placement import NodeSpec, Plan, ShardSpec, exact, plan

# -- oracle ----------------------------------------------------------------------


def split_by_weight(
    total: float, weights: list[float], caps: list[float], floors: list[float] | None = None
) -> list[float]:
    """x_i = clamp(lam * w_i, floor_i, cap_i) with sum x_i = total, lam found by bisection."""
    lows = floors or [0.0] * len(weights)

    def share(lam: float) -> list[float]:
        return [min(max(lam * w, f), c) for w, f, c in zip(weights, lows, caps, strict=True)]

    if not weights:
        return []
    lo, hi = 0.0, 1.0
    while sum(share(hi)) < total - 1e-9 and hi < 1e12:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(share(mid)) < total:
            lo = mid
        else:
            hi = mid
    return share(hi)


@dataclass
class Oracle:
    nodes: dict[str, NodeSpec]
    shards: list[ShardSpec]

    def __post_init__(self) -> None:
        self.active = sorted(n for n, s in self.nodes.items() if s.state == "active" and s.weight > 0)
        self.zone_nodes = Counter(self.nodes[n].zone for n in self.active)

    def cap(self, rf: int) -> int:
        # Spread over the zones of every node that holds or may hold replicas.
        holding = Counter(s.zone for n, s in self.nodes.items() if n in self.active or s.state == "down")
        c = 1
        while sum(min(c, k) for k in holding.values()) < min(rf, sum(holding.values())):
            c += 1
        return c

    def pinned(self, sh: ShardSpec) -> list[str]:
        return [h for h in dict.fromkeys(sh.holders) if h in self.nodes and self.nodes[h].state == "down"]

    def room(self, sh: ShardSpec) -> dict[str, int]:
        """Most active replicas the shard may have per zone."""
        cap = self.cap(sh.rf)
        used = Counter(self.nodes[h].zone for h in self.pinned(sh))
        return {z: max(0, min(cap - used[z], k)) for z, k in self.zone_nodes.items()}

    def replicas_wanted(self, sh: ShardSpec) -> int:
        """Active replicas the shard should get."""
        return min(max(0, sh.rf - len(self.pinned(sh))), sum(self.room(sh).values()))

    def ideal(self) -> dict[str, float]:
        wanted = [self.replicas_wanted(sh) for sh in self.shards]
        total = sum(wanted)
        placed = [sh for sh, w in zip(self.shards, wanted, strict=True) if w > 0]
        zones = sorted(self.zone_nodes)
        zcap = []
        for z in zones:
            cap_z = 0
            for sh in placed:
                used = sum(1 for h in self.pinned(sh) if self.nodes[h].zone == z)
                cap_z += max(0, min(self.cap(sh.rf) - used, self.zone_nodes[z]))
            zcap.append(cap_z)
        # A shard that needs every slot it may use puts that many replicas in each
        # zone, and sits on every node of a zone that has no more nodes than that.
        zfloor: Counter[str] = Counter()
        everywhere: Counter[str] = Counter()
        for sh in placed:
            room = self.room(sh)
            if self.replicas_wanted(sh) == sum(room.values()):
                for z, k in room.items():
                    zfloor[z] += k
                    everywhere[z] += k == self.zone_nodes[z] and k > 0
        zw = [sum(self.nodes[n].weight for n in self.active if self.nodes[n].zone == z) for z in zones]
        xz = split_by_weight(total, zw, [float(c) for c in zcap], [float(zfloor[z]) for z in zones])
        out: dict[str, float] = {}
        for z, x in zip(zones, xz, strict=True):
            members = [n for n in self.active if self.nodes[n].zone == z]
            share = split_by_weight(
                x,
                [self.nodes[n].weight for n in members],
                [len(placed)] * len(members),
                [everywhere[z]] * len(members),
            )
            out.update(zip(members, share, strict=True))
        return out

    def least_copies(self) -> int:
        """A lower bound on copies from counts alone: the replicas shards lack, plus
        what nodes above the best rounding of their ideal must shed."""
        fills, transfers = self.copies_by_kind()
        return fills + transfers

    def current(self) -> Counter[str]:
        x = self.ideal()
        return Counter(h for sh in self.shards for h in dict.fromkeys(sh.holders) if h in x)

    def join_can_stay_put(self, joiner: str) -> bool:
        """Whether a plan exists (by counts) in which no node but the joiner gains a replica."""
        x, cur = self.ideal(), self.current()
        total = round(sum(x.values()))
        old = [n for n in x if n != joiner]
        if any(cur[n] < math.floor(x[n] + 1e-9) for n in old):
            return False
        return sum(min(cur[n], math.ceil(x[n] - 1e-9)) for n in old) + math.ceil(x[joiner] - 1e-9) >= total

    def leave_can_stay_put(self) -> bool:
        """Whether a plan exists (by counts) in which no remaining node gives a replica away."""
        x, cur = self.ideal(), self.current()
        if any(cur[n] > math.ceil(x[n] - 1e-9) for n in x):
            return False
        return sum(max(cur[n], math.floor(x[n] + 1e-9)) for n in x) <= round(sum(x.values()))

    def copies_by_kind(self) -> tuple[int, int]:
        """(replicas the shards lack on active nodes, replicas nodes must shed), as bounds."""
        x = self.ideal()
        cur = Counter(h for sh in self.shards for h in dict.fromkeys(sh.holders) if h in x)
        # Every replica a shard lacks on active nodes (new, or replacing one on a
        # node that is gone or draining) is a copy.
        fills = 0
        for sh in self.shards:
            on_active = sum(1 for h in dict.fromkeys(sh.holders) if h in x)
            fills += max(0, self.replicas_wanted(sh) - on_active)
        floors = {n: math.floor(v + 1e-9) for n, v in x.items()}
        extra = round(sum(x.values())) - sum(floors.values())
        excess = sum(max(0, cur[n] - floors[n]) for n in x)
        # Ceilings that spare a copy: nodes above their floor, at most the zone's spare room.
        zone_room: Counter[str] = Counter()
        zone_sticky: Counter[str] = Counter()
        for z in self.zone_nodes:
            members = [n for n in x if self.nodes[n].zone == z]
            # A zone may take the ceiling of its ideal (not a rounding: 0.5 may become 1).
            zone_room[z] = math.ceil(sum(x[n] for n in members) - 1e-9) - sum(floors[n] for n in members)
            zone_sticky[z] = sum(1 for n in members if cur[n] > floors[n] and x[n] - floors[n] > 1e-9)
        spared = min(extra, sum(min(zone_sticky[z], zone_room[z] + 1) for z in self.zone_nodes))
        return fills, excess - spared


def within_one(x: float) -> tuple[int, int]:
    return math.floor(x + 1e-9), math.ceil(x - 1e-9)


def least_cost_flow(graph: nx.DiGraph, bounds: dict[str, tuple[int, int]], total: int) -> int | None:
    """Cost of the cheapest flow of ``total`` from "source" to "sink" in which node ``n``
    passes between ``bounds[n]`` units on to the sink, or None if there is none.

    networkx's network simplex, not the planner's successive shortest paths: a lower
    bound ``lo`` on ``n -> sink`` becomes ``lo`` units of demand moved from the sink to ``n``.
    """
    g = graph.copy()
    g.add_node("source", demand=-total)
    g.add_node("sink", demand=total - sum(lo for lo, _ in bounds.values()))
    for n, (lo, hi) in bounds.items():
        g.add_node(("node", n), demand=lo)
        g.add_edge(("node", n), "sink", capacity=hi - lo, weight=0)
    try:
        cost, _ = nx.network_simplex(g)
    except nx.NetworkXUnfeasible:
        return None
    return int(cost)


def fewest_copies(nodes: dict[str, NodeSpec], shards: list[ShardSpec]) -> int | None:
    """The exact least number of copies of any valid plan, as a min-cost flow (None: infeasible).

    source -> shard (its wanted replicas) -> (shard, zone) (the zone's room) ->
    node (cost 0 if it holds the shard already, else 1) -> sink, where each
    node must take between the floor and the ceiling of its ideal.
    """
    o = Oracle(nodes, shards)
    ideal = o.ideal()
    g = nx.DiGraph()
    total = 0
    for sh in shards:
        want = o.replicas_wanted(sh)
        if not want:
            continue
        total += want
        g.add_edge("source", ("shard", sh.id), capacity=want, weight=0)
        for z, room in o.room(sh).items():
            if room:
                g.add_edge(("shard", sh.id), ("zone", sh.id, z), capacity=room, weight=0)
                for n in ideal:
                    if nodes[n].zone == z:
                        g.add_edge(("zone", sh.id, z), ("node", n), capacity=1, weight=0 if n in sh.holders else 1)
    return least_cost_flow(g, {n: within_one(x) for n, x in ideal.items()}, total)


def brute_fewest_copies(nodes: dict[str, NodeSpec], shards: list[ShardSpec]) -> int | None:
    """The least number of copies of any valid plan, by trying every plan (None: none is valid).

    A valid plan gives each shard ``replicas_wanted`` distinct active nodes, at most the
    shard's room per zone, and every active node between the floor and the ceiling of
    its ideal; a copy is a chosen node that does not hold the shard yet. Small inputs only.
    """
    o = Oracle(nodes, shards)
    ideal = o.ideal()
    active = sorted(ideal)
    bounds = {n: within_one(ideal[n]) for n in active}
    options: list[list[tuple[tuple[str, ...], int]]] = []
    for sh in shards:
        room = o.room(sh)
        fits = []
        for chosen in itertools.combinations(active, o.replicas_wanted(sh)):
            per_zone = Counter(nodes[n].zone for n in chosen)
            if all(k <= room.get(z, 0) for z, k in per_zone.items()):
                fits.append((chosen, sum(1 for n in chosen if n not in sh.holders)))
        options.append(fits)
    best: int | None = None
    counts: Counter[str] = Counter()

    def search(i: int, cost: int) -> None:
        nonlocal best
        if best is not None and cost >= best:
            return
        if i == len(options):
            if all(counts[n] >= lo for n, (lo, _) in bounds.items()):
                best = cost
            return
        for chosen, copies in options[i]:
            if any(counts[n] >= bounds[n][1] for n in chosen):
                continue
            counts.update(chosen)
            search(i + 1, cost + copies)
            counts.subtract(chosen)

    search(0, 0)
    return best


small_node_st = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from([1.0, 1.0, 2.0, 0.5]),
    st.sampled_from(["active", "active", "active", "down", "draining"]),
)


@given(
    specs=st.lists(small_node_st, min_size=1, max_size=5),
    rfs=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    holdings=st.lists(st.sets(st.integers(0, 4), max_size=3), min_size=4, max_size=4),
)
@settings(max_examples=150, deadline=None)
def test_flow_oracle_and_planner_match_an_exhaustive_search_on_small_clusters(
    specs: list[tuple[str, float, str]], rfs: list[int], holdings: list[set[int]]
) -> None:
    nodes = {f"n{i}": NodeSpec(zone=z, weight=w, state=state) for i, (z, w, state) in enumerate(specs)}  # type: ignore[arg-type]
    shards = [
        ShardSpec(f"s/{i}", rf, tuple(f"n{k}" for k in sorted(holdings[i]) if k < len(specs)))
        for i, rf in enumerate(rfs)
    ]
    least = brute_fewest_copies(nodes, shards)
    assert fewest_copies(nodes, shards) == least
    p = plan(shards, nodes)
    if least is not None:
        assert not p.unbalanced and p.copies == least, (p.copies, least)


def primaries_feasible(members: dict[str, list[str]], bounds: dict[str, tuple[int, int]]) -> bool:
    """Whether each shard can get a primary among ``members`` with every node within ``bounds``."""
    g = nx.DiGraph()
    for shard, holders in members.items():
        g.add_edge("source", ("shard", shard), capacity=1, weight=0)
        for n in holders:
            g.add_edge(("shard", shard), ("node", n), capacity=1, weight=0)
    return least_cost_flow(g, bounds, len(members)) is not None


# -- checks ----------------------------------------------------------------------


def check_invariants(nodes: dict[str, NodeSpec], shards: list[ShardSpec], p: Plan) -> None:
    """Every rule of the module docstring of placement, on one plan.

    Balance is asserted whenever a plan within one of the ideal exists (the
    min-cost-flow oracle finds one); a few mixed-RF layouts with tiny zones
    admit none, and there the plan must say which nodes are off.
    """
    o = Oracle(nodes, shards)
    ideal = o.ideal()
    counts: Counter[str] = Counter()
    prim: Counter[str] = Counter()
    zones_active = len(o.zone_nodes)
    for sh in shards:
        t = p.targets[sh.id]
        assert len(set(t.nodes)) == len(t.nodes), f"{sh.id}: a node twice in {t.nodes}"
        pinned = set(o.pinned(sh))
        for n in t.nodes:
            spec = nodes[n]
            assert (spec.state == "active" and spec.weight > 0) or n in pinned, f"{sh.id} on {n} ({spec})"
        zones = Counter(nodes[n].zone for n in t.nodes)
        if zones_active >= sh.rf:
            assert max(zones.values(), default=0) <= 1, f"{sh.id}: two replicas in one zone {t.nodes}"
        assert max(zones.values(), default=0) <= max(o.cap(sh.rf), len(pinned)), f"{sh.id}: zones {zones}"
        active_here = [n for n in t.nodes if n in ideal]
        assert len(active_here) == o.replicas_wanted(sh), f"{sh.id}: {t.nodes}"
        assert p.shortfall.get(sh.id, 0) == max(0, sh.rf - len(pinned) - len(active_here))
        if active_here:
            assert t.primary in active_here
            prim[t.primary] += 1
        else:
            assert t.primary is None
        counts.update(active_here)
    if fewest_copies(nodes, shards) is None:
        assert p.unbalanced or all(abs(counts[n] - x) < 1 + 1e-6 for n, x in ideal.items())
        return
    assert not p.unbalanced
    for n, x in ideal.items():
        assert abs(counts[n] - x) < 1 + 1e-6, f"{n}: {counts[n]} replicas, ideal {x:.3f}"
    sole: Counter[str] = Counter()  # a shard with one active replica forces its primary
    for sh in shards:
        here = [n for n in p.targets[sh.id].nodes if n in ideal]
        if len(here) == 1:
            sole[here[0]] += 1
    pideal = split_by_weight(
        sum(prim.values()),
        [nodes[n].weight for n in ideal],
        [float(counts[n]) for n in ideal],
        [float(sole[n]) for n in ideal],
    )
    # Primaries must be within one of their ideal whenever the replica placement
    # allows it at all (it may not: RF 1 shards pin their primary, and nodes
    # that share few shards can be over-constrained).
    bounds = {n: within_one(x) for n, x in zip(ideal, pideal, strict=True)}
    members = {sh.id: [n for n in p.targets[sh.id].nodes if n in ideal] for sh in shards}
    if primaries_feasible({k: v for k, v in members.items() if v}, bounds):
        for n, x in zip(ideal, pideal, strict=True):
            assert abs(prim[n] - x) < 1 + 1e-6, f"{n}: {prim[n]} primaries, ideal {x:.3f}"


def settle(shards: list[ShardSpec], p: Plan) -> list[ShardSpec]:
    return [replace(sh, holders=p.targets[sh.id].nodes, primary=p.targets[sh.id].primary) for sh in shards]


# -- property tests -------------------------------------------------------------

ZONES = ["a", "b", "c", "d"]
WEIGHTS = [1.0, 1.0, 1.0, 2.0, 0.5]

node_st = st.tuples(st.sampled_from(ZONES), st.sampled_from(WEIGHTS))
op_st = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(ZONES), st.sampled_from(WEIGHTS)),
    st.tuples(st.just("leave"), st.integers(0, 50)),
    st.tuples(st.just("drain"), st.integers(0, 50)),
    st.tuples(st.just("die"), st.integers(0, 50)),
    st.tuples(st.just("expire"), st.integers(0, 50)),
    st.tuples(st.just("return"), st.integers(0, 50)),
    st.tuples(st.just("weight"), st.integers(0, 50), st.sampled_from(WEIGHTS)),
)


def run_history(
    nodes: dict[str, NodeSpec], shards: list[ShardSpec], ops: list[tuple], slack: int, directed: bool
) -> None:
    """Apply ``ops`` one by one, each plan carried out at once, checking every step.

    ``slack`` is how many copies above the exact optimum a join or leave may
    cost (0: exactly the fewest). ``directed`` also checks that joins copy only
    to the joiner and leaves only from the leaver when the counts allow it
    (with unequal weights a node below its ideal may rightly receive instead).
    """
    p = plan(shards, nodes)
    check_invariants(nodes, shards, p)
    shards = settle(shards, p)
    serial = len(nodes)
    for op in ops:
        names = sorted(nodes)
        kind = op[0]
        changed: str | None = None
        if kind == "join":
            changed = f"n{serial}"
            serial += 1
            nodes[changed] = NodeSpec(zone=op[1], weight=op[2])
        else:
            if not names:
                continue
            name = names[op[1] % len(names)]
            spec = nodes[name]
            if kind == "leave":
                del nodes[name]
                changed = name
            elif kind == "drain" and spec.state == "active":
                nodes[name] = replace(spec, state="draining")
                changed = name
            elif kind == "die" and spec.state == "active":
                nodes[name] = replace(spec, state="down")
            elif kind == "expire" and spec.state == "down":
                nodes[name] = replace(spec, state="dead")
                changed = name
            elif kind == "return" and spec.state in ("down", "dead"):
                nodes[name] = replace(spec, state="active")
            elif kind == "weight":
                nodes[name] = replace(spec, weight=op[2])
            else:
                continue
        before = shards
        least = fewest_copies(nodes, before)
        bound = Oracle(nodes, before).least_copies()
        assert least is None or least >= bound
        p = plan(before, nodes)
        assert p == plan(before, nodes), "same input, different plan"
        check_invariants(nodes, before, p)
        if kind in ("join", "leave", "drain", "expire") and least is not None:
            assert least <= p.copies <= least + slack, f"{kind} {changed}: {p.copies} copies, least is {least}"
        if kind == "die":
            down = names[op[1] % len(names)]
            assert all((down in sh.holders) == (down in p.targets[sh.id].nodes) for sh in before), (
                "a node inside the re-replication delay keeps exactly its replicas"
            )
        # Nothing but the joiner receives and nothing but the leaver gives,
        # whenever the counts allow it and the optimum needs no detour.
        o = Oracle(nodes, before)
        if directed and p.copies == o.least_copies():
            if kind == "join" and o.join_can_stay_put(str(changed)):
                assert {m.to_node for m in p.moves if m.copy} <= {changed}
            if kind in ("leave", "drain", "expire") and o.leave_can_stay_put():
                assert {m.from_node for m in p.moves if m.copy} <= {changed, None}
        shards = settle(before, p)


same_weight_op = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(ZONES), st.just(1.0)),
    st.tuples(st.sampled_from(["leave", "drain", "die", "expire", "return"]), st.integers(0, 50)),
)


@given(
    zones=st.lists(st.sampled_from(ZONES), min_size=1, max_size=7),
    shard_count=st.integers(1, 40),
    rf=st.integers(1, 3),
    ops=st.lists(same_weight_op, max_size=8),
)
@settings(max_examples=60, deadline=None)
def test_equal_weight_histories_keep_invariants_and_move_the_fewest_replicas(
    zones: list[str], shard_count: int, rf: int, ops: list[tuple]
) -> None:
    nodes = {f"n{i}": NodeSpec(zone=z) for i, z in enumerate(zones)}
    run_history(nodes, [ShardSpec(f"s/{i}", rf) for i in range(shard_count)], ops, slack=0, directed=True)


@given(
    initial=st.lists(node_st, min_size=1, max_size=7),
    shard_count=st.integers(1, 40),
    rfs=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    ops=st.lists(op_st, max_size=8),
)
@settings(max_examples=60, deadline=None)
def test_weighted_mixed_rf_histories_keep_invariants_and_move_the_fewest_replicas(
    initial: list[tuple[str, float]], shard_count: int, rfs: list[int], ops: list[tuple]
) -> None:
    nodes = {f"n{i}": NodeSpec(zone=z, weight=w) for i, (z, w) in enumerate(initial)}
    shards = [ShardSpec(f"s/{i}", rfs[i % len(rfs)]) for i in range(shard_count)]
    run_history(nodes, shards, ops, slack=0, directed=False)


@given(
    size=st.integers(1, 8),
    shard_count=st.integers(1, 60),
    rf=st.integers(1, 3),
    ops=st.lists(same_weight_op, max_size=8),
)
@settings(max_examples=50, deadline=None)
def test_greedy_alone_is_exact_with_one_zone_and_equal_weights(
    size: int, shard_count: int, rf: int, ops: list[tuple]
) -> None:
    # Large clusters skip the exact min-cost-flow pass; the greedy must still be
    # exact on the common layout. Every join lands in the same zone here. The
    # budget is below zero, not zero: a plan with nothing to place (no active
    # node left) would otherwise still be handed to the exact solver.
    nodes = {f"n{i}": NodeSpec(zone="a") for i in range(size)}
    ops = [("join", "a", 1.0) if op[0] == "join" else op for op in ops]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exact, "_EXACT_BUDGET", -1)
        run_history(nodes, [ShardSpec(f"s/{i}", rf) for i in range(shard_count)], ops, slack=0, directed=True)


@given(n=st.integers(3, 30), shards=st.integers(8, 200), rf=st.integers(1, 3), zones=st.integers(1, 4))
@example(n=8, shards=191, rf=3, zones=4)  # zones one node apart: the greedy copies 65, the least is 63
@settings(max_examples=40, deadline=None)
def test_join_moves_about_one_over_n_plus_one_all_to_the_new_node(n: int, shards: int, rf: int, zones: int) -> None:
    zones = min(zones, n)
    nodes = {f"n{i:02d}": NodeSpec(zone=f"z{i % zones}") for i in range(n)}
    fresh = [ShardSpec(f"s/{i}", rf) for i in range(shards)]
    specs = settle(fresh, plan(fresh, nodes))
    nodes["new"] = NodeSpec(zone=f"z{n % zones}")  # zones stay as even as they can
    p = plan(specs, nodes)
    least = fewest_copies(nodes, specs)
    zone_sizes = Counter(spec.zone for spec in nodes.values())
    if len(set(zone_sizes.values())) == 1 or shards * min(rf, n + 1) * (n + 1) <= exact._EXACT_BUDGET:
        assert p.copies == least  # a regular layout, or small enough to be solved exactly
    else:
        # Zones one node apart, beyond the exact solver's budget: the greedy alone may copy a
        # few more (n=8 in 4 zones, rf 3, 191 shards: 65 against 63).
        assert least <= p.copies <= least + math.ceil(0.05 * least), (p.copies, least)
    if least == Oracle(nodes, specs).least_copies() and p.copies == least:
        assert all(m.to_node == "new" for m in p.moves if m.copy)
    if zones == 1:
        share = shards * min(rf, n + 1) / (n + 1)
        assert p.copies in (math.floor(share + 1e-9), math.ceil(share - 1e-9))


# -- unit tests -----------------------------------------------------------------


def three_zones(n: int = 6) -> dict[str, NodeSpec]:
    return {f"n{i}": NodeSpec(zone="abc"[i % 3]) for i in range(n)}


def test_empty_cluster_places_nothing_and_reports_shortfall() -> None:
    p = plan([ShardSpec("s/0", 3)], {})
    assert p.targets["s/0"].nodes == () and p.targets["s/0"].primary is None
    assert p.shortfall == {"s/0": 3}


def test_fewer_nodes_than_rf_places_what_fits() -> None:
    p = plan([ShardSpec(f"s/{i}", 3) for i in range(5)], {"a": NodeSpec(), "b": NodeSpec()})
    assert all(len(t.nodes) == 2 for t in p.targets.values())
    assert p.shortfall == {f"s/{i}": 1 for i in range(5)}


def test_replicas_spread_over_zones_when_there_are_enough() -> None:
    nodes = three_zones(9)
    p = plan([ShardSpec(f"s/{i}", 3) for i in range(30)], nodes)
    for t in p.targets.values():
        assert sorted(nodes[n].zone for n in t.nodes) == ["a", "b", "c"]


def test_two_zones_and_rf_three_put_at_most_two_in_a_zone() -> None:
    nodes = {f"n{i}": NodeSpec(zone="ab"[i % 2]) for i in range(6)}
    p = plan([ShardSpec(f"s/{i}", 3) for i in range(30)], nodes)
    for t in p.targets.values():
        assert max(Counter(nodes[n].zone for n in t.nodes).values()) == 2


def test_weights_give_proportional_replicas() -> None:
    nodes = {"big": NodeSpec(weight=3.0), "a": NodeSpec(), "b": NodeSpec(), "c": NodeSpec()}
    p = plan([ShardSpec(f"s/{i}", 1) for i in range(60)], nodes)
    counts = Counter(n for t in p.targets.values() for n in t.nodes)
    assert counts == {"big": 30, "a": 10, "b": 10, "c": 10}


def test_draining_and_zero_weight_nodes_lose_their_replicas() -> None:
    nodes = three_zones(6)
    specs = settle(
        [ShardSpec(f"s/{i}", 3) for i in range(12)], plan([ShardSpec(f"s/{i}", 3) for i in range(12)], nodes)
    )
    nodes["n0"] = replace(nodes["n0"], state="draining")
    nodes["n1"] = replace(nodes["n1"], weight=0.0)
    p = plan(specs, nodes)
    assert all("n0" not in t.nodes and "n1" not in t.nodes for t in p.targets.values())


def test_down_node_keeps_its_replicas_but_not_its_primaries() -> None:
    nodes = three_zones(6)
    specs = settle(
        [ShardSpec(f"s/{i}", 3) for i in range(12)], plan([ShardSpec(f"s/{i}", 3) for i in range(12)], nodes)
    )
    held = {sh.id for sh in specs if "n2" in sh.holders}
    nodes["n2"] = replace(nodes["n2"], state="down")
    p = plan(specs, nodes)
    assert p.copies == 0
    assert {sid for sid, t in p.targets.items() if "n2" in t.nodes} == held
    assert all(t.primary != "n2" for t in p.targets.values())


def test_return_within_the_delay_costs_no_copies() -> None:
    nodes = three_zones(6)
    shards = [ShardSpec(f"s/{i}", 3) for i in range(24)]
    specs = settle(shards, plan(shards, nodes))
    nodes["n4"] = replace(nodes["n4"], state="down")
    specs = settle(specs, plan(specs, nodes))
    nodes["n4"] = replace(nodes["n4"], state="active")
    p = plan(specs, nodes)
    assert p.copies == 0
    assert p.handoffs > 0  # primaries come back to it, as role changes only
    assert all(not m.copy for m in p.moves)


def test_unknown_holders_count_as_gone() -> None:
    p = plan([ShardSpec("s/0", 2, ("ghost", "a"), "ghost")], {"a": NodeSpec(), "b": NodeSpec()})
    assert set(p.targets["s/0"].nodes) == {"a", "b"}
    assert [(m.from_node, m.to_node, m.copy) for m in p.moves if m.copy] == [("ghost", "b", True)]


def test_avoided_pair_gets_another_node() -> None:
    nodes = {"a": NodeSpec(), "b": NodeSpec(), "c": NodeSpec()}
    first = plan([ShardSpec("s/0", 1)], nodes)
    chosen = first.targets["s/0"].nodes[0]
    p = plan([ShardSpec("s/0", 1)], nodes, avoid=[("s/0", chosen)])
    assert p.targets["s/0"].nodes[0] != chosen


def test_moving_the_primary_is_a_handoff_move() -> None:
    nodes = {"a": NodeSpec(), "b": NodeSpec(state="draining")}
    p = plan([ShardSpec("s/0", 1, ("b",), "b")], nodes)
    assert p.moves[0].from_node == "b" and p.moves[0].to_node == "a"
    assert p.moves[0].handoff and p.moves[0].copy
    assert p.targets["s/0"].primary == "a"


def test_plan_scales_to_a_thousand_nodes_and_4096_shards() -> None:
    # The real timing is in bench/rebalance.py; this only guards against a quadratic blow-up.
    nodes = {f"n{i:04d}": NodeSpec(zone=f"z{i % 3}") for i in range(1000)}
    shards = [ShardSpec(f"s/{i}", 3) for i in range(4096)]
    p = plan(shards, nodes)
    counts = Counter(n for t in p.targets.values() for n in t.nodes)
    assert min(counts.values()) >= 12 and max(counts.values()) <= 13


@pytest.mark.parametrize(
    ("shards", "nodes"),
    [
        ([ShardSpec("s", 0)], {"a": NodeSpec()}),
        ([ShardSpec("s", 1), ShardSpec("s", 1)], {"a": NodeSpec()}),
        ([ShardSpec("s", 1)], {"a": NodeSpec(weight=-1.0)}),
        ([ShardSpec("s", 1)], {"a": NodeSpec(weight=math.nan)}),
        ([ShardSpec("s", 1)], {"a": NodeSpec(state="sleepy")}),  # type: ignore[arg-type]
    ],
)
def test_malformed_input_is_a_bad_request(shards: list[ShardSpec], nodes: dict[str, NodeSpec]) -> None:
    with pytest.raises(BadRequest):
        plan(shards, nodes)
