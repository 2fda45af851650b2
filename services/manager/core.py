"""The manager core: node events, member verdicts and operator commands in, decisions out.

Sans-I/O, deterministic, single-threaded (the shell calls it from its one
event loop). Each input method takes ``now`` and
returns a :class:`Decision` (see :mod:`.actions`): the :class:`Action` values the shell carries out
(requests to other services, in order), the ``cluster.*`` events it publishes
and logs, and the registry changes. Nothing here reads a clock or talks to
anybody.

**Persistence.** The core does no I/O: every decision carries the registry
changes it made (:attr:`Decision.changes`, taken from the registry once, in
order). The shell commits them to the store (see :mod:`.store`) before it
publishes an event or sends an action, so nothing is acted on before the
state it came from is durable, and a SIGKILL at any later moment loses no
decision: :meth:`ManagerCore.reconcile` re-derives every action still owed
from the durable registry. If the commit fails, the shell rolls the core back
to the committed registry (:meth:`ManagerCore.reset_registry`) and acts on
nothing of that decision.

**Shell loop.** For every decision: publish and log each event (one line per
event: it carries ``node`` and ``reason``), then carry out the actions in
order, retrying each until it succeeds. Actions are idempotent (sending one
twice is harmless); a ``NotFound`` reply to a forget/remove action means it
was already done, and a ``Conflict`` reply to ``discovery.register`` means
discovery follows the node's own beacons (they win there): also done. Call
:meth:`ManagerCore.reconcile` at start, when a service restarts (the
balancer's state is soft) and periodically as anti-entropy (then with
``removals=False``), and :meth:`ManagerCore.sync_members` /
:meth:`ManagerCore.sync_discovery` with the full tables now and then, since
events over PUB/SUB can be lost.

**Policy.**

* Auto-join (``config.auto_join``, default on): ``node.discovered`` registers
  the node (``joining``), admits it to membership, and once membership says
  ``alive`` it is added to sharding, which places replicas on it
  (``active``). Auto-join off: the node is registered unapproved and waits
  for ``register`` (``phantom register``) or :meth:`ManagerCore.approve`.
* ``member.suspect``: the balancer is told first, before anything else about
  that node, so no new request is routed to it while the rest happens.
* ``member.dead`` / ``member.left``: balancer first, then
  ``sharding.node_dead``: sharding fails the node's primaries over at once and
  re-creates its replicas only after its re-replication delay. The manager
  keeps the node ``active`` during the delay and labels it ``failed`` (or
  ``left``, after a graceful leave) after it (:meth:`ManagerCore.tick`); a node that returns within the delay gets
  ``sharding.node_alive`` and nothing moves; one that returns later goes
  ``failed -> active`` and may be given replicas again. A draining node that
  dies stays ``draining``: the operator's intent stands and sharding moves
  its data from the surviving copies.
* ``drain``: ``active``/``failed -> draining``, ``sharding.drain_node`` (moves run
  under sharding's caps); when the map shows it holds nothing,
  ``decommissioned``. A ``joining`` node holds nothing: it is decommissioned
  at once.
* ``remove``: refused (:class:`Refused`, naming the shards) while some shard
  would be left without a live copy; otherwise the record is deleted (a
  tombstone keeps the same agent process from being auto-joined again) and
  the node is forgotten by sharding, membership, discovery and the balancer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Final

from phantom_bus.errors import BadRequest, Conflict, Refused
from phantom_bus.events import Event

from .actions import BALANCER, DISCOVERY, MEMBERSHIP, SHARDING, Action, Decision, _Out
from .config import ManagerConfig
from .health import Health, HealthTracker, ShardInfo, assess, sole_replicas, status_document
from .reconcile import implied_actions, readmit
from .registry import (
    _DOWN,
    _PLACED,
    ACTIVE,
    AWAY,
    DECOMMISSIONED,
    DRAINING,
    FAILED,
    JOINING,
    LEFT,
    MEMBER_STATES,
    SOURCE_BEACON,
    SOURCE_MANUAL,
    SOURCES,
    WATCHED,
    NodeRecord,
    Registry,
    check_address,
    check_incarnation,
    check_node_id,
    check_weight,
    check_zone,
    node_event,
)

EVENT_SUSPECT: Final = "cluster.node_suspect"
EVENT_RECOVERED: Final = "cluster.node_recovered"
EVENT_FAILOVER: Final = "cluster.failover"
EVENT_IGNORED: Final = "cluster.node_ignored"





class MembershipTerm:
    """The newest membership leader term whose verdicts the manager has heard.

    A verdict (a ``member.*`` event or a ``verdicts`` reply) carrying an older
    term comes from a deposed membership leader and is stale. A verdict without
    a term comes from a membership that predates leaders and counts as current.
    """

    __slots__ = ("term",)

    def __init__(self) -> None:
        self.term = 0

    def fresh(self, term: Any) -> bool:
        """Whether a verdict of ``term`` counts; a newer term becomes the one held."""
        if isinstance(term, bool) or not isinstance(term, int):
            return True
        if term < self.term:
            return False
        self.term = term
        return True


def _time(now: Any) -> float:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise BadRequest(f"now must be a finite number of seconds, got {now!r}")
    return float(now)


def _event_parts(event: Event | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    if isinstance(event, Event):
        return event.kind, event.data
    if isinstance(event, Mapping) and isinstance(event.get("kind"), str):
        return str(event["kind"]), event
    raise BadRequest(f"an event is an Event or a map with 'kind', got {event!r}")


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


class ManagerCore:
    """The manager's decisions over a :class:`Registry`; see the module docstring.

    ``registry`` is a restored registry (from the store) or a new one. Each
    decision carries the registry changes the shell must commit before it
    acts on the decision.
    """

    def __init__(
        self,
        config: ManagerConfig | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.config = config if config is not None else ManagerConfig()
        self.config.validate()
        self.registry = registry if registry is not None else Registry(self.config.max_tombstones)
        # Member verdicts for nodes that are not registered yet (soft state).
        self._heard: OrderedDict[str, tuple[str, int | None, float]] = OrderedDict()
        self._shards: list[ShardInfo] | None = None
        self._down: frozenset[str] = frozenset()
        self._epoch: int | None = None
        self._tracker = HealthTracker()

    # -- events from the bus ---------------------------------------------------

    def on_event(self, event: Event | Mapping[str, Any], now: float) -> Decision:
        """Handle one bus event (``node.*`` from discovery, ``member.*`` from membership).

        Accepts an :class:`Event` or its wire form (a map with ``kind``). Other
        kinds, and ``node.lost``/``node.left``/``node.removed``/``node.conflict``
        (discovery is a hint; membership decides liveness), decide nothing.
        :class:`BadRequest` for a malformed event.
        """
        kind, data = _event_parts(event)
        if kind.startswith("member."):
            return self.on_member_event(kind, data, now)
        if kind.startswith("node."):
            return self.on_node_event(kind, data, now)
        return Decision()

    def on_node_event(self, kind: str, data: Mapping[str, Any], now: float) -> Decision:
        """``node.discovered`` / ``node.updated``: register or update the node."""
        t = _time(now)
        if kind not in ("node.discovered", "node.updated"):
            return Decision()
        node = check_node_id(data.get("node"))
        address = check_address(data.get("address"))
        zone = check_zone(data.get("zone"))
        weight = check_weight(data.get("weight", 1.0))
        incarnation = check_incarnation(data.get("incarnation", 0))
        source = data.get("source", SOURCE_BEACON)
        if source not in SOURCES:
            source = SOURCE_BEACON
        why = str(data.get("reason") or kind)
        out = _Out()
        self._discovered(out, node, address, zone, weight, incarnation, source, why, t)
        # A new record may bring a member verdict heard before it registered.
        self._health(out, node)
        decision = self._finish(out)
        return decision

    def on_member_event(self, kind: str, data: Mapping[str, Any], now: float) -> Decision:
        """``member.alive|suspect|dead|left``: routing, failover, recovery, activation."""
        t = _time(now)
        state = kind.partition(".")[2]
        if not kind.startswith("member.") or state not in MEMBER_STATES:
            return Decision()  # member.load and future kinds
        node = check_node_id(data.get("node"))
        inc = data.get("incarnation")
        incarnation = check_incarnation(inc) if inc is not None else None
        why = str(data.get("reason") or "")
        out = _Out()
        old = self.registry.find(node)
        self._member(out, node, state, incarnation, why, t)
        if old is not None and old.member != state:
            self._health(out, node)
        decision = self._finish(out)
        return decision

    # -- operator commands -----------------------------------------------------

    def register(
        self, node: str, address: str, zone: str = "default", weight: float = 1.0, *, now: float
    ) -> Decision:
        """``phantom register NODE --address HOST:PORT [--zone Z]``: register or approve a node.

        A new node is registered approved (the operator vouches for it) and
        pinned in discovery; an unapproved one is approved; the same values
        again change nothing; new values update it. :class:`Conflict` for a
        decommissioned node (remove it first). Reply: the record as a map.
        """
        t = _time(now)
        check_node_id(node)
        check_address(address)
        check_zone(zone)
        weight = check_weight(weight)
        out = _Out()
        record = self.registry.find(node)
        if record is not None and record.lifecycle == DECOMMISSIONED:
            raise Conflict(
                f"node {node} is decommissioned; `phantom remove {node}` first, then register it again",
                node=node,
                lifecycle=record.lifecycle,
            )
        source = SOURCE_MANUAL if record is None else record.source
        self._join(out, node, address, zone, weight, None, source, True, "registered by operator", t,
                   operator=True)
        self._health(out, node)
        decision = self._finish(out, self.registry.get(node).to_dict())
        return decision

    def approve(self, node: str, *, now: float) -> Decision:
        """Approve a node waiting in ``joining`` (auto-join off) with the values it has.

        :class:`NotFound` for an unknown node; approving twice changes nothing.
        """
        t = _time(now)
        record = self.registry.get(node)
        out = _Out()
        if not record.approved:
            self._join(
                out, node, record.address, record.zone, record.weight, None, record.source, True,
                "approved by operator", t, operator=True,
            )
        decision = self._finish(out, self.registry.get(node).to_dict())
        return decision

    def drain(self, node: str, *, now: float) -> Decision:
        """``phantom drain NODE``: move its replicas away, then decommission it.

        Draining a draining or decommissioned node changes nothing.
        :class:`NotFound` for an unknown node.
        """
        t = _time(now)
        record = self.registry.get(node)
        out = _Out()
        if record.lifecycle == JOINING:
            self._decommission(out, record, "drained before it held any replica", t)
        elif record.lifecycle in (ACTIVE, *AWAY):
            reason = "drain requested by operator: its replicas move away under the move cap"
            out.act(SHARDING, "drain_node", reason, node=node)
            out.act(BALANCER, "node_update", reason, node=node, lifecycle=DRAINING)
            record, event = self.registry.transition(node, DRAINING, reason, t)
            out.events.append(event)
            # Not judged on the map held now: it may predate replicas placed
            # on the node a moment ago. The next observe_shards finishes it.
        decision = self._finish(out, self.registry.get(node).to_dict())
        return decision

    def check_remove(self, node: str, sole_shards: Iterable[str]) -> NodeRecord:
        """Raise what :meth:`remove` would raise, changing nothing; returns the record.

        The shell uses it as the first step of a removal (see :meth:`remove`).
        """
        record = self.registry.get(node)
        sole = sorted({str(s) for s in sole_shards})
        if sole:
            n = self.config.refusal_names
            more = f" and {len(sole) - n} more" if len(sole) > n else ""
            raise Refused(
                f"node {node} holds the only live replica of {len(sole)} shard(s): "
                f"{', '.join(sole[:n])}{more}; drain it first (`phantom drain {node}`) "
                "and remove it once it is decommissioned",
                node=node,
                shards=sole[:n],
                count=len(sole),
            )
        return record

    def remove(self, node: str, sole_shards: Iterable[str] = (), *, now: float) -> Decision:
        """``phantom remove NODE``: forget the node everywhere.

        ``sole_shards`` are the shards for which the node holds the only live
        copy, as the shell learned them (:meth:`sole_shards` over the current
        map, or sharding); any at all and the removal is :class:`Refused`,
        naming them. :class:`NotFound` for an unknown node.

        Safe shell sequence: :meth:`check_remove`; ``sharding.remove_node``
        (sharding re-checks against its own, newest state and may refuse: pass
        that refusal to the operator); then this method, whose actions repeat
        ``sharding.remove_node`` (now a ``NotFound`` = done) and forget the node
        in membership, discovery and the balancer.
        """
        t = _time(now)
        self.check_remove(node, sole_shards)
        out = _Out()
        reason = "removed by operator"
        # Routing stops first, then the data owner lets go, then the liveness
        # and discovery tables, then the balancer's statistics.
        out.act(BALANCER, "node_update", reason, node=node, lifecycle=DECOMMISSIONED)
        out.act(SHARDING, "remove_node", reason, node=node)
        out.act(MEMBERSHIP, "forget", reason, node=node)
        out.act(DISCOVERY, "remove", reason, node=node)
        out.act(BALANCER, "forget_node", reason, node=node)
        tomb, event = self.registry.remove(node, reason, t)
        out.events.append(event)
        self._heard.pop(node, None)
        self._health(out)
        decision = self._finish(out, {"removed": node, "incarnation": tomb.incarnation})
        return decision

    # -- progress from sharding ------------------------------------------------

    def drain_progress(self, node: str, replicas_left: int, *, now: float) -> Decision:
        """Sharding says ``node`` still holds ``replicas_left`` copies (any role).

        At zero a draining node is decommissioned. Reports about nodes that are
        not draining (late, or about an unknown node) are ignored.
        """
        t = _time(now)
        if isinstance(replicas_left, bool) or not isinstance(replicas_left, int) or replicas_left < 0:
            raise BadRequest(f"replicas_left must be an integer >= 0, got {replicas_left!r}")
        out = _Out()
        record = self.registry.find(node)
        if record is not None and record.lifecycle == DRAINING and replicas_left == 0:
            self._decommission(out, record, "drain finished: it holds no replica", t)
        decision = self._finish(out)
        return decision

    def observe_shards(
        self, shards: Iterable[ShardInfo], *, now: float, down: Iterable[str] = (), epoch: int | None = None
    ) -> Decision:
        """A new shard map (as :func:`.health.shards_from_map` gives it, with the map's ``down`` set).

        Finishes drains (a draining node that holds nothing is decommissioned)
        and re-assesses health (``cluster.health`` on a colour change). The
        shell should pass maps fetched after its last ``drain_node`` action
        completed, so a drain is never judged on a map from before it.
        """
        t = _time(now)
        summary = list(shards)
        self._shards = summary
        self._down = frozenset(down)
        if epoch is not None:
            self._epoch = epoch
        out = _Out()
        health = self._assess()
        for record in self.registry.records():
            if record.lifecycle == DRAINING and health.holdings(record.id) == 0:
                self._decommission(out, record, "drain finished: it holds no replica", t)
        self._health(out)
        decision = self._finish(out)
        return decision

    def tick(self, now: float, expired: Iterable[str] = ()) -> Decision:
        """Sharding says the nodes in ``expired`` have been dead (or left) for its
        re-replication delay: those still ``active`` and down become ``failed``,
        or ``left`` when they left gracefully (same handling, honest label).

        The delay has one timer, sharding's (durable in the store, so a leader
        change does not restart it); the manager only labels the lifecycle from
        it (``expired`` in sharding's ``nodes`` reply).
        """
        t = _time(now)
        gone_for = set(expired)
        delay = self.config.rereplication_delay
        out = _Out()
        for record in self.registry.records():
            if record.id in gone_for and record.lifecycle == ACTIVE and record.member in _DOWN:
                gone = t - record.member_since if record.member_since is not None else delay
                _, event = self.registry.transition(
                    record.id,
                    LEFT if record.member == "left" else FAILED,
                    f"{record.member} for {_secs(gone)} (re-replication delay {delay:g} s): "
                    "its replicas are re-created elsewhere",
                    t,
                    down_for=round(gone, 3),
                )
                out.events.append(event)
        decision = self._finish(out)
        return decision

    def drift(self, down: Iterable[str]) -> list[Action]:
        """Actions that bring sharding's ``down`` set (from its map) in line with the
        member verdicts recorded here: ``node_dead`` for a placed node recorded down
        that sharding still holds up, ``node_alive`` for one recorded up that sharding
        holds down. Level-triggered repair of a lost or dropped action; idempotent."""
        held_down = set(down)
        out = _Out()
        for rec in self.registry.records():
            if rec.lifecycle not in _PLACED or rec.member is None:
                continue
            if rec.member in _DOWN and rec.id not in held_down:
                out.act(SHARDING, "node_dead", f"membership says {rec.member}; sharding's map does not",
                        node=rec.id)
            elif rec.member in ("alive", "suspect") and rec.id in held_down:
                out.act(SHARDING, "node_alive", f"membership says {rec.member}; sharding's map holds it down",
                        node=rec.id)
        return out.actions

    def reset_registry(self, registry: Registry) -> None:
        """Replace the registry (the shell rolls back to the committed one after a failed
        commit, and follows the store's while it does not lead)."""
        self.registry = registry

    def is_down(self, node: str) -> bool | None:
        """Whether the recorded verdict for ``node`` is dead or left (None: unknown node or no verdict)."""
        rec = self.registry.find(node)
        if rec is None or rec.member is None:
            return None
        return rec.member in _DOWN

    # -- anti-entropy ----------------------------------------------------------

    def sync_members(self, members: Iterable[Mapping[str, Any]], now: float) -> Decision:
        """Membership's full list (``members`` reply): any verdict that differs from the
        one recorded is handled as if its event had arrived (events can be lost)."""
        t = _time(now)
        out = _Out()
        seen: set[str] = set()
        for view in members:
            node, state = view.get("id"), view.get("state")
            if not isinstance(node, str) or state not in MEMBER_STATES:
                continue
            inc = view.get("incarnation")
            incarnation = inc if isinstance(inc, int) and not isinstance(inc, bool) and inc >= 0 else None
            record = self.registry.find(node)
            if record is None:
                self._hear(node, str(state), incarnation, t)
            elif record.member != state:
                self._member(out, node, str(state), incarnation, "membership list", t)
            seen.add(node)
        readmit(out, self.registry, seen)
        self._health(out)
        decision = self._finish(out)
        return decision

    def sync_discovery(self, nodes: Iterable[Mapping[str, Any]], now: float) -> Decision:
        """Discovery's full table (``nodes`` reply): nodes the registry lacks or holds with
        other values are handled as ``node.discovered`` (events can be lost). Lost and
        left entries are skipped: discovery is a hint, membership decides."""
        t = _time(now)
        out = _Out()
        for doc in nodes:
            if doc.get("state") not in (None, "alive"):
                continue
            try:
                node = check_node_id(doc.get("id", doc.get("node")))
                address = check_address(doc.get("address"))
                zone = check_zone(doc.get("zone"))
                weight = check_weight(doc.get("weight", 1.0))
                incarnation = check_incarnation(doc.get("incarnation", 0))
            except BadRequest:
                continue
            source = doc.get("source", SOURCE_BEACON)
            if source not in SOURCES:
                source = SOURCE_BEACON
            self._discovered(out, node, address, zone, weight, incarnation, source, "discovery table", t)
        self._health(out)
        decision = self._finish(out)
        return decision

    def reconcile(self, now: float, *, removals: bool = True) -> list[Action]:
        """Every action the durable registry implies, for a shell that just (re)started.

        See :func:`.reconcile.implied_actions` (``removals=False`` for periodic
        anti-entropy).
        """
        _time(now)
        return implied_actions(self.registry, removals=removals)

    # -- reads -----------------------------------------------------------------

    def nodes(self) -> list[NodeRecord]:
        """Every registered node, sorted by id."""
        return self.registry.records()

    def node(self, node: str) -> NodeRecord:
        """One node; :class:`NotFound` if it is not registered."""
        return self.registry.get(node)

    @property
    def epoch(self) -> int | None:
        """Epoch of the last shard map observed (``None`` before the first)."""
        return self._epoch

    @property
    def health(self) -> Health:
        """Health from the last shard map observed and the recorded member states."""
        return self._assess()

    def sole_shards(self, node: str) -> list[str]:
        """Shards that removing ``node`` would leave without a live copy, per the last map."""
        if self._shards is None:
            return []
        return sole_replicas(self._shards, node, self._states(), self._down)

    def status(self, members: Iterable[Mapping[str, Any]] | None, services: Mapping[str, Any]) -> dict[str, Any]:
        """The status document from the registry, the last map and ``members`` (see
        :func:`.health.status_document`)."""
        records = self.registry.records()
        shards, down, epoch = self._shards, self._down, self._epoch
        return status_document(records, members, shards, services, epoch, down)

    # -- internals ----------------------------------------------------------

    def _finish(self, out: _Out, value: Any = None) -> Decision:
        changes = self.registry.take_changes()
        return Decision(tuple(out.actions), tuple(out.events), tuple(changes), value)

    def _states(self) -> dict[str, str | None]:
        return {r.id: r.member for r in self.registry.records()}

    def _assess(self) -> Health:
        return assess(self._shards, self._states(), self._down)

    def _health(self, out: _Out, node: str | None = None) -> Health | None:
        """Re-assess health (``cluster.health`` on a colour change); ``node``: only if the
        last map lists that node, since a verdict on a node holding nothing changes nothing."""
        if self._shards is None:
            return None  # no map yet: nothing to judge, and no red alarm at every start
        last = self._tracker.current
        if node is not None and last is not None and node not in last.per_node:
            return last
        health = self._assess()
        out.events.extend(self._tracker.update(health))
        return health

    def _hear(self, node: str, state: str, incarnation: int | None, now: float) -> None:
        self._heard.pop(node, None)
        self._heard[node] = (state, incarnation, now)
        while len(self._heard) > self.config.max_heard:
            self._heard.popitem(last=False)

    def _discovered(
        self,
        out: _Out,
        node: str,
        address: str,
        zone: str,
        weight: float,
        incarnation: int,
        source: str,
        why: str,
        now: float,
    ) -> None:
        record = self.registry.find(node)
        if record is None:
            tomb = self.registry.tombstone(node)
            if tomb is not None and source == SOURCE_BEACON and incarnation <= tomb.incarnation:
                ghost = NodeRecord(node, address, zone, weight, incarnation, DECOMMISSIONED, None, None,
                                   now, now, "", False, source)
                out.events.append(node_event(
                    EVENT_IGNORED, ghost,
                    f"removed at incarnation {tomb.incarnation} and beaconing with {incarnation}: "
                    f"restart its agent or `phantom register {node}` to bring it back",
                ))
                return
            approved = self.config.auto_join
            reason = f"discovered ({why})" + ("" if approved else
                                             f"; auto-join is off: waiting for `phantom register {node}`")
            self._join(out, node, address, zone, weight, incarnation, source, approved, reason, now)
            return
        self._join(out, node, address, zone, weight, incarnation, source, False, f"discovery: {why}", now)

    def _join(
        self,
        out: _Out,
        node: str,
        address: str,
        zone: str,
        weight: float,
        incarnation: int | None,
        source: str,
        approved: bool,
        reason: str,
        now: float,
        *,
        operator: bool = False,
    ) -> None:
        """Register or update ``node``; admit and activate it when its turn has come.

        ``operator``: the values come from an operator rather than from
        discovery, so discovery must be told (it pins manual nodes).
        """
        old = self.registry.find(node)
        heard = self._heard.pop(node, None) if old is None else None
        if old is None and heard is not None and heard[1] is not None:
            incarnation = max(incarnation or 0, heard[1])
        reg = self.registry.register(
            node, address, zone, weight, now,
            incarnation=incarnation if incarnation is not None else (old.incarnation if old else 0),
            source=source, approved=approved, reason=reason, member=heard[0] if heard else None,
        )
        record = reg.record
        out.events.extend(reg.events)
        newly_approved = record.approved and (reg.created or "approved" in reg.changed)
        if reg.created and operator:
            # A node an operator names may not beacon: discovery pins it.
            out.act(DISCOVERY, "register", reason, node=node, address=address, zone=zone, weight=record.weight)
        if newly_approved:
            out.act(MEMBERSHIP, "admit", reason, node=node)
            out.act(BALANCER, "node_update", reason, node=node, lifecycle=JOINING, address=record.address,
                    weight=record.weight)
        watched = {f: v for f, v in reg.changed.items() if f in WATCHED}
        if watched and not reg.created:
            self._push_update(out, record, watched, reason)
        if record.lifecycle == JOINING and record.approved and record.member == "alive":
            self._activate(out, record, now)

    def _push_update(self, out: _Out, record: NodeRecord, changed: Mapping[str, Any], reason: str) -> None:
        node = record.id
        # Discovery is not told: it refuses to re-pin a node with other values,
        # and unpinning it (remove + register) would make membership forget the
        # node and fail it over. Discovery's copy is a hint; routing takes the
        # address from here, through the balancer.
        if "address" in changed or "weight" in changed:
            out.act(BALANCER, "node_update", reason, node=node, address=record.address, weight=record.weight)
        if ("zone" in changed or "weight" in changed) and record.lifecycle in (ACTIVE, *AWAY):
            # Not for a draining node: add_node would make sharding stop draining it.
            out.act(SHARDING, "add_node", reason, node=node, zone=record.zone, weight=record.weight)

    def _activate(self, out: _Out, record: NodeRecord, now: float) -> None:
        why = "membership reports it alive" + ("" if record.source == SOURCE_BEACON else "; registered by operator")
        reason = f"{why}: sharding may place replicas on it"
        out.act(SHARDING, "add_node", reason, node=record.id, zone=record.zone, weight=record.weight)
        out.act(BALANCER, "node_update", reason, node=record.id, state="alive", lifecycle=ACTIVE)
        _, event = self.registry.transition(record.id, ACTIVE, reason, now)
        out.events.append(event)

    def _decommission(self, out: _Out, record: NodeRecord, reason: str, now: float) -> None:
        out.act(BALANCER, "node_update", reason, node=record.id, lifecycle=DECOMMISSIONED)
        _, event = self.registry.transition(record.id, DECOMMISSIONED, reason, now)
        out.events.append(event)

    def _member(self, out: _Out, node: str, state: str, incarnation: int | None, why: str, now: float) -> None:
        old = self.registry.find(node)
        if old is None:
            self._hear(node, state, incarnation, now)
            return
        prev = old.member
        record = self.registry.set_member(node, state, now, incarnation)
        if state == prev:
            return
        lc = record.lifecycle
        said = f" ({why})" if why else ""
        if state == "suspect":
            if lc in _PLACED:
                reason = f"membership suspects it{said}: the balancer stops routing to it"
                # First, before anything else about this node.
                out.act(BALANCER, "node_update", reason, node=node, state="suspect")
                out.events.append(node_event(EVENT_SUSPECT, record, reason, previous=prev))
            if lc in _PLACED and prev in _DOWN:
                # Suspect after dead: it came back and its member.alive was lost on
                # the way (PUB/SUB). Sharding must hear that it is back.
                self._returned(out, old, record, "seen suspect after being down", now, routing=False)
        elif state in _DOWN:
            if prev in _DOWN or lc not in (ACTIVE, DRAINING):
                return
            delay = self.config.rereplication_delay
            reason = (
                f"membership says {state}{said}: its primaries fail over now; its replicas are re-created "
                f"after {delay:g} s unless it returns"
            )
            out.act(BALANCER, "node_update", reason, node=node, state=state)
            out.act(SHARDING, "node_dead", reason, node=node)
            out.events.append(node_event(EVENT_FAILOVER, record, reason, previous=prev, delay=delay))
        elif state == "alive":
            if lc == JOINING:
                if record.approved:
                    self._activate(out, record, now)
            elif lc in _PLACED and prev in _DOWN:
                self._returned(out, old, record, why, now, routing=True)
            elif lc in (ACTIVE, DRAINING) and prev == "suspect":
                reason = f"no longer suspect{said}: the balancer routes to it again"
                out.act(BALANCER, "node_update", reason, node=node, state="alive")
                out.events.append(node_event(EVENT_RECOVERED, record, reason, previous=prev))

    def _returned(self, out: _Out, old: NodeRecord, record: NodeRecord, why: str, now: float, *, routing: bool) -> None:
        """A node sharding holds as dead is back: tell sharding (and the balancer, if
        ``routing``: not when it came back already suspect). Failed -> active."""
        node = record.id
        said = f" ({why})" if why else ""
        gone = now - old.member_since if old.member_since is not None else 0.0
        if record.lifecycle in AWAY:
            reason = (
                f"back after {_secs(gone)}{said}, past the re-replication delay: its replicas were re-created "
                "elsewhere; placement may give it replicas again"
            )
            # add_node first: a no-op if sharding still holds the node, and it
            # brings the node back if sharding forgot it meanwhile.
            out.act(SHARDING, "add_node", reason, node=node, zone=record.zone, weight=record.weight)
            out.act(SHARDING, "node_alive", reason, node=node)
            if routing:
                out.act(BALANCER, "node_update", reason, node=node, state="alive", lifecycle=ACTIVE)
            else:
                out.act(BALANCER, "node_update", reason, node=node, lifecycle=ACTIVE)
            _, event = self.registry.transition(node, ACTIVE, reason, now, down_for=round(gone, 3))
            out.events.append(event)
            return
        rest = (
            "the drain continues" if record.lifecycle == DRAINING
            else "within the re-replication delay it keeps its replicas and nothing moves"
        )
        reason = f"back after {_secs(gone)}{said}: {rest}"
        out.act(SHARDING, "node_alive", reason, node=node)
        if routing:
            out.act(BALANCER, "node_update", reason, node=node, state="alive")
        out.events.append(node_event(EVENT_RECOVERED, record, reason, previous=old.member, down_for=round(gone, 3)))
