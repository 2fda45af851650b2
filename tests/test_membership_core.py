"""The membership core in virtual time: detection, refutation, leave, gating,
observer stalls, load digests, properties over random histories, threads."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from phantom_bus.errors import BadRequest, Conflict, NotFound
from phantom_bus.events import Event
from services.membership import (
    ALIVE,
    DEAD,
    LEFT,
    STATES,
    SUSPECT,
    Membership,
    MembershipConfig,
)
from services.membership.simulate import Jitter, Observer, Scenario, detection_trials, run

T0 = 5000.0
INTERVAL = 0.25
TICK = 0.1


class Driver:
    """Heartbeats from a few nodes on a fixed schedule and ticks, in virtual time."""

    def __init__(self, core: Membership, nodes: list[str], now: float = T0) -> None:
        self.core = core
        self.nodes = nodes
        self.now = now
        self.seq: dict[str, int] = defaultdict(int)
        self.inc: dict[str, int] = dict.fromkeys(nodes, 1)
        self.events: list[tuple[float, Event]] = []
        self.next_hb = dict.fromkeys(nodes, now)
        self.next_tick = now + TICK
        for n in nodes:
            core.admit(n, now)

    def beat(self, node: str, at: float | None = None, **kw: Any) -> Any:
        self.seq[node] += 1
        t = self.now if at is None else at
        res = self.core.heartbeat(
            node, kw.pop("inc", self.inc[node]), self.seq[node], kw.pop("load", None), t
        )
        self.events.extend((t, e) for e in res.events)
        return res

    def tick(self, at: float, observer_lag: float = 0.0) -> list[Event]:
        evs = self.core.tick(at, observer_lag)
        self.events.extend((at, e) for e in evs)
        return evs

    def run(self, until: float, silent: set[str] | None = None, delay: Any = None) -> None:
        """Advance to ``until``: every node not in ``silent`` heartbeats every
        INTERVAL (late by ``delay()`` seconds), ticks every TICK."""
        silent = silent or set()
        while True:
            hb_node = min(self.next_hb, key=lambda n: self.next_hb[n])
            t_hb = self.next_hb[hb_node]
            if min(t_hb, self.next_tick) > until:
                break
            if t_hb <= self.next_tick:
                self.next_hb[hb_node] = t_hb + INTERVAL
                if hb_node not in silent:
                    late = delay() if delay else 0.0
                    self.now = max(self.now, t_hb + late)
                    self.beat(hb_node)
            else:
                self.now = max(self.now, self.next_tick)
                self.tick(self.now)
                self.next_tick += TICK
        self.now = max(self.now, until)

    def kinds(self, node: str) -> list[str]:
        return [e.kind for _, e in self.events if e.data["node"] == node]


def make(nodes: int = 5, **cfg: Any) -> Driver:
    return Driver(Membership(MembershipConfig(**cfg)), [f"n{i}" for i in range(nodes)])


# -- detection ------------------------------------------------------------------


def test_steady_heartbeats_stay_alive() -> None:
    d = make(10)
    d.run(T0 + 120)
    assert [e.kind for _, e in d.events] == ["member.alive"] * 10
    assert all(m["state"] == ALIVE for m in d.core.members(d.now))
    assert all(m["phi"] < 1 for m in d.core.members(d.now))


def test_stopped_stream_goes_suspect_then_dead_within_expected_intervals() -> None:
    d = make(5)
    d.run(T0 + 30)
    last = d.now
    d.run(T0 + 40, silent={"n2"})
    assert d.kinds("n2") == ["member.alive", "member.suspect", "member.dead"]
    t_suspect, t_dead = (t for t, e in d.events if e.data["node"] == "n2" and e.kind != "member.alive")
    # Defaults: suspect at ~1.06 s and dead at ~1.31 s of silence, i.e. 4 to 6 intervals.
    assert 3 * INTERVAL < t_suspect - last < t_dead - last <= 6 * INTERVAL + TICK
    dead = d.core.member("n2", d.now)
    assert dead["state"] == DEAD and dead["phi"] >= 8
    assert {m["id"]: m["state"] for m in d.core.members(d.now)} == {
        "n0": ALIVE,
        "n1": ALIVE,
        "n2": DEAD,
        "n3": ALIVE,
        "n4": ALIVE,
    }


def test_jitter_within_the_acceptable_pause_never_suspects() -> None:
    rng = random.Random(3)
    d = make(8)
    # Every heartbeat up to 0.45 s late on a 0.25 s schedule: gaps from 0 to 0.7 s,
    # never beyond mean + acceptable pause.
    d.run(T0 + 300, delay=lambda: rng.uniform(0.0, 0.45))
    assert [e.kind for _, e in d.events] == ["member.alive"] * 8


def test_one_heartbeat_late_by_the_acceptable_pause_is_not_suspected() -> None:
    d = make(1)
    d.run(T0 + 30)
    t = d.now
    for k in range(1, 8):
        d.tick(t + k * TICK)
    d.now = t + INTERVAL + 0.5
    d.beat("n0")
    d.run(T0 + 40)
    assert d.kinds("n0") == ["member.alive"]


def test_suspicion_timeout_ends_a_suspicion_phi_would_prolong() -> None:
    d = make(1, dead_phi=99.0, suspicion_timeout=0.7)
    d.run(T0 + 30)
    d.run(T0 + 40, silent={"n0"})
    (t_s, s), (t_d, dead) = [(t, e) for t, e in d.events if e.kind != "member.alive"]
    assert (s.kind, dead.kind, dead.data["reason"]) == ("member.suspect", "member.dead", "suspicion_timeout")
    assert 0.7 <= t_d - t_s <= 0.7 + TICK + 1e-9


def test_announced_interval_seeds_the_detector_of_a_slow_node() -> None:
    rng = random.Random(4)
    core = Membership()  # expects 0.25 s by default
    core.admit("slow", T0, interval=1.0)
    t = T0
    events: list[Event] = []
    for k in range(1, 60):
        events.extend(core.heartbeat("slow", 1, k, None, t).events)
        nxt = T0 + k * 1.0 + rng.uniform(0.1, 0.2)
        while t + TICK < nxt:
            t += TICK
            events.extend(core.tick(t))
        t = nxt
    assert [e.kind for e in events] == ["member.alive"]
    with pytest.raises(BadRequest, match="interval"):
        core.admit("x", T0, interval=0.0)


def test_a_discovery_document_admits_its_node_with_the_hints_it_announces() -> None:
    core = Membership()
    assert core.admit_discovered({"id": "a", "hb": {"interval": 1.0}, "incarnation": 4}, T0)
    assert core.admit_discovered({"node": "b", "hb": {"interval": True}, "incarnation": -1}, T0)
    assert not core.admit_discovered({"kind": "node.updated", "node": "b", "incarnation": 2}, T0)
    assert core._intervals == {"a": 1.0}  # a hint of the wrong type is ignored
    for bad in ({"kind": "node.discovered"}, {"id": ""}, {"node": "a b"}):
        with pytest.raises(BadRequest):
            core.admit_discovered(bad, T0)
    # Never heard from: declared dead at the highest incarnation discovery announced.
    late = T0 + core.config.first_heartbeat_timeout + 1.0
    verdicts = {e.data["node"]: e.data["incarnation"] for e in core.tick(late) if e.kind == "member.dead"}
    assert verdicts == {"a": 4, "b": 2}


def test_heartbeats_between_ticks_count_before_a_deadline_expires() -> None:
    d = make(1)
    d.run(T0 + 30)
    t = d.now
    # Silent for 1.0 s (just under suspicion), then a heartbeat, then a tick
    # 0.35 s later: the tick must see the fresh arrival, not the old deadline.
    d.beat("n0", at=t + 1.0)
    d.tick(t + 1.35)
    assert d.kinds("n0") == ["member.alive"]


# -- observer stalls ------------------------------------------------------------


@pytest.mark.parametrize("drain_before_tick", [True, False])
def test_observer_pause_convicts_nobody(drain_before_tick: bool) -> None:
    report = run(
        Scenario(
            nodes=50,
            duration=90.0,
            jitter=Jitter.typical(),
            observer=Observer(pauses=((30.0, 3.0), (60.0, 0.4)), drain_before_tick=drain_before_tick),
            seed=11,
        )
    )
    assert report.false_suspects == [] and report.false_deads == []
    assert report.stalls == 2 and report.stalled_seconds == pytest.approx(3.4, abs=0.15)
    assert all(m["state"] == ALIVE for m in report.core.members(T0))


def test_stall_reported_before_the_backlog_is_drained_convicts_nobody() -> None:
    d = make(20)
    d.run(T0 + 30)
    t = d.now
    # SIGSTOP for 3 s: no tick, no heartbeat handled. On resume the late tick runs
    # first and reports its lateness; the queued heartbeats come after.
    resume = t + 3.0
    assert d.tick(resume, observer_lag=3.0 - TICK) == []
    for k in range(5):
        for n in d.nodes:
            d.beat(n, at=resume + 0.001 * k)
    d.next_hb = dict.fromkeys(d.nodes, resume + INTERVAL)
    d.next_tick = resume + TICK
    d.run(resume + 30)
    assert [e.kind for _, e in d.events] == ["member.alive"] * 20


def test_unreported_stall_would_convict_everyone() -> None:
    # The control for the test above: the same stall with the lag withheld.
    d = make(20)
    d.run(T0 + 30)
    evs = d.tick(d.now + 3.0, observer_lag=0.0)
    assert {e.kind for e in evs} == {"member.suspect", "member.dead"}


def test_backlog_burst_does_not_pollute_the_window() -> None:
    d = make(3)
    d.run(T0 + 60)
    before = [(m.detector.mean, m.detector.std_dev) for m in d.core._members.values()]
    t = d.now
    resume = t + 3.0
    # Drained first (at the instant of resume), then the late tick reports the stall.
    for k in range(12):
        for n in d.nodes:
            d.beat(n, at=resume + 0.0001 * k)
    d.tick(resume + 0.002, observer_lag=3.0)
    after = [(m.detector.mean, m.detector.std_dev) for m in d.core._members.values()]
    assert after == before
    assert d.core.stats()["gaps_dropped"] >= 3 * 11


def test_node_killed_before_a_stall_is_still_detected_after_it() -> None:
    report = run(
        Scenario(
            nodes=20,
            duration=60.0,
            kills=((4, 29.9), (5, 31.0)),
            observer=Observer(pauses=((30.0, 3.0),)),
            seed=2,
        )
    )
    assert report.false_suspects == [] and report.undetected == []
    # The stall delays detection by at most its own length plus the backlog grace.
    for node, t in report.detection.items():
        assert 0 < t <= 1.5 + 3.0 + 1.0, node


def _silent_node_detection(stall: float) -> float:
    """Seconds from n0 falling silent to its dead verdict, the observer stalling
    ``stall`` seconds (0: no stall) just after; the others' backlog drains on resume."""
    d = make(3)
    d.run(T0 + 30)
    silent_at = d.now
    if stall:
        start = silent_at + 0.05
        d.run(start, silent={"n0"})
        resume = start + stall
        d.tick(resume, observer_lag=stall)
        for n in ("n1", "n2"):
            d.beat(n, at=resume)
        d.next_hb = dict.fromkeys(d.nodes, resume + INTERVAL)
        d.next_tick = resume + TICK
        d.now = resume
    d.run(silent_at + stall + 30, silent={"n0"})
    return next(t for t, e in d.events if e.data["node"] == "n0" and e.kind == "member.dead") - silent_at


