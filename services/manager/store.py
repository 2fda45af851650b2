"""The node registry in the control plane's store: one key per node and per tombstone.

Keys (relative to the store prefix)::

    registry/nodes/<id>        msgpack NodeRecord.to_dict()
    registry/tombstones/<id>   msgpack {"incarnation", "removed_at", "reason"}

Tombstones are ordered oldest first by their key's create revision.

The manager's leader commits each decision's
:attr:`~services.manager.actions.Decision.changes` with :meth:`RegistryStore.apply`
before it publishes an event or sends an action.
One ``apply`` is one transaction carrying the leader's fence and a
compare-and-swap on every key it touches (the ``mod_revision`` this process
last read or wrote), so a deposed leader, or one that missed a write, changes
nothing. :meth:`RegistryStore.committed` is the registry as last committed,
to roll the core back to when a commit fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import msgpack

from phantom_bus.errors import BadRequest
from phantom_bus.store import Compare, Delete, Entry, Fence, Put, Store, StoreError

from .registry import Change, NodeRecord, Registry, Tombstone, TombstoneDropped

PREFIX = "registry/"
NODES = PREFIX + "nodes/"
TOMBSTONES = PREFIX + "tombstones/"
#: The file the manager used before the shared store; never read now.
LEGACY_FILE = "manager.sqlite3"


def _pack(doc: dict[str, Any]) -> bytes:
    return cast(bytes, msgpack.packb(doc, use_bin_type=True))


def _unpack(entry: Entry) -> dict[str, Any]:
    try:
        doc = msgpack.unpackb(entry.value, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise StoreError(f"registry key {entry.key} is not valid msgpack: {exc}") from exc
    if not isinstance(doc, dict):
        raise StoreError(f"registry key {entry.key} does not hold a map")
    return doc


class RegistryStore:
    """Fenced compare-and-swap writes and reads of the node registry in ``store``."""

    def __init__(self, store: Store, max_tombstones: int = 1024) -> None:
        self.store = store
        self.max_tombstones = max_tombstones
        self._revisions: dict[str, int] = {}  # key -> mod_revision last read or written
        self._records: dict[str, NodeRecord] = {}
        self._tombstones: dict[str, tuple[int, Tombstone]] = {}  # id -> (order, tombstone)

    async def load(self) -> tuple[list[NodeRecord], list[Tombstone], int]:
        """Every committed node (by id) and tombstone (oldest first), and the store revision."""
        entries, revision = await self.store.range(PREFIX)
        records: dict[str, NodeRecord] = {}
        tombs: dict[str, tuple[int, Tombstone]] = {}
        revisions: dict[str, int] = {}
        for entry in entries:
            revisions[entry.key] = entry.mod_revision
            doc = _unpack(entry)
            if entry.key.startswith(NODES):
                try:
                    record = NodeRecord.from_dict(doc)
                except BadRequest as exc:
                    raise StoreError(f"registry key {entry.key} cannot be read: {exc.message}") from exc
                records[record.id] = record
            elif entry.key.startswith(TOMBSTONES):
                node = entry.key[len(TOMBSTONES):]
                try:
                    tomb = Tombstone(node, int(doc["incarnation"]), float(doc["removed_at"]), str(doc["reason"]))
                except (KeyError, TypeError, ValueError) as exc:
                    raise StoreError(f"registry key {entry.key} cannot be read: {exc!r}") from exc
                tombs[node] = (entry.create_revision, tomb)
        self._revisions, self._records, self._tombstones = revisions, records, tombs
        return self.records(), self.tombstones(), revision

    def records(self) -> list[NodeRecord]:
        """The committed nodes, sorted by id."""
        return [self._records[k] for k in sorted(self._records)]

    def tombstones(self) -> list[Tombstone]:
        """The committed tombstones, oldest first."""
        return [t for _, t in sorted(self._tombstones.values(), key=lambda pair: pair[0])]

    def committed(self) -> Registry:
        """A registry holding what was last committed (or loaded): no I/O."""
        return Registry.restore(self.records(), self.tombstones(), self.max_tombstones)

    async def apply(self, changes: Sequence[Change], fence: Fence | None) -> int:
        """Commit ``changes`` (in order) in one fenced transaction; the new revision (0: nothing to do).

        Raises :class:`~phantom_bus.store.Fenced`, :class:`~phantom_bus.store.CasFailed`
        or :class:`StoreError` and writes nothing when the store refuses.
        """
        ops: dict[str, Put | Delete] = {}  # last write of each key wins, in the order written
        for change in changes:
            if isinstance(change, NodeRecord):
                ops[NODES + change.id] = Put(NODES + change.id, _pack(change.to_dict()))
                ops[TOMBSTONES + change.id] = Delete(TOMBSTONES + change.id)
            elif isinstance(change, Tombstone):
                ops[NODES + change.id] = Delete(NODES + change.id)
                ops.pop(TOMBSTONES + change.id, None)  # re-inserted last: it is the newest tombstone
                doc = {"incarnation": change.incarnation, "removed_at": change.removed_at, "reason": change.reason}
                ops[TOMBSTONES + change.id] = Put(TOMBSTONES + change.id, _pack(doc))
            elif isinstance(change, TombstoneDropped):
                ops[TOMBSTONES + change.id] = Delete(TOMBSTONES + change.id)
            else:
                raise TypeError(f"not a registry change: {change!r}")
        if not ops:
            return 0
        compares = [Compare(key, self._revisions.get(key, 0)) for key in ops]
        revision = await self.store.txn(compares, list(ops.values()), fence=fence)
        self._committed(changes, ops, revision)
        return revision

    def _committed(self, changes: Iterable[Change], ops: dict[str, Put | Delete], revision: int) -> None:
        for key, op in ops.items():
            if isinstance(op, Put):
                self._revisions[key] = revision
            else:
                self._revisions.pop(key, None)
        for change in changes:
            if isinstance(change, NodeRecord):
                self._records[change.id] = change
                self._tombstones.pop(change.id, None)
            elif isinstance(change, Tombstone):
                self._records.pop(change.id, None)
                self._tombstones[change.id] = (revision, change)
            else:
                self._tombstones.pop(change.id, None)
