"""Following the shard map: one implementation for every reader of it.

The balancer, the manager, agents and local-routing clients all hold a copy
of the shard map. They follow it the same way, level-triggered:

* a ``shardmap.changed`` event is a *hint* to read (``map`` with
  ``since_epoch``), so a lost event costs at most one poll interval
  (``poll_s``, about a heartbeat), never correctness. When the map is small,
  sharding also pushes it in the event (``map``: the same bytes the ``map``
  operation answers); a newer pushed map of the current term is taken at once,
  with no read, which is what makes a change reach every reader within
  milliseconds. Anything else about a push (older, malformed) makes it a hint;
* sharding's leader also publishes ``shardmap.current`` about once a second,
  naming the epoch it serves: when that is the epoch held, the map is known
  current (a refresh) and neither a poll nor a whole read is made, so
  followers cost sharding nothing while nothing changes; naming another epoch,
  it is a hint like any other (an older one: a whole read, as below);
* an event of an older leader ``term`` than one already seen is dropped;
* an epoch never goes backwards: a map older than the one held (a restored
  backup, a lost database, a stale leader) is refused, the newer map is kept,
  and the refusal is reported (:class:`Regression`, counted in
  :meth:`MapFollower.status`). Because ``since_epoch`` cannot reveal an older
  map, the follower reads the whole map (no ``since_epoch``) when an event
  names an older epoch and every ``verify_s`` seconds.

:class:`MapFollower` is the sans-I/O core (inputs and ``now`` in, what to
read and what changed out). :class:`AsyncMapFollower` is its asyncio shell:
it runs the reads through any object with an awaitable ``request(service,
op, **args)`` (an :class:`~phantom_bus.client.AsyncClient`), bounds every
wait, and calls back on a new map or a regression.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from loguru import logger

from phantom_bus import protocol
from phantom_bus.errors import PhantomError
from phantom_bus.shardmap import ShardMap

#: Event kind a follower's owner publishes when it refuses an older map.
REGRESSED = "shardmap.regressed"

#: Seconds between reads when no event arrives: about one heartbeat, so that a
#: lost ``shardmap.changed`` is repaired that quickly. A read that finds nothing
#: new is a nil reply, cheap for sharding.
DEFAULT_POLL_S = 1.0
#: Seconds between whole-map reads that would reveal an epoch gone backwards
#: when no event says so (``since_epoch`` answers nil for an older map).
DEFAULT_VERIFY_S = 15.0
#: Event kind sharding's leader publishes about once a second with the epoch it
#: serves (``{"epoch", "term"}``): proof that the map held is current, so a
#: follower that hears it needs no poll, and a lost ``shardmap.changed`` shows
#: within a second (the epoch named is newer than the one held).
CURRENT = "shardmap.current"
#: Seconds a ``shardmap.current`` that confirms the held epoch postpones the
#: next poll: a few of them may be lost before the follower reads by itself.
CONFIRMED_POLL_S = 3.0
#: Seconds between attempts while no map is held yet (a service that starts
#: before sharding answers within a fraction of a second once sharding is up).
FIRST_RETRY_S = 0.2
#: How much the shell's followers spread their reads: each wait is drawn from
#: ``[w * (1 - j/2), w * (1 + j/2)]`` (a postponement by ``shardmap.current`` from
#: ``[w, w * (1 + j)]``). Every reader hears the same events at the same moment;
#: without it they would all poll, and make their whole reads, in the same
#: instant once the events stop (sharding's leader gone: just when a new one is
#: starting), and retry a failed read in step.
POLL_JITTER = 0.2


@dataclass(frozen=True, slots=True)
class Regression:
    """An offered map older than the one held: refused, and reported."""

    held: int
    offered: int
    term: int | None

    def to_wire(self) -> dict[str, Any]:
        """The payload of a ``shardmap.regressed`` event."""
        return {
            "epoch": self.held,
            "offered_epoch": self.offered,
            "term": self.term,
            "reason": f"refused shard map epoch {self.offered}: epoch {self.held} is already held "
                      "(restored or lost sharding store?)",
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one read changed: a new map, a refused older one, or nothing."""

    changed: ShardMap | None = None
    regressed: Regression | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class MapFollower:
    """The map-following state machine (sans-I/O, single-threaded).

    Call :meth:`next_read` to learn whether a read is due and with which
    arguments, then :meth:`on_reply` or :meth:`on_error` with its result;
    :meth:`hint` with every ``shardmap.changed`` event; :meth:`wake_at` says
    when to look again. ``jitter`` (0: none, the default) spreads every wait by
    that fraction (see :data:`POLL_JITTER`), drawn from ``rng`` (pass a seeded
    one for a reproducible schedule).
    """

    def __init__(self, *, poll_s: float = DEFAULT_POLL_S, verify_s: float = DEFAULT_VERIFY_S,
                 jitter: float = 0.0, rng: random.Random | None = None) -> None:
        if poll_s <= 0 or verify_s <= 0:
            raise ValueError("poll_s and verify_s must be positive")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        self.poll_s = poll_s
        self.verify_s = verify_s
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self.map: ShardMap | None = None
        self.term: int | None = None
        #: Monotonic time of the last successful read (the map is known current then).
        self.refreshed_at: float | None = None
        self._due = True
        # Hints so far, and how many had arrived when the read in flight was issued:
        # a hint that arrives during a read must survive that read's answer.
        self._hints = 0
        self._hints_at_read = 0
        self._verify = False
        self._next_poll = -float("inf")
        self._next_verify = -float("inf")
        self._refused: int | None = None
        self.counters = {
            "reads": 0, "full_reads": 0, "changes": 0, "errors": 0, "hints": 0,
            "old_term_dropped": 0, "regressions": 0, "pushed": 0, "confirmed": 0,
        }
        self.last_regression: Regression | None = None

    @property
    def epoch(self) -> int | None:
        """The epoch of the map held, None before the first one."""
        return None if self.map is None else self.map.epoch

    def hint(self, event: Mapping[str, Any]) -> bool:
        """A ``shardmap.changed`` event arrived; True if it calls for a read."""
        if not self._take_term(event):
            return False
        self.counters["hints"] += 1
        epoch = _int(event.get("epoch"))
        held = self.epoch
        if epoch is not None and held is not None:
            if epoch == held:
                return False
            if epoch < held:
                self._verify = True  # only a whole read can show an older map
        self._due = True
        self._hints += 1
        return True

    def on_current(self, event: Mapping[str, Any], now: float) -> bool:
        """A ``shardmap.current`` event arrived; True if it calls for a read.

        Naming the epoch held (of the current term or newer), it is a refresh:
        the map is known current now, and the next poll and the next whole read
        wait at least :data:`CONFIRMED_POLL_S`, so neither is made while these
        arrive. Naming another epoch, it is a hint (an older one: a whole read)."""
        epoch = _int(event.get("epoch"))
        held = self.epoch
        if epoch is None or held is None or epoch != held:
            return self.hint(event)
        if not self._take_term(event):
            return False
        self.counters["confirmed"] += 1
        self.refreshed_at = now
        # Nor a whole read: it could only show an older epoch, and this names the
        # epoch served (an older one would have been a hint for a whole read).
        quiet = now + self._spread(max(self.poll_s, CONFIRMED_POLL_S), longer_only=True)
        self._next_poll = max(self._next_poll, quiet)
        self._next_verify = max(self._next_verify, quiet)
        return False

    def _take_term(self, event: Mapping[str, Any]) -> bool:
        """False (and counted) for an event of an older leader's term; else the
        event's term, if any, becomes the highest seen."""
        term = _int(event.get("term"))
        if term is not None:
            if self.term is not None and term < self.term:
                self.counters["old_term_dropped"] += 1
                return False
            self.term = term
        return True

    def on_pushed(self, doc: Any, term: int | None, now: float) -> Outcome:
        """A map pushed inside a ``shardmap.changed`` event (its wire document).

        Taken only if it is newer than the map held and not of an older term;
        otherwise nothing changes and the caller passes the event to
        :meth:`hint` (an older epoch then gets the whole read that reports a
        regression). Raises BadRequest for a malformed map."""
        if term is not None and self.term is not None and term < self.term:
            return Outcome()
        return self.on_pushed_map(ShardMap.from_wire(doc), term, now)

    def on_pushed_map(self, fresh: ShardMap, term: int | None, now: float) -> Outcome:
        """:meth:`on_pushed` with the map already decoded (shared by the readers
        of one process: decoding is most of what taking a pushed map costs)."""
        if term is not None and self.term is not None and term < self.term:
            return Outcome()
        held = self.map
        if held is not None and fresh.epoch <= held.epoch:
            return Outcome()
        if term is not None:
            self.term = term
        self.map = fresh
        self._refused = None
        self.refreshed_at = now
        self.counters["changes"] += 1
        self.counters["pushed"] += 1
        return Outcome(changed=fresh)

    def poke(self) -> None:
        """Read at the next chance (the owner has a reason of its own)."""
        self._due = True
        self._hints += 1

    def next_read(self, now: float) -> dict[str, Any] | None:
        """Arguments of the ``sharding.map`` read due now, or None if none is due."""
        if not (self._due or self._verify or now >= self._next_poll or now >= self._next_verify):
            return None
        self._hints_at_read = self._hints
        if self.map is None or self._verify or now >= self._next_verify:
            return {}
        return {"since_epoch": self.map.epoch}

    def wake_at(self, now: float) -> float:
        """When the next read falls due if nothing else happens."""
        if self._due or self._verify:
            return now
        return min(self._next_poll, self._next_verify)

    def on_reply(self, doc: Any, now: float, *, full: bool) -> Outcome:
        """The answer of the read from :meth:`next_read` (``full``: it had no
        ``since_epoch``). Raises BadRequest for a malformed map (nothing changes)."""
        self.counters["reads"] += 1
        self._schedule(now, full)
        if doc is None:
            self.refreshed_at = now
            return Outcome()
        fresh = ShardMap.from_wire(doc)
        if isinstance(doc, Mapping):
            term = _int(doc.get("term"))
            if term is not None and (self.term is None or term > self.term):
                self.term = term
        self.refreshed_at = now
        held = self.map
        if held is not None and fresh.epoch < held.epoch:
            if self._refused == fresh.epoch:
                return Outcome()  # reported already; say it again only for a new epoch
            self._refused = fresh.epoch
            self.counters["regressions"] += 1
            report = self.last_regression = Regression(held.epoch, fresh.epoch, self.term)
            return Outcome(regressed=report)
        if held is not None and fresh.epoch == held.epoch:
            return Outcome()
        self.map = fresh
        self._refused = None
        self.counters["changes"] += 1
        return Outcome(changed=fresh)

    def on_error(self, now: float, *, full: bool) -> None:
        """The read failed (timeout, no sharding): try again after one poll interval,
        or :data:`FIRST_RETRY_S` before the first map (a whole read stays due if
        this was one)."""
        self.counters["errors"] += 1
        self._due = False  # retried after a pause, not at once, even if hinted meanwhile
        self._verify = False
        # Until a first map arrives nothing can route: ask again sooner.
        wait = self.poll_s if self.map is not None else min(self.poll_s, FIRST_RETRY_S)
        self._next_poll = now + self._spread(wait)
        if full:
            self._next_verify = self._next_poll

    def _schedule(self, now: float, full: bool) -> None:
        self._due = self._hints != self._hints_at_read
        self._next_poll = now + self._spread(self.poll_s)
        if full:
            self._verify = False
            self.counters["full_reads"] += 1
            self._next_verify = now + self._spread(self.verify_s)

    def _spread(self, wait: float, *, longer_only: bool = False) -> float:
        """``wait`` spread by the jitter: uniform over ``wait * (1 +- jitter/2)``, or
        over ``wait * [1, 1 + jitter]`` if ``longer_only`` (``wait`` itself without jitter)."""
        if not self.jitter:
            return wait
        return wait * (1.0 + (self._rng.random() - (0.0 if longer_only else 0.5)) * self.jitter)

    def stale(self, now: float, after: float) -> bool:
        """True when no read has succeeded for ``after`` seconds (or none ever)."""
        return self.refreshed_at is None or now - self.refreshed_at > after

    def status(self, now: float) -> dict[str, Any]:
        """Epoch, term, age of the last refresh, counters and the last regression."""
        return {
            "epoch": self.epoch,
            "term": self.term,
            "refreshed_age_s": None if self.refreshed_at is None else now - self.refreshed_at,
            **self.counters,
            "last_regression": None if self.last_regression is None else self.last_regression.to_wire(),
        }