def test_time_the_observer_was_stalled_is_not_counted_as_silence() -> None:
    # n0 goes quiet 0.05 s before a 10 s stall. Judged on the time the observer was
    # awake to hear it, it is dead about as long after the stall as it would have been
    # without one; counted on the wall clock it would be dead the moment the backlog
    # grace ends, on silence nobody was listening to.
    normal = _silent_node_detection(0.0)
    stalled = _silent_node_detection(10.0) - 10.0
    assert normal - TICK <= stalled <= normal + 1.0 + TICK, (normal, stalled)


def test_a_node_never_heard_is_declared_dead_at_the_incarnation_its_beacons_announced() -> None:
    # Another membership instance may have judged the node at that incarnation before; a
    # verdict at 0 would be older than what consumers hold, and refused.
    core = Membership(MembershipConfig(first_heartbeat_timeout=5.0))
    core.admit("n0", T0, incarnation=7)
    core.admit("n0", T0 + 1, incarnation=3)  # a late, older beacon lowers nothing
    core.admit("n1", T0)
    events = core.tick(T0 + 10)
    dead = {e.data["node"]: e.data["incarnation"] for e in events if e.kind == "member.dead"}
    assert dead == {"n0": 7, "n1": 0}
    with pytest.raises(BadRequest):
        core.admit("n2", T0, incarnation=-1)


