"""Control-plane reasons in status: a store that cannot commit, a service restarting,
a decision queue that is stuck; and how they colour the document."""

from __future__ import annotations

from typing import Any

import pytest

from services.manager.control import (
    QUEUE_STUCK,
    SERVICE_RESTARTING,
    STORE_FAILING,
    ControlConfig,
    ControlWatch,
    apply_reasons,
    worst,
)


def services(**pids: list[int]) -> dict[str, Any]:
    return {name: {"workers": len(p), "instances": [{"pid": x} for x in p]} for name, p in pids.items()}


def codes(watch: ControlWatch, now: float) -> list[str]:
    return [r["code"] for r in watch.reasons(now)]


def test_nothing_wrong_gives_no_reasons_and_leaves_green_alone() -> None:
    watch = ControlWatch()
    watch.observe_services(services(sharding=[10], balancer=[11]), 0.0)
    watch.observe_store({"total": 64, "store": {"ok": True, "error": None, "failing_for": None}})
    assert watch.reasons(1.0) == []
    doc = {"health": "green", "reason": None}
    apply_reasons(doc, watch.reasons(1.0), watch.queue_ages(1.0))
    assert doc == {"health": "green", "reason": None, "reasons": [], "queues": {}}


def test_a_store_that_cannot_commit_is_red_with_its_error() -> None:
    watch = ControlWatch()
    watch.observe_store({"store": {"ok": False, "error": "database or disk is full", "failing_for": 12.5}})
    [reason] = watch.reasons(0.0)
    assert reason["code"] == STORE_FAILING and reason["severity"] == "red" and reason["service"] == "sharding"
    assert "disk is full" in reason["message"] and "12 s" in reason["message"] and reason["failing_for"] == 12.5
    doc = {"health": "green", "reason": None}
    apply_reasons(doc, watch.reasons(0.0))
    assert doc["health"] == "red" and "cannot commit" in doc["reason"]


@pytest.mark.parametrize("health", [{}, {"store": None}, {"store": "garbage"}, None, [1, 2]])
def test_a_store_part_that_is_absent_or_malformed_is_unknown_not_failing(health: Any) -> None:
    watch = ControlWatch()
    watch.observe_store({"store": {"ok": False, "error": "x", "failing_for": 1}})
    watch.observe_store(health)
    assert watch.reasons(0.0) == []


def test_sharding_not_answering_forgets_the_store_verdict() -> None:
    watch = ControlWatch()
    watch.observe_store({"store": {"ok": False, "error": "read-only", "failing_for": None}})
    assert codes(watch, 0.0) == [STORE_FAILING]
    watch.forget_store()
    assert watch.reasons(0.0) == []


def test_a_service_whose_worker_pid_keeps_changing_is_restarting() -> None:
    watch = ControlWatch(ControlConfig(restart_window=300.0, restart_count=2))
    watch.observe_services(services(sharding=[100], balancer=[200]), 0.0)  # first look: no restart
    watch.observe_services(services(sharding=[100], balancer=[200]), 2.0)
    assert watch.reasons(2.0) == []
    watch.observe_services(services(sharding=[101], balancer=[200]), 10.0)  # one restart: not yet
    assert watch.reasons(10.0) == []
    watch.observe_services(services(sharding=[], balancer=[200]), 12.0)  # down between restarts
    watch.observe_services(services(sharding=[102], balancer=[200]), 14.0)
    [reason] = watch.reasons(14.0)
    assert reason["code"] == SERVICE_RESTARTING and reason["service"] == "sharding" and reason["restarts"] == 2
    assert reason["severity"] == "yellow"
    # A worker that re-registers with the same pid (the broker dropped it) is no restart,
    # and the restarts age out of the window.
    watch.observe_services(services(sharding=[102], balancer=[200]), 20.0)
    assert watch.reasons(20.0)[0]["restarts"] == 2
    assert watch.reasons(311.0) == []


