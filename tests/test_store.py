"""The store's semantics, pinned once and run against every backend (memory, SQLite, etcd)."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from phantom_bus.errors import BadRequest
from phantom_bus.store import (
    CasFailed,
    Change,
    Compacted,
    Compare,
    Delete,
    Fence,
    Fenced,
    LeaseExpired,
    Put,
    Store,
    StoreError,
    open_store,
)
from phantom_bus.store.memory import MemoryStore
from phantom_bus.store.sqlite import SqliteStore

_prefixes = itertools.count()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """A store under test and how to let time pass for its leases."""

    def __init__(self, kind: str, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.clock = FakeClock()
        self.tmp = tmp
        if kind == "etcd":
            self.etcd = request.getfixturevalue("etcd")

    def open(self) -> Store:
        prefix = f"/test{next(_prefixes)}-{time.time_ns()}/"
        if self.kind == "memory":
            return MemoryStore(prefix=prefix, clock=self.clock, poll=0.01)
        if self.kind == "sqlite":
            return SqliteStore(self.tmp / "store.sqlite3", prefix=prefix, poll=0.01)
        return open_store(self.etcd.url, data_dir=str(self.tmp), prefix=prefix)

    async def let_pass(self, seconds: float) -> None:
        if self.kind == "memory":
            self.clock.now += seconds
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(seconds)

    def run(self, body: Callable[[Store], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            store = self.open()
            try:
                return await asyncio.wait_for(body(store), 60)
            finally:
                await store.close()

        return asyncio.run(main())


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return Backend(request.param, tmp_path, request)


async def collect(changes: AsyncIterator[Change], count: int, timeout: float = 10.0) -> list[Change]:
    out: list[Change] = []

    async def pull() -> None:
        async for change in changes:
            out.append(change)
            if len(out) == count:
                return

    await asyncio.wait_for(pull(), timeout)
    return out


# --- reads and writes ---------------------------------------------------------------


def test_put_versions_a_key_with_the_global_revision(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert await store.get("a") is None
        _, start = await store.range("")
        r1 = await store.put("a", b"1")
        r2 = await store.put("b", b"2")
        r3 = await store.put("a", b"3")
        assert (r1, r2, r3) == (start + 1, start + 2, start + 3)
        a = await store.get("a")
        assert a is not None
        assert (a.key, a.value, a.create_revision, a.mod_revision, a.version, a.lease) == ("a", b"3", r1, r3, 2, None)

    backend.run(body)


def test_range_returns_the_prefix_sorted_with_the_revision_read(backend: Backend) -> None:
    async def body(store: Store) -> None:
        for key in ("nodes/b", "nodes/a", "nodesx", "shards/1", "nodes/c/d"):
            last = await store.put(key, key.encode())
        entries, rev = await store.range("nodes/")
        assert [e.key for e in entries] == ["nodes/a", "nodes/b", "nodes/c/d"]
        assert rev == last
        assert (await store.range("none/"))[0] == []

    backend.run(body)


def test_txn_applies_all_or_nothing(backend: Backend) -> None:
    async def body(store: Store) -> None:
        r0 = await store.put("x", b"0")
        rev = await store.txn([Compare("x", r0)], [Put("x", b"1"), Put("y", b"1"), Delete("gone")])
        assert rev == r0 + 1
        assert [(e.key, e.mod_revision) for e in (await store.range(""))[0]] == [("x", rev), ("y", rev)]
        with pytest.raises(CasFailed) as err:
            await store.txn([Compare("x", r0)], [Put("x", b"2"), Put("z", b"2")])
        assert err.value.details == {"key": "x", "expected": r0, "current": rev}
        entries, after = await store.range("")
        assert after == rev and [e.key for e in entries] == ["x", "y"]

    backend.run(body)


def test_put_expect_is_compare_and_swap_on_mod_revision(backend: Backend) -> None:
    async def body(store: Store) -> None:
        r1 = await store.put("k", b"1", expect=0)
        with pytest.raises(CasFailed):
            await store.put("k", b"again", expect=0)
        r2 = await store.put("k", b"2", expect=r1)
        with pytest.raises(CasFailed):
            await store.put("k", b"stale", expect=r1)
        with pytest.raises(CasFailed):
            await store.delete("k", expect=r1)
        await store.delete("k", expect=r2)
        assert await store.get("k") is None

    backend.run(body)


def test_delete_of_a_missing_key_does_not_move_the_revision(backend: Backend) -> None:
    async def body(store: Store) -> None:
        rev = await store.put("a", b"1")
        assert await store.delete("missing") == rev
        assert await store.delete("a") == rev + 1

    backend.run(body)


def test_a_fence_refuses_writes_once_the_leader_record_moved_on(backend: Backend) -> None:
    async def body(store: Store) -> None:
        term = await store.put("leaders/s", b"me", expect=0)
        fence = Fence("leaders/s", term)
        await store.put("map", b"v1", fence=fence)
        await store.put("leaders/s", b"other")
        with pytest.raises(Fenced) as err:
            # the fence is reported even though the compare fails too
            await store.put("map", b"v2", expect=0, fence=fence)
        assert isinstance(err.value, CasFailed)
        await store.delete("leaders/s")
        with pytest.raises(Fenced):
            await store.put("map", b"v3", fence=fence)
        entry = await store.get("map")
        assert entry is not None and entry.value == b"v1"

    backend.run(body)


def test_bad_input_is_refused_without_writing(backend: Backend) -> None:
    async def body(store: Store) -> None:
        _, rev = await store.range("")
        with pytest.raises(BadRequest):
            await store.put("", b"x")
        with pytest.raises(BadRequest):
            await store.put("k", "text")  # type: ignore[arg-type]
        with pytest.raises(BadRequest):
            await store.txn([], [Put("k", b"1"), Delete("k")])
        with pytest.raises(BadRequest):
            await store.grant(0)
        assert (await store.range(""))[1] == rev

    backend.run(body)


# --- watch ------------------------------------------------------------------------


def test_watch_replays_from_a_revision_and_follows_new_changes(backend: Backend) -> None:
    async def body(store: Store) -> None:
        r1 = await store.put("w/a", b"1")
        await store.put("other", b"x")
        r3 = await store.delete("w/a")
        watch = store.watch("w/", r1)
        first = await collect(watch, 2)
        assert first == [Change("put", "w/a", b"1", r1), Change("delete", "w/a", None, r3)]
        r4 = await store.txn([], [Put("w/b", b"2"), Put("w/c", b"3")])
        more = await collect(watch, 2)
        assert more == [Change("put", "w/b", b"2", r4), Change("put", "w/c", b"3", r4)]
        await watch.aclose()  # type: ignore[attr-defined]

    backend.run(body)


def test_watch_from_compacted_history_raises_compacted(backend: Backend) -> None:
    async def body(store: Store) -> None:
        r1 = await store.put("c/a", b"1")
        r2 = await store.put("c/a", b"2")
        await store.compact(r2)
        with pytest.raises(Compacted):
            await collect(store.watch("c/", r1), 1)
        assert await collect(store.watch("c/", r2), 1) == [Change("put", "c/a", b"2", r2)]

    backend.run(body)


# --- leases ---------------------------------------------------------------------------


def test_lease_expiry_deletes_its_keys_and_keepalive_holds_them(backend: Backend) -> None:
    async def body(store: Store) -> None:
        kept, lapsing = await store.grant(2), await store.grant(2)
        _, rev = await store.range("")
        await store.put("l/kept", b"k", lease=kept)
        await store.put("l/lapsing", b"l", lease=lapsing)
        entry = await store.get("l/lapsing")
        assert entry is not None and entry.lease == lapsing
        watch = store.watch("l/", rev + 1)
        deadline = time.monotonic() + 15
        while await store.get("l/lapsing") is not None:
            assert time.monotonic() < deadline, "lease never expired"
            assert await store.keepalive(kept) > 0
            await backend.let_pass(0.5)
        assert await store.get("l/kept") is not None
        changes = await collect(watch, 3)
        assert changes[2].kind == "delete" and changes[2].key == "l/lapsing"
        with pytest.raises(LeaseExpired):
            await store.keepalive(lapsing)
        with pytest.raises(LeaseExpired):
            await store.put("l/late", b"x", lease=lapsing)

    backend.run(body)


def test_revoke_deletes_the_keys_at_once(backend: Backend) -> None:
    async def body(store: Store) -> None:
        lease = await store.grant(30)
        await store.put("r/a", b"1", lease=lease)
        await store.put("r/b", b"1", lease=lease)
        await store.revoke(lease)
        assert (await store.range("r/"))[0] == []
        with pytest.raises(LeaseExpired):
            await store.keepalive(lease)
        await store.revoke(lease)  # already gone: no error

    backend.run(body)


# --- SQLite: several handles, failures ----------------------------------------------


def test_two_sqlite_handles_on_one_file_are_one_store(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"

    async def writer(store: SqliteStore, times: int) -> None:
        done = 0
        while done < times:
            entry = await store.get("counter")
            value = int(entry.value) if entry else 0
            try:
                await store.put("counter", str(value + 1).encode(), expect=entry.mod_revision if entry else 0)
            except CasFailed:
                continue
            done += 1

    async def main() -> None:
        a, b = SqliteStore(path, poll=0.01), SqliteStore(path, poll=0.01)
        try:
            _, start = await b.range("")
            watch = b.watch("counter", start + 1)
            await asyncio.gather(writer(a, 40), writer(b, 40))
            entry = await a.get("counter")
            assert entry is not None and entry.value == b"80" and entry.version == 80
            seen = await collect(watch, 80)
            assert [c.value for c in seen] == [str(i).encode() for i in range(1, 81)]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_sqlite_change_log_stays_within_its_byte_bound(tmp_path: Path) -> None:
    # A big value rewritten at every revision (as a shard map is at every epoch) must not
    # grow the file without end: the log keeps about history_bytes of values.
    async def body() -> None:
        store = SqliteStore(tmp_path / "s.sqlite3", history_bytes=64 * 1024)
        try:
            first = await store.put("map", b"m" * 4096)
            last = first
            for _ in range(300):
                last = await store.put("map", secrets.token_bytes(4096))
            conn = sqlite3.connect(tmp_path / "s.sqlite3")
            try:
                logged = conn.execute("SELECT SUM(LENGTH(value)) FROM changes").fetchone()[0]
            finally:
                conn.close()
            assert logged <= 64 * 1024 + 64 * 4096, logged
            with pytest.raises(Compacted):
                await collect(store.watch("map", first), 1)
            change = (await collect(store.watch("map", last), 1))[0]
            assert change.revision == last and change.value == (await store.get("map")).value  # type: ignore[union-attr]
        finally:
            await store.close()

    asyncio.run(body())


def test_sqlite_write_failure_raises_the_cause_writes_nothing_and_recovers(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteStore(tmp_path / "store.sqlite3")
        try:
            before = await store.put("kept", b"x")

            def disk_full(conn: sqlite3.Connection) -> None:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count={pages}")

            await store._call(disk_full)
            big = [Put(f"big/{i}", bytes(64 * 1024)) for i in range(8)]
            with pytest.raises(StoreError) as err:
                await store.txn([], big)
            assert "database or disk is full" in str(err.value)
            # the handle was reopened (without the limit): the disk "recovered"
            entries, rev = await store.range("")
            assert [e.key for e in entries] == ["kept"] and rev == before
            assert await store.txn([], big) == before + 1

            def read_only(conn: sqlite3.Connection) -> None:
                conn.execute("PRAGMA query_only=1")

            await store._call(read_only)
            with pytest.raises(StoreError, match="attempt to write a readonly database"):
                await store.put("kept", b"changed")
            entry = await store.get("kept")
            assert entry is not None and entry.value == b"x"
            assert await store.put("kept", b"changed") == before + 2
        finally:
            await store.close()

    asyncio.run(main())


def test_sqlite_locked_file_is_a_bounded_store_error(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"

    async def main() -> None:
        store = SqliteStore(path, timeout=0.5)
        await store.put("a", b"1")
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            start = time.monotonic()
            with pytest.raises(StoreError) as err:
                await store.put("a", b"2")
            assert time.monotonic() - start < 3
            assert "locked" in str(err.value) or "no answer" in str(err.value)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await store.put("a", b"3") > 0
        await store.close()

    asyncio.run(main())


def test_sqlite_leases_end_after_a_reboot(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"

    async def main() -> None:
        store = SqliteStore(path)
        lease = await store.grant(600)
        await store.put("held", b"x", lease=lease)
        await store.put("plain", b"y")
        await store.close()
        raw = sqlite3.connect(path)
        raw.execute("UPDATE meta SET value='another-boot' WHERE key='boot_id'")
        raw.commit()
        raw.close()
        again = SqliteStore(path)
        assert await again.get("held") is None
        assert await again.get("plain") is not None
        await again.close()

    asyncio.run(main())


def test_etcd_unreachable_is_a_store_error_within_the_timeout(tmp_path: Path) -> None:
    from tests.conftest import free_port

    async def main() -> None:
        store = open_store(f"etcd://127.0.0.1:{free_port()}", data_dir=str(tmp_path), timeout=1.0)
        start = time.monotonic()
        with pytest.raises(StoreError):
            await store.get("x")
        assert time.monotonic() - start < 5
        await store.close()

    asyncio.run(main())


def test_open_store_refuses_unknown_urls(tmp_path: Path) -> None:
    with pytest.raises(BadRequest):
        open_store("zookeeper://x:1", data_dir=str(tmp_path))
    with pytest.raises(BadRequest):
        open_store("etcd://nohost", data_dir=str(tmp_path))


def test_store_settings_refuse_what_open_store_could_not_use() -> None:
    from phantom_bus import config

    good = config.load(env={"PHANTOM_STORE": "etcd://10.0.0.1:2379,10.0.0.2:2379"}, names=["store"])
    assert good.store == "etcd://10.0.0.1:2379,10.0.0.2:2379"
    assert config.load(env={}, names=["store", "store_prefix", "leader_ttl"]).leader_ttl == 4.0
    for name, bad in [
        ("store", "redis://x:1"),
        ("store", "etcd://h"),
        ("store_prefix", "phantom"),
        ("leader_ttl", "0"),
    ]:
        with pytest.raises(config.ConfigError, match=name):
            config.load(env={f"PHANTOM_{name.upper()}": bad}, names=[name])


def test_etcd_calls_move_to_the_next_endpoint_when_one_is_down(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from tests.conftest import free_port

    etcd = request.getfixturevalue("etcd")
    url = f"etcd://127.0.0.1:{free_port()},127.0.0.1:{etcd.client_port}"

    async def main() -> None:
        store = open_store(url, data_dir=str(tmp_path), prefix=f"/failover-{time.time_ns()}/", timeout=1.0)
        try:
            with pytest.raises(StoreError, match=r"etcd 127\.0\.0\.1"):
                await store.put("k", b"v")
            assert await store.put("k", b"v") > 0
            entry = await store.get("k")
            assert entry is not None and entry.value == b"v"
        finally:
            await store.close()

    asyncio.run(main())
