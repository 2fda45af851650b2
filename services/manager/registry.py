"""The node registry: every database node the cluster knows and where it is in its life.

Sans-I/O and single-threaded. A node goes through

::

    joining ──> active ──> draining ──> decommissioned ──(remove)──> gone
       │          │  ^         ^
       │          v  │         │
       │     failed / left ────┘
       └──────────────────────────────> decommissioned   (drained before it held anything)

* ``joining``: registered (discovered, or by an operator), holds no replica.
  ``approved`` says whether it may become active (auto-join, or an operator
  said so).
* ``active``: sharding may place replicas on it.
* ``draining``: its replicas are moving away; it keeps serving meanwhile.
* ``decommissioned``: it holds nothing; it may be removed.
* ``failed``: dead for longer than the re-replication delay; its replicas
  are being re-created elsewhere. It becomes ``active`` again when it
  returns, or ``draining`` if an operator drains it.
* ``left``: the same for a node that left gracefully (its agent was stopped
  and said goodbye): nothing failed, so it is not labelled ``failed``.

Any other transition raises :class:`Conflict`. Removal is not a transition:
the record is deleted and a :class:`Tombstone` remembers the incarnation it
had, so the same agent process cannot slip back in by its next beacon.

Every change is recorded in the order it happened and handed out once by
:meth:`Registry.take_changes`, for the store (see :mod:`.store`): a
:class:`NodeRecord` is an upsert (and clears a tombstone of that id), a
:class:`Tombstone` deletes the node and stores the tombstone, a
:class:`TombstoneDropped` forgets an old tombstone.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from phantom_bus import ids
from phantom_bus.errors import BadRequest, Conflict, NotFound
from phantom_bus.events import Event

JOINING: Final = "joining"
ACTIVE: Final = "active"
DRAINING: Final = "draining"
DECOMMISSIONED: Final = "decommissioned"
FAILED: Final = "failed"
LEFT: Final = "left"
LIFECYCLES: Final = (JOINING, ACTIVE, DRAINING, DECOMMISSIONED, FAILED, LEFT)
#: Lifecycles of a node that is gone past the re-replication delay.
AWAY: Final = (FAILED, LEFT)

#: Legal lifecycle transitions; everything else is a :class:`Conflict`.
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    JOINING: frozenset({ACTIVE, DECOMMISSIONED}),
    ACTIVE: frozenset({DRAINING, FAILED, LEFT}),
    DRAINING: frozenset({DECOMMISSIONED}),
    FAILED: frozenset({ACTIVE, DRAINING}),
    LEFT: frozenset({ACTIVE, DRAINING}),
    DECOMMISSIONED: frozenset(),
}

#: Member states as membership reports them (``None``: not heard yet).
MEMBER_STATES: Final = ("alive", "suspect", "dead", "left")
# Member states of a node that is down (a verdict sharding fails over on).
_DOWN = ("dead", "left")
# Lifecycles whose node is known to sharding and may hold replicas.
_PLACED = (ACTIVE, DRAINING, *AWAY)

SOURCE_BEACON: Final = "beacon"
SOURCE_MANUAL: Final = "manual"
SOURCES: Final = (SOURCE_BEACON, SOURCE_MANUAL)

EVENT_REGISTERED: Final = "cluster.node_registered"
EVENT_APPROVED: Final = "cluster.node_approved"
EVENT_UPDATED: Final = "cluster.node_updated"
EVENT_REMOVED: Final = "cluster.node_removed"
#: The event each lifecycle is entered with.
EVENT_FOR: Final[dict[str, str]] = {
    JOINING: EVENT_REGISTERED,
    ACTIVE: "cluster.node_active",
    DRAINING: "cluster.node_draining",
    DECOMMISSIONED: "cluster.node_decommissioned",
    FAILED: "cluster.node_failed",
    LEFT: "cluster.node_left",
}

# Same rule as the sharding core's node ids, so a node registered here is
# always acceptable to sharding.
_MAX_ZONE = 64
_MAX_ADDRESS = 256
_MAX_WEIGHT = 1e6
_MAX_INT = 2**63 - 1
# Fields whose change is news to placement and routing (an event and actions);
# the incarnation changes with every agent restart and is only recorded.
WATCHED: Final = ("address", "zone", "weight")


def check_node_id(node: Any) -> str:
    """``node`` if it follows the node-id rule (:mod:`phantom_bus.ids`), else :class:`BadRequest`."""
    return ids.check_node_id(node)


def check_address(address: Any) -> str:
    """``address`` if it is ``HOST:PORT`` with a port in 1..65535, else :class:`BadRequest`."""
    if not isinstance(address, str) or not 0 < len(address) <= _MAX_ADDRESS:
        raise BadRequest(f"address must be HOST:PORT, got {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise BadRequest(f"address must be HOST:PORT with a port in 1..65535, got {address!r}")
    return address


def check_zone(zone: Any) -> str:
    """``zone`` if it is a non-empty name of at most 64 characters, else :class:`BadRequest`."""
    if not isinstance(zone, str) or not 0 < len(zone) <= _MAX_ZONE:
        raise BadRequest(f"zone must be a non-empty string of at most {_MAX_ZONE} characters, got {zone!r}")
    return zone


def check_weight(weight: Any) -> float:
    """``weight`` as a float if it is a number in (0, 1e6], else :class:`BadRequest`."""
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or not 0 < weight <= _MAX_WEIGHT
    ):
        raise BadRequest(f"weight must be a number in (0, {_MAX_WEIGHT:g}], got {weight!r}")
    return float(weight)


def check_incarnation(incarnation: Any) -> int:
    """``incarnation`` if it is an integer in [0, 2^63 - 1], else :class:`BadRequest`."""
    if isinstance(incarnation, bool) or not isinstance(incarnation, int) or not 0 <= incarnation <= _MAX_INT:
        raise BadRequest(f"incarnation must be an integer in [0, 2^63 - 1], got {incarnation!r}")
    return incarnation


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One node as the registry holds it (immutable: every change makes a new record).

    Times are on the clock of whoever called the registry (the shell passes
    wall-clock seconds, so they survive restarts and mean something to an
    operator). ``member`` is membership's verdict as last heard and
    ``member_since`` when it last changed: for ``dead`` and ``left`` that is
    when the re-replication delay started.
    """

    id: str
    address: str
    zone: str
    weight: float
    incarnation: int
    lifecycle: str
    member: str | None
    member_since: float | None
    first_seen: float
    last_change: float
    reason: str
    approved: bool
    source: str

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain (msgpack- and JSON-able) map."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> NodeRecord:
        """A record from :meth:`to_dict` output; :class:`BadRequest` if it is not one."""
        try:
            record = cls(
                id=check_node_id(doc["id"]),
                address=str(doc["address"]),
                zone=str(doc["zone"]),
                weight=float(doc["weight"]),
                incarnation=check_incarnation(doc["incarnation"]),
                lifecycle=str(doc["lifecycle"]),
                member=None if doc["member"] is None else str(doc["member"]),
                member_since=None if doc["member_since"] is None else float(doc["member_since"]),
                first_seen=float(doc["first_seen"]),
                last_change=float(doc["last_change"]),
                reason=str(doc["reason"]),
                approved=bool(doc["approved"]),
                source=str(doc["source"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed node record: {exc!r}") from exc
        if record.lifecycle not in LIFECYCLES:
            raise BadRequest(f"node {record.id}: unknown lifecycle {record.lifecycle!r}")
        if record.member is not None and record.member not in MEMBER_STATES:
            raise BadRequest(f"node {record.id}: unknown member state {record.member!r}")
        return record


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A removed node: the incarnation it had, so the same process cannot rejoin unasked."""

    id: str
    incarnation: int
    removed_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class TombstoneDropped:
    """An old tombstone forgotten to keep the table bounded."""

    id: str


#: What :meth:`Registry.take_changes` hands out, in order.
Change = NodeRecord | Tombstone | TombstoneDropped


@dataclass(frozen=True, slots=True)
class Registration:
    """What :meth:`Registry.register` did: the record after it, whether it was new,
    what changed (``{field: [old, new]}``) and the events."""

    record: NodeRecord
    created: bool
    changed: dict[str, list[Any]]
    events: tuple[Event, ...]


def node_event(kind: str, record: NodeRecord, reason: str, **extra: Any) -> Event:
    """An event about ``record``: ``node`` and ``reason`` first, then the node's fields."""
    data: dict[str, Any] = {
        "node": record.id,
        "reason": reason,
        "lifecycle": record.lifecycle,
        "member": record.member,
        "address": record.address,
        "zone": record.zone,
        "weight": record.weight,
        "incarnation": record.incarnation,
        "approved": record.approved,
    }
    data.update(extra)
    return Event(kind, data)


class Registry:
    """The node records and the lifecycle state machine (sans-I/O, single-threaded).

    ``max_tombstones`` bounds the removed nodes remembered (oldest forgotten
    first).
    """

    def __init__(self, max_tombstones: int = 1024) -> None:
        if max_tombstones < 1:
            raise ValueError("max_tombstones must be at least 1")
        self.max_tombstones = max_tombstones
        self._nodes: dict[str, NodeRecord] = {}
        self._tombstones: OrderedDict[str, Tombstone] = OrderedDict()
        self._changes: list[Change] = []

    @classmethod
    def restore(
        cls, records: Iterable[NodeRecord], tombstones: Iterable[Tombstone] = (), max_tombstones: int = 1024
    ) -> Registry:
        """A registry holding what a store loaded (no pending changes)."""
        reg = cls(max_tombstones)
        for record in records:
            if record.id in reg._nodes:
                raise BadRequest(f"node {record.id} appears twice in the stored registry")
            reg._nodes[record.id] = record
        for tomb in tombstones:
            if tomb.id not in reg._nodes:
                reg._tombstones[tomb.id] = tomb
        while len(reg._tombstones) > max_tombstones:
            reg._tombstones.popitem(last=False)
        return reg

    # -- reads ---------------------------------------------------------------

    def get(self, node: str) -> NodeRecord:
        """The record of ``node``; :class:`NotFound` if it is not registered."""
        record = self._nodes.get(node) if isinstance(node, str) else None
        if record is None:
            raise NotFound(f"node {node!r} is not registered with the manager", node=str(node))
        return record

    def find(self, node: str) -> NodeRecord | None:
        """The record of ``node`` or ``None``."""
        return self._nodes.get(node)

    def records(self) -> list[NodeRecord]:
        """Every record, sorted by id."""
        return [self._nodes[n] for n in sorted(self._nodes)]

    def tombstone(self, node: str) -> Tombstone | None:
        """The tombstone of a removed node, or ``None``."""
        return self._tombstones.get(node)

    def tombstones(self) -> list[Tombstone]:
        """Every tombstone, oldest first."""
        return list(self._tombstones.values())

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    # -- changes -------------------------------------------------------------

    def register(
        self,
        node: str,
        address: str,
        zone: str,
        weight: float,
        now: float,
        *,
        incarnation: int = 0,
        source: str = SOURCE_BEACON,
        approved: bool = True,
        reason: str,
        member: str | None = None,
    ) -> Registration:
        """Add ``node`` as ``joining``, or update it if it is already registered.

        Registering again with the same values does nothing (no change, no
        event): a retried request or a repeated discovery event is harmless and
        never makes a second record. Different address, zone or weight update
        the record with a ``cluster.node_updated`` event; ``approved=True`` on
        an unapproved node approves it (``cluster.node_approved``); a higher
        incarnation is recorded silently (approval is never withdrawn, and an
        incarnation never goes down). ``member`` seeds the member state of a
        new record (a verdict heard before the node registered).
        """
        check_node_id(node)
        check_address(address)
        check_zone(zone)
        weight = check_weight(weight)
        check_incarnation(incarnation)
        if source not in SOURCES:
            raise BadRequest(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if member is not None and member not in MEMBER_STATES:
            raise BadRequest(f"member state must be one of {', '.join(MEMBER_STATES)}, got {member!r}")
        old = self._nodes.get(node)
        if old is None:
            record = NodeRecord(
                id=node,
                address=address,
                zone=zone,
                weight=weight,
                incarnation=incarnation,
                lifecycle=JOINING,
                member=member,
                member_since=None if member is None else now,
                first_seen=now,
                last_change=now,
                reason=reason,
                approved=approved,
                source=source,
            )
            self._put(record)
            if node in self._tombstones:
                # The upsert clears it in the store as well.
                del self._tombstones[node]
            event = node_event(EVENT_REGISTERED, record, reason, source=source, previous=None)
            return Registration(record, True, {}, (event,))
        changed: dict[str, list[Any]] = {
            f: [getattr(old, f), v]
            for f, v in (("address", address), ("zone", zone), ("weight", weight))
            if getattr(old, f) != v
        }
        updates: dict[str, Any] = {f: new for f, (_, new) in changed.items()}
        if approved and not old.approved:
            changed["approved"] = [False, True]
            updates["approved"] = True
        if incarnation > old.incarnation:
            updates["incarnation"] = incarnation
        if source == SOURCE_BEACON and old.source != SOURCE_BEACON:
            # The agent beacons now: from here on its beacons are the truth.
            updates["source"] = SOURCE_BEACON
        if not updates:
            return Registration(old, False, {}, ())
        events: list[Event] = []
        if changed:
            updates["last_change"] = now
            updates["reason"] = reason
        record = replace(old, **updates)
        self._put(record)
        if "approved" in changed:
            events.append(node_event(EVENT_APPROVED, record, reason))
        watched = {f: v for f, v in changed.items() if f in WATCHED}
        if watched:
            events.append(node_event(EVENT_UPDATED, record, reason, changed=watched))
        return Registration(record, False, changed, tuple(events))

    def transition(self, node: str, lifecycle: str, reason: str, now: float, **extra: Any) -> tuple[NodeRecord, Event]:
        """Move ``node`` to ``lifecycle``; :class:`Conflict` if that is not a legal step.

        Returns the new record and its event (``cluster.node_<lifecycle>``,
        with ``previous`` and any ``extra`` keys).
        """
        if lifecycle not in LIFECYCLES:
            raise BadRequest(f"lifecycle must be one of {', '.join(LIFECYCLES)}, got {lifecycle!r}")
        old = self.get(node)
        if lifecycle not in TRANSITIONS[old.lifecycle]:
            allowed = ", ".join(sorted(TRANSITIONS[old.lifecycle])) or "nothing (remove it)"
            raise Conflict(
                f"node {node} is {old.lifecycle} and cannot become {lifecycle}; "
                f"from {old.lifecycle} it may become: {allowed}",
                node=node,
                lifecycle=old.lifecycle,
                wanted=lifecycle,
            )
        if lifecycle == ACTIVE and not old.approved:
            raise Conflict(
                f"node {node} is waiting for approval; `phantom register {node}` approves it",
                node=node,
                lifecycle=old.lifecycle,
                wanted=lifecycle,
            )
        record = replace(old, lifecycle=lifecycle, last_change=now, reason=reason)
        self._put(record)
        return record, node_event(EVENT_FOR[lifecycle], record, reason, previous=old.lifecycle, **extra)

    def set_member(self, node: str, state: str, now: float, incarnation: int | None = None) -> NodeRecord:
        """Record membership's verdict on ``node`` (and a higher incarnation, if given).

        ``member_since`` moves only when the state changes, except that ``dead``
        and ``left`` count as one outage: a dead node that is then reported
        left keeps the time its delay started.
        """
        if state not in MEMBER_STATES:
            raise BadRequest(f"member state must be one of {', '.join(MEMBER_STATES)}, got {state!r}")
        old = self.get(node)
        updates: dict[str, Any] = {}
        if state != old.member:
            updates["member"] = state
            down = ("dead", "left")
            if not (state in down and old.member in down):
                updates["member_since"] = now
        if incarnation is not None and incarnation > old.incarnation:
            updates["incarnation"] = incarnation
        if not updates:
            return old
        record = replace(old, **updates)
        self._put(record)
        return record

    def remove(self, node: str, reason: str, now: float) -> tuple[Tombstone, Event]:
        """Delete ``node`` (any lifecycle) and remember it with a tombstone.

        :class:`NotFound` if it is not registered. Whether removing is safe
        (no shard loses its only live replica) is the caller's check.
        """
        old = self.get(node)
        del self._nodes[node]
        tomb = Tombstone(node, old.incarnation, now, reason)
        self._tombstones.pop(node, None)
        self._tombstones[node] = tomb
        self._changes.append(tomb)
        while len(self._tombstones) > self.max_tombstones:
            dropped, _ = self._tombstones.popitem(last=False)
            self._changes.append(TombstoneDropped(dropped))
        return tomb, node_event(EVENT_REMOVED, old, reason, previous=old.lifecycle)

    def take_changes(self) -> list[Change]:
        """The changes since the previous call, in order (each handed out once)."""
        changes, self._changes = self._changes, []
        return changes

    def _put(self, record: NodeRecord) -> None:
        self._nodes[record.id] = record
        self._changes.append(record)
