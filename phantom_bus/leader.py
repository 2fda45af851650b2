"""Leader election over the store: one leader per service, fenced by its term.

The record ``leaders/<service>`` is created only if absent, attached to a
lease of ``ttl`` seconds, and renewed every ``ttl / 3``. Its create revision is
the leader's **term**: every later leader's record is created later, so terms
strictly increase. Every write the leader makes carries
``Fence("leaders/<service>", term)``, which the store refuses once the record
is gone or rewritten.

The timing argument. A leader measures its lease from the moment it *sent*
the grant or keepalive, which is no later than the moment the store started
the lease's ttl. It believes it leads only until ``sent + ttl - margin`` on its
own monotonic clock, so it stops believing before the store can expire the
lease and before any other instance can create a new record: two instances
never both believe they lead, given clocks whose rates differ by less than
``margin / ttl`` (a quarter by default, against real drifts of parts per
million). A leader that is paused (SIGSTOP, a long GC, a swapped-out host)
finds, when it wakes, that its belief ran out, and does nothing as leader; a
write it had already sent before the pause is refused by the fence once a new
leader exists.

:class:`LeaderCore` is that logic alone, sans I/O, on virtual time;
:class:`Elector` is the thin asyncio shell that runs it against a
:class:`~phantom_bus.store.Store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import msgpack
from loguru import logger

from phantom_bus.errors import CasFailed, PhantomError
from phantom_bus.store import Compare, Entry, Fence, LeaseExpired, Put, Store

# --- what the core asks the shell to do ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """Read the leader record."""


@dataclass(frozen=True, slots=True)
class Campaign:
    """Grant a lease and create the leader record with it, if the record is absent."""


@dataclass(frozen=True, slots=True)
class Renew:
    """Keep the lease alive and confirm the record is still this leader's."""

    lease: int
    term: int


@dataclass(frozen=True, slots=True)
class Release:
    """Revoke a lease this instance no longer leads with (best effort)."""

    lease: int


Action = Check | Campaign | Renew | Release


# --- what the core tells ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Elected:
    """This instance leads from now, in ``term``."""

    term: int


@dataclass(frozen=True, slots=True)
class Deposed:
    """This instance stopped leading ``term``, for ``reason``."""

    term: int
    reason: str


@dataclass(frozen=True, slots=True)
class Holder:
    """The leader as seen in its record."""

    instance: str
    term: int


Event = Elected | Deposed


