"""Local selection, the map follower and versioned node state (cores, no sockets)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phantom_bus import follower
from phantom_bus.errors import BadRequest, NoLiveReplica
from phantom_bus.follower import AsyncMapFollower, MapFollower
from phantom_bus.routing import Balancer, BalancerConfig, Candidate, inputs
from phantom_bus.routing.local import SCAN_CONFIG, LocalRouter
from phantom_bus.shardmap import Keyspace, Replica, Shard, ShardMap

NODES = [f"n{i}" for i in range(6)]
STATES = ("alive", "suspect", "dead", "left")
LIFECYCLES = ("joining", "active", "draining", "decommissioned")
ROLE_CHOICES = ("replica", "replica", "joining", "leaving")


def build_map(epoch: int, rows: list[tuple[list[str], list[str]]], slots: int = 64) -> ShardMap:
    shards = []
    n = len(rows)
    for i, (nodes, roles) in enumerate(rows):
        replicas = tuple(Replica(node, "primary" if j == 0 else roles[j])
                         for j, node in enumerate(nodes))
        shards.append(Shard(f"h/{i}", replicas, slots=((i * slots // n, (i + 1) * slots // n),)))
    return ShardMap(epoch, (Keyspace("default", "hash", 3, tuple(shards), slots),))


shard_rows = st.lists(
    st.tuples(st.permutations(NODES).map(lambda p: list(p[:3])),
              st.lists(st.sampled_from(ROLE_CHOICES), min_size=3, max_size=3)),
    min_size=1, max_size=8,
)
health = st.dictionaries(
    st.sampled_from(NODES),
    st.tuples(st.sampled_from(STATES), st.sampled_from(LIFECYCLES)),
)
keys = st.lists(st.one_of(st.text(max_size=12), st.binary(max_size=12)), min_size=1, max_size=30)


def outcome(fn: Any, *args: Any, **kw: Any) -> tuple[str, ...]:
    try:
        sel = fn(*args, **kw)
    except (NoLiveReplica, BadRequest) as exc:
        return ("error", type(exc).__name__)
    return (sel.node, sel.role, sel.strategy, str(sel.panic))


@settings(max_examples=60, deadline=None)
@given(shard_rows, health, keys, st.sampled_from(
    ("round_robin", "random", "least_connections", "weighted", "performance")), st.integers(0, 2**32))
def test_local_selection_agrees_with_the_balancer_core(
    rows: list[tuple[list[str], list[str]]], nodes: dict[str, tuple[str, str]], ks: list[Any],
    strategy: str, seed: int,
) -> None:
    shard_map = build_map(7, rows)
    local = LocalRouter(BalancerConfig(), random.Random(seed))
    local.set_map(shard_map)
    central = Balancer(BalancerConfig(), random.Random(seed))
    table = {n: {"state": s, "lifecycle": lc, "address": f"{n}:1", "weight": 1.0, "version": [1, 1],
                 "load": None} for n, (s, lc) in nodes.items()}
    # The client gets the balancer's table; the balancer got the same facts as events.
    local.on_routing_table(table, now=0.0)
    for n, (s, lc) in nodes.items():
        central.node_update(n, state=s, lifecycle=lc, address=f"{n}:1", weight=1.0, version=(1, 1), now=0.0)
    for i, key in enumerate(ks):
        write = i % 3 == 0
        shard = shard_map.lookup("default", key)
        cands = [Candidate(r.node, r.role) for r in shard.replicas]
        want = outcome(central.select, shard.id, cands, write=write, strategy=strategy, now=1.0 + i)
        got = outcome(lambda *a, **k: local.select(*a, **k)[2], key, write=write, strategy=strategy, now=1.0 + i)
        assert got == want


@settings(max_examples=40, deadline=None)
@given(shard_rows, health, keys, st.sampled_from(("round_robin", "least_connections", "performance")),
       st.integers(0, 2**32), st.lists(st.booleans(), min_size=30, max_size=30))
def test_local_selection_agrees_with_the_core_through_failures_and_ejections(
    rows: list[tuple[list[str], list[str]]], nodes: dict[str, tuple[str, str]], ks: list[Any],
    strategy: str, seed: int, oks: list[bool],
) -> None:
    # The same outcomes released to both: ejections (and their end, eject_base_s
    # later) change the cached plans of the local path exactly when the core's
    # own rules change.
    cfg = BalancerConfig(eject_consecutive_failures=2, eject_base_s=3.0)
    shard_map = build_map(7, rows)
    local = LocalRouter(cfg, random.Random(seed))
    local.set_map(shard_map)
    central = Balancer(cfg, random.Random(seed))
    for n, (state, lc) in nodes.items():
        local.core.node_update(n, state=state, lifecycle=lc, now=0.0)
        central.node_update(n, state=state, lifecycle=lc, now=0.0)
    for i, key in enumerate(ks * 3):
        now = 1.0 + i * 0.7
        shard = shard_map.lookup("default", key)
        cands = [Candidate(r.node, r.role) for r in shard.replicas]
        try:
            want = central.select(shard.id, cands, strategy=strategy, now=now)
        except NoLiveReplica:
            with pytest.raises(NoLiveReplica):
                local.select(key, strategy=strategy, now=now)
            continue
        _, _, got = local.select(key, strategy=strategy, now=now)
        assert (got.node, got.role, got.panic) == (want.node, want.role, want.panic)
        ok = oks[i % len(oks)]
        assert want.lease is not None and got.lease is not None
        central.release(want.lease, 2.0 + i % 5, ok, now=now + 0.1)
        local.release(got.node, got.lease, 2.0 + i % 5, ok, now=now + 0.1)
        if i % 4 == 3:
            central.tick(now + 0.2)
            local.tick(now + 0.2)


def test_local_release_feeds_the_clients_own_ejection() -> None:
    shard_map = build_map(1, [(["a", "b", "c"], ["replica"] * 3)])
    local = LocalRouter(BalancerConfig(), random.Random(1))
    local.set_map(shard_map)
    for n in "abc":
        local.on_event({"kind": "member.alive", "node": n, "incarnation": 1, "change": 1}, now=0.0)
    for i in range(15):  # b fails its five picks in a row: ejected
        _, _, sel = local.select("k", strategy="round_robin", now=1.0 + i)
        assert sel.lease is not None
        local.release(sel.node, sel.lease, 5.0, sel.node != "b", now=1.0 + i)
    picks = {local.select("k", strategy="round_robin", now=20.0)[2].node for _ in range(6)}
    assert "b" not in picks
    report = local.report(now=20.0)
    assert report["nodes"]["b"]["failures"] >= 1 and report["nodes"]["a"]["latencies"]
    # Not committed (the balancer did not take it): the counts go out again.
    assert local.report(now=20.5)["nodes"]["b"]["failures"] == report["nodes"]["b"]["failures"]
    local.commit()
    assert local.report(now=21.0)["nodes"].keys() <= {"a", "c"}  # only what changed since


def test_a_select_before_any_map_is_no_live_replica() -> None:
    with pytest.raises(NoLiveReplica, match="no shard map"):
        LocalRouter().select("k", now=0.0)


def test_reported_traffic_shows_in_the_balancers_stats() -> None:
    central = Balancer(BalancerConfig(), random.Random(0))
    central.absorb({"a": {"picks": 3, "successes": 2, "failures": 1, "latencies": [1.0, 2.0]}},
                   {"h/0": {"reads": 2, "writes": 1}}, now=5.0)
    stats = central.stats(5.0)
    assert stats["totals"]["reported"] == 3 and stats["nodes"]["a"]["picks"] == 3
    assert stats["nodes"]["a"]["latency_ms"]["samples"] == 2 and central.shard_rates(5.0)["h/0"] > 0
    with pytest.raises(BadRequest):
        central.absorb({"a": {"picks": -1}}, {}, now=5.0)
    assert central.stats(5.0)["nodes"]["a"]["picks"] == 3  # a bad report counts nothing


# --- versioned node state ------------------------------------------------------------


def test_a_late_alive_never_overwrites_a_fresh_dead() -> None:
    core = Balancer(BalancerConfig(), random.Random(0))
    core.node_update("a", state="alive", version=(1, 1), now=0.0)
    core.node_update("a", state="dead", version=(1, 3), now=1.0)
    assert core.node_update("a", state="alive", version=(1, 2), now=2.0) is False   # late event
    assert core.node_update("a", state="alive", now=2.0) is False                   # unversioned relay
    assert core.stats(2.0)["nodes"]["a"]["state"] == "dead"
    assert core.stats(2.0)["totals"]["stale_updates"] == 2
    with pytest.raises(NoLiveReplica):
        core.select("s", [Candidate("a", "primary")], write=True, now=3.0)


def test_a_higher_incarnation_brings_a_dead_node_back() -> None:
    core = Balancer(BalancerConfig(), random.Random(0))
    core.node_update("a", state="dead", version=(1, 9), now=0.0)
    assert core.node_update("a", state="alive", version=(2, 0), now=1.0) is True
    assert core.stats(1.0)["nodes"]["a"]["version"] == [2, 0]


def test_an_older_load_sample_is_ignored() -> None:
    core = Balancer(BalancerConfig(), random.Random(0))
    core.node_update("a", load={"cpu": 90.0, "mem": 10.0, "at": 5.0}, now=5.0)
    assert core.node_update("a", load={"cpu": 1.0, "mem": 1.0, "at": 3.0}, now=6.0) is False
    assert core.stats(6.0)["nodes"]["a"]["load"]["cpu"] == 90.0


@pytest.mark.parametrize("version", [(1,), (1, -1), ("1", 2), (True, 1), "12"])
def test_a_malformed_version_is_a_bad_request(version: Any) -> None:
    with pytest.raises(BadRequest, match="version"):
        Balancer(BalancerConfig(), random.Random(0)).node_update("a", state="alive", version=version, now=0.0)


def test_membership_events_and_rows_carry_their_version() -> None:
    assert inputs.from_event({"kind": "member.dead", "node": "a", "incarnation": 3, "change": 4}) == [
        ("a", {"state": "dead", "version": (3, 4)})]
    assert inputs.from_members([{"id": "a", "state": "alive", "incarnation": 3}]) == [("a", {"state": "alive"})]
    assert inputs.from_event({"kind": "member.dead", "node": 7}) == []


# --- the map follower -------------------------------------------------------------------


def wire(epoch: int) -> dict[str, Any]:
    return build_map(epoch, [(["a", "b", "c"], ["replica"] * 3)]).to_wire()


def test_follower_reads_whole_map_first_then_by_epoch() -> None:
    f = MapFollower(poll_s=1.0, verify_s=30.0)
    assert f.next_read(0.0) == {}
    assert f.on_reply(wire(3), 0.0, full=True).changed is not None
    assert f.next_read(0.5) is None
    assert f.next_read(1.0) == {"since_epoch": 3}


def test_a_lost_event_is_repaired_by_the_next_poll() -> None:
    f = MapFollower(poll_s=1.0)
    f.on_reply(wire(3), 0.0, full=True)
    # No event arrives for epoch 4; the poll a second later finds it.
    assert f.wake_at(0.0) == 1.0
    args = f.next_read(1.0)
    assert args == {"since_epoch": 3}
    assert f.on_reply(wire(4), 1.0, full=False).changed is not None and f.epoch == 4


def test_an_event_is_a_hint_and_an_old_term_is_dropped() -> None:
    f = MapFollower()
    f.on_reply(wire(3), 0.0, full=True)
    assert f.hint({"epoch": 3}) is False            # nothing new
    assert f.hint({"epoch": 5, "term": 2}) is True
    assert f.next_read(0.1) == {"since_epoch": 3}
    f.on_reply(None, 0.1, full=False)
    assert f.hint({"epoch": 9, "term": 1}) is False  # an older leader's event
    assert f.counters["old_term_dropped"] == 1


def test_an_epoch_going_backwards_is_refused_and_reported_once() -> None:
    f = MapFollower(verify_s=10.0)
    f.on_reply(wire(8), 0.0, full=True)
    assert f.hint({"epoch": 5}) is True
    assert f.next_read(0.1) == {}                    # only a whole read shows an older map
    out = f.on_reply(wire(5), 0.1, full=True)
    assert out.regressed is not None and (out.regressed.held, out.regressed.offered) == (8, 5)
    assert out.changed is None and f.epoch == 8
    assert f.on_reply(wire(5), 10.2, full=True).regressed is None  # same refusal, not re-counted
    assert f.status(11.0)["regressions"] == 1
    assert f.on_reply(wire(9), 11.0, full=False).changed is not None


def test_a_periodic_whole_read_catches_a_silent_regression() -> None:
    f = MapFollower(poll_s=1.0, verify_s=10.0)
    f.on_reply(wire(8), 0.0, full=True)
    assert f.next_read(5.0) == {"since_epoch": 8}
    f.on_reply(None, 5.0, full=False)
    assert f.next_read(10.0) == {}


def test_failed_reads_retry_after_a_poll_and_staleness_follows_the_last_success() -> None:
    f = MapFollower(poll_s=1.0)
    f.on_reply(wire(2), 0.0, full=True)
    f.on_error(1.0, full=False)
    assert f.next_read(1.5) is None and f.next_read(2.0) is not None
    assert not f.stale(9.0, after=10.0) and f.stale(10.5, after=10.0)


def test_before_the_first_map_a_failed_read_is_retried_sooner() -> None:
    f = MapFollower(poll_s=1.0)
    f.on_error(0.0, full=True)
    assert f.next_read(0.1) is None and f.next_read(0.25) == {}


def test_a_hint_arriving_during_a_read_is_not_lost() -> None:
    f = MapFollower(poll_s=1.0)
    f.on_reply(wire(3), 0.0, full=True)
    assert f.next_read(1.0) == {"since_epoch": 3}   # a poll goes out...
    assert f.hint({"epoch": 4}) is True             # ...epoch 4 is published meanwhile...
    f.on_reply(None, 1.01, full=False)              # ...and the poll saw nothing newer yet
    assert f.next_read(1.02) == {"since_epoch": 3}  # read again now, not a poll later


def test_shardings_current_epoch_is_a_refresh_and_keeps_the_polls_away() -> None:
    f = MapFollower(poll_s=1.0, verify_s=100.0)
    f.on_reply(wire(3), 0.0, full=True)
    for second in range(1, 8):                        # shardmap.current once a second
        assert f.on_current({"epoch": 3, "term": 1}, second - 0.1) is False
        assert f.next_read(float(second)) is None     # no poll while it says "current"
    assert f.counters["reads"] == 1 and f.counters["confirmed"] == 7
    assert f.refreshed_at == 6.9 and not f.stale(16.0, after=10.0)
    # The events stop (the SUB lost its connection): the polls come back.
    assert f.wake_at(7.0) == 6.9 + follower.CONFIRMED_POLL_S
    assert f.next_read(6.9 + follower.CONFIRMED_POLL_S) == {"since_epoch": 3}


def test_a_current_naming_another_epoch_is_a_hint_and_an_old_terms_is_no_refresh() -> None:
    f = MapFollower(poll_s=1.0, verify_s=100.0)
    assert f.on_current({"epoch": 3, "term": 1}, 0.0) is True   # no map yet: read it
    f.on_reply(wire(3), 0.0, full=True)
    assert f.on_current({"epoch": 4, "term": 1}, 0.5) is True   # a lost shardmap.changed
    assert f.next_read(0.5) == {"since_epoch": 3}
    f.on_reply(wire(4), 0.5, full=False)
    assert f.on_current({"epoch": 2, "term": 1}, 0.6) is True   # older: a whole read shows it
    assert f.next_read(0.6) == {}
    f.on_reply(wire(4), 0.6, full=True)
    f.on_current({"epoch": 4, "term": 2}, 0.7)
    assert f.on_current({"epoch": 4, "term": 1}, 0.9) is False  # an older leader's
    assert f.counters["old_term_dropped"] == 1 and f.refreshed_at == 0.7


def test_confirmations_replace_the_periodic_whole_read_until_they_stop() -> None:
    f = MapFollower(poll_s=1.0, verify_s=10.0)
    f.on_reply(wire(8), 0.0, full=True)
    for second in range(1, 31):                      # each names the epoch served: not older
        f.on_current({"epoch": 8}, float(second))
        assert f.next_read(second + 0.5) is None
    assert f.next_read(30.0 + follower.CONFIRMED_POLL_S) == {}   # they stopped: a whole read
    f.on_reply(wire(8), 33.0, full=True)
    assert f.on_current({"epoch": 7}, 34.0) is True  # an older epoch served: read it whole
    assert f.next_read(34.0) == {}


def test_jitter_spreads_followers_that_hear_the_same_events() -> None:
    # Every reader hears one shardmap.current at one instant. When they stop (sharding's
    # leader gone), jittered followers do not all poll, nor all read whole, at once.
    followers = [MapFollower(poll_s=1.0, verify_s=100.0, jitter=0.2, rng=random.Random(seed))
                 for seed in range(50)]
    for f in followers:
        f.on_reply(wire(3), 0.0, full=True)
        for second in range(1, 6):
            f.on_current({"epoch": 3, "term": 1}, float(second))
    first_polls = [f.wake_at(5.5) for f in followers]
    quiet = 5.0 + follower.CONFIRMED_POLL_S
    assert all(quiet <= t <= quiet + follower.CONFIRMED_POLL_S * 0.2 for t in first_polls)
    assert max(first_polls) - min(first_polls) > 0.3      # spread, not in step
    # Each poll after that, and each retry after a failed read, waits 0.9..1.1 poll intervals.
    for f, t in zip(followers, first_polls, strict=True):
        assert f.next_read(t) is not None
        f.on_error(t, full=False)
        assert 0.9 <= f.wake_at(t) - t <= 1.1
        f.on_reply(None, t + 1.1, full=False)
        assert 1.1 + 0.9 <= f.wake_at(t) - t <= 1.1 + 1.1
    assert len({round(f.wake_at(20.0), 6) for f in followers}) == len(followers)
    # The whole reads are spread too: 90..110 s after the first.
    assert all(90.0 <= f._next_verify <= 110.0 for f in followers)
    assert len({round(f._next_verify, 6) for f in followers}) == len(followers)


def test_a_seeded_jitter_gives_the_same_schedule_and_none_gives_the_exact_one() -> None:
    def schedule(f: MapFollower) -> list[float]:
        f.on_reply(wire(3), 0.0, full=True)
        times, now = [], 0.0
        for _ in range(5):
            now = f.wake_at(now)
            f.next_read(now)
            f.on_reply(None, now, full=False)
            times.append(now)
        return times

    assert schedule(MapFollower(jitter=0.2, rng=random.Random(4))) == \
        schedule(MapFollower(jitter=0.2, rng=random.Random(4)))
    assert schedule(MapFollower(poll_s=1.0)) == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="jitter"):
        MapFollower(jitter=1.0)
    # The shell every reader uses spreads its reads by default.
    assert AsyncMapFollower(object(), name="test").core.jitter == follower.POLL_JITTER > 0  # type: ignore[arg-type]


def test_a_pushed_newer_map_is_taken_without_a_read() -> None:
    f = MapFollower(poll_s=1.0)
    f.on_reply(wire(3), 0.0, full=True)
    out = f.on_pushed(wire(4), 2, 0.2)
    assert out.changed is not None and f.epoch == 4 and f.term == 2
    assert f.counters["pushed"] == 1 and f.refreshed_at == 0.2
    assert f.next_read(0.3) is None                  # nothing left to read: the push was the map


def test_a_pushed_map_that_is_not_newer_or_of_an_old_term_changes_nothing() -> None:
    f = MapFollower()
    f.on_reply(wire(5), 0.0, full=True)
    f.on_pushed(wire(6), 3, 0.1)
    assert f.on_pushed(wire(6), 3, 0.2).changed is None      # the same epoch again
    assert f.on_pushed(wire(4), 3, 0.2).changed is None      # older: left to hint() and a whole read
    assert f.on_pushed(wire(9), 2, 0.2).changed is None      # an older leader's push
    assert f.epoch == 6 and f.counters["pushed"] == 1


def test_a_malformed_pushed_map_is_a_bad_request_and_keeps_the_held_map() -> None:
    f = MapFollower()
    f.on_reply(wire(5), 0.0, full=True)
    with pytest.raises(BadRequest):
        f.on_pushed({"epoch": "x"}, None, 0.1)
    assert f.epoch == 5


@pytest.mark.asyncio
async def test_the_async_follower_takes_a_pushed_map_and_calls_back() -> None:
    import asyncio

    from phantom_bus import protocol

    class Sharding:
        calls = 0

        async def request(self, service: str, op: str, /, **args: Any) -> Any:
            Sharding.calls += 1
            return wire(3) if "since_epoch" not in args else None

    seen: list[int] = []
    follower = AsyncMapFollower(Sharding(), name="test", on_change=lambda m: seen.append(m.epoch))
    task = asyncio.ensure_future(follower.run())
    try:
        while follower.map is None:
            await asyncio.sleep(0.01)
        follower.hint({"kind": "shardmap.changed", "epoch": 4, "term": 1, "map": protocol.pack(wire(4))})
        assert follower.map is not None and follower.map.epoch == 4   # taken at once
        for _ in range(100):
            if seen[-1:] == [4]:
                break
            await asyncio.sleep(0.01)
        assert seen == [3, 4] and follower.core.counters["pushed"] == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_pushed_map_is_decoded_once_per_process() -> None:
    from phantom_bus import protocol
    from phantom_bus.follower import decode_pushed

    blob = protocol.pack(wire(9))
    first = decode_pushed(blob)
    assert first.epoch == 9 and decode_pushed(bytes(blob)) is first   # same bytes, another object
    assert decode_pushed(protocol.pack(wire(10))).epoch == 10
    with pytest.raises(BadRequest):
        decode_pushed(b"\xc1")


def test_a_local_router_takes_the_balancers_defaults_unless_given_a_config() -> None:
    # performance is power of two choices with the load penalty wherever it runs;
    # the scan over all replicas is an opt-in.
    assert LocalRouter().core.config == BalancerConfig()
    assert BalancerConfig().performance_choices == 2 and BalancerConfig().ewma_sample_weight == 0.0
    assert LocalRouter(SCAN_CONFIG).core.config == SCAN_CONFIG
    assert SCAN_CONFIG.performance_choices == 0 and SCAN_CONFIG.ewma_sample_weight > 0


def test_a_client_hands_its_balancer_config_to_its_local_router() -> None:
    from phantom_bus.client import AsyncClient, Client

    with Client("tcp://127.0.0.1:1", balancer=SCAN_CONFIG) as c:
        assert c.balancer is SCAN_CONFIG
    assert AsyncClient("tcp://127.0.0.1:1", balancer=SCAN_CONFIG).balancer is SCAN_CONFIG
    assert Client("tcp://127.0.0.1:1").balancer is None
