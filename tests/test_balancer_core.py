"""The balancer core: selection rules, leases, statistics, bad input, invariants."""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from phantom_bus.errors import BadRequest, NoLiveReplica, NotFound
from phantom_bus.routing.config import describe
from services.balancer import STRATEGY_NAMES, Balancer, BalancerConfig, Candidate

T0 = 1000.0


def cluster(names: str = "abc", seed: int = 1, **config: Any) -> Balancer:
    bal = Balancer(BalancerConfig(**config), random.Random(seed))
    for n in names:
        bal.node_update(n, state="alive", lifecycle="active", address=f"10.0.0.{ord(n)}:7000", now=0.0)
    return bal


def shard(primary: str = "a", replicas: str = "bc", joining: str = "", leaving: str = "") -> list[Candidate]:
    out = [Candidate(primary, "primary")]
    out += [Candidate(n, "replica") for n in replicas]
    out += [Candidate(n, "joining") for n in joining]
    out += [Candidate(n, "leaving") for n in leaving]
    return out


# --- selection rules -------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_writes_always_go_to_the_primary(name: str) -> None:
    bal = cluster()
    got = {bal.select("s1", shard(), write=True, strategy=name, now=T0).node for _ in range(50)}
    assert got == {"a"}
    sel = bal.select("s1", shard(), write=True, now=T0)
    assert (sel.role, sel.strategy, sel.address) == ("primary", "primary", "10.0.0.97:7000")


def test_writes_go_to_a_suspect_or_draining_primary_but_not_a_dead_one() -> None:
    bal = cluster()
    bal.node_update("a", state="suspect", now=T0)
    assert bal.select("s1", shard(), write=True, now=T0).node == "a"
    bal.node_update("a", state="alive", lifecycle="draining", now=T0)
    assert bal.select("s1", shard(), write=True, now=T0).node == "a"
    bal.node_update("a", state="dead", now=T0)
    with pytest.raises(NoLiveReplica, match="primary a of shard s1 is dead"):
        bal.select("s1", shard(), write=True, now=T0)


def test_write_without_a_primary_is_no_live_replica() -> None:
    bal = cluster()
    with pytest.raises(NoLiveReplica, match="no primary"):
        bal.select("s1", [Candidate("b"), Candidate("c")], write=True, now=T0)


def test_two_primaries_are_a_bad_request() -> None:
    bal = cluster()
    with pytest.raises(BadRequest, match="2 primaries"):
        bal.select("s1", [Candidate("a", "primary"), Candidate("b", "primary")], write=True, now=T0)


def test_joining_replicas_are_never_read() -> None:
    bal = cluster("abcd")
    got = Counter(bal.select("s1", shard(joining="d"), now=T0 + i).node for i in range(300))
    assert "d" not in got
    assert set(got) == {"a", "b", "c"}


def test_joining_replica_is_not_read_even_in_panic() -> None:
    bal = cluster("abcd")
    for n in "abc":
        bal.node_update(n, state="dead", now=T0)
    with pytest.raises(NoLiveReplica, match="d joining replica"):
        bal.select("s1", shard(joining="d"), now=T0)


def test_node_in_joining_lifecycle_is_not_read() -> None:
    bal = cluster()
    bal.node_update("c", lifecycle="joining", now=T0)
    got = {bal.select("s1", shard(), now=T0 + i).node for i in range(200)}
    assert got == {"a", "b"}


@pytest.mark.parametrize(
    "change",
    [
        {"state": "suspect"},
        {"state": "dead"},
        {"state": "left"},
        {"lifecycle": "draining"},
        {"lifecycle": "decommissioned"},
    ],
)
def test_reads_skip_unhealthy_nodes(change: dict[str, Any]) -> None:
    bal = cluster("abcd")
    bal.node_update("b", now=T0, **change)
    got = {bal.select("s1", shard(replicas="bcd"), now=T0 + i).node for i in range(300)}
    assert got == {"a", "c", "d"}