class LeaderCore:
    """The election logic of one instance, on virtual time (sans I/O).

    Loop: ``step = core.next(now)``; if it is an :data:`Action`, do it and
    report the result (``checked``, ``won``, ``lost``, ``renewed``,
    ``renew_failed``, ``failed``), passing the ``now`` the action was *sent* at;
    if it is a float, call ``next`` again no later than that time. ``events``
    collects :class:`Elected` / :class:`Deposed` for the shell to drain.
    """

    def __init__(
        self,
        instance: str,
        ttl: float,
        *,
        margin: float | None = None,
        renew_every: float | None = None,
        poll: float | None = None,
    ) -> None:
        if not ttl > 0:
            raise ValueError("ttl must be positive")
        self.instance = instance
        self.ttl = ttl
        self.margin = ttl / 4 if margin is None else margin
        if not 0 < self.margin < ttl:
            raise ValueError("margin must be between 0 and ttl")
        self.renew_every = ttl / 3 if renew_every is None else renew_every
        self.poll = min(0.5, ttl / 8) if poll is None else poll
        self.term: int | None = None
        self.lease: int | None = None
        self.valid_until = -float("inf")
        self.holder: Holder | None = None
        self.events: list[Event] = []
        self._next_at = -float("inf")  # when the next action is due
        self._pending: Action | None = None
        self._release: list[int] = []
        self._campaign_now = False

    # --- queries --------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """In the leader role (until :meth:`next` or :meth:`is_leader` sees the time ran out)."""
        return self.term is not None

    def is_leader(self, now: float) -> bool:
        """Whether this instance may act as leader at ``now``."""
        return self.term is not None and now < self.valid_until

    # --- driving --------------------------------------------------------------

    def next(self, now: float) -> Action | float:
        """The action to take at ``now``, or the time to call again by."""
        self._expire(now)
        if self._pending is not None:
            return now + self.poll  # the shell reports before asking again; nothing new meanwhile
        if self._release:
            action: Action = Release(self._release.pop())
        elif now < self._next_at:
            return min(self._next_at, self.valid_until) if self.term is not None else self._next_at
        elif self.term is not None and self.lease is not None:
            action = Renew(self.lease, self.term)
        elif self._campaign_now:
            action = Campaign()
        else:
            action = Check()
        self._pending = action
        return action

    def _expire(self, now: float) -> None:
        if self.term is not None and now >= self.valid_until:
            self._depose(f"lease not renewed within {self.ttl - self.margin:g} s")

    def _depose(self, reason: str) -> None:
        assert self.term is not None
        self.events.append(Deposed(self.term, reason))
        if self.lease is not None:
            self._release.append(self.lease)
        self.term = None
        self.lease = None
        self.valid_until = -float("inf")
        self._campaign_now = False

    def _done(self) -> None:
        self._pending = None

    # --- results --------------------------------------------------------------

    def checked(self, sent: float, holder: Holder | None) -> None:
        """The record read at ``sent``: ``holder`` or None (absent: campaign at once)."""
        self._done()
        self.holder = holder
        self._campaign_now = holder is None
        self._next_at = sent if holder is None else sent + self.poll

    def won(self, sent: float, now: float, term: int, lease: int) -> None:
        """The campaign sent at ``sent`` created the record in ``term`` with ``lease``."""
        self._done()
        self._campaign_now = False
        self.holder = Holder(self.instance, term)
        self._next_at = sent + self.renew_every
        if now >= sent + self.ttl - self.margin:
            # Paused between sending and hearing back: the term is spent before it began.
            self._release.append(lease)
            return
        self.term, self.lease = term, lease
        self.valid_until = sent + self.ttl - self.margin
        self.events.append(Elected(term))

    def lost(self, sent: float, holder: Holder | None, lease: int | None) -> None:
        """The campaign found a record (someone else was faster); its lease is to be released."""
        self._done()
        self._campaign_now = False
        self.holder = holder
        if lease is not None:
            self._release.append(lease)
        self._next_at = sent + self.poll

    def renewed(self, sent: float, now: float) -> None:
        """The keepalive sent at ``sent`` succeeded and the record is still this term's."""
        self._done()
        if self.term is None:
            return
        self.valid_until = max(self.valid_until, sent + self.ttl - self.margin)
        self._next_at = sent + self.renew_every
        self._expire(now)

    def renew_failed(self, sent: float, now: float, gone: bool, reason: str) -> None:
        """The keepalive failed: ``gone`` (lease or record lost) deposes at once; else retry soon."""
        self._done()
        if self.term is None:
            return
        if gone:
            self._depose(reason)
            return
        self._next_at = sent + min(self.poll, self.renew_every)
        self._expire(now)

    def failed(self, sent: float, reason: str) -> None:
        """A check, campaign or release could not reach the store; try again after ``poll``."""
        self._done()
        self._next_at = sent + self.poll

    def released(self) -> None:
        """A release finished (or failed for good: the lease expires by itself)."""
        self._done()

    def drain(self) -> list[Event]:
        """The events since the last drain."""
        events, self.events = self.events, []
        return events


LEADER_PREFIX = "leaders/"


def leader_key(service: str) -> str:
    """The store key of ``service``'s leader record."""
    return LEADER_PREFIX + service


class LeaderRecord(TypedDict):
    """The leader record's value (msgpack): who leads and since when (wall clock,
    for people); the term is the record's create revision, not a field."""

    instance: str
    since: float


def encode_record(instance: str, since: float) -> bytes:
    """The leader record's value: who leads and since when (wall clock, for people)."""
    record: LeaderRecord = {"instance": instance, "since": since}
    return msgpack.packb(record)


def decode_holder(entry: Entry) -> Holder:
    """The holder of a leader record: the instance in its value, its create revision as term."""
    try:
        doc = msgpack.unpackb(entry.value)
        instance = str(doc["instance"])
    except (ValueError, TypeError, KeyError, msgpack.UnpackException):
        instance = "?"
    return Holder(instance, entry.create_revision)


async def read_leader(store: Store, service: str) -> Holder | None:
    """The current leader of ``service`` according to the store, or None."""
    entry = await store.get(leader_key(service))
    return None if entry is None else decode_holder(entry)


