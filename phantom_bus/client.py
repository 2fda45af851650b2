"""Client API: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both speak to the broker frontend with a DEALER socket that sends the same
frames a REQ socket would (empty delimiter first), and match replies to
requests by request id, so a late reply to an abandoned attempt is dropped
instead of being taken for the answer to the next one.

Every call has a per-attempt timeout and a bounded number of attempts (Lazy
Pirate): after a timeout the socket is closed and opened again, which drops
whatever was queued for a dead connection. Errors the server marks as
retryable (no worker yet, worker lost, not the leader, overloaded) are
retried after a short back-off, for as long as the call's budget of
``timeout x retries`` seconds lasts. When the budget is spent the call raises a :class:`PhantomError`
subclass; if the broker itself did not answer a ping either, it is
:class:`BrokerUnreachable`. That policy (and the failover below, and the
epoch guard of brokered selects) is written once, as a sans-I/O plan
(:mod:`phantom_bus.plan`) that :class:`Client` drives with blocking calls and
:class:`AsyncClient` with awaited ones.

Routing. With ``routing="local"`` (the default) ``select`` and ``release``
make no request at all: the client loads the shard map and the node health
once, follows their changes pushed on the event bus, and chooses in memory
with the balancer's own code (:mod:`phantom_bus.routing`); see
:mod:`phantom_bus.local`. The blocking :class:`Client` does that I/O in one
background thread with its own ZeroMQ context, started at the first select
and stopped by :meth:`Client.close`; :class:`AsyncClient` runs it as tasks of
the caller's loop. With the broker or the whole control plane down, selects
keep answering from the last map (``sel.stale`` after ``map_stale_after``
seconds). ``routing="broker"`` makes every select a request to the balancer.

Several brokers. ``endpoint`` (the ``broker`` setting) may list several
brokers, comma-separated. The client keeps one connection to each (sockets
with ``IMMEDIATE``, so a request is only ever handed to a connection that is
up) and sends each attempt to the broker that answered last, or the next one
whose connection is up. An attempt whose broker connection drops while it
waits is sent again at once to another broker within the same attempt, and
a broker that stops answering libzmq's connection pings (every 250 ms) for a
second counts as dropped, so a frozen broker is left as quickly; an attempt
that times out anyway or a broker-level retryable answer
(no worker there yet, overloaded) moves the next attempt to the next broker.
All of it stays within the call's budget of ``timeout x retries`` seconds. A
dead entry in the list costs nothing once the others are connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Generator
from typing import Any, NamedTuple

import zmq
import zmq.asyncio

from phantom_bus import config as cfgmod
from phantom_bus import protocol
from phantom_bus import security as secmod
from phantom_bus import status as statusmod
from phantom_bus.errors import (
    BadRequest,
    BrokerUnreachable,
    NoLiveReplica,
    PhantomError,
    ServiceUnavailable,
    Timeout,
    error_from_wire,
)
from phantom_bus.plan import advance
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.routing.local import LocalRouter

ROUTINGS = ("local", "broker")

_BACKOFF = (0.1, 0.25, 0.5, 1.0)
# With several brokers, how often a waiting attempt checks that its broker's
# connection is still up (a killed broker is then left within this, not a timeout).
_LOST_CHECK_S = 0.05
# With several brokers, libzmq pings each broker connection this often and drops
# one that does not answer within the timeout: a frozen broker (SIGSTOP, a hung
# host) is then left like a dead one, in about a second, not after a whole attempt.
_PING_MS, _PING_TIMEOUT_MS = 250, 1000
# Answers that say this broker cannot serve the request now, where another may.
_BROKER_LEVEL = frozenset({"service_unavailable", "overloaded"})


class _Lost:
    """The attempt's broker connection went down while it waited for the reply."""


LOST = _Lost()


