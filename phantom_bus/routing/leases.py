"""Leases: one per request the balancer routed, until released or expired.

A lease holds a node's in-flight count up. Every lease lives exactly
``timeout`` seconds at most, so leases expire in the order they were opened:
the table is a dict (insertion ordered) and expiry scans from its front and
stops at the first lease still running. Open, close and expiry are O(1) per
lease; memory is O(open leases) plus a bounded memory of recent expiries and
releases, kept only to answer a late or repeated release precisely.

Closing is idempotent and never an error: a lease already released (a resend
after a lost reply), expired or never issued (before a restart) is simply
over. :meth:`LeaseTable.close` says which, so the caller counts it right and
counts nothing twice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from phantom_bus.routing.health import NodeState

#: How :meth:`LeaseTable.close` found a lease that was not open.
ALREADY_RELEASED = "already_released"
EXPIRED = "expired"
UNKNOWN = "unknown"


class Lease:
    """One open lease: which node and shard it holds, and until when."""

    __slots__ = ("deadline", "id", "node", "shard", "started")

    def __init__(self, lease_id: str, node: NodeState, shard: str, started: float,
                 deadline: float) -> None:
        self.id = lease_id
        self.node = node
        self.shard = shard
        self.started = started
        self.deadline = deadline


@dataclass(frozen=True, slots=True)
class ExpiredLease:
    """What is remembered of a lease after it expired."""

    node: str
    shard: str
    deadline: float


class LeaseTable:
    """Open leases in deadline order, plus a bounded memory of ended ones.

    Lease ids are ``<prefix>-<counter in hex>``; the prefix differs per
    balancer instance so a release carrying an id from before a restart is
    reported as unknown instead of ending someone else's lease. Released ids
    are remembered for ``timeout`` seconds (a client resends within a few
    seconds) and expired ones until ``expired_memory`` newer ones push them
    out; each memory holds at most ``expired_memory`` ids.
    """

    __slots__ = ("_expired", "_memory", "_open", "_prefix", "_released", "_seq", "timeout")

    def __init__(self, timeout: float, prefix: str, expired_memory: int) -> None:
        self.timeout = timeout
        self._prefix = prefix + "-"
        self._seq = 0
        self._open: dict[str, Lease] = {}
        # OrderedDict: dropping the oldest is O(1); a dict would rescan deleted slots.
        self._expired: OrderedDict[str, ExpiredLease] = OrderedDict()
        self._released: OrderedDict[str, float] = OrderedDict()  # id -> when released
        self._memory = expired_memory

    def __len__(self) -> int:
        return len(self._open)

    def open(self, node: NodeState, shard: str, now: float) -> Lease:
        """Open a lease on ``node`` for ``shard`` that expires ``timeout`` from ``now``."""
        self._seq += 1
        lease_id = f"{self._prefix}{self._seq:x}"
        lease = Lease(lease_id, node, shard, now, now + self.timeout)
        self._open[lease_id] = lease
        return lease

    def close(self, lease_id: str, now: float) -> Lease | str:
        """Remove and return an open lease; if it is not open, say why:
        :data:`ALREADY_RELEASED`, :data:`EXPIRED` or :data:`UNKNOWN`."""
        released = self._released
        while released:  # forget releases older than a lease's lifetime
            oldest, at = next(iter(released.items()))
            if at + self.timeout > now:
                break
            del released[oldest]
        lease = self._open.pop(lease_id, None)
        if lease is not None:
            released[lease_id] = now
            if len(released) > self._memory:
                released.popitem(last=False)
            return lease
        if lease_id in released:
            return ALREADY_RELEASED
        if lease_id in self._expired:
            return EXPIRED
        return UNKNOWN

    def expire(self, now: float) -> list[Lease]:
        """Remove and return every lease whose deadline is at or before ``now``."""
        due: list[Lease] = []
        for lease in self._open.values():
            # Deadlines rise with insertion order as long as ``now`` never goes
            # backwards; if a caller's clock does, a lease is expired one tick late.
            if lease.deadline > now:
                break
            due.append(lease)
        for lease in due:
            del self._open[lease.id]
            self._remember(lease)
        return due

    def drop_node(self, node: str) -> list[Lease]:
        """Remove and return every open lease of ``node`` (the node was forgotten)."""
        gone = [lease for lease in self._open.values() if lease.node.node == node]
        for lease in gone:
            del self._open[lease.id]
        return gone

    def _remember(self, lease: Lease) -> None:
        expired = self._expired
        expired[lease.id] = ExpiredLease(lease.node.node, lease.shard, lease.deadline)
        if len(expired) > self._memory:
            expired.popitem(last=False)