def default_instance() -> str:
    """This process's instance name when none is configured: HOST:PID."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Elector:
    """Campaign for the leadership of ``service`` forever (``await elector.run()``).

    ``is_leader``, ``term`` and ``fence`` answer for *now* (read from the
    monotonic clock), so a paused process that wakes up does not act as
    leader. ``elected`` / ``deposed`` are asyncio events (set on change,
    cleared on the opposite change); ``on_elected(term)`` / ``on_deposed(term,
    reason)`` are called too, if given.
    """

    def __init__(
        self,
        store: Store,
        service: str,
        instance: str,
        ttl: float,
        *,
        on_elected: Callable[[int], Any] | None = None,
        on_deposed: Callable[[int, str], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll: float | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.instance = instance
        self.key = leader_key(service)
        self.core = LeaderCore(instance, ttl, poll=poll)
        self.elected = asyncio.Event()
        self.deposed = asyncio.Event()
        self.deposed.set()
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._clock = clock
        self._log = logger.bind(service=service, instance=instance)
        self._last_problem = ""

    @property
    def is_leader(self) -> bool:
        """Whether this instance may act as leader right now."""
        return self.core.is_leader(self._clock())

    @property
    def term(self) -> int | None:
        """The term this instance leads in, or None."""
        return self.core.term if self.is_leader else None

    @property
    def fence(self) -> Fence | None:
        """The fence every write of this leader must carry (None when not leading)."""
        term = self.term
        return None if term is None else Fence(self.key, term)

    def leader(self) -> Holder | None:
        """The leader as last seen (this instance itself when it leads)."""
        if self.is_leader and self.core.term is not None:
            return Holder(self.instance, self.core.term)
        return self.core.holder

    async def run(self) -> None:
        """Campaign, lead and renew until cancelled; on cancel, resign (revoke the lease)."""
        try:
            while True:
                step = self.core.next(self._clock())
                self._emit()
                if isinstance(step, float):
                    await asyncio.sleep(max(0.0, step - self._clock()))
                    continue
                await self._do(step)
                self._emit()
        finally:
            await self._resign()

    async def _do(self, action: Action) -> None:
        core, sent = self.core, self._clock()
        if isinstance(action, Release):
            with contextlib.suppress(PhantomError):
                await self.store.revoke(action.lease)
            core.released()
        elif isinstance(action, Check):
            try:
                entry = await self.store.get(self.key)
            except PhantomError as exc:
                core.failed(sent, str(exc))
                self._problem(f"leader check failed: {exc}")
                return
            self._problem("")
            core.checked(sent, None if entry is None else decode_holder(entry))
        elif isinstance(action, Campaign):
            await self._campaign(sent)
        else:
            await self._renew(action, sent)

    async def _campaign(self, sent: float) -> None:
        core, lease = self.core, None
        try:
            lease = await self.store.grant(core.ttl)
            value = encode_record(self.instance, time.time())
            term = await self.store.txn([Compare.absent(self.key)], [Put(self.key, value, lease)])
        except PhantomError as exc:
            entry = None
            if lease is not None:
                with contextlib.suppress(PhantomError):
                    entry = await self.store.get(self.key)
            if lease is not None:
                core.lost(sent, None if entry is None else decode_holder(entry), lease)
            else:
                core.failed(sent, str(exc))
            if not isinstance(exc, CasFailed):
                self._problem(f"campaign failed: {exc}")
            return
        core.won(sent, self._clock(), term, lease)

    async def _renew(self, action: Renew, sent: float) -> None:
        core = self.core
        try:
            await self.store.keepalive(action.lease)
            entry = await self.store.get(self.key)
        except LeaseExpired as exc:
            core.renew_failed(sent, self._clock(), True, f"lease lost: {exc}")
            return
        except PhantomError as exc:
            core.renew_failed(sent, self._clock(), False, str(exc))
            self._problem(f"lease renewal failed: {exc}")
            return
        if entry is None or entry.mod_revision != action.term:
            core.renew_failed(sent, self._clock(), True, "leader record gone or rewritten")
            return
        core.renewed(sent, self._clock())

    def _problem(self, text: str) -> None:
        """Log a store problem once, not at every poll; log its end once too."""
        if text and text != self._last_problem:
            self._log.warning("{}", text)
        elif not text and self._last_problem:
            self._log.info("store reachable again")
        self._last_problem = text

    def _emit(self) -> None:
        for event in self.core.drain():
            if isinstance(event, Elected):
                self._log.info("elected leader of {} in term {}", self.service, event.term)
                self.deposed.clear()
                self.elected.set()
                if self._on_elected is not None:
                    self._on_elected(event.term)
            else:
                self._log.warning("deposed as leader of {} (term {}): {}", self.service, event.term, event.reason)
                self.elected.clear()
                self.deposed.set()
                if self._on_deposed is not None:
                    self._on_deposed(event.term, event.reason)

    async def _resign(self) -> None:
        lease = self.core.lease
        if lease is None:
            return
        term = self.core.term
        self.core.term = None
        self.core.lease = None
        self.elected.clear()
        self.deposed.set()
        with contextlib.suppress(PhantomError, TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(2.0):
                await asyncio.shield(self.store.revoke(lease))
        self._log.info("resigned leadership of {} (term {})", self.service, term)
