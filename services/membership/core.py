"""The membership core: who is alive, suspect, dead or gone, from heartbeats alone.

Sans-I/O: every method takes ``now`` (seconds on the shell's monotonic clock)
and returns results and events; nothing here reads a clock, sleeps or touches a
socket. Single-threaded: the shell calls it from its one event loop.

How the pieces fit:

* **Gating.** Only nodes admitted with :meth:`Membership.admit` (discovery saw
  their beacon, or an operator registered them) may heartbeat. Anything else is
  counted and answered ``unknown_node``; it never creates a member.
* **Silent admissions.** An admitted node that sends no heartbeat within
  ``first_heartbeat_timeout`` (on the effective clock, see below) is declared
  ``dead`` at incarnation 0, reason ``silent``: a node that died while
  membership was down must still get a verdict. Its first heartbeat (any
  incarnation above 0) brings it back as ``rejoined``.
* **Incarnations.** Each member has an incarnation chosen by its agent. A lower
  one is stale and refused. ``dead`` and ``left`` are final for their
  incarnation: only a strictly higher one brings the node back. A heartbeat at
  the current incarnation clears ``suspect`` (it is direct evidence of life),
  and its ack says the node had been suspected so the agent can refute by
  bumping its incarnation. Every refusal carries the incarnation membership
  holds, so an agent that learns of a higher one jumps past it at once. How
  far ahead an incarnation may run is bounded (``incarnation_lead``, against
  the wall clock the shell hands in and the held incarnation): further is
  refused as ``incarnation_ahead``, so one forged or corrupt heartbeat cannot
  push a node beyond what its agent can pass.
* **Detection.** A :class:`PhiDetector` per node. Rather than evaluating phi for
  every node on every tick, the core turns the phi thresholds into the silence
  at which they are crossed and keeps one deadline per node in a heap; a tick
  only looks at nodes whose deadline has come. A heartbeat merely records its
  arrival (O(1)); the next tick folds the arrivals into the detector and moves
  the deadline.
* **Observer stalls.** The shell reports with every tick how late its timer
  fired. A lag over ``stall_threshold`` is a stall of membership itself (GC, CPU
  starvation, SIGSTOP): it is written into a ledger and removed from an
  *effective clock* in which all silences are measured, so time spent stalled is
  nobody's silence. Arrivals drained from the backlog at the end of a stall all
  carry the same instant; because arrivals are only folded into the detectors
  at the tick (after the stall is known), gaps that touch a stall or the
  ``backlog_grace`` after it are dropped instead of polluting the windows, and
  nobody is convicted during that grace.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from phantom_bus import ids
from phantom_bus.errors import BadRequest, Conflict, NotFound, PhantomError
from phantom_bus.events import Event
from phantom_bus.protocol import wire_type

from .config import MembershipConfig
from .detector import PhiDetector

ALIVE: Final = "alive"
SUSPECT: Final = "suspect"
DEAD: Final = "dead"
LEFT: Final = "left"
STATES: Final = (ALIVE, SUSPECT, DEAD, LEFT)

EVENT_ALIVE: Final = "member.alive"
EVENT_SUSPECT: Final = "member.suspect"
EVENT_DEAD: Final = "member.dead"
EVENT_LEFT: Final = "member.left"
EVENT_LOAD: Final = "member.load"

# Heartbeat reply codes (HeartbeatResult.code).
OK: Final = "ok"
DUPLICATE: Final = "duplicate"
UNKNOWN_NODE: Final = "unknown_node"
STALE_INCARNATION: Final = "stale_incarnation"
DECLARED_DEAD: Final = "declared_dead"
HAS_LEFT: Final = "has_left"
INCARNATION_AHEAD: Final = "incarnation_ahead"

_MAX_INT = 2**63 - 1  # an int64 on the wire, so agents in other languages can hold it
# Arrivals buffered per node between two ticks. A sane agent sends one or two;
# beyond this the node is flooding and only its latest arrival is kept.
_MAX_PENDING = 64
#: Nodes per ``member.load`` event (see :meth:`Membership.load_events`).
LOAD_CHUNK: Final = 1000
# Stalls older than this are forgotten; only a node silent for longer than an
# hour could still need them, and such a node was convicted long ago.
_STALL_MEMORY = 3600.0
_MAX_STALLS = 4096


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """What membership answers to one heartbeat.

    ``accepted`` says the heartbeat counted as a sign of life. ``state`` and
    ``incarnation`` are membership's view of the node after the heartbeat
    (``None`` for an unknown node). ``suspected`` is true when the node was
    suspect as the heartbeat arrived; ``refute`` tells the agent to send a
    higher incarnation (it was suspected, or it is dead or left at this
    incarnation). ``events`` are the membership events the heartbeat caused.
    """

    node: str
    code: str
    accepted: bool
    message: str = ""
    state: str | None = None
    incarnation: int | None = None
    suspected: bool = False
    refute: bool = False
    events: tuple[Event, ...] = ()

    @property
    def ok(self) -> bool:
        """False when the heartbeat was refused (unknown node, stale or dead incarnation)."""
        return self.code in (OK, DUPLICATE)

    def to_wire(self) -> dict[str, Any]:
        """The ack body: plain msgpack-able values."""
        return {
            "node": self.node,
            "code": self.code,
            "accepted": self.accepted,
            "message": self.message,
            "state": self.state,
            "incarnation": self.incarnation,
            "suspected": self.suspected,
            "refute": self.refute,
        }

    def error(self) -> PhantomError | None:
        """The refusal as a typed error for an error reply, or ``None`` if not refused.

        ``details`` carries ``reason`` (the code above) and the incarnation
        membership holds, so an agent that restarted with a lower incarnation
        can jump past it.
        """
        if self.ok:
            return None
        details: dict[str, Any] = {"reason": self.code, "node": self.node}
        if self.incarnation is not None:
            details["incarnation"] = self.incarnation
        if self.state is not None:
            details["state"] = self.state
        if self.code == UNKNOWN_NODE:
            return NotFound(self.message, **details)
        return Conflict(self.message, **details)


@dataclass(slots=True)
class _Member:
    node: str
    incarnation: int
    detector: PhiDetector
    state: str = ALIVE
    since: float = 0.0
    seq: int = -1
    last_arrival: float = 0.0
    # Raw time of the latest arrival already folded into the detector.
    fed_arrival: float | None = None
    pending: list[float] = field(default_factory=list)
    pending_restart: bool = True
    e_last: float = 0.0
    suspect_silence: float = math.inf
    dead_silence: float = math.inf
    suspect_since: float = 0.0
    token: int = 0
    armed: float = math.inf
    load: dict[str, Any] | None = None
    load_at: float | None = None
    heartbeats: int = 0
    # State changes so far: with the incarnation, the version of the member's state
    # that consumers compare so that a late event never overwrites a newer one.
    changes: int = 0


class _StallLedger:
    """The observer's own stalls, and the effective clock that skips them.

    ``effective(t)`` is ``t`` minus all stalled time before ``t``; inside a stall
    it stands still at the stall's start. A silence measured on this clock is
    the time the observer was actually awake to hear a heartbeat.
    """

    __slots__ = ("_base", "_cums", "_ends", "_guards", "_starts", "total")

    def __init__(self) -> None:
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._cums: list[float] = []  # stalled seconds up to the end of stall i
        # Until when arrivals may still be backlog of stall i or an earlier one
        # (a running maximum, so one lookup answers for all earlier stalls).
        self._guards: list[float] = []
        self._base = 0.0  # stalled seconds in pruned stalls
        self.total = 0.0

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def last_end(self) -> float:
        return self._ends[-1] if self._ends else -math.inf

    def add(self, start: float, end: float, grace: float) -> float:
        """Record a stall whose backlog may take ``grace`` seconds after ``end`` to
        drain; returns the seconds newly counted (overlapping stalls merge)."""
        if end <= start:
            return 0.0
        if self._ends and start <= self._ends[-1]:
            if end <= self._ends[-1]:
                return 0.0
            added = end - self._ends[-1]
            self._ends[-1] = end
            self.total += added
            self._cums[-1] = self.total
            self._guards[-1] = max(self._guards[-1], end + grace)
            return added
        added = end - start
        self.total += added
        self._starts.append(start)
        self._ends.append(end)
        self._cums.append(self.total)
        self._guards.append(max(self._guards[-1] if self._guards else -math.inf, end + grace))
        return added

    def effective(self, t: float) -> float:
        """``t`` on the effective clock."""
        ends = self._ends
        if not ends or t >= ends[-1]:
            return t - self.total
        i = bisect_right(self._starts, t) - 1
        if i < 0:
            return t - self._base
        if t <= ends[i]:
            return self._starts[i] - (self._cums[i - 1] if i else self._base)
        return t - self._cums[i]

    def touches(self, a0: float, a1: float) -> bool:
        """Whether ``[a0, a1]`` overlaps a stall or the backlog drain after one."""
        i = bisect_right(self._starts, a1) - 1
        return i >= 0 and self._guards[i] >= a0

    def prune(self, now: float) -> None:
        """Forget stalls that ended more than an hour ago (bounded memory)."""
        horizon = now - _STALL_MEMORY
        k = bisect_right(self._ends, horizon)
        k = max(k, len(self._starts) - _MAX_STALLS)
        if k > 0:
            self._base = self._cums[k - 1]
            del self._starts[:k], self._ends[:k], self._cums[:k], self._guards[:k]


def _check_node(node: object) -> str:
    return ids.check_node_id(node)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise BadRequest(f"{name} must be an integer in [0, 2^63 - 1], got {value!r}")
    return value


def _check_time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number of seconds, got {value!r}")
    return float(value)


class Membership:
    """Membership list and failure detection for every admitted node (sans-I/O).

    The shell calls :meth:`heartbeat` for each heartbeat, :meth:`tick` every
    ``config.tick_interval`` with the measured lateness of its timer,
    :meth:`admit` / :meth:`forget` as discovery or an operator adds and removes
    nodes, and publishes the events these return, in the order it got them.
    """

    def __init__(self, config: MembershipConfig | None = None) -> None:
        self.config = config if config is not None else MembershipConfig()
        self.config.validate()
        self._admitted: set[str] = set()
        self._intervals: dict[str, float] = {}  # heartbeat interval announced per node
        # The highest incarnation discovery reported per admitted node: a node that never
        # heartbeats here is declared dead at it, so the verdict outranks what an earlier
        # membership instance said of that incarnation.
        self._announced: dict[str, int] = {}
        self._members: dict[str, _Member] = {}
        # Admitted nodes not heard from yet in this life -> effective admission time
        # (insertion order is deadline order: the effective clock never goes back).
        self._silent: dict[str, float] = {}
        self._dirty: dict[str, None] = {}  # insertion-ordered set
        self._heap: list[tuple[float, int, str]] = []
        self._tokens = 0
        self._stalls = _StallLedger()
        self._amnesty_until = -math.inf
        self._now = -math.inf
        self._last_tick: float | None = None
        self._load_changed: dict[str, None] = {}
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "heartbeats",
                "accepted",
                "duplicates",
                "unknown_node",
                "stale_incarnation",
                "declared_dead",
                "has_left",
                "incarnation_ahead",
                "lost",
                "gaps_dropped",
                "ticks",
                "stalls",
            ),
            0,
        )

    # -- registration ---------------------------------------------------------

    def admit(self, node: str, now: float, interval: float | None = None, incarnation: int | None = None) -> bool:
        """Allow ``node`` to heartbeat (discovery saw it, or an operator registered it).

        ``interval`` is the heartbeat period the node announced (its beacon's
        heartbeat hint), if it differs from ``config.heartbeat_interval``; it
        seeds the node's detector so its first gaps are judged by the right
        yardstick. ``incarnation`` is the one its beacons carry: a node that
        then never heartbeats is declared dead (``silent``) at the highest one
        announced, not at 0, so that verdict is not older than one another
        membership instance gave before. Returns whether the node was newly
        admitted. Admission alone creates no member: a node becomes ``alive``
        with its first heartbeat.
        """
        node = _check_node(node)
        if interval is not None:
            interval = _check_time("interval", interval)
            if not 0.0 < interval <= 3600.0:
                raise BadRequest(f"interval must be in (0, 3600] seconds, got {interval!r}")
        if incarnation is not None:
            incarnation = _check_count("incarnation", incarnation)
        self._clock(now)
        if interval is not None:
            self._intervals[node] = interval
        if incarnation is not None and incarnation > self._announced.get(node, -1):
            self._announced[node] = incarnation
        if node in self._admitted:
            return False
        self._admitted.add(node)
        if node not in self._members:
            self._silent[node] = self._stalls.effective(self._now)
        return True

    def admit_discovered(self, doc: Mapping[str, Any], now: float) -> bool:
        """:meth:`admit` the node of a discovery document (a ``node.discovered`` or
        ``node.updated`` event, or a row of discovery's ``nodes`` reply), with the
        heartbeat interval (``hb.interval``) and incarnation it announces; hints of
        the wrong type are ignored. ``BadRequest`` if it names no valid node."""
        if "id" in doc:
            node = doc["id"]
        elif "node" in doc:
            node = doc["node"]
        else:
            raise BadRequest("a discovery document names its node in 'id' or 'node'")
        hints = doc.get("hb")
        interval = hints.get("interval") if isinstance(hints, Mapping) else None
        if not isinstance(interval, int | float) or isinstance(interval, bool):
            interval = None
        incarnation = doc.get("incarnation")
        if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
            incarnation = None
        return self.admit(str(node), now, interval, incarnation)

    def forget(self, node: str, now: float) -> list[Event]:
        """Remove ``node`` entirely; further heartbeats get ``unknown_node``.

        A member that had not left yet gets a ``member.left`` event with reason
        ``removed`` so consumers drop it.
        """
        node = _check_node(node)
        events: list[Event] = []
        now = self._clock(now)
        self._admitted.discard(node)
        self._silent.pop(node, None)
        self._intervals.pop(node, None)
        self._announced.pop(node, None)
        rec = self._members.pop(node, None)
        self._dirty.pop(node, None)
        self._load_changed.pop(node, None)
        if rec is not None and rec.state != LEFT:
            events.append(self._event(EVENT_LEFT, rec, "removed", 0.0, rec.state))
        return events

    def is_admitted(self, node: str) -> bool:
        """Whether ``node`` may heartbeat."""
        return node in self._admitted

    def pending(self) -> list[str]:
        """Admitted nodes that have not sent a heartbeat yet, sorted."""
        return sorted(n for n in self._admitted if n not in self._members)

    # -- heartbeats -----------------------------------------------------------

    def heartbeat(
        self,
        node: str,
        incarnation: int,
        seq: int,
        load: Mapping[str, Any] | None,
        now: float,
        wall_ms: int | None = None,
    ) -> HeartbeatResult:
        """Take one heartbeat; O(1). Raises ``BadRequest`` on malformed arguments.

        ``seq`` increases by one per heartbeat within an incarnation; a ``seq``
        not above the last one seen is a duplicate or reordered message and is
        ignored (``code == "duplicate"``). ``load`` is the agent's opaque load
        document (``None`` keeps the previous one). ``wall_ms`` is the shell's
        wall clock in milliseconds since the Unix epoch, the yardstick of the
        ``incarnation_lead`` bound (agents number incarnations on theirs).
        """
        node = _check_node(node)
        incarnation = _check_count("incarnation", incarnation)
        seq = _check_count("seq", seq)
        if wall_ms is not None:
            wall_ms = _check_count("wall_ms", wall_ms)
        if load is not None and not isinstance(load, Mapping):
            raise BadRequest(f"load must be a map or nil, got {wire_type(load)}")
        now = self._clock(now)
        result = self._heartbeat(node, incarnation, seq, load, now, wall_ms)
        return result

    def _heartbeat(
        self,
        node: str,
        incarnation: int,
        seq: int,
        load: Mapping[str, Any] | None,
        now: float,
        wall_ms: int | None,
    ) -> HeartbeatResult:
        counters = self._counters
        counters["heartbeats"] += 1
        rec = self._members.get(node)
        held = rec.incarnation if rec is not None else None
        ceiling = self._ceiling(held, wall_ms)
        if ceiling is not None and incarnation > ceiling and (rec is not None or node in self._admitted):
            counters[INCARNATION_AHEAD] += 1
            return HeartbeatResult(
                node,
                INCARNATION_AHEAD,
                False,
                f"incarnation {incarnation} of {node!r} is more than incarnation_lead "
                f"({self.config.incarnation_lead:g} s) ahead of membership's clock and of the "
                f"incarnation it holds ({held}): refused; check the clock of that host, or "
                "whether something forges its heartbeats",
                rec.state if rec is not None else None,
                held,
            )
        if rec is None:
            if node not in self._admitted:
                counters["unknown_node"] += 1
                return HeartbeatResult(
                    node,
                    UNKNOWN_NODE,
                    False,
                    f"node {node!r} is not registered with membership: send discovery "
                    "beacons first (or register it manually), then heartbeat",
                )
            rec = _Member(node, incarnation, self._detector(node), since=now)
            self._members[node] = rec
            self._silent.pop(node, None)
            self._revive(rec, incarnation, seq, now)
            event = self._event(EVENT_ALIVE, rec, "joined", 0.0, None)
            self._record_load(rec, load, now)
            counters["accepted"] += 1
            return HeartbeatResult(
                node, OK, True, state=ALIVE, incarnation=incarnation, events=(event,)
            )

        if incarnation < rec.incarnation:
            counters["stale_incarnation"] += 1
            return HeartbeatResult(
                node,
                STALE_INCARNATION,
                False,
                f"incarnation {incarnation} of {node!r} is older than {rec.incarnation}: "
                "restart the heartbeat stream with an incarnation above it",
                rec.state,
                rec.incarnation,
                refute=True,
            )

        state = rec.state
        if incarnation == rec.incarnation:
            if state in (DEAD, LEFT):
                code = DECLARED_DEAD if state == DEAD else HAS_LEFT
                counters[code] += 1
                return HeartbeatResult(
                    node,
                    code,
                    False,
                    f"{node!r} is {state} at incarnation {incarnation}: "
                    "rejoin with a higher incarnation",
                    state,
                    rec.incarnation,
                    refute=True,
                )
            if seq <= rec.seq:
                counters["duplicates"] += 1
                return HeartbeatResult(
                    node,
                    DUPLICATE,
                    False,
                    state=state,
                    incarnation=rec.incarnation,
                    suspected=state == SUSPECT,
                    refute=state == SUSPECT,
                )
            if seq > rec.seq + 1:
                counters["lost"] += seq - rec.seq - 1
            rec.seq = seq
            self._arrive(rec, now)
            events: tuple[Event, ...] = ()
            if state == SUSPECT:
                events = (self._transition(rec, ALIVE, "recovered", 0.0, now),)
            self._record_load(rec, load, now)
            counters["accepted"] += 1
            rec.heartbeats += 1
            return HeartbeatResult(
                node,
                OK,
                True,
                state=rec.state,
                incarnation=rec.incarnation,
                suspected=state == SUSPECT,
                refute=state == SUSPECT,
                events=events,
            )

        # A higher incarnation: a refutation, or the agent restarted.
        events = ()
        if state in (DEAD, LEFT):
            self._revive(rec, incarnation, seq, now)
            events = (self._transition(rec, ALIVE, "rejoined", 0.0, now),)
        else:
            rec.incarnation = incarnation
            rec.seq = seq
            rec.heartbeats += 1
            self._arrive(rec, now)
            if state == SUSPECT:
                events = (self._transition(rec, ALIVE, "refuted", 0.0, now),)
        self._record_load(rec, load, now)
        counters["accepted"] += 1
        return HeartbeatResult(
            node,
            OK,
            True,
            state=ALIVE,
            incarnation=rec.incarnation,
            suspected=state == SUSPECT,
            events=events,
        )

    def _ceiling(self, held: int | None, wall_ms: int | None) -> int | None:
        """The highest incarnation a heartbeat may carry now, or None for no bound."""
        if held is None and wall_ms is None:
            return None  # a new node and no clock: nothing to measure against
        lead = int(self.config.incarnation_lead * 1000)
        return max(held or 0, wall_ms or 0) + lead

    def leave(self, node: str, incarnation: int, now: float) -> list[Event]:
        """Graceful leave: ``node`` becomes ``left`` at ``incarnation``.

        Raises ``NotFound`` for a node that is not admitted and ``Conflict`` for
        an incarnation below the known one (a delayed leave of an old process
        must not remove its successor). Leaving twice is a no-op.
        """
        node = _check_node(node)
        incarnation = _check_count("incarnation", incarnation)
        events: list[Event] = []
        now = self._clock(now)
        rec = self._members.get(node)
        if rec is None:
            if node not in self._admitted:
                raise NotFound(
                    f"node {node!r} is not registered with membership; nothing to leave",
                    node=node,
                    reason=UNKNOWN_NODE,
                )
            rec = _Member(node, incarnation, self._detector(node), since=now)
            rec.state = LEFT
            rec.changes = 1
            self._members[node] = rec
            self._silent.pop(node, None)
            events.append(self._event(EVENT_LEFT, rec, "leave", 0.0, None))
        elif incarnation < rec.incarnation:
            raise Conflict(
                f"leave of {node!r} at incarnation {incarnation} is older than the "
                f"current incarnation {rec.incarnation}; ignored",
                node=node,
                reason=STALE_INCARNATION,
                incarnation=rec.incarnation,
            )
        elif rec.state != LEFT or incarnation > rec.incarnation:
            rec.incarnation = incarnation
            rec.pending.clear()
            self._dirty.pop(node, None)
            if rec.state != LEFT:
                events.append(self._transition(rec, LEFT, "leave", 0.0, now))
        return events

    # -- time -----------------------------------------------------------------

    def tick(self, now: float, observer_lag: float = 0.0) -> list[Event]:
        """Advance detection to ``now`` and return the state changes.

        ``observer_lag`` is how late the shell's tick timer fired (seconds): its
        own loop was stalled for that long, and that time is discounted from
        every node's silence when it reaches ``stall_threshold``.
        """
        now_checked = _check_time("now", now)
        lag = _check_time("observer_lag", observer_lag)
        cfg = self.config
        events: list[Event] = []
        now = self._clock(now_checked)
        self._counters["ticks"] += 1
        if lag >= cfg.stall_threshold:
            # The loop was demonstrably alive at the previous tick, so the
            # stall cannot have begun before it.
            start = now - lag
            if self._last_tick is not None:
                start = max(start, self._last_tick)
            # The backlog queued during a stall drains in a time proportional
            # to the stall (unless the observer is over half busy), so a short
            # GC pause needs a short grace, a SIGSTOP up to backlog_grace.
            grace = min(cfg.backlog_grace, now - start)
            if self._stalls.add(start, now, grace) > 0.0:
                self._counters["stalls"] += 1
                self._amnesty_until = max(self._amnesty_until, now + grace)
            self._stalls.prune(now)
        self._last_tick = now
        self._fold_arrivals()
        if now >= self._amnesty_until:
            self._expire(now, events)
            self._expire_silent(now, events)
        if len(self._heap) > 2 * len(self._members) + 1024:
            self._compact_heap()
        return events

    def _fold_arrivals(self) -> None:
        """Feed arrivals since the last tick into the detectors and move deadlines.

        Done at the tick rather than per heartbeat so that a stall reported by
        this tick is known before the gaps that straddle it are judged.
        """
        if not self._dirty:
            return
        stalls = self._stalls
        members = self._members
        dropped = 0
        for node in self._dirty:
            rec = members.get(node)
            if rec is None or not rec.pending or rec.state not in (ALIVE, SUSPECT):
                continue
            det = rec.detector
            prev = rec.fed_arrival
            for a in rec.pending:
                ea = stalls.effective(a)
                if rec.pending_restart or prev is None:
                    det.restart(ea)
                    rec.pending_restart = False
                elif stalls.touches(prev, a):
                    det.restart(ea)
                    dropped += 1
                else:
                    det.heartbeat(ea)
                prev = a
            rec.pending.clear()
            rec.fed_arrival = prev
            rec.e_last = stalls.effective(rec.last_arrival)
            rec.suspect_silence = det.silence_for_phi(self.config.suspect_phi)
            rec.dead_silence = det.silence_for_phi(self.config.dead_phi)
            self._arm(rec, self._due(rec))
        self._dirty.clear()
        self._counters["gaps_dropped"] += dropped

    def _expire(self, now: float, events: list[Event]) -> None:
        heap = self._heap
        e_now = self._stalls.effective(now)
        members = self._members
        while heap and heap[0][0] <= e_now:
            _, token, node = heapq.heappop(heap)
            rec = members.get(node)
            if rec is None or rec.token != token:
                continue
            rec.token = 0
            if rec.state not in (ALIVE, SUSPECT):
                continue
            silence = e_now - rec.e_last
            if rec.state == ALIVE and silence >= rec.suspect_silence:
                phi = rec.detector.phi_for_silence(silence)
                events.append(self._transition(rec, SUSPECT, "phi", phi, now))
                rec.suspect_since = e_now
            if rec.state == SUSPECT:
                if silence >= rec.dead_silence:
                    reason = "phi"
                elif e_now - rec.suspect_since >= self.config.suspicion_timeout:
                    reason = "suspicion_timeout"
                else:
                    reason = ""
                if reason:
                    phi = rec.detector.phi_for_silence(silence)
                    events.append(self._transition(rec, DEAD, reason, phi, now))
                    continue
            self._arm(rec, self._due(rec))

    def _expire_silent(self, now: float, events: list[Event]) -> None:
        silent = self._silent
        if not silent:
            return
        limit = self._stalls.effective(now) - self.config.first_heartbeat_timeout
        while silent:
            node, since = next(iter(silent.items()))
            if since > limit:
                return
            del silent[node]
            if node in self._members or node not in self._admitted:
                continue
            rec = _Member(
                node, self._announced.get(node, 0), self._detector(node), state=DEAD, since=now, last_arrival=now
            )
            self._members[node] = rec
            events.append(
                self._event(EVENT_DEAD, rec, "silent", 0.0, None)
            )

    # -- reading --------------------------------------------------------------

    def members(self, now: float) -> list[dict[str, Any]]:
        """Every member as a plain dict (see :meth:`member`), sorted by id."""
        now = max(_check_time("now", now), self._now)
        return [self._describe(self._members[n], now) for n in sorted(self._members)]

    def member(self, node: str, now: float) -> dict[str, Any]:
        """One member: ``id, state, incarnation, change, phi, last_heartbeat_age, seq, load,
        load_age, load_stale, since, state_age, heartbeats``.

        Ages are seconds; ``since`` is the time of the last state change on the
        caller's clock. Raises ``NotFound`` for a node with no membership record.
        """
        node = _check_node(node)
        now = max(_check_time("now", now), self._now)
        rec = self._members.get(node)
        if rec is None:
            if node in self._admitted:
                raise NotFound(
                    f"node {node!r} is registered but has not sent a heartbeat yet",
                    node=node,
                    reason="no_heartbeat",
                )
            raise NotFound(f"node {node!r} is not a member", node=node, reason=UNKNOWN_NODE)
        return self._describe(rec, now)

    def counts(self) -> dict[str, int]:
        """Members per state."""
        out = dict.fromkeys(STATES, 0)
        for rec in self._members.values():
            out[rec.state] += 1
        return out

    def stats(self) -> dict[str, Any]:
        """Counters (heartbeats, refusals by reason, lost seqs, dropped gaps, stalls...)."""
        out: dict[str, Any] = dict(self._counters)
        out["stalled_seconds"] = self._stalls.total
        out["members"] = len(self._members)
        out["admitted"] = len(self._admitted)
        return out

    def load_digest(self, now: float) -> dict[str, dict[str, Any]]:
        """Latest load of every member whose load changed since the previous digest."""
        self._clock(now)
        out: dict[str, dict[str, Any]] = {}
        for node in self._load_changed:
            rec = self._members.get(node)
            if rec is not None and rec.load is not None:
                out[node] = dict(rec.load)
        self._load_changed.clear()
        return out

    def load_events(self, now: float, chunk: int = LOAD_CHUNK) -> list[Event]:
        """The periodic ``member.load`` events (``{"loads": {node: load}}``), at most
        ``chunk`` nodes each; none when no load changed. They are a digest, not
        state changes. One event for every node passed the
        4 MiB message limit near 11,500 nodes (bench/failure_detection.py) and
        subscribers dropped it; 1,000 agent load documents are about 0.4 MB."""
        items = sorted(self.load_digest(now).items())
        return [Event(EVENT_LOAD, {"loads": dict(items[i : i + chunk])}) for i in range(0, len(items), chunk)]

    # -- internals ------------------------------------------------------------

    def _clock(self, now: float) -> float:
        # Callers may hand in times read a moment apart (a heartbeat stamped
        # before a tick that ran first); the core's clock never goes backwards,
        # so arrivals stay ordered.
        now = _check_time("now", now)
        if now > self._now:
            self._now = now
        return self._now

    def _detector(self, node: str) -> PhiDetector:
        cfg = self.config
        return PhiDetector(
            self._intervals.get(node, cfg.heartbeat_interval),
            cfg.window_size,
            cfg.min_std_dev,
            cfg.acceptable_pause,
        )

    def _revive(self, rec: _Member, incarnation: int, seq: int, now: float) -> None:
        rec.incarnation = incarnation
        rec.seq = seq
        # A new process: nothing learned from the old one applies to it, and
        # it may have announced a different interval since.
        rec.detector = self._detector(rec.node)
        rec.fed_arrival = None
        rec.pending.clear()
        rec.pending_restart = True
        rec.heartbeats = 1
        self._arrive(rec, now)

    def _arrive(self, rec: _Member, now: float) -> None:
        rec.last_arrival = now
        pending = rec.pending
        if len(pending) >= _MAX_PENDING:
            pending.clear()
            rec.pending_restart = True
        pending.append(now)
        self._dirty[rec.node] = None

    def _record_load(self, rec: _Member, load: Mapping[str, Any] | None, now: float) -> None:
        if load is None:
            return
        if rec.load is None or load != rec.load:
            rec.load = load if isinstance(load, dict) else dict(load)
            self._load_changed[rec.node] = None
        rec.load_at = now

    def _due(self, rec: _Member) -> float:
        if rec.state == ALIVE:
            return rec.e_last + rec.suspect_silence
        return min(rec.e_last + rec.dead_silence, rec.suspect_since + self.config.suspicion_timeout)

    def _arm(self, rec: _Member, due: float) -> None:
        # One live heap entry per node. A later deadline keeps the existing
        # entry (it fires early and re-arms), so steady heartbeats cost no heap
        # traffic; only an earlier deadline needs a new entry.
        if rec.token and rec.armed <= due:
            return
        self._tokens += 1
        rec.token = self._tokens
        rec.armed = due
        heapq.heappush(self._heap, (due, rec.token, rec.node))

    def _compact_heap(self) -> None:
        members = self._members
        self._heap = [
            e for e in self._heap if (m := members.get(e[2])) is not None and m.token == e[1]
        ]
        heapq.heapify(self._heap)

    def _transition(
        self, rec: _Member, state: str, reason: str, phi: float, now: float
    ) -> Event:
        previous = rec.state
        rec.state = state
        rec.since = now
        rec.changes += 1
        kind = {
            ALIVE: EVENT_ALIVE,
            SUSPECT: EVENT_SUSPECT,
            DEAD: EVENT_DEAD,
            LEFT: EVENT_LEFT,
        }[state]
        if state in (DEAD, LEFT):
            rec.token = 0
            rec.pending.clear()
        return self._event(kind, rec, reason, phi, previous)

    @staticmethod
    def _event(kind: str, rec: _Member, reason: str, phi: float, previous: str | None) -> Event:
        return Event(
            kind,
            {
                "node": rec.node,
                "incarnation": rec.incarnation,
                "change": rec.changes,
                "phi": round(phi, 3),
                "reason": reason,
                "previous": previous,
            },
        )

    def _describe(self, rec: _Member, now: float) -> dict[str, Any]:
        if rec.state == LEFT:
            phi = 0.0
        else:
            silence = self._stalls.effective(now) - self._stalls.effective(rec.last_arrival)
            phi = rec.detector.phi_for_silence(silence)
        load_age = None if rec.load_at is None else now - rec.load_at
        return {
            "id": rec.node,
            "state": rec.state,
            "incarnation": rec.incarnation,
            "change": rec.changes,
            "phi": round(phi, 3),
            "last_heartbeat_age": now - rec.last_arrival,
            "seq": rec.seq,
            "load": dict(rec.load) if rec.load is not None else None,
            "load_age": load_age,
            "load_stale": load_age is None or load_age > self.config.max_load_age,
            "since": rec.since,
            "state_age": now - rec.since,
            "heartbeats": rec.heartbeats,
        }