def test_leaving_replica_is_used_only_in_panic() -> None:
    bal = cluster("abcd")
    got = {bal.select("s1", shard(leaving="d"), now=T0 + i).node for i in range(200)}
    assert got == {"a", "b", "c"}
    for n in "ab":
        bal.node_update(n, state="dead", now=T0)
    sels = [bal.select("s1", shard(leaving="d"), now=T0 + i) for i in range(200)]
    assert {s.node for s in sels} == {"c", "d"}
    assert all(s.role == "replica" and s.panic for s in sels)


def test_reads_from_primary_can_be_turned_off() -> None:
    bal = cluster(reads_from_primary=False)
    got = {bal.select("s1", shard(), now=T0 + i).node for i in range(200)}
    assert got == {"b", "c"}


def test_read_role_says_primary_or_replica() -> None:
    bal = cluster()
    roles = {
        (s.node, s.role)
        for s in (bal.select("s1", shard(), strategy="round_robin", now=T0) for _ in range(3))
    }
    assert roles == {("a", "primary"), ("b", "replica"), ("c", "replica")}


def test_panic_uses_all_reachable_candidates_below_the_threshold() -> None:
    bal = cluster("abcd")
    for n in "bc":
        bal.node_update(n, state="suspect", now=T0)
    # 2 of 4 healthy = 50%: not below the threshold, healthy only
    sels = [bal.select("s1", shard(replicas="bcd"), now=T0) for _ in range(200)]
    assert {s.node for s in sels} == {"a", "d"} and not any(s.panic for s in sels)
    bal.node_update("d", state="suspect", now=T0)
    # 1 of 4 healthy: panic, the suspects serve too
    sels = [bal.select("s1", shard(replicas="bcd"), now=T0) for _ in range(400)]
    assert {s.node for s in sels} == set("abcd")
    assert all(s.panic for s in sels)
    assert bal.stats(T0)["shards"]["s1"]["panics"] == 400


def test_panic_never_uses_dead_nodes() -> None:
    bal = cluster()
    bal.node_update("a", state="dead", now=T0)
    bal.node_update("b", state="suspect", now=T0)
    got = {bal.select("s1", shard(), now=T0 + i).node for i in range(200)}
    assert got == {"b", "c"}


def test_panic_threshold_zero_disables_panic() -> None:
    bal = cluster(panic_threshold=0.0)
    for n in "abc":
        bal.node_update(n, state="suspect", now=T0)
    with pytest.raises(NoLiveReplica, match="a suspect, b suspect, c suspect"):
        bal.select("s1", shard(), now=T0)


def test_no_live_replica_explains_every_candidate() -> None:
    bal = cluster()
    bal.node_update("a", state="dead", now=T0)
    bal.node_update("b", lifecycle="decommissioned", now=T0)
    with pytest.raises(NoLiveReplica) as info:
        bal.select("s1", shard(replicas="b", joining="c"), now=T0)
    assert "a dead, b decommissioned, c joining replica" in info.value.message
    assert info.value.details["shard"] == "s1"
    assert bal.stats(T0)["errors"]["no_live_replica"] == 1


def test_empty_candidate_list_is_no_live_replica() -> None:
    with pytest.raises(NoLiveReplica, match="no replicas"):
        cluster().select("s1", [], now=T0)


def test_nodes_never_heard_of_serve_only_through_panic() -> None:
    bal = Balancer(BalancerConfig(), random.Random(0))
    sel = bal.select("s1", shard(), now=T0)
    assert sel.panic and sel.node in "abc"
    bal.node_update("b", state="alive", now=0.0)
    sels = [bal.select("s1", shard(), now=T0) for _ in range(20)]
    assert {s.node for s in sels} == set("abc")  # 1 of 3 healthy: still panic
    bal.node_update("c", state="alive", now=0.0)
    assert {bal.select("s1", shard(), now=T0).node for _ in range(50)} == {"b", "c"}


def test_unknown_strategy_is_a_bad_request_naming_the_choices() -> None:
    with pytest.raises(BadRequest, match=r"unknown strategy 'fastest'.*performance"):
        cluster().select("s1", shard(), strategy="fastest", now=T0)


