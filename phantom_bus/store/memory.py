"""The in-process store: the reference semantics, with an injected clock.

For tests and for a deterministic simulation of the control plane: nothing
leaves the process, and lease expiry follows ``clock`` (a callable returning
seconds), so a test can move time by hand. Expired leases are swept at the
start of every call and by :meth:`MemoryStore.expire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from phantom_bus.errors import BadRequest
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
)


@dataclass(slots=True)
class _Lease:
    ttl: float
    expires: float


class MemoryStore(StoreBase):
    """A :class:`~phantom_bus.store.base.Store` held in this process's memory.

    ``history`` bounds the kept change log (older revisions are compacted);
    ``poll`` is how often a watcher re-checks lease expiry while idle.
    """

    name = "memory"

    def __init__(
        self,
        *,
        prefix: str = "/phantom/",
        clock: Callable[[], float] = time.monotonic,
        history: int = 10_000,
        poll: float = 0.05,
    ) -> None:
        self.prefix = prefix
        self._clock = clock
        self._history = history
        self._poll = poll
        self._kv: dict[str, Entry] = {}
        self._rev = 1  # like etcd: an empty store is at revision 1
        self._changes: list[Change] = []
        self._compacted = 0  # history kept: revisions > _compacted
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._waiters: set[asyncio.Event] = set()
        self._closed = False

    # --- internals ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("memory store is closed")

    def _notify(self) -> None:
        for event in self._waiters:
            event.set()

    def _commit(self, changes: list[Change]) -> None:
        self._changes.extend(changes)
        floor = self._rev - self._history
        if floor > self._compacted:
            self._compact(floor)
        self._notify()

    def _compact(self, revision: int) -> None:
        self._compacted = max(self._compacted, revision)
        self._changes = [c for c in self._changes if c.revision > self._compacted]

    def expire(self) -> int:
        """Delete the keys of every lease past its expiry now; how many leases ended."""
        now = self._clock()
        gone = [lid for lid, lease in self._leases.items() if lease.expires <= now]
        for lid in gone:
            self._end_lease(lid)
        return len(gone)

    def _end_lease(self, lease_id: int) -> None:
        del self._leases[lease_id]
        keys = sorted(k for k, e in self._kv.items() if e.lease == lease_id)
        if not keys:
            return
        self._rev += 1
        for key in keys:
            del self._kv[key]
        self._commit([Change("delete", key, None, self._rev) for key in keys])

    # --- reads ----------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        self._check_open()
        self.expire()
        return self._kv.get(check_key(key))

    async def range(self, prefix: str) -> tuple[list[Entry], int]:
        self._check_open()
        self.expire()
        entries = sorted((e for k, e in self._kv.items() if k.startswith(prefix)), key=lambda e: e.key)
        return entries, self._rev

    # --- writes ---------------------------------------------------------------------

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op], fence: Fence | None = None) -> int:
        self._check_open()
        check_txn(compares, ops, fence)
        self.expire()
        kv = self._kv
        failed = precondition_failure(compares, fence, lambda key: entry.mod_revision if (entry := kv.get(key)) else 0)
        if failed is not None:
            raise failed
        check_leases(ops, self._leases.__contains__)
        changed = [op for op in ops if isinstance(op, Put) or op.key in self._kv]
        if not changed:
            return self._rev
        rev = self._rev + 1
        changes: list[Change] = []
        for op in changed:
            if isinstance(op, Put):
                old = self._kv.get(op.key)
                self._kv[op.key] = Entry(
                    op.key,
                    op.value,
                    old.create_revision if old else rev,
                    rev,
                    old.version + 1 if old else 1,
                    op.lease,
                )
                changes.append(Change("put", op.key, op.value, rev))
            else:
                del self._kv[op.key]
                changes.append(Change("delete", op.key, None, rev))
        self._rev = rev
        self._commit(changes)
        return rev

    # --- history --------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        check_start_revision(start_revision)
        self._check_open()
        event = asyncio.Event()
        self._waiters.add(event)
        try:
            next_rev = start_revision
            while True:
                self._check_open()
                self.expire()
                if next_rev <= self._compacted:
                    raise Compacted(
                        f"revision {next_rev} is compacted (history starts after {self._compacted})",
                        revision=next_rev,
                        compacted=self._compacted,
                    )
                batch = [c for c in self._changes if c.revision >= next_rev]
                next_rev = max(next_rev, self._rev + 1)
                event.clear()
                for change in batch:
                    if change.key.startswith(prefix):
                        yield change
                if not batch:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel
                    # that arrives together with the event, and the watcher never ends.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._poll):
                            await event.wait()
        finally:
            self._waiters.discard(event)

    async def compact(self, revision: int) -> None:
        self._check_open()
        if revision > self._rev + 1:
            raise BadRequest(f"cannot compact to {revision}: the store is at revision {self._rev}")
        self._compact(revision - 1)
        self._notify()

    # --- leases ---------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        self._check_open()
        check_ttl(ttl)
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(float(ttl), self._clock() + ttl)
        return lease_id

    async def keepalive(self, lease: int) -> float:
        self._check_open()
        self.expire()
        held = self._leases.get(lease)
        if held is None:
            raise LeaseExpired(f"lease {lease} not found (expired or revoked)", lease=lease)
        held.expires = self._clock() + held.ttl
        return held.ttl

    async def revoke(self, lease: int) -> None:
        self._check_open()
        if lease in self._leases:
            self._end_lease(lease)

    async def close(self) -> None:
        self._closed = True
        self._notify()
