"""The membership process: heartbeats in, member.* events out, the list on request.

Agents connect a DEALER to membership's ROUTER (``heartbeat`` endpoint) and
send ``[PHH1, body]``; each heartbeat is answered ``[PHH1, ack]`` at once, so
an agent knows membership is alive and hears when it is suspected.

Who may heartbeat is decided by discovery: ``node.discovered`` admits a node,
``node.removed`` forgets it, and a periodic sync with discovery's table makes
up for events lost on the way (PUB/SUB is best effort). Operators and the
manager can also ``admit`` and ``forget`` directly.

The shell measures its own loop lag on every tick (how late the timer fired)
and hands it to the core, which discounts the stall so that nobody is
convicted because membership itself was paused.

Several instances may run, each with its own heartbeat endpoint; one leads
(a lease in the control plane's store). Every instance runs its detector on
the heartbeats it receives, so a follower is warm, but only the leader's
verdicts count: only the leader publishes ``member.*`` events, each carrying
its ``term``, and only the leader answers ``verdicts`` (``{"term",
"instance", "members"}``, what the manager re-reads every second); a
follower answers it with the retryable ``not_leader`` error.

Each instance counts a member's state changes itself, so the ``change`` of two
instances are not comparable. On the wire (events, ``members``, ``verdicts``)
a leader's ``change`` is therefore term-major (:func:`wire_change`): the
newest leader's verdict is never refused as older than one an earlier leader
(or a follower's ``members`` row) gave for the same incarnation. A follower's
rows carry its own count (term 0): they never outrank a leader's verdict.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import zmq
from loguru import logger

from phantom_bus import protocol
from phantom_bus import security as secmod
from phantom_bus.client import AsyncClient
from phantom_bus.config import Config
from phantom_bus.errors import BadRequest, PhantomError, Refused
from phantom_bus.events import Event
from phantom_bus.security import ADMIN, READ
from phantom_bus.service import Service
from phantom_bus.store import Store
from phantom_bus.wire import LoopSocket
from services.leadership import Leadership
from services.membership.config import MembershipConfig
from services.membership.core import Membership
from services.shared_store import open_shared_store

SETTINGS = (
    "broker",
    "heartbeat",
    "heartbeat_interval",
    "phi_window",
    "phi_min_std_dev",
    "acceptable_pause",
    "phi_suspect",
    "phi_dead",
    "suspicion_timeout",
    "incarnation_lead",
    "timeout",
    "retries",
    "store",
    "store_prefix",
    "leader_ttl",
    "instance",
)

#: Bits of a wire ``change`` below the leader's term (see the module docstring).
CHANGE_BITS = 32


def wire_change(term: int, change: int) -> int:
    """A member's ``change`` as published by the leader of ``term`` (0: a follower's own count)."""
    return (term << CHANGE_BITS) | (change & ((1 << CHANGE_BITS) - 1))


def wire_members(rows: list[dict[str, Any]], term: int) -> list[dict[str, Any]]:
    """``members`` rows with each ``change`` as :func:`wire_change` makes it."""
    return [{**row, "change": wire_change(term, row["change"])} if isinstance(row.get("change"), int) else row
            for row in rows]


# Seconds between full syncs of the admitted set with discovery's table. Not a
# setting: it only repairs a lost node.* event (which admits at once), so its sole
# effect is how long such a rare loss lasts; five beacon intervals keeps the cost of
# reading the whole table (5,000 nodes) negligible.
_SYNC_PERIOD = 5.0
_MAX_HEARTBEAT = 64 * 1024


def core_config(cfg: Config) -> MembershipConfig:
    """The core's settings from the process settings."""
    return MembershipConfig(
        heartbeat_interval=cfg.heartbeat_interval,
        window_size=cfg.phi_window,
        min_std_dev=cfg.phi_min_std_dev,
        acceptable_pause=cfg.acceptable_pause,
        suspect_phi=cfg.phi_suspect,
        dead_phi=cfg.phi_dead,
        suspicion_timeout=cfg.suspicion_timeout,
        incarnation_lead=cfg.incarnation_lead,
    )