def test_duplicate_candidates_are_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="appears twice"):
        cluster().select("s1", [Candidate("a", "primary"), Candidate("a")], now=T0)


@pytest.mark.parametrize("node, role", [("", "replica"), (7, "replica"), ("a", "owner")])
def test_malformed_candidates_are_refused(node: Any, role: str) -> None:
    with pytest.raises(BadRequest):
        Candidate(node, role)


# --- leases ------------------------------------------------------------------------------


def in_flight(bal: Balancer, node: str, now: float = T0) -> int:
    return int(bal.stats(now)["nodes"][node]["in_flight"])


def test_lease_counts_in_flight_until_released() -> None:
    bal = cluster()
    sel = bal.select("s1", shard(), write=True, now=T0)
    assert sel.lease is not None and sel.deadline == T0 + 30.0
    assert in_flight(bal, "a") == 1
    assert bal.release(sel.lease, 4.0, True, now=T0 + 0.004) == []
    node = bal.stats(T0)["nodes"]["a"]
    assert (node["in_flight"], node["successes"], node["latency_ms"]["samples"]) == (0, 1, 1)


def test_lookup_without_lease_leaves_in_flight_alone() -> None:
    bal = cluster()
    for _ in range(10):
        sel = bal.select("s1", shard(), lease=False, now=T0)
        assert sel.lease is None and sel.deadline is None
    stats = bal.stats(T0)
    assert all(n["in_flight"] == 0 for n in stats["nodes"].values())
    assert stats["totals"]["lookups"] == 10 and stats["totals"]["leases"] == 0
    assert stats["shards"]["s1"]["lookups"] == 10


def test_a_resent_release_is_answered_already_released_and_counts_once() -> None:
    bal = cluster()
    sel = bal.select("s1", shard(), now=T0)
    assert bal.end_lease(sel.lease or "", 1.0, True, now=T0) == ("released", [])
    assert bal.end_lease(sel.lease or "", 1.0, True, now=T0 + 1) == ("already_released", [])
    stats = bal.stats(T0 + 1)
    assert in_flight(bal, sel.node) == 0
    assert stats["nodes"][sel.node]["successes"] == 1
    assert stats["releases"] == {"released": 1, "already_released": 1, "expired": 0, "unknown": 0}


def test_released_ids_are_remembered_for_one_lease_lifetime() -> None:
    bal = cluster(lease_timeout_s=10.0)
    sel = bal.select("s1", shard(), now=T0)
    bal.release(sel.lease or "", 1.0, True, now=T0)
    assert bal.end_lease(sel.lease or "", now=T0 + 9.9)[0] == "already_released"
    assert bal.end_lease(sel.lease or "", now=T0 + 10.1)[0] == "unknown"


def test_unknown_lease_is_done_and_counted() -> None:
    bal = cluster()
    assert bal.end_lease("nope-1", 1.0, True, now=T0) == ("unknown", [])
    stats = bal.stats(T0)
    assert stats["releases"]["unknown"] == 1 and stats["errors"]["not_found"] == 0


def test_release_without_latency_records_no_latency() -> None:
    bal = cluster()
    sel = bal.select("s1", shard(), write=True, now=T0)
    bal.release(sel.lease or "", None, True, now=T0 + 5.0)
    node = bal.stats(T0 + 5)["nodes"]["a"]
    assert (node["successes"], node["latency_ms"]["samples"], node["latency_ms"]["ewma"]) == (1, 0, None)


def test_lease_ids_carry_the_instance_prefix_and_not_the_seed() -> None:
    one = Balancer(BalancerConfig(), random.Random(1), lease_prefix="0a1b2c3d").select("s", shard(), now=T0).lease
    two = Balancer(BalancerConfig(), random.Random(1), lease_prefix="4e5f6071").select("s", shard(), now=T0).lease
    assert one == "0a1b2c3d-1" and two == "4e5f6071-1"


