"""Leases: one per request the balancer routed, until released or expired.

A lease holds a node's in-flight count up. Every lease lives exactly
``timeout`` seconds at most, so leases expire in the order they were opened:
the table is a dict (insertion ordered) and expiry scans from its front and
stops at the first lease still running. Open, close and expiry are O(1) per
lease; memory is O(open leases) plus a bounded memory of recent expiries,
kept only to tell a late caller "expired" rather than "unknown".
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from phantom_bus.errors import NotFound
from services.balancer.health import NodeState


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
    """Open leases in deadline order, plus a bounded memory of expired ones.

    Lease ids are ``<prefix>-<counter in hex>``; the prefix differs per
    balancer instance so a release carrying an id from before a restart is
    reported as unknown instead of ending someone else's lease.
    """

    __slots__ = ("_expired", "_memory", "_open", "_prefix", "_seq", "timeout")

    def __init__(self, timeout: float, prefix: str, expired_memory: int) -> None:
        self.timeout = timeout
        self._prefix = prefix + "-"
        self._seq = 0
        self._open: dict[str, Lease] = {}
        # OrderedDict: dropping the oldest is O(1); a dict would rescan deleted slots.
        self._expired: OrderedDict[str, ExpiredLease] = OrderedDict()
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

    def close(self, lease_id: str) -> Lease:
        """Remove and return an open lease; NotFound if it is not open."""
        lease = self._open.pop(lease_id, None)
        if lease is not None:
            return lease
        gone = self._expired.get(lease_id)
        if gone is not None:
            raise NotFound(
                f"lease {lease_id} expired before it was released (node {gone.node}, shard "
                f"{gone.shard}); it was counted as expired. Release sooner or raise "
                f"lease_timeout_s",
                lease=lease_id, node=gone.node, shard=gone.shard, reason="expired",
            )
        raise NotFound(
            f"lease {lease_id} is not open: it was already released, or it was never issued by "
            f"this balancer (for instance before a restart); nothing to do",
            lease=lease_id, reason="unknown",
        )

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
