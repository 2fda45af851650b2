"""``phantom snapshot save|restore`` of the SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from phantom_bus.cli import main
from phantom_bus.store import Compacted
from phantom_bus.store.sqlite import SqliteStore


def cli(data: Path, *args: str) -> int:
    return main(["snapshot", *args, "--data", str(data), "--store", "sqlite"])


def test_save_while_writing_then_restore_brings_the_old_state_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, snap = tmp_path / "var", tmp_path / "snap.sqlite3"

    async def write(n: int, tag: str) -> int:
        store = SqliteStore(data / "store.sqlite3")
        try:
            rev = 0
            for i in range(n):
                rev = await store.put(f"k/{i}", tag.encode())
            return rev
        finally:
            await store.close()

    saved_rev = asyncio.run(write(20, "old"))
    assert cli(data, "save", str(snap)) == 0
    assert f"saved store revision {saved_rev} (20 keys)" in capsys.readouterr().out
    asyncio.run(write(30, "new"))

    async def watch_then_restore() -> None:
        store = SqliteStore(data / "store.sqlite3", poll=0.01)
        try:
            entries, rev = await store.range("k/")
            assert len(entries) == 30
            watch = store.watch("k/", rev + 1)
            pull = asyncio.ensure_future(watch.__anext__())
            await asyncio.sleep(0.1)  # the watcher has seen the current revision
            assert cli(data, "restore", str(snap)) == 0
            with pytest.raises(Compacted, match="went back"):
                await asyncio.wait_for(pull, 10)
            entries, rev = await store.range("k/")
            assert rev == saved_rev and len(entries) == 20 and {e.value for e in entries} == {b"old"}
        finally:
            await store.close()

    asyncio.run(watch_then_restore())


def test_restore_refuses_while_the_control_plane_holds_leases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, snap = tmp_path / "var", tmp_path / "snap.sqlite3"

    async def hold() -> None:
        store = SqliteStore(data / "store.sqlite3")
        try:
            await store.put("registry/n1", b"x")
            lease = await store.grant(600)
            await store.put("leaders/sharding", b"h1", lease=lease)
        finally:
            await store.close()

    asyncio.run(hold())
    assert cli(data, "save", str(snap)) == 0
    assert cli(data, "restore", str(snap)) == 1
    err = capsys.readouterr().err
    assert "running" in err and "leaders/sharding" in err and "make down" in err and "--force" in err
    assert cli(data, "restore", str(snap), "--force") == 0


def test_restore_of_a_file_that_is_no_snapshot_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, junk = tmp_path / "var", tmp_path / "junk"
    junk.write_bytes(b"not a database at all" * 100)
    assert cli(data, "restore", str(junk)) == 1
    assert "not a Phantom store snapshot" in capsys.readouterr().err
    assert not (data / "store.sqlite3").exists()
    assert cli(data, "save", str(tmp_path / "x")) == 1
    assert "no store at" in capsys.readouterr().err


def test_etcd_store_points_to_etcds_own_tools(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["snapshot", "save", "s.db", "--store", "etcd://127.0.0.1:2379"])
    assert code == 1
    assert "etcdctl --endpoints=127.0.0.1:2379 snapshot save s.db" in capsys.readouterr().err
    assert main(["snapshot", "restore", "s.db", "--store", "etcd://127.0.0.1:2379"]) == 1
    assert "etcdutl snapshot restore" in capsys.readouterr().err
