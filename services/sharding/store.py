"""Durable shard map: SQLite in WAL mode, one file, one row per saved epoch.

The shell calls :meth:`MapStore.save` with the map and the core's resumable
state after every call that changed something, and publishes the call's
events only once ``save`` has returned: a map that anyone has seen is always
on disk. :meth:`MapStore.load` returns the last committed epoch; a writer
killed mid-transaction leaves the previous epoch intact (SQLite rolls the
unfinished transaction back on the next open).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import msgpack

from phantom_bus.errors import BadRequest, Conflict
from phantom_bus.shardmap import ShardMap
from services.sqlite_store import StoreError, open_store

FILENAME = "shardmap.sqlite3"
SCHEMA_VERSION = 1


class MapStore:
    """The sharding service's durable state under ``directory``.

    ``keep`` is how many past epochs stay in the file (for post-mortems); only
    the newest is ever loaded. Safe to share between threads.
    """

    def __init__(self, directory: str | Path, filename: str = FILENAME, keep: int = 16) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.path = Path(directory) / filename
        self.keep = keep
        self._lock = threading.Lock()
        self._db = open_store(
            self.path,
            SCHEMA_VERSION,
            ("CREATE TABLE IF NOT EXISTS epochs (epoch INTEGER PRIMARY KEY, map BLOB NOT NULL, state BLOB NOT NULL)",),
        )

    def save(self, shard_map: ShardMap, state: Mapping[str, Any]) -> None:
        """Commit ``shard_map`` and ``state`` (the in-flight moves) durably.

        Saving the same epoch again replaces it (state can change without a
        new epoch); an epoch older than the newest saved raises :class:`Conflict`.
        """
        blob_map = shard_map.pack()
        blob_state = cast(bytes, msgpack.packb(dict(state), use_bin_type=True))
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT MAX(epoch) FROM epochs").fetchone()
                newest = row[0] if row and row[0] is not None else -1
                if shard_map.epoch < newest:
                    raise Conflict(
                        f"epoch {shard_map.epoch} is older than the saved epoch {newest}; refusing to go back"
                    )
                db.execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?)", (shard_map.epoch, blob_map, blob_state))
                db.execute("DELETE FROM epochs WHERE epoch <= ?", (shard_map.epoch - self.keep,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def load(self) -> tuple[ShardMap, dict[str, Any]] | None:
        """The newest committed map and state, or None if nothing was ever saved."""
        with self._lock:
            row = self._db.execute("SELECT epoch, map, state FROM epochs ORDER BY epoch DESC LIMIT 1").fetchone()
        if row is None:
            return None
        epoch, blob_map, blob_state = row
        try:
            shard_map = ShardMap.unpack(bytes(blob_map))
            state = msgpack.unpackb(bytes(blob_state), raw=False, strict_map_key=False)
        except (BadRequest, ValueError, msgpack.UnpackException) as exc:
            raise StoreError(f"{self.path}: epoch {epoch} cannot be read: {exc}") from exc
        if shard_map.epoch != epoch or not isinstance(state, dict):
            raise StoreError(f"{self.path}: row for epoch {epoch} holds epoch {shard_map.epoch}")
        return shard_map, state

    def epochs(self) -> list[int]:
        """Epochs kept in the file, oldest first."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT epoch FROM epochs ORDER BY epoch")]

    def close(self) -> None:
        """Close the database (a checkpoint folds the WAL into the main file)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> MapStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
