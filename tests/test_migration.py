"""The migration engine: the move protocol, caps, timeouts, dead nodes, and safety across epochs."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from phantom_bus.errors import Conflict, NotFound, Refused
from phantom_bus.shardmap import Replica, ShardMap
from services.sharding.config import ShardingConfig
from services.sharding.core import ShardingCore
from services.sharding.migration import Change, Migrations
from services.sharding.simulate import Simulation, live_counts

CFG = ShardingConfig(leave_grace=5.0, move_timeout=30.0, retry_backoff=10.0, move_retries=2)


def engine(cfg: ShardingConfig = CFG) -> Migrations:
    m = Migrations(cfg)
    m.add_shard("s", 3, {"a": "primary", "b": "replica", "c": "replica"})
    return m


def live(m: Migrations, sid: str = "s") -> int:
    return m.live(sid)


# -- the move protocol ----------------------------------------------------------


def test_move_adds_joining_then_replica_then_old_leaves_after_grace() -> None:
    m = engine()
    m.set_target("s", ["a", "b", "d"], "a")
    m.step(0.0)
    assert m.roles("s") == {"a": "primary", "b": "replica", "c": "replica", "d": "joining"}
    m.step(1.0)
    assert "c" in m.roles("s") and m.roles("s")["c"] == "replica", "nothing leaves before the copy is confirmed"
    m.confirm("s", "d", 2.0)
    assert live(m) == 4
    m.step(2.0)
    assert m.roles("s")["c"] == "leaving" and live(m) == 3
    m.step(6.0)
    assert m.roles("s")["c"] == "leaving", "dropped only after leave_grace"
    m.step(7.0)
    assert m.roles("s") == {"a": "primary", "b": "replica", "d": "replica"}
    assert not m.busy("s")


def test_primary_handoff_steps_down_in_one_step_and_promotes_in_the_next() -> None:
    m = engine()
    m.set_target("s", ["b", "c", "d"], "d")
    m.step(0.0)
    m.confirm("s", "d", 1.0)
    first = m.step(1.0)
    roles = m.roles("s")
    assert "primary" not in roles.values(), "the old primary steps down before anyone is promoted"
    assert roles["a"] == "replica"
    assert Change("s", "a", "primary", "replica") in first.changes
    m.step(1.5)
    roles = m.roles("s")
    assert roles["d"] == "primary"
    assert list(roles.values()).count("primary") == 1
    m.step(2.0)
    assert m.roles("s")["a"] == "leaving"


def test_no_handoff_until_the_new_primary_is_a_confirmed_replica() -> None:
    m = engine()
    m.set_target("s", ["b", "c", "d"], "d")
    for t in range(5):
        m.step(float(t))
        assert m.roles("s")["a"] == "primary"


def test_drain_with_nowhere_to_go_never_drops_a_live_replica() -> None:
    m = engine()
    m.set_evacuating(["c"])
    m.set_target("s", ["a", "b"], "a")  # the planner's shortfall: no third node
    for t in range(20):
        m.step(float(t))
    assert m.roles("s")["c"] == "replica" and live(m) == 3


def test_copy_waits_for_a_slot_when_a_node_is_at_its_cap() -> None:
    cfg = ShardingConfig(max_moves_per_node=2, max_moves_in_flight=100)
    m = Migrations(cfg)
    for i in range(5):
        m.add_shard(f"s{i}", 1, {"a": "primary"})
        m.set_target(f"s{i}", ["d"], "d")
    m.step(0.0)
    joining = [sid for sid in m.shard_ids() if m.roles(sid).get("d") == "joining"]
    assert len(joining) == 2
    for sid in joining:
        m.confirm(sid, "d", 1.0)
    m.step(1.0)
    assert sum(1 for sid in m.shard_ids() if m.roles(sid).get("d") == "joining") == 2
    assert {p["state"] for p in m.pending(1.0)} == {"copying", "queued"}


def test_cluster_wide_cap_bounds_copies_in_flight() -> None:
    m = Migrations(ShardingConfig(max_moves_per_node=10, max_moves_in_flight=3))
    for i in range(8):
        m.add_shard(f"s{i}", 1, {f"src{i}": "primary"})
        m.set_target(f"s{i}", [f"dst{i}"], f"dst{i}")
    m.step(0.0)
    assert m.in_flight() == 3


def test_unconfirmed_copy_is_cancelled_retried_after_backoff_then_reported_stuck() -> None:
    m = engine()
    m.set_target("s", ["a", "b", "d"], "a")
    m.step(0.0)
    assert m.roles("s")["d"] == "joining"
    first = m.step(30.0)
    assert "d" not in m.roles("s") and first.stuck == ()
    m.step(35.0)
    assert "d" not in m.roles("s"), "backoff: no retry before 10 s"
    m.step(40.0)
    assert m.roles("s")["d"] == "joining"
    second = m.step(70.0)
    assert second.stuck == (("s", "d"),)
    assert m.roles("s")["c"] == "replica" and live(m) == 3


# -- dead nodes -----------------------------------------------------------------


def test_dead_primary_is_replaced_at_once_by_the_planned_primary_if_it_is_a_replica() -> None:
    m = engine()
    m.set_target("s", ["a", "b", "c"], "c")
    m.node_down("a")
    m.step(0.0)
    assert m.primary("s") == "c"


def test_dead_primary_replaced_by_lowest_id_replica_and_never_by_a_joining_one() -> None:
    m = Migrations(CFG)
    m.add_shard("s", 3, {"z": "primary", "y": "joining", "c": "replica", "b": "replica"})
    m.node_down("z")
    m.step(0.0)
    assert m.primary("s") == "b"


def test_dead_nodes_primaries_are_spread_over_the_survivors() -> None:
    m = Migrations(CFG)
    for i in range(12):
        m.add_shard(f"s{i}", 3, {"a": "primary", "b": "replica", "c": "replica"})
    m.add_shard("t", 3, {"b": "primary", "a": "replica", "c": "replica"})
    m.node_down("a")
    m.step(0.0)
    owners = [m.primary(f"s{i}") for i in range(12)]
    # b already had one primary: the twelve orphans go 5/7 or 6/6, never 12/0.
    assert abs(owners.count("b") + 1 - owners.count("c")) <= 1
    assert owners.count("b") + owners.count("c") == 12


def test_leaving_replica_is_promoted_only_when_no_full_replica_is_left() -> None:
    m = Migrations(CFG)
    m.add_shard("s", 2, {"a": "primary", "b": "leaving", "c": "joining"})
    m.set_target("s", ["a", "c"], "a")
    m.node_down("a")
    m.step(0.0)
    assert m.primary("s") == "b"


def test_dead_replica_leaves_the_map_only_once_its_replacement_is_live() -> None:
    m = engine()
    m.node_down("c")
    m.set_target("s", ["a", "b", "d"], "a")
    m.step(0.0)
    assert m.roles("s")["c"] == "replica"
    m.confirm("s", "d", 1.0)
    m.step(1.0)
    assert "c" not in m.roles("s")


def test_shard_with_data_but_no_live_replica_is_not_copied_from_nowhere() -> None:
    m = Migrations(CFG)
    m.add_shard("s", 1, {"a": "primary"})
    m.node_down("a")
    m.set_target("s", ["b"], "b")
    m.step(0.0)
    assert "b" not in m.roles("s")


def test_new_shard_without_data_is_placed_directly() -> None:
    m = Migrations(CFG)
    m.add_shard("s", 2)
    m.set_target("s", ["a", "b"], "b")
    m.step(0.0)
    assert m.roles("s") == {"a": "replica", "b": "primary"}


def test_confirm_rules() -> None:
    m = engine()
    with pytest.raises(NotFound):
        m.confirm("nope", "a", 0.0)
    with pytest.raises(Conflict):
        m.confirm("s", "zz", 0.0)
    assert m.confirm("s", "b", 0.0) == [], "a repeated confirmation changes nothing"


def test_state_round_trip_rebases_timers_on_the_new_clock() -> None:
    m = engine()
    m.set_target("s", ["a", "b", "d"], "a")
    m.step(100.0)  # d joins at t=100
    state = m.to_state(110.0)  # saved 10 s into the copy
    fresh = Migrations(CFG)
    fresh.load_state({"s": m.roles("s")}, state, 5000.0)  # a new process, another clock
    assert fresh.roles("s") == m.roles("s")
    fresh.step(5019.0)
    assert fresh.roles("s")["d"] == "joining", "30 s timeout, 29 s elapsed"
    fresh.step(5020.0)
    assert "d" not in fresh.roles("s")


# -- safety across epochs, driven through the core --------------------------------


def check_epochs(sim: Simulation) -> None:
    """Never two primaries; hand-offs pass through an epoch without one; live never drops."""
    floors: dict[str, int] = {}
    prev: ShardMap | None = None
    for ep in sim.epochs:
        m = ep.shard_map
        live = live_counts(m)
        for ks, sh in m.shards():
            assert [r.role for r in sh.replicas].count("primary") <= 1
            if prev is not None and sh.id in prev._by_shard:
                before = prev.shard(sh.id).primary
                after = sh.primary
                if before and after and before != after:
                    assert before in m.down or sh.role_of(before) is None, (
                        f"epoch {m.epoch}: {sh.id} primary {before} -> {after} without stepping down"
                    )
            rf = ks.rf
            floor = floors.get(sh.id, 0)
            if ep.op in ("node_dead", "remove_node"):
                floors[sh.id] = min(floor, live[sh.id])
            else:
                assert live[sh.id] >= floor, f"epoch {m.epoch} ({ep.op}): {sh.id} live {live[sh.id]} < {floor}"
                floors[sh.id] = max(floor, min(rf, live[sh.id]))
        prev = m


def small_core(**kw: float) -> ShardingCore:
    cfg = ShardingConfig(
        default_shards=12,
        dead_delay=20.0,
        leave_grace=2.0,
        move_timeout=15.0,
        retry_backoff=5.0,
        move_retries=2,
        avoid_ttl=60.0,
        **kw,  # type: ignore[arg-type]
    )
    return ShardingCore(cfg)


op_st = st.one_of(
    st.tuples(st.just("add"), st.sampled_from("abc")),
    st.tuples(st.sampled_from(["dead", "alive", "drain", "remove", "mute", "unmute"]), st.integers(0, 9)),
    st.tuples(st.just("run"), st.sampled_from([1.0, 3.0, 10.0, 30.0])),
)


@given(st.lists(op_st, min_size=1, max_size=20))
@example(  # one confirmation of a round ended another copy of that round (n6's)
    [("add", "b"), ("run", 1.0), ("add", "a"), ("dead", 4), ("add", "c"), ("run", 3.0), ("drain", 6),
     ("run", 10.0), ("add", "a"), ("add", "a"), ("mute", 6), ("add", "c"), ("add", "c"), ("add", "a"),
     ("unmute", 2), ("add", "c"), ("add", "b"), ("add", "c"), ("unmute", 6), ("run", 30.0)]
)
@settings(max_examples=30, deadline=None)
def test_random_histories_never_lose_live_replicas_nor_show_two_primaries(ops: list[tuple]) -> None:
    sim = Simulation(small_core(), copy_time=2.0)
    core = sim.core
    for i, z in enumerate("abc"):
        sim.call("add_node", core.add_node, f"n{i}", z, 1.0, now=sim.now)
    sim.settle()
    serial = 3
    for op in ops:
        names = sorted(n["node"] for n in core.nodes())
        kind = op[0]
        if kind == "add":
            sim.call("add_node", core.add_node, f"n{serial}", op[1], 1.0, now=sim.now)
            serial += 1
        elif kind == "run":
            sim.run(op[1])
        elif names:
            name = names[op[1] % len(names)]
            if kind == "dead":
                sim.call("node_dead", core.node_dead, name, sim.now)
            elif kind == "alive":
                sim.call("node_alive", core.node_alive, name, sim.now)
            elif kind == "drain":
                sim.call("drain_node", core.drain_node, name, now=sim.now)
            elif kind == "mute":
                sim.silent.add(name)
            elif kind == "unmute":
                sim.silent.discard(name)
            elif kind == "remove":
                try:
                    sim.call("remove_node", core.remove_node, name, now=sim.now)
                except Refused:
                    assert core.sole_replicas(name)
    check_epochs(sim)
    # Once every node is back and every agent answers, everything settles, as
    # far as the active nodes allow (a drain with nowhere to go stays pending).
    sim.silent.clear()
    for n in core.nodes():
        if not n["alive"]:
            sim.call("node_alive", core.node_alive, n["node"], sim.now)
    sim.run(120.0)  # past every timeout, backoff and avoid period of small_core
    sim.settle(limit=300.0)
    check_epochs(sim)
    health = core.health()
    if sum(1 for n in core.nodes() if n["alive"] and n["state"] == "active") >= 3:
        assert health["moving"] == 0 and health["unavailable"] == 0 and health["under_replicated"] == 0, health


def replicas_since(sim: Simulation, mark: int, role: str) -> list[Replica]:
    """Every replica in ``role`` in the maps published from epoch index ``mark`` on."""
    return [r for ep in sim.epochs[mark:] for _, sh in ep.shard_map.shards() for r in sh.replicas if r.role == role]


def test_join_moves_half_of_its_zone_and_nothing_else() -> None:
    sim = Simulation(small_core(max_moves_per_node=2))
    core = sim.core
    for i, z in enumerate("abc"):
        sim.call("add_node", core.add_node, f"n{i}", z, 1.0, now=sim.now)
    sim.settle()
    assert {n: c["replicas"] for n, c in core.node_counts().items()} == {"n0": 12, "n1": 12, "n2": 12}
    mark = len(sim.epochs)
    sim.call("add_node", core.add_node, "n3", "a", 1.0, now=sim.now)
    copying = [p for p in core.pending_moves(sim.now) if p["state"] == "copying"]
    assert len(copying) == 2, "two copies at a time into the new node"
    sim.settle()
    # Three zones and RF 3: zone a keeps one replica of each shard, now split over two nodes.
    assert {n: c["replicas"] for n, c in core.node_counts().items()} == {"n0": 6, "n1": 12, "n2": 12, "n3": 6}
    joined = {r.node for r in replicas_since(sim, mark, "joining")}
    left = {r.node for r in replicas_since(sim, mark, "leaving")}
    assert joined == {"n3"} and left == {"n0"}
    check_epochs(sim)


def roles_of(core: ShardingCore, node: str) -> set[str]:
    m = core.map().value
    assert m is not None
    return {sh.id for _, sh in m.shards() if node in sh.nodes}


def test_dead_node_replicas_move_only_after_the_delay_and_a_quick_return_costs_nothing() -> None:
    sim = Simulation(small_core())
    core = sim.core
    for i, z in enumerate("abcd"):
        sim.call("add_node", core.add_node, f"n{i}", z, 1.0, now=sim.now)
    sim.settle()
    held = roles_of(core, "n1")
    mark = len(sim.epochs)
    sim.call("node_dead", core.node_dead, "n1", sim.now)
    m = core.map().value
    assert m is not None and "n1" in m.down
    assert all(sh.primary != "n1" for _, sh in m.shards()), "primaries move at once"
    assert core.health()["unavailable"] == 0
    sim.run(15.0)  # inside the 20 s delay
    assert roles_of(core, "n1") == held
    sim.call("node_alive", core.node_alive, "n1", sim.now)
    sim.settle()
    assert roles_of(core, "n1") == held
    joining = replicas_since(sim, mark, "joining")
    assert joining == [], "a return within the delay copies nothing"
    assert core.node_counts()["n1"]["primaries"] > 0, "primaries are handed back"
    # Dead past the delay: its replicas are re-created on the others.
    sim.call("node_dead", core.node_dead, "n1", sim.now)
    sim.run(25.0)
    sim.settle()
    assert roles_of(core, "n1") == set()
    assert core.health() == {"total": 12, "under_replicated": 0, "unavailable": 0, "moving": 0, "degraded": 0}
    check_epochs(sim)
