"""Discovery core: the table of nodes known from their beacons. Sans-I/O.

The shell hands every beacon payload to :meth:`DiscoveryTable.receive` (or a
parsed :class:`Beacon` to :meth:`DiscoveryTable.observe`) and calls
:meth:`DiscoveryTable.tick` on a timer; both take ``now`` from the shell's
monotonic clock and return the events to publish, in the order the table
changed. Single-threaded: the shell calls it from its one event loop.

Rules:

* **Incarnation order.** A beacon with a lower incarnation than the table's is
  stale: dropped and counted, whatever its other fields say. A higher one is
  always accepted (an agent restart or a refutation). An equal one is accepted
  from the process (``instance``) the table already follows, and from another
  process only once the followed one has gone silent for ``expiry`` or left.
* **States.** ``alive`` while beacons arrive; ``lost`` after ``expiry``
  without one (reported by :meth:`tick`); ``left`` after a leaving beacon.
  A beacon accepted for a lost or left node rediscovers it. Lost and left
  entries stay visible for ``forget_after`` seconds (they also keep the
  incarnation order across that time) and are then dropped from the table.
* **Conflicts.** Two agent processes beaconing one node id: the table keeps
  following the higher incarnation and drops the other's beacons as stale.
  When a process that is *not* the followed one is still beaconing
  ``conflict_grace`` after it was first seen as a non-followed process, while
  the followed one is alive, one ``node.conflict`` event is returned. The
  grace lets the last beacons of a process that just restarted (still queued
  when its successor's first beacon arrives) drain without a false alarm; the
  episode ends once only one process has beaconed for ``expiry``.
* **Manual entries.** :meth:`DiscoveryTable.register` pins a node: it never
  becomes lost and is never forgotten, only :meth:`DiscoveryTable.remove`
  deletes it. If the node later beacons, the beacon's fields replace the
  registered ones (the agent knows its own address better than a command
  typed once) and ``source`` becomes ``"beacon"``; it stays pinned. A
  registration that contradicts a node alive on beacons is refused with
  :class:`Conflict` rather than flapping between the two sources.

Events. ``data`` always holds ``node`` and ``reason``, and the node's
``address zone weight incarnation instance version state source pinned hb``
after the change, plus:

==================  ==========================================================
kind                when; extra keys
==================  ==========================================================
node.discovered     first beacon, beacon after lost/left, manual registration;
                    ``changed`` (``{field: [old, new]}``) when it was known
node.updated        address, zone, weight or incarnation changed; ``changed``
node.lost           no beacon for ``expiry``; ``silent_for`` (seconds)
node.left           leaving beacon (also for a node never seen alive)
node.conflict       two live processes on one id; ``kept``, ``rival``
                    (each ``{"instance", "incarnation"}``)
node.removed        :meth:`DiscoveryTable.remove`
==================  ==========================================================
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from phantom_bus.errors import BadRequest, Conflict, NotFound, Refused, TooLarge, UnsupportedVersion
from phantom_bus.events import Event
from services.discovery.beacon import (
    Beacon,
    check_address,
    check_node_id,
    check_weight,
    check_zone,
    decode_beacon,
)
from services.discovery.settings import DEFAULTS

NODE_DISCOVERED = "node.discovered"
NODE_UPDATED = "node.updated"
NODE_LOST = "node.lost"
NODE_LEFT = "node.left"
NODE_CONFLICT = "node.conflict"
NODE_REMOVED = "node.removed"
EVENT_KINDS = (NODE_DISCOVERED, NODE_UPDATED, NODE_LOST, NODE_LEFT, NODE_CONFLICT, NODE_REMOVED)

ALIVE = "alive"
LOST = "lost"
LEFT = "left"

SOURCE_BEACON = "beacon"
SOURCE_MANUAL = "manual"

DROP_OVERSIZE = "oversize"
DROP_MALFORMED = "malformed"
DROP_VERSION = "version"
DROP_STALE = "stale"
DROP_TABLE_FULL = "table_full"

# Fields whose change is worth a node.updated event: the ones routing and
# placement use. Version, start time and hints change only with a restart,
# which also changes the incarnation.
_WATCHED = ("address", "zone", "weight", "incarnation")

# A node id claimed by more processes than this is noise or an attack; the
# oldest claims are forgotten so one id cannot make the table grow.
_MAX_RIVALS = 4


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Settings of the discovery core; every duration in seconds."""

    # Seconds between two beacons of one agent (the agent's own setting must
    # match). 1 s: 5,000 nodes make 5,000 small messages a second, which one
    # discovery process handles with room to spare, and a node is seen within
    # a second of starting.
    beacon_interval: float = DEFAULTS["beacon_interval"]
    # Seconds without a beacon before a node is reported lost. 5 intervals:
    # PUB/SUB drops messages silently under load, and an agent or discovery
    # paused by GC or a busy host can miss a few; 4 beacons in a row must be
    # lost before a false node.lost, yet a dead node is still reported within
    # 5 s. Discovery is a hint; membership's detector decides liveness.
    expiry: float = DEFAULTS["beacon_expiry"]
    # Seconds a lost or left node stays in the table (visible to operators,
    # and keeping its incarnation so a stale beacon cannot resurrect an older
    # process) before it is forgotten. 10 min covers a restart or a
    # maintenance reboot; the bound keeps churn from growing the table forever.
    forget_after: float = DEFAULTS["discovery_forget"]
    # Most entries the table holds. Beacons are unauthenticated hints, so a
    # stream of made-up node ids must not exhaust memory; 65,536 is 13 times
    # the 5,000-node target at roughly 1 KiB per entry.
    max_nodes: int = 65536

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first setting that is out of range."""
        for name in ("beacon_interval", "expiry", "forget_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"discovery {name} must be a positive number of seconds, "
                                 f"got {value!r}")
        if self.expiry <= self.beacon_interval:
            raise ValueError(
                f"discovery expiry ({self.expiry} s) must exceed beacon_interval "
                f"({self.beacon_interval} s), or every node is lost between two beacons"
            )
        if isinstance(self.max_nodes, bool) or not isinstance(self.max_nodes, int) \
                or self.max_nodes < 1:
            raise ValueError(f"discovery max_nodes must be a positive integer, "
                             f"got {self.max_nodes!r}")

    @property
    def conflict_grace(self) -> float:
        """Seconds a non-followed process may keep beaconing before it is a conflict.

        1.5 intervals: a dead process's queued beacons arrive in one burst,
        well inside it; a live one sends its next beacon after one interval
        plus jitter, so the second one after the takeover is always past it.
        """
        return 1.5 * self.beacon_interval

    @classmethod
    def for_interval(cls, beacon_interval: float, multiple: float = 5.0) -> DiscoveryConfig:
        """A config whose expiry is ``multiple`` beacon intervals (validated)."""
        config = cls(beacon_interval=beacon_interval, expiry=beacon_interval * multiple)
        config.validate()
        return config


@dataclass(slots=True)
class _Claim:
    """Another process beaconing a node id the table follows someone else for."""

    incarnation: int
    since: float
    last_seen: float


@dataclass(slots=True, eq=False)
class _Entry:
    node: str
    address: str
    zone: str
    weight: float
    incarnation: int
    instance: str | None  # None until the first beacon of a manual entry
    version: str
    started: float
    hb: dict[str, Any] | None
    state: str
    source: str
    pinned: bool
    first_seen: float
    last_seen: float  # last accepted beacon or registration
    last_beacon: float | None
    changed_at: float  # last change of state, orders the tombstones
    beacons: int = 0
    stale: int = 0
    conflicts: int = 0
    in_conflict: bool = False
    claims: dict[str, _Claim] | None = None


class DiscoveryTable:
    """The table of nodes seen by their beacons or registered by hand.

    ``now`` is the caller's monotonic clock in seconds; a value lower than one
    already seen is treated as that one.
    """

    def __init__(self, config: DiscoveryConfig | None = None) -> None:
        self.config = config if config is not None else DiscoveryConfig()
        self.config.validate()
        self._nodes: dict[str, _Entry] = {}
        # Unpinned alive nodes in order of their last beacon, so tick() looks
        # only at the ones that may have expired instead of scanning the table.
        # It stays ordered because every insert and move happens at `now`,
        # which never decreases.
        self._alive: OrderedDict[str, None] = OrderedDict()
        # Unpinned lost and left nodes in order of when they became so.
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self._now = float("-inf")
        self._received = 0
        self._accepted = 0
        self._dropped: dict[str, int] = {}
        self._last_drop: dict[str, str] | None = None
        self._events: dict[str, int] = dict.fromkeys(EVENT_KINDS, 0)
        self._forgotten = 0

    # -- inputs --------------------------------------------------------------

    def receive(self, payload: bytes, now: float) -> list[Event]:
        """Take one beacon payload as it came off the socket; never raises for bad input.

        Oversize, undecodable, wrong-version and invalid payloads are counted
        in :meth:`stats` under ``dropped`` and ignored.
        """
        try:
            beacon = decode_beacon(payload)
        except BadRequest as exc:
            if isinstance(exc, TooLarge):
                reason = DROP_OVERSIZE
            elif isinstance(exc, UnsupportedVersion):
                reason = DROP_VERSION
            else:
                reason = DROP_MALFORMED
            self._received += 1
            self._drop(reason, exc.message)
            return []
        return self.observe(beacon, now)

    def observe(self, beacon: Beacon, now: float) -> list[Event]:
        """Apply one beacon; returns the events it causes.

        ``beacon`` must come from :func:`parse_beacon` / :func:`decode_beacon`
        or from trusted code: it is not validated again.
        """
        now = self._advance(now)
        self._received += 1
        events = self._observe(beacon, now)
        return events

    def tick(self, now: float) -> list[Event]:
        """Report nodes silent for ``expiry`` as lost and forget old lost/left ones.

        Cost is proportional to the number of nodes that change, not to the
        size of the table; call it a few times per beacon interval.
        """
        events: list[Event] = []
        now = self._advance(now)
        expiry = self.config.expiry
        while self._alive:
            node = next(iter(self._alive))
            entry = self._nodes[node]
            assert entry.last_beacon is not None  # only beaconing nodes are in _alive
            if now - entry.last_beacon < expiry:
                break
            del self._alive[node]
            entry.state = LOST
            entry.changed_at = now
            self._tombstones[node] = None
            events.append(self._event(NODE_LOST, entry, "no beacon within expiry", now,
                                      silent_for=round(now - entry.last_beacon, 3)))
        cutoff = now - self.config.forget_after
        while self._tombstones:
            node = next(iter(self._tombstones))
            if self._nodes[node].changed_at > cutoff:
                break
            del self._tombstones[node]
            del self._nodes[node]
            self._forgotten += 1
        return events

    def register(self, node: str, address: str, zone: str, weight: float,
                 now: float) -> list[Event]:
        """Add a node by hand; it stays until :meth:`remove`, whether it beacons or not.

        Registering the same node again with the same address, zone and weight
        does nothing (a retried request is harmless). Raises
        :class:`BadRequest` for an invalid value, :class:`Conflict` when the
        node is already registered differently or is alive on beacons with
        other values, :class:`Refused` when the table is full.
        """
        node = check_node_id(node, "node")
        address = check_address(address, "address")
        zone = check_zone(zone, "zone")
        weight = check_weight(weight, "weight")
        now = self._advance(now)
        entry = self._nodes.get(node)
        same = entry is not None and (entry.address, entry.zone, entry.weight) == (
            address, zone, weight)
        if entry is None:
            if not self._make_room():
                raise Refused(f"discovery table is full ({self.config.max_nodes} nodes); "
                              "remove nodes or raise max_nodes", node=node)
            entry = _Entry(node=node, address=address, zone=zone, weight=weight,
                           incarnation=0, instance=None, version="", started=0.0, hb=None,
                           state=ALIVE, source=SOURCE_MANUAL, pinned=True, first_seen=now,
                           last_seen=now, last_beacon=None, changed_at=now)
            self._nodes[node] = entry
            events = [self._event(NODE_DISCOVERED, entry, "manual registration", now)]
        elif entry.pinned:
            if not same:
                raise Conflict(
                    f"node {node} is already registered at {entry.address} zone "
                    f"{entry.zone} weight {entry.weight}; remove it first to change it",
                    node=node)
            events = []
        elif entry.state == ALIVE:
            if not same:
                raise Conflict(
                    f"node {node} is alive and beaconing {entry.address} zone "
                    f"{entry.zone} weight {entry.weight}; its beacons are authoritative, "
                    "register it with those values or fix the agent's settings",
                    node=node)
            # Pinning a beaconing node only stops it from expiring.
            entry.pinned = True
            self._alive.pop(node, None)
            events = []
        else:
            self._tombstones.pop(node, None)
            entry.address, entry.zone, entry.weight = address, zone, weight
            entry.state, entry.source, entry.pinned = ALIVE, SOURCE_MANUAL, True
            entry.last_seen = entry.changed_at = now
            events = [self._event(NODE_DISCOVERED, entry, "manual registration", now)]
        return events

    def remove(self, node: str, now: float) -> list[Event]:
        """Delete a node, manual or not; :class:`NotFound` if the id is unknown.

        A node that keeps beaconing is discovered again by its next beacon:
        removal forgets, it does not ban.
        """
        now = self._advance(now)
        entry = self._nodes.pop(node, None) if isinstance(node, str) else None
        if entry is None:
            raise NotFound(f"node {node!r} is not in the discovery table", node=node)
        self._alive.pop(node, None)
        self._tombstones.pop(node, None)
        events = [self._event(NODE_REMOVED, entry, "manual removal", now)]
        return events

    def count_dropped(self, reason: str, detail: str = "") -> None:
        """Count a beacon the shell dropped before it reached the core (e.g. bad frames)."""
        self._received += 1
        self._drop(reason, detail)

    # -- reads ---------------------------------------------------------------

    def nodes(self, now: float) -> list[dict[str, Any]]:
        """Every node in the table as plain dicts (see :meth:`node`), sorted by id."""
        return [self._describe(self._nodes[n], now) for n in sorted(self._nodes)]

    def node(self, node: str, now: float) -> dict[str, Any]:
        """One node as a plain dict; :class:`NotFound` if the id is unknown.

        Keys: ``id address zone weight incarnation instance version started hb
        state source pinned first_seen last_seen age beacons stale conflicts
        in_conflict claims``. ``first_seen``/``last_seen`` are on the caller's
        clock, ``age`` is ``now - last_seen`` in seconds, ``claims`` lists the
        other processes heard for this id within ``expiry``.
        """
        entry = self._nodes.get(node) if isinstance(node, str) else None
        if entry is None:
            raise NotFound(f"node {node!r} is not in the discovery table", node=node)
        return self._describe(entry, now)

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: nodes per state, beacons received/accepted/dropped."""
        states = {ALIVE: 0, LOST: 0, LEFT: 0}
        pinned = 0
        for entry in self._nodes.values():
            states[entry.state] += 1
            pinned += entry.pinned
        return {
            "nodes": len(self._nodes),
            **states,
            "manual": pinned,
            "beacons": self._received,
            "accepted": self._accepted,
            "dropped": dict(self._dropped),
            "dropped_total": sum(self._dropped.values()),
            "last_drop": dict(self._last_drop) if self._last_drop else None,
            "conflicts": self._events[NODE_CONFLICT],
            "forgotten": self._forgotten,
            "events": dict(self._events),
        }

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    # -- internals (lock held) -----------------------------------------------

    def _advance(self, now: float) -> float:
        # The ordered deadline structures rely on time never going backwards.
        if now > self._now:
            self._now = float(now)
        return self._now

    def _observe(self, beacon: Beacon, now: float) -> list[Event]:
        entry = self._nodes.get(beacon.node)
        if entry is None:
            return self._first_beacon(beacon, now)
        if entry.claims is not None:
            self._prune_claims(entry, now)
        if not self._accepts(entry, beacon, now):
            entry.stale += 1
            if beacon.incarnation < entry.incarnation:
                detail = (f"node {beacon.node} incarnation {beacon.incarnation} is older "
                          f"than {entry.incarnation}")
            else:
                detail = (f"node {beacon.node} incarnation {beacon.incarnation} from "
                          f"{beacon.instance} while {entry.instance} is live with it")
            self._drop(DROP_STALE, detail)
            return self._note_claim(entry, beacon, now)

        self._accepted += 1
        previous = entry.instance
        if previous is not None and previous != beacon.instance:
            # The process followed until now may still be alive (two agents on
            # one id): remember it so its further beacons are recognised.
            assert entry.last_beacon is not None
            self._add_claim(entry, previous, entry.incarnation, now, entry.last_beacon)
        if entry.claims is not None:
            entry.claims.pop(beacon.instance, None)
            if not entry.claims:
                entry.claims = None
                entry.in_conflict = False

        changed = {f: [getattr(entry, f), getattr(beacon, f)]
                   for f in _WATCHED if getattr(entry, f) != getattr(beacon, f)}
        was = entry.state
        entry.address, entry.zone, entry.weight = beacon.address, beacon.zone, beacon.weight
        entry.incarnation, entry.instance = beacon.incarnation, beacon.instance
        entry.version, entry.started = beacon.version, beacon.started
        entry.hb = dict(beacon.hb) if beacon.hb is not None else None
        entry.source = SOURCE_BEACON
        entry.last_seen = entry.last_beacon = now
        entry.beacons += 1

        if beacon.leaving:
            if was == LEFT:
                return []
            self._alive.pop(entry.node, None)
            entry.state, entry.changed_at = LEFT, now
            if not entry.pinned:
                self._tombstones.pop(entry.node, None)
                self._tombstones[entry.node] = None
            return [self._event(NODE_LEFT, entry, "leaving beacon", now)]
        if was == ALIVE:
            if not entry.pinned:
                self._alive.move_to_end(entry.node)
            if not changed:
                return []
            reason = ("agent restarted" if previous not in (None, beacon.instance)
                      else "beacon changed")
            return [self._event(NODE_UPDATED, entry, reason, now, changed=changed)]
        entry.state, entry.changed_at = ALIVE, now
        if not entry.pinned:
            self._tombstones.pop(entry.node, None)
            self._alive[entry.node] = None
        return [self._event(NODE_DISCOVERED, entry, f"beacon after {was}", now,
                            changed=changed)]

    def _first_beacon(self, beacon: Beacon, now: float) -> list[Event]:
        if not self._make_room():
            self._drop(DROP_TABLE_FULL, f"table full, node {beacon.node} not added")
            return []
        self._accepted += 1
        entry = _Entry(node=beacon.node, address=beacon.address, zone=beacon.zone,
                       weight=beacon.weight, incarnation=beacon.incarnation,
                       instance=beacon.instance, version=beacon.version, started=beacon.started,
                       hb=dict(beacon.hb) if beacon.hb is not None else None,
                       state=LEFT if beacon.leaving else ALIVE, source=SOURCE_BEACON,
                       pinned=False, first_seen=now, last_seen=now, last_beacon=now,
                       changed_at=now, beacons=1)
        self._nodes[beacon.node] = entry
        if beacon.leaving:
            # Announced even though the node was never seen alive: after a
            # discovery restart, subscribers may still hold it.
            self._tombstones[beacon.node] = None
            return [self._event(NODE_LEFT, entry, "leaving beacon", now)]
        self._alive[beacon.node] = None
        return [self._event(NODE_DISCOVERED, entry, "first beacon", now)]

    def _accepts(self, entry: _Entry, beacon: Beacon, now: float) -> bool:
        if entry.instance is None:  # manual entry never beaconed: any agent may fill it in
            return beacon.incarnation >= entry.incarnation
        if beacon.incarnation != entry.incarnation:
            return beacon.incarnation > entry.incarnation
        return beacon.instance == entry.instance or not self._followed_is_live(entry, now)

    def _followed_is_live(self, entry: _Entry, now: float) -> bool:
        return (entry.state == ALIVE and entry.last_beacon is not None
                and now - entry.last_beacon < self.config.expiry)

    def _note_claim(self, entry: _Entry, beacon: Beacon, now: float) -> list[Event]:
        if beacon.instance == entry.instance:
            return []  # a late beacon of the followed process itself
        claim = entry.claims.get(beacon.instance) if entry.claims is not None else None
        if beacon.leaving:
            if claim is not None and entry.claims is not None:
                del entry.claims[beacon.instance]
            return []
        if claim is None:
            self._add_claim(entry, beacon.instance, beacon.incarnation, now, now)
            return []
        claim.last_seen = now
        claim.incarnation = beacon.incarnation
        if (entry.in_conflict or now - claim.since < self.config.conflict_grace
                or not self._followed_is_live(entry, now)):
            return []
        entry.in_conflict = True
        entry.conflicts += 1
        return [self._event(
            NODE_CONFLICT, entry, "two live agent processes claim this node id", now,
            kept={"instance": entry.instance, "incarnation": entry.incarnation},
            rival={"instance": beacon.instance, "incarnation": beacon.incarnation},
        )]

    def _add_claim(self, entry: _Entry, instance: str, incarnation: int, since: float,
                   last_seen: float) -> None:
        if entry.claims is None:
            entry.claims = {}
        claims = entry.claims
        claims[instance] = _Claim(incarnation=incarnation, since=since, last_seen=last_seen)
        while len(claims) > _MAX_RIVALS:
            del claims[min(claims, key=lambda i: claims[i].last_seen)]

    def _prune_claims(self, entry: _Entry, now: float) -> None:
        assert entry.claims is not None
        expiry = self.config.expiry
        for instance in [i for i, c in entry.claims.items() if now - c.last_seen >= expiry]:
            del entry.claims[instance]
        if not entry.claims:
            # Only one process beacons now: a later clash is a new episode.
            entry.claims = None
            entry.in_conflict = False

    def _make_room(self) -> bool:
        if len(self._nodes) < self.config.max_nodes:
            return True
        if not self._tombstones:
            return False
        node, _ = self._tombstones.popitem(last=False)
        del self._nodes[node]
        self._forgotten += 1
        return True

    def _drop(self, reason: str, detail: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + 1
        self._last_drop = {"reason": reason, "detail": detail}

    def _event(self, kind: str, entry: _Entry, reason: str, now: float,
               **extra: Any) -> Event:
        self._events[kind] = self._events.get(kind, 0) + 1
        data: dict[str, Any] = {
            "node": entry.node,
            "reason": reason,
            **_announced(entry),
            "state": entry.state,
            "source": entry.source,
            "pinned": entry.pinned,
            "hb": dict(entry.hb) if entry.hb is not None else None,
        }
        data.update(extra)
        return Event(kind, data)

    def _describe(self, entry: _Entry, now: float) -> dict[str, Any]:
        expiry = self.config.expiry
        claims = [
            {"instance": i, "incarnation": c.incarnation, "age": now - c.last_seen}
            for i, c in (entry.claims or {}).items() if now - c.last_seen < expiry
        ]
        return {
            "id": entry.node,
            **_announced(entry),
            "started": entry.started,
            "hb": dict(entry.hb) if entry.hb is not None else None,
            "state": entry.state,
            "source": entry.source,
            "pinned": entry.pinned,
            "first_seen": entry.first_seen,
            "last_seen": entry.last_seen,
            "age": now - entry.last_seen,
            "beacons": entry.beacons,
            "stale": entry.stale,
            "conflicts": entry.conflicts,
            "in_conflict": entry.in_conflict and bool(claims),
            "claims": claims,
        }


def _announced(entry: _Entry) -> dict[str, Any]:
    """What the node's beacon (or its registration) says of it, as events and rows show it."""
    return {
        "address": entry.address,
        "zone": entry.zone,
        "weight": entry.weight,
        "incarnation": entry.incarnation,
        "instance": entry.instance,
        "version": entry.version,
    }
