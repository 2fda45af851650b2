"""The service base: an asyncio worker on the broker backend.

A service registers with the broker under its name, heartbeats, answers the
operations it has handlers for, and publishes and subscribes to events::

    svc = Service("echo", cfg)

    @svc.operation("echo")
    def echo(text: str) -> dict:
        return {"text": text}

    svc.subscribe("node.", on_node_event)
    await svc.run()          # until svc.stop()

Handlers take the request's ``args`` as keyword arguments and may be plain
functions or coroutines. A :class:`PhantomError` they raise becomes that error
reply; any other exception is logged with its traceback and answered as
``internal``. Arguments that do not fit the handler's signature are answered
``bad_request`` without calling it.

The worker survives a broker restart: the new broker does not know it and
answers its heartbeat with ``BYE``, upon which it registers again; if the
broker goes silent for ``liveness`` heartbeats, the worker also reconnects its
socket from scratch.

Several brokers. ``backend`` may list several broker backends: the worker
registers with every one and serves requests from any, answering each on the
connection it came from. Each connection has its own heartbeat, liveness and
reconnection, so a dead or frozen broker never delays serving through the
others. Events go to every broker listed in ``events_in`` (one PUB socket
connected to each) and come from every one in ``events_out``; each event
carries this process's ``origin`` and a sequence number, and subscribers
deliver it once (:class:`phantom_bus.events.Deduplicator`). The READY
metadata names this process's ``instance``, which the broker shows in its
``services`` answer.

:meth:`Service.publish_events` publishes what a core decided (a list of
:class:`phantom_bus.events.Event`) with one log line per event, the way every
service shell logs its events.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import zmq
import zmq.asyncio
from loguru import logger

from phantom_bus import protocol
from phantom_bus import security as secmod
from phantom_bus.config import Config
from phantom_bus.errors import InternalError, PhantomError, Refused, UnknownOperation
from phantom_bus.events import Deduplicator, Event
from phantom_bus.opspec import OpSpec, check_args, params_of
from phantom_bus.wire import LoopSocket

Handler = Callable[..., Any]
EventCallback = Callable[[dict[str, Any]], Any]

#: Settings every service reads.
SERVICE_SETTINGS = (
    "backend",
    "events_in",
    "events_out",
    "bind_host",
    "data",
    "log_json",
    "log_level",
    "metrics",
    "worker_heartbeat",
    "worker_liveness",
    "worker_concurrency",
    "max_message",
    "curve_dir",
    "curve_key",
    "instance",
)


def instance_name(cfg: Config) -> str:
    """This process's instance name: the ``instance`` setting, else HOST:PID."""
    name = str(cfg.get("instance") or "")
    return name or f"{socket.gethostname()}:{os.getpid()}"


class BrokerLink:
    """A worker's conversation with one broker backend: its socket and when the
    broker was last heard, kept apart from every other broker's."""

    __slots__ = ("endpoint", "last_heard", "reconnects", "sock")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock: LoopSocket | None = None
        self.last_heard = 0.0
        self.reconnects = 0


class _Operation:
    __slots__ = ("allow", "fn", "is_async", "label", "name", "spec")

    def __init__(self, service: str, name: str, fn: Handler, allow: secmod.Rule) -> None:
        self.name = name
        self.label = f"{service}.{name}"
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        self.spec = params_of(fn)
        self.allow = allow


