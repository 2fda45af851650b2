"""Membership with real processes: SIGKILL, SIGSTOP of an agent and of membership itself,
restarts, unknown and malformed heartbeats."""

from __future__ import annotations

import signal
import time

import pytest
import zmq

from phantom_bus import protocol
from tests.conftest import Bus, wait_until

pytestmark = pytest.mark.processes


def cluster(bus: Bus, agents: int = 2) -> dict[int, object]:
    bus.broker()
    bus.start("services.discovery")
    bus.start("services.membership")
    procs = {n: bus.agent(n) for n in range(1, agents + 1)}
    wait_until(lambda: len([m for m in members(bus).values() if m["state"] == "alive"]) == agents, timeout=20)
    return procs


def members(bus: Bus) -> dict[str, dict]:
    try:
        return {m["id"]: m for m in bus.request("membership", "members")}
    except Exception:
        return {}


def state(bus: Bus, node: str) -> str | None:
    return members(bus).get(node, {}).get("state")


class Watch:
    """Collects member.* events from the bus."""

    def __init__(self, bus: Bus) -> None:
        self.sock = bus.subscriber(b"member.")
        self.events: list[dict] = []
        time.sleep(0.3)

    def drain(self) -> list[dict]:
        while self.sock.poll(50):
            self.events.append(protocol.decode_event(self.sock.recv_multipart()))
        return self.events

    def kinds(self, node: str) -> list[str]:
        return [e["kind"] for e in self.drain() if e.get("node") == node]

    def close(self) -> None:
        self.sock.close()


def test_killed_agent_is_dead_within_the_bound(bus: Bus) -> None:
    procs = cluster(bus)
    watch = Watch(bus)
    try:
        killed_at = time.monotonic()
        bus.kill(procs[1], signal.SIGKILL)  # type: ignore[arg-type]
        wait_until(lambda: state(bus, "node-1") == "dead", timeout=10, interval=0.02)
        elapsed = time.monotonic() - killed_at
        assert elapsed < 5.0  # the benchmark measures the real figure; this catches a broken detector
        assert state(bus, "node-2") == "alive"
        kinds = wait_until(lambda: (k := watch.kinds("node-1")) and "member.dead" in k and k)
        assert kinds.index("member.suspect") < kinds.index("member.dead")
    finally:
        watch.close()


def test_short_sigstop_of_an_agent_is_not_a_death(bus: Bus) -> None:
    procs = cluster(bus, agents=1)
    watch = Watch(bus)
    try:
        proc = procs[1]
        before = members(bus)["node-1"]["incarnation"]
        proc.send_signal(signal.SIGSTOP)  # type: ignore[attr-defined]
        time.sleep(0.3)  # less than the acceptable pause
        proc.send_signal(signal.SIGCONT)  # type: ignore[attr-defined]
        time.sleep(2.0)
        assert state(bus, "node-1") == "alive"
        assert "member.dead" not in watch.kinds("node-1")
        assert members(bus)["node-1"]["incarnation"] == before
    finally:
        watch.close()


def test_sigstop_of_membership_itself_convicts_nobody(bus: Bus) -> None:
    cluster(bus, agents=3)
    watch = Watch(bus)
    try:
        membership = next(p for p in bus.procs if "membership" in str(bus.logs[p.pid]))
        membership.send_signal(signal.SIGSTOP)
        time.sleep(3.0)
        membership.send_signal(signal.SIGCONT)
        time.sleep(2.5)
        assert {m["state"] for m in members(bus).values()} == {"alive"}
        assert not [e for e in watch.drain() if e["kind"] in ("member.dead", "member.suspect")]
    finally:
        watch.close()


