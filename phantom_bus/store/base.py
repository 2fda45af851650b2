"""The control-plane store: one small versioned key-value interface, several backends.

Every durable control-plane fact lives in one store. The interface is the
part of etcd v3 the control plane needs, so that etcd itself is one backend
and the single-host SQLite file gives the same guarantees:

- one global revision counter, +1 per successful write transaction (and per
  lease expiry); every key touched by a transaction gets that revision as its
  ``mod_revision``;
- ``get`` / ``range`` by prefix, returning the store revision the read saw;
- ``txn``: all compares hold (a key's ``mod_revision``, 0 = absent) or nothing
  is written (:class:`CasFailed`); a :class:`Fence` makes the transaction
  also depend on a leader record (:class:`Fenced` when it moved on);
- ``watch`` from a revision (inclusive), :class:`Compacted` when that history
  is gone;
- leases: keys attached to a lease are deleted ``ttl`` seconds after the last
  grant or keepalive.

Keys given to a store are relative to its prefix (``/phantom/`` by default);
values are bytes. Every call is bounded in time and raises
:class:`StoreError`, with the backend's own cause, when the backend cannot
answer.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from phantom_bus.errors import BadRequest, CasFailed, Compacted, Fenced, NotFound, StoreError

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
    "StoreBase",
    "StoreError",
    "check_key",
    "check_leases",
    "check_start_revision",
    "check_ttl",
    "open_store",
    "precondition_failure",
    "prefix_end",
]


class LeaseExpired(NotFound):
    """The lease is gone (expired or revoked): whatever was attached to it was deleted."""

    code = "lease_expired"


@dataclass(frozen=True, slots=True)
class Entry:
    """One key as stored: its value and the revisions that versioned it."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int | None


@dataclass(frozen=True, slots=True)
class Change:
    """One key's change in the store's history; ``value`` is None for a delete."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None
    revision: int


@dataclass(frozen=True, slots=True)
class Compare:
    """Holds when ``key``'s mod_revision equals ``mod_revision`` (0: the key must not exist)."""

    key: str
    mod_revision: int

    @classmethod
    def absent(cls, key: str) -> Compare:
        """The key must not exist."""
        return cls(key, 0)

    @classmethod
    def at(cls, entry: Entry) -> Compare:
        """The key must still be as ``entry`` read it."""
        return cls(entry.key, entry.mod_revision)


@dataclass(frozen=True, slots=True)
class Put:
    """Write ``value`` at ``key``, attached to ``lease`` if given."""

    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete ``key`` (a no-op if it does not exist)."""

    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Fence:
    """A leader's fencing token: the leader record's key and the mod_revision it wrote it at.

    A transaction carrying a fence fails with :class:`Fenced` when the record
    was deleted or rewritten since, i.e. when this leader's term is over.
    """

    key: str
    revision: int


@runtime_checkable
class Store(Protocol):
    """The versioned key-value store every durable control-plane fact lives in."""

    name: str

    async def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or None."""
        ...

    async def range(self, prefix: str) -> tuple[list[Entry], int]:
        """Every entry whose key starts with ``prefix``, sorted by key, and the store revision read at."""
        ...

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op], fence: Fence | None = None) -> int:
        """Apply ``ops`` atomically if every compare (and the fence) holds; the new revision.

        Raises :class:`Fenced` if the fence failed, else :class:`CasFailed` if a compare did."""
        ...

    async def put(
        self, key: str, value: bytes, *, expect: int | None = None, lease: int | None = None, fence: Fence | None = None
    ) -> int:
        """Write one key; ``expect`` is the mod_revision it must have (0: absent, None: any)."""
        ...

    async def delete(self, key: str, *, expect: int | None = None, fence: Fence | None = None) -> int:
        """Delete one key; ``expect`` as for :meth:`put`."""
        ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        """Changes under ``prefix`` with revision >= ``start_revision``, in order, forever.

        Raises :class:`Compacted` (at once or later) if that history is no longer kept."""
        ...

    async def grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        ...

    async def keepalive(self, lease: int) -> float:
        """Restart the lease's ttl; the ttl it now has. :class:`LeaseExpired` if it is gone."""
        ...

    async def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys (no error if already gone)."""
        ...

    async def compact(self, revision: int) -> None:
        """Forget the history before ``revision``: a watch from an older one raises Compacted."""
        ...

    async def close(self) -> None:
        """Release the backend's resources; the store is unusable afterwards."""
        ...


