"""The shard map in the control plane's store: three keys written by one fenced txn.

Keys (relative to the store prefix):

``shardmap/epoch``
    ``{"epoch", "term", "wall"}``: the epoch record. Every commit compares its
    ``mod_revision`` with the one the writer last read (compare-and-swap), so
    two writers can never both create an epoch, and refuses an epoch older
    than the one stored, so an epoch never goes back.
``shardmap/map``
    The packed :class:`~phantom_bus.shardmap.ShardMap` (what readers are served).
``shardmap/state``
    The core's resumable state (nodes and their dead-delay timers, pending
    moves, merges, avoided pairs): what a new leader needs to carry on.

All three are written in one transaction carrying the leader's
:class:`~phantom_bus.store.Fence`, so a deposed or paused leader's commit is
refused (:class:`~phantom_bus.store.Fenced`) and nothing is half-written.

Timers in the state are ages relative to the moment of the save, plus the
wall-clock time of the save (``wall``): a process that resumes them later, on
this host or another, adds the wall-clock time that has passed since (never
less than zero), so a leader change or a restart does not restart a
dead-delay timer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from phantom_bus.errors import BadRequest, Conflict
from phantom_bus.shardmap import ShardMap
from phantom_bus.store import Compare, Entry, Fence, Put, Store, StoreError

PREFIX = "shardmap/"
EPOCH_KEY = PREFIX + "epoch"
MAP_KEY = PREFIX + "map"
STATE_KEY = PREFIX + "state"
#: The file the sharding service used before the shared store; never read now.
LEGACY_FILE = "shardmap.sqlite3"


@dataclass(frozen=True, slots=True)
class Committed:
    """One committed epoch as read from (or written to) the store."""

    map: ShardMap
    blob: bytes  # the map as msgpack: the cached reply of the ``map`` operation for this epoch
    state: dict[str, Any]
    term: int
    wall: float  # wall-clock seconds of the save
    epoch_revision: int  # mod_revision of the epoch record: the CAS token of the next commit
    revision: int  # the store revision this was read at (or written with)

    @property
    def epoch(self) -> int:
        """The map's epoch."""
        return self.map.epoch


def _pack(doc: Mapping[str, Any]) -> bytes:
    return cast(bytes, msgpack.packb(dict(doc), use_bin_type=True))


def _unpack(blob: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise StoreError(f"stored {what} is not valid msgpack: {exc}") from exc


def decode(entries: Sequence[Entry], revision: int) -> Committed | None:
    """The committed epoch held by ``entries`` (a range over :data:`PREFIX`); None if empty.

    :class:`StoreError` when the keys do not form one consistent epoch.
    """
    by_key = {e.key: e for e in entries}
    rec, blob_map, blob_state = by_key.get(EPOCH_KEY), by_key.get(MAP_KEY), by_key.get(STATE_KEY)
    if rec is None and blob_map is None and blob_state is None:
        return None
    if rec is None or blob_map is None or blob_state is None:
        raise StoreError(f"the stored shard map is incomplete: keys {sorted(by_key)} under {PREFIX}")
    doc = _unpack(rec.value, "epoch record")
    state = _unpack(blob_state.value, "sharding state")
    try:
        shard_map = ShardMap.unpack(blob_map.value)
    except BadRequest as exc:
        raise StoreError(f"the stored shard map cannot be read: {exc.message}") from exc
    if not isinstance(doc, dict) or not isinstance(state, dict):
        raise StoreError("the stored epoch record or sharding state is not a map")
    if doc.get("epoch") != shard_map.epoch or state.get("epoch") != shard_map.epoch:
        raise StoreError(
            f"the stored epoch record says {doc.get('epoch')!r}, the map {shard_map.epoch}, "
            f"the state {state.get('epoch')!r}: written by something else than one commit"
        )
    return Committed(
        shard_map,
        blob_map.value,
        state,
        int(doc.get("term") or 0),
        float(doc.get("wall") or 0.0),
        rec.mod_revision,
        revision,
    )


class MapStore:
    """Reads and fenced compare-and-swap writes of the shard map in ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self) -> Committed | None:
        """The committed epoch, or None if nothing was ever committed."""
        entries, revision = await self.store.range(PREFIX)
        return decode(entries, revision)

    @staticmethod
    def prepare(
        shard_map: ShardMap, state: Mapping[str, Any], *, previous: Committed | None, term: int, wall: float
    ) -> Prepared:
        """Encode a commit of ``shard_map`` and ``state`` on top of ``previous`` (None: the
        store must be empty). CPU-bound (the map is packed): run it off the event loop.

        :class:`Conflict` for an epoch older than ``previous``.
        """
        if previous is not None and shard_map.epoch < previous.epoch:
            raise Conflict(
                f"epoch {shard_map.epoch} is older than the stored epoch {previous.epoch}; refusing to go back"
            )
        doc = {**state, "epoch": shard_map.epoch}
        record = {"epoch": shard_map.epoch, "term": term, "wall": wall}
        return Prepared(
            shard_map,
            shard_map.pack(),
            doc,
            term,
            wall,
            previous.epoch_revision if previous is not None else 0,
            _pack(record),
            _pack(doc),
        )

    async def commit(self, prepared: Prepared, fence: Fence | None) -> Committed:
        """Write ``prepared`` in one transaction: compare the epoch record, check ``fence``.

        The store raises :class:`~phantom_bus.store.CasFailed` if another commit
        came first, :class:`~phantom_bus.store.Fenced` if ``fence`` is no longer
        current and :class:`StoreError` if it cannot commit; nothing is written then.
        """
        p = prepared
        revision = await self.store.txn(
            [Compare(EPOCH_KEY, p.expect)],
            [Put(EPOCH_KEY, p.record), Put(MAP_KEY, p.blob), Put(STATE_KEY, p.state_blob)],
            fence=fence,
        )
        return Committed(p.map, p.blob, p.state, p.term, p.wall, revision, revision)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A commit encoded and ready to write (see :meth:`MapStore.prepare`)."""

    map: ShardMap
    blob: bytes
    state: dict[str, Any]
    term: int
    wall: float
    expect: int  # mod_revision the epoch record must still have (0: must not exist)
    record: bytes
    state_blob: bytes
