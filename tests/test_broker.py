"""The broker with real processes: routing, load sharing, failures, restarts, events."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest
import zmq

from phantom_bus import protocol
from phantom_bus.errors import BadRequest, ServiceUnavailable, UnknownOperation
from tests.conftest import Bus, wait_until

pytestmark = pytest.mark.processes


def raw_request(bus: Bus, frames: list[bytes], kind: int = zmq.REQ) -> list[bytes]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(bus.endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(5000), "the broker did not answer"
        return sock.recv_multipart()
    finally:
        sock.close()


def test_requests_reach_the_service_and_come_back(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    with bus.client() as c:
        assert c.request("echo", "echo", text="hello", n=[1, 2]) == {"text": "hello", "n": [1, 2]}
        with pytest.raises(UnknownOperation):
            c.request("echo", "no_such_op")
        with pytest.raises(BadRequest, match="has no argument 'nonsense'"):
            c.request("echo", "sleep", nonsense=1)


def test_service_without_worker_gets_an_immediate_error(bus: Bus) -> None:
    bus.broker()
    bus.wait_workers("echo", 0)
    with bus.client(retries=1, timeout=5.0) as c:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="no live worker"):
            c.request("nobody", "anything")
        assert time.monotonic() - start < 2.0  # an answer, not a wait for the 5 s timeout


def test_two_workers_share_the_load(bus: Bus) -> None:
    bus.broker()
    a, b = bus.echo(), bus.echo()
    bus.wait_workers("echo", 2)
    with bus.client() as c:
        pids = Counter(c.request("echo", "whoami") for _ in range(200))
    assert set(pids) == {a.pid, b.pid}
    assert min(pids.values()) >= 60


def test_slow_requests_run_concurrently_across_and_within_workers(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with bus.client(timeout=5.0) as c:
                c.request("echo", "sleep", seconds=0.5)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert time.monotonic() - start < 3.0  # 8 x 0.5 s serially would be 4 s


def test_killed_worker_is_dropped_and_requests_go_to_the_survivor(bus: Bus) -> None:
    bus.broker()
    victim, survivor = bus.echo(), bus.echo()
    bus.wait_workers("echo", 2)
    with bus.client(timeout=3.0, retries=3) as c:
        c.request("echo", "whoami")
        bus.kill(victim, signal.SIGKILL)
        # Every request succeeds: those that hit the dead worker are retried.
        pids = [c.request("echo", "whoami") for _ in range(30)]
        assert pids[-10:] == [survivor.pid] * 10
    bus.wait_workers("echo", 1)


def test_request_in_flight_on_a_dying_worker_is_answered_not_left_hanging(bus: Bus) -> None:
    bus.broker()
    victim = bus.echo()
    bus.wait_workers("echo")
    with bus.client(timeout=10.0, retries=1) as c:
        threading.Timer(0.3, bus.kill, (victim, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="stopped answering"):
            c.request("echo", "sleep", seconds=5)
        assert time.monotonic() - start < 6.0  # told by the broker, not by the 10 s timeout


def test_broker_restart_is_survived_by_workers_and_clients(bus: Bus) -> None:
    broker = bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    with bus.client(timeout=1.0, retries=6) as c:
        assert c.request("echo", "echo", n=1) == {"n": 1}
        bus.kill(broker, signal.SIGKILL)
        bus.broker()
        # The client retries through the gap; the worker re-registers by itself.
        assert c.request("echo", "echo", n=2) == {"n": 2}
    bus.wait_workers("echo", 1)


def test_events_reach_subscribers_through_the_relay(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    sub = bus.subscriber(b"test.")
    try:
        with bus.client() as c:
            # PUB/SUB joins take a moment; publish until one arrives.
            def received() -> dict | None:
                c.request("echo", "publish", kind="test.hello", data={"x": 1})
                if sub.poll(200):
                    return protocol.decode_event(sub.recv_multipart())
                return None

            event = wait_until(received, timeout=10)
            c.request("echo", "publish", kind="other.thing", data={})
        assert event["kind"] == "test.hello" and event["x"] == 1 and event["service"] == "echo"
        # Not subscribed: never delivered.
        while sub.poll(300):
            assert protocol.decode_event(sub.recv_multipart())["kind"].startswith("test.")
    finally:
        sub.close()


def test_service_event_subscription_dispatches_callbacks(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    # The listener registers a raising callback before the recording one.
    bus.start("services.echo", "--name", "listener", "--subscribe", "test.", name="listener")
    bus.wait_workers("echo")
    bus.wait_workers("listener")
    with bus.client() as c:

        def delivered() -> list:
            c.request("echo", "publish", kind="test.tick", data={"n": 7})
            c.request("echo", "publish", kind="ignored.tick", data={"n": 8})
            return c.request("listener", "events")

        got = wait_until(delivered, timeout=10, interval=0.2)
    assert got[0]["kind"] == "test.tick" and got[0]["n"] == 7
    assert all(e["kind"] == "test.tick" for e in got)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"garbage"], "bad_request"),
        ([protocol.CLIENT, b"echo", b"id"], "bad_request"),
        ([protocol.CLIENT, b"echo", b"id", b"body", b"extra"], "bad_request"),
        ([b"PHC7", b"echo", b"id", protocol.encode_request("echo")], "unsupported_version"),
        ([protocol.CLIENT, b"", b"id", protocol.encode_request("echo")], "bad_request"),
        ([protocol.CLIENT, b"echo", b"i" * 100, protocol.encode_request("echo")], "bad_request"),
        ([protocol.CLIENT, b"echo", b"id", b"\xc1\xc1"], "bad_request"),
        ([protocol.CLIENT, b"echo", b"id", protocol.pack(["not", "a", "map"])], "bad_request"),
        ([protocol.CLIENT, b"echo", b"id", protocol.encode_request("nope")], "unknown_operation"),
        ([protocol.CLIENT, b"broker", b"id", protocol.encode_request("nope")], "unknown_operation"),
    ],
)
def test_bad_requests_get_error_replies_and_break_nothing(bus: Bus, frames: list[bytes], code: str) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    reply = raw_request(bus, frames)
    ok, error = protocol.decode_reply(reply[-1])
    assert ok is False and error["code"] == code
    with bus.client() as c:
        assert c.request("echo", "echo", still="alive") == {"still": "alive"}


def test_oversize_request_is_refused_by_the_broker(bus: Bus) -> None:
    bus.start("phantom_bus.broker", "--max-message", "1000")
    bus.echo()
    bus.wait_workers("echo")
    reply = raw_request(
        bus, [protocol.CLIENT, b"echo", b"id", protocol.encode_request("echo", {"x": "a" * 2000})]
    )
    assert protocol.decode_reply(reply[-1])[1]["code"] == "too_large"


def test_dealer_clients_with_and_without_delimiter_are_both_answered(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    body = protocol.encode_request("echo", {"a": 1})
    bare = raw_request(bus, [protocol.CLIENT, b"echo", b"r1", body], zmq.DEALER)
    assert bare[0] == protocol.CLIENT and bare[2] == b"r1"
    delimited = raw_request(bus, [b"", protocol.CLIENT, b"echo", b"r2", body], zmq.DEALER)
    assert delimited[0] == b"" and delimited[3] == b"r2"
    assert protocol.decode_reply(delimited[-1]) == (True, {"a": 1})


def test_broker_own_service_lists_workers(bus: Bus) -> None:
    bus.broker()
    echo = bus.echo()
    bus.wait_workers("echo")
    with bus.client() as c:
        services = c.services()
        assert services["echo"]["instances"][0]["pid"] == echo.pid
        assert c.request("broker", "ping")["pong"] is True
        assert c.request("broker", "stats")["requests"] >= 1


def test_worker_stopped_gracefully_leaves_at_once(bus: Bus) -> None:
    bus.broker()
    echo = bus.echo()
    bus.wait_workers("echo")
    bus.kill(echo, signal.SIGTERM)
    assert echo.returncode == 0
    # Goodbye is immediate, well before the 1.5 s liveness would expire it.
    bus.wait_workers("echo", 0, timeout=1.0)


def test_broker_exits_cleanly_on_sigterm(bus: Bus) -> None:
    broker = bus.broker()

    def answers() -> bool:  # its signal handlers are set before it serves
        with bus.client(retries=1, timeout=0.5) as c:
            return c.ping(timeout=0.5, attempts=1)

    wait_until(answers, timeout=30)  # a loaded machine may take seconds to import it
    bus.kill(broker, signal.SIGTERM)
    assert broker.returncode == 0
    assert "broker stopped" in bus.log(broker)


def test_bad_config_is_refused_at_start_naming_the_setting(bus: Bus) -> None:
    proc = bus.start("phantom_bus.broker", PHANTOM_WORKER_HEARTBEAT="fast")
    assert proc.wait(10) == 2
    assert "worker_heartbeat" in bus.log(proc)