class Requester(Protocol):
    """Anything that can make a bus request (an :class:`~phantom_bus.client.AsyncClient`)."""

    def request(self, service: str, op: str, /, **args: Any) -> Awaitable[Any]:
        """Call ``op`` on ``service``."""
        ...


Callback = Callable[[Any], Any]


class AsyncMapFollower:
    """Asyncio shell of :class:`MapFollower`: reads through ``client``, calls back.

    ``on_change(map)`` runs for every newer map, ``on_regress(regression)`` for
    every refused older one (after a loud log line); either may be a coroutine
    function. New epochs are logged at ``change_level`` (library clients:
    DEBUG). Feed events with :meth:`hint`; run :meth:`run` as a task. Its
    reads are spread by ``jitter`` (:data:`POLL_JITTER`; 0 for a fixed schedule).
    """

    def __init__(
        self,
        client: Requester,
        *,
        name: str,
        on_change: Callback | None = None,
        on_regress: Callback | None = None,
        poll_s: float = DEFAULT_POLL_S,
        verify_s: float = DEFAULT_VERIFY_S,
        change_level: str = "INFO",
        jitter: float = POLL_JITTER,
    ) -> None:
        self.core = MapFollower(poll_s=poll_s, verify_s=verify_s, jitter=jitter)
        self.change_level = change_level
        self.client = client
        self.name = name
        self.on_change = on_change
        self.on_regress = on_regress
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._pushed: list[ShardMap] = []  # taken from events, callbacks not run yet
        self._sync_change = on_change is not None and not inspect.iscoroutinefunction(on_change)

    @property
    def map(self) -> ShardMap | None:
        """The newest map held."""
        return self.core.map

    def hint(self, event: Mapping[str, Any]) -> None:
        """Pass a ``shardmap.changed`` event: a map pushed in it is taken at once
        (its callbacks run in :meth:`run`'s task), anything else is a reason to read soon."""
        pushed = event.get("map")
        if isinstance(pushed, bytes) and self._take_pushed(event, pushed):
            return
        if self.core.hint(event):
            self._wake.set()

    def _take_pushed(self, event: Mapping[str, Any], blob: bytes) -> bool:
        epoch, held = _int(event.get("epoch")), self.core.epoch
        if epoch is not None and held is not None and epoch <= held:
            return False  # not newer: no need to decode it (the hint sorts it out)
        try:
            fresh = decode_pushed(blob)
            outcome = self.core.on_pushed_map(fresh, _int(event.get("term")), time.monotonic())
        except PhantomError as exc:
            logger.debug("{}: a pushed shard map was not usable ({}); reading it instead", self.name, exc)
            return False
        if outcome.changed is None:
            return False
        self._changed.set()
        if self._sync_change:
            # A plain callback runs now, from the event's own callback, and the run
            # loop is not woken (nothing is left for it to do): no task switch per
            # reader, which is what a change's spread to many readers costs.
            self._log_change(fresh)
            try:
                _call_now(self.on_change, fresh)
            except Exception:
                logger.exception("shard map callback raised")
        else:
            self._pushed.append(fresh)
            self._wake.set()
        return True

    def _log_change(self, fresh: ShardMap) -> None:
        logger.bind(epoch=fresh.epoch).log(self.change_level, "{}: shard map epoch {}", self.name, fresh.epoch)

    async def _announce(self, fresh: ShardMap) -> None:
        self._log_change(fresh)
        self._changed.set()
        await _call(self.on_change, fresh)

    def current(self, event: Mapping[str, Any]) -> None:
        """Pass a ``shardmap.current`` event (a read only if it names another epoch)."""
        if self.core.on_current(event, time.monotonic()):
            self._wake.set()

    def poke(self) -> None:
        """Read now, whatever the events say."""
        self.core.poke()
        self._wake.set()

    async def refresh(self) -> None:
        """Read now, in the caller's task, and act on the answer before returning."""
        self.core.poke()
        await self.read_once()

    async def wait_changed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a newer map; True if one came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        changed = self._changed.is_set()
        self._changed.clear()
        return changed

    async def read_once(self) -> None:
        """Make the read that is due now, if any, and act on its answer."""
        now = time.monotonic()
        args = self.core.next_read(now)
        if args is None:
            return
        full = "since_epoch" not in args
        try:
            doc = await self.client.request("sharding", "map", **args)
            outcome = self.core.on_reply(doc, time.monotonic(), full=full)
        except PhantomError as exc:
            self.core.on_error(time.monotonic(), full=full)
            logger.debug("{}: shard map not read: {}", self.name, exc)
            return
        if outcome.changed is not None:
            await self._announce(outcome.changed)
        if outcome.regressed is not None:
            r = outcome.regressed
            logger.bind(epoch=r.held).error("{}: REFUSED shard map epoch {} older than held epoch {}: "
                                            "routing stays on {}; check sharding's store",
                                            self.name, r.offered, r.held, r.held)
            await _call(self.on_regress, r)

    async def run(self) -> None:
        """Follow the map until cancelled (every wait bounded by the poll interval)."""
        while True:
            while self._pushed:
                fresh = self._pushed.pop(0)
                if self.core.map is fresh:  # not already overtaken by a newer one
                    await self._announce(fresh)
            await self.read_once()
            now = time.monotonic()
            wait = max(0.0, min(self.core.wake_at(now) - now, self.core.poll_s))
            self._wake.clear()
            if self.core.next_read(time.monotonic()) is not None:
                continue
            # Not wait_for: in Python 3.11 it swallows a cancel that arrives as the
            # wake-up completes (an event just hinted), and the loop would never end.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((waiter,), timeout=wait)
            finally:
                waiter.cancel()


#: The last pushed map decoded in this process, with its bytes: every reader of
#: the process receives the same bytes, and the first one's decode serves all.
_last_pushed: tuple[bytes, ShardMap] | None = None


def decode_pushed(blob: bytes) -> ShardMap:
    """The map in a ``shardmap.changed`` event's ``map`` bytes, decoded once per
    process (maps are immutable, so readers share it). BadRequest if malformed."""
    global _last_pushed
    last = _last_pushed
    if last is not None and last[0] == blob:
        return last[1]
    fresh = ShardMap.from_wire(protocol.unpack(blob, max_size=len(blob) + 1))
    _last_pushed = (blob, fresh)
    return fresh


def _call_now(fn: Callback | None, arg: Any) -> None:
    if fn is not None:
        fn(arg)


async def _call(fn: Callback | None, arg: Any) -> None:
    if fn is None:
        return
    try:
        result = fn(arg)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("shard map callback raised")