class Service:
    """One worker of a named service; see the module docstring for the contract."""

    def __init__(self, name: str, cfg: Config, *, ctx: zmq.asyncio.Context | None = None) -> None:
        protocol.decode_service(name.encode())
        self.name = name
        self.cfg = cfg
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.heartbeat = float(cfg.worker_heartbeat)
        self.liveness = self.heartbeat * int(cfg.worker_liveness)
        self.concurrency = int(cfg.worker_concurrency)
        self.max_body = int(cfg.max_message)
        self.counters = {"requests": 0, "errors": 0, "bad": 0, "reconnects": 0, "events_in": 0}
        # Security on: connect with this service's key, and check every request's
        # caller against its operation's rule before the handler runs.
        self.security = secmod.setup(cfg, f"service/{name}")
        self._authorise = self.security.enabled
        if self._authorise:
            self.counters["refused"] = 0
        self._ops: dict[str, _Operation] = {}
        self._subs: list[tuple[str, EventCallback]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self.instance = instance_name(cfg)
        #: Set by a service that elects a leader: whether this instance leads now (sent
        #: in every heartbeat; the broker prefers the leader's worker).
        self.leader_probe: Callable[[], bool] | None = None
        # One link per broker backend; every request is answered on its own link.
        self.links = [BrokerLink(e) for e in str(cfg.backend).split(",") if e.strip()]
        # Events: numbered per process run, so that copies relayed by several
        # brokers are delivered once.
        self.origin = f"{name}@{self.instance}#{os.urandom(3).hex()}"
        self._seq = 0
        self.dedupe = Deduplicator()
        # The worker socket is a plain (synchronous) socket driven by the event loop
        # through its FD: the request path then costs no futures or IntFlag
        # arithmetic, which is most of what zmq.asyncio adds per message.
        self._sync_ctx: zmq.Context[Any] = zmq.Context.shadow(self.ctx.underlying)
        self._pub: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self.operation("ping", allow=secmod.READ)(self._ping)

    # --- declaring what the service does -----------------------------------------

    def operation(self, name: str, allow: secmod.Rule = secmod.DEFAULT_RULE) -> Callable[[Handler], Handler]:
        """Decorator: ``fn`` answers operation ``name``, for the callers ``allow`` admits
        when security is on (default: operators and services only)."""

        def register(fn: Handler) -> Handler:
            self._ops[name] = _Operation(self.name, name, fn, allow)
            return fn

        return register

    def add_operation(self, name: str, fn: Handler, allow: secmod.Rule = secmod.DEFAULT_RULE) -> None:
        """Non-decorator form of :meth:`operation`."""
        self._ops[name] = _Operation(self.name, name, fn, allow)

    def operations(self) -> dict[str, OpSpec]:
        """Every operation this service answers, with its wire arguments."""
        return {name: op.spec for name, op in sorted(self._ops.items())}

    def rule(self, name: str) -> secmod.Rule:
        """Who may call operation ``name``: its declared rule; an unknown operation's
        is :data:`phantom_bus.security.DEFAULT_RULE` (fail closed)."""
        op = self._ops.get(name)
        return secmod.DEFAULT_RULE if op is None else op.allow

    def handler(self, name: str) -> Handler:
        """The function that answers operation ``name`` (KeyError if none)."""
        return self._ops[name].fn

    def subscribe(self, prefix: str, callback: EventCallback) -> None:
        """Call ``callback(event)`` for every bus event whose kind starts with ``prefix``."""
        self._subs.append((prefix, callback))
        if self._sub is not None:
            self._sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    def sync_socket(self, kind: int, hwm: int = 10000) -> zmq.Socket[Any]:
        """A plain socket on this service's context (LINGER 0, bounded queues), for
        use with :class:`phantom_bus.wire.LoopSocket` on a hot path."""
        sock = self._sync_ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        return sock

    def _ping(self) -> dict[str, Any]:
        return {"service": self.name, "pid": os.getpid(), "instance": self.instance, "ops": sorted(self._ops)}

    # --- events ---------------------------------------------------------------

    async def publish(self, kind: str, data: dict[str, Any] | None = None) -> None:
        """Publish an event on the bus (best effort, like any PUB socket)."""
        if self._pub is None:
            self._open_publisher()
        assert self._pub is not None
        self._seq += 1
        frames = protocol.encode_event(kind, data or {}, source=self.name, ts=time.time(), origin=self.origin,
                                       seq=self._seq)
        try:
            await self._pub.send_multipart(frames)
        except zmq.ZMQError as exc:
            logger.warning("could not publish {}: {}", kind, exc)

    async def publish_events(
        self,
        events: Iterable[Event],
        *,
        prepare: Callable[[Event], dict[str, Any]] | None = None,
        describe: Callable[[str, dict[str, Any]], str | None] | None = None,
        bind: str = "node",
    ) -> None:
        """Publish ``events`` in order, each with one INFO log line.

        ``prepare`` makes the published body from an event (default: its data,
        e.g. add the leader's term); ``describe(kind, body)`` is the log line
        (default ``"<kind> (<reason>)"``; None logs nothing for that event), bound
        to the body's ``bind`` field (the node, or the map's epoch)."""
        for event in events:
            data = event.data if prepare is None else prepare(event)
            line = f"{event.kind} ({data.get('reason')})" if describe is None else describe(event.kind, data)
            if line is not None:
                logger.bind(**{bind: data.get(bind)}).info(line)
            await self.publish(event.kind, data)

    def _open_publisher(self) -> None:
        # Opened when the service starts, not at the first event: a PUB socket
        # drops what it sends before its connection is up.
        self._pub = self._socket(zmq.PUB)
        self.security.connect(self._pub, self.cfg.events_in)

    async def _event_loop(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart()
            try:
                event = protocol.decode_event(frames, max_size=self.max_body)
            except PhantomError as err:
                logger.warning("dropped a malformed event: {}", err)
                continue
            if not self.dedupe.accept(event):
                continue  # the same event relayed by another broker
            self.counters["events_in"] += 1
            kind = event["kind"]
            for prefix, callback in self._subs:
                if kind.startswith(prefix):
                    await self._call_event(callback, event)

    @staticmethod
    async def _call_event(callback: EventCallback, event: dict[str, Any]) -> None:
        try:
            result = callback(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("event callback for {} raised", event.get("kind"))

    # --- the worker conversation ----------------------------------------------------

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        return sock

    def _connect(self, link: BrokerLink) -> None:
        if link.sock is not None:
            link.sock.close()
        sock = self.sync_socket(zmq.DEALER)
        self.security.client(sock)
        sock.connect(link.endpoint)
        link.sock = LoopSocket(sock, recheck=self.heartbeat)
        self._register(link)
        # Requests are handled straight from the loop's reader callback: no
        # future and no task switch per message (see LoopSocket.serve).
        link.sock.serve(lambda frames: self._on_worker_message(link, frames))

    def _register(self, link: BrokerLink) -> None:
        meta = {
            "concurrency": self.concurrency,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "instance": self.instance,
            "ops": sorted(self._ops),
        }
        self._send(link, [protocol.WORKER, protocol.READY, self.name.encode(), protocol.pack(meta)])
        link.last_heard = time.monotonic()

    @staticmethod
    def _send(link: BrokerLink, frames: list[bytes]) -> None:
        # At the high-water mark the message is dropped (the client retries)
        # rather than stalling the loop.
        if link.sock is not None and not link.sock.send(frames):
            logger.warning("message to the broker at {} dropped: send queue full", link.endpoint)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            for link in self.links:  # each broker on its own: a dead one delays no other
                if now - link.last_heard > self.liveness:
                    self.counters["reconnects"] += 1
                    link.reconnects += 1
                    logger.warning("broker at {} silent for {:.1f} s; reconnecting", link.endpoint, self.liveness)
                    self._connect(link)
                    continue
                self._send(link, self._heartbeat_frames())
            if self._authorise:  # event sockets refused (key authorized late) try again
                for sock in (self._pub, self._sub):
                    if sock is not None:
                        self.security.retry_refused(sock)

    def _heartbeat_frames(self) -> list[bytes]:
        # A service with a leader says in each heartbeat whether this instance leads, so
        # the broker hands its requests to the leader first (a follower only answers
        # not_leader to the leader-only ones).
        if self.leader_probe is None:
            return [protocol.WORKER, protocol.HEARTBEAT]
        return [protocol.WORKER, protocol.HEARTBEAT, protocol.pack({"leader": bool(self.leader_probe())})]

    def _on_worker_message(self, link: BrokerLink, frames: list[bytes]) -> None:
        link.last_heard = time.monotonic()
        try:
            if len(frames) < 2 or frames[0] != protocol.WORKER:
                self.counters["bad"] += 1
            elif frames[1] == protocol.REQUEST and len(frames) == 5:
                self._on_request(link, frames[2], frames[3], frames[4])
            elif frames[1] == protocol.REQUEST and len(frames) == 6:  # with the caller (security on)
                self._on_request(link, frames[2], frames[3], frames[4], frames[5])
            elif frames[1] == protocol.DISCONNECT:
                logger.info("broker at {} asked us to register again", link.endpoint)
                self._register(link)
            elif frames[1] != protocol.HEARTBEAT:
                self.counters["bad"] += 1
        except Exception:  # a bug here must not stop the worker from reading
            self.counters["bad"] += 1
            logger.exception("a message from the broker could not be handled")

    def _on_request(
        self, link: BrokerLink, route: bytes, reqid: bytes, body: bytes, caller: bytes | None = None
    ) -> None:
        self.counters["requests"] += 1
        try:
            op_name, args = protocol.decode_request(body, max_size=self.max_body)
            if self._authorise:
                secmod.authorise(caller, self.name, op_name, args, self.rule(op_name))
            op = self._ops.get(op_name)
            if op is None:
                known = sorted(self._ops)
                raise UnknownOperation(
                    f"service \"{self.name}\" has no operation \"{op_name}\"; it has {', '.join(known)}",
                    op=op_name,
                    ops=known,
                )
            args = check_args(op.label, op.spec, args)
        except Refused as err:
            self.counters["refused"] += 1
            self._reply(link, route, reqid, protocol.encode_error(err))
            return
        except PhantomError as err:
            self.counters["bad"] += 1
            self._reply(link, route, reqid, protocol.encode_error(err))
            return
        if op.is_async:
            task = asyncio.ensure_future(self._run_async(link, op, args, route, reqid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            body = protocol.encode_result(op.fn(**args))
        except Exception as exc:
            body = self._failed(op, exc)
        self._reply(link, route, reqid, body)

    async def _run_async(
        self, link: BrokerLink, op: _Operation, args: dict[str, Any], route: bytes, reqid: bytes
    ) -> None:
        try:
            body = protocol.encode_result(await op.fn(**args))
        except Exception as exc:
            body = self._failed(op, exc)
        self._reply(link, route, reqid, body)

    def _failed(self, op: _Operation, exc: Exception) -> bytes:
        """The error reply of a handler that raised: a :class:`PhantomError` as it
        is, anything else as ``internal`` (logged with its traceback: a bug)."""
        self.counters["errors"] += 1
        if isinstance(exc, PhantomError):
            return protocol.encode_error(exc)
        logger.opt(exception=exc).error("{}.{} failed", self.name, op.name)
        return protocol.encode_error(InternalError(f"{self.name}.{op.name} failed: {type(exc).__name__}: {exc}"))

    def _reply(self, link: BrokerLink, route: bytes, reqid: bytes, body: bytes) -> None:
        self._send(link, [protocol.WORKER, protocol.REPLY, route, reqid, body])

    # --- life cycle -----------------------------------------------------------------

    async def run(self, *extra: Awaitable[Any]) -> None:
        """Register and serve until :meth:`stop`; ``extra`` coroutines run alongside."""
        if self._pub is None:
            self._open_publisher()
        for link in self.links:
            self._connect(link)
        loops = [self._heartbeat_loop(), *extra]
        if self._subs:
            self._sub = self._socket(zmq.SUB)
            for prefix, _ in self._subs:
                self._sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
            self.security.connect(self._sub, self.cfg.events_out)
            loops.append(self._event_loop())
        tasks = [asyncio.ensure_future(c) for c in loops]
        (logger.info if self.security.enabled else logger.warning)(self.security.describe())
        logger.info("service {} (instance {}) registering at {}", self.name, self.instance, self.cfg.backend)
        try:
            await run_until(self._stopping, tasks)
        finally:
            await self._shutdown(tasks)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        for link in self.links:
            self._send(link, [protocol.WORKER, protocol.DISCONNECT])
        if self._tasks:
            # Requests already accepted get a short grace period to finish.
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self.links:
            if link.sock is not None:
                link.sock.close()
                link.sock = None
        for sock in (self._pub, self._sub):
            if sock is not None:
                sock.close(0)
        self._pub = self._sub = None
        self.security.close()

    def stop(self) -> None:
        """Finish: unregister, let accepted requests complete, close sockets."""
        self._stopping.set()


def run_forever(service: Service, *extra: Awaitable[Any]) -> int:
    """Run ``service`` on a fresh event loop until SIGTERM or SIGINT; returns an exit code."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        if service.security.enabled:  # re-read the authorized keys now
            loop.add_signal_handler(signal.SIGHUP, service.security.request_reload)
        await service.run(*extra)

    asyncio.run(main())
    logger.info("service {} stopped", service.name)
    return 0


async def run_until(stopping: asyncio.Event, tasks: list[asyncio.Task[Any]]) -> None:
    """Wait until ``stopping`` is set; a task that fails re-raises here (and ends
    the run), a task that simply returns (a start-up job) does not."""
    stopper = asyncio.ensure_future(stopping.wait())
    pending: set[asyncio.Future[Any]] = {*tasks, stopper}
    try:
        while stopper in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    task.result()
    finally:
        stopper.cancel()


class Shell(Protocol):
    """What a service process is made of: its :class:`Service` and extra loops."""

    service: Service

    def loops(self) -> list[Awaitable[Any]]:
        """The coroutines to run next to the service's own."""
        ...


def serve(
    name: str,
    description: str,
    settings: Iterable[str],
    build: Callable[[Config], Shell],
    argv: list[str] | None = None,
) -> int:
    """The ``main`` of a service process: flags and settings, logging, then run
    until SIGTERM. A bad setting exits 2 naming it; state that cannot be opened
    (a store raising RuntimeError) exits 1 saying why."""
    from phantom_bus import config as cfgmod
    from phantom_bus import log

    names = tuple(dict.fromkeys((*SERVICE_SETTINGS, *settings)))
    parser = argparse.ArgumentParser(prog=f"phantom-{name}", description=description)
    cfgmod.add_flags(parser, names)
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.from_args(args, names)
        log.setup(name, json=cfg.log_json, level=cfg.log_level)
        shell = build(cfg)
    except (cfgmod.ConfigError, ValueError) as exc:
        print(f"phantom-{name}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"phantom-{name}: cannot start: {exc}", file=sys.stderr)
        return 1
    serve_metrics(cfg, name, getattr(shell, "metrics", None))
    return run_forever(shell.service, *shell.loops())


def serve_metrics(cfg: Config, name: str, source: Callable[[], Any] | None = None) -> None:
    """Serve ``/metrics`` on the ``metrics`` setting's address (if set) from a thread.

    A port that cannot be bound is logged and the process goes on without
    metrics: monitoring is never a reason to stop serving.
    """
    address = str(cfg.get("metrics") or "")
    if not address:
        return
    from phantom_bus import metrics

    try:
        metrics.serve(address, name, source)
    except OSError as exc:
        logger.error("metrics: cannot serve /metrics on {}: {}; going on without metrics", address, exc)
        return
    logger.info("metrics: serving http://{}/metrics", address)
