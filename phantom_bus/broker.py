"""The broker process: request routing by service name, and the event relay.

``python -m phantom_bus.broker`` binds four sockets:

* frontend ROUTER (``broker``) for clients, REQ or DEALER;
* backend ROUTER (``backend``) for service workers;
* XSUB (``events_in``) for event publishers and XPUB (``events_out``) for
  subscribers, relayed frame for frame.

The request loop is a plain :class:`zmq.Poller` loop over the frontend and
the backend rather than asyncio: the broker is on every request's path
twice, and the poller costs less per message. The event relay runs in a
thread of its own with its own poll, so that requests never pay for the
event sockets. The loop reads envelope frames only; request bodies go through untouched (except for
requests to the broker's own ``broker`` service). All decisions live in
:class:`phantom_bus.dispatch.Dispatcher`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

import zmq
from loguru import logger

from phantom_bus import config as cfgmod
from phantom_bus import log, protocol
from phantom_bus import security as secmod
from phantom_bus.dispatch import Dispatcher, ToClient, ToWorker
from phantom_bus.errors import BadRequest, PhantomError, Refused, UnknownOperation, UnsupportedVersion
from phantom_bus.wire import NOBLOCK, readable, recv_frames, recv_frames_as, send_frames

_BROKER_NAME = protocol.BROKER_SERVICE.encode()

SETTINGS = (
    "broker",
    "backend",
    "events_in",
    "events_out",
    "bind_host",
    "log_json",
    "log_level",
    "metrics",
    "worker_heartbeat",
    "worker_liveness",
    "broker_queue",
    "max_message",
    "timeout",
    "curve_dir",
    "curve_key",
    "instance",
)

# Messages handled per socket before looking at the others, so one busy socket
# cannot starve the rest while a burst is still drained without re-polling.
_BATCH = 256
#: Longest wait of the event relay's poll: how soon it sees that the broker stops.
_RELAY_POLL_MS = 100
_HWM = 10000
#: Recent events kept for the ``events`` operation (`phantom events`); the most one reply holds.
RECENT_EVENTS = 1000
# Too chatty to be worth remembering: one per node per heartbeat, and sharding's
# epoch once a second.
_NOT_RECENT = (b"member.load", b"shardmap.current")

#: The operations of the broker's own ``broker`` service (none takes arguments).
OPERATIONS = ("ping", "services", "events", "stats")


def events_args(limit: int = 100) -> None:
    """The wire arguments of ``broker.events`` (the other broker operations take none)."""
#: After this many worker-liveness periods of broker uptime, a service name that
#: no worker ever registered under is answered ``unknown_service`` (not
#: retryable) instead of ``service_unavailable``: by then every running service
#: has registered, even after a broker restart (workers re-register within one
#: liveness period).
UNKNOWN_SERVICE_GRACE = 5



def _leader_hint(frame: bytes) -> bool | None:
    """A worker heartbeat's optional state (``{"leader": bool}``); None if absent or malformed."""
    try:
        state = protocol.unpack(frame)
    except PhantomError:
        return None
    flag = state.get("leader") if isinstance(state, dict) else None
    return flag if isinstance(flag, bool) else None

