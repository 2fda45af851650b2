"""The manager's SQLite registry store: round trips, reopen, atomicity, SIGKILL mid-write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from services.manager.config import ManagerConfig
from services.manager.core import ManagerCore
from services.manager.registry import (
    ACTIVE,
    DRAINING,
    NodeRecord,
    Registry,
    Tombstone,
    TombstoneDropped,
)
from services.manager.store import FILENAME, RegistryStore, StoreError

ROOT = Path(__file__).resolve().parent.parent


def record(node: str, inc: int = 1, lifecycle: str = "joining", member: str | None = None) -> NodeRecord:
    return NodeRecord(node, "127.0.0.1:7001", "z1", 1.5, inc, lifecycle, member, None if member is None else 2.0,
                      1.0, 2.0, "because", True, "beacon")


def test_records_round_trip_through_a_reopen(tmp_path: Path) -> None:
    with RegistryStore(tmp_path) as store:
        store.apply([record("b", member="dead"), record("a", lifecycle=ACTIVE)])
    with RegistryStore(tmp_path) as store:
        records, tombs = store.load()
    assert records == [record("a", lifecycle=ACTIVE), record("b", member="dead")] and tombs == []
    assert (tmp_path / FILENAME).exists()


def test_an_upsert_replaces_the_row_and_never_doubles_it(tmp_path: Path) -> None:
    with RegistryStore(tmp_path) as store:
        store.apply([record("a"), record("a", inc=2), replace(record("a", inc=2), lifecycle=ACTIVE)])
        records, _ = store.load()
    assert records == [replace(record("a", inc=2), lifecycle=ACTIVE)]


def test_tombstones_delete_the_node_and_a_new_registration_clears_them(tmp_path: Path) -> None:
    with RegistryStore(tmp_path) as store:
        store.apply([record("a", inc=3), record("b")])
        store.apply([Tombstone("a", 3, 9.0, "removed by operator")])
        assert store.load() == ([record("b")], [Tombstone("a", 3, 9.0, "removed by operator")])
        store.apply([Tombstone("b", 1, 10.0, "x"), TombstoneDropped("a")])
        assert store.load() == ([], [Tombstone("b", 1, 10.0, "x")])
        store.apply([record("b", inc=2)])
        assert store.load() == ([record("b", inc=2)], [])


def test_tombstones_load_oldest_first(tmp_path: Path) -> None:
    with RegistryStore(tmp_path) as store:
        for node, at in (("z", 1.0), ("a", 2.0), ("m", 3.0)):
            store.apply([record(node), Tombstone(node, 1, at, "x")])
        assert [t.id for t in store.load()[1]] == ["z", "a", "m"]


def test_a_batch_is_all_or_nothing(tmp_path: Path) -> None:
    with RegistryStore(tmp_path) as store:
        store.apply([record("a")])
        with pytest.raises(TypeError):
            store.apply([record("b"), Tombstone("a", 1, 2.0, "x"), "not a change"])  # type: ignore[list-item]
        assert store.load() == ([record("a")], [])


def test_a_newer_schema_or_a_corrupt_file_is_refused_with_the_path(tmp_path: Path) -> None:
    RegistryStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 99"):
        RegistryStore(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / FILENAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(bad)):
        RegistryStore(bad)


def test_an_unreadable_row_is_a_store_error(tmp_path: Path) -> None:
    with RegistryStore(tmp_path) as store:
        store.apply([record("a")])
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("UPDATE nodes SET lifecycle = 'zombie'")
    db.commit()
    db.close()
    with RegistryStore(tmp_path) as store, pytest.raises(StoreError, match="zombie"):
        store.load()


def test_the_core_restarts_from_the_store_with_the_same_registry(tmp_path: Path) -> None:
    cfg = ManagerConfig(rereplication_delay=60.0)
    store = RegistryStore(tmp_path)
    core = ManagerCore(cfg, store.registry(), persist=store.apply)
    for n in ("a", "b", "c"):
        core.on_event({"kind": "node.discovered", "node": n, "address": f"10.0.0.1:{7000 + ord(n)}", "zone": "z",
                       "weight": 1.0, "incarnation": 2, "source": "beacon"}, 1.0)
        core.on_event({"kind": "member.alive", "node": n, "incarnation": 2}, 2.0)
    core.drain("b", now=3.0)
    core.remove("c", [], now=4.0)
    core.on_event({"kind": "member.dead", "node": "a", "incarnation": 2}, 5.0)
    expected = core.nodes()
    store.close()  # a clean stop; the kill test below covers the unclean one

    store = RegistryStore(tmp_path)
    again = ManagerCore(cfg, store.registry(), persist=store.apply)
    assert again.nodes() == expected
    assert [r.lifecycle for r in again.nodes()] == [ACTIVE, DRAINING]
    assert again.registry.tombstone("c") is not None
    assert ("sharding", "drain_node") in [(a.service, a.op) for a in again.reconcile(6.0) if a.node == "b"]
    assert [e.kind for e in again.tick(65.0).events] == ["cluster.node_failed"]
    store.close()
    with RegistryStore(tmp_path) as store:
        assert store.registry().get("a").lifecycle == "failed"


def test_store_registry_bounds_tombstones(tmp_path: Path) -> None:
    with RegistryStore(tmp_path) as store:
        for i in range(5):
            store.apply([record(f"n{i}"), Tombstone(f"n{i}", 1, float(i), "x")])
        reg = store.registry(max_tombstones=2)
    assert [t.id for t in reg.tombstones()] == ["n3", "n4"]
    assert isinstance(reg, Registry)


_WRITER = textwrap.dedent(
    """
    import sys
    from services.manager.registry import NodeRecord, Tombstone
    from services.manager.store import RegistryStore

    store = RegistryStore(sys.argv[1])
    gen = 0
    while True:
        gen += 1
        batch = [NodeRecord(f"n{i}", "127.0.0.1:7001", "z1", 1.0, gen, "active", "alive", 1.0, 0.0,
                            float(gen), "gen", True, "beacon") for i in range(20)]
        # Odd generations remove n19 in the same transaction, even ones bring it back.
        if gen % 2:
            batch.append(Tombstone("n19", gen, float(gen), "gen"))
        store.apply(batch)
        print(gen, flush=True)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kill_after", [3, 17, 40])
def test_sigkill_mid_write_leaves_the_last_committed_state(tmp_path: Path, kill_after: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout is not None
        last = 0
        for line in proc.stdout:
            last = int(line)
            if last >= kill_after:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert last >= kill_after, "the writer died before it wrote anything"
    with RegistryStore(tmp_path) as store:
        records, tombs = store.load()
    gens = {r.incarnation for r in records}
    assert len(gens) == 1, f"a torn transaction: generations {gens}"
    gen = gens.pop()
    # Every generation reported as written is on disk (committed before the print).
    assert gen >= last
    if gen % 2:
        assert len(records) == 19 and [t.id for t in tombs] == ["n19"]
    else:
        assert len(records) == 20 and tombs == []