def test_small_loop_lag_is_not_a_stall() -> None:
    d = make(2)
    d.run(T0 + 10)
    t1 = d.now + TICK
    d.tick(t1, observer_lag=0.03)
    assert d.core.stats()["stalls"] == 0
    d.tick(t1 + TICK + 0.2, observer_lag=0.2)
    assert d.core.stats()["stalls"] == 1
    assert d.core.stats()["stalled_seconds"] == pytest.approx(0.2)


# -- incarnations, refutation, leave --------------------------------------------


def test_suspected_node_hears_it_and_refutes() -> None:
    d = make(2)
    d.run(T0 + 30)
    d.run(d.now + 1.15, silent={"n1"})
    assert d.core.member("n1", d.now)["state"] == SUSPECT
    res = d.beat("n1")
    assert res.accepted and res.suspected and res.refute
    assert res.state == ALIVE and [e.data["reason"] for e in res.events] == ["recovered"]
    # The agent bumps its incarnation: accepted quietly while alive.
    res = d.beat("n1", inc=2)
    assert res.accepted and not res.suspected and res.events == ()
    assert d.core.member("n1", d.now)["incarnation"] == 2


def test_suspect_refuted_by_a_higher_incarnation() -> None:
    d = make(1)
    d.run(T0 + 30)
    d.run(d.now + 1.15, silent={"n0"})
    d.inc["n0"] = 5
    d.seq["n0"] = 0
    res = d.beat("n0")
    assert [(e.kind, e.data["reason"], e.data["incarnation"]) for e in res.events] == [
        ("member.alive", "refuted", 5)
    ]