def test_restarted_agent_is_alive_again_with_a_higher_incarnation(bus: Bus) -> None:
    procs = cluster(bus, agents=1)
    before = members(bus)["node-1"]["incarnation"]
    bus.kill(procs[1], signal.SIGKILL)  # type: ignore[arg-type]
    wait_until(lambda: state(bus, "node-1") == "dead", timeout=10)
    bus.agent(1)
    after = wait_until(
        lambda: (m := members(bus).get("node-1")) and m["state"] == "alive" and m["incarnation"] > before and m,
        timeout=15,
    )
    assert after["incarnation"] > before


def test_graceful_stop_is_left_not_dead(bus: Bus) -> None:
    procs = cluster(bus, agents=1)
    bus.kill(procs[1], signal.SIGTERM)  # type: ignore[arg-type]
    wait_until(lambda: state(bus, "node-1") == "left", timeout=3, interval=0.02)
    time.sleep(2.0)
    assert state(bus, "node-1") == "left"


def heartbeat(bus: Bus, frames: list[bytes]) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(bus.env["PHANTOM_HEARTBEAT"])
    try:
        sock.send_multipart(frames)
        assert sock.poll(5000), "membership did not answer"
        reply = sock.recv_multipart()
        assert reply[0] == protocol.HEARTBEAT_HEADER
        return protocol.unpack(reply[1])
    finally:
        sock.close()


def test_unknown_and_malformed_heartbeats_are_answered_and_create_nothing(bus: Bus) -> None:
    cluster(bus, agents=1)
    body = {"op": "hb", "node": "ghost", "incarnation": 1, "seq": 1, "load": None}
    ack = heartbeat(bus, [protocol.HEARTBEAT_HEADER, protocol.pack(body)])
    assert ack["ok"] is False and ack["code"] == "unknown_node"
    assert "beacon" in ack["error"]["message"]
    for frames in (
        [b"garbage"],
        [protocol.HEARTBEAT_HEADER, b"\xc1"],
        [protocol.HEARTBEAT_HEADER, protocol.pack({"node": 5})],
        [b"PHH9", protocol.pack(body)],
    ):
        assert heartbeat(bus, frames)["ok"] is False
    assert heartbeat(bus, [b"PHH9", protocol.pack(body)])["error"]["code"] == "unsupported_version"
    assert "ghost" not in members(bus)
    stats = bus.request("membership", "stats")
    assert stats["unknown_node"] >= 1 and stats["malformed"] >= 4
    assert state(bus, "node-1") == "alive"


def test_a_forged_higher_incarnation_does_not_keep_a_running_node_down(bus: Bus) -> None:
    from services.agent.incarnation import read_incarnation

    cluster(bus, agents=1)
    watch = Watch(bus)
    try:
        held = members(bus)["node-1"]["incarnation"]
        # Beyond incarnation_lead: refused and counted, nothing changes.
        too_far = {"op": "hb", "node": "node-1", "incarnation": 2**63 - 1, "seq": 1, "load": None}
        ack = heartbeat(bus, [protocol.HEARTBEAT_HEADER, protocol.pack(too_far)])
        assert ack["ok"] is False and ack["code"] == "incarnation_ahead"
        assert bus.request("membership", "stats")["incarnation_ahead"] == 1
        # Within the lead (a million ms ahead): taken, and the running agent must pass it at once.
        forged = held + 10**6
        body = {"op": "hb", "node": "node-1", "incarnation": forged, "seq": 1, "load": None}
        assert heartbeat(bus, [protocol.HEARTBEAT_HEADER, protocol.pack(body)])["ok"] is True
        after = wait_until(
            lambda: (m := members(bus).get("node-1")) and m["state"] == "alive" and m["incarnation"] > forged and m,
            timeout=10,
        )
        assert after["incarnation"] == forged + 1
        # Persisted, so a restart starts above it too.
        assert read_incarnation(bus.tmp / "var", "node-1") == forged + 1
        time.sleep(1.0)
        assert "member.dead" not in watch.kinds("node-1")
        assert state(bus, "node-1") == "alive"
    finally:
        watch.close()
