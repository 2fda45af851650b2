"""Cluster health, the health tracker and the status document (pure functions)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from phantom_bus.shardmap import Keyspace, Replica, Shard, ShardMap
from services.manager.health import (
    EVENT_HEALTH,
    GREEN,
    RED,
    SERVICES,
    YELLOW,
    HealthTracker,
    ShardInfo,
    assess,
    shards_from_map,
    sole_replicas,
    status_document,
)
from services.manager.registry import Registry

ALIVE3 = {"a": "alive", "b": "alive", "c": "alive"}


def shard(sid: str, *replicas: tuple[str, str], rf: int = 3, moving: bool = False) -> ShardInfo:
    return ShardInfo(sid, rf, tuple(replicas), moving)


def settled(sid: str = "s0") -> ShardInfo:
    return shard(sid, ("a", "primary"), ("b", "replica"), ("c", "replica"))


def test_green_when_every_shard_has_its_primary_and_all_replicas_live() -> None:
    h = assess([settled("s0"), settled("s1")], ALIVE3)
    assert h.status == GREEN
    assert h.counts()["total"] == 2 and h.under_replicated == 0 and h.unavailable == 0
    assert h.per_node["a"] == {"replicas": 2, "primaries": 2, "joining": 0, "leaving": 0}
    assert h.per_node["b"]["replicas"] == 2 and h.per_node["b"]["primaries"] == 0


def test_no_shards_is_green_and_no_map_is_red() -> None:
    assert assess([], {}).status == GREEN
    none = assess(None, ALIVE3)
    assert none.status == RED and not none.known and "sharding" in none.reason


def test_replica_on_dead_node_makes_under_replicated_yellow() -> None:
    h = assess([settled()], {**ALIVE3, "c": "dead"})
    assert h.status == YELLOW and h.under_replicated == 1 and h.under_replicated_shards == ("s0",)
    assert "under-replicated" in h.reason and "s0" in h.reason


def test_replica_on_suspect_node_is_yellow() -> None:
    assert assess([settled()], {**ALIVE3, "b": "suspect"}).status == YELLOW


def test_replica_in_the_maps_down_set_is_not_live() -> None:
    assert assess([settled()], ALIVE3, down={"b"}).status == YELLOW


def test_extra_copy_on_a_dead_node_is_degraded_not_under_replicated() -> None:
    s = shard("s0", ("a", "primary"), ("b", "replica"), ("c", "replica"), ("d", "replica"))
    h = assess([s], {**ALIVE3, "d": "dead"})
    assert h.status == YELLOW and h.under_replicated == 0 and h.degraded == 1


def test_planned_moves_keep_the_shard_green_and_are_counted_beside_the_colour() -> None:
    states = {**ALIVE3, "d": "alive"}
    joining = shard("s0", ("a", "primary"), ("b", "replica"), ("c", "replica"), ("d", "joining"))
    leaving = shard("s1", ("a", "primary"), ("b", "replica"), ("c", "replica"), ("d", "leaving"))
    flagged = shard("s2", ("a", "primary"), ("b", "replica"), ("c", "replica"), moving=True)
    h = assess([joining, leaving, flagged], states)
    assert h.status == GREEN and h.moving == 3 and h.under_replicated == 0
    assert "3 shard(s) moving" in h.reason and h.counts()["moving"] == 3
    assert h.per_node["d"] == {"replicas": 0, "primaries": 0, "joining": 1, "leaving": 1}
    assert h.holdings("d") == 2 and h.holdings("nobody") == 0


def test_no_primary_is_red() -> None:
    h = assess([shard("s0", ("a", "replica"), ("b", "replica"), ("c", "replica"))], ALIVE3)
    assert h.status == RED and h.unavailable_shards == ("s0",)


def test_primary_on_dead_or_down_node_is_red_but_on_suspect_node_yellow() -> None:
    assert assess([settled()], {**ALIVE3, "a": "dead"}).status == RED
    assert assess([settled()], ALIVE3, down={"a"}).status == RED
    assert assess([settled()], {"b": "alive", "c": "alive"}).status == RED  # never heard of
    assert assess([settled()], {**ALIVE3, "a": "suspect"}).status == YELLOW


def test_planned_hand_off_is_moving_not_red() -> None:
    s = shard("s0", ("a", "replica"), ("b", "replica"), ("c", "replica"), moving=True)
    h = assess([s], ALIVE3)
    assert h.status == GREEN and h.unavailable == 0 and h.moving == 1
    # ...but not when nobody could be promoted.
    assert assess([s], {"a": "dead", "b": "dead", "c": "left"}).status == RED


def test_red_wins_over_yellow() -> None:
    h = assess([settled("s0"), shard("s1", ("a", "replica"))], {**ALIVE3, "c": "dead"})
    assert h.status == RED and h.unavailable == 1 and h.under_replicated == 2


def test_sole_replicas_names_shards_without_another_live_copy() -> None:
    shards = [
        shard("s0", ("a", "primary"), ("b", "replica")),
        shard("s1", ("a", "primary"), ("b", "joining")),
        shard("s2", ("a", "replica"), ("b", "primary")),
        shard("s3", ("b", "primary"), ("c", "replica")),
    ]
    states = {"a": "alive", "b": "dead", "c": "alive"}
    assert sole_replicas(shards, "a", states) == ["s0", "s1", "s2"]
    assert sole_replicas(shards, "a", {"a": "alive", "b": "alive", "c": "alive"}) == ["s1"]
    assert sole_replicas(shards, "c", states) == ["s3"]  # its primary b is dead
    assert sole_replicas(shards, "c", {"a": "alive", "b": "alive", "c": "alive"}) == []
    # A dead node that holds the last copy is protected too.
    assert sole_replicas([shard("s0", ("a", "primary"), ("b", "replica"))], "a", {"a": "dead", "b": "dead"}) == [
        "s0"
    ]
    assert sole_replicas(shards, "a", {n: "alive" for n in "abc"}, down={"b"}) == ["s0", "s1", "s2"]


def test_tracker_emits_only_on_colour_change_with_the_shards_behind_it() -> None:
    tr = HealthTracker()
    first = tr.update(assess([settled()], ALIVE3))
    assert [e.kind for e in first] == [EVENT_HEALTH]
    assert first[0].data["health"] == GREEN and first[0].data["previous"] is None
    assert first[0].data["node"] is None and first[0].data["reason"]
    assert tr.update(assess([settled()], ALIVE3)) == []
    red = tr.update(assess([settled()], {**ALIVE3, "a": "dead"}))
    assert red[0].data["health"] == RED and red[0].data["previous"] == GREEN
    assert red[0].data["why"]["unavailable"] == ["s0"]
    assert red[0].data["shards"]["unavailable"] == 1
    assert tr.update(assess([settled()], {**ALIVE3, "a": "dead", "b": "dead"})) == []
    assert tr.current is not None and tr.current.status == RED


def test_shards_from_a_real_map() -> None:
    ks = Keyspace(
        "default",
        "hash",
        2,
        (
            Shard("default/0", (Replica("a", "primary"), Replica("b", "replica")), slots=((0, 8),)),
            Shard("default/1", (Replica("b", "primary"), Replica("a", "joining")), "moving", slots=((8, 16),)),
        ),
        16,
    )
    infos = shards_from_map(ShardMap(3, (ks,), frozenset({"c"})))
    assert infos[0] == ShardInfo("default/0", 2, (("a", "primary"), ("b", "replica")), False, "default")
    assert infos[1].moving and infos[1].primary == "b"
    # default/1 has one serving copy of two: under-replicated, not merely moving.
    assert assess(infos, {"a": "alive", "b": "alive"}).status == YELLOW


# -- status document ----------------------------------------------------------------


def registry_with(*nodes: tuple[str, str, str | None]) -> Registry:
    r = Registry()
    for node, lifecycle, member in nodes:
        r.register(node, f"127.0.0.1:{7000 + len(r)}", "z1", 1.0, 0.0, reason="t", member=member)
        if lifecycle != "joining":
            r.transition(node, "active", "t", 1.0)
        if lifecycle == "draining":
            r.transition(node, "draining", "t", 2.0)
    return r


def member(node: str, state: str, cpu: float = 10.0, stale: bool = False) -> dict[str, Any]:
    return {
        "id": node,
        "state": state,
        "incarnation": 2,
        "phi": 0.5,
        "last_heartbeat_age": 0.2,
        "load": {"cpu": cpu, "mem": 40.0, "load1_per_core": 0.3},
        "load_stale": stale,
    }


def test_status_document_has_the_contract_keys() -> None:
    r = registry_with(("a", "active", "alive"), ("b", "active", "alive"), ("c", "draining", "alive"))
    members = [member("a", "alive"), member("b", "alive"), member("c", "alive", stale=True)]
    doc = status_document(r.records(), members, [settled()], {n: True for n in SERVICES}, epoch=7)
    assert doc["health"] == GREEN and doc["epoch"] == 7
    assert {"health", "epoch", "nodes", "shards", "services"} <= set(doc)
    assert {k: doc["shards"][k] for k in ("total", "under_replicated", "unavailable")} == {
        "total": 1, "under_replicated": 0, "unavailable": 0}
    assert doc["services"] == {n: "up" for n in SERVICES}
    row = doc["nodes"][0]
    contract = {"id", "state", "lifecycle", "address", "zone", "cpu", "mem", "replicas", "primaries"}
    assert contract <= set(row)
    assert row == {**row, "id": "a", "state": "alive", "lifecycle": "active", "zone": "z1", "cpu": 10.0,
                   "mem": 40.0, "replicas": 1, "primaries": 1, "load": 0.3, "phi": 0.5}
    stale = doc["nodes"][2]
    assert stale["lifecycle"] == "draining" and stale["cpu"] is None and stale["mem"] is None


def test_status_document_nulls_what_a_down_service_would_have_said() -> None:
    r = registry_with(("a", "active", "alive"))
    doc = status_document(r.records(), None, None, {"sharding": False, "membership": "down", "discovery": True})
    row = doc["nodes"][0]
    assert row["state"] is None and row["cpu"] is None and row["phi"] is None
    assert row["replicas"] is None and row["primaries"] is None
    assert row["lifecycle"] == "active" and row["address"] == "127.0.0.1:7000"
    assert doc["shards"] == {"total": None, "under_replicated": None, "unavailable": None}
    assert doc["health"] == RED and doc["epoch"] is None
    assert doc["services"] == {"broker": "up", "discovery": "up", "membership": "down", "sharding": "down",
                               "balancer": "down", "manager": "up"}


def test_status_document_uses_last_heard_states_when_membership_is_down() -> None:
    r = registry_with(("a", "active", "alive"), ("b", "active", "alive"), ("c", "active", "dead"))
    doc = status_document(r.records(), None, [settled()], {})
    assert doc["health"] == YELLOW and doc["shards"]["under_replicated"] == 1


def test_status_document_lists_nodes_known_only_to_the_map_or_membership() -> None:
    doc = status_document([], [member("m", "alive")], [settled()], {})
    ids = [n["id"] for n in doc["nodes"]]
    assert ids == ["a", "b", "c", "m"]
    assert all(n["lifecycle"] is None and n["registered"] is False for n in doc["nodes"])
    assert doc["nodes"][3]["replicas"] == 0


# -- property: health against a brute-force oracle -------------------------------------

NODES = ["a", "b", "c", "d", "e"]


def oracle(shards: list[ShardInfo], states: dict[str, str | None], down: set[str]) -> dict[str, Any]:
    """Health by the letter of the rules, written independently of assess()."""
    red = yellow = False
    unavailable = under = 0
    for s in shards:
        roles = dict(s.replicas)
        primaries = [n for n, r in roles.items() if r == "primary"]
        holders = [n for n, r in roles.items() if r in ("primary", "replica")]
        good = [n for n in holders if states.get(n) == "alive" and n not in down]
        ok = [n for n in holders if states.get(n) in ("alive", "suspect") and n not in down]
        if primaries and primaries[0] in ok:
            pass
        elif not primaries and s.moving and ok:
            pass  # a planned hand-off: moving, which does not change the colour
        else:
            unavailable += 1
            red = True
        if len(good) < s.rf:
            under += 1
            yellow = True
        if len(good) < len(holders):
            yellow = True
    return {"status": RED if red else YELLOW if yellow else GREEN, "unavailable": unavailable,
            "under_replicated": under}


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[ShardInfo], dict[str, str | None], set[str]]:
    shards = []
    for i in range(draw(st.integers(0, 6))):
        nodes = draw(st.lists(st.sampled_from(NODES), unique=True, max_size=4))
        roles = [draw(st.sampled_from(["replica", "joining", "leaving", "replica"])) for _ in nodes]
        with_primary = draw(st.booleans())
        if nodes and with_primary:
            roles[0] = "primary"
        shards.append(ShardInfo(f"s{i}", draw(st.integers(1, 3)), tuple(zip(nodes, roles, strict=True)),
                                draw(st.booleans())))
    states = {n: draw(st.sampled_from([None, "alive", "alive", "suspect", "dead", "left"])) for n in NODES}
    down = set(draw(st.lists(st.sampled_from(NODES), max_size=2)))
    return shards, states, down


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_health_matches_a_brute_force_oracle(cluster: tuple[list[ShardInfo], dict[str, str | None], set[str]]) -> None:
    shards, states, down = cluster
    h = assess(shards, states, down)
    want = oracle(shards, states, down)
    assert (h.status, h.unavailable, h.under_replicated) == (want["status"], want["unavailable"],
                                                             want["under_replicated"])
    assert h.total == len(shards)
    for node in NODES:
        roles = [r for s in shards for n, r in s.replicas if n == node]
        if roles:
            assert h.per_node[node]["replicas"] == sum(r in ("primary", "replica") for r in roles)
            assert h.per_node[node]["primaries"] == roles.count("primary")


def test_balancer_statistics_join_the_status_document() -> None:
    from services.manager.service import merge_balancer_stats

    doc = {"nodes": [{"id": "a"}, {"id": "b"}, {"id": "gone"}]}
    stats = {
        "nodes": {
            "a": {"in_flight": 3, "picks": 10, "latency_ms": {"p99": 4.5}},
            "b": {"in_flight": 0, "picks": 0, "latency_ms": {"p99": None}},
        },
        "shards": {"s1": {"rate": 1.5}, "s2": {"rate": 2.0}, "s3": {"rate": None}},
    }
    merge_balancer_stats(doc, stats)
    assert doc["nodes"][0] == {"id": "a", "inflight": 3, "picks": 10, "p99_ms": 4.5}
    assert doc["nodes"][1]["p99_ms"] is None
    assert doc["nodes"][2] == {"id": "gone"}
    assert doc["selects_per_s"] == 3.5
    merge_balancer_stats(doc, {"nodes": "garbage", "shards": None})  # never crashes on odd input
