"""The whole system as real processes: join, select, failure, re-replication, drain,
remove, and SIGKILL of the stateful services."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest

from phantom_bus.errors import Refused
from tests.conftest import Bus, phantom, wait_until

pytestmark = pytest.mark.processes

SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")


def cluster(bus: Bus, agents: int, **env: str) -> dict[str, subprocess.Popen[bytes]]:
    bus.env.update({"PHANTOM_COPY_TIME": "0.1", **env})
    procs = {"broker": bus.broker()}
    for name in SERVICES:
        procs[name] = bus.start(f"services.{name}")
    for n in range(1, agents + 1):
        procs[f"node-{n}"] = bus.agent(n)
    wait_green(bus, timeout=60)
    return procs


def status(bus: Bus) -> dict[str, Any]:
    return bus.status()


def settled(doc: dict[str, Any]) -> bool:
    """Green with no shard moving (planned moves keep the colour green while they run)."""
    return doc.get("health") == "green" and not (doc.get("shards") or {}).get("moving")


def wait_green(bus: Bus, timeout: float = 30) -> dict[str, Any]:
    """Until the cluster is green and settled: no move in flight."""
    return wait_until(lambda: settled(s := status(bus)) and s, timeout=timeout, interval=0.2)


def node(doc: dict[str, Any], node_id: str) -> dict[str, Any]:
    return next(n for n in doc["nodes"] if n["id"] == node_id)



def test_cluster_goes_green_and_routes_writes_to_primaries(bus: Bus) -> None:
    cluster(bus, agents=3)
    doc = status(bus)
    assert {n["lifecycle"] for n in doc["nodes"]} == {"active"}
    assert sum(n["replicas"] for n in doc["nodes"]) == doc["shards"]["total"] * 3
    assert doc["services"] == dict.fromkeys(("broker", *SERVICES), "up")
    with bus.client() as c:
        for key in ("user:1", "user:2", b"\x00raw"):
            sel = c.select(key, write=True)
            route = c.request("sharding", "lookup", key=key)
            assert sel.role == "primary" and sel.node == route["primary"]
            read = c.select(key)
            assert read.lease is not None and read.node in route["readers"]
            c.release(read, latency_ms=2.0, ok=True)
    result = phantom(bus, "select", "user:42", "--json")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"key", "keyspace", "shard", "node", "address", "epoch", "role"}
    assert phantom(bus, "status").returncode == 0
    shards = json.loads(phantom(bus, "shards", "--json").stdout)
    assert {"keyspace", "shard", "range", "replicas", "primary", "state"} <= set(shards[0])


def test_dead_node_fails_over_then_rereplicates_after_the_delay(bus: Bus) -> None:
    procs = cluster(bus, agents=4, PHANTOM_DEAD_DELAY="3")
    before = node(status(bus), "node-4")
    assert before["replicas"] > 0
    bus.kill(procs["node-4"], signal.SIGKILL)
    yellow = wait_until(lambda: (s := status(bus)).get("health") == "yellow" and s, timeout=15, interval=0.1)
    assert node(yellow, "node-4")["state"] in ("suspect", "dead")
    # Primaries moved at once: no shard is without one while we wait for the delay.
    wait_until(lambda: (s := status(bus)) and node(s, "node-4")["state"] == "dead", timeout=15)
    # Primaries fail over at once: within a map refresh of the verdict, well before the delay.
    failed_over = wait_until(
        lambda: (s := status(bus)) and s["shards"]["unavailable"] == 0 and node(s, "node-4")["primaries"] == 0 and s,
        timeout=5,
        interval=0.1,
    )
    assert node(failed_over, "node-4")["state"] == "dead"
    healed = wait_green(bus, timeout=60)
    assert node(healed, "node-4")["replicas"] == 0
    assert sum(n["replicas"] for n in healed["nodes"]) == healed["shards"]["total"] * 3


def test_node_back_within_the_delay_costs_no_moves(bus: Bus) -> None:
    procs = cluster(bus, agents=3, PHANTOM_DEAD_DELAY="60")
    held = node(status(bus), "node-2")["replicas"]
    bus.kill(procs["node-2"], signal.SIGKILL)
    wait_until(lambda: (s := status(bus)) and node(s, "node-2")["state"] == "dead", timeout=15)
    bus.agent(2)
    back = wait_green(bus, timeout=30)
    assert node(back, "node-2")["replicas"] == held
    with bus.client() as c:
        assert c.request("sharding", "moves") == []


def test_drain_moves_everything_away_then_remove_forgets_the_node(bus: Bus) -> None:
    procs = cluster(bus, agents=4)
    result = phantom(bus, "drain", "node-4")
    assert result.returncode == 0, result.stderr
    drained = wait_until(
        lambda: (s := status(bus)) and node(s, "node-4")["lifecycle"] == "decommissioned" and s, timeout=60
    )
    assert node(drained, "node-4")["replicas"] == 0
    wait_green(bus)
    # Its host is shut down, then it is forgotten (an agent left running would be
    # rediscovered, and `phantom remove` would say so and exit 1).
    bus.kill(procs["node-4"])
    assert phantom(bus, "remove", "node-4").returncode == 0
    assert "node-4" not in {n["id"] for n in status(bus)["nodes"]}


def test_remove_refuses_a_node_holding_the_only_live_replica(bus: Bus) -> None:
    procs = cluster(bus, agents=3, PHANTOM_DEAD_DELAY="600")
    for victim in ("node-2", "node-3"):
        bus.kill(procs[victim], signal.SIGKILL)
    wait_until(
        lambda: (s := status(bus)) and {node(s, v)["state"] for v in ("node-2", "node-3")} == {"dead"}, timeout=20
    )
    with bus.client() as c, pytest.raises(Refused) as info:
        c.request("manager", "remove", node="node-1")
    assert "only live replica" in info.value.message or "default/" in info.value.message
    result = phantom(bus, "remove", "node-1")
    assert result.returncode == 1 and "refused" in result.stderr
    assert "node-1" in {n["id"] for n in status(bus)["nodes"]}


def test_sigkill_of_stateful_services_loses_and_doubles_nothing(bus: Bus) -> None:
    procs = cluster(bus, agents=3)
    before = status(bus)
    with bus.client() as c:
        map_before = c.request("sharding", "map")
    for name in ("manager", "sharding", "balancer"):
        bus.kill(procs[name], signal.SIGKILL)
        procs[name] = bus.start(f"services.{name}")
    after = wait_green(bus, timeout=60)
    with bus.client() as c:
        map_after = c.request("sharding", "map")
        assert c.select("user:7", write=True).epoch >= map_before["epoch"]
    assert map_after["epoch"] >= map_before["epoch"]
    assert map_after["keyspaces"] == map_before["keyspaces"]
    key = lambda doc: sorted((n["id"], n["lifecycle"]) for n in doc["nodes"])  # noqa: E731
    assert key(after) == key(before)
    assert len({n["id"] for n in after["nodes"]}) == len(after["nodes"])


def test_services_down_are_marked_not_fatal(bus: Bus) -> None:
    procs = cluster(bus, agents=3)
    bus.kill(procs["balancer"], signal.SIGTERM)
    bus.kill(procs["membership"], signal.SIGTERM)
    doc = wait_until(lambda: (s := status(bus)) and s["services"]["balancer"] == "down" and s, timeout=15)
    assert doc["services"]["membership"] == "down"
    assert doc["services"]["sharding"] == "up"
    assert len(doc["nodes"]) == 3