class StoreBase(Store):
    """What every backend shares: the one-key sugar over :meth:`txn`.

    A backend subclasses this and implements the rest of :class:`Store`; the
    argument checks every backend applies alike are the functions below
    (:func:`check_key`, :func:`check_txn`, :func:`check_start_revision`,
    :func:`check_ttl`), and the errors a failed transaction raises are
    :func:`cas_failed` and :func:`fence_failed`."""

    async def put(
        self, key: str, value: bytes, *, expect: int | None = None, lease: int | None = None, fence: Fence | None = None
    ) -> int:
        """See :class:`Store`: one :class:`Put` in a transaction."""
        return await self.txn(expect_compares(key, expect), [Put(key, value, lease)], fence)

    async def delete(self, key: str, *, expect: int | None = None, fence: Fence | None = None) -> int:
        """See :class:`Store`: one :class:`Delete` in a transaction."""
        return await self.txn(expect_compares(key, expect), [Delete(key)], fence)


def check_key(key: str) -> str:
    """A key must be a non-empty str without NUL (NUL bounds prefix ranges); :class:`BadRequest` if not."""
    if not isinstance(key, str) or not key or "\x00" in key:
        raise BadRequest(f"bad store key {key!r}: expected a non-empty string without NUL")
    return key


def check_txn(compares: Sequence[Compare], ops: Sequence[Op], fence: Fence | None = None) -> None:
    """Refuse malformed transactions the same way on every backend (:class:`BadRequest`)."""
    if fence is not None:
        check_key(fence.key)
    for compare in compares:
        if not isinstance(compare, Compare) or not isinstance(compare.mod_revision, int) or compare.mod_revision < 0:
            raise BadRequest(f"bad compare {compare!r}: expected Compare(key, mod_revision >= 0)")
        check_key(compare.key)
    seen: set[str] = set()
    for op in ops:
        if not isinstance(op, Put | Delete):
            raise BadRequest(f"bad store operation {op!r}: expected Put or Delete")
        check_key(op.key)
        if isinstance(op, Put) and not isinstance(op.value, bytes):
            raise BadRequest(f"bad value for {op.key}: expected bytes, got {type(op.value).__name__}")
        if op.key in seen:
            raise BadRequest(f"key {op.key} written twice in one transaction")
        seen.add(op.key)


def check_start_revision(start_revision: int) -> int:
    """A watch starts at a revision >= 1; :class:`BadRequest` if not."""
    if not isinstance(start_revision, int) or start_revision < 1:
        raise BadRequest(f"bad watch start revision {start_revision!r}: expected a revision >= 1")
    return start_revision


def check_ttl(ttl: float) -> float:
    """A lease's ttl is a positive, finite number of seconds; :class:`BadRequest` if not."""
    if isinstance(ttl, bool) or not (isinstance(ttl, int | float) and 0 < ttl < math.inf):
        raise BadRequest(f"bad lease ttl {ttl!r}: expected a positive number of seconds")
    return ttl


def precondition_failure(
    compares: Sequence[Compare], fence: Fence | None, revision_of: Callable[[str], int]
) -> CasFailed | Fenced | None:
    """The error of a transaction whose compares do not all hold, given each key's
    mod_revision now (``revision_of``, 0: absent), or None when they all do.

    Every backend says the same: the fence first (:class:`Fenced`: this writer's
    term is over, whatever else failed), then the first compare that fails."""
    if fence is not None and (now := revision_of(fence.key)) != fence.revision:
        return fence_failed(fence, now)
    for compare in compares:
        if (now := revision_of(compare.key)) != compare.mod_revision:
            return cas_failed(compare.key, compare.mod_revision, now)
    return None