def test_dead_node_revives_only_with_a_higher_incarnation() -> None:
    d = make(1)
    d.run(T0 + 30)
    d.run(d.now + 3, silent={"n0"})
    assert d.core.member("n0", d.now)["state"] == DEAD
    late = d.beat("n0")  # same incarnation: a heartbeat from before the conviction
    assert not late.accepted and late.code == "declared_dead" and late.refute
    assert isinstance(late.error(), Conflict)
    assert d.core.member("n0", d.now)["state"] == DEAD
    stale = d.beat("n0", inc=0)
    assert stale.code == "stale_incarnation" and stale.incarnation == 1
    assert d.core.member("n0", d.now)["state"] == DEAD
    back = d.beat("n0", inc=2)
    assert back.accepted and back.state == ALIVE
    assert [(e.kind, e.data["reason"]) for e in back.events] == [("member.alive", "rejoined")]
    # A revived node starts a fresh detector and is judged normally again.
    d.inc["n0"] = 2
    d.run(d.now + 30)
    assert d.core.member("n0", d.now)["state"] == ALIVE


def test_stale_incarnation_is_refused_and_counted() -> None:
    d = make(1)
    d.beat("n0", inc=7)
    res = d.beat("n0", inc=3)
    assert not res.ok and res.code == "stale_incarnation"
    err = res.error()
    assert isinstance(err, Conflict) and err.details["incarnation"] == 7
    assert d.core.member("n0", d.now)["incarnation"] == 7
    assert d.core.stats()["stale_incarnation"] == 1


def test_leave_is_left_not_dead() -> None:
    d = make(2)
    d.run(T0 + 20)
    evs = d.core.leave("n0", 1, d.now)
    assert [(e.kind, e.data["reason"]) for e in evs] == [("member.left", "leave")]
    d.events.extend((d.now, e) for e in evs)
    d.run(d.now + 30, silent={"n0", "n1"})
    assert d.kinds("n0") == ["member.alive", "member.left"]
    assert d.kinds("n1") == ["member.alive", "member.suspect", "member.dead"]
    assert d.core.member("n0", d.now)["state"] == LEFT
    assert d.core.member("n0", d.now)["phi"] == 0.0
    # A heartbeat sent before the leave must not undo it...
    res = d.beat("n0")
    assert res.code == "has_left" and not res.accepted
    # ...but a restart with a higher incarnation rejoins.
    assert d.beat("n0", inc=2).state == ALIVE
    assert d.core.leave("n0", 2, d.now)[0].kind == "member.left"
    assert d.core.leave("n0", 2, d.now) == []  # idempotent


def test_stale_leave_does_not_remove_the_successor() -> None:
    d = make(1)
    d.beat("n0", inc=4)
    with pytest.raises(Conflict, match="older"):
        d.core.leave("n0", 3, d.now)
    assert d.core.member("n0", d.now)["state"] == ALIVE


def test_leave_of_an_unknown_node_is_not_found() -> None:
    d = make(1)
    with pytest.raises(NotFound):
        d.core.leave("ghost", 1, d.now)


# -- gating, duplicates, reading ------------------------------------------------


def test_unknown_node_is_refused_counted_and_never_a_member() -> None:
    d = make(1)
    for _ in range(3):
        res = d.core.heartbeat("stranger", 1, 1, {"cpu": 1.0}, d.now)
        assert not res.ok and res.code == "unknown_node" and res.state is None
    err = res.error()
    assert isinstance(err, NotFound) and "beacon" in err.message
    assert err.to_wire()["details"]["reason"] == "unknown_node"
    assert d.core.stats()["unknown_node"] == 3
    assert [m["id"] for m in d.core.members(d.now)] == []
    with pytest.raises(NotFound):
        d.core.member("stranger", d.now)
    d.core.admit("stranger", d.now)
    assert d.core.pending() == ["n0", "stranger"]
    res = d.core.heartbeat("stranger", 1, 1, None, d.now)
    assert res.ok and [e.data["reason"] for e in res.events] == ["joined"]
    assert d.core.pending() == ["n0"]


def test_duplicate_and_reordered_heartbeats_do_not_refresh_liveness() -> None:
    d = make(1)
    d.core.heartbeat("n0", 1, 10, None, T0)
    d.core.tick(T0 + 0.1)
    res = d.core.heartbeat("n0", 1, 9, None, T0 + 0.9)
    assert res.code == "duplicate" and not res.accepted and res.ok
    res = d.core.heartbeat("n0", 1, 10, None, T0 + 0.95)
    assert res.code == "duplicate"
    assert d.core.member("n0", T0 + 1.0)["last_heartbeat_age"] == pytest.approx(1.0)
    d.core.heartbeat("n0", 1, 14, None, T0 + 1.0)
    assert d.core.stats()["lost"] == 3
    assert d.core.member("n0", T0 + 1.0)["seq"] == 14


