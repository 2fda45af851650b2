"""The control-plane store (see :mod:`phantom_bus.store.base`): memory, SQLite and etcd backends."""

from phantom_bus.store.base import (
    CasFailed,
    Change,
    Compacted,
    Compare,
    Delete,
    Entry,
    Fence,
    Fenced,
    LeaseExpired,
    Op,
    Put,
    Store,
    StoreError,
    open_store,
)

__all__ = [
    "CasFailed",
    "Change",
    "Compacted",
    "Compare",
    "Delete",
    "Entry",
    "Fence",
    "Fenced",
    "LeaseExpired",
    "Op",
    "Put",
    "Store",
    "StoreError",
    "open_store",
]
