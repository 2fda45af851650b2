"""The discovery process: beacons in, node.* events out, the node table on request.

The shell binds a SUB socket for beacons, feeds every beacon to
:class:`DiscoveryTable` with the monotonic clock, ticks it a few times per
beacon interval, and publishes the events the table returns.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import zmq
from loguru import logger

from phantom_bus import protocol
from phantom_bus import security as secmod
from phantom_bus.config import Config
from phantom_bus.errors import BadRequest
from phantom_bus.events import Event
from phantom_bus.security import ADMIN, READ
from phantom_bus.service import Service
from phantom_bus.wire import LoopSocket
from services.discovery.beacon import decode_beacon
from services.discovery.core import DROP_MALFORMED, DiscoveryConfig, DiscoveryTable

#: Drop reason (in ``stats``) of a beacon whose sender's key is not the agent key of
#: the node it announces (security on).
DROP_UNAUTHORISED = "unauthorised"

SETTINGS = ("beacon", "beacon_interval", "beacon_expiry", "discovery_forget")


class Discovery:
    """Discovery's shell around one :class:`DiscoveryTable`."""

    def __init__(self, cfg: Config) -> None:
        core_cfg = DiscoveryConfig(
            beacon_interval=cfg.beacon_interval,
            expiry=cfg.beacon_expiry,
            forget_after=cfg.discovery_forget,
        )
        core_cfg.validate()
        cfg.bind("beacon")  # one endpoint of its own (agents take the list): refused at start otherwise
        self.cfg = cfg
        self.table = DiscoveryTable(core_cfg)
        self.service = Service("discovery", cfg)
        self._beacons: LoopSocket | None = None
        svc = self.service
        svc.add_operation("nodes", self.op_nodes, allow=READ)
        svc.add_operation("node", self.op_node, allow=READ)
        svc.add_operation("register", self.op_register, allow=ADMIN)
        svc.add_operation("remove", self.op_remove, allow=ADMIN)
        svc.add_operation("stats", self.op_stats, allow=READ)

    # --- operations -------------------------------------------------------------------

    def op_nodes(self) -> list[dict[str, Any]]:
        """Every node in the table."""
        return self.table.nodes(time.monotonic())

    def op_node(self, node: str) -> dict[str, Any]:
        """One node; ``not_found`` for an unknown id."""
        return self.table.node(node, time.monotonic())

    async def op_register(
        self, node: str, address: str, zone: str = "default", weight: float = 1.0
    ) -> dict[str, Any]:
        """Register a node that cannot beacon; it stays until removed."""
        now = time.monotonic()
        await self._publish(self.table.register(node, address, zone, weight, now))
        return self.table.node(node, now)

    async def op_remove(self, node: str) -> dict[str, Any]:
        """Forget a node; ``not_found`` for an unknown id."""
        await self._publish(self.table.remove(node, time.monotonic()))
        return {"removed": node}

    def op_stats(self) -> dict[str, Any]:
        """Beacon counters: accepted, dropped by reason, conflicts; and this instance's name."""
        return {**self.table.stats(), "instance": self.service.instance}

    # --- loops ------------------------------------------------------------------------

    async def _publish(self, events: list[Event]) -> None:
        await self.service.publish_events(events)

    async def beacon_loop(self) -> None:
        """Receive beacons until cancelled; bad ones are counted, never fatal."""
        security = self.service.security
        sock = self.service.sync_socket(zmq.SUB, hwm=100_000)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        security.server(sock, secmod.DOMAIN_BEACON)
        sock.bind(self.cfg.bind("beacon"))
        self._beacons = beacons = LoopSocket(sock)
        logger.info("listening for beacons on {}", self.cfg.bind("beacon"))
        burst = 0
        try:
            while True:
                sender: str | None = None
                if security.enabled:
                    got = beacons.recv_nowait_as()
                    frames, sender = got if got is not None else (None, None)
                else:
                    frames = beacons.recv_nowait()
                if frames is None:
                    burst = 0
                    await beacons.wait()
                    continue
                burst += 1
                if burst % 256 == 0:
                    # A steady stream never empties the socket: yield now and then so
                    # requests, the broker heartbeat and the expiry tick still run.
                    await asyncio.sleep(0)
                now = time.monotonic()
                if len(frames) != 2 or frames[0] != protocol.BEACON:
                    self.table.count_dropped(DROP_MALFORMED, f"{len(frames)} frames")
                    continue
                if security.enabled:
                    events = self._receive_from(sender, frames[1], now)
                else:
                    events = self.table.receive(frames[1], now)
                if events:
                    await self._publish(events)
        finally:
            beacons.close()

    def _receive_from(self, sender: str | None, payload: bytes, now: float) -> list[Event]:
        """Security on: take a beacon only from the agent key of the node it announces."""
        try:
            beacon = decode_beacon(payload)
        except BadRequest:
            return self.table.receive(payload, now)  # the table counts why it is bad
        if not secmod.speaks_for(sender, beacon.node) or not self.service.security.knows(sender):
            self.table.count_dropped(DROP_UNAUTHORISED, f"key {sender} may not announce node {beacon.node}")
            return []
        return self.table.observe(beacon, now)

    async def tick_loop(self) -> None:
        """Expire silent nodes: a few ticks per beacon interval."""
        period = self.cfg.beacon_interval / 4
        while True:
            await asyncio.sleep(period)
            await self._publish(self.table.tick(time.monotonic()))

    def loops(self) -> list[Any]:
        """The coroutines to run next to the service's own."""
        return [self.beacon_loop(), self.tick_loop()]
