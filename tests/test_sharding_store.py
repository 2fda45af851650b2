"""The shard map in the store: one fenced CAS txn per epoch, never backwards, resumable timers."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from phantom_bus.errors import Conflict
from phantom_bus.store import CasFailed, Fence, Fenced, Put, Store, StoreError
from phantom_bus.store.memory import MemoryStore
from services.sharding.config import ShardingConfig
from services.sharding.core import ShardingCore
from services.sharding.service import resume
from services.sharding.store import EPOCH_KEY, STATE_KEY, MapStore


def busy_core() -> ShardingCore:
    core = ShardingCore(ShardingConfig(default_shards=8, dead_delay=60.0))
    for i in range(3):
        core.add_node(f"n{i}", "abc"[i], 1.0, now=float(i))
    core.add_node("n3", "a", 1.0, now=5.0)  # copies in flight
    return core


def test_commit_then_load_returns_the_epoch_its_moves_and_the_cached_encoding(store_run: Any) -> None:
    core = busy_core()

    async def body(store: Store) -> None:
        maps = MapStore(store)
        assert await maps.load() is None
        first = await maps.commit(MapStore.prepare(*core.snapshot(10.0), previous=None, term=7, wall=100.0), None)
        core.tick(11.0)
        shard_map, state = core.snapshot(12.0)
        second = await maps.commit(MapStore.prepare(shard_map, state, previous=first, term=7, wall=102.0), None)
        loaded = await maps.load()
        assert loaded is not None and loaded.map == shard_map and loaded.epoch >= first.epoch
        assert loaded.blob == shard_map.pack() and loaded.term == 7 and loaded.wall == 102.0
        assert loaded.epoch_revision == second.epoch_revision
        restored = ShardingCore.restore(loaded.map, loaded.state, now=100.0, config=core.config)
        assert restored.pending_moves(100.0) and restored.map().value == shard_map

    store_run(body)


def test_a_second_writer_from_the_same_read_is_refused(store_run: Any) -> None:
    core = busy_core()

    async def body(store: Store) -> None:
        maps = MapStore(store)
        base = await maps.commit(MapStore.prepare(*core.snapshot(1.0), previous=None, term=1, wall=1.0), None)
        core.add_node("n9", "c", 1.0, now=2.0)
        newer = core.snapshot(2.0)
        await maps.commit(MapStore.prepare(*newer, previous=base, term=1, wall=2.0), None)
        with pytest.raises(CasFailed):  # same starting point: it would create the same epoch twice
            await maps.commit(MapStore.prepare(*newer, previous=base, term=1, wall=2.0), None)
        with pytest.raises(CasFailed):  # and nobody may create the first epoch again
            await maps.commit(MapStore.prepare(*newer, previous=None, term=1, wall=2.0), None)

    store_run(body)


def test_an_older_epoch_is_refused_before_it_reaches_the_store(store_run: Any) -> None:
    core = busy_core()
    old = core.snapshot(1.0)
    core.add_node("n9", "c", 1.0, now=2.0)

    async def body(store: Store) -> None:
        maps = MapStore(store)
        base = await maps.commit(MapStore.prepare(*core.snapshot(2.0), previous=None, term=1, wall=2.0), None)
        with pytest.raises(Conflict, match="refusing to go back"):
            MapStore.prepare(*old, previous=base, term=1, wall=3.0)

    store_run(body)


def test_a_deposed_leaders_commit_is_fenced_and_writes_nothing(store_run: Any) -> None:
    core = busy_core()

    async def body(store: Store) -> None:
        maps = MapStore(store)
        term = await store.txn([], [Put("leaders/sharding", b"a")])
        fence = Fence("leaders/sharding", term)
        base = await maps.commit(MapStore.prepare(*core.snapshot(1.0), previous=None, term=term, wall=1.0), fence)
        await store.put("leaders/sharding", b"b")  # another leader's record
        core.add_node("n9", "c", 1.0, now=2.0)
        with pytest.raises(Fenced):
            await maps.commit(MapStore.prepare(*core.snapshot(2.0), previous=base, term=term, wall=2.0), fence)
        loaded = await maps.load()
        assert loaded is not None and loaded.epoch == base.epoch

    store_run(body)


def test_an_inconsistent_stored_epoch_is_a_store_error(store_run: Any) -> None:
    core = busy_core()

    async def body(store: Store) -> None:
        maps = MapStore(store)
        await maps.commit(MapStore.prepare(*core.snapshot(1.0), previous=None, term=1, wall=1.0), None)
        await store.put(EPOCH_KEY, msgpack.packb({"epoch": 999, "term": 1, "wall": 1.0}))
        with pytest.raises(StoreError, match="999"):
            await maps.load()
        await store.delete(STATE_KEY)
        with pytest.raises(StoreError, match="incomplete"):
            await maps.load()

    store_run(body)


def test_a_dead_delay_timer_survives_a_takeover_by_the_wall_clock() -> None:
    core = ShardingCore(ShardingConfig(default_shards=8, dead_delay=60.0))
    for i in range(4):
        core.add_node(f"n{i}", "abcd"[i], 1.0, now=0.0)
    core.node_dead("n0", now=100.0)

    async def body() -> None:
        maps = MapStore(MemoryStore())
        saved = await maps.commit(MapStore.prepare(*core.snapshot(130.0), previous=None, term=1, wall=5000.0), None)
        # Another process, 20 s (wall clock) later, on its own monotonic clock (7.0):
        other = resume(saved, core.config, now=7.0, wall=5020.0)
        (view,) = [n for n in other.nodes() if n["node"] == "n0"]
        assert view["dead_since"] == pytest.approx(7.0 - 50.0)  # dead for 30 + 20 s: 10 s left
        other.tick(7.0 + 9.0)
        assert not next(n for n in other.nodes() if n["node"] == "n0")["expired"]
        other.tick(7.0 + 10.5)
        assert next(n for n in other.nodes() if n["node"] == "n0")["expired"]

    asyncio.run(body())
