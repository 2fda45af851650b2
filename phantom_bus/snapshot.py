"""Backup and restore of the SQLite store (``phantom snapshot save|restore FILE``).

``save`` uses SQLite's online backup API, so the copy is consistent (one
revision) while the control plane keeps running and writing. ``restore``
copies a snapshot back into ``DATA/store.sqlite3`` the same way; it refuses
while the control plane is running (a live lease in the store means a
process holds it) unless forced, because the running processes would
suddenly see an older state. With an etcd store, etcd's own tools do this
(``etcdctl snapshot save``, ``etcdutl snapshot restore``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from phantom_bus.errors import Refused, StoreError
from phantom_bus.store.sqlite import SCHEMA, SqliteStore, monotonic


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What a snapshot file holds."""

    path: Path
    revision: int
    keys: int


def inspect(path: Path) -> SnapshotInfo:
    """Check that ``path`` is a store snapshot this code reads; :class:`StoreError` if not."""
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            keys = conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0]
            conn.execute("SELECT COUNT(*) FROM changes").fetchone()
            conn.execute("SELECT COUNT(*) FROM leases").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a Phantom store snapshot: {exc}") from exc
    if meta.get("schema") != SCHEMA or "revision" not in meta:
        raise StoreError(f"{path} is not a Phantom store snapshot this code reads (schema {meta.get('schema')!r})")
    return SnapshotInfo(path, int(meta["revision"]), int(keys))


async def save(store: SqliteStore, dest: Path) -> SnapshotInfo:
    """Write a consistent snapshot of ``store`` to ``dest`` (atomically: a temp file, then rename)."""
    dest = dest.resolve()
    tmp = dest.with_name(dest.name + ".partial")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        await store.backup(tmp)
        info = inspect(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return SnapshotInfo(dest, info.revision, info.keys)


def live_holders(store_path: Path) -> list[str]:
    """The keys held by leases that have not expired: non-empty while the control plane runs."""
    if not store_path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(
                "SELECT kv.key FROM kv JOIN leases ON kv.lease = leases.id WHERE leases.expires > ? ORDER BY kv.key",
                (monotonic(),),
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return []  # not a readable store: nothing can be running on it
    return [key for (key,) in rows]


def restore(snapshot: Path, store_path: Path, *, force: bool = False) -> SnapshotInfo:
    """Replace the store at ``store_path`` with ``snapshot``; :class:`Refused` while it is in use."""
    info = inspect(snapshot)
    holders = live_holders(store_path)
    if holders and not force:
        shown = ", ".join(holders[:5]) + (" ..." if len(holders) > 5 else "")
        raise Refused(
            f"the control plane is running on {store_path} (live leases hold {shown}); "
            "stop it first (`make down`), or pass --force to restore under it "
            "(running processes then see the older state and must re-read)"
        )
    store_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        src = sqlite3.connect(f"file:{snapshot}?mode=ro", uri=True)
        dst = sqlite3.connect(store_path, timeout=10)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"restore into {store_path} failed: {exc}") from exc
    return info
