"""Simulated durable stores with the semantics of the real SQLite ones.

Each keeps its data in its process's :attr:`~phantom_sim.world.Proc.disk`
(which survives a crash) as packed bytes, so nothing the process holds in
memory can alias what is "on disk", and a write during a disk fault raises
:class:`~phantom_sim.world.DiskFailed` having written nothing (the real stores
roll the transaction back).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgpack

from phantom_bus.errors import Conflict
from phantom_bus.shardmap import ShardMap
from services.manager.registry import Change, NodeRecord, Registry, Tombstone, TombstoneDropped

from .world import Proc


class SimMapStore:
    """:class:`services.sharding.store.MapStore`: newest (map, state) wins; an older epoch is refused."""

    KEY = "shardmap"

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def save(self, shard_map: ShardMap, state: Mapping[str, Any]) -> None:
        row = self.proc.disk.get(self.KEY)
        newest = -1 if row is None else row[0]
        if shard_map.epoch < newest:
            raise Conflict(f"epoch {shard_map.epoch} is older than the saved epoch {newest}; refusing to go back")
        blob = (shard_map.epoch, shard_map.pack(), msgpack.packb(dict(state), use_bin_type=True))
        self.proc.write(self.KEY, blob)

    def load(self) -> tuple[ShardMap, dict[str, Any]] | None:
        row = self.proc.disk.get(self.KEY)
        if row is None:
            return None
        _, blob_map, blob_state = row
        return ShardMap.unpack(blob_map), msgpack.unpackb(blob_state, raw=False, strict_map_key=False)


class SimRegistryStore:
    """:class:`services.manager.store.RegistryStore`: node rows and ordered tombstones, one transaction per batch."""

    KEY = "registry"

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def _read(self) -> tuple[dict[str, dict[str, Any]], list[list[Any]]]:
        blob = self.proc.disk.get(self.KEY)
        if blob is None:
            return {}, []
        nodes, tombs = msgpack.unpackb(blob, raw=False)
        return nodes, tombs

    def apply(self, changes: Iterable[Change]) -> None:
        batch = list(changes)
        if not batch:
            return
        nodes, tombs = self._read()
        for change in batch:
            if isinstance(change, NodeRecord):
                nodes[change.id] = change.to_dict()
                tombs = [t for t in tombs if t[0] != change.id]
            elif isinstance(change, Tombstone):
                nodes.pop(change.id, None)
                tombs = [t for t in tombs if t[0] != change.id]
                tombs.append([change.id, change.incarnation, change.removed_at, change.reason])
            elif isinstance(change, TombstoneDropped):
                tombs = [t for t in tombs if t[0] != change.id]
            else:
                raise TypeError(f"not a registry change: {change!r}")
        self.proc.write(self.KEY, msgpack.packb([nodes, tombs], use_bin_type=True))

    def registry(self, max_tombstones: int = 1024) -> Registry:
        nodes, tombs = self._read()
        records = [NodeRecord.from_dict(nodes[n]) for n in sorted(nodes)]
        return Registry.restore(records, [Tombstone(str(i), int(inc), float(at), str(r)) for i, inc, at, r in tombs],
                                max_tombstones)