def decode_heartbeat(body: bytes) -> dict[str, Any]:
    """Decode and check a heartbeat or leave message; raises BadRequest."""
    doc = protocol.unpack(body, max_size=_MAX_HEARTBEAT)
    if not isinstance(doc, dict):
        raise BadRequest("a heartbeat is a msgpack map")
    op = doc.get("op", "hb")
    if op not in ("hb", "leave"):
        raise BadRequest(f"unknown heartbeat op {op!r}: hb or leave")
    node, incarnation = doc.get("node"), doc.get("incarnation")
    if not isinstance(node, str) or not node:
        raise BadRequest("heartbeat needs 'node', a non-empty string")
    if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
        raise BadRequest("heartbeat needs 'incarnation', an integer >= 0")
    seq = doc.get("seq", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise BadRequest("heartbeat 'seq' must be an integer >= 0")
    load = doc.get("load")
    if load is not None and not isinstance(load, dict):
        raise BadRequest("heartbeat 'load' must be a map or nil")
    return {"op": op, "node": node, "incarnation": incarnation, "seq": seq, "load": load}


class MembershipService:
    """Membership's shell around one :class:`Membership` core."""

    def __init__(self, cfg: Config, store: Store | None = None) -> None:
        cfg.bind("heartbeat")  # one endpoint of its own (agents take the list): refused at start otherwise
        self.cfg = cfg
        self.core = Membership(core_config(cfg))
        self.service = Service("membership", cfg)
        self.store = store if store is not None else open_shared_store(cfg)
        self.leadership = Leadership(self.store, "membership", cfg)
        self.service.leader_probe = lambda: self.leadership.is_leader
        self.counters = {"malformed": 0, "withheld": 0}
        # Security on: a heartbeat counts only from the agent key of the node it names.
        self._secure = self.service.security.enabled
        if self._secure:
            self.counters["refused"] = 0
        self._heartbeats: LoopSocket | None = None
        svc = self.service
        svc.add_operation("members", self.op_members, allow=READ)
        svc.add_operation("verdicts", self.op_verdicts, allow=ADMIN)
        svc.add_operation("member", self.op_member, allow=READ)
        svc.add_operation("admit", self.op_admit, allow=ADMIN)
        svc.add_operation("forget", self.op_forget, allow=ADMIN)
        svc.add_operation("stats", self.op_stats, allow=READ)
        svc.subscribe("node.", self.on_node_event)

    # --- operations -------------------------------------------------------------------

    def op_members(self) -> list[dict[str, Any]]:
        """Every member: state, incarnation, phi, heartbeat age, load."""
        term = self.leadership.term if self.leadership.is_leader else 0
        return wire_members(self.core.members(time.monotonic()), term)

    def op_verdicts(self) -> dict[str, Any]:
        """The leader's verdicts: ``{"term", "instance", "members"}``; ``not_leader`` on a follower."""
        if not self.leadership.is_leader:
            raise self.leadership.not_leader()
        term = self.leadership.term
        return {"term": term, "instance": self.leadership.instance,
                "members": wire_members(self.core.members(time.monotonic()), term)}

    def op_member(self, node: str) -> dict[str, Any]:
        """One member; ``not_found`` if it never heartbeated."""
        return self.core.member(node, time.monotonic())

    def op_admit(self, node: str, interval: float | None = None, incarnation: int | None = None) -> dict[str, Any]:
        """Allow ``node`` to heartbeat (manual registration, or the manager's registry)."""
        return {"node": node, "new": self.core.admit(node, time.monotonic(), interval, incarnation)}

    async def op_forget(self, node: str) -> dict[str, Any]:
        """Stop accepting heartbeats from ``node`` and drop it from the list."""
        await self._publish(self.core.forget(node, time.monotonic()))
        return {"node": node, "forgotten": True}

    def op_stats(self) -> dict[str, Any]:
        """Counters of the core and the shell."""
        return {**self.core.stats(), **self.counters, "pending": self.core.pending(),
                "instance": self.service.instance, "leader": self.leadership.is_leader}

    # --- discovery -> admission ------------------------------------------------------

    def _admit_from(self, doc: dict[str, Any]) -> None:
        try:
            self.core.admit_discovered(doc, time.monotonic())
        except PhantomError as exc:
            logger.warning("could not admit a node from discovery: {}", exc)

    async def on_node_event(self, event: dict[str, Any]) -> None:
        """Follow discovery: admit discovered nodes, forget removed ones."""
        kind = event.get("kind")
        if kind in ("node.discovered", "node.updated"):
            self._admit_from(event)
        elif kind == "node.removed" and isinstance(event.get("node"), str):
            await self._publish(self.core.forget(event["node"], time.monotonic()))

    async def sync_loop(self) -> None:
        """Admit every node discovery knows, now and every few seconds (events can be lost)."""
        async with AsyncClient(self.cfg.broker, timeout=self.cfg.timeout, retries=1) as client:
            while True:
                try:
                    for doc in await client.request("discovery", "nodes"):
                        if doc.get("state") != "left":
                            self._admit_from(doc)
                except PhantomError as exc:
                    logger.debug("discovery sync skipped: {}", exc)
                await asyncio.sleep(_SYNC_PERIOD)

    # --- heartbeats ---------------------------------------------------------------------

    async def _publish(self, events: list[Event]) -> None:
        if not events:
            return
        if not self.leadership.is_leader:
            # A follower's detector stays warm, but only the leader's verdicts count.
            self.counters["withheld"] += len(events)
            return
        term = self.leadership.term

        def with_term(event: Event) -> dict[str, Any]:
            data = {**event.data, "term": term}
            if isinstance(data.get("change"), int):
                data["change"] = wire_change(term, data["change"])
            return data

        await self.service.publish_events(events, prepare=with_term, describe=_describe_verdict)

    def _answer(self, identity: bytes, frames: list[bytes], now: float, sender: str | None = None) -> list[Event]:
        if len(frames) != 2 or frames[0] != protocol.HEARTBEAT_HEADER:
            self.counters["malformed"] += 1
            if len(frames) >= 1 and frames[0][:3] == protocol.HEARTBEAT_HEADER[:3]:
                err: PhantomError = protocol.UnsupportedVersion(
                    f"heartbeat header {frames[0][:8]!r}; this membership speaks {protocol.HEARTBEAT_HEADER!r}"
                )
            else:
                err = BadRequest("a heartbeat is [PHH1, body]")
            self._reply(identity, {"ok": False, "error": err.to_wire()})
            return []
        try:
            msg = decode_heartbeat(frames[1])
            if self._secure and not self._speaks_for(sender, msg["node"]):
                raise Refused(
                    f"key {sender} may not heartbeat as node {msg['node']!r}: "
                    "an agent heartbeats only as the node its key is named after"
                )
            if msg["op"] == "leave":
                events = self.core.leave(msg["node"], msg["incarnation"], now)
                self._reply(identity, {"ok": True, "code": "left", "node": msg["node"]})
                return events
            result = self.core.heartbeat(
                msg["node"], msg["incarnation"], msg["seq"], msg["load"], now, wall_ms=time.time_ns() // 1_000_000
            )
        except PhantomError as err:
            self.counters["refused" if isinstance(err, Refused) else "malformed"] += 1
            self._reply(identity, {"ok": False, "error": err.to_wire()})
            return []
        ack = result.to_wire()
        ack["ok"] = result.ok
        refusal = result.error()
        if refusal is not None:
            ack["error"] = refusal.to_wire()
            if result.code == "unknown_node":
                ack["error"]["message"] += "; keep beaconing: discovery admits a node on its first beacon"
        self._reply(identity, ack)
        return list(result.events)

    def _speaks_for(self, sender: str | None, node: str) -> bool:
        security = self.service.security
        return secmod.speaks_for(sender, node) and security.knows(sender)

    def _reply(self, identity: bytes, doc: dict[str, Any]) -> None:
        assert self._heartbeats is not None
        self._heartbeats.send([identity, protocol.HEARTBEAT_HEADER, protocol.pack(doc)])

    async def heartbeat_loop(self) -> None:
        """Answer heartbeats until cancelled."""
        security = self.service.security
        sock = self.service.sync_socket(zmq.ROUTER, hwm=100_000)
        security.server(sock, secmod.DOMAIN_HEARTBEAT)
        sock.bind(self.cfg.bind("heartbeat"))
        self._heartbeats = hb = LoopSocket(sock)
        logger.info("listening for heartbeats on {}", self.cfg.bind("heartbeat"))
        burst = 0
        try:
            while True:
                sender: str | None = None
                if security.enabled:
                    got = hb.recv_nowait_as()
                    frames, sender = got if got is not None else (None, None)
                else:
                    frames = hb.recv_nowait()
                if frames is None:
                    burst = 0
                    await hb.wait()
                    continue
                events = self._answer(frames[0], frames[1:], time.monotonic(), sender)
                if events:
                    await self._publish(events)
                burst += 1
                if burst == 256:  # a backlog after a stall still lets the tick run
                    burst = 0
                    await asyncio.sleep(0)
        finally:
            hb.close()

    async def tick_loop(self) -> None:
        """Run the detector; the timer's lateness is our own pause, handed to the core."""
        period = self.core.config.tick_interval
        digest_period = self.core.config.load_digest_interval
        loop = asyncio.get_running_loop()
        due = loop.time() + period
        next_digest = loop.time() + digest_period
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            woke = loop.time()
            lag = max(0.0, woke - due)
            now = time.monotonic()
            if lag > 0.2:
                logger.warning("membership loop stalled {:.2f} s; not counting it against any node", lag)
            await self._publish(self.core.tick(now, observer_lag=lag))
            if woke >= next_digest:
                await self._publish(self.core.load_events(now))
                next_digest = woke + digest_period
            due = woke + period

    def loops(self) -> list[Any]:
        """The coroutines to run next to the service's own."""
        return [self.leadership.run(), self.heartbeat_loop(), self.tick_loop(), self.sync_loop()]


def _describe_verdict(kind: str, data: dict[str, Any]) -> str | None:
    """A verdict's log line; load reports (one per node every few seconds) get none."""
    if kind == "member.load":
        return None
    return f"{kind} incarnation {data.get('incarnation')} ({data.get('reason')})"
