"""The agent process: one per database host.

It announces the node with beacons to discovery, samples the host's load with
psutil, and (with the membership and sharding services) heartbeats and
applies shard assignments. All decisions live in the cores it drives:
:mod:`services.discovery.beacon` (what a beacon says), :mod:`services.agent.load`
(what the load readings mean) and :mod:`services.agent.incarnation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from loguru import logger

from phantom_bus import protocol
from phantom_bus import security as secmod
from phantom_bus.client import AsyncClient
from phantom_bus.config import Config
from phantom_bus.errors import PhantomError
from phantom_bus.events import Deduplicator
from phantom_bus.follower import CURRENT, AsyncMapFollower
from phantom_bus.service import run_until
from services.agent.incarnation import next_incarnation, persist_incarnation, refutation
from services.agent.load import LoadDocument, LoadSampler
from services.agent.participation import Participation
from services.agent.probe import PsutilProbe
from services.discovery.beacon import (
    MAX_HINT_VALUE_CHARS,
    Beacon,
    check_address,
    check_node_id,
    encode_beacon,
    new_instance_id,
)

SETTINGS = (
    "broker",
    "events_out",
    "timeout",
    "copy_time",
    "primary_lease",
    "participant",
    "participant_exec",
    "participant_timeout",
    "beacon",
    "heartbeat",
    "data",
    "log_json",
    "log_level",
    "metrics",
    "beacon_interval",
    "heartbeat_interval",
    "load_interval",
    "node_id",
    "zone",
    "address",
    "weight",
    "curve_dir",
    "curve_key",
)

# Leaving beacons are sent this many times: PUB may drop one, repeats are harmless.
_LEAVE_REPEATS = 3


def default_address(node_id: str) -> str:
    """A stable local address for a node id when none is given (demo clusters)."""
    return f"127.0.0.1:{7000 + zlib.crc32(node_id.encode()) % 1000}"


def _version() -> str:
    try:
        return metadata.version("phantom")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Agent:
    """The agent of one node; :meth:`run` until :meth:`stop`."""

    def __init__(self, cfg: Config, *, watch_pid: int | None = None) -> None:
        if not cfg.node_id:
            raise ValueError("setting 'node_id' is required: --node-id ID or PHANTOM_NODE_ID")
        self.cfg = cfg
        self.node = check_node_id(cfg.node_id, "node_id")
        self.address = check_address(cfg.address or default_address(self.node), "address")
        # Security on: this node's agent key, the only one allowed to beacon and heartbeat as it.
        self.security = secmod.setup(cfg, f"agent/{self.node}")
        self.security.require(secmod.DISCOVERY, secmod.MEMBERSHIP)
        self.data_dir = Path(cfg.data)
        self.incarnation = next_incarnation(self.data_dir, self.node, time.time_ns() // 1_000_000)
        self.instance = new_instance_id()
        self.started = time.time()
        self.probe = PsutilProbe(self.data_dir, watch_pid)  # exists: the incarnation lives there
        self.sampler = LoadSampler()
        self.load: LoadDocument | None = None
        self.membership_state: str | None = None
        self._ahead_logged = -math.inf
        self.assignments: dict[str, str] = {}
        # The database side: what it should be per shard, and its primary lease.
        self.participation = Participation(cfg, self.node, lambda: self.incarnation)
        self.ctx = zmq.asyncio.Context.instance()
        self._beacons: zmq.asyncio.Socket | None = None
        self._heartbeat_socks: dict[str, zmq.asyncio.Socket] = {}
        # Where we heartbeat, as a hint in beacons: the list if it fits a hint, else the first.
        hb_list = str(cfg.heartbeat)
        self._hb_hint = hb_list if len(hb_list) <= MAX_HINT_VALUE_CHARS else hb_list.split(",")[0]
        self._stopping = asyncio.Event()

    def beacon(self, *, leaving: bool = False) -> Beacon:
        """The beacon this agent sends now."""
        return Beacon(
            node=self.node,
            incarnation=self.incarnation,
            instance=self.instance,
            address=self.address,
            zone=self.cfg.zone,
            weight=float(self.cfg.weight),
            version=_version(),
            started=self.started,
            leaving=leaving,
            hb={"endpoint": self._hb_hint, "interval": float(self.cfg.heartbeat_interval)},
        )

    async def _send_beacon(self, beacon: Beacon) -> None:
        assert self._beacons is not None
        await self._beacons.send_multipart([protocol.BEACON, encode_beacon(beacon)])

    async def beacon_loop(self) -> None:
        """Announce the node every beacon interval.

        A PUB socket drops what it sends before the subscriber's subscription
        has reached it, which on a fresh connection takes a few milliseconds:
        the first beacon was lost more often than not (bench/discovery.py), and
        the node was seen one interval late. Two early repeats close that gap.
        """
        for pause in (0.05, 0.2):
            await self._send_beacon(self.beacon())
            await asyncio.sleep(pause)
        while True:
            await self._send_beacon(self.beacon())
            await asyncio.sleep(self.cfg.beacon_interval)
            # Security on: discovery may authorize our key after we started.
            if self._beacons is not None:
                self.security.retry_refused(self._beacons)

    async def load_loop(self) -> None:
        """Sample the host's load every load interval (psutil runs off the loop)."""
        await asyncio.to_thread(self.probe.prime)
        while True:
            await asyncio.sleep(self.cfg.load_interval)
            readings = await asyncio.to_thread(self.probe.read, time.monotonic())
            self.load = self.sampler.update(readings)

    # --- heartbeats to membership --------------------------------------------------------

    def _open_heartbeats(self, endpoint: str) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Heartbeats are only worth sending now: never queue them for a peer that
        # is not connected (IMMEDIATE) nor let a backlog build up (small HWM).
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.setsockopt(zmq.RCVHWM, 100)
        self.security.client(sock, secmod.MEMBERSHIP)
        sock.connect(endpoint)
        return sock

    def _on_ack(self, ack: dict[str, Any]) -> None:
        code = ack.get("code")
        self.membership_state = ack.get("state")
        target = refutation(self.incarnation, ack)
        if target is not None:
            self._bump(
                target,
                f"membership says {ack.get('state')} ({code}) at incarnation {ack.get('incarnation')}: "
                "refuting past it",
            )
        elif code == "incarnation_ahead":
            now = time.monotonic()
            if now - self._ahead_logged > 60.0:
                self._ahead_logged = now
                logger.error(
                    "membership refuses incarnation {} as too far ahead of its clock: is this host's clock "
                    "fast? ({})",
                    self.incarnation,
                    ack.get("message"),
                )
        elif code == "unknown_node":
            logger.debug("membership does not know us yet; beacons will get us admitted")
        elif ack.get("ok") is False and "error" in ack and code is None:
            logger.warning("membership refused a heartbeat: {}", ack["error"].get("message"))

    def _bump(self, incarnation: int, why: str) -> None:
        if incarnation <= self.incarnation:
            return
        persist_incarnation(self.data_dir, self.node, incarnation)
        logger.warning("incarnation {} -> {}: {}", self.incarnation, incarnation, why)
        self.incarnation = incarnation

    async def heartbeat_loop(self) -> None:
        """Heartbeat every membership instance listed in ``heartbeat``, each on its
        own socket and loop: every instance's detector then stays warm (a follower
        that takes over suspects nobody), and a dead instance delays no other."""
        endpoints = [e.strip() for e in str(self.cfg.heartbeat).split(",") if e.strip()]
        await asyncio.gather(*(self._heartbeat_to(endpoint) for endpoint in endpoints))

    async def _heartbeat_to(self, endpoint: str) -> None:
        """Heartbeat one membership every interval with the latest load; refute suspicion.

        When acks stop (membership restarting, network cut) the socket is
        reopened after a few silent intervals, backing off up to 5 s between
        reopenings so a long outage costs little.
        """
        interval = float(self.cfg.heartbeat_interval)
        sock = self._open_heartbeats(endpoint)
        last_ack = time.monotonic()
        backoff = 3 * interval
        reopened = time.monotonic()
        seq = 0
        try:
            while True:
                seq += 1
                body = {
                    "op": "hb",
                    "node": self.node,
                    "incarnation": self.incarnation,
                    "seq": seq,
                    "load": dict(self.load) if self.load is not None else None,
                }
                # Not connected (IMMEDIATE): nothing to do but try again next interval.
                with contextlib.suppress(zmq.Again):
                    await sock.send_multipart([protocol.HEARTBEAT_HEADER, protocol.pack(body)], zmq.NOBLOCK)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if not await sock.poll(int(left * 1000) + 1):
                        break
                    frames = await sock.recv_multipart()
                    if len(frames) == 2 and frames[0] == protocol.HEARTBEAT_HEADER:
                        try:
                            ack = protocol.unpack(frames[1])
                        except PhantomError:
                            continue
                        if isinstance(ack, dict):
                            last_ack = time.monotonic()
                            backoff = 3 * interval
                            self._on_ack(ack)
                now = time.monotonic()
                if now - last_ack > backoff and now - reopened > backoff:
                    logger.info("no ack from membership at {} for {:.1f} s; reconnecting", endpoint, now - last_ack)
                    sock.close(0)
                    sock = self._open_heartbeats(endpoint)
                    reopened = now
                    backoff = min(backoff * 2, 5.0)
        finally:
            self._heartbeat_socks[endpoint] = sock

    async def _leave_membership(self) -> None:
        socks = list(self._heartbeat_socks.values())
        self._heartbeat_socks.clear()
        goodbye = [
            protocol.HEARTBEAT_HEADER,
            protocol.pack({"op": "leave", "node": self.node, "incarnation": self.incarnation}),
        ]
        for sock in socks:
            with contextlib.suppress(zmq.ZMQError):
                await sock.send_multipart(goodbye, zmq.NOBLOCK)
        for sock in socks:
            with contextlib.suppress(zmq.ZMQError):
                await sock.poll(200)
            sock.close(0)

    # --- shard assignments ----------------------------------------------------------------

    async def assignment_loop(self) -> None:
        """Hold what the shard map assigns to this node, and confirm new replicas.

        Every map goes to the participant (services/agent/participation.py),
        which tells the database what to become and confirms a joining replica
        once the database's copy is complete. The map is followed by the
        shared follower: ``shardmap.changed`` is a hint (or the map itself),
        sharding's ``shardmap.current`` says the map held is current, a poll
        about once a second repairs lost events when those stop, an older
        epoch is refused.
        """
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"shardmap.changed")
        sub.setsockopt(zmq.SUBSCRIBE, CURRENT.encode())
        self.security.connect(sub, self.cfg.events_out)

        async with AsyncClient(self.cfg.broker, timeout=self.cfg.timeout, retries=1, routing="broker") as client:
            # Whole-map reads (to notice an epoch gone backwards) are rarer here than
            # elsewhere: one per agent adds up across a large cluster.
            follower = AsyncMapFollower(client, name=f"agent {self.node}", verify_s=60.0)
            dedupe = Deduplicator()

            async def listen() -> None:
                while True:
                    if not await sub.poll(1000):
                        self.security.retry_refused(sub)
                        continue
                    try:
                        event = protocol.decode_event(await sub.recv_multipart())
                    except PhantomError:
                        follower.poke()
                        continue
                    if not dedupe.accept(event):
                        continue  # once, whichever broker relayed it
                    if event["kind"] == CURRENT:
                        follower.current(event)
                    else:
                        follower.hint(event)

            self.participation.on_confirmed = follower.poke  # the confirmed copy's new role, soon
            tasks = [asyncio.ensure_future(listen()), asyncio.ensure_future(follower.run())]
            try:
                while True:
                    shard_map = follower.map
                    if shard_map is not None:
                        self.assignments = {
                            shard.id: role
                            for _, shard in shard_map.shards()
                            if (role := shard.role_of(self.node)) is not None
                        }
                        self.participation.observe(shard_map)
                    await follower.wait_changed(5.0)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                sub.close(0)

    async def run(self, *extra: Any) -> None:
        """Run the agent's loops until :meth:`stop`; a graceful stop says goodbye."""
        self._beacons = self.ctx.socket(zmq.PUB)
        self._beacons.setsockopt(zmq.LINGER, 1000)
        self._beacons.setsockopt(zmq.SNDHWM, 100)
        # One PUB connected to every discovery instance listed: each beacon reaches all.
        self.security.connect(self._beacons, self.cfg.beacon, secmod.DISCOVERY)
        (logger.info if self.security.enabled else logger.warning)(self.security.describe())
        logger.info(
            "agent {} incarnation {} advertising {} in zone {}; beacons to {}",
            self.node,
            self.incarnation,
            self.address,
            self.cfg.zone,
            self.cfg.beacon,
        )
        loops = (
            self.beacon_loop(),
            self.load_loop(),
            self.heartbeat_loop(),
            self.assignment_loop(),
            self.participation.run(),
            *extra,
        )
        tasks = [asyncio.ensure_future(c) for c in loops]
        try:
            await run_until(self._stopping, tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._leave_membership()
            await self._leave()

    async def _leave(self) -> None:
        if self._beacons is None:
            return
        goodbye = self.beacon(leaving=True)
        for _ in range(_LEAVE_REPEATS):
            await self._send_beacon(goodbye)
            await asyncio.sleep(0.02)
        logger.info("agent {} left", self.node)
        self._beacons.close()  # LINGER lets the goodbyes out
        self._beacons = None

    def stop(self) -> None:
        """Leave gracefully."""
        self._stopping.set()


def run_agent(agent: Agent) -> int:
    """Run ``agent`` until SIGTERM/SIGINT."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(main())
    return 0


__all__ = ["SETTINGS", "Agent", "default_address", "run_agent"]