def test_a_queue_whose_oldest_action_waits_too_long_is_stuck() -> None:
    watch = ControlWatch(ControlConfig(queue_stuck_after=30.0))
    watch.queued("sharding", "sharding.node_dead", 0.0)
    watch.queued("sharding", "sharding.node_alive", 5.0)
    watch.queued("balancer", "balancer.node_update", 20.0)
    assert watch.reasons(29.0) == []
    [reason] = watch.reasons(31.0)
    assert reason["code"] == QUEUE_STUCK and reason["service"] == "sharding"
    assert reason["pending"] == 2 and reason["age"] == 31.0 and "node_dead" in reason["message"]
    assert watch.queue_ages(31.0)["balancer"] == {"pending": 1, "age": 11.0, "action": "balancer.node_update"}
    watch.finished("sharding")  # node_dead done: the next is 26 s old
    assert watch.reasons(31.0) == []
    watch.finished("sharding")
    watch.finished("sharding")  # more finishes than actions: harmless
    assert "sharding" not in watch.queue_ages(31.0)


def test_the_worst_colour_wins_and_red_reasons_come_first() -> None:
    watch = ControlWatch(ControlConfig(queue_stuck_after=1.0))
    watch.queued("sharding", "sharding.node_dead", 0.0)
    watch.observe_store({"store": {"ok": False, "error": "disk I/O error", "failing_for": 3.0}})
    assert codes(watch, 5.0) == [STORE_FAILING, QUEUE_STUCK]
    doc = {"health": "yellow", "reason": "1 shard under-replicated"}
    apply_reasons(doc, watch.reasons(5.0))
    assert doc["health"] == "red" and doc["reason"].startswith("sharding cannot commit")
    red = {"health": "red", "reason": "shard default/3 has no live primary"}
    apply_reasons(red, watch.reasons(5.0))
    assert red["health"] == "red" and red["reason"] == "shard default/3 has no live primary"
    assert worst(["green", "yellow"]) == "yellow" and worst(["green", "bogus"]) == "green"


def test_bad_thresholds_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="restart_window"):
        ControlWatch(ControlConfig(restart_window=0))
    with pytest.raises(ValueError, match="restart_count"):
        ControlWatch(ControlConfig(restart_count=0))
    with pytest.raises(ValueError, match="queue_stuck_after"):
        ControlWatch(ControlConfig(queue_stuck_after=float("nan")))


def named(**workers: list[tuple[str | None, int]]) -> dict[str, Any]:
    """A services table whose workers have instance names (None: the HOST:PID default)."""
    return {
        name: {"workers": len(w), "instances": [{"pid": pid, "host": "box", "instance": inst or f"box:{pid}"}
                                                for inst, pid in w]}
        for name, w in workers.items()
    }  # fmt: skip


def test_more_instances_registering_is_no_restart_but_one_instance_with_new_pids_is() -> None:
    watch = ControlWatch(ControlConfig(restart_window=300.0, restart_count=2))
    watch.observe_services(named(manager=[("h1", 10)]), 0.0)
    watch.observe_services(named(manager=[("h1", 10), ("h2", 20)]), 1.0)  # a second host came up
    watch.observe_services(named(manager=[("h1", 10), ("h2", 20), ("h3", 30)]), 2.0)
    assert codes(watch, 2.0) == []
    watch.observe_services(named(manager=[("h1", 10), ("h2", 21), ("h3", 30)]), 3.0)
    watch.observe_services(named(manager=[("h1", 10), ("h2", 22), ("h3", 30)]), 4.0)
    reason = watch.reasons(4.0)[0]
    assert reason["code"] == SERVICE_RESTARTING and reason["service"] == "manager" and reason["restarts"] == 2


def test_default_instance_names_change_with_the_pid_so_the_host_tells_a_restart() -> None:
    watch = ControlWatch(ControlConfig(restart_window=300.0, restart_count=2))
    watch.observe_services(named(sharding=[(None, 100)]), 0.0)
    watch.observe_services(named(sharding=[(None, 101)]), 1.0)
    watch.observe_services(named(sharding=[(None, 102)]), 2.0)
    assert codes(watch, 2.0) == [SERVICE_RESTARTING]