def test_unreleased_lease_expires_and_counts_as_expired_not_failed() -> None:
    bal = cluster(lease_timeout_s=10.0)
    sel = bal.select("s1", shard(), write=True, now=T0)
    assert bal.tick(T0 + 9.9) == []
    assert in_flight(bal, "a") == 1
    events = bal.tick(T0 + 10.0)
    assert [e.kind for e in events] == ["balancer.leases_expired"]
    assert events[0].data == {"count": 1, "nodes": {"a": 1}}
    node = bal.stats(T0 + 10)["nodes"]["a"]
    assert (node["in_flight"], node["expired"], node["failures"]) == (0, 1, 0)
    assert bal.end_lease(sel.lease or "", 1.0, False, now=T0 + 11) == ("expired", [])
    assert bal.stats(T0 + 11)["nodes"]["a"]["failures"] == 0


def test_expired_leases_do_not_count_toward_ejection() -> None:
    bal = cluster(lease_timeout_s=1.0)
    for _ in range(20):
        bal.select("s1", shard(), write=True, now=T0)
    events = bal.tick(T0 + 2)
    assert [e.kind for e in events] == ["balancer.leases_expired"]
    stats = bal.stats(T0 + 2)
    assert stats["totals"]["ejections"] == 0 and stats["nodes"]["a"]["expired"] == 20


def test_only_due_leases_expire() -> None:
    bal = cluster(lease_timeout_s=5.0)
    for i in range(10):
        bal.select("s1", shard(), write=True, now=T0 + i)
    events = bal.tick(T0 + 7)  # leases opened at 0, 1, 2 are due
    assert events[0].data["count"] == 3
    assert in_flight(bal, "a", T0 + 7) == 7


@pytest.mark.parametrize(
    "lease, latency, ok",
    [
        (5, 1.0, True),
        ("x", -1.0, True),
        ("x", float("nan"), True),
        ("x", "3", True),
        ("x", 1.0, "yes"),
    ],
)
def test_malformed_release_is_a_bad_request(lease: Any, latency: Any, ok: Any) -> None:
    with pytest.raises(BadRequest):
        cluster().release(lease, latency, ok, now=T0)


