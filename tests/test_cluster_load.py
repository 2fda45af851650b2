"""The whole system as real processes, under load: a node joining a green cluster,
a drain and SIGKILLs of the stateful services with selects running all the while,
the balancer steering reads away from a slow node and a dead one, writes always
on the current primary, and the shard map surviving a SIGKILL mid-rebalance."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from phantom_bus.client import Client
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.shardmap import ShardMap
from phantom_bus.store.sqlite import SqliteStore
from services.sharding.store import Committed, MapStore
from tests.conftest import Bus, phantom, wait_until
from tests.ha_hosts import Traffic
from tests.test_cluster import cluster, node, settled, status, wait_green

pytestmark = pytest.mark.processes

SHARDS, RF = 64, 3
SLOW_START = BalancerConfig().slow_start_s


def holders(shard_map: dict[str, Any]) -> dict[str, set[str]]:
    """Shard id -> the nodes holding a replica of it (any role)."""
    return {sh["id"]: {r["node"] for r in sh["replicas"]} for ks in shard_map["keyspaces"] for sh in ks["shards"]}


def counts(shard_map: dict[str, Any]) -> Counter[str]:
    return Counter(n for nodes in holders(shard_map).values() for n in nodes)


def sharding_map(bus: Bus) -> dict[str, Any]:
    with bus.client(timeout=2.0, retries=3) as c:
        doc: dict[str, Any] = c.request("sharding", "map")
        return doc


def start_agent(bus: Bus, n: int, zone: str) -> Any:
    """Agent ``node-n`` in an explicit zone (``bus.agent`` derives the zone from n)."""
    args = ("--node-id", f"node-{n}", "--zone", zone, "--address", f"127.0.0.1:{7000 + n}")
    return bus.start("services.agent", *args, name=f"agent-{n}")


class SelectLoad(Traffic):
    """Selects (and optionally writes) over many keys until stopped, recording every
    exception that reaches the caller. Its client is generous: a select may be
    retried inside the library, but none may fail."""

    def __init__(self, bus: Bus, *, writes: bool = False, keys: int = 300, lost_leases_ok: bool = False) -> None:
        super().__init__(bus.endpoint, None, routing="local", writes=writes, keys=keys, timeout=2.0, retries=5,
                         pause=0.002, lost_leases_ok=lost_leases_ok)  # fmt: skip

    def __enter__(self) -> SelectLoad:
        self.start()
        wait_until(lambda: self.reads >= 20 or self.errors, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "the load thread did not stop"


# --- join, drain, SIGKILL under load -----------------------------------------------


def test_fourth_agent_joins_a_green_cluster_and_takes_exactly_its_share(bus: Bus) -> None:
    procs = cluster(bus, agents=3)
    before = sharding_map(bus)
    held = counts(before)
    assert held == dict.fromkeys(("node-1", "node-2", "node-3"), SHARDS)
    # Its own zone, so four equal zones: the ideal is 192 / 4 = 48 on every node.
    # (In zone z2 next to node-1 it could hold only 32: one replica per zone.)
    procs["node-4"] = start_agent(bus, 4, "z4")
    wait_until(
        lambda: (s := status(bus)) and any(n["id"] == "node-4" and n["lifecycle"] == "active" for n in s["nodes"]),
        timeout=30,
    )
    healed = wait_until(
        lambda: settled(s := status(bus)) and node(s, "node-4")["replicas"] and s, timeout=60
    )
    assert node(healed, "node-4")["state"] == "alive"
    after_map = sharding_map(bus)
    after = counts(after_map)
    total = SHARDS * RF
    assert sum(after.values()) == total == healed["shards"]["total"] * RF
    assert after["node-4"] == node(healed, "node-4")["replicas"]
    assert abs(after["node-4"] - total / 4) <= 1, after
    assert all(abs(c - total / 4) <= 1 for c in after.values()), after
    # The fewest moves: the old nodes only gave, and only to node-4.
    decreases = {n: held[n] - after[n] for n in held}
    assert all(d >= 0 for d in decreases.values()), decreases
    assert sum(decreases.values()) == after["node-4"]
    was, now = holders(before), holders(after_map)
    for shard, nodes in now.items():
        assert nodes == was[shard] or (
            "node-4" in nodes and len(was[shard] - nodes) == 1 and nodes - was[shard] == {"node-4"}
        ), (shard, was[shard], nodes)
    with bus.client() as c:
        assert c.request("sharding", "moves") == []
        # The new node serves: it is a reader of its shards and the primary of some.
        # (Reads come to it only as its slow start ramps up, over 30 s by default.)
        routes = [c.request("sharding", "lookup", key=f"user:{i}") for i in range(200)]
        writes = {c.select(f"user:{i}", write=True, lease=False).node for i in range(200)}
    assert any("node-4" in r["readers"] for r in routes)
    assert "node-4" in writes and node(healed, "node-4")["primaries"] > 0


def test_drain_with_reads_and_writes_running_fails_no_caller(bus: Bus) -> None:
    cluster(bus, agents=4)
    with SelectLoad(bus, writes=True) as load:
        reads, writes = load.reads, load.written
        result = phantom(bus, "drain", "node-4")
        assert result.returncode == 0, result.stderr
        drained = wait_until(
            lambda: (s := status(bus)) and node(s, "node-4")["lifecycle"] == "decommissioned" and s, timeout=60
        )
        wait_green(bus, timeout=30)
        time.sleep(0.5)  # some load on the final map too
    assert load.errors == [], load.errors[:5]
    assert load.reads > reads + 50 and load.written > writes + 50, (load.reads, load.written)
    assert node(drained, "node-4")["replicas"] == 0
    with bus.client() as c:
        assert "node-4" not in {c.select(f"user:{i}", lease=False).node for i in range(100)}
        assert "node-4" not in {c.select(f"user:{i}", write=True, lease=False).node for i in range(100)}


def test_sigkill_of_each_stateful_service_under_select_load(bus: Bus) -> None:
    procs = cluster(bus, agents=3)
    before = status(bus)
    epoch = sharding_map(bus)["epoch"]
    registry = sorted((n["id"], n["lifecycle"]) for n in before["nodes"])
    with SelectLoad(bus, lost_leases_ok=True) as load:
        for name in ("manager", "sharding", "balancer"):
            reads = load.reads
            bus.kill(procs[name], signal.SIGKILL)
            procs[name] = bus.start(f"services.{name}")
            bus.wait_workers(name, 1, timeout=30)
            # Selects keep flowing after each restart, not just before it.
            wait_until(lambda r=reads: load.reads >= r + 20 or load.errors, timeout=30)
            assert load.errors == [], (name, load.errors[:5])
        after = wait_green(bus, timeout=60)
    assert load.errors == [], load.errors[:5]
    assert load.reads > 100
    assert sharding_map(bus)["epoch"] >= epoch
    assert after["epoch"] >= epoch
    assert sorted((n["id"], n["lifecycle"]) for n in after["nodes"]) == registry
    with bus.client() as c:
        assert c.select("user:7", write=True).epoch >= epoch


# --- selection end to end ---------------------------------------------------------


def test_slow_node_gets_clearly_fewer_reads_under_the_default_strategy(bus: Bus) -> None:
    started = time.monotonic()
    cluster(bus, agents=3)
    slow = "node-2"
    # Every node the balancer sees become servable ramps up over slow_start_s (30 s),
    # and while ramps differ the performance strategy starves the youngest node
    # entirely: measure once every ramp is over.
    time.sleep(max(0.0, started + SLOW_START + 1 - time.monotonic()))
    picked: Counter[str] = Counter()
    with bus.client(timeout=2.0, retries=3) as c:
        # The "database" is simulated: a read on the slow node takes 40 ms, elsewhere 2 ms.
        for phase in ("warm-up", "measure"):
            for i in range(300):
                sel = c.select(f"user:{i * 7919 % 1000}")
                c.release(sel, latency_ms=40.0 if sel.node == slow else 2.0, ok=True)
                if phase == "measure":
                    picked[sel.node] += 1
        view = {
            n: (v["state"], v["lifecycle"], v["healthy"], v["ejected"], round(v["slow_start"], 2), v["latency_ms"])
            for n, v in c.request("balancer", "stats")["nodes"].items()
        }
    total = sum(picked.values())
    assert set(picked) <= {"node-1", "node-2", "node-3"}
    fair = total / 3
    assert picked[slow] < fair / 2, (picked, view)
    assert all(picked[n] > fair / 2 for n in ("node-1", "node-3")), (picked, view)


def test_dead_node_is_never_selected_and_writes_follow_the_current_primary(bus: Bus) -> None:
    procs = cluster(bus, agents=3, PHANTOM_DEAD_DELAY="600")
    keys = [f"user:{i}" for i in range(60)]
    with bus.client(timeout=2.0, retries=3) as c:
        assert_writes_hit_current_primary(c, keys)
        assert any("node-3" in c.request("sharding", "lookup", key=k)["readers"] for k in keys)
        bus.kill(procs["node-3"], signal.SIGKILL)
        wait_until(lambda: (s := status(bus)) and node(s, "node-3")["state"] == "dead", timeout=20)
        # The map may still be catching up (primaries fail over at once): let it settle.
        wait_until(lambda: all(c.request("sharding", "lookup", key=k)["primary"] != "node-3" for k in keys), 20)
        chosen: Counter[str] = Counter()
        for _round in range(5):
            for k in keys:
                sel = c.select(k)
                chosen[sel.node] += 1
                c.release(sel, latency_ms=2.0, ok=True)
                chosen[c.select(k, write=True, lease=False).node] += 1
        assert "node-3" not in chosen, chosen
        assert set(chosen) == {"node-1", "node-2"}
        assert_writes_hit_current_primary(c, keys)


def assert_writes_hit_current_primary(c: Client, keys: list[str]) -> None:
    """A write selection names the primary of the map at the selection's epoch."""
    for key in keys:
        for _attempt in range(3):
            sel = c.select(key, write=True, lease=False)
            route = c.request("sharding", "lookup", key=key)
            if route["epoch"] == sel.epoch:
                break
            # The map moved between the two calls: take both again.
            assert route["epoch"] > sel.epoch, (key, sel, route)
        else:
            raise AssertionError(f"{key}: the map kept moving")
        assert sel.role == "primary" and sel.node == route["primary"], (key, sel, route)
        assert sel.shard == route["shard"], (key, sel, route)


