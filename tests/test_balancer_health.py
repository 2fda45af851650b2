"""Outlier ejection with backoff and a cap, panic mode with ejected nodes, slow start."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from phantom_bus.routing.health import (
    DOUBTFUL,
    HEALTHY,
    NO_READS,
    OUT,
    base_class,
    ejection_cap,
    ejection_duration,
)
from services.balancer import Balancer, BalancerConfig, Candidate

T0 = 1000.0
NAMES = [f"n{i:02d}" for i in range(20)]


def cluster(count: int = 10, **config: Any) -> Balancer:
    bal = Balancer(BalancerConfig(**config), random.Random(3))
    for n in NAMES[:count]:
        bal.node_update(n, state="alive", lifecycle="active", now=0.0)
    return bal


def fail(bal: Balancer, node: str, times: int, now: float) -> list[str]:
    """Fail ``times`` requests on ``node``; return the kinds of the events released."""
    kinds = []
    for _ in range(times):
        sel = bal.select(f"only-{node}", [Candidate(node, "primary")], write=True, now=now)
        kinds += [e.kind for e in bal.release(sel.lease or "", 100.0, False, now=now)]
    return kinds


def succeed(bal: Balancer, node: str, now: float) -> None:
    sel = bal.select(f"only-{node}", [Candidate(node, "primary")], write=True, now=now)
    bal.release(sel.lease or "", 1.0, True, now=now)


def node(bal: Balancer, name: str, now: float) -> dict[str, Any]:
    return dict(bal.stats(now)["nodes"][name])


def reads(bal: Balancer, names: list[str], count: int, now: float) -> Counter[str]:
    cands = [Candidate(n, "primary" if i == 0 else "replica") for i, n in enumerate(names)]
    return Counter(bal.select("s", cands, lease=False, now=now).node for _ in range(count))


# --- classification ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, lifecycle, expected",
    [
        ("alive", "active", HEALTHY),
        ("alive", None, HEALTHY),
        ("suspect", "active", DOUBTFUL),
        (None, None, DOUBTFUL),
        ("alive", "draining", DOUBTFUL),
        ("dead", "active", OUT),
        ("left", None, OUT),
        ("alive", "decommissioned", OUT),
        ("alive", "joining", NO_READS),
        ("dead", "joining", OUT),
    ],
)
def test_base_class(state: str | None, lifecycle: str | None, expected: int) -> None:
    assert base_class(state, lifecycle) == expected


# --- ejection ------------------------------------------------------------------------------


def test_five_consecutive_failures_eject_a_node() -> None:
    bal = cluster()
    assert fail(bal, "n00", 4, T0) == []
    assert not node(bal, "n00", T0)["ejected"]
    assert fail(bal, "n00", 1, T0) == ["balancer.ejected"]
    info = node(bal, "n00", T0)
    assert info["ejected"] and info["ejections"] == 1 and info["ejected_for_s"] == 30.0


def test_ejected_event_says_which_node_and_why() -> None:
    bal = cluster()
    fail(bal, "n00", 4, T0)
    sel = bal.select("x", [Candidate("n00", "primary")], write=True, now=T0)
    (event,) = bal.release(sel.lease or "", 9.0, False, now=T0)
    assert event.kind == "balancer.ejected"
    assert event.data == {
        "node": "n00",
        "reason": "5 consecutive failures",
        "duration_s": 30.0,
        "ejections": 1,
    }


def test_a_success_resets_the_failure_streak() -> None:
    bal = cluster()
    fail(bal, "n00", 4, T0)
    succeed(bal, "n00", T0)
    assert fail(bal, "n00", 4, T0) == []
    assert node(bal, "n00", T0)["consecutive_failures"] == 4


def test_ejected_node_gets_no_reads_while_others_are_healthy() -> None:
    bal = cluster(4)
    fail(bal, "n01", 5, T0)
    got = reads(bal, NAMES[:4], 300, T0 + 1)
    assert "n01" not in got and len(got) == 3


def test_ejected_node_is_restored_after_the_base_time() -> None:
    bal = cluster()
    fail(bal, "n00", 5, T0)
    assert bal.tick(T0 + 29.9) == []
    events = bal.tick(T0 + 30.0)
    assert [(e.kind, e.data["node"], e.data["reason"]) for e in events] == [
        ("balancer.restored", "n00", "ejection time elapsed")
    ]
    assert not node(bal, "n00", T0 + 30)["ejected"]
    assert bal.stats(T0 + 30)["totals"]["restores"] == 1


def test_ejection_time_doubles_with_each_ejection_up_to_the_cap() -> None:
    bal = cluster(eject_base_s=10.0, eject_max_s=50.0, eject_backoff_reset_s=1000.0)
    now = T0
    lengths = []
    for _ in range(5):
        fail(bal, "n00", 5, now)
        lengths.append(node(bal, "n00", now)["ejected_for_s"])
        now += lengths[-1]
        bal.tick(now)
    assert lengths == [10.0, 20.0, 40.0, 50.0, 50.0]


def test_backoff_is_forgiven_after_quiet_periods() -> None:
    bal = cluster(eject_base_s=10.0, eject_max_s=300.0, eject_backoff_reset_s=60.0)
    fail(bal, "n00", 5, T0)  # 10 s, level 1
    fail(bal, "n00", 5, T0 + 10)  # 20 s, level 2
    fail(bal, "n00", 5, T0 + 30)  # 40 s, level 3
    # ejection ended at T0 + 70; 130 s of quiet forgive two levels: back to 20 s
    fail(bal, "n00", 5, T0 + 200)
    assert node(bal, "n00", T0 + 200)["ejected_for_s"] == 20.0


def test_no_more_than_ten_percent_of_nodes_are_ejected() -> None:
    bal = cluster(20)
    assert fail(bal, "n00", 5, T0) == ["balancer.ejected"]
    assert fail(bal, "n01", 5, T0) == ["balancer.ejected"]
    assert fail(bal, "n02", 5, T0) == []  # 2 of 20 already out
    stats = bal.stats(T0)
    assert stats["totals"]["ejected"] == 2 and stats["totals"]["ejections_refused"] == 1
    assert not stats["nodes"]["n02"]["ejected"]
    # once a slot frees up, the next failure of the still-failing node ejects it
    bal.tick(T0 + 30)
    assert fail(bal, "n02", 1, T0 + 30) == ["balancer.ejected"]


def test_at_least_one_node_can_be_ejected_in_a_small_cluster() -> None:
    bal = cluster(3)
    assert fail(bal, "n00", 5, T0) == ["balancer.ejected"]
    assert fail(bal, "n01", 5, T0) == []


def test_ejection_cap_and_duration_helpers() -> None:
    config = BalancerConfig()
    assert [ejection_cap(n, config) for n in (0, 3, 10, 19, 20, 30)] == [1, 1, 1, 1, 2, 3]
    assert ejection_duration(0, config) == 30.0
    assert ejection_duration(1, config) == 60.0
    assert ejection_duration(10_000, config) == 300.0


def test_dead_nodes_are_not_ejected() -> None:
    bal = cluster()
    sels = [bal.select("x", [Candidate("n00", "primary")], write=True, now=T0) for _ in range(5)]
    bal.node_update("n00", state="dead", now=T0)
    events = [e for s in sels for e in bal.release(s.lease or "", 1.0, False, now=T0)]
    assert events == []


# --- panic -------------------------------------------------------------------------------------


def test_ejected_nodes_serve_in_panic_mode() -> None:
    bal = cluster(10, eject_max_fraction=0.5)
    names = NAMES[:3]
    fail(bal, "n00", 5, T0)
    fail(bal, "n01", 5, T0)
    got = reads(bal, names, 600, T0 + 1)  # 1 of 3 healthy: below 50%
    assert set(got) == set(names)
    assert bal.stats(T0 + 1)["totals"]["panics"] == 600


# --- slow start --------------------------------------------------------------------------------


def test_slow_start_ramps_a_returning_node_up_over_the_window() -> None:
    bal = cluster(2, default_strategy="random", slow_start_s=30.0, slow_start_floor=0.1)
    bal.node_update("n01", state="dead", now=T0)
    bal.node_update("n01", state="alive", now=T0)
    shares = []
    for t in (0.0, 7.5, 15.0, 30.0):
        got = reads(bal, NAMES[:2], 4000, T0 + t)
        shares.append(got["n01"] / 4000)
    # weighted random: weight ramp 0.1, 0.25, 0.5, 1 against 1 -> shares 9%, 20%, 33%, 50%
    expected = [0.1 / 1.1, 0.25 / 1.25, 0.5 / 1.5, 0.5]
    for got_share, want in zip(shares, expected, strict=True):
        assert got_share == pytest.approx(want, abs=0.03)
    assert node(bal, "n01", T0 + 15)["slow_start"] == pytest.approx(0.5)


def reads_with(bal: Balancer, names: list[str], count: int, now: float, strategy: str) -> Counter[str]:
    cands = [Candidate(n) for n in names]
    return Counter(bal.select("s", cands, strategy=strategy, lease=False, now=now).node for _ in range(count))


@pytest.mark.parametrize("strategy", ["weighted", "random"])
def test_slow_start_applies_to_weight_based_strategies(strategy: str) -> None:
    bal = cluster(2, default_strategy=strategy, slow_start_s=10.0)
    bal.node_update("n01", state="suspect", now=T0)
    bal.node_update("n01", state="alive", now=T0)
    early = reads_with(bal, NAMES[:2], 1000, T0 + 2.0, strategy)["n01"]
    late = reads_with(bal, NAMES[:2], 1000, T0 + 10.0, strategy)["n01"]
    assert early < 250 and 430 < late < 570


def test_restored_node_ramps_up_from_the_end_of_its_ejection() -> None:
    bal = cluster(2, eject_base_s=10.0, slow_start_s=20.0, slow_start_floor=0.1)
    fail(bal, "n01", 5, T0)
    assert node(bal, "n01", T0 + 10)["slow_start"] == pytest.approx(0.1)
    assert node(bal, "n01", T0 + 20)["slow_start"] == pytest.approx(0.5)
    assert node(bal, "n01", T0 + 30)["slow_start"] == 1.0


def test_membership_updates_that_keep_a_node_alive_do_not_restart_its_ramp() -> None:
    bal = cluster(1, slow_start_s=10.0)
    bal.node_update("n00", state="alive", weight=2.0, load={"cpu": 1, "mem": 1}, now=T0)
    assert node(bal, "n00", T0)["slow_start"] == 1.0