def _dealer(ctx: Any, hwm: int, multi: bool) -> Any:
    """A client's DEALER to one broker, not connected yet; with several brokers it
    hands requests only to a connection that is up and pings the broker."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if multi:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, _PING_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _PING_TIMEOUT_MS)
    return sock


def _connected(sock: Any) -> bool:
    # With IMMEDIATE, a DEALER is writable only while a connection to its peer is up.
    # Another task may have closed the socket (Lazy Pirate): then it is down for us.
    return not sock.closed and bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT)


class _Budget:
    """How long one call may keep trying: ``retries`` attempts that time out, and
    within ``timeout x retries`` seconds as many back-offs as retryable answers
    (no worker yet, not the leader, overloaded) need. A leader takeover or a
    service restart takes a few seconds and is ridden out, a typo is not retried,
    and no call outlives its budget by more than one back-off."""

    __slots__ = ("backoffs", "deadline", "timeouts_left")

    def __init__(self, timeout: float, retries: int, now: float) -> None:
        # One attempt means one: callers that retry by themselves (the manager's
        # queues) get every answer at once.
        self.deadline = now + timeout * retries if retries > 1 else now
        self.timeouts_left = retries
        self.backoffs = 0

    def after_timeout(self, now: float) -> bool:
        """An attempt went unanswered: True if another one may be made."""
        self.timeouts_left -= 1
        return self.timeouts_left > 0 and now < self.deadline

    def pause_after(self, err: PhantomError, now: float) -> float | None:
        """Seconds to wait before trying again after the error answer ``err``, or None."""
        if not err.retry or now >= self.deadline:
            return None
        pause = _BACKOFF[min(self.backoffs, len(_BACKOFF) - 1)]
        self.backoffs += 1
        return min(pause, max(0.0, self.deadline - now))


class _Attempt(NamedTuple):
    """Step: make one attempt of the call (the shell answers ``(broker index, answer
    or None on timeout)``, having dropped that broker's queue on a timeout)."""

    service: str
    op: str
    args: dict[str, Any]
    timeout: float


class _Sleep(NamedTuple):
    """Step: wait ``seconds`` (the shell answers None)."""

    seconds: float


class _Request(NamedTuple):
    """Step: a whole call of its own (the shell answers its result, or the
    :class:`PhantomError` it raised, as a value)."""

    service: str
    op: str
    args: dict[str, Any]


#: Step: does the broker answer a ping (the shell answers a bool)?
_PROBE = "probe"
#: Step: why the broker does not answer (the shell answers the PhantomError to raise).
_DIAGNOSE = "diagnose"

_Step = _Attempt | _Sleep | _Request | str
#: What a call does, without I/O: a generator that yields the steps above, is
#: sent ``(the shell's answer, the monotonic time after it)`` for each, and
#: returns the call's result or raises its error. :class:`Client` and
#: :class:`AsyncClient` each drive it with their own I/O (blocking or awaited).
_Plan = Generator[_Step, tuple[Any, float], Any]


class Selection(NamedTuple):
    """Where a key lives and which node to use: the answer of :meth:`Client.select`.

    ``epoch`` is the map epoch the choice was made under; ``source`` is
    ``"local"`` (chosen in this process) or ``"broker"`` (by the balancer);
    ``stale`` says a local choice rests on a map not refreshed for
    ``map_stale_after`` seconds (the control plane is unreachable).
    Immutable; a named tuple because a local select builds one per call and a
    frozen dataclass costs more to build than the whole choice.
    """

    key: str
    keyspace: str
    shard: str
    node: str
    address: str
    epoch: int
    role: str
    lease: str | None = None
    source: str = "broker"
    stale: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The selection as a plain dict (``phantom select --json`` prints this)."""
        return self._asdict()


_new_tuple = tuple.__new__


def _selection(doc: Any) -> Selection:
    if not isinstance(doc, dict):
        raise BadRequest(f"malformed select reply: {doc!r}")
    try:
        return Selection(
            key=str(doc["key"]),
            keyspace=str(doc["keyspace"]),
            shard=str(doc["shard"]),
            node=str(doc["node"]),
            address=str(doc["address"]),
            epoch=int(doc["epoch"]),
            role=str(doc["role"]),
            lease=doc.get("lease"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"malformed select reply, missing or bad {exc}") from None


def _select_args(
    key: Any, write: bool, keyspace: str | None, strategy: str | None, lease: bool
) -> dict[str, Any]:
    if not isinstance(key, str | bytes):
        raise BadRequest(f"a key is str or bytes, not {type(key).__name__}")
    args: dict[str, Any] = {"key": key, "write": write, "lease": lease}
    if keyspace is not None:
        args["keyspace"] = keyspace
    if strategy is not None:
        args["strategy"] = strategy
    return args


def _release_args(sel: Selection, latency_ms: float, ok: bool) -> dict[str, Any]:
    if sel.lease is None:
        raise BadRequest("this selection was made with lease=False; there is nothing to release")
    return {"lease": sel.lease, "latency_ms": float(latency_ms), "ok": bool(ok)}


def _behind(sel: Selection, seen: int) -> dict[str, Any] | None:
    """A brokered selection made under an older map than this client has seen (a
    balancer instance that lags: one just thawed, or cut off for a while) is not
    routed on: the release arguments that end its lease (no latency: nothing is
    learnt from it), or ``{}`` when it has none; None when the selection is current."""
    if sel.epoch >= seen:
        return None
    return {} if sel.lease is None else {"lease": sel.lease, "ok": True}


#: Pause before asking again when a balancer answered from an older map.
_BEHIND_PAUSE = 0.05


class _Base:
    def __init__(
        self,
        endpoint: str | None,
        timeout: float | None,
        retries: int | None,
        security: secmod.Security | None,
        routing: str = "local",
        events: str | None = None,
        balancer: BalancerConfig | None = None,
    ) -> None:
        cfg = cfgmod.load(
            names=("broker", "timeout", "retries", "max_message", "curve_dir", "curve_key", "events_out",
                   "map_stale_after")
        )
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.routing = routing
        #: The local router's balancer configuration (None: the balancer's defaults).
        self.balancer = balancer
        self.events = events or cfg.events_out
        self.map_stale_after = float(cfg.map_stale_after)
        self._router: LocalRouter | None = None
        # The process's identity (a service, an agent, the CLI), else this library
        # client's own key from PHANTOM_CURVE_DIR / PHANTOM_CURVE_KEY; off without them.
        self.security = security if security is not None else secmod.current(cfg)
        self.endpoint = endpoint or cfg.broker
        try:
            #: The brokers, in the order given; requests go to ``endpoints[preferred]`` first.
            self.endpoints = cfgmod.split_endpoints(cfgmod.parse_endpoints(self.endpoint))
        except ValueError as exc:
            raise ValueError(f"bad broker endpoint(s) {self.endpoint!r}: {exc}") from None
        self.multi = len(self.endpoints) > 1
        self.preferred = 0
        self.timeout = float(timeout if timeout is not None else cfg.timeout)
        self.retries = int(retries if retries is not None else cfg.retries)
        if self.timeout <= 0 or self.retries < 1:
            raise ValueError("timeout must be positive and retries at least 1")
        self.max_body = int(cfg.max_message)
        self._salt = os.urandom(4)
        self._ids = itertools.count(1)
        #: The highest map epoch of a brokered selection this client returned: an answer
        #: from an older map is asked again (another balancer instance), never returned.
        self.epoch_seen = 0

    def _behind_error(self, sel: Selection) -> PhantomError:
        return ServiceUnavailable(
            f"balancer.select: every answer within the budget came from a map older than epoch "
            f"{self.epoch_seen} (the last was epoch {sel.epoch}); a balancer instance is catching up, retry",
            service="balancer",
        )

    def _next_id(self) -> bytes:
        return self._salt + next(self._ids).to_bytes(8, "big")

    def _frames(self, service: str, op: str, args: dict[str, Any], reqid: bytes) -> list[bytes]:
        return [b"", protocol.CLIENT, service.encode(), reqid, protocol.encode_request(op, args)]

    def _parse(self, frames: list[bytes]) -> tuple[bytes, bool, Any]:
        """(reqid, ok, payload) of a reply; raises BadRequest on a malformed one."""
        rest = frames[1:] if frames and frames[0] == b"" else frames
        if len(rest) != 4:
            raise BadRequest(f"malformed reply: {len(rest)} frames")
        protocol.check_header(rest[0], protocol.CLIENT)
        ok, payload = protocol.decode_reply(rest[3], max_size=self.max_body)
        return rest[2], ok, payload

    def _unreachable(self, diagnosis: PhantomError | None) -> PhantomError:
        if diagnosis is not None:
            return diagnosis
        if self.multi:
            return BrokerUnreachable(f"none of the brokers at {', '.join(self.endpoints)} answers")
        return BrokerUnreachable(f"the broker at {self.endpoint} does not answer")

    def _order(self) -> list[int]:
        """Broker indexes in the order to try them: the preferred one first."""
        n = len(self.endpoints)
        return [(self.preferred + k) % n for k in range(n)]

    def _answered(self, index: int, ok: bool, payload: Any) -> None:
        """Broker ``index`` answered: keep to it, unless it said it cannot serve now."""
        if self.multi and not ok and isinstance(payload, dict) and payload.get("code") in _BROKER_LEVEL:
            self.preferred = (index + 1) % len(self.endpoints)
        else:
            self.preferred = index

    def _passed_over(self, index: int) -> None:
        """Broker ``index`` did not answer: the next attempt starts at the next one."""
        if self.preferred == index:
            self.preferred = (index + 1) % len(self.endpoints)

    def _call_plan(
        self, service: str, op: str, args: dict[str, Any], timeout: float, retries: int, now: float
    ) -> _Plan:
        """The retry and failover policy of one call: attempts within the budget
        (:class:`_Budget`), the broker each goes to (the one that answered last,
        passing over one that did not), back-offs after retryable answers, and
        the error raised when the budget is spent (a silent broker itself is
        :class:`BrokerUnreachable`, diagnosed)."""
        budget = _Budget(timeout, retries, now)
        attempt = _Attempt(service, op, args, timeout)
        while True:
            (index, answer), now = yield attempt
            if answer is None:
                self._passed_over(index)
                last: PhantomError = Timeout(f"{service}.{op}: no reply within {timeout:g} s", service=service)
                if budget.after_timeout(now):
                    continue
                break
            ok, payload = answer
            self._answered(index, ok, payload)
            if ok:
                return payload
            last = self._error(payload)
            pause = budget.pause_after(last, now)
            if pause is None:
                raise last
            yield _Sleep(pause)
        if isinstance(last, Timeout) and (service == protocol.BROKER_SERVICE or not (yield _PROBE)[0]):
            raise (yield _DIAGNOSE)[0] from None
        raise last

    def _select_plan(self, args: dict[str, Any], now: float) -> _Plan:
        """A brokered select: an answer from a map older than one this client has
        returned is not routed on (its lease is ended) and is asked again, within
        ``timeout x retries`` seconds."""
        deadline = now + self.timeout * self.retries
        while True:
            got, now = yield _Request("balancer", "select", args)
            if isinstance(got, PhantomError):
                raise got
            sel = _selection(got)
            ended = _behind(sel, self.epoch_seen)
            if ended is None:
                self.epoch_seen = sel.epoch
                return sel
            if ended:  # a failed release is no worse than an expired lease
                _, now = yield _Request("balancer", "release", ended)
            if now >= deadline:
                raise self._behind_error(sel)
            yield _Sleep(_BEHIND_PAUSE)

    def _begin_select(
        self, feed: Any, key: Any, write: bool, keyspace: str | None, strategy: str | None, lease: bool
    ) -> Selection | _Plan:
        """A select's first step: the local choice if it succeeds at once (the hot
        path: no plan, no wait), else the plan that goes on (waiting for a newer
        map; ``feed`` None: the brokered select)."""
        if feed is None:
            return self._select_plan(_select_args(key, write, keyspace, strategy, lease), time.monotonic())
        router = self._router
        assert router is not None
        got = self._local_attempt(feed, router, key, write, keyspace, strategy, lease, None)
        if isinstance(got, Selection):
            return got
        return self._local_wait(feed, router, key, write, keyspace, strategy, lease, got)

    def _local_wait(
        self, feed: Any, router: LocalRouter, key: Any, write: bool, keyspace: str | None,
        strategy: str | None, lease: bool, failed: tuple[_Budget, float],
    ) -> _Plan:
        """A local select whose first choice failed: wait for a newer map and choose
        again, as :meth:`_local_attempt` says."""
        got: Selection | tuple[_Budget, float] = failed
        while not isinstance(got, Selection):
            yield _Sleep(got[1])
            got = self._local_attempt(feed, router, key, write, keyspace, strategy, lease, got[0])
        return got

    @property
    def map_epoch(self) -> int | None:
        """The epoch of the map local selects route on (None: broker routing or no map yet)."""
        return None if self._router is None else self._router.epoch

    def _name(self) -> str:
        return f"client-{os.getpid()}-{self._salt.hex()}"

    def _local_release(self, sel: Selection, latency_ms: float | None, ok: bool) -> None:
        if sel.lease is None:
            raise BadRequest("this selection was made with lease=False; there is nothing to release")
        router = self._router
        if router is not None:
            # A lease no longer open (expired, released already) is over either way.
            router.release(sel.node, sel.lease, latency_ms, bool(ok), now=time.monotonic())

    def _local_attempt(
        self, feed: Any, router: LocalRouter, key: Any, write: bool, keyspace: str | None,
        strategy: str | None, lease: bool, budget: _Budget | None,
    ) -> Selection | tuple[_Budget, float]:
        """One local choice: the selection, or the call's budget (started at the
        first failure) and how long to wait for a newer map before the next
        attempt (raises when waiting cannot help). The hot path of every select."""
        now = time.monotonic()
        stale = feed.stale(now, self.map_stale_after)
        try:
            name, epoch, shard, node, address, role, lease_id, _, _ = router.choose(
                key, write, keyspace, strategy, lease, now)
        except NoLiveReplica as err:
            if router.map is None:
                raise self._no_map() from None
            if budget is None:
                budget = _Budget(self.timeout, self.retries, now)
            pause = self._transient(err, write, stale, budget, now)
            if pause is None:
                raise
            return budget, pause
        return _new_tuple(Selection, (key if type(key) is str else str(key), name, shard, node, address, epoch,
                                      role, lease_id, "local", stale))

    @staticmethod
    def _check_key(key: Any) -> None:
        if type(key) is not str and not isinstance(key, str | bytes):
            raise BadRequest(f"a key is str or bytes, not {type(key).__name__}")

    @staticmethod
    def _transient(err: NoLiveReplica, write: bool, stale: bool, budget: _Budget, now: float) -> float | None:
        """How long to wait for a newer map before choosing again, or None to raise now.

        A write to a shard without a primary for a moment (a planned hand-off
        steps the old primary down one epoch before the new one is promoted; a
        failover follows a death within seconds) succeeds as soon as the next map
        arrives, which is pushed within milliseconds: wait for it, within the
        call's budget, as a brokered select would retry. Reads never wait (a read
        with no live replica has nowhere to go), and on a stale map (the control
        plane is unreachable) no newer map is coming: raise at once, never block."""
        if stale or not write:
            return None
        pause = budget.pause_after(err, now)
        return None if pause is None else min(pause, 0.1)

    def _no_map(self) -> PhantomError:
        return NoLiveReplica(
            f"no shard map within {self.timeout:g} s: cannot route locally until sharding is "
            f"reachable through {self.endpoint} (or use routing='broker')"
        )

    @staticmethod
    def _error(payload: Any) -> PhantomError:
        err = error_from_wire(payload)
        if isinstance(payload, dict) and "retry" in payload:
            err.retry = bool(payload["retry"])
        return err


class Client(_Base):
    """Blocking client. ``with Client() as c: c.select("user:42")``.

    Requests are not thread-safe: use one client per thread (they are cheap).
    With ``routing="local"`` the first select starts one background thread
    (its own asyncio loop and ZeroMQ context) that follows the map; every
    wait there is bounded and :meth:`close` stops it. ``events`` is the
    broker's event endpoint (``events_out``) to follow; ``balancer`` the
    local router's :class:`BalancerConfig` (default: the balancer's defaults;
    :data:`phantom_bus.routing.local.SCAN_CONFIG` compares all of a shard's
    replicas, which balances better on a client's own feedback).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        ctx: zmq.Context[Any] | None = None,
        security: secmod.Security | None = None,
        routing: str = "local",
        events: str | None = None,
        balancer: BalancerConfig | None = None,
    ) -> None:
        super().__init__(endpoint, timeout, retries, security, routing, events, balancer)
        self.ctx = ctx or zmq.Context.instance()
        self._socks: dict[int, zmq.Socket[Any]] = {}
        self._feed: Any = None

    def _local(self) -> Any:
        if self._feed is None:
            from phantom_bus.local import FeedThread

            self._router = LocalRouter(self.balancer)
            endpoint, security, timeout = self.endpoint, self.security, self.timeout

            def make_client(ctx: zmq.asyncio.Context) -> AsyncClient:
                return AsyncClient(endpoint, timeout=timeout, retries=1, ctx=ctx, security=security,
                                   routing="broker")

            self._feed = FeedThread(self._router, make_client, events=self.events, security=security,
                                    name=self._name())
        if not self._feed.ready.is_set():
            self._feed.ready.wait(self.timeout)
        return self._feed

    def _open(self, index: int = 0) -> zmq.Socket[Any]:
        sock = self._socks.get(index)
        if sock is None:
            sock = _dealer(self.ctx, 1000, self.multi)
            self.security.client(sock)
            sock.connect(self.endpoints[index])
            self._socks[index] = sock
        return sock

    def _reset(self, index: int | None = None) -> None:
        for i in list(self._socks) if index is None else [index]:
            sock = self._socks.pop(i, None)
            if sock is not None:
                sock.close(0)

    def _choose(self, deadline: float) -> int | None:
        """The broker for the next send: the preferred one if its connection is up,
        else the next one that is, waiting until ``deadline`` for any (None: none)."""
        if not self.multi:
            self._open(0)
            return 0
        order = self._order()
        socks = [self._open(i) for i in order]
        for i, sock in zip(order, socks, strict=True):
            if _connected(sock):
                return i
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLOUT)
        ready = dict(poller.poll(int(left * 1000) + 1))
        return next((i for i, sock in zip(order, socks, strict=True) if sock in ready), None)

    def close(self) -> None:
        """Close the sockets and stop local routing; the client can be used again
        (it reopens lazily, and a later select loads the map afresh)."""
        self._reset()
        if self._feed is not None:
            self._feed.close()
            self._feed = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attempt(
        self, service: str, op: str, args: dict[str, Any], timeout: float
    ) -> tuple[int, tuple[bool, Any] | None]:
        """One attempt: (the broker it went to last, its answer or None on timeout)."""
        reqid = self._next_id()
        frames = self._frames(service, op, args, reqid)
        deadline = time.monotonic() + timeout
        index = self.preferred
        while True:
            chosen = self._choose(deadline)
            if chosen is None:
                return index, None
            index = chosen
            sock = self._socks[index]
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                if not self.multi or time.monotonic() >= deadline:
                    return index, None
                continue  # that connection just went down: another broker
            answer = self._wait_reply(sock, reqid, deadline)
            if isinstance(answer, _Lost):
                self._reset(index)
                self._passed_over(index)
                continue
            return index, answer

    def _wait_reply(self, sock: zmq.Socket[Any], reqid: bytes, deadline: float) -> tuple[bool, Any] | _Lost | None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            wait = min(left, _LOST_CHECK_S) if self.multi else left
            if not sock.poll(int(wait * 1000) + 1, zmq.POLLIN):
                if self.multi and not _connected(sock):
                    return LOST
                continue
            try:
                got, ok, payload = self._parse(sock.recv_multipart())
            except PhantomError:
                continue  # garbage on the wire is not our answer; keep waiting
            if got == reqid:
                return ok, payload

    def request(self, service: str, op: str, /, **args: Any) -> Any:
        """Call ``op`` on ``service`` with ``args``; returns its result or raises PhantomError."""
        return self._call(service, op, args, self.timeout, self.retries)

    def _call(self, service: str, op: str, args: dict[str, Any], timeout: float, retries: int) -> Any:
        return self._drive(self._call_plan(service, op, args, timeout, retries, time.monotonic()))

    def _drive(self, plan: _Plan) -> Any:
        """Run ``plan``, doing each of its steps with blocking I/O."""
        done, step = advance(plan, None)
        while not done:
            done, step = advance(plan, (self._do(step), time.monotonic()))
        return step

    def _do(self, step: _Step) -> Any:
        if type(step) is _Attempt:
            index, answer = self._attempt(*step)
            if answer is None:
                self._reset(index)  # Lazy Pirate: a fresh socket drops a dead connection's queue
            return index, answer
        if type(step) is _Sleep:
            time.sleep(step.seconds)
            return None
        if type(step) is _Request:
            try:
                return self.request(step.service, step.op, **step.args)
            except PhantomError as err:
                return err
        if step == _PROBE:
            return self._broker_alive()
        return self.unreachable()

    def unreachable(self) -> PhantomError:
        """The error to raise when the broker does not answer: :class:`Refused` if its
        handshake refuses our key, else :class:`BrokerUnreachable` (saying why when
        the handshake tells). Takes up to a second: for the failure path only."""
        return self._unreachable(secmod.diagnose(self.endpoints[self.preferred], self.security, self.ctx))

    def _broker_alive(self) -> bool:
        return self.ping(min(self.timeout, 1.0))

    def ping(self, timeout: float = 1.0, attempts: int = 2) -> bool:
        """True if a broker answers a ping within ``attempts`` x ``timeout`` seconds."""
        try:
            self._call(protocol.BROKER_SERVICE, "ping", {}, timeout, attempts)
            return True
        except PhantomError:
            return False

    def brokers(self, timeout: float = 1.0) -> dict[str, dict[str, Any] | None]:
        """Ping every broker listed, each on its own: endpoint -> its ``ping``
        answer (which names its ``instance``), or None if it did not answer
        within ``timeout`` seconds. For status displays: the pings run one after
        another, so a dead entry costs ``timeout``."""
        out: dict[str, dict[str, Any] | None] = {}
        for endpoint in self.endpoints:
            with Client(endpoint, timeout=timeout, retries=1, ctx=self.ctx, security=self.security,
                        routing="broker") as one:
                try:
                    out[endpoint] = one.request(protocol.BROKER_SERVICE, "ping")
                except PhantomError:
                    out[endpoint] = None
        return out

    # --- the application calls ------------------------------------------------------

    def select(
        self,
        key: str | bytes,
        write: bool = False,
        *,
        keyspace: str | None = None,
        strategy: str | None = None,
        lease: bool = True,
    ) -> Selection:
        """Pick the node for ``key``: a healthy replica, or the primary with ``write=True``.

        Local routing answers from memory and never waits on the bus, except
        for the very first select, which waits up to ``timeout`` for the map."""
        feed = None
        if self.routing == "local":
            self._check_key(key)
            feed = self._local()
        got = self._begin_select(feed, key, write, keyspace, strategy, lease)
        return got if isinstance(got, Selection) else self._drive(got)

    def release(self, sel: Selection, latency_ms: float, ok: bool = True) -> None:
        """End the lease of ``sel``, reporting how the request to its node went."""
        if sel.source == "local":
            self._local_release(sel, latency_ms, ok)
            return
        self.request("balancer", "release", **_release_args(sel, latency_ms, ok))

    def services(self) -> dict[str, Any]:
        """The services registered with the broker and their workers."""
        result: dict[str, Any] = self.request(protocol.BROKER_SERVICE, "services")
        return result

    def status(self) -> dict[str, Any]:
        """The cluster status document (``phantom status --json``); see :mod:`phantom_bus.status`."""
        return statusmod.collect(self)


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`: same methods, awaitable, and safe to use
    from many tasks at once (replies are matched to requests by id)."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        ctx: zmq.asyncio.Context | None = None,
        security: secmod.Security | None = None,
        routing: str = "local",
        events: str | None = None,
        balancer: BalancerConfig | None = None,
    ) -> None:
        super().__init__(endpoint, timeout, retries, security, routing, events, balancer)
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self._socks: dict[int, zmq.asyncio.Socket] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._waiting: dict[bytes, asyncio.Future[tuple[bool, Any]]] = {}
        self._feed: Any = None
        self._feed_task: asyncio.Task[None] | None = None
        self._feed_client: AsyncClient | None = None

    async def _local(self) -> Any:
        if self._feed is None:
            from phantom_bus.local import RoutingFeed

            self._router = LocalRouter(self.balancer)
            client = self._feed_client = AsyncClient(
                self.endpoint, timeout=self.timeout, retries=1, ctx=self.ctx, security=self.security,
                routing="broker",
            )
            self._feed = RoutingFeed(self._router, client, events=self.events, security=self.security,
                                     ctx=self.ctx, name=self._name())
            self._feed_task = asyncio.ensure_future(self._feed.run())
        if not self._feed.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._feed.ready.wait(), self.timeout)
        return self._feed

    def _open(self, index: int = 0) -> zmq.asyncio.Socket:
        sock = self._socks.get(index)
        if sock is None:
            sock = _dealer(self.ctx, 10000, self.multi)
            self.security.connect(sock, self.endpoints[index])
            self._socks[index] = sock
            self._readers[index] = asyncio.ensure_future(self._read(sock))
        return sock

    def _drop(self, index: int, sock: zmq.asyncio.Socket) -> None:
        """Close broker ``index``'s socket if it is still ``sock`` (another task may
        have replaced it already); its pending calls fail over or time out."""
        if self._socks.get(index) is not sock:
            return
        del self._socks[index]
        reader = self._readers.pop(index, None)
        if reader is not None:
            reader.cancel()
        sock.close(0)

    async def _choose(self, deadline: float) -> tuple[int, zmq.asyncio.Socket] | None:
        """Awaitable :meth:`Client._choose`, with the socket chosen."""
        if not self.multi:
            return 0, self._open(0)
        # No asyncio poller here: a socket that another task closes (Lazy Pirate) would
        # cancel its future, and with it this task. Nothing connected happens only at
        # the start and in an outage, so looking again after a short, growing pause is cheap.
        pause = 0.001
        while True:
            for i in self._order():
                sock = self._open(i)
                if _connected(sock):
                    return i, sock
                if self.security.enabled:  # a broker that refused our key: try it again
                    self.security.retry_refused(sock)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(left, pause))
            pause = min(pause * 2, _LOST_CHECK_S)

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                reqid, ok, payload = self._parse(frames)
            except PhantomError:
                continue
            fut = self._waiting.pop(reqid, None)
            if fut is not None and not fut.done():
                fut.set_result((ok, payload))

    async def close(self) -> None:
        """Close the sockets and stop local routing; pending calls time out on their own."""
        if self._feed_task is not None:
            self._feed_task.cancel()
            await asyncio.gather(self._feed_task, return_exceptions=True)
            self._feed_task = self._feed = None
        if self._feed_client is not None:
            await self._feed_client.close()
            self._feed_client = None
        readers = list(self._readers.values())
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        self._readers.clear()
        for sock in self._socks.values():
            sock.close(0)
        self._socks.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _attempt(
        self, service: str, op: str, args: dict[str, Any], timeout: float
    ) -> tuple[int, tuple[bool, Any] | None]:
        """One attempt: (the broker it went to last, its answer or None on timeout)."""
        reqid = self._next_id()
        frames = self._frames(service, op, args, reqid)
        fut: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[reqid] = fut
        deadline = time.monotonic() + timeout
        index = self.preferred
        try:
            while True:
                chosen = await self._choose(deadline)
                if chosen is None:
                    return index, None
                index, sock = chosen
                if not self.multi:
                    if self.security.enabled:
                        # A connection refused at the handshake leaves the DEALER with no peer, and
                        # a send would wait forever: connect again first if that happened.
                        self.security.retry_refused(sock)
                    try:
                        await sock.send_multipart(frames)
                        return index, await asyncio.wait_for(fut, timeout)
                    except (TimeoutError, zmq.Again):
                        return index, None
                try:
                    await sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    # That connection just went down (or another task closed the socket):
                    # another broker, while the attempt lasts.
                    if not isinstance(exc, zmq.Again):
                        self._drop(index, sock)
                    if time.monotonic() >= deadline:
                        return index, None
                    continue
                while not fut.done():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return index, None
                    await asyncio.wait([fut], timeout=min(left, _LOST_CHECK_S))
                    if not fut.done() and not _connected(sock):
                        break
                if fut.done():
                    return index, fut.result()
                self._drop(index, sock)
                self._passed_over(index)
        finally:
            self._waiting.pop(reqid, None)

    async def request(self, service: str, op: str, /, **args: Any) -> Any:
        """Call ``op`` on ``service`` with ``args``; returns its result or raises PhantomError."""
        return await self._call(service, op, args, self.timeout, self.retries)

    async def _call(self, service: str, op: str, args: dict[str, Any], timeout: float, retries: int) -> Any:
        return await self._drive(self._call_plan(service, op, args, timeout, retries, time.monotonic()))

    async def _drive(self, plan: _Plan) -> Any:
        """Run ``plan``, awaiting each of its steps."""
        done, step = advance(plan, None)
        while not done:
            done, step = advance(plan, (await self._do(step), time.monotonic()))
        return step

    async def _do(self, step: _Step) -> Any:
        if type(step) is _Attempt:
            index, answer = await self._attempt(*step)
            if answer is None and self.multi:
                # A frozen broker's queue is dropped with its socket (with one broker the
                # socket is shared by every pending call of every task, and stays).
                sock = self._socks.get(index)
                if sock is not None:
                    self._drop(index, sock)
            return index, answer
        if type(step) is _Sleep:
            await asyncio.sleep(step.seconds)
            return None
        if type(step) is _Request:
            try:
                return await self.request(step.service, step.op, **step.args)
            except PhantomError as err:
                return err
        if step == _PROBE:
            return await self._broker_alive()
        return await self.unreachable()

    async def unreachable(self) -> PhantomError:
        """Awaitable :meth:`Client.unreachable` (the handshake probe runs in a thread)."""
        diagnosis = await asyncio.to_thread(secmod.diagnose, self.endpoints[self.preferred], self.security, self.ctx)
        return self._unreachable(diagnosis)

    async def _broker_alive(self) -> bool:
        try:
            await self._call(protocol.BROKER_SERVICE, "ping", {}, min(self.timeout, 1.0), 1)
            return True
        except PhantomError:
            return False

    async def select(
        self,
        key: str | bytes,
        write: bool = False,
        *,
        keyspace: str | None = None,
        strategy: str | None = None,
        lease: bool = True,
    ) -> Selection:
        """Awaitable :meth:`Client.select`."""
        feed = None
        if self.routing == "local":
            self._check_key(key)
            feed = await self._local()
        got = self._begin_select(feed, key, write, keyspace, strategy, lease)
        return got if isinstance(got, Selection) else await self._drive(got)

    async def release(self, sel: Selection, latency_ms: float, ok: bool = True) -> None:
        """Awaitable :meth:`Client.release`."""
        if sel.source == "local":
            self._local_release(sel, latency_ms, ok)
            return
        await self.request("balancer", "release", **_release_args(sel, latency_ms, ok))

    async def services(self) -> dict[str, Any]:
        """Awaitable :meth:`Client.services`."""
        result: dict[str, Any] = await self.request(protocol.BROKER_SERVICE, "services")
        return result

    async def status(self) -> dict[str, Any]:
        """Awaitable :meth:`Client.status`."""
        return await statusmod.collect_async(self)
