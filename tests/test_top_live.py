"""`bin/phantom-top --once` and `--json` against a live cluster of real processes,
and against a broker that is not there."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import Bus, command, free_port, wait_until
from tests.test_cluster import cluster, node, status

pytestmark = pytest.mark.processes

NODES = ("node-1", "node-2", "node-3")


def top(bus: Bus, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return command(bus, [sys.executable, "bin/phantom-top", *args], timeout=60, **env)


def row(text: str, node_id: str) -> str:
    """The one line of the nodes table for ``node_id``."""
    lines = [line for line in text.splitlines() if line.split()[:1] == [node_id]]
    assert len(lines) == 1, (node_id, text)
    return lines[0]


def test_once_and_json_show_health_nodes_and_their_states(bus: Bus) -> None:
    procs = cluster(bus, agents=3, PHANTOM_DEAD_DELAY="600")

    once = top(bus, "--once")
    assert once.returncode == 0, once.stderr
    assert "health: green" in once.stdout
    for n in NODES:
        cells = row(once.stdout, n).split()
        assert "alive" in cells and "active" in cells, cells

    snap = top(bus, "--json")
    assert snap.returncode == 0, snap.stderr
    doc = json.loads(snap.stdout)
    assert doc["health"] == "green"
    assert sorted(n["id"] for n in doc["nodes"]) == list(NODES)
    assert {(n["state"], n["lifecycle"]) for n in doc["nodes"]} == {("alive", "active")}

    # A node's death shows in the next snapshot, text and JSON alike.
    bus.kill(procs["node-3"], signal.SIGKILL)
    wait_until(lambda: (s := status(bus)) and node(s, "node-3")["state"] == "dead", timeout=20)
    snap = top(bus, "--json")
    assert snap.returncode == 0, snap.stderr
    doc = json.loads(snap.stdout)
    assert node(doc, "node-3")["state"] == "dead"
    assert doc["health"] in ("yellow", "red")
    once = top(bus, "--once")
    assert once.returncode == 0, once.stderr
    assert f"health: {doc['health']}" in once.stdout
    assert "dead" in row(once.stdout, "node-3").split()
    assert "alive" in row(once.stdout, "node-1").split()


@pytest.mark.parametrize("mode", ["--once", "--json"])
def test_dead_broker_exits_69_with_one_stderr_line(bus: Bus, mode: str) -> None:
    result = top(bus, mode, PHANTOM_BROKER=f"tcp://127.0.0.1:{free_port()}")
    assert result.returncode == 69, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("phantom-top:"), result.stderr


def test_the_event_listener_delivers_an_event_relayed_by_several_brokers_once() -> None:
    import zmq

    from phantom_bus import protocol
    from phantom_bus.events import Deduplicator
    from services.top.feed import BusFeed

    ctx = zmq.Context.instance()
    rx, tx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        rx.bind("inproc://top-dedupe")
        tx.connect("inproc://top-dedupe")
        first = protocol.encode_event("member.dead", {"node": "node-2"}, source="membership", ts=time.time(),
                                      origin="m@h1#a", seq=1)
        second = protocol.encode_event("member.alive", {"node": "node-2"}, source="membership", ts=time.time(),
                                       origin="m@h1#a", seq=2)
        for frames in (first, first, second, first, second, second):  # three brokers, interleaved
            tx.send_multipart(frames)
        wait_until(lambda: rx.poll(10, zmq.POLLIN), timeout=5)
        time.sleep(0.1)
        kinds = [e["kind"] for e in BusFeed.read_events(rx, Deduplicator())]
        assert kinds == ["member.dead", "member.alive"]
    finally:
        rx.close(0)
        tx.close(0)