# --- the shard map survives a SIGKILL mid-rebalance ---------------------------------


async def stored_map(bus: Bus) -> Committed | None:
    store = SqliteStore(Path(bus.env["PHANTOM_DATA"]) / "store.sqlite3")
    try:
        return await MapStore(store).load()
    finally:
        await store.close()


def _with_joining(doc: Any) -> Any:
    """``doc`` if the map it holds has a replica being copied, else None."""
    shard_map = ShardMap.from_wire(doc)
    return doc if any(r.role == "joining" for _, sh in shard_map.shards() for r in sh.replicas) else None


def test_sigkill_of_sharding_mid_rebalance_keeps_the_map_and_finishes_the_moves(bus: Bus) -> None:
    procs = cluster(bus, agents=3, PHANTOM_COPY_TIME="0.3")
    procs["node-4"] = start_agent(bus, 4, "z4")
    with bus.client(timeout=2.0, retries=3) as c:
        # A move is in flight once a copy is being made (a joining replica is in the map).
        last = wait_until(lambda: _with_joining(c.request("sharding", "map")), timeout=30, interval=0.02)
    bus.kill(procs["sharding"], signal.SIGKILL)
    # What the store holds now is what the restarted service must come back with.
    loaded = asyncio.run(stored_map(bus))
    assert loaded is not None
    stored = loaded.map
    served = ShardMap.from_wire(last)
    # Every epoch a client saw was committed before it was served: the store is not behind.
    assert stored.epoch >= served.epoch, (stored.epoch, served.epoch)
    if stored.epoch == served.epoch:
        assert stored == served
    assert any(r.role == "joining" for _, sh in stored.shards() for r in sh.replicas), "no move in flight"

    procs["sharding"] = bus.start("services.sharding")
    bus.wait_workers("sharding", 1, timeout=30)
    with bus.client(timeout=2.0, retries=3) as c:
        back = ShardMap.from_wire(c.request("sharding", "map"))
    # The restarted service starts from exactly the stored epoch; agents' confirmations
    # may have advanced it since, never taken it back.
    assert back.epoch >= stored.epoch
    if back.epoch == stored.epoch:
        assert back == stored
    healed = wait_until(
        lambda: settled(s := status(bus)) and node(s, "node-4")["replicas"] == 48 and s, timeout=90
    )
    assert healed["epoch"] > stored.epoch
    final = sharding_map(bus)
    assert sum(counts(final).values()) == SHARDS * RF
    assert all(abs(n - 48) <= 1 for n in counts(final).values()), counts(final)
    with bus.client() as c:
        assert c.request("sharding", "moves") == []
