"""Durable node registry: SQLite in WAL mode under ``PHANTOM_DATA``, one row per node.

Use: build the core with ``ManagerCore(config, store.registry(), persist=store.apply)``.
The core calls :meth:`RegistryStore.apply` with the changes of each decision
before it returns the decision, so by the time the shell publishes an event or
sends an action, the state behind it is committed (``synchronous=FULL``: it
survives power loss too). A writer killed mid-transaction leaves the previous
state intact: SQLite rolls the unfinished transaction back on the next open.

One :meth:`RegistryStore.apply` is one transaction, so a decision that
touches several rows (a removal deletes a node and writes its tombstone) is
all or nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from phantom_bus.errors import BadRequest
from services.sqlite_store import StoreError, open_store

from .registry import Change, NodeRecord, Registry, Tombstone, TombstoneDropped

FILENAME = "manager.sqlite3"
SCHEMA_VERSION = 1

_COLUMNS = (
    "id",
    "address",
    "zone",
    "weight",
    "incarnation",
    "lifecycle",
    "member",
    "member_since",
    "first_seen",
    "last_change",
    "reason",
    "approved",
    "source",
)


class RegistryStore:
    """The manager's durable registry under ``directory`` (created if missing). Thread-safe."""

    def __init__(self, directory: str | Path, filename: str = FILENAME) -> None:
        self.path = Path(directory) / filename
        self._lock = threading.Lock()
        self._db = open_store(
            self.path,
            SCHEMA_VERSION,
            (
                # Explicit columns rather than a blob: an operator can read the registry
                # with the sqlite3 shell during an incident.
                "CREATE TABLE IF NOT EXISTS nodes ("
                "id TEXT PRIMARY KEY, address TEXT NOT NULL, zone TEXT NOT NULL, weight REAL NOT NULL, "
                "incarnation INTEGER NOT NULL, lifecycle TEXT NOT NULL, member TEXT, member_since REAL, "
                "first_seen REAL NOT NULL, last_change REAL NOT NULL, reason TEXT NOT NULL, "
                "approved INTEGER NOT NULL, source TEXT NOT NULL)",
                # seq orders tombstones oldest first, whatever the clock did.
                "CREATE TABLE IF NOT EXISTS tombstones ("
                "seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
                "incarnation INTEGER NOT NULL, removed_at REAL NOT NULL, reason TEXT NOT NULL)",
            ),
        )

    def apply(self, changes: Iterable[Change]) -> None:
        """Commit ``changes`` (from :meth:`Registry.take_changes`) in one transaction, in order."""
        batch = list(changes)
        if not batch:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for change in batch:
                    if isinstance(change, NodeRecord):
                        db.execute(
                            f"INSERT OR REPLACE INTO nodes ({', '.join(_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                            tuple(getattr(change, c) for c in _COLUMNS),
                        )
                        # A registered node is no longer a removed one.
                        db.execute("DELETE FROM tombstones WHERE id = ?", (change.id,))
                    elif isinstance(change, Tombstone):
                        db.execute("DELETE FROM nodes WHERE id = ?", (change.id,))
                        db.execute("DELETE FROM tombstones WHERE id = ?", (change.id,))
                        db.execute(
                            "INSERT INTO tombstones (id, incarnation, removed_at, reason) VALUES (?, ?, ?, ?)",
                            (change.id, change.incarnation, change.removed_at, change.reason),
                        )
                    elif isinstance(change, TombstoneDropped):
                        db.execute("DELETE FROM tombstones WHERE id = ?", (change.id,))
                    else:
                        raise TypeError(f"not a registry change: {change!r}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def load(self) -> tuple[list[NodeRecord], list[Tombstone]]:
        """Every committed node (sorted by id) and tombstone (oldest first)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM nodes ORDER BY id").fetchall()
            tombs = self._db.execute(
                "SELECT id, incarnation, removed_at, reason FROM tombstones ORDER BY seq"
            ).fetchall()
        records = []
        for row in rows:
            doc = dict(zip(_COLUMNS, row, strict=True))
            doc["approved"] = bool(doc["approved"])
            try:
                records.append(NodeRecord.from_dict(doc))
            except BadRequest as exc:
                raise StoreError(f"{self.path}: node row {doc.get('id')!r} cannot be read: {exc.message}") from exc
        return records, [Tombstone(str(i), int(inc), float(at), str(why)) for i, inc, at, why in tombs]

    def registry(self, max_tombstones: int = 1024) -> Registry:
        """A :class:`Registry` holding what is on disk."""
        records, tombstones = self.load()
        return Registry.restore(records, tombstones, max_tombstones)

    def close(self) -> None:
        """Close the database (a checkpoint folds the WAL into the main file)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