def test_member_document_has_every_field() -> None:
    d = make(1)
    d.beat("n0", load={"cpu": 12.5, "mem": 40.0})
    d.now += 0.25
    d.beat("n0", load={"cpu": 13.0, "mem": 41.0})
    doc = d.core.member("n0", d.now + 0.1)
    assert set(doc) >= {
        "id",
        "state",
        "incarnation",
        "phi",
        "last_heartbeat_age",
        "seq",
        "load",
        "since",
        "load_age",
        "load_stale",
    }
    assert doc["id"] == "n0" and doc["state"] == ALIVE and doc["incarnation"] == 1
    assert doc["seq"] == 2 and doc["load"] == {"cpu": 13.0, "mem": 41.0}
    assert doc["last_heartbeat_age"] == pytest.approx(0.1)
    assert doc["since"] == T0 and not doc["load_stale"]
    assert d.core.member("n0", d.now + 10)["load_stale"]


def test_load_digest_holds_only_changed_loads() -> None:
    d = make(3)
    for n in d.nodes:
        d.beat(n, load={"cpu": 1.0})
    assert d.core.load_digest(d.now) == {n: {"cpu": 1.0} for n in d.nodes}
    assert d.core.load_digest(d.now) == {}
    d.beat("n0", load={"cpu": 1.0})  # unchanged
    d.beat("n1", load={"cpu": 2.0})
    d.beat("n2")  # no load: keeps the old one
    [ev] = d.core.load_events(d.now)
    assert ev.kind == "member.load" and ev.data == {"loads": {"n1": {"cpu": 2.0}}}
    assert d.core.load_events(d.now) == []