class Broker:
    """The broker: sockets, the poll loop, and the dispatcher it drives."""

    def __init__(self, cfg: cfgmod.Config, ctx: zmq.Context[Any] | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.max_body = int(cfg.max_message)
        self.heartbeat = float(cfg.worker_heartbeat)
        liveness = self.heartbeat * int(cfg.worker_liveness)
        self.dispatcher = Dispatcher(
            liveness=liveness,
            queue_limit=int(cfg.broker_queue),
            queue_timeout=float(cfg.timeout) * 2,
            unknown_after=time.monotonic() + UNKNOWN_SERVICE_GRACE * liveness,
        )
        self.started = time.time()
        # Shown by ping and stats, so that a status can name the brokers it reached.
        self.instance = str(cfg.get("instance") or "") or f"{socket.gethostname()}:{os.getpid()}"
        self.counters = {"requests": 0, "replies": 0, "bad_client": 0, "bad_worker": 0, "events": 0}
        self._running = False
        self._relay_thread: threading.Thread | None = None
        #: Set when the event relay failed (the process then exits non-zero).
        self.failed = False
        self.security = secmod.setup(cfg, "broker/broker")
        self._secure = self.security.enabled
        if self._secure:
            self.counters["refused"] = 0
        self.frontend = self._socket(zmq.ROUTER, cfg.bind("broker"), secmod.DOMAIN_FRONTEND)
        self.backend = self._socket(zmq.ROUTER, cfg.bind("backend"), secmod.DOMAIN_BACKEND)
        self.xsub = self._socket(zmq.XSUB, cfg.bind("events_in"), secmod.DOMAIN_EVENTS_IN)
        self.xpub = self._socket(zmq.XPUB, cfg.bind("events_out"), secmod.DOMAIN_EVENTS_OUT)
        # The broker itself hears every event, so that `phantom events` can show the
        # recent ones; raw frames, decoded only when asked for.
        self.recent: deque[list[bytes]] = deque(maxlen=RECENT_EVENTS)
        self.xsub.send(b"\x01")

    def _socket(self, kind: int, endpoint: str, domain: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        self.security.server(sock, domain)
        sock.bind(endpoint)
        return sock

    # --- frontend -------------------------------------------------------------

    def _client_error(
        self,
        identity: bytes,
        delimited: bool,
        service: bytes,
        reqid: bytes,
        err: PhantomError,
        header: bytes = protocol.CLIENT,
    ) -> None:
        frames = [identity, b""] if delimited else [identity]
        frames += [header, service, reqid, protocol.encode_error(err)]
        send_frames(self.frontend, frames)

    def _on_client_as(self, frames: list[bytes], user: str | None, now: float) -> None:
        # Security on: the connection was authenticated at the handshake; here the
        # caller must still be authorized (a key removed since is refused at once),
        # and its User-Id travels with the request for the service to check.
        if user is not None and len(user) < 256 and self.security.knows(user):
            self._on_client(frames, now, user.encode())
            return
        self.counters["refused"] += 1
        self._on_client(frames, now, None)

    def _on_client(self, frames: list[bytes], now: float, caller: bytes | None = b"") -> None:
        identity = frames[0]
        delimited = len(frames) > 1 and frames[1] == b""
        rest = frames[2:] if delimited else frames[1:]
        if len(rest) == 4 and rest[0] == protocol.CLIENT:
            service_frame, reqid, body = rest[1], rest[2], rest[3]
            if (
                0 < len(service_frame) <= protocol.MAX_SERVICE_NAME
                and len(reqid) <= protocol.MAX_REQUEST_ID
                and len(body) <= self.max_body
                and service_frame.isascii()
            ):
                if caller is None:
                    revoked = Refused("this key is no longer authorized (it was removed from the authorized keys)")
                    self._client_error(identity, delimited, service_frame, reqid, revoked)
                    return
                self.counters["requests"] += 1
                if service_frame == _BROKER_NAME:
                    self._own_request(identity, delimited, reqid, body, now)
                    return
                route = protocol.make_route(identity, delimited, caller)
                action = self.dispatcher.request(service_frame.decode("ascii"), route, reqid, body, now)
                if action is not None:
                    self._do(action)
                return
        self._malformed(identity, delimited, rest)

    def _malformed(self, identity: bytes, delimited: bool, rest: list[bytes]) -> None:
        """Answer a request that breaks a framing rule.

        The reply always has the four frames of a reply, so one parser reads
        every answer: the service and request-id frames are echoed exactly as
        sent, whatever their length (so a client can match the reply to its
        request), and a frame the request lacked is empty. The header frame is
        ``PHC1``, except for ``unsupported_version``, which echoes the header the
        client sent (the one it understands).
        """
        service_frame = rest[1] if len(rest) > 1 else b""
        reqid = rest[2] if len(rest) > 2 else b""
        header = protocol.CLIENT
        try:
            protocol.check_header(rest[0] if rest else b"", protocol.CLIENT)
            if len(rest) != 4:
                raise BadRequest(
                    f"a request has 4 frames (header, service, request id, body), got {len(rest)}", field="frames"
                )
            protocol.decode_service(service_frame)
            protocol.check_request_id(reqid)
            size, limit = len(rest[3]), self.max_body
            raise protocol.TooLarge(f"body is {size} bytes, the limit is {limit}", size=size, limit=limit)
        except UnsupportedVersion as err:
            header = rest[0]
            error: PhantomError = err
        except PhantomError as err:
            error = err
        self.counters["bad_client"] += 1
        self._client_error(identity, delimited, service_frame, reqid, error, header)

    def _own_request(self, identity: bytes, delimited: bool, reqid: bytes, body: bytes, now: float) -> None:
        name = _BROKER_NAME
        try:
            op, args = protocol.decode_request(body, max_size=self.max_body)
            extra = sorted(set(args) - ({"limit"} if op == "events" else set()))
            if op in OPERATIONS and extra:
                takes = "only limit" if op == "events" else "no arguments"
                raise BadRequest(f"broker.{op} takes {takes}, got {', '.join(extra)}", op=op, args=extra)
            if op == "ping":
                result: Any = {"pong": True, "time": time.time(), "instance": self.instance}
            elif op == "services":
                result = self.dispatcher.services(now)
            elif op == "events":
                result = self._recent_events(args.get("limit", 100))
            elif op == "stats":
                result = {
                    **self.counters,
                    "uptime": round(time.time() - self.started, 3),
                    "pid": os.getpid(),
                    "instance": self.instance,
                    "services": self.dispatcher.services(now),
                    "security": self.security.stats(),
                }
            else:
                raise UnknownOperation(
                    f"the broker has no operation \"{op}\"; it has {', '.join(OPERATIONS)}", op=op, ops=list(OPERATIONS)
                )
        except PhantomError as err:
            self._client_error(identity, delimited, name, reqid, err)
            return
        frames = [identity, b""] if delimited else [identity]
        frames += [protocol.CLIENT, name, reqid, protocol.encode_result(result)]
        send_frames(self.frontend, frames)

    def metrics(self) -> list[Any]:
        """``phantom_broker_messages_total{kind}`` (read from the metrics thread)."""
        from prometheus_client.core import CounterMetricFamily

        from phantom_bus.metrics import SERIES

        help_text = next(s.help for s in SERIES if s.name == "phantom_broker_messages_total")
        family = CounterMetricFamily("phantom_broker_messages", help_text, labels=["kind"])
        for kind, value in dict(self.counters).items():
            family.add_metric([kind], value)
        return [family]

    def _recent_events(self, limit: Any) -> list[dict[str, Any]]:
        """The last ``limit`` events relayed (oldest first; ``member.load`` and
        ``shardmap.current`` are not kept)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= RECENT_EVENTS:
            raise BadRequest(f"limit must be an integer in 1..{RECENT_EVENTS}, got {limit!r}")
        out = []
        for frames in list(self.recent)[-limit:]:
            with contextlib.suppress(PhantomError):
                out.append(protocol.event_summary(protocol.decode_event(frames, max_size=self.max_body)))
        return out

    # --- backend --------------------------------------------------------------

    def _on_worker_as(self, frames: list[bytes], user: str | None, now: float) -> None:
        # Security on: only service keys reach the backend (ZAP domain); a worker
        # may register only for the service its key is named after.
        if len(frames) >= 4 and frames[2] == protocol.READY and frames[1] == protocol.WORKER:
            wanted = f"service:{frames[3].decode('ascii', 'replace')}"
            if user != wanted or not self.security.knows(user):
                self.counters["bad_worker"] += 1
                logger.warning("refused a worker registration for {!r} from key {}", frames[3][:64], user)
                return
        self._on_worker(frames, now)

    def _on_worker(self, frames: list[bytes], now: float) -> None:
        identity = frames[0]
        if len(frames) < 3 or frames[1] != protocol.WORKER:
            self.counters["bad_worker"] += 1
            logger.warning("dropped a malformed worker message ({} frames)", len(frames))
            return
        command = frames[2]
        if command == protocol.REPLY and len(frames) == 6:
            _, _, _, route, reqid, body = frames
            self.counters["replies"] += 1
            actions = self.dispatcher.replied(identity, route, reqid, now)
            try:
                client, delimited = protocol.split_route(route)
            except BadRequest:
                self.counters["bad_worker"] += 1
                return
            out = [client, b""] if delimited else [client]
            out += [protocol.CLIENT, self._service_of(identity), reqid, body]
            send_frames(self.frontend, out)
            for action in actions:
                self._do(action)
        elif command == protocol.HEARTBEAT and len(frames) in (3, 4):
            if not self.dispatcher.heard(identity, now, _leader_hint(frames[3]) if len(frames) == 4 else None):
                # A worker we do not know: we restarted, or dropped it as dead.
                # Telling it to reconnect is how it comes back without waiting.
                send_frames(self.backend, [identity, protocol.WORKER, protocol.DISCONNECT])
        elif command == protocol.READY and len(frames) in (4, 5):
            self._on_ready(identity, frames, now)
        elif command == protocol.DISCONNECT:
            if self.dispatcher.remove(identity):
                logger.info("worker {} said goodbye", identity.hex())
        else:
            self.counters["bad_worker"] += 1
            logger.warning("dropped a worker message with command {!r}", command[:16])

    def _service_of(self, identity: bytes) -> bytes:
        service = self.dispatcher.service_of(identity)
        return service.encode() if service is not None else b""

    def _on_ready(self, identity: bytes, frames: list[bytes], now: float) -> None:
        try:
            service = protocol.decode_service(frames[3])
            meta = protocol.unpack(frames[4]) if len(frames) == 5 else {}
            if not isinstance(meta, dict):
                raise BadRequest("READY metadata must be a map")
        except PhantomError as err:
            self.counters["bad_worker"] += 1
            logger.warning("refused a worker registration: {}", err)
            return
        capacity = meta.get("concurrency", 1)
        capacity = capacity if isinstance(capacity, int) and capacity > 0 else 1
        actions = self.dispatcher.ready(identity, service, capacity, meta, now)
        logger.info("worker for {} ready (pid {}, concurrency {})", service, meta.get("pid"), capacity)
        for action in actions:
            self._do(action)

    # --- actions and housekeeping ----------------------------------------------

    def _do(self, action: ToWorker | ToClient) -> None:
        if isinstance(action, ToWorker):
            frames = [action.identity, protocol.WORKER, protocol.REQUEST, action.route, action.reqid, action.body]
            if self._secure:
                frames.append(protocol.route_caller(action.route))
            send_frames(self.backend, frames)
            return
        client, delimited = protocol.split_route(action.route)
        self._client_error(client, delimited, action.service.encode(), action.reqid, action.error)

    def _housekeeping(self, now: float) -> None:
        dropped, actions = self.dispatcher.expire(now)
        for worker in dropped:
            logger.warning(
                "worker for {} (pid {}) stopped heartbeating; dropped with {} request(s) in flight",
                worker.service,
                worker.meta.get("pid"),
                len(worker.inflight) or "no",
            )
        for action in actions:
            self._do(action)
        for worker in self.dispatcher.workers():
            send_frames(self.backend, [worker.identity, protocol.WORKER, protocol.HEARTBEAT])

    # The poll has just said that a message is waiting on the socket, so the first
    # one is received without asking again (an EVENTS read costs about as much as
    # a three-frame receive); each next one of the burst is asked for.

    @staticmethod
    def _drain(sock: zmq.Socket[Any], handle: Any, now: float) -> None:
        for i in range(_BATCH):
            if i and not readable(sock):
                return
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            handle(frames, now)

    @staticmethod
    def _drain_as(sock: zmq.Socket[Any], handle: Any, now: float) -> None:
        for i in range(_BATCH):
            if i and not readable(sock):
                return
            try:
                frames, user = recv_frames_as(sock, NOBLOCK)
            except zmq.Again:
                return
            handle(frames, user, now)

    def _relay(self, src: zmq.Socket[Any], dst: zmq.Socket[Any], count: bool) -> None:
        for i in range(_BATCH):
            if i and not readable(src):
                return
            try:
                frames = recv_frames(src, NOBLOCK)
            except zmq.Again:
                return
            if count:
                self.counters["events"] += 1
                if frames and frames[0] not in _NOT_RECENT:
                    self.recent.append(frames)
            send_frames(dst, frames)

    def _relay_loop(self) -> None:
        """The event relay, in its own thread with its own poll: events upstream
        (XSUB -> XPUB), subscriptions back (XPUB -> XSUB). Kept out of the request
        loop, whose every poll would otherwise also look at the two event sockets
        (about a tenth of the broker's time per request). Only this thread uses
        the two sockets once it runs; it closes them when the broker stops."""
        poller = zmq.Poller()
        poller.register(self.xsub, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        try:
            while self._running:
                try:
                    ready = dict(poller.poll(_RELAY_POLL_MS))
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                if self.xsub in ready:
                    self._relay(self.xsub, self.xpub, True)
                if self.xpub in ready:
                    self._relay(self.xpub, self.xsub, False)
        except Exception:  # pragma: no cover - a bug
            # A broker that routes requests but no longer relays events would look
            # healthy while every follower waits for its poll: stop it all, so that
            # the supervisor restarts it.
            logger.exception("the event relay failed; stopping the broker")
            self.failed = True
            self._running = False
        finally:
            self.xsub.close(0)
            self.xpub.close(0)

    def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT in :func:`main`)."""
        poller = zmq.Poller()
        for sock in (self.frontend, self.backend):
            poller.register(sock, zmq.POLLIN)
        self._running = True
        self._relay_thread = threading.Thread(target=self._relay_loop, name="event-relay", daemon=True)
        self._relay_thread.start()
        next_beat = time.monotonic() + self.heartbeat
        (logger.info if self._secure else logger.warning)(self.security.describe())
        logger.info(
            "broker up: clients {} workers {} events {} -> {}",
            self.cfg.bind("broker"),
            self.cfg.bind("backend"),
            self.cfg.bind("events_in"),
            self.cfg.bind("events_out"),
        )
        while self._running:
            timeout = max(0.0, next_beat - time.monotonic())
            try:
                ready = dict(poller.poll(int(timeout * 1000) + 1))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            now = time.monotonic()
            if self._secure:
                if self.backend in ready:
                    self._drain_as(self.backend, self._on_worker_as, now)
                if self.frontend in ready:
                    self._drain_as(self.frontend, self._on_client_as, now)
            else:
                if self.backend in ready:
                    self._drain(self.backend, self._on_worker, now)
                if self.frontend in ready:
                    self._drain(self.frontend, self._on_client, now)
            if now >= next_beat:
                self._housekeeping(now)
                next_beat = now + self.heartbeat
        self.close()

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._running = False

    def close(self) -> None:
        """Tell workers goodbye and close the sockets."""
        for worker in self.dispatcher.workers():
            with contextlib.suppress(zmq.ZMQError):
                self.backend.send_multipart(
                    [worker.identity, protocol.WORKER, protocol.DISCONNECT], zmq.NOBLOCK
                )
        for sock in (self.frontend, self.backend):
            sock.close(0)
        if self._relay_thread is not None:
            self._relay_thread.join(2 * _RELAY_POLL_MS / 1000)
        else:
            self.xsub.close(0)
            self.xpub.close(0)
        self.security.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m phantom_bus.broker``."""
    parser = argparse.ArgumentParser(prog="phantom-broker", description="Phantom message broker")
    cfgmod.add_flags(parser, SETTINGS)
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.from_args(args, SETTINGS)
    except cfgmod.ConfigError as exc:
        print(f"phantom-broker: {exc}", file=sys.stderr)
        return 2
    log.setup("broker", json=cfg.log_json, level=cfg.log_level, host=socket.gethostname())
    try:
        broker = Broker(cfg)
    except zmq.ZMQError as exc:
        logger.error("cannot bind the broker's sockets: {}", exc)
        return 1
    except cfgmod.ConfigError as exc:
        logger.error("{}", exc)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    if broker.security.enabled:
        signal.signal(signal.SIGHUP, lambda *_: broker.security.request_reload())
    from phantom_bus.service import serve_metrics

    serve_metrics(cfg, "broker", broker.metrics)
    broker.run()
    logger.info("broker stopped")
    return 1 if broker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
