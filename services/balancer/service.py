"""The balancer process: ``select`` a node for a key in one hop, ``release`` leases.

The balancer keeps its own copy of the shard map (fetched from sharding,
refreshed on every ``shardmap.changed`` and every few seconds in case an
event was missed), so a select needs no other service. What it knows about
nodes comes from events: membership states (``member.*``) and loads
(``member.load``), addresses from discovery (``node.*``), lifecycles from the
manager (``cluster.*``), plus a snapshot of each at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

from loguru import logger

from phantom_bus.client import AsyncClient
from phantom_bus.config import Config
from phantom_bus.errors import NoLiveReplica, PhantomError
from phantom_bus.events import Event
from phantom_bus.service import Service
from phantom_bus.shardmap import ShardMap
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.routing.balancer import Balancer, Candidate

SETTINGS = ("broker", "timeout", "retries", "lease_timeout")

DEFAULT_KEYSPACE = "default"
# Seconds between map refreshes without an event, snapshot syncs, and rate reports.
_MAP_REFRESH = 5.0
_TICK = 0.5
_REPORT = 10.0

_LIFECYCLE_EVENTS = {
    "cluster.node_registered": "joining",
    "cluster.node_active": "active",
    "cluster.node_draining": "draining",
    "cluster.node_decommissioned": "decommissioned",
}


class BalancerService:
    """The balancer's shell around one :class:`Balancer` core."""

    def __init__(self, cfg: Config, *, seed: int | None = None) -> None:
        self.cfg = cfg
        self.core = Balancer(BalancerConfig(lease_timeout_s=float(cfg.lease_timeout)), random.Random(seed))
        self.map: ShardMap | None = None
        self.service = Service("balancer", cfg)
        self._map_stale = asyncio.Event()
        svc = self.service
        svc.add_operation("select", self.op_select)
        svc.add_operation("release", self.op_release)
        svc.add_operation("stats", self.op_stats)
        svc.add_operation("node_update", self.op_node_update)
        svc.add_operation("forget_node", self.op_forget_node)
        svc.subscribe("shardmap.changed", self.on_map_changed)
        svc.subscribe("member.", self.on_member)
        svc.subscribe("node.", self.on_node)
        svc.subscribe("cluster.node_", self.on_lifecycle)

    # --- operations -------------------------------------------------------------------

    def op_select(
        self,
        key: str | bytes,
        write: bool = False,
        keyspace: str | None = None,
        strategy: str | None = None,
        lease: bool = True,
    ) -> dict[str, Any]:
        """The node to use for ``key``: the primary for a write, a healthy replica for a read."""
        if self.map is None:
            raise NoLiveReplica("the balancer has no shard map yet (is sharding running?)")
        name = keyspace or DEFAULT_KEYSPACE
        shard = self.map.lookup(name, key)
        candidates = [Candidate(r.node, r.role) for r in shard.replicas]
        sel = self.core.select(shard.id, candidates, write=write, strategy=strategy, lease=lease, now=time.monotonic())
        return {
            "key": key,
            "keyspace": name,
            "shard": shard.id,
            "node": sel.node,
            "address": sel.address or "",
            "epoch": self.map.epoch,
            "role": sel.role,
            "lease": sel.lease,
            "strategy": sel.strategy,
            "panic": sel.panic,
        }

    async def op_release(self, lease: str, latency_ms: float | None = None, ok: bool = True) -> dict[str, Any]:
        """End a lease and feed the request's latency and outcome into the node's statistics.

        Always answered as done: a lease that is no longer open (released
        before, expired, or from before a restart) has ended either way, so
        the application gets no error; ``status`` says which."""
        status, events = self.core.end_lease(lease, latency_ms, ok, now=time.monotonic())
        if status != "released":
            logger.debug("release of lease {}: {}", lease, status)
        if events:
            await self._publish(events)
        return {"released": lease, "status": status}

    def op_node_update(
        self,
        node: str,
        state: str | None = None,
        lifecycle: str | None = None,
        address: str | None = None,
        weight: float | None = None,
    ) -> dict[str, Any]:
        """What the manager decided about a node (it orders these before other actions)."""
        self.core.node_update(
            node, state=state, lifecycle=lifecycle, address=address, weight=weight, now=time.monotonic()
        )
        return {"node": node}

    def op_forget_node(self, node: str) -> dict[str, Any]:
        """Drop a removed node and its leases."""
        return {"node": node, "leases_dropped": self.core.forget_node(node, now=time.monotonic())}

    def op_stats(self) -> dict[str, Any]:
        """Per node and per shard statistics, and the map epoch in use."""
        stats = self.core.stats(time.monotonic())
        stats["epoch"] = None if self.map is None else self.map.epoch
        return stats

    # --- events -----------------------------------------------------------------------

    async def _publish(self, events: list[Event]) -> None:
        for event in events:
            logger.bind(node=event.data.get("node")).info("{} ({})", event.kind, event.data.get("reason"))
            await self.service.publish(event.kind, event.data)

    def on_map_changed(self, event: dict[str, Any]) -> None:
        """A newer epoch exists: fetch it (in the refresh loop, not in the event path)."""
        epoch = event.get("epoch")
        if self.map is None or not isinstance(epoch, int) or epoch > self.map.epoch:
            self._map_stale.set()

    def _update(self, node: Any, **fields: Any) -> None:
        if not isinstance(node, str):
            return
        try:
            self.core.node_update(node, now=time.monotonic(), **{k: v for k, v in fields.items() if v is not None})
        except PhantomError as exc:
            logger.warning("ignored an update for {}: {}", node, exc)

    def on_member(self, event: dict[str, Any]) -> None:
        """Membership verdicts and load digests."""
        kind = event.get("kind", "")
        if kind == "member.load":
            loads = event.get("loads")
            for node, load in (loads if isinstance(loads, dict) else {}).items():
                self._update(node, load=_load(load))
        elif kind.startswith("member."):
            self._update(event.get("node"), state=kind.split(".", 1)[1])

    def on_node(self, event: dict[str, Any]) -> None:
        """Discovery tells addresses and weights."""
        if event.get("kind") in ("node.discovered", "node.updated"):
            weight = event.get("weight")
            self._update(
                event.get("node"),
                address=event.get("address"),
                weight=weight if isinstance(weight, int | float) and weight > 0 else None,
            )

    def on_lifecycle(self, event: dict[str, Any]) -> None:
        """The manager's lifecycle decisions (draining nodes get no new reads)."""
        lifecycle = _LIFECYCLE_EVENTS.get(str(event.get("kind")))
        if lifecycle is not None:
            self._update(event.get("node"), lifecycle=lifecycle)

    # --- loops ------------------------------------------------------------------------

    async def _refresh_map(self, client: AsyncClient) -> None:
        since = None if self.map is None else self.map.epoch
        doc = await client.request("sharding", "map", since_epoch=since)
        if doc is None:
            return
        fresh = ShardMap.from_wire(doc)
        if self.map is None or fresh.epoch > self.map.epoch:
            self.map = fresh
            logger.info("shard map epoch {}", fresh.epoch)

    async def _snapshot(self, client: AsyncClient) -> None:
        """Catch up with the current node states (events only tell changes)."""
        try:
            for doc in await client.request("discovery", "nodes"):
                self._update(doc.get("id"), address=doc.get("address"))
        except PhantomError as exc:
            logger.debug("discovery snapshot skipped: {}", exc)
        try:
            for m in await client.request("membership", "members"):
                self._update(m.get("id"), state=m.get("state"), load=_load(m.get("load")))
        except PhantomError as exc:
            logger.debug("membership snapshot skipped: {}", exc)

    async def sync_loop(self) -> None:
        """Keep the map and the node snapshot current."""
        async with AsyncClient(self.cfg.broker, timeout=self.cfg.timeout, retries=1) as client:
            while True:
                await self._snapshot(client)
                try:
                    await self._refresh_map(client)
                except PhantomError as exc:
                    logger.debug("shard map refresh failed: {}", exc)
                self._map_stale.clear()
                # Until the first map arrives every select fails: ask again soon.
                wait = _MAP_REFRESH if self.map is not None else 0.2
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._map_stale.wait(), wait)

    async def tick_loop(self) -> None:
        """Expire leases, restore ejected nodes, report select rates to sharding."""
        async with AsyncClient(self.cfg.broker, timeout=self.cfg.timeout, retries=1) as client:
            next_report = time.monotonic() + _REPORT
            while True:
                await asyncio.sleep(_TICK)
                now = time.monotonic()
                await self._publish(self.core.tick(now))
                if now >= next_report:
                    next_report = now + _REPORT
                    rates = self.core.shard_rates(now)
                    if rates:
                        try:
                            await client.request("sharding", "report_load", rates=rates)
                        except PhantomError as exc:
                            logger.debug("could not report shard rates: {}", exc)

    def loops(self) -> list[Any]:
        """The coroutines to run next to the service's own."""
        return [self.sync_loop(), self.tick_loop()]


def _load(doc: Any) -> dict[str, Any] | None:
    """The part of an agent's load document the balancer uses, stamped on our clock."""
    if not isinstance(doc, dict):
        return None
    cpu, mem = doc.get("cpu"), doc.get("mem")
    if not isinstance(cpu, int | float) or not isinstance(mem, int | float):
        return None
    return {"cpu": float(cpu), "mem": float(mem)}
