"""Durability of the shard map: SQLite in WAL mode, a real directory, a writer killed mid-way."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from phantom_bus.errors import Conflict
from phantom_bus.shardmap import ShardMap
from services.sharding.config import ShardingConfig
from services.sharding.core import ShardingCore
from services.sharding.store import FILENAME, MapStore, StoreError

ROOT = Path(__file__).resolve().parent.parent


def busy_core() -> ShardingCore:
    core = ShardingCore(ShardingConfig(default_shards=8))
    for i in range(3):
        core.add_node(f"n{i}", "abc"[i], 1.0, now=float(i))
    core.add_node("n3", "a", 1.0, now=5.0)  # copies in flight
    return core


def test_empty_store_loads_nothing_and_uses_wal(tmp_path: Path) -> None:
    with MapStore(tmp_path) as store:
        assert store.load() is None
    db = sqlite3.connect(tmp_path / FILENAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_save_then_load_returns_the_last_epoch_and_its_moves(tmp_path: Path) -> None:
    core = busy_core()
    with MapStore(tmp_path) as store:
        first = core.snapshot(10.0)
        store.save(*first)
        core.tick(11.0)
        core.confirm(next(p["shard"] for p in core.pending_moves() if p["state"] == "copying"), "n3", 12.0)
        shard_map, state = core.snapshot(12.0)
        store.save(shard_map, state)
    with MapStore(tmp_path) as store:
        loaded = store.load()
    assert loaded is not None
    assert loaded[0] == shard_map and loaded[0].epoch > first[0].epoch
    assert loaded[1] == state
    restored = ShardingCore.restore(loaded[0], loaded[1], now=100.0, config=core.config)
    assert restored.pending_moves(100.0) and restored.map().value == shard_map


def test_saving_an_older_epoch_is_refused_and_the_same_epoch_replaces(tmp_path: Path) -> None:
    core = busy_core()
    m, state = core.snapshot(0.0)
    with MapStore(tmp_path) as store:
        store.save(m, state)
        store.save(m, {**state, "note": 1})
        assert store.load()[1]["note"] == 1  # type: ignore[index]
        with pytest.raises(Conflict):
            store.save(ShardMap(m.epoch - 1, m.keyspaces), state)
        assert store.load()[0].epoch == m.epoch  # type: ignore[index]


def test_only_the_last_epochs_are_kept(tmp_path: Path) -> None:
    core = ShardingCore(ShardingConfig(default_shards=2))
    with MapStore(tmp_path, keep=3) as store:
        for i in range(6):
            core.add_node(f"n{i}", "", 1.0, now=float(i))
            store.save(*core.snapshot(float(i)))
        epochs = store.epochs()
    assert len(epochs) == 3 and epochs[-1] == core.epoch


def test_corrupt_row_is_reported_not_silently_ignored(tmp_path: Path) -> None:
    with MapStore(tmp_path) as store:
        store.save(*busy_core().snapshot(0.0))
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("UPDATE epochs SET map = x'c1'")
    db.commit()
    db.close()
    with MapStore(tmp_path) as store, pytest.raises(StoreError):
        store.load()


WRITER = textwrap.dedent(
    """
    import sys
    from services.sharding.config import ShardingConfig
    from services.sharding.core import ShardingCore
    from services.sharding.store import MapStore

    core = ShardingCore(ShardingConfig(default_shards=256))
    store = MapStore(sys.argv[1])
    now = 0.0
    i = 0
    while True:
        now += 1.0
        i += 1
        core.add_node(f"n{i % 7}", "abc"[i % 3], 1.0 + i % 3, now=now)
        for p in core.pending_moves(now)[:3]:
            if p["state"] == "copying":
                core.confirm(p["shard"], p["node"], now)
        core.tick(now)
        shard_map, state = core.snapshot(now)
        store.save(shard_map, state)
        print(shard_map.epoch, flush=True)
    """
)


def test_writer_killed_mid_way_leaves_the_last_committed_epoch(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    committed: list[int] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while len(committed) < 15 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            committed.append(int(line))
        proc.send_signal(signal.SIGKILL)  # most likely inside a transaction: it saves in a loop
    finally:
        proc.kill()
        proc.wait(10)
    assert len(committed) >= 15, "the writer did not get going"
    with MapStore(tmp_path) as store:
        loaded = store.load()
        assert loaded is not None
        shard_map, state = loaded
        # Everything it reported is on disk; at most the save it was in when killed is more.
        assert shard_map.epoch >= committed[-1]
        assert state["epoch"] == shard_map.epoch
        restored = ShardingCore.restore(shard_map, state, now=0.0, config=ShardingConfig(default_shards=256))
        assert restored.epoch == shard_map.epoch
        restored.tick(1.0)
        store.save(*restored.snapshot(1.0))  # the store still takes writes after the crash
