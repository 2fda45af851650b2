"""The manager process: turns the other services' events into cluster decisions.

Inputs: ``node.*`` (discovery), ``member.*`` (membership), ``shardmap.changed``
(sharding) and operator commands. The core decides; this shell persists
(through the store the core calls before it answers), publishes the
``cluster.*`` events, and carries out the actions.

Actions run in one ordered queue per target service, each retried with
back-off until it succeeds: order is kept where it matters (for one node, the
balancer hears "suspect" before anything else is done about it), while one
service being down never holds up the others (a dead primary fails over in
sharding even if the balancer is restarting). Every action is idempotent, and
after a restart :meth:`ManagerCore.reconcile` re-derives what was unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from loguru import logger

from phantom_bus.client import AsyncClient
from phantom_bus.config import Config
from phantom_bus.errors import Conflict, NotFound, PhantomError, Refused
from phantom_bus.follower import REGRESSED, AsyncMapFollower, Regression
from phantom_bus.service import Service
from phantom_bus.shardmap import ShardMap
from services.manager.config import ManagerConfig
from services.manager.control import ControlWatch, apply_reasons
from services.manager.core import Action, Decision, ManagerCore
from services.manager.health import Health, shards_from_map
from services.manager.registry import LIFECYCLES, NodeRecord
from services.manager.store import RegistryStore

SETTINGS = ("broker", "timeout", "retries", "auto_join", "dead_delay")

SERVICES = ("broker", "discovery", "membership", "sharding", "balancer", "manager")
_TICK = 1.0
_MAP_POLL = 2.0
_RECONCILE = 30.0
_BACKOFF_MAX = 5.0
_CONTROL_POLL = 2.0
_METRICS_POLL = 5.0


def _already_done(action: Action, err: PhantomError) -> bool:
    """Replies that mean an idempotent action had already taken effect."""
    if isinstance(err, NotFound) and action.op in ("forget", "remove", "remove_node", "forget_node"):
        return True
    return isinstance(err, Conflict) and action.service == "discovery" and action.op == "register"


class ManagerService:
    """The manager's shell around one :class:`ManagerCore`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store = RegistryStore(cfg.data)
        self.core = ManagerCore(
            ManagerConfig(auto_join=cfg.auto_join, rereplication_delay=cfg.dead_delay),
            self.store.registry(),
            persist=self.store.apply,
        )
        self.service = Service("manager", cfg)
        self.client = AsyncClient(cfg.broker, timeout=cfg.timeout, retries=1)
        self._queues: dict[str, asyncio.Queue[Action]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._map: ShardMap | None = None
        self._map_stale = asyncio.Event()
        # The control plane's own health: restarts, sharding's store, our queues' ages.
        self.control = ControlWatch()
        # Replaced whole by metrics_loop, read by the metrics thread.
        self._select_seconds: Any = None
        self._moves: int | None = None
        svc = self.service
        for name in ("status", "nodes", "node", "register", "approve", "drain", "remove"):
            svc.add_operation(name, getattr(self, f"op_{name}"))
        svc.subscribe("node.", self.on_event)
        svc.subscribe("member.", self.on_event)
        svc.subscribe("shardmap.changed", self.on_map_changed)

    # --- carrying out decisions -----------------------------------------------------

    async def _apply(self, decision: Decision) -> Any:
        for event in decision.events:
            logger.bind(node=event.data.get("node")).info("{}: {}", event.kind, event.data.get("reason"))
            await self.service.publish(event.kind, event.data)
        for action in decision.actions:
            self._enqueue(action)
        return decision.value

    def _enqueue(self, action: Action) -> None:
        queue = self._queues.get(action.service)
        if queue is None:
            queue = self._queues[action.service] = asyncio.Queue()
            self._workers.append(asyncio.ensure_future(self._run_queue(action.service, queue)))
        queue.put_nowait(action)
        self.control.queued(action.service, f"{action.service}.{action.op}", time.monotonic())

    async def _run_queue(self, service: str, queue: asyncio.Queue[Action]) -> None:
        while True:
            action = await queue.get()
            delay = 0.1
            while True:
                try:
                    await self.client.request(action.service, action.op, **dict(action.args))
                    logger.debug("{}.{} {} done", action.service, action.op, dict(action.args))
                    break
                except PhantomError as err:
                    if _already_done(action, err):
                        break
                    if not err.retry:
                        logger.warning(
                            "{}.{} {} refused: {} ({})",
                            action.service,
                            action.op,
                            dict(action.args),
                            err,
                            action.reason,
                        )
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
            self.control.finished(service)
            if action.service == "sharding" and action.op == "drain_node":
                # A drain is only judged on maps fetched after it was accepted.
                self._map_stale.set()

    # --- operations -------------------------------------------------------------------

    async def op_status(self) -> dict[str, Any]:
        """The DESIGN.md status document, with down services marked instead of failing."""
        try:
            registered = await self.client.request("broker", "services")
        except PhantomError:
            registered = {}
        up = {name: bool(registered.get(name, {}).get("workers")) for name in SERVICES}
        up["broker"] = up["manager"] = True
        members = None
        if up["membership"]:
            try:
                members = await self.client.request("membership", "members")
            except PhantomError:
                up["membership"] = False
        doc = self.core.status(members, up)
        doc["moves_in_flight"] = None
        if up["sharding"]:
            with contextlib.suppress(PhantomError):
                doc["moves_in_flight"] = len(await self.client.request("sharding", "moves"))
        doc["selects_per_s"] = None
        if up["balancer"]:
            with contextlib.suppress(PhantomError):
                merge_balancer_stats(doc, await self.client.request("balancer", "stats"))
        now = time.monotonic()
        if registered:
            self.control.observe_services(registered, now)
        apply_reasons(doc, self.control.reasons(now), self.control.queue_ages(now))
        return doc

    def op_nodes(self) -> list[dict[str, Any]]:
        """The registry: every node with its lifecycle."""
        return [record.to_dict() for record in self.core.nodes()]

    def op_node(self, node: str) -> dict[str, Any]:
        """One registered node."""
        return self.core.node(node).to_dict()

    async def op_register(self, node: str, address: str, zone: str = "default", weight: float = 1.0) -> Any:
        """Register (or approve) a node by hand: `phantom register`."""
        return await self._apply(self.core.register(node, address, zone, weight, now=time.time()))

    async def op_approve(self, node: str) -> Any:
        """Let a discovered node join when auto-join is off."""
        return await self._apply(self.core.approve(node, now=time.time()))

    async def op_drain(self, node: str) -> Any:
        """Move the node's replicas away, then decommission it: `phantom drain`."""
        return await self._apply(self.core.drain(node, now=time.time()))

    async def op_remove(self, node: str) -> Any:
        """Forget a node; refused while it holds the only live replica of a shard."""
        # Sharding learns of deaths through our queued node_dead actions, so its view can
        # lag membership's: take membership's current verdicts too, and refuse on either
        # view (the union is the safe side).
        with contextlib.suppress(PhantomError):
            members = await self.client.request("membership", "members")
            await self._apply(self.core.sync_members(members, time.time()))
        by_sharding = await self.client.request("sharding", "sole_replicas", node=node)
        sole = sorted({*by_sharding, *self.core.sole_shards(node)})
        self.core.check_remove(node, sole)
        try:
            await self.client.request("sharding", "remove_node", node=node)
        except NotFound:
            pass  # sharding never placed anything on it
        except Refused as err:
            raise Refused(f"sharding refuses to remove {node}: {err.message}", node=node) from None
        return await self._apply(self.core.remove(node, sole, now=time.time()))

    # --- events and loops ---------------------------------------------------------------

    async def on_event(self, event: dict[str, Any]) -> None:
        """Discovery and membership events become decisions."""
        if event.get("kind") == "member.load":
            return
        await self._apply(self.core.on_event(event, time.time()))

    def on_map_changed(self, event: dict[str, Any]) -> None:
        """Fetch the new map in the map loop."""
        self._map_stale.set()

    async def map_loop(self) -> None:
        """Follow the shard map (the shared follower): finish drains, judge health.

        Health is judged on every new map and at least every few seconds on the
        current one (a shard's health also depends on time); ``_map_stale``
        (an event, a drain accepted) asks the follower to read at once."""
        follower = AsyncMapFollower(self.client, name="manager", on_regress=self._map_regressed)
        runner = asyncio.ensure_future(follower.run())
        try:
            while True:
                if self._map_stale.is_set():
                    # A drain is only judged on maps read after it was accepted.
                    self._map_stale.clear()
                    await follower.refresh()
                else:
                    waiter = asyncio.ensure_future(self._map_stale.wait())
                    changed = asyncio.ensure_future(follower.wait_changed(_MAP_POLL))
                    await asyncio.wait({waiter, changed}, return_when=asyncio.FIRST_COMPLETED)
                    for task in (waiter, changed):
                        task.cancel()
                    await asyncio.gather(waiter, changed, return_exceptions=True)
                    if self._map_stale.is_set():
                        continue
                self._map = follower.map
                if self._map is not None:
                    m = self._map
                    try:
                        await self._apply(
                            self.core.observe_shards(shards_from_map(m), now=time.time(), down=m.down, epoch=m.epoch)
                        )
                    except PhantomError as exc:
                        logger.debug("shard map not judged: {}", exc)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    async def _map_regressed(self, regression: Regression) -> None:
        await self.service.publish(REGRESSED, {**regression.to_wire(), "consumer": "manager"})

    async def tick_loop(self) -> None:
        """Timers of the core (the failed label), and anti-entropy now and then."""
        next_reconcile = time.monotonic() + _RECONCILE
        while True:
            await asyncio.sleep(_TICK)
            await self._apply(self.core.tick(time.time()))
            if time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + _RECONCILE
                await self._resync(removals=False)

    async def _resync(self, *, removals: bool) -> None:
        """Catch up with discovery and membership, then re-issue unfinished work."""
        now = time.time()
        try:
            await self._apply(self.core.sync_discovery(await self.client.request("discovery", "nodes"), now))
        except PhantomError as exc:
            logger.debug("discovery sync skipped: {}", exc)
        try:
            await self._apply(self.core.sync_members(await self.client.request("membership", "members"), now))
        except PhantomError as exc:
            logger.debug("membership sync skipped: {}", exc)
        for action in self.core.reconcile(now, removals=removals):
            self._enqueue(action)

    async def startup(self) -> None:
        """After a restart: the registry is loaded; finish what was in flight."""
        await asyncio.sleep(0.5)  # let the broker see us and the subscriptions settle
        await self._resync(removals=True)

    async def control_loop(self) -> None:
        """Watch the control plane itself: worker restarts at the broker, sharding's store."""
        while True:
            with contextlib.suppress(PhantomError):
                self.control.observe_services(await self.client.request("broker", "services"), time.monotonic())
            try:
                self.control.observe_store(await self.client.request("sharding", "health"))
            except PhantomError:
                self.control.forget_store()
            await asyncio.sleep(_CONTROL_POLL)

    async def metrics_loop(self) -> None:
        """What /metrics shows beyond the core's state: the balancer's select
        histogram and sharding's moves in flight, fetched now and then."""
        while True:
            with contextlib.suppress(PhantomError):
                stats = await self.client.request("balancer", "stats")
                if isinstance(stats, dict):
                    self._select_seconds = stats.get("select_seconds")
            try:
                self._moves = len(await self.client.request("sharding", "moves"))
            except PhantomError:
                self._moves = None
            await asyncio.sleep(_METRICS_POLL)

    def metrics(self) -> list[Any]:
        """The cluster view for /metrics (called from the metrics thread: the core is thread-safe)."""
        return cluster_metrics(self.core.health, self.core.nodes(), self.core.epoch, self._moves,
                               self._select_seconds)

    def loops(self) -> list[Any]:
        """The coroutines to run next to the service's own."""
        loops = [self.startup(), self.map_loop(), self.tick_loop(), self.control_loop()]
        if self.cfg.get("metrics"):
            loops.append(self.metrics_loop())
        return loops


def cluster_metrics(
    health: Health, records: Sequence[NodeRecord], epoch: int | None, moves: int | None, select_seconds: Any
) -> list[Any]:
    """The manager's metric families: health, nodes by state and lifecycle, shards by state, epoch."""
    from prometheus_client.core import GaugeMetricFamily

    from phantom_bus import metrics as m

    helps = {s.name: s.help for s in m.SERIES}
    out: list[Any] = []
    colour = GaugeMetricFamily("phantom_cluster_health", helps["phantom_cluster_health"])
    colour.add_metric([], m.HEALTH_VALUES.get(health.status, 2))
    out.append(colour)
    nodes = GaugeMetricFamily("phantom_nodes", helps["phantom_nodes"], labels=["state"])
    states = Counter(r.member or "unknown" for r in records)
    for state in m.NODE_STATES:
        nodes.add_metric([state], states.get(state, 0))
    out.append(nodes)
    lifecycles = GaugeMetricFamily("phantom_node_lifecycle", helps["phantom_node_lifecycle"], labels=["lifecycle"])
    counts = Counter(r.lifecycle for r in records)
    for lifecycle in LIFECYCLES:
        lifecycles.add_metric([lifecycle], counts.get(lifecycle, 0))
    out.append(lifecycles)
    shards = GaugeMetricFamily("phantom_shards", helps["phantom_shards"], labels=["state"])
    flagged = {*health.unavailable_shards, *health.under_replicated_shards, *health.moving_shards,
               *health.degraded_shards}
    for state, value in (
        ("ok", health.total - len(flagged)),
        ("under_replicated", health.under_replicated),
        ("unavailable", health.unavailable),
        ("moving", health.moving),
        ("degraded", health.degraded),
    ):
        shards.add_metric([state], value)
    out.append(shards)
    if epoch is not None:
        ep = GaugeMetricFamily("phantom_shardmap_epoch", helps["phantom_shardmap_epoch"])
        ep.add_metric([], epoch)
        out.append(ep)
    if moves is not None:
        mv = GaugeMetricFamily("phantom_moves_in_flight", helps["phantom_moves_in_flight"])
        mv.add_metric([], moves)
        out.append(mv)
    out.extend(m.histogram_from_snapshot("phantom_select_seconds", select_seconds))
    return out


def merge_balancer_stats(doc: dict[str, Any], stats: Any) -> None:
    """Add the balancer's view to a status document: per node the leases in flight,
    picks and p99 latency, and the cluster's selects per second."""
    if not isinstance(stats, dict):
        return
    per_node = _map(stats.get("nodes"))
    for row in doc.get("nodes", []):
        node = per_node.get(row.get("id"))
        if not isinstance(node, dict):
            continue
        latency = _map(node.get("latency_ms"))
        row["inflight"] = node.get("in_flight")
        row["picks"] = node.get("picks")
        row["p99_ms"] = latency.get("p99")
    rates = [s.get("rate") for s in _map(stats.get("shards")).values() if isinstance(s, dict)]
    doc["selects_per_s"] = round(sum(r for r in rates if isinstance(r, int | float)), 3)


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
