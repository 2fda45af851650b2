"""The broker's routing core, driven with virtual time and no sockets."""

from __future__ import annotations

from collections import Counter

import pytest

from phantom_bus.dispatch import Dispatcher, ToClient, ToWorker
from phantom_bus.errors import Overloaded, ServiceUnavailable, Timeout


def make(liveness: float = 1.5, queue_limit: int = 3, queue_timeout: float = 5.0) -> Dispatcher:
    return Dispatcher(liveness=liveness, queue_limit=queue_limit, queue_timeout=queue_timeout)


def req(d: Dispatcher, n: int, service: str = "svc", now: float = 0.0):
    return d.request(service, b"\x00client", str(n).encode(), b"body", now)


def test_request_without_worker_is_answered_service_unavailable_at_once() -> None:
    d = make()
    action = req(d, 1)
    assert isinstance(action, ToClient)
    assert isinstance(action.error, ServiceUnavailable)
    assert action.error.details["reason"] == "no_worker"


def test_two_workers_share_requests_by_least_in_flight() -> None:
    d = make()
    d.ready(b"a", "svc", 10, {}, 0.0)
    d.ready(b"b", "svc", 10, {}, 0.0)
    picks = Counter(req(d, i).identity for i in range(10))  # type: ignore[union-attr]
    assert picks == {b"a": 5, b"b": 5}


def test_a_busy_worker_gets_fewer_requests() -> None:
    d = make()
    d.ready(b"a", "svc", 100, {}, 0.0)
    d.ready(b"b", "svc", 100, {}, 0.0)
    held = [req(d, i) for i in range(4)]
    # b answers everything at once, a answers nothing: new work goes to b.
    for action in held:
        assert isinstance(action, ToWorker)
        if action.identity == b"b":
            d.replied(b"b", action.route, action.reqid, 0.1)
    later = Counter(req(d, 100 + i).identity for i in range(2))  # type: ignore[union-attr]
    assert later == {b"b": 2}


def test_requests_beyond_capacity_queue_then_flow_on_reply() -> None:
    d = make()
    d.ready(b"a", "svc", 1, {}, 0.0)
    first = req(d, 1)
    assert isinstance(first, ToWorker)
    assert req(d, 2) is None  # queued
    actions = d.replied(b"a", first.route, first.reqid, 0.2)
    assert [a.reqid for a in actions] == [b"2"]


def test_full_queue_answers_overloaded() -> None:
    d = make(queue_limit=2)
    d.ready(b"a", "svc", 1, {}, 0.0)
    req(d, 0)
    assert req(d, 1) is None and req(d, 2) is None
    action = req(d, 3)
    assert isinstance(action, ToClient) and isinstance(action.error, Overloaded)


def test_silent_worker_is_dropped_and_its_clients_told() -> None:
    d = make(liveness=1.5)
    d.ready(b"a", "svc", 5, {}, 0.0)
    d.ready(b"b", "svc", 5, {}, 0.0)
    sent = [req(d, i) for i in range(4)]
    d.heard(b"b", 1.0)
    dropped, actions = d.expire(1.6)
    assert [w.identity for w in dropped] == [b"a"]
    lost = {a.reqid for a in actions if isinstance(a, ToClient)}
    assert lost == {a.reqid for a in sent if isinstance(a, ToWorker) and a.identity == b"a"}
    assert all(a.error.details["reason"] == "worker_lost" for a in actions if isinstance(a, ToClient))
    # The survivor takes the next request.
    assert req(d, 9, now=1.7).identity == b"b"  # type: ignore[union-attr]


def test_heard_keeps_a_worker_alive() -> None:
    d = make(liveness=1.5)
    d.ready(b"a", "svc", 5, {}, 0.0)
    for t in (1.0, 2.0, 3.0):
        d.heard(b"a", t)
        assert d.expire(t + 0.1)[0] == []
    assert d.heard(b"ghost", 3.0) is False


def test_queued_requests_time_out_and_are_flushed_when_last_worker_dies() -> None:
    d = make(queue_timeout=2.0, liveness=10.0)
    d.ready(b"a", "svc", 1, {}, 0.0)
    req(d, 0)
    assert req(d, 1, now=0.5) is None
    _, actions = d.expire(2.6)
    assert [(a.reqid, type(a.error)) for a in actions] == [(b"1", Timeout)]  # type: ignore[union-attr]
    assert req(d, 2, now=3.0) is None
    d.remove(b"a")
    _, actions = d.expire(3.1)
    assert [a.reqid for a in actions] == [b"2"]


def test_goodbye_does_not_fail_requests_in_flight() -> None:
    d = make()
    d.ready(b"a", "svc", 5, {}, 0.0)
    req(d, 1)
    assert d.remove(b"a") is True
    assert d.remove(b"a") is False
    assert d.expire(100.0) == ([], [])


def test_re_registration_on_same_identity_resets_the_worker() -> None:
    d = make()
    d.ready(b"a", "svc", 5, {}, 0.0)
    req(d, 1)
    actions = d.ready(b"a", "svc", 5, {}, 1.0)
    assert [a.reqid for a in actions if isinstance(a, ToClient)] == [b"1"]
    assert d.services(1.0)["svc"]["workers"] == 1


@pytest.mark.parametrize("capacity", [0, -3])
def test_capacity_is_at_least_one(capacity: int) -> None:
    d = make()
    d.ready(b"a", "svc", capacity, {}, 0.0)
    assert isinstance(req(d, 1), ToWorker)


def test_a_name_never_registered_is_unknown_once_the_grace_is_over() -> None:
    d = Dispatcher(liveness=1.5, queue_limit=3, queue_timeout=5.0, unknown_after=10.0)
    early = d.request("sharing", b"r", b"1", b"", 9.0)
    late = d.request("sharing", b"r", b"2", b"", 10.0)
    assert isinstance(early, ToClient) and early.error.code == "service_unavailable" and early.error.retry
    assert isinstance(late, ToClient) and late.error.code == "unknown_service" and not late.error.retry


def test_standard_and_once_registered_services_stay_unavailable_not_unknown() -> None:
    d = Dispatcher(liveness=1.5, queue_limit=3, queue_timeout=5.0, unknown_after=0.0)
    d.ready(b"w", "echo", 1, {}, 0.0)
    d.remove(b"w")
    for service in ("echo", "balancer"):
        action = d.request(service, b"r", b"1", b"", 100.0)
        assert isinstance(action, ToClient) and action.error.code == "service_unavailable"


def test_a_service_with_a_leader_sends_its_requests_to_the_leader_while_it_has_room() -> None:
    d = make()
    d.ready(b"follower", "svc", 2, {}, 0.0)
    d.ready(b"leader", "svc", 2, {}, 0.0)
    d.heard(b"follower", 0.1, leader=False)
    d.heard(b"leader", 0.1, leader=True)
    # The leader is busier, yet it gets the requests: a follower would answer not_leader.
    picks = [req(d, i).identity for i in range(3)]  # type: ignore[union-attr]
    assert picks == [b"leader", b"leader", b"follower"]  # the third: the leader is full
    # Leadership moves: the next heartbeat of each says so.
    d.heard(b"leader", 0.2, leader=False)
    d.heard(b"follower", 0.2, leader=True)
    assert req(d, 10).identity == b"follower"  # type: ignore[union-attr]
    # A heartbeat without the hint changes nothing.
    d.heard(b"follower", 0.3)
    assert d.workers()[0].leader is True
