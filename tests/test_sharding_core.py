"""The sharding core: operations, errors, events, splits and merges, load splits, restore."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phantom_bus.errors import BadRequest, Conflict, NoSuchKeyspace, NotFound, Refused
from phantom_bus.shardmap import ShardMap, key_bytes, key_hash
from services.sharding.config import ShardingConfig
from services.sharding.core import CHANGED, ShardingCore
from services.sharding.simulate import Simulation


def cluster(nodes: int = 3, **cfg: Any) -> Simulation:
    sim = Simulation(ShardingCore(ShardingConfig(**cfg)))
    for i in range(nodes):
        sim.call("add_node", sim.core.add_node, f"n{i}", "abc"[i % 3], 1.0, now=sim.now)
    sim.settle()
    return sim


def current(core: ShardingCore) -> ShardMap:
    m = core.map().value
    assert m is not None
    return m


def owner(m: ShardMap, keyspace: str, key: str | bytes) -> str:
    """Brute force: the one shard whose bounds contain the key."""
    ks = m.keyspace(keyspace)
    kb = key_bytes(key)
    if ks.kind == "hash":
        slot = key_hash(key) % ks.slots
        found = [sh.id for sh in ks.shards if any(a <= slot < b for a, b in sh.slots)]
    else:
        found = [sh.id for sh in ks.shards if sh.start <= kb and (sh.end is None or kb < sh.end)]
    assert len(found) == 1, f"{key!r} is owned by {found}"
    return found[0]


# -- key spaces and lookups ----------------------------------------------------------


def test_fresh_core_has_the_default_hash_keyspace() -> None:
    core = ShardingCore()
    ks = current(core).keyspace("default")
    assert (ks.kind, ks.rf, ks.slots, len(ks.shards)) == ("hash", 3, 4096, 64)
    assert all(sh.slot_count() == 64 for sh in ks.shards)
    assert core.epoch == 1


@given(st.lists(st.one_of(st.text(max_size=12), st.binary(max_size=12)), min_size=1, max_size=50))
@settings(max_examples=50, deadline=None)
def test_hash_and_range_lookups_agree_with_brute_force(keys: list[str | bytes]) -> None:
    core = ShardingCore(ShardingConfig(default_shards=7))
    core.create_keyspace("r", "range", split_points=["g", b"m\x00", "t"], now=0.0)
    m = current(core)
    for key in keys:
        for name in ("default", "r"):
            route = core.lookup(name, key).value
            assert route.shard == owner(m, name, key)
            assert route.epoch == m.epoch


def test_lookup_errors() -> None:
    core = ShardingCore()
    with pytest.raises(NoSuchKeyspace):
        core.lookup("nope", "k")
    with pytest.raises(BadRequest):
        core.lookup("default", 42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("default", "hash"), Conflict),
        (("bad name!", "hash"), BadRequest),
        (("x", "tree"), BadRequest),
        (("x", "hash", 0), BadRequest),
        (("x", "hash", 5000), BadRequest),
        (("x", "hash", 4, ["a"]), BadRequest),
        (("x", "hash", 8, None, 0), BadRequest),
        (("x", "hash", 8, None, 3, 4), BadRequest),
        (("x", "range", None, ["b", "a"]), BadRequest),
        (("x", "range", None, ["a", "a"]), BadRequest),
        (("x", "range", None, [""]), BadRequest),
        (("x", "range", None, [3]), BadRequest),
        (("x", "range", 5, ["a"]), BadRequest),
        (("x", "range", None, None, 3, 16), BadRequest),
    ],
)
def test_create_keyspace_refuses_bad_arguments(args: tuple, error: type[Exception]) -> None:
    core = ShardingCore()
    before = core.epoch
    with pytest.raises(error):
        core.create_keyspace(*args, now=0.0)
    assert core.epoch == before and "x" not in current(core)


def test_range_keyspace_without_split_points_cuts_the_first_two_bytes_evenly() -> None:
    core = ShardingCore()
    ks = core.create_keyspace("r", "range", shards=4, now=0.0).value
    assert [sh.start for sh in ks.shards] == [b"", b"\x40\x00", b"\x80\x00", b"\xc0\x00"]


def test_map_since_epoch_returns_nothing_unless_newer() -> None:
    core = ShardingCore()
    e = core.epoch
    assert core.map(e).value is None
    assert core.map(e - 1).value is not None
    with pytest.raises(BadRequest):
        core.map(-1)
    with pytest.raises(BadRequest):
        core.map("3")  # type: ignore[arg-type]


# -- events ------------------------------------------------------------------------


def test_every_map_change_bumps_the_epoch_once_and_says_so() -> None:
    core = ShardingCore(ShardingConfig(default_shards=4))
    e0 = core.epoch
    r = core.add_node("n0", "a", 1.0, now=1.0)
    assert [(ev.kind, ev.data["epoch"]) for ev in r.events] == [(CHANGED, e0 + 1)]
    assert core.epoch == e0 + 1
    r = core.add_node("n0", "a", 1.0, now=2.0)  # nothing changes
    assert r.events == () and core.epoch == e0 + 1
    assert core.tick(3.0).events == ()


# -- nodes ---------------------------------------------------------------------------


def test_node_operation_errors() -> None:
    core = ShardingCore()
    for fn in (core.drain_node, core.remove_node):
        with pytest.raises(NotFound):
            fn("ghost", now=0.0)
    with pytest.raises(NotFound):
        core.node_dead("ghost", 1.0)
    with pytest.raises(NotFound):
        core.confirm("default/0", "ghost", 1.0)
    with pytest.raises(NotFound):
        core.confirm("default/999", "ghost", 1.0)
    for bad in [("", "a", 1.0), ("a b", "a", 1.0), ("n", "a", -1.0), ("n", "a", float("nan")), ("n", 3, 1.0)]:
        with pytest.raises(BadRequest):
            core.add_node(*bad, now=0.0)  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        core.tick(float("inf"))


def test_removing_a_node_with_the_only_live_copy_is_refused() -> None:
    sim = cluster(1)
    core = sim.core
    assert len(core.sole_replicas("n0")) == 64
    with pytest.raises(Refused) as err:
        core.remove_node("n0", now=sim.now)
    assert err.value.details["shards"][:1] == ["default/0"]
    sim.call("add_node", core.add_node, "n1", "b", 1.0, now=sim.now)
    sim.settle()
    assert core.sole_replicas("n0") == []
    sim.call("remove_node", core.remove_node, "n0", now=sim.now)
    assert "n0" not in {n["node"] for n in core.nodes()}
    assert not any("n0" in sh.nodes for _, sh in current(core).shards())


def test_counts_and_health_of_a_settled_cluster() -> None:
    core = cluster(3).core
    counts = core.node_counts()
    assert {c["replicas"] for c in counts.values()} == {64}
    assert sorted(c["primaries"] for c in counts.values()) == [21, 21, 22]
    assert core.health() == {"total": 64, "under_replicated": 0, "unavailable": 0, "moving": 0, "degraded": 0}


def test_losing_every_holder_makes_shards_unavailable_not_silently_recreated() -> None:
    sim = cluster(3, dead_delay=5.0)
    core = sim.core
    for n in ("n0", "n1", "n2"):
        sim.call("node_dead", core.node_dead, n, sim.now)
    sim.call("add_node", core.add_node, "n3", "a", 1.0, now=sim.now)
    sim.run(30.0)
    assert core.health()["unavailable"] == 64
    assert not any(r.role == "joining" for _, sh in current(core).shards() for r in sh.replicas)
    sim.call("node_alive", core.node_alive, "n1", sim.now)
    sim.settle()
    assert core.health()["unavailable"] == 0


def test_drain_moves_everything_off_when_there_is_room() -> None:
    sim = cluster(4)
    core = sim.core
    sim.call("drain_node", core.drain_node, "n3", now=sim.now)
    sim.settle()
    assert core.node_counts()["n3"]["replicas"] == 0
    assert core.health()["under_replicated"] == 0


def test_weight_change_rebalances_toward_the_heavier_node() -> None:
    sim = cluster(4)
    core = sim.core
    sim.call("add_node", core.add_node, "n3", "a", 3.0, now=sim.now)
    sim.settle()
    counts = core.node_counts()
    # zone a (n0, n3) keeps one replica per shard: 64 split 1:3
    assert counts["n3"]["replicas"] == 48 and counts["n0"]["replicas"] == 16


# -- splits and merges -------------------------------------------------------------------


def test_split_requires_a_point_or_enough_sampled_keys() -> None:
    core = ShardingCore()
    core.create_keyspace("r", "range", now=0.0)
    with pytest.raises(Refused):
        core.split("r", "r/0", now=0.0)
    core.report_keys("r", [f"user:{i:04d}" for i in range(100)])
    left, right = core.split("r", "r/0", now=0.0).value
    assert left.id == "r/0" and right.start == b"user:0050", "the median of the sampled keys"
    assert left.end == right.start and right.end is None
    with pytest.raises(BadRequest):
        core.split("r", "r/0", at=b"", now=0.0)  # not inside
    with pytest.raises(BadRequest):
        core.split("r", "r/0", at=7, now=0.0)
    with pytest.raises(NotFound):
        core.split("r", "default/0", now=0.0)
    with pytest.raises(NoSuchKeyspace):
        core.split("zz", "r/0", now=0.0)


def test_split_of_a_moving_shard_is_refused() -> None:
    sim = cluster(3)
    core = sim.core
    sim.call("add_node", core.add_node, "n3", "a", 1.0, now=sim.now)
    busy = next(sh.id for _, sh in current(core).shards() if sh.state == "moving")
    with pytest.raises(Refused):
        core.split("default", busy, now=sim.now)


def test_merge_rules() -> None:
    core = ShardingCore(ShardingConfig(default_shards=4))
    with pytest.raises(BadRequest):
        core.merge("default", "default/0", "default/2", now=0.0)
    with pytest.raises(BadRequest):
        core.merge("default", "default/0", "default/0", now=0.0)
    res = core.merge("default", "default/1", "default/0", now=0.0).value
    assert (res.shard, res.absorbed, res.done) == ("default/0", "default/1", True)
    assert current(core).shard("default/0").slots == ((0, 2048),)


split_op = st.one_of(
    st.tuples(st.just("split"), st.integers(0, 100), st.one_of(st.none(), st.text("abcxyz", min_size=1, max_size=3))),
    st.tuples(st.just("merge"), st.integers(0, 100)),
    st.tuples(st.just("run"), st.just(0)),
)


@given(st.lists(split_op, min_size=1, max_size=12), st.lists(st.text("abcdxyz", max_size=4), min_size=5, max_size=30))
@settings(max_examples=30, deadline=None)
def test_splits_and_merges_keep_every_key_routable(ops: list[tuple], keys: list[str]) -> None:
    sim = cluster(4, default_shards=4)
    core = sim.core
    core.create_keyspace("r", "range", split_points=["m"], now=sim.now)
    sim.settle()
    core.report_keys("r", keys)
    for op in ops:
        for name in ("default", "r"):
            order = [sh.id for sh in current(core).keyspace(name).shards]
            idx = op[1] % len(order)
            try:
                if op[0] == "split":
                    at = op[2] if name == "r" else None
                    sim.call("split", core.split, name, order[idx], at, now=sim.now)
                elif op[0] == "merge" and len(order) > 1:
                    a, b = order[idx - 1], order[idx] if idx else order[1]
                    sim.call("merge", core.merge, name, a, b, now=sim.now)
                else:
                    sim.run(3.0)
            except (Refused, BadRequest, Conflict):
                pass
        m = current(core)
        for key in [*keys, "", "zzzz", "\U0001f642"]:
            for name in ("default", "r"):
                assert core.lookup(name, key).value.shard == owner(m, name, key)
        for _, sh in m.shards():
            assert sh.replicas, f"{sh.id} lost its replicas"
    sim.settle()
    assert core.health()["under_replicated"] == 0


def test_merge_of_shards_on_different_nodes_colocates_first() -> None:
    sim = cluster(6, default_shards=6)
    core = sim.core
    shards = current(core).keyspace("default").shards
    i = next(i for i in range(5) if set(shards[i].nodes) != set(shards[i + 1].nodes))
    low, high = shards[i], shards[i + 1]
    res = sim.call("merge", core.merge, "default", low.id, high.id, now=sim.now)
    assert not res.done
    assert current(core).shard(high.id).state == "moving"
    sim.settle()
    m = current(core)
    assert high.id not in m._by_shard
    assert m.shard(low.id).slots == ((low.slots[0][0], high.slots[0][1]),)
    assert core.health() == {"total": 5, "under_replicated": 0, "unavailable": 0, "moving": 0, "degraded": 0}


# -- load-based splits --------------------------------------------------------------------


def test_hot_range_shard_splits_after_the_window_and_only_then() -> None:
    sim = cluster(3, split_rate=100.0, split_window=10.0)
    core = sim.core
    core.create_keyspace("r", "range", now=sim.now)
    sim.settle()
    core.report_keys("r", [f"k{i:03d}" for i in range(64)])
    t = sim.now
    first = core.report_load({"r/0": 150.0, "default/0": 1e6, "gone/1": 5.0}, t).value
    assert first == {"split": [], "ignored": ["gone/1"]}
    core.report_load({"r/0": 50.0}, t + 5)  # cools down: the window restarts
    core.report_load({"r/0": 150.0}, t + 6)
    assert core.report_load({"r/0": 150.0}, t + 15).value["split"] == []
    r = core.report_load({"r/0": 150.0}, t + 16.5)
    assert r.value["split"] == ["r/1"] and r.events
    assert len(current(core).keyspace("r").shards) == 2
    assert len(current(core).keyspace("default").shards) == 64, "hash shards do not split on load"
    with pytest.raises(BadRequest):
        core.report_load({"r/0": -1.0}, t + 20)


# -- persistence and threads ---------------------------------------------------------------


def test_snapshot_and_restore_resume_moves_in_flight_on_a_new_clock() -> None:
    sim = cluster(3, default_shards=8)
    core = sim.core
    sim.call("add_node", core.add_node, "n3", "a", 1.0, now=sim.now)
    sim.run(1.0)
    shard_map, state = core.snapshot(sim.now)
    assert any(r.role == "joining" for _, sh in shard_map.shards() for r in sh.replicas)
    back = ShardMap.unpack(shard_map.pack())
    restored = ShardingCore.restore(back, state, now=9000.0, config=core.config)
    assert restored.map().value == shard_map
    assert restored.nodes() == core.nodes()
    sim2 = Simulation(restored, now=9000.0)
    sim2.settle()
    assert restored.health()["moving"] == 0
    assert restored.node_counts()["n3"]["replicas"] == 4


def test_restore_refuses_state_that_does_not_match_the_map() -> None:
    core = ShardingCore()
    shard_map, state = core.snapshot(0.0)
    with pytest.raises(BadRequest):
        ShardingCore.restore(shard_map, {**state, "epoch": 99}, 0.0)
    with pytest.raises(BadRequest):
        ShardingCore.restore(shard_map, {**state, "nodes": [{"id": 3}]}, 0.0)
    with pytest.raises(BadRequest):
        ShardingCore.restore(shard_map, {"v": 2}, 0.0)


def test_concurrent_lookups_and_operations_from_threads() -> None:
    sim = cluster(3, default_shards=16)
    core = sim.core
    core.create_keyspace("r", "range", now=sim.now)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for i in range(2000):
                core.lookup("r" if i % 2 else "default", f"key{i}")
        except BaseException as exc:  # the test reports whatever went wrong
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(3, 6):
        core.add_node(f"n{i}", "abc"[i % 3], 1.0, now=sim.now)
    for t in threads:
        t.join()
    assert not errors
    sim.settle()
    assert core.health()["moving"] == 0


def test_confirm_of_a_cancelled_assignment_does_not_promote_the_next_one() -> None:
    """A copy confirmed for an assignment that was cancelled (the node died meanwhile)
    and then made again must not promote the new joining replica (phantom_sim seed 286)."""
    core = ShardingCore(ShardingConfig(default_shards=2, default_rf=3, dead_delay=60.0))
    for i, zone in enumerate("abc"):
        core.add_node(f"n{i}", zone, 1.0, now=0.0)
    core.add_node("n3", "a", 1.0, now=0.0)  # a fourth node: moves copy replicas to it
    joining = [(sh.id, r.node) for _, sh in current(core).shards() for r in sh.replicas if r.role == "joining"]
    assert joining, "the new node should be given a copy"
    shard, node = joining[0]
    first = core.epoch
    core.node_dead(node, 1.0)  # cancels the copy
    core.node_alive(node, 2.0)  # assigned again, from a later epoch
    assert current(core).shard(shard).role_of(node) == "joining"
    with pytest.raises(Conflict, match="copy again"):
        core.confirm(shard, node, 3.0, first)
    assert current(core).shard(shard).role_of(node) == "joining"
    # Restored from a snapshot, the assignment keeps its epoch.
    m, state = core.snapshot(3.0)
    again = ShardingCore.restore(m, state, 3.0, core.config)
    with pytest.raises(Conflict):
        again.confirm(shard, node, 3.0, first)
    again.confirm(shard, node, 3.0, core.epoch)
    assert current(again).shard(shard).role_of(node) in ("replica", "primary")