def check_leases(ops: Sequence[Op], alive: Callable[[int], bool]) -> None:
    """:class:`LeaseExpired` for the first put attached to a lease that is gone."""
    for op in ops:
        if isinstance(op, Put) and op.lease is not None and not alive(op.lease):
            raise LeaseExpired(f"lease {op.lease} not found (expired or revoked)", lease=op.lease)


def expect_compares(key: str, expect: int | None) -> list[Compare]:
    """The compares of the one-key sugar: none for ``expect=None``."""
    return [] if expect is None else [Compare(key, expect)]


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix`` ('' for the empty prefix)."""
    data = prefix.encode()
    for i in range(len(data) - 1, -1, -1):
        if data[i] < 0xFF:
            return (data[:i] + bytes([data[i] + 1])).decode("utf-8", "surrogateescape")
    return ""


def fence_failed(fence: Fence, current: int) -> Fenced:
    """The error for a fence whose record now sits at ``current`` (0: gone)."""
    state = "is gone" if current == 0 else f"moved on to revision {current}"
    return Fenced(
        f"fenced: leader record {fence.key} {state}; this writer's term (revision {fence.revision}) is over",
        key=fence.key,
        revision=fence.revision,
        current=current,
    )


def cas_failed(key: str, expected: int, current: int) -> CasFailed:
    """The error for a compare on ``key`` that found ``current`` instead of ``expected``."""
    want = "absent" if expected == 0 else f"at revision {expected}"
    have = "absent" if current == 0 else f"at revision {current}"
    return CasFailed(f"compare failed: {key} expected {want}, is {have}", key=key, expected=expected, current=current)


def open_store(url: str, *, data_dir: str, prefix: str = "/phantom/", timeout: float = 5.0) -> Store:
    """The store named by ``url``: ``sqlite`` (``<data_dir>/store.sqlite3``),
    ``etcd://HOST:PORT[,HOST:PORT...]`` or ``memory`` (in-process, for tests).

    ``timeout`` bounds every call. Opening does no I/O; the first call does.
    """
    text = url.strip()
    if text == "sqlite":
        from pathlib import Path

        from phantom_bus.store.sqlite import SqliteStore

        return SqliteStore(Path(data_dir) / "store.sqlite3", prefix=prefix, timeout=timeout)
    if text.startswith("sqlite:"):
        from phantom_bus.store.sqlite import SqliteStore

        return SqliteStore(text[len("sqlite:") :], prefix=prefix, timeout=timeout)
    if text.startswith("etcd://"):
        from phantom_bus.store.etcd import EtcdStore

        return EtcdStore(parse_etcd_url(text), prefix=prefix, timeout=timeout)
    if text == "memory":
        from phantom_bus.store.memory import MemoryStore

        return MemoryStore(prefix=prefix)
    raise BadRequest(f"unknown store {url!r}: expected sqlite, sqlite:PATH, etcd://HOST:PORT[,HOST:PORT] or memory")


def parse_etcd_url(url: str) -> list[tuple[str, int]]:
    """``etcd://h1:p1,h2:p2`` as [(host, port), ...]; :class:`BadRequest` if malformed."""
    if not url.startswith("etcd://"):
        raise BadRequest(f"not an etcd url: {url!r}")
    endpoints: list[tuple[str, int]] = []
    for part in url[len("etcd://") :].split(","):
        host, sep, port = part.strip().rstrip("/").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadRequest(f"bad etcd endpoint {part!r} in {url!r}: expected HOST:PORT")
        endpoints.append((host, int(port)))
    return endpoints
