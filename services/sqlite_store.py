"""Opening a service's SQLite file the one way durable state needs it.

The sharding map and the manager's registry are both committed before the
decisions that depend on them are published, so both need: WAL (readers do
not block the writer), ``synchronous=FULL`` (a commit survives a power cut,
not only a killed process), explicit transactions, and a schema version
that refuses files written by newer code.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path


class StoreError(RuntimeError):
    """The store file exists but cannot be used (corrupt, newer schema, unreadable row)."""


def open_store(path: Path, schema: int, tables: Iterable[str]) -> sqlite3.Connection:
    """Open (creating if missing) the database at ``path`` with ``tables`` (CREATE
    statements) and check its schema version; :class:`StoreError` if unusable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
        for statement in tables:
            db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (schema,))
        elif row[0] != schema:
            raise StoreError(f"{path} has schema {row[0]}; this code reads {schema}")
    except StoreError:
        db.close()
        raise
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"cannot open {path}: {exc}") from exc
    return db
