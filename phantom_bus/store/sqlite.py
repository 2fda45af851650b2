"""The single-host store: one SQLite file that several processes share.

``<data>/store.sqlite3`` in WAL mode; every write is one ``BEGIN IMMEDIATE``
transaction, so two processes (or two handles) on the file see one store
with one revision counter, exactly as two etcd clients would. The file holds:

- ``kv``: the keys, with create/mod revision, version and lease;
- ``changes``: the change log that ``watch`` reads, kept for the last
  ``history`` revisions and at most about ``history_bytes`` of values (a
  large shard map is written whole at every epoch: the byte bound keeps the
  file from growing with it). Older revisions are compacted, and a watch from
  there raises :class:`Compacted`, after which a watcher re-reads;
- ``leases``: expiry times on CLOCK_MONOTONIC, which every process on a host
  shares. Whoever touches the store first after a lease's expiry deletes its
  keys (a read or a watcher's poll is enough). The host's boot id is kept too:
  after a reboot the clock restarts, and every lease (whose holders died with
  the host) is ended.

Every SQLite call runs in this handle's own worker thread, never on the event
loop, and is bounded by ``timeout``. A failure (disk full, read-only file, I/O
error) rolls the transaction back, raises :class:`StoreError` with SQLite's
own message, and closes the connection; the next call opens it again, so a
store whose disk recovered works with no restart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from phantom_bus.errors import BadRequest, PhantomError
from phantom_bus.store.base import (
    Change,
    Compacted,
    Compare,
    Entry,
    Fence,
    LeaseExpired,
    Op,
    Put,
    StoreBase,
    StoreError,
    check_key,
    check_leases,
    check_start_revision,
    check_ttl,
    check_txn,
    precondition_failure,
    prefix_end,
)

T = TypeVar("T")

SCHEMA = 1
_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,"
    " mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS changes (revision INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,"
    " key TEXT NOT NULL, value BLOB, PRIMARY KEY (revision, seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL, expires REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS leases_expires ON leases(expires)",
)
# Revisions between two checks of the log's size against history_bytes.
_SIZE_CHECK_EVERY = 64
_WATCH_BATCH = 500  # revisions read per poll, so a far-behind watcher does not load the whole log at once


def monotonic() -> float:
    """CLOCK_MONOTONIC: the one clock every process on this host reads alike."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def boot_id() -> str:
    """This boot of the host (CLOCK_MONOTONIC restarts at each boot); '' where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class SqliteStore(StoreBase):
    """A :class:`~phantom_bus.store.base.Store` in one SQLite file, shared by the host's processes.

    ``timeout`` bounds every call; ``history`` is how many revisions of change
    log are kept for watchers; ``poll`` is a watcher's polling interval.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        prefix: str = "/phantom/",
        timeout: float = 5.0,
        history: int = 10_000,
        history_bytes: int = 64 * 2**20,
        poll: float = 0.05,
    ) -> None:
        self.path = Path(path)
        self.prefix = prefix
        self.timeout = timeout
        self.history = history
        self.history_bytes = history_bytes
        self.poll = poll
        self._conn: sqlite3.Connection | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="phantom-store")
        self._closed = False

    # --- the worker thread --------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        busy = max(0.1, self.timeout * 0.8)  # a lock wait errors out (with its cause) before our own timeout
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _TABLES:
                conn.execute(statement)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if "schema" not in meta:
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("schema", SCHEMA), ("revision", 1), ("compacted", 0), ("boot_id", boot_id())],
                )
            elif meta["schema"] != SCHEMA:
                raise StoreError(f"{self.path} has store schema {meta['schema']}; this code reads {SCHEMA}")
            elif meta.get("boot_id") != boot_id():
                self._end_all_leases(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def _end_all_leases(self, conn: sqlite3.Connection) -> None:
        # The host rebooted: every lease holder died with it, and old expiry times mean nothing.
        for (lease_id,) in conn.execute("SELECT id FROM leases").fetchall():
            self._end_lease(conn, lease_id)
        conn.execute("UPDATE meta SET value=? WHERE key='boot_id'", (boot_id(),))

    def _guarded(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        try:
            return fn(conn)
        except (PhantomError, ValueError, TypeError):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        except sqlite3.Error:
            # Roll back and drop the handle: the next call opens the file afresh.
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._conn = None
            raise

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError(f"sqlite store {self.path} is closed")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._guarded, fn)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (see memory.py).
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            raise StoreError(
                f"sqlite store {self.path}: no answer within {self.timeout:g} s (disk stalled or file locked)"
            ) from None
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}", cause=str(exc)) from exc
        except OSError as exc:
            raise StoreError(f"sqlite store {self.path}: {exc.strerror or exc}", cause=str(exc)) from exc

    # --- helpers run in the thread ------------------------------------------------

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        return Entry(row[0][len(self.prefix) :], bytes(row[1]), row[2], row[3], row[4], row[5])

    @staticmethod
    def _revision(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])

    def _bump(self, conn: sqlite3.Connection, changes: list[tuple[str, str, bytes | None]]) -> int:
        rev = self._revision(conn) + 1
        conn.execute("UPDATE meta SET value=? WHERE key='revision'", (rev,))
        conn.executemany(
            "INSERT INTO changes VALUES (?, ?, ?, ?, ?)",
            [(rev, seq, kind, key, value) for seq, (kind, key, value) in enumerate(changes)],
        )
        floor = rev - self.history
        if rev % _SIZE_CHECK_EVERY == 0 or sum(len(v) for _, _, v in changes if v) > self.history_bytes // 8:
            floor = max(floor, self._size_floor(conn))
        compacted = int(conn.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0])
        if floor > compacted:
            conn.execute("DELETE FROM changes WHERE revision <= ?", (floor,))
            conn.execute("UPDATE meta SET value=? WHERE key='compacted'", (floor,))
        return rev

    def _size_floor(self, conn: sqlite3.Connection) -> int:
        """The revision up to which to compact so the log's values fit ``history_bytes``
        (0: they fit). Over the bound, it keeps the newest revisions holding half of it,
        and never less than the newest revision, so a check is rare and each one frees a lot."""
        # length() of a blob reads the record header only, not the value's pages.
        total = conn.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM changes").fetchone()[0]
        if total <= self.history_bytes:
            return 0
        kept = 0
        rows = conn.execute(
            "SELECT revision, COALESCE(SUM(LENGTH(value)), 0) FROM changes GROUP BY revision ORDER BY revision DESC"
        )
        newest = True
        for revision, size in rows:
            if not newest and kept + size > self.history_bytes // 2:
                return int(revision)
            kept += size
            newest = False
        return 0

    def _end_lease(self, conn: sqlite3.Connection, lease_id: int) -> None:
        keys = [k for (k,) in conn.execute("SELECT key FROM kv WHERE lease=? ORDER BY key", (lease_id,))]
        conn.execute("DELETE FROM leases WHERE id=?", (lease_id,))
        if keys:
            conn.execute("DELETE FROM kv WHERE lease=?", (lease_id,))
            self._bump(conn, [("delete", key, None) for key in keys])

    def _expire_in_txn(self, conn: sqlite3.Connection) -> None:
        now = monotonic()
        for (lease_id,) in conn.execute("SELECT id FROM leases WHERE expires <= ?", (now,)).fetchall():
            self._end_lease(conn, lease_id)

    def _sweep(self, conn: sqlite3.Connection) -> None:
        """End expired leases, taking the write lock only when there is one to end."""
        due = conn.execute("SELECT 1 FROM leases WHERE expires <= ? LIMIT 1", (monotonic(),)).fetchone()
        if due is None:
            return
        conn.execute("BEGIN IMMEDIATE")
        self._expire_in_txn(conn)
        conn.execute("COMMIT")

    # --- reads ----------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        full = self._full(key)

        def run(conn: sqlite3.Connection) -> Entry | None:
            self._sweep(conn)
            row = conn.execute("SELECT * FROM kv WHERE key=?", (full,)).fetchone()
            return None if row is None else self._entry(row)

        return await self._call(run)

    async def range(self, prefix: str) -> tuple[list[Entry], int]:
        low = self.prefix + prefix
        high = prefix_end(low)

        def run(conn: sqlite3.Connection) -> tuple[list[Entry], int]:
            self._sweep(conn)
            conn.execute("BEGIN")  # one snapshot for the rows and the revision
            if high:
                rows = conn.execute("SELECT * FROM kv WHERE key >= ? AND key < ? ORDER BY key", (low, high))
            else:
                rows = conn.execute("SELECT * FROM kv WHERE key >= ? ORDER BY key", (low,))
            entries = [self._entry(row) for row in rows.fetchall()]
            rev = self._revision(conn)
            conn.execute("COMMIT")
            return entries, rev

        return await self._call(run)

    # --- writes ---------------------------------------------------------------------

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op], fence: Fence | None = None) -> int:
        check_txn(compares, ops, fence)
        p = self.prefix

        def current(conn: sqlite3.Connection, key: str) -> int:
            row = conn.execute("SELECT mod_rev FROM kv WHERE key=?", (p + key,)).fetchone()
            return 0 if row is None else int(row[0])

        def run(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            self._expire_in_txn(conn)
            failed = precondition_failure(compares, fence, lambda key: current(conn, key))
            if failed is not None:
                raise failed
            check_leases(ops, lambda lease: conn.execute("SELECT 1 FROM leases WHERE id=?", (lease,)).fetchone()
                         is not None)
            changes: list[tuple[str, str, bytes | None]] = []
            for op in ops:
                if isinstance(op, Put) or current(conn, op.key):
                    changes.append(("put" if isinstance(op, Put) else "delete", p + op.key, _value(op)))
            if not changes:
                rev = self._revision(conn)
                conn.execute("COMMIT")
                return rev
            rev = self._bump(conn, changes)
            for op in ops:
                if isinstance(op, Put):
                    conn.execute(
                        "INSERT INTO kv VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(key) DO UPDATE SET"
                        " value=excluded.value, mod_rev=excluded.mod_rev, version=version+1, lease=excluded.lease",
                        (p + op.key, op.value, rev, rev, op.lease),
                    )
                else:
                    conn.execute("DELETE FROM kv WHERE key=?", (p + op.key,))
            conn.execute("COMMIT")
            return rev

        return await self._call(run)

    # --- history --------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        """As :class:`~phantom_bus.store.base.Store` says. Polls the revision every ``poll`` seconds."""
        check_start_revision(start_revision)
        low = self.prefix + prefix
        high = prefix_end(low) or "\U0010ffff"
        cut = len(self.prefix)
        next_rev = start_revision
        seen = 0  # the highest store revision this watcher has seen

        def poll(conn: sqlite3.Connection) -> tuple[list[Change], int]:
            nonlocal seen
            self._sweep(conn)
            conn.execute("BEGIN")
            rev = self._revision(conn)
            if rev < seen:
                conn.execute("COMMIT")
                # The file was replaced by an older snapshot: this history no longer exists.
                raise Compacted(
                    f"store revision went back from {seen} to {rev} (restored from a snapshot?): re-read",
                    revision=next_rev,
                    compacted=rev,
                )
            seen = rev
            compacted = int(conn.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0])
            if next_rev <= compacted:
                conn.execute("COMMIT")
                raise Compacted(
                    f"revision {next_rev} is compacted (history starts after {compacted})",
                    revision=next_rev,
                    compacted=compacted,
                )
            upper = min(rev, next_rev + _WATCH_BATCH - 1)
            rows = conn.execute(
                "SELECT revision, kind, key, value FROM changes WHERE revision >= ? AND revision <= ?"
                " AND key >= ? AND key < ? ORDER BY revision, seq",
                (next_rev, upper, low, high),
            ).fetchall()
            conn.execute("COMMIT")
            changes = [
                Change(kind, key[cut:], None if value is None else bytes(value), r) for r, kind, key, value in rows
            ]
            return changes, max(next_rev, upper + 1)

        while True:
            changes, after = await self._call(poll)
            moved = after != next_rev
            next_rev = after
            for change in changes:
                yield change
            if not moved:
                await asyncio.sleep(self.poll)

    async def compact(self, revision: int) -> None:

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            rev = self._revision(conn)
            if revision > rev + 1:
                raise BadRequest(f"cannot compact to {revision}: the store is at revision {rev}")
            compacted = int(conn.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0])
            if revision - 1 > compacted:
                conn.execute("DELETE FROM changes WHERE revision < ?", (revision,))
                conn.execute("UPDATE meta SET value=? WHERE key='compacted'", (revision - 1,))
            conn.execute("COMMIT")

        await self._call(run)

    # --- leases ---------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        check_ttl(ttl)

        def run(conn: sqlite3.Connection) -> int:
            while True:
                lease_id = secrets.randbits(62) + 1
                try:
                    conn.execute("INSERT INTO leases VALUES (?, ?, ?)", (lease_id, float(ttl), monotonic() + ttl))
                except sqlite3.IntegrityError:
                    continue
                return lease_id

        return await self._call(run)

    async def keepalive(self, lease: int) -> float:

        def run(conn: sqlite3.Connection) -> float:
            conn.execute("BEGIN IMMEDIATE")
            self._expire_in_txn(conn)
            row = conn.execute("SELECT ttl FROM leases WHERE id=?", (lease,)).fetchone()
            if row is None:
                raise LeaseExpired(f"lease {lease} not found (expired or revoked)", lease=lease)
            conn.execute("UPDATE leases SET expires=? WHERE id=?", (monotonic() + row[0], lease))
            conn.execute("COMMIT")
            return float(row[0])

        return await self._call(run)

    async def revoke(self, lease: int) -> None:

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("SELECT 1 FROM leases WHERE id=?", (lease,)).fetchone() is not None:
                self._end_lease(conn, lease)
            conn.execute("COMMIT")

        await self._call(run)

    # --- backup and lifecycle -------------------------------------------------------

    async def backup(self, dest: str | Path) -> int:
        """Write a consistent copy of the store to ``dest`` (SQLite's online backup); its revision."""
        target = Path(dest)

        def run(conn: sqlite3.Connection) -> int:
            out = sqlite3.connect(target)
            try:
                conn.backup(out)
            finally:
                out.close()
            return self._revision(conn)

        return await self._call(run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await loop.run_in_executor(self._pool, run)
        self._pool.shutdown(wait=False)


def _value(op: Op) -> bytes | None:
    return op.value if isinstance(op, Put) else None
