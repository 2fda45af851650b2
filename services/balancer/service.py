"""The balancer process: ``select`` a node for a key in one hop, ``release`` leases.

The balancer keeps its own copy of the shard map, followed by the shared
:class:`~phantom_bus.follower.AsyncMapFollower` (an event is a hint, a poll
about once a second repairs a lost one, an older epoch is refused and
published as ``shardmap.regressed``), so a select needs no other service.
What it knows about nodes comes from events: membership states
(``member.*``, versioned by incarnation and change so a late one never
overwrites a newer one) and loads (``member.load``), addresses from
discovery (``node.*``), lifecycles from the manager (``cluster.*``), plus a
snapshot of membership and discovery every couple of seconds.

Clients that route locally load the node table (``routing``) and report
their traffic every few seconds (``report``, answered with the table), so
``stats`` and ``phantom-top`` still see every select.

Several instances. Any number of balancer instances may serve ``select``
side by side; the brokers spread requests over them. Each balances on the
leases it issued itself (as every Envoy proxy balances on its own requests):
its in-flight counts are exact for its own share of the traffic and need
nothing from the others. A lease id starts with the prefix of the instance
that issued it, so a ``release`` that reaches another instance (the broker
chose another worker, or the client failed over to another broker) is
answered at once with status ``unknown`` (as any lease it did not issue) and
passed on over the bus
(``balancer.release``); the issuing instance ends the lease and learns the
latency, the others ignore it. When an instance is lost, its leases and
their in-flight counts go with it: releases for them end nowhere (harmless),
the survivors' counts stay exact, and its share of the traffic moves to them.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

from loguru import logger

from phantom_bus.client import AsyncClient
from phantom_bus.config import Config
from phantom_bus.errors import NoLiveReplica, PhantomError
from phantom_bus.events import Event
from phantom_bus.follower import CURRENT, REGRESSED, AsyncMapFollower, Regression
from phantom_bus.metrics import SelectTimer
from phantom_bus.routing import inputs
from phantom_bus.routing.balancer import Balancer, Candidate
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.security import ADMIN, READ, USE
from phantom_bus.service import Service
from phantom_bus.shardmap import ShardMap

SETTINGS = ("broker", "timeout", "retries", "lease_timeout")

#: Event that passes a release on to the instance that issued the lease.
RELEASE_FORWARD = "balancer.release"

DEFAULT_KEYSPACE = "default"
# Seconds between node snapshots (repairing lost member/node events), ticks, and rate reports.
# Not settings: a snapshot only repairs a lost event; a tick's lateness is small beside the
# lease and ejection times it serves (settings or BalancerConfig); the rate report feeds
# load splits, which look at the core's shard_rate_window_s, the same ten seconds.
_SNAPSHOT = 2.0
_TICK = 0.5
_REPORT = 10.0


class BalancerService:
    """The balancer's shell around one :class:`Balancer` core."""

    def __init__(self, cfg: Config, *, seed: int | None = None) -> None:
        self.cfg = cfg
        # The strategies' random source is seeded here, and the seed logged, so that
        # a run can be replayed; lease ids never come from it (a restart given the
        # same seed would issue the ids of the last run): 32 bits of entropy per run.
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "big")
        lease_prefix = os.urandom(4).hex()
        logger.info("balancer seed {} lease prefix {}", seed, lease_prefix)
        self.core = Balancer(BalancerConfig.from_settings(cfg), random.Random(seed), lease_prefix=lease_prefix)
        self.map: ShardMap | None = None
        self.service = Service("balancer", cfg)
        self.select_timer = SelectTimer()
        self.client = AsyncClient(cfg.broker, timeout=cfg.timeout, retries=1, routing="broker")
        self.follower = AsyncMapFollower(self.client, name="balancer", on_change=self._new_map,
                                         on_regress=self._regressed)
        svc = self.service
        svc.add_operation("select", self.op_select, allow=USE)
        svc.add_operation("release", self.op_release, allow=USE)
        svc.add_operation("stats", self.op_stats, allow=READ)
        svc.add_operation("node_update", self.op_node_update, allow=ADMIN)
        svc.add_operation("forget_node", self.op_forget_node, allow=ADMIN)
        svc.add_operation("routing", self.op_routing, allow=READ)
        svc.add_operation("report", self.op_report, allow=USE)
        svc.subscribe("shardmap.changed", self.on_map_changed)
        svc.subscribe(CURRENT, self.on_map_current)
        svc.subscribe("member.", self.on_member)
        svc.subscribe("node.", self.on_node)
        svc.subscribe("cluster.node_", self.on_lifecycle)
        svc.subscribe(RELEASE_FORWARD, self.on_release_forwarded)
        # The prefix of the lease ids this instance issues (known from its first lease).
        self._lease_prefix: str | None = None
        self.counters = {"releases_forwarded": 0, "forwarded_ended": 0}

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
        started = time.perf_counter()
        try:
            return self._select(key, write, keyspace, strategy, lease)
        finally:
            self.select_timer.observe(time.perf_counter() - started)

    def _select(
        self, key: str | bytes, write: bool, keyspace: str | None, strategy: str | None, lease: bool
    ) -> dict[str, Any]:
        if self.map is None:
            raise NoLiveReplica("the balancer has no shard map yet (is sharding running?)")
        name = keyspace or DEFAULT_KEYSPACE
        shard = self.map.lookup(name, key)
        candidates = [Candidate(r.node, r.role) for r in shard.replicas]
        sel = self.core.select(shard.id, candidates, write=write, strategy=strategy, lease=lease, now=time.monotonic())
        if sel.lease is not None and self._lease_prefix is None:
            self._lease_prefix = _prefix(sel.lease)
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
        the application gets no error; ``status`` says which. A lease another
        instance issued is ``unknown`` here and passed on to that instance."""
        status, events = self.core.end_lease(lease, latency_ms, ok, now=time.monotonic())
        if status == "unknown" and not self._owns(lease):
            self.counters["releases_forwarded"] += 1
            await self.service.publish(RELEASE_FORWARD, {"lease": lease, "latency_ms": latency_ms, "ok": ok})
        if status != "released":
            logger.debug("release of lease {}: {}", lease, status)
        if events:
            await self._publish(events)
        return {"released": lease, "status": status}

    def _owns(self, lease: str) -> bool:
        return self._lease_prefix is not None and _prefix(lease) == self._lease_prefix

    async def on_release_forwarded(self, event: dict[str, Any]) -> None:
        """A release another instance received for a lease this one issued."""
        lease = event.get("lease")
        if not isinstance(lease, str) or not self._owns(lease):
            return
        latency, ok = event.get("latency_ms"), event.get("ok", True)
        try:
            status, events = self.core.end_lease(lease, latency, ok, now=time.monotonic())
        except PhantomError as exc:
            logger.warning("ignored a forwarded release of {}: {}", lease, exc)
            return
        if status == "released":
            self.counters["forwarded_ended"] += 1
        if events:
            await self._publish(events)

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
        """Per node and per shard statistics, the map epoch in use and how it is followed."""
        now = time.monotonic()
        stats = self.core.stats(now)
        stats["epoch"] = None if self.map is None else self.map.epoch
        stats["map"] = self.follower.core.status(now)
        stats["select_seconds"] = self.select_timer.snapshot()
        stats["instance"] = self.service.instance
        stats["forwarding"] = dict(self.counters)
        return stats

    def metrics(self) -> list[Any]:
        """This balancer's own ``phantom_select_seconds`` (read from the metrics thread)."""
        return self.select_timer.families()

    def op_routing(self) -> dict[str, Any]:
        """The node table a locally routing client loads: health inputs per node."""
        return {"epoch": None if self.map is None else self.map.epoch,
                "nodes": self.core.routing_table(time.monotonic())}

    def op_report(
        self, client: str = "", nodes: dict[str, Any] | None = None, shards: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A locally routing client's traffic since its last report; answered with
        the node table, so each report also refreshes the client's node health."""
        now = time.monotonic()
        counted = self.core.absorb(nodes if nodes is not None else {}, shards if shards is not None else {},
                                   now=now)
        return {"epoch": None if self.map is None else self.map.epoch, "counted": counted,
                "nodes": self.core.routing_table(now)}

    # --- events -----------------------------------------------------------------------

    async def _publish(self, events: list[Event]) -> None:
        await self.service.publish_events(events)

    def on_map_changed(self, event: dict[str, Any]) -> None:
        """A hint that a newer epoch exists: the follower reads it."""
        self.follower.hint(event)

    def on_map_current(self, event: dict[str, Any]) -> None:
        """Sharding's epoch: the map held is current, or a newer one exists."""
        self.follower.current(event)

    def _new_map(self, shard_map: ShardMap) -> None:
        self.map = shard_map

    async def _regressed(self, regression: Regression) -> None:
        await self.service.publish(REGRESSED, {**regression.to_wire(), "consumer": "balancer"})

    def _apply(self, updates: list[inputs.Update]) -> None:
        now = time.monotonic()
        for node, fields in updates:
            try:
                self.core.node_update(node, now=now, **fields)
            except PhantomError as exc:
                logger.warning("ignored an update for {}: {}", node, exc)

    def on_member(self, event: dict[str, Any]) -> None:
        """Membership verdicts (versioned) and load digests."""
        self._apply(inputs.from_event(event))

    def on_node(self, event: dict[str, Any]) -> None:
        """Discovery tells addresses and weights."""
        self._apply(inputs.from_event(event))

    def on_lifecycle(self, event: dict[str, Any]) -> None:
        """The manager's lifecycle decisions (draining nodes get no new reads)."""
        self._apply(inputs.from_event(event))

    # --- loops ------------------------------------------------------------------------

    async def _snapshot(self, client: AsyncClient) -> None:
        """Catch up with the current node states (events only tell changes)."""
        try:
            self._apply(inputs.from_discovery(await client.request("discovery", "nodes")))
        except PhantomError as exc:
            logger.debug("discovery snapshot skipped: {}", exc)
        try:
            self._apply(inputs.from_members(await client.request("membership", "members")))
        except PhantomError as exc:
            logger.debug("membership snapshot skipped: {}", exc)

    async def sync_loop(self) -> None:
        """Follow the map; keep the node snapshot current."""
        follower = asyncio.ensure_future(self.follower.run())
        try:
            while True:
                await self._snapshot(self.client)
                await asyncio.sleep(_SNAPSHOT)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await self.client.close()

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


def _prefix(lease: str) -> str:
    """The issuing instance's part of a lease id (``<prefix>-<counter>``)."""
    return lease.rpartition("-")[0]