def test_forget_emits_left_and_refuses_further_heartbeats() -> None:
    d = make(2)
    d.beat("n0")
    evs = d.core.forget("n0", d.now)
    assert [(e.kind, e.data["reason"]) for e in evs] == [("member.left", "removed")]
    assert d.beat("n0").code == "unknown_node"
    assert d.core.forget("n1", d.now) == []  # admitted, never heard: nothing to announce
    assert not d.core.is_admitted("n1")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.heartbeat("", 1, 1, None, T0), "node id"),
        (lambda c: c.heartbeat(7, 1, 1, None, T0), "node id"),
        (lambda c: c.heartbeat("n0", -1, 1, None, T0), "incarnation"),
        (lambda c: c.heartbeat("n0", True, 1, None, T0), "incarnation"),
        (lambda c: c.heartbeat("n0", 1, "1", None, T0), "seq"),
        (lambda c: c.heartbeat("n0", 2**64, 1, None, T0), "incarnation"),
        (lambda c: c.heartbeat("n0", 1, 1, [1, 2], T0), "load"),
        (lambda c: c.heartbeat("n0", 1, 1, None, float("nan")), "now"),
        (lambda c: c.tick(T0, float("inf")), "observer_lag"),
        (lambda c: c.admit("x" * 300, T0), "node id"),
    ],
)
def test_malformed_arguments_raise_bad_request(call: Any, match: str) -> None:
    core = Membership()
    core.admit("n0", T0)
    with pytest.raises(BadRequest, match=match):
        call(core)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("heartbeat_interval", 0.0),
        ("window_size", 1),
        ("window_size", 2.5),
        ("min_std_dev", -0.1),
        ("acceptable_pause", -1.0),
        ("suspect_phi", 0.0),
        ("dead_phi", 2.0),
        ("suspicion_timeout", 0.0),
        ("tick_interval", float("nan")),
        ("backlog_grace", -1.0),
        ("max_load_age", 0.0),
    ],
)
def test_config_validate_names_the_setting(field: str, value: Any) -> None:
    cfg = dataclasses.replace(MembershipConfig(), **{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        Membership(cfg)


def test_default_config_is_valid_and_meets_the_detection_budget() -> None:
    cfg = MembershipConfig()
    cfg.validate()
    from services.membership.detector import tail_phi_inverse

    dead_silence = (
        cfg.heartbeat_interval + cfg.acceptable_pause + tail_phi_inverse(cfg.dead_phi) * cfg.min_std_dev
    )
    assert dead_silence + cfg.tick_interval < 2.0


# -- events -----------------------------------------------------------------------


def test_returned_events_come_in_the_order_the_state_changed() -> None:
    d = Driver(Membership(), ["a", "b"])
    d.run(T0 + 10)
    d.run(T0 + 15, silent={"b"})
    seen = [(e.kind, e.data["node"]) for _, e in d.events]
    seen += [(e.kind, e.data["node"]) for e in d.core.leave("a", 1, d.now)]
    assert seen[:2] == [("member.alive", "a"), ("member.alive", "b")]
    assert seen[-3:] == [("member.suspect", "b"), ("member.dead", "b"), ("member.left", "a")]


def test_a_caller_may_act_on_a_verdict_at_once() -> None:
    core = Membership()
    core.admit("a", T0)
    core.heartbeat("a", 1, 1, None, T0)
    core.tick(T0 + 0.1)
    dead = [e for e in core.tick(T0 + 10) if e.kind == "member.dead"]
    assert [e.data["node"] for e in dead] == ["a"] and core.member("a", T0 + 10)["state"] == DEAD
    assert [(e.kind, e.data["reason"]) for e in core.forget("a", T0 + 10)] == [("member.left", "removed")]
    assert core.members(T0 + 10) == []


def test_simulation_is_deterministic() -> None:
    sc = Scenario(
        nodes=15,
        duration=40.0,
        jitter=Jitter.heavy(),
        kills=((3, 20.0),),
        seed=5,
        observer=Observer.gc_heavy(),
    )
    a, b = run(sc), run(sc)
    assert [(t, e) for t, e in a.events] == [(t, e) for t, e in b.events]
    assert a.detection == b.detection


def test_detection_after_kill_is_under_two_seconds_at_defaults() -> None:
    times, undetected, false_positives = detection_trials(12, nodes=10, kills_per_trial=2, warmup=20.0)
    assert undetected == 0 and false_positives == 0 and len(times) == 24
    assert max(times) < 2.0


def test_heavy_jitter_and_gc_pauses_give_no_false_positive() -> None:
    report = run(
        Scenario(
            nodes=40,
            duration=240.0,
            jitter=Jitter.heavy(),
            seed=21,
            observer=Observer(pauses=((100.0, 3.0),), gc_rate=0.2, gc_max=0.3),
        )
    )
    assert report.false_deads == [] and report.false_suspects == []
    assert report.stalls > 20


# -- properties -----------------------------------------------------------------

NODES = ("a", "b", "c")
op = st.one_of(
    st.tuples(
        st.just("hb"),
        st.sampled_from((*NODES, "stranger")),
        st.integers(0, 3),
        st.integers(-1, 3),
        st.floats(0.0, 2.0),
    ),
    # The node's own view: its current incarnation (dseq 0) or the next one
    # (dseq 1), as an agent that hears it is suspected or dead would send.
    st.tuples(st.just("agent"), st.sampled_from(NODES), st.just(0), st.integers(0, 1), st.floats(0.0, 2.0)),
    st.tuples(st.just("leave"), st.sampled_from(NODES), st.integers(0, 3), st.just(0), st.floats(0.0, 1.0)),
    st.tuples(st.just("tick"), st.just(""), st.just(0), st.just(0), st.floats(0.0, 3.0)),
    st.tuples(st.just("stall"), st.just(""), st.just(0), st.just(0), st.floats(0.0, 5.0)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=80))
def test_dead_or_left_never_comes_back_without_a_higher_incarnation(
    ops: list[tuple[str, str, int, int, float]],
) -> None:
    core = Membership()
    for n in NODES:
        core.admit(n, T0)
    now = T0
    seq: dict[tuple[str, int], int] = defaultdict(int)
    returned: list[Event] = []
    view: dict[str, tuple[str, int]] = {}
    for kind, node, inc, dseq, gap in ops:
        now += gap
        if kind == "hb":
            seq[node, inc] = max(0, seq[node, inc] + dseq)
            res = core.heartbeat(node, inc, seq[node, inc], None, now)
            returned.extend(res.events)
            if node == "stranger":
                assert res.code == "unknown_node"
        elif kind == "agent":
            known = view[node][1] if node in view else 1
            inc = known + dseq
            seq[node, inc] += 1
            returned.extend(core.heartbeat(node, inc, seq[node, inc], None, now).events)
        elif kind == "leave":
            with contextlib.suppress(Conflict):
                returned.extend(core.leave(node, inc, now))
        elif kind == "tick":
            returned.extend(core.tick(now))
        else:
            returned.extend(core.tick(now, observer_lag=gap))
        current = {m["id"]: (m["state"], m["incarnation"]) for m in core.members(now)}
        for n, (state, incarnation) in current.items():
            if n in view:
                old_state, old_inc = view[n]
                assert incarnation >= old_inc
                if old_state in (DEAD, LEFT) and state in (ALIVE, SUSPECT):
                    assert incarnation > old_inc, (n, view[n], current[n])
                    event(f"revived from {old_state}")
                elif old_state != state:
                    event(f"{old_state} -> {state}")
            assert state in STATES
        assert "stranger" not in current
        view = current
    # Every event chains from the state the previous one left.
    last: dict[str, str | None] = {}
    for e in returned:
        node = e.data["node"]
        assert e.data["previous"] == last.get(node)
        last[node] = e.kind.split(".")[1]


# -- interleaved callers ------------------------------------------------------------


def test_interleaved_heartbeats_ticks_reads_and_churn_keep_invariants() -> None:
    """Four heartbeaters, a ticker, a reader and an admin interleaved at random, one
    call at a time (the shell's loop interleaves its tasks the same way)."""
    core = Membership()
    fired: list[Event] = []
    clock = itertools.count()
    calls = {"hb": 0}
    stable = [f"s{i}" for i in range(40)]
    churn = [f"c{i}" for i in range(10)]
    for n in stable:
        core.admit(n, T0)

    def now() -> float:
        return T0 + next(clock) * 0.0005

    def heartbeater(nodes: list[str], seed: int) -> Iterator[None]:
        rng = random.Random(seed)
        inc = dict.fromkeys(nodes, 1)
        seqs = dict.fromkeys(nodes, 0)
        for k in range(20000):
            node = rng.choice(nodes)
            # One node at a time goes quiet for a while, so suspicions,
            # convictions and rejoins happen while the others run.
            if node == nodes[(k // 2000) % len(nodes)]:
                continue
            r = rng.random()
            if r < 0.01:
                inc[node] += 1
                seqs[node] = 0
            elif r < 0.015:
                with contextlib.suppress(Conflict, NotFound):
                    fired.extend(core.leave(node, inc[node], now()))
                yield
                continue
            seqs[node] += 1
            res = core.heartbeat(node, inc[node], seqs[node], {"cpu": rng.random()}, now())
            fired.extend(res.events)
            calls["hb"] += 1
            if res.refute:
                inc[node] = (res.incarnation or inc[node]) + 1
                seqs[node] = 0
            yield

    def ticker() -> Iterator[None]:
        rng = random.Random(99)
        for _ in range(10000):
            fired.extend(core.tick(now(), observer_lag=0.5 if rng.random() < 0.01 else 0.0))
            yield

    def reader() -> Iterator[None]:
        for _ in range(300):
            t = now()
            for m in core.members(t):
                assert m["state"] in STATES and m["incarnation"] >= 0 and m["phi"] >= 0
            counts = core.counts()
            assert sum(counts.values()) <= len(stable) + len(churn)
            core.load_digest(t)
            core.stats()
            yield

    def admin() -> Iterator[None]:
        rng = random.Random(5)
        for _ in range(3000):
            node = rng.choice(churn)
            if rng.random() < 0.5:
                core.admit(node, now())
            else:
                fired.extend(core.forget(node, now()))
            res = core.heartbeat(node, 1, rng.randint(0, 1000), None, now())
            fired.extend(res.events)
            assert res.code in (
                "ok",
                "duplicate",
                "unknown_node",
                "stale_incarnation",
                "declared_dead",
                "has_left",
            )
            calls["hb"] += 1
            yield

    callers = [heartbeater(stable[k::4], k) for k in range(4)] + [ticker(), reader(), admin()]
    schedule = random.Random(1)
    while callers:
        caller = schedule.choice(callers)
        try:
            next(caller)
        except StopIteration:
            callers.remove(caller)
    assert core.stats()["heartbeats"] == calls["hb"]
    members = core.members(now())
    assert sum(core.counts().values()) == len(members)
    # The returned events tell the state changes in the order they happened, per node.
    last: dict[str, str | None] = {}
    for e in fired:
        node = e.data["node"]
        if e.data["reason"] == "joined":
            # A fresh record: first heartbeat ever, or after forget() of a left node.
            assert e.data["previous"] is None
        else:
            assert e.data["previous"] == last.get(node), (node, e)
        last[node] = None if e.data["reason"] == "removed" else e.kind.split(".")[1]
    for m in members:
        assert last[m["id"]] == m["state"]
    assert {e.kind for e in fired} == {"member.alive", "member.suspect", "member.dead", "member.left"}
    assert "rejoined" in {e.data["reason"] for e in fired}


def test_load_digest_events_stay_under_the_message_limit() -> None:
    from phantom_bus import protocol
    from services.membership.core import LOAD_CHUNK

    load = {"cpu": 12.5, "mem": 40.0, "load1_per_core": 0.5, "disk_read_bps": 1.0e6, "net_rx_bps": 2.0e6}
    d = make(0)
    loads = {f"node-{i:05d}": dict(load) for i in range(25_000)}
    for node in loads:
        d.core.admit(node, d.now)
        d.core.heartbeat(node, 1, 1, load, d.now)
    events = d.core.load_events(d.now)
    assert len(events) == -(-25_000 // LOAD_CHUNK)
    assert sum(len(e.data["loads"]) for e in events) == 25_000
    assert {n for e in events for n in e.data["loads"]} == set(loads)
    largest = max(len(protocol.encode_event(e.kind, e.data, source="membership", ts=1e9)[2]) for e in events)
    assert largest < 1024 * 1024
    assert d.core.load_events(d.now) == []


# -- incarnations far ahead: refutation always wins -------------------------------------

WALL = 1_764_000_000_000  # membership's wall clock in ms, as the shell hands it in


def _agent_loop(core: Membership, node: str, inc: int, start: float, beats: int) -> tuple[int, list[str]]:
    """A well-behaved agent: heartbeats every INTERVAL, refutes as the real agent does,
    ticks between; returns its final incarnation and the codes it got."""
    from services.agent.incarnation import refutation

    codes = []
    seq = 1000
    for k in range(beats):
        t = start + k * INTERVAL
        seq += 1
        res = core.heartbeat(node, inc, seq, None, t, wall_ms=WALL + int((t - T0) * 1000))
        codes.append(res.code)
        nxt = refutation(inc, res.to_wire())
        if nxt is not None:
            inc, seq = nxt, 0
        core.tick(t + TICK)
    return inc, codes


def test_a_forged_higher_incarnation_is_passed_at_once_and_the_node_never_goes_down() -> None:
    core = Membership(MembershipConfig())
    core.admit("n0", T0)
    inc, _ = _agent_loop(core, "n0", WALL, T0, 20)
    # Ten million milliseconds ahead is more than the default lead allows; one million is not.
    forged = core.heartbeat("n0", WALL + 10**7, 1, None, T0 + 5.01, wall_ms=WALL + 5010)
    assert forged.code == "incarnation_ahead" and not forged.accepted
    assert core.stats()["incarnation_ahead"] == 1
    assert core.member("n0", T0 + 5.01)["incarnation"] == inc
    accepted = core.heartbeat("n0", WALL + 10**6, 1, None, T0 + 5.02, wall_ms=WALL + 5020)
    assert accepted.ok
    before = len(core.members(T0 + 5.1))
    inc, codes = _agent_loop(core, "n0", inc, T0 + 5.1, 40)
    # The very next ack said stale; the agent jumped past the forged number and was taken.
    assert codes[0] == "stale_incarnation" and set(codes[1:]) == {"ok"}
    assert inc == WALL + 10**6 + 1
    member = core.member("n0", T0 + 16)
    assert member["state"] == ALIVE and member["incarnation"] == inc and before == 1


def test_an_incarnation_at_the_int64_ceiling_is_refused_for_a_known_and_a_new_node() -> None:
    core = Membership(MembershipConfig())
    core.admit("n0", T0)
    core.admit("n1", T0)
    assert core.heartbeat("n0", WALL, 1, None, T0, wall_ms=WALL).ok
    for node in ("n0", "n1"):
        res = core.heartbeat(node, 2**63 - 1, 1, None, T0 + 0.1, wall_ms=WALL + 100)
        assert res.code == "incarnation_ahead" and not res.ok
        assert isinstance(res.error(), Conflict)
    assert core.stats()["incarnation_ahead"] == 2
    with pytest.raises(NotFound):
        core.member("n1", T0 + 0.2)  # the refused first heartbeat created no member
    # An unknown node is still told it is unknown, whatever its incarnation.
    assert core.heartbeat("stranger", 2**63 - 1, 1, None, T0, wall_ms=WALL).code == "unknown_node"


def test_small_counters_and_restarts_within_the_lead_are_accepted() -> None:
    core = Membership(MembershipConfig(incarnation_lead=60.0))
    core.admit("n0", T0)
    core.admit("n1", T0)
    # An agent in another language counting 1, 2, 3: far below the wall clock.
    assert core.heartbeat("n0", 1, 1, None, T0, wall_ms=WALL).ok
    assert core.heartbeat("n0", 2, 1, None, T0 + 0.1, wall_ms=WALL + 100).ok
    # A restart numbered on a clock 59 s fast is taken, 61 s fast is not.
    assert core.heartbeat("n1", WALL + 59_000, 1, None, T0, wall_ms=WALL).ok
    assert core.heartbeat("n1", WALL + 59_000 + 61_000 + 200, 1, None, T0 + 0.1, wall_ms=WALL + 100).code == (
        "incarnation_ahead"
    )
    # Without a wall clock the bound is relative to what membership holds.
    assert core.heartbeat("n0", 2 + 61_000, 2, None, T0 + 0.2).code == "incarnation_ahead"
    assert core.heartbeat("n0", 2 + 59_000, 2, None, T0 + 0.2).ok


def test_a_suspicion_does_not_outlive_a_refutation_from_a_higher_incarnation() -> None:
    d = make(2)
    d.run(T0 + 30)
    d.run(d.now + 1.15, silent={"n1"})
    assert d.core.member("n1", d.now)["state"] == SUSPECT
    d.inc["n1"], d.seq["n1"] = 5, 0
    d.run(d.now + 10)
    assert d.kinds("n1") == ["member.alive", "member.suspect", "member.alive"]
    # A late heartbeat of the old incarnation is refused and changes nothing, now or later.
    late = d.core.heartbeat("n1", 1, 10**6, None, d.now)
    assert late.code == "stale_incarnation" and late.incarnation == 5
    d.run(d.now + 10)
    assert d.kinds("n1")[-1] == "member.alive" and d.core.member("n1", d.now)["state"] == ALIVE