# --- inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"state": "zombie"}, "state"),
        ({"lifecycle": "retired"}, "lifecycle"),
        ({"weight": 0}, "weight"),
        ({"weight": True}, "weight"),
        ({"load": {"cpu": 10}}, "mem"),
        ({"load": {"cpu": "hot", "mem": 1}}, "cpu"),
        ({"load": [1, 2]}, "load"),
        ({"load": {"cpu": 1, "mem": 1, "age": -3}}, "age"),
        ({"address": 7000}, "address"),
    ],
)
def test_malformed_node_updates_name_the_field(kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(BadRequest, match=setting):
        cluster().node_update("a", now=T0, **kwargs)


def test_node_update_refuses_an_empty_node_id() -> None:
    with pytest.raises(BadRequest, match="node id"):
        cluster().node_update("", state="alive", now=T0)


def test_load_is_clamped_and_its_age_reported() -> None:
    bal = cluster()
    bal.node_update("a", load={"cpu": 103.0, "mem": 50, "at": T0 - 2}, now=T0)
    load = bal.stats(T0)["nodes"]["a"]["load"]
    assert load == {"cpu": 100.0, "mem": 50.0, "age_s": 2.0, "stale": False}
    assert bal.stats(T0 + 10)["nodes"]["a"]["load"]["stale"] is True


def test_forget_node_drops_its_leases() -> None:
    bal = cluster()
    sel = bal.select("s1", shard(), write=True, now=T0)
    assert bal.forget_node("a", now=T0) == 1
    assert "a" not in bal.stats(T0)["nodes"]
    assert bal.stats(T0)["totals"]["dropped"] == 1
    assert bal.end_lease(sel.lease or "", 1.0, True, now=T0)[0] == "unknown"
    with pytest.raises(NotFound, match="not known"):
        bal.forget_node("a", now=T0)


# --- statistics --------------------------------------------------------------------------


def test_stats_report_counts_latency_and_rates() -> None:
    bal = cluster()
    now = T0
    for i in range(100):
        now = T0 + i * 0.1
        sel = bal.select("s1", shard(), write=True, now=now)
        bal.release(sel.lease or "", float(i + 1), i % 10 != 0, now=now)
    stats = bal.stats(now)
    a = stats["nodes"]["a"]
    assert (a["picks"], a["successes"], a["failures"], a["in_flight"]) == (100, 90, 10, 0)
    # 90 successful latencies, 2..100 without 11, 21, .., 91: exact p50 = 50, p99 = 99;
    # the sketch promises 2% relative error
    assert a["latency_ms"]["p50"] == pytest.approx(50, rel=0.02)
    assert a["latency_ms"]["p99"] == pytest.approx(99, rel=0.02)
    assert stats["totals"]["selects"] == 100 and stats["totals"]["writes"] == 100
    assert stats["ops"]["select"] == 100 and stats["ops"]["release"] == 100
    assert stats["shards"]["s1"]["failures"] == 10
    # 100 selects over 10 s, window 10 s: 10 per second
    assert bal.shard_rates(now)["s1"] == pytest.approx(10.0, rel=0.02)


def test_stats_are_plain_data() -> None:
    import msgpack

    bal = cluster()
    bal.select("s1", shard(), now=T0)
    stats = bal.stats(T0)
    assert msgpack.unpackb(msgpack.packb(stats), strict_map_key=False) == stats


def test_shard_rates_track_each_shard_and_idle_shards_are_forgotten() -> None:
    bal = cluster(shard_rate_window_s=10.0, shard_forget_s=60.0)
    for i in range(200):
        bal.select("hot", shard(), lease=False, now=T0 + i * 0.05)
    bal.select("cold", shard(), lease=False, now=T0 + 9.9)
    rates = bal.shard_rates(T0 + 10)
    assert rates["hot"] == pytest.approx(20.0, rel=0.05)
    assert rates["cold"] == pytest.approx(0.1, rel=0.05)
    bal.tick(T0 + 65)  # hot was selected 55 s ago: kept
    assert set(bal.shard_rates(T0 + 65)) == {"hot", "cold"}
    bal.tick(T0 + 75)
    assert bal.shard_rates(T0 + 75) == {}


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("default_strategy", "fastest"),
        ("lease_timeout_s", 0),
        ("lease_timeout_s", float("inf")),
        ("eject_consecutive_failures", 0),
        ("eject_max_fraction", 1.5),
        ("panic_threshold", -0.1),
        ("slow_start_floor", 0.0),
        ("eject_max_s", 1.0),
        ("mem_knee_percent", 100),
        ("cpu_penalty", -1),
        ("latency_relative_error", 0.9),
        ("reads_from_primary", 1),
    ],
)
def test_config_validate_names_the_bad_setting(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        BalancerConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        Balancer(BalancerConfig(**{field: value}), random.Random(0))


def test_config_defaults_are_valid_and_documented() -> None:
    BalancerConfig().validate()
    rows = describe()
    assert {r["name"] for r in rows} >= {"lease_timeout_s", "panic_threshold", "eject_base_s"}
    assert all(r["unit"] and len(r["why"]) > 20 for r in rows)


def test_config_from_mapping_converts_and_refuses() -> None:
    config = BalancerConfig.from_mapping(
        {"lease_timeout_s": "12", "reads_from_primary": "no", "eject_consecutive_failures": 3}
    )
    assert (config.lease_timeout_s, config.reads_from_primary) == (12.0, False)
    assert config.eject_consecutive_failures == 3
    with pytest.raises(ValueError, match="unknown balancer setting"):
        BalancerConfig.from_mapping({"lease_timeout": 1})
    with pytest.raises(ValueError, match="panic_threshold"):
        BalancerConfig.from_mapping({"panic_threshold": "lots"})
    with pytest.raises(ValueError, match="eject_consecutive_failures"):
        BalancerConfig.from_mapping({"eject_consecutive_failures": 2.5})


# --- concurrency -------------------------------------------------------------------------


def test_concurrent_select_and_release_keep_counts_consistent() -> None:
    bal = cluster("abcdef")
    cands = shard("a", "bcdef")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(2000):
                sel = bal.select(f"s{i % 4}", cands, now=T0 + i * 0.001)
                bal.release(sel.lease or "", rng.random() * 10, rng.random() > 0.01, now=T0 + i * 0.001)
        except BaseException as exc:  # report in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = bal.stats(T0 + 3)
    nodes = stats["nodes"].values()
    assert sum(n["picks"] for n in nodes) == 8000
    assert sum(n["successes"] + n["failures"] for n in nodes) == 8000
    assert all(n["in_flight"] == 0 for n in nodes)


# --- properties over random histories --------------------------------------------------


NODES = "abcdef"


class BalancerHistory(RuleBasedStateMachine):
    """Random selects, releases, membership changes and ticks against one balancer."""

    def __init__(self) -> None:
        super().__init__()
        self.bal = Balancer(
            BalancerConfig(
                lease_timeout_s=5.0, eject_consecutive_failures=3, eject_base_s=2.0, eject_max_s=8.0
            ),
            random.Random(0),
        )
        self.now = 0.0
        self.open: dict[str, str] = {}  # lease id -> node
        self.deadlines: dict[str, float] = {}
        self.ended: list[str] = []
        self.issued = 0
        self.states: dict[str, str] = {}
        for n in NODES:
            self.bal.node_update(n, state="alive", now=0.0)
            self.states[n] = "alive"

    @rule(dt=st.floats(0, 3))
    def advance(self, dt: float) -> None:
        self.now += dt
        due = sorted(lid for lid, deadline in self.deadlines.items() if deadline <= self.now)
        events = self.bal.tick(self.now)
        expired = [e for e in events if e.kind == "balancer.leases_expired"]
        assert sum(e.data["count"] for e in expired) == len(due)
        for lid in due:
            del self.deadlines[lid]
            self.ended.append(self.open.pop(lid))

    @rule(
        shard=st.sampled_from(["s1", "s2", "s3"]),
        members=st.lists(st.sampled_from(NODES), min_size=1, max_size=4, unique=True),
        roles=st.lists(st.sampled_from(["replica", "joining", "leaving"]), min_size=4, max_size=4),
        write=st.booleans(),
        strategy=st.sampled_from([None, *STRATEGY_NAMES]),
        lease=st.booleans(),
    )
    def select(
        self, shard: str, members: list[str], roles: list[str], write: bool, strategy: str | None, lease: bool
    ) -> None:
        cands = [Candidate(members[0], "primary")]
        cands += [Candidate(n, r) for n, r in zip(members[1:], roles, strict=False)]
        try:
            sel = self.bal.select(shard, cands, write=write, strategy=strategy, lease=lease, now=self.now)
        except NoLiveReplica:
            if write:
                assert self.states[members[0]] in ("dead", "left")
            else:
                readable = [
                    c for c in cands if c.role != "joining" and self.states[c.node] not in ("dead", "left")
                ]
                assert readable == [] or self.bal.config.panic_threshold == 0
            return
        by_node = {c.node: c.role for c in cands}
        assert sel.node in by_node
        assert self.states[sel.node] not in ("dead", "left")
        if write:
            assert sel.node == members[0] and sel.role == "primary"
        else:
            assert by_node[sel.node] != "joining"
        if lease:
            assert sel.lease is not None
            assert sel.deadline is not None
            self.open[sel.lease] = sel.node
            self.deadlines[sel.lease] = sel.deadline
            self.issued += 1

    @rule(data=st.data(), ok=st.booleans(), latency=st.floats(0, 500))
    def release(self, data: st.DataObject, ok: bool, latency: float) -> None:
        if not self.open:
            return
        lid = data.draw(st.sampled_from(sorted(self.open)))
        self.bal.release(lid, latency, ok, now=self.now)
        self.ended.append(self.open.pop(lid))
        del self.deadlines[lid]
        assert self.bal.end_lease(lid, latency, ok, now=self.now)[0] == "already_released"

    @rule(lid=st.text(max_size=8))
    def release_bogus(self, lid: str) -> None:
        assert self.bal.end_lease("bogus:" + lid, 1.0, True, now=self.now) == ("unknown", [])

    @rule(node=st.sampled_from(NODES), state=st.sampled_from(["alive", "suspect", "dead", "left"]))
    def membership(self, node: str, state: str) -> None:
        self.bal.node_update(node, state=state, now=self.now)
        self.states[node] = state

    @invariant()
    def counts_add_up(self) -> None:
        stats = self.bal.stats(self.now)
        nodes = stats["nodes"]
        held = Counter(self.open.values())
        for nid, n in nodes.items():
            assert n["in_flight"] >= 0
            assert n["in_flight"] == held[nid]
            assert n["leases"] == n["in_flight"] + n["successes"] + n["failures"] + n["expired"]
        totals = stats["totals"]
        assert totals["leases"] == self.issued
        assert totals["in_flight"] == len(self.open)
        assert totals["leases"] == (
            totals["in_flight"] + totals["successes"] + totals["failures"] + totals["expired"]
        )
        assert totals["selects"] == sum(n["picks"] for n in nodes.values())
        assert totals["ejected"] <= max(1, int(0.1 * len(NODES)))
        shard_selects = sum(s["reads"] + s["writes"] for s in stats["shards"].values())
        assert shard_selects == totals["selects"]


BalancerHistory.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_histories_keep_counts_consistent = BalancerHistory.TestCase


def test_slow_start_ramps_share_instead_of_starving_the_latest_node() -> None:
    # Nodes that became servable half a second apart ramp almost together; before
    # the fix the latest of them got no reads at all until its 30 s ramp ended.
    import random
    from collections import Counter

    from phantom_bus.routing.balancer import Balancer, Candidate

    b = Balancer(BalancerConfig(), random.Random(7))
    for i, t in enumerate((100.0, 100.5, 101.0), start=1):
        b.node_update(f"node-{i}", state="alive", lifecycle="active", now=t)
    candidates = [Candidate("node-1", "primary"), Candidate("node-2", "replica"), Candidate("node-3", "replica")]
    picks = Counter(b.select("s1", candidates, lease=False, now=105.0).node for _ in range(3000))
    assert set(picks) == {"node-1", "node-2", "node-3"}
    assert min(picks.values()) > 3000 * 0.2


def test_least_connections_gives_a_ramping_node_a_growing_share() -> None:
    import random
    from collections import Counter

    from phantom_bus.routing.balancer import Balancer, Candidate

    b = Balancer(BalancerConfig(), random.Random(3))
    b.node_update("old-1", state="alive", lifecycle="active", now=0.0)
    b.node_update("old-2", state="alive", lifecycle="active", now=0.0)
    b.node_update("new", state="alive", lifecycle="active", now=100.0)
    candidates = [Candidate("old-1", "primary"), Candidate("old-2", "replica"), Candidate("new", "replica")]

    def share(now: float) -> float:
        picks = Counter(
            b.select("s1", candidates, strategy="least_connections", lease=False, now=now).node for _ in range(3000)
        )
        return picks["new"] / 3000

    early, later = share(101.0), share(120.0)
    assert 0.02 < early < later < 0.34  # probed at once, then more and more, never the lion's share


def test_a_never_measured_node_is_explored_even_when_its_load_looks_worse() -> None:
    import random
    from collections import Counter

    from phantom_bus.routing.balancer import Balancer, Candidate

    b = Balancer(BalancerConfig(), random.Random(11))
    for node, cpu in (("a", 10.0), ("b", 10.0), ("c", 60.0)):
        b.node_update(node, state="alive", lifecycle="active", load={"cpu": cpu, "mem": 10.0}, now=0.0)
    candidates = [Candidate("a", "primary"), Candidate("b", "replica"), Candidate("c", "replica")]
    picks: Counter[str] = Counter()
    for i in range(300):
        now = 100.0 + i * 0.01
        sel = b.select("s1", candidates, now=now)
        b.release(sel.lease, 2.0, True, now=now)
        picks[sel.node] += 1
    assert picks["c"] >= 1  # it got its sample, and is judged on it from then on
