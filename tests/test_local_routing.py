"""Local routing against real processes: one cluster for the module.

Local selects agree with the balancer's, follow a map change, report their
traffic, and keep answering from the cached map while the broker is down.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import pytest

from phantom_bus.client import AsyncClient, Client
from tests.conftest import Bus, wait_until

pytestmark = pytest.mark.processes

SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
KEYS = [f"user:{i}" for i in range(200)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    bus = Bus(tmp_path_factory.mktemp("local"))
    try:
        bus.env["PHANTOM_COPY_TIME"] = "0.1"
        bus.broker()
        for name in SERVICES:
            bus.start(f"services.{name}")
        for n in (1, 2, 3):
            bus.agent(n)
        wait_until(lambda: _green(bus), timeout=60, interval=0.2)
        yield bus
    finally:
        bus.close()


def _green(bus: Bus) -> bool:
    try:
        with bus.client(timeout=2.0, retries=1) as c:
            return bool(c.status().get("health") == "green")
    except Exception:
        return False


def local(bus: Bus, **kw: object) -> Client:
    return bus.client(routing="local", timeout=5.0, **kw)  # type: ignore[arg-type]


def test_local_writes_agree_with_the_broker_at_the_same_epoch(cluster: Bus) -> None:
    with local(cluster) as mine, cluster.client() as broker:
        first = mine.select(KEYS[0], write=True, lease=False)
        assert first.source == "local" and not first.stale
        for _ in range(3):  # the map may move under us; compare at one epoch
            pairs = [(mine.select(k, write=True, lease=False), broker.select(k, write=True, lease=False))
                     for k in KEYS]
            if all(a.epoch == b.epoch for a, b in pairs):
                break
        assert all(a.epoch == b.epoch == mine.map_epoch for a, b in pairs)
        assert [(a.shard, a.node, a.role) for a, _ in pairs] == [(b.shard, b.node, b.role) for _, b in pairs]
        assert all(b.source == "broker" for _, b in pairs)
        for key in KEYS[:50]:
            sel = mine.select(key)
            assert sel.lease is not None and sel.address
            mine.release(sel, latency_ms=1.5, ok=True)
        # The balancer sees the local traffic through the client's reports.
        wait_until(lambda: broker.request("balancer", "stats")["totals"]["reported"] >= 51 + len(KEYS),
                   timeout=15)


def test_shardings_current_epoch_replaces_the_polls(cluster: Bus) -> None:
    # Sharding's leader says once a second which epoch it serves: a follower that
    # hears its own epoch makes no poll (without it: one read a second per reader).
    with local(cluster) as mine, cluster.client() as broker:
        mine.select(KEYS[0], lease=False)
        core = mine._feed.feed.follower.core
        wait_until(lambda: core.counters["confirmed"] >= 2, timeout=20)
        reads, confirmed = core.counters["reads"], core.counters["confirmed"]
        wait_until(lambda: core.counters["confirmed"] >= confirmed + 5, timeout=30)
        # Without them: a poll a second. With them: none, bar a hint or a beacon late on a loaded host.
        assert core.counters["reads"] - reads <= 2
        assert not mine.select(KEYS[1], lease=False).stale
        wait_until(lambda: broker.request("balancer", "stats")["map"]["confirmed"] > 0, timeout=20)


def test_a_node_join_reaches_local_clients(cluster: Bus) -> None:
    async def follow_async() -> int | None:
        async with AsyncClient(cluster.endpoint, timeout=5.0, events=cluster.env["PHANTOM_EVENTS_OUT"]) as ac:
            sel = await ac.select(KEYS[1], write=True)
            assert sel.source == "local"
            await ac.release(sel, 1.0)
            start = time.monotonic()
            while time.monotonic() - start < 30:
                m = ac._router.map if ac._router is not None else None
                if m is not None and any(s.role_of("node-4") for _, s in m.shards()):
                    return ac.map_epoch
                await asyncio.sleep(0.05)
            return None

    with local(cluster) as mine:
        before = mine.select(KEYS[0], write=True, lease=False).epoch
        cluster.agent(4)

        def holds_node_4() -> bool:
            router = mine._router
            m = router.map if router is not None else None
            return m is not None and any(s.role_of("node-4") for _, s in m.shards())

        wait_until(holds_node_4, timeout=30)
        assert mine.map_epoch is not None and mine.map_epoch > before
        assert asyncio.run(follow_async()) is not None


def test_selects_survive_the_broker_and_catch_up_after_it_returns(
    cluster: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHANTOM_MAP_STALE_AFTER", "1.5")
    broker = next(p for p in cluster.procs if "phantom_bus.broker" in p.args and p.poll() is None)
    with local(cluster) as mine, cluster.client() as broker_client:
        mine.select(KEYS[0], lease=False)

        def settled() -> bool:
            # Not mid-move (every shard has a primary), and the client holds sharding's epoch.
            m = mine._router.map if mine._router is not None else None
            return (m is not None and _green(cluster) and all(s.primary for _, s in m.shards())
                    and broker_client.request("sharding", "map", since_epoch=m.epoch) is None)

        wait_until(settled, timeout=60, interval=0.5)
        Bus.kill(broker)
        # A map pushed just before the kill may still land (a CI run saw epoch 199 become 200
        # here); after a moment nothing can reach the client, so it must answer from the map
        # it holds, the same answer every time, without waiting on the bus.
        time.sleep(0.5)
        epoch = mine.select(KEYS[0], write=True, lease=False).epoch
        expected = {k: mine.select(k, write=True, lease=False).node for k in KEYS}
        start = time.monotonic()
        for _ in range(20):
            for k in KEYS:
                sel = mine.select(k, write=True)
                assert sel.node == expected[k] and sel.epoch == epoch
                mine.release(sel, latency_ms=1.0)
        assert time.monotonic() - start < 5.0, "selects waited on the bus"
        wait_until(lambda: mine.select(KEYS[0], lease=False).stale, timeout=15)
        restarted = cluster.broker()
        assert isinstance(restarted, subprocess.Popen)
        wait_until(lambda: not mine.select(KEYS[0], lease=False).stale, timeout=30)
        # Caught up: a change made after the restart reaches the client.
        cluster.agent(5)
        wait_until(lambda: (r := mine._router) is not None and r.map is not None
                   and any(s.role_of("node-5") for _, s in r.map.shards()), timeout=40)
        closing = time.monotonic()
    assert time.monotonic() - closing < 5.0, "close() must not hang"

