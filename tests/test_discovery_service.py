"""Discovery and agents as real processes: join, loss, leave, rejoin, garbage, manual entries."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
import zmq

from phantom_bus import protocol
from phantom_bus.errors import NotFound
from tests.conftest import Bus, phantom, wait_until

pytestmark = pytest.mark.processes

# Fast beacons so that loss is observable within a second or two.
FAST = {"PHANTOM_BEACON_INTERVAL": "0.2", "PHANTOM_BEACON_EXPIRY": "1.0"}


def start(bus: Bus) -> None:
    bus.env.update(FAST)
    bus.broker()
    bus.start("services.discovery")
    bus.wait_workers("discovery")


def agent(bus: Bus, n: int) -> subprocess.Popen[bytes]:
    return bus.start(
        "services.agent",
        "--node-id",
        f"node-{n}",
        "--zone",
        f"z{n}",
        "--address",
        f"127.0.0.1:70{n:02d}",
        name=f"agent-{n}",
    )


def nodes(bus: Bus) -> dict[str, dict]:
    with bus.client() as c:
        return {n["id"]: n for n in c.request("discovery", "nodes")}


def state(bus: Bus, node: str) -> str | None:
    return nodes(bus).get(node, {}).get("state")


def test_three_agents_join_and_appear_with_their_fields(bus: Bus) -> None:
    start(bus)
    for n in (1, 2, 3):
        agent(bus, n)
    table = wait_until(
        lambda: (t := nodes(bus)) and len([v for v in t.values() if v["state"] == "alive"]) == 3 and t
    )
    assert table["node-2"]["zone"] == "z2"
    assert table["node-2"]["address"] == "127.0.0.1:7002"
    assert table["node-2"]["incarnation"] > 0


def test_killed_agent_is_lost_after_expiry_and_stopped_agent_leaves_at_once(bus: Bus) -> None:
    start(bus)
    victim, leaver = agent(bus, 1), agent(bus, 2)
    wait_until(lambda: state(bus, "node-1") == "alive" and state(bus, "node-2") == "alive")
    bus.kill(victim, signal.SIGKILL)
    assert state(bus, "node-1") == "alive"  # not before the expiry
    wait_until(lambda: state(bus, "node-1") == "dead" or state(bus, "node-1") == "lost", timeout=5)
    bus.kill(leaver, signal.SIGTERM)
    assert leaver.returncode == 0
    # A graceful stop says goodbye: left well before the 1 s expiry could notice.
    wait_until(lambda: state(bus, "node-2") == "left", timeout=0.8, interval=0.02)


def test_restarted_agent_rejoins_with_a_higher_incarnation(bus: Bus) -> None:
    start(bus)
    first = agent(bus, 1)
    before = wait_until(lambda: nodes(bus).get("node-1"))["incarnation"]
    bus.kill(first, signal.SIGKILL)
    agent(bus, 1)
    after = wait_until(lambda: (n := nodes(bus).get("node-1")) and n["incarnation"] > before and n)
    assert after["state"] == "alive"


def test_garbage_on_the_beacon_port_is_counted_and_survived(bus: Bus) -> None:
    start(bus)
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(bus.env["PHANTOM_BEACON"])
    try:
        garbage = [
            [b"hello"],
            [protocol.BEACON, b"\xc1\xc1\xc1"],
            [protocol.BEACON, protocol.pack({"v": 1, "node": "x"})],
            [protocol.BEACON, protocol.pack({"v": 9, "node": "x"})],
            [protocol.BEACON, b"\x00" * 100_000],
            [b"PHB7", b"x", b"y"],
        ]

        def dropped() -> int:
            for frames in garbage:
                pub.send_multipart(frames)
            with bus.client() as c:
                stats = c.request("discovery", "stats")
            return sum(stats["dropped"].values()) if isinstance(stats.get("dropped"), dict) else 0

        wait_until(lambda: dropped() >= len(garbage), timeout=10, interval=0.2)
    finally:
        pub.close()
    agent(bus, 1)
    wait_until(lambda: state(bus, "node-1") == "alive")
    assert "x" not in nodes(bus)


def test_events_are_published_on_the_bus(bus: Bus) -> None:
    start(bus)
    sub = bus.subscriber(b"node.")
    try:
        import time

        time.sleep(0.5)  # let the subscription reach the broker before the first beacon
        proc = agent(bus, 1)
        seen: list[dict] = []

        def got(kind: str) -> bool:
            while sub.poll(100):
                seen.append(protocol.decode_event(sub.recv_multipart()))
            return any(e["kind"] == kind and e["node"] == "node-1" for e in seen)

        wait_until(lambda: got("node.discovered"), timeout=10)
        bus.kill(proc, signal.SIGTERM)
        wait_until(lambda: got("node.left"), timeout=10)
        assert all(e["service"] == "discovery" and e["reason"] for e in seen)
    finally:
        sub.close()



def test_manual_registration_and_removal_through_the_cli(bus: Bus) -> None:
    start(bus)
    result = phantom(bus, "register", "db-9", "--address", "10.1.2.9:7000", "--zone", "z9")
    assert result.returncode == 0, result.stderr
    listed = json.loads(phantom(bus, "nodes", "--json").stdout)
    assert {"id": "db-9", "address": "10.1.2.9:7000", "zone": "z9"}.items() <= next(
        n for n in listed if n["id"] == "db-9"
    ).items()
    # A manual node never expires.
    import time

    time.sleep(1.5)
    assert state(bus, "db-9") == "alive"
    assert phantom(bus, "remove", "db-9").returncode == 0
    assert "db-9" not in nodes(bus)
    unknown = phantom(bus, "remove", "db-9")
    assert unknown.returncode == 1 and "not_found" in unknown.stderr
    with bus.client() as c, pytest.raises(NotFound):
        c.request("discovery", "node", node="db-9")


def test_expiry_not_above_interval_is_refused_at_start(bus: Bus) -> None:
    proc = bus.start("services.discovery", PHANTOM_BEACON_INTERVAL="2", PHANTOM_BEACON_EXPIRY="1")
    assert proc.wait(10) == 2
    assert "expiry" in bus.log(proc)


def test_agent_without_node_id_is_refused(bus: Bus) -> None:
    proc = bus.start("services.agent")
    assert proc.wait(10) == 2
    assert "node_id" in bus.log(proc)
