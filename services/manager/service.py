"""The manager process: turns the other services' events into cluster decisions.

Inputs: ``node.*`` (discovery), ``member.*`` (membership), ``shardmap.changed``
(sharding) and operator commands. The core decides; this shell commits the
decision's registry changes to the store (one fenced compare-and-swap
transaction), then publishes the ``cluster.*`` events and carries out the
actions. A commit that fails rolls the core back to the committed registry
and the caller gets the retryable ``store_unavailable`` error.

Several instances may run; one leads (a lease in the store). Only the leader
decides, acts and follows the other services; followers keep the registry
from the store warm (a watch is a hint to re-read it), answer ``nodes`` and
``node`` from it, and answer everything else with the retryable
``not_leader`` error naming the leader, which a client's retry carries to
the leader through the broker.

Actions run in one ordered, bounded queue per target service (a full queue
is a clear ``overloaded`` error, and the level-triggered loops below redo
what was not queued): order is kept where it matters (for one node, the
balancer hears "suspect" before anything else is done about it), while one
service being down never holds up the others. Each action is retried with
back-off; a failover (``sharding.node_dead``, and ``node_alive`` for a node
that came back) is retried for as long as the verdict behind it stands,
whatever the error, so a failing sharding store delays a failover but never
drops it. Other actions end at a definitive answer (bad request, refused,
not found, conflict) and otherwise give up after a bounded number of
attempts, ``internal`` included (logged); reconciliation re-issues them.

Level-triggered: every second the leader re-reads membership's verdicts
(from membership's leader, newest term only) and compares sharding's ``down``
set with them, so a lost ``member.dead`` costs about a second, not a resync
period. The re-replication delay has one timer, sharding's; the manager
labels a node ``failed`` when sharding reports it ``expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from loguru import logger

from phantom_bus.client import AsyncClient
from phantom_bus.config import Config
from phantom_bus.errors import NotFound, Overloaded, PhantomError, Refused
from phantom_bus.follower import CURRENT, REGRESSED, AsyncMapFollower, Regression
from phantom_bus.leader import read_leader
from phantom_bus.security import ADMIN, READ, Rule
from phantom_bus.service import Service
from phantom_bus.shardmap import ShardMap
from phantom_bus.status import LEADING, control_block
from phantom_bus.store import CasFailed, Compacted, Fenced, Store, StoreError
from services.leadership import Leadership
from services.manager.config import ManagerConfig
from services.manager.control import ControlWatch, apply_reasons
from services.manager.core import Action, Decision, ManagerCore, MembershipTerm
from services.manager.health import Health, shards_from_map
from services.manager.registry import LIFECYCLES, NodeRecord, Registry
from services.manager.store import LEGACY_FILE, PREFIX, RegistryStore
from services.shared_store import StoreHealth, changes, open_shared_store

SETTINGS = ("broker", "timeout", "retries", "auto_join", "dead_delay", "store", "store_prefix", "leader_ttl",
            "instance")

SERVICES = ("broker", "discovery", "membership", "sharding", "balancer", "manager")
# The loop periods below are not settings: each only bounds how long a lost event
# or a failed call costs (events and replies do the work, these repair), so no
# operator decision depends on them. Seconds between ticks of the core's timers
# (their delays, e.g. dead_delay, are settings; a tick late by one second is noise
# beside them).
_TICK = 1.0
# Seconds a drain waits for a pushed map before reading one itself.
_MAP_POLL = 2.0
# Seconds between the leader's reads of membership's verdicts and sharding's node
# table: about one heartbeat, so a lost event costs about that much.
_LEVEL = 1.0
# Seconds between reads of discovery's whole table (a lost node.discovered).
_DISCOVERY_SYNC = 5.0
# Seconds between anti-entropy rounds re-issuing what the registry implies: MAX_ATTEMPTS
# back-offs of an action fit in it, so one round ends before the next begins.
_RECONCILE = 30.0
# Longest pause (s) between retries of a failed action or store read (doubling from
# 0.1 s): a recovered service or store is used again within it.
_BACKOFF_MAX = 5.0
# Actions waiting per target service (count). A burst of a whole cluster's events
# (a few per node) fits many times over; beyond it the queue is stuck, and new
# work is refused loudly rather than piling up without bound.
QUEUE_LIMIT = 4096
# Seconds between looks at the broker's workers and sharding's store, and between
# fetches of what /metrics shows from other services: displays, not decisions.
_CONTROL_POLL = 2.0
_METRICS_POLL = 5.0
# How long a scrape waits for the event loop to read the core: below Prometheus's
# default scrape timeout (10 s), so a stuck loop fails the scrape instead of hanging it.
_METRICS_READ_TIMEOUT = 5.0



def _key(action: Action) -> tuple[str, str, str | None]:
    return action.service, action.op, action.node


class ManagerService:
    """The manager's shell around one :class:`ManagerCore`: leader or follower."""

    def __init__(self, cfg: Config, store: Store | None = None) -> None:
        self.cfg = cfg
        self.store = store if store is not None else open_shared_store(cfg, LEGACY_FILE)
        self.registry_store = RegistryStore(self.store)
        self.leadership = Leadership(self.store, "manager", cfg)
        self.store_health = StoreHealth()
        self.core = ManagerCore(ManagerConfig(auto_join=cfg.auto_join, rereplication_delay=cfg.dead_delay))
        self.service = Service("manager", cfg)
        self.service.leader_probe = lambda: self.leadership.is_leader
        self.client = AsyncClient(cfg.broker, timeout=cfg.timeout, retries=1)
        # With several brokers, status asks each one for its name and table (one client per broker:
        # self.client fails over, so it only ever talks to one).
        brokers = [e.strip() for e in str(cfg.broker).split(",") if e.strip()]
        self._brokers = (
            [AsyncClient(e, timeout=min(1.0, float(cfg.timeout)), retries=1, routing="broker") for e in brokers]
            if len(brokers) > 1
            else []
        )
        # One round of asking them at a time (a client is not shared by concurrent calls), and
        # its answer reused for a second, so phantom-top's polling costs the brokers little.
        self._brokers_lock = asyncio.Lock()
        self._brokers_seen: tuple[float, list[Any], list[str]] | None = None
        self._decide = asyncio.Lock()
        self._queues: dict[str, asyncio.Queue[Action]] = {}
        self._pending: set[tuple[str, str, str | None]] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._loaded_revision = 0
        self._member_term = MembershipTerm()
        self._map: ShardMap | None = None
        self._map_stale = asyncio.Event()
        # Built by map_loop (it reads through self.client as it is then); events before it are moot.
        self._follower: AsyncMapFollower | None = None
        self.counters = {"overloaded": 0, "dropped": 0, "stale_verdicts": 0}
        # The control plane's own health: restarts, sharding's store, our queues' ages.
        self.control = ControlWatch()
        # Replaced whole by metrics_loop, read by the metrics thread.
        self._select_seconds: Any = None
        self._moves: int | None = None
        # The loop the core lives on, for the metrics thread (set by metrics_loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        svc = self.service
        operations: tuple[tuple[Rule, dict[str, Callable[..., Any]]], ...] = (
            (READ, {"status": self.op_status, "nodes": self.op_nodes, "node": self.op_node,
                    "health": self.op_health}),
            (ADMIN, {"register": self.op_register, "approve": self.op_approve, "drain": self.op_drain,
                     "remove": self.op_remove}),
        )  # fmt: skip
        for allow, handlers in operations:
            for name, handler in handlers.items():
                svc.add_operation(name, handler, allow=allow)
        svc.subscribe("node.", self.on_event)
        svc.subscribe("member.", self.on_event)
        svc.subscribe("shardmap.changed", self.on_map_changed)
        svc.subscribe(CURRENT, self.on_map_current)

    # --- deciding: commit first, then act -------------------------------------------

    def _leading(self) -> None:
        if not self.leadership.is_leader:
            raise self.leadership.not_leader()

    async def _decide_and_apply(self, decide: Callable[[], Decision]) -> Any:
        """Run one core call, commit its registry changes, then publish and act on it.

        Leader only (``not_leader`` otherwise). A failed commit rolls the core's
        registry back to the committed one and raises ``store_unavailable``.
        """
        self._leading()
        async with self._decide:
            self._leading()
            fence = self.leadership.fence
            decision = decide()
            if decision.changes:
                try:
                    await self.registry_store.apply(decision.changes, fence)
                except Fenced:
                    self.core.reset_registry(self.registry_store.committed())
                    raise self.leadership.not_leader() from None
                except (StoreError, CasFailed) as exc:
                    self.core.reset_registry(self.registry_store.committed())
                    if self.store_health.failed(exc, time.monotonic()):
                        logger.error("store: registry commit failed: {}", exc)
                    raise StoreError(f"the registry change was not committed and was rolled back; retry: {exc}") \
                        from None
                if not self.store_health.ok:
                    logger.info("store: registry commits work again")
                self.store_health.succeeded()
        return await self._apply(decision)

    async def _apply(self, decision: Decision) -> Any:
        await self.service.publish_events(decision.events)
        for action in decision.actions:
            self._enqueue(action)
        return decision.value

    def _enqueue(self, action: Action) -> None:
        """Queue ``action`` behind the others for its service; the same action already
        waiting is not queued twice. :class:`Overloaded` when the queue is full."""
        key = _key(action)
        if key in self._pending and action.failover:
            return
        queue = self._queues.get(action.service)
        if queue is None:
            queue = self._queues[action.service] = asyncio.Queue(QUEUE_LIMIT)
            self._workers.append(asyncio.ensure_future(self._run_queue(action.service, queue)))
        try:
            queue.put_nowait(action)
        except asyncio.QueueFull:
            self.counters["overloaded"] += 1
            logger.error("{} actions for {} are waiting; refusing {}.{} {} (it is re-derived later)",
                         QUEUE_LIMIT, action.service, action.service, action.op, dict(action.args))
            raise Overloaded(
                f"the manager's queue for {action.service} is full ({QUEUE_LIMIT} actions): "
                f"{action.service} is not keeping up; retry later",
                service=action.service,
            ) from None
        self._pending.add(key)
        self.control.queued(action.service, f"{action.service}.{action.op}", time.monotonic())

    def _superseded(self, action: Action) -> bool:
        """A failover action whose verdict no longer stands (the node came back, or died again)."""
        down = self.core.is_down(action.node or "")
        if action.op == "node_dead":
            return down is False
        return down is True

    async def _run_queue(self, service: str, queue: asyncio.Queue[Action]) -> None:
        while True:
            action = await queue.get()
            try:
                await self._carry_out(action)
            finally:
                self._pending.discard(_key(action))
                self.control.finished(service)
            if action.service == "sharding" and action.op == "drain_node":
                # A drain is only judged on maps fetched after it was accepted.
                self._map_stale.set()

    async def _carry_out(self, action: Action) -> None:
        """Send ``action`` until it is done; see the module docstring for when it gives up."""
        failover = action.failover
        delay = 0.1
        attempt = 0
        while self.leadership.is_leader:
            if failover and self._superseded(action):
                logger.info("{}.{} {} superseded by a newer verdict", action.service, action.op, dict(action.args))
                return
            try:
                await self.client.request(action.service, action.op, **dict(action.args))
                logger.debug("{}.{} {} done", action.service, action.op, dict(action.args))
                return
            except PhantomError as err:
                if action.done_by(err):
                    return
                attempt += 1
                what = f"{action.service}.{action.op} {dict(action.args)}"
                if action.gives_up(err, attempt):
                    self.counters["dropped"] += 1
                    logger.warning("{} given up after {} attempt(s): {} ({}) ({})", what, attempt, err, err.code,
                                   action.reason)
                    return
                (logger.warning if attempt == 1 or attempt % 10 == 0 else logger.debug)(
                    "{} failed (attempt {}): {} ({}); retrying in {:.1f} s", what, attempt, err, err.code, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def _stop_acting(self) -> None:
        """Deposed: drop the queued actions (the next leader re-derives them)."""
        for task in self._workers:
            task.cancel()
        self._workers.clear()
        self._queues.clear()
        self._pending.clear()

    # --- operations -------------------------------------------------------------------

    async def op_status(self) -> dict[str, Any]:
        """The status document (`phantom status --json`), with down services marked instead of failing."""
        self._leading()
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
        doc["control"] = await self._control(registered)
        return doc

    async def _control(self, registered: dict[str, Any]) -> dict[str, Any]:
        """The ``control`` part: the store, the leaders from their records in it, and the
        instances of every service as the broker's table lists them."""
        leaders: dict[str, Any] = {}
        for name in LEADING:
            try:
                holder = await read_leader(self.store, name)
            except PhantomError:
                leaders[name] = None
                continue
            leaders[name] = None if holder is None else {"instance": holder.instance, "term": holder.term}
        tables, names = await self._broker_tables(registered)
        return control_block(self.store.name, leaders, tables, names)

    async def _broker_tables(self, registered: dict[str, Any]) -> tuple[list[Any], list[str]]:
        """The ``services`` tables and instance names of the brokers that answer (all at once;
        a dead broker costs one short timeout, not one per broker)."""
        if not self._brokers:
            try:
                ping = await self.client.request("broker", "ping")
            except PhantomError:
                return [registered], []
            name = ping.get("instance") if isinstance(ping, dict) else None
            return [registered], [name] if isinstance(name, str) else []
        async with self._brokers_lock:
            seen = self._brokers_seen
            if seen is None or time.monotonic() - seen[0] > 1.0:
                replies = await asyncio.gather(*(c.request("broker", "stats") for c in self._brokers),
                                               return_exceptions=True)  # fmt: skip
                tables: list[Any] = []
                names: list[str] = []
                for reply in replies:
                    if isinstance(reply, dict):
                        tables.append(reply.get("services"))
                        if isinstance(reply.get("instance"), str):
                            names.append(reply["instance"])
                seen = self._brokers_seen = (time.monotonic(), tables, names)
        return [registered, *seen[1]], list(seen[2])

    def op_health(self) -> dict[str, Any]:
        """The manager itself: leader, store, queues."""
        return {
            "leader": self.leadership.describe(),
            "store": self.store_health.to_wire(time.monotonic()),
            "queues": {name: q.qsize() for name, q in self._queues.items()},
            "queue_limit": QUEUE_LIMIT,
            "membership_term": self._member_term.term,
            **self.counters,
        }

    def op_nodes(self) -> list[dict[str, Any]]:
        """The registry: every node with its lifecycle."""
        return [record.to_dict() for record in self.core.nodes()]

    def op_node(self, node: str) -> dict[str, Any]:
        """One registered node."""
        return self.core.node(node).to_dict()

    async def op_register(self, node: str, address: str, zone: str = "default", weight: float = 1.0) -> Any:
        """Register (or approve) a node by hand: `phantom register`."""
        return await self._decide_and_apply(lambda: self.core.register(node, address, zone, weight, now=time.time()))

    async def op_approve(self, node: str) -> Any:
        """Let a discovered node join when auto-join is off."""
        return await self._decide_and_apply(lambda: self.core.approve(node, now=time.time()))

    async def op_drain(self, node: str) -> Any:
        """Move the node's replicas away, then decommission it: `phantom drain`."""
        return await self._decide_and_apply(lambda: self.core.drain(node, now=time.time()))

    async def op_remove(self, node: str) -> Any:
        """Forget a node; refused while it holds the only live replica of a shard."""
        self._leading()
        # Sharding learns of deaths through our queued node_dead actions, so its view can
        # lag membership's: take membership's current verdicts too, and refuse on either
        # view (the union is the safe side).
        with contextlib.suppress(PhantomError):
            await self._read_verdicts()
        by_sharding = await self.client.request("sharding", "sole_replicas", node=node)
        sole = sorted({*by_sharding, *self.core.sole_shards(node)})
        self.core.check_remove(node, sole)
        try:
            await self.client.request("sharding", "remove_node", node=node)
        except NotFound:
            pass  # sharding never placed anything on it
        except Refused as err:
            raise Refused(f"sharding refuses to remove {node}: {err.message}", node=node) from None
        return await self._decide_and_apply(lambda: self.core.remove(node, sole, now=time.time()))

    # --- events and loops (leader) -------------------------------------------------------

    def _fresh_term(self, term: Any) -> bool:
        """False for a verdict of an older membership term than one already seen."""
        if self._member_term.fresh(term):
            return True
        self.counters["stale_verdicts"] += 1
        return False

    async def on_event(self, event: dict[str, Any]) -> None:
        """Discovery and membership events become decisions (leader only)."""
        kind = event.get("kind")
        if kind == "member.load" or not self.leadership.is_leader:
            return
        if isinstance(kind, str) and kind.startswith("member.") and not self._fresh_term(event.get("term")):
            logger.info("ignored {} for {} from membership term {} (term {} leads)", kind, event.get("node"),
                        event.get("term"), self._member_term.term)
            return
        try:
            await self._decide_and_apply(lambda: self.core.on_event(event, time.time()))
        except PhantomError as exc:
            # Nothing is lost: the level-triggered loop re-reads the verdicts within a second.
            logger.warning("{} for {} not decided now: {}", kind, event.get("node"), exc)

    def on_map_changed(self, event: dict[str, Any]) -> None:
        """A new map: taken from the event when it carries one, else read by the follower."""
        if self._follower is not None:
            self._follower.hint(event)

    def on_map_current(self, event: dict[str, Any]) -> None:
        """Sharding's epoch: the map held is current (no poll), or a newer one exists."""
        if self._follower is not None:
            self._follower.current(event)

    async def map_loop(self) -> None:
        """Follow the shard map (the shared follower): finish drains, judge health.

        Health is judged on every new map and at least every few seconds on the
        current one (a shard's health also depends on time). Events reach the
        follower directly; ``_map_stale`` (a drain accepted) asks it to read at
        once, since a drain is only judged on maps read after it."""
        follower = self._follower = AsyncMapFollower(self.client, name="manager", on_regress=self._map_regressed)
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
                        await self._decide_and_apply(
                            lambda m=m: self.core.observe_shards(  # type: ignore[misc]
                                shards_from_map(m), now=time.time(), down=m.down, epoch=m.epoch
                            )
                        )
                    except PhantomError as exc:
                        logger.debug("shard map not judged: {}", exc)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    async def _map_regressed(self, regression: Regression) -> None:
        await self.service.publish(REGRESSED, {**regression.to_wire(), "consumer": "manager"})

    async def _read_verdicts(self) -> None:
        """Membership's leader's verdicts, decided on if they are of the newest term."""
        doc = await self.client.request("membership", "verdicts")
        if not isinstance(doc, dict) or not isinstance(doc.get("members"), list):
            return
        if self._fresh_term(doc.get("term")):
            await self._decide_and_apply(lambda: self.core.sync_members(doc["members"], time.time()))

    async def level_loop(self) -> None:
        """Every second: membership's verdicts, sharding's dead-delay timers and its
        ``down`` set, each compared with the registry (a lost event costs a second)."""
        next_discovery = 0.0
        while True:
            try:
                await self._read_verdicts()
            except PhantomError as exc:
                logger.debug("membership verdicts not read: {}", exc)
            try:
                nodes = await self.client.request("sharding", "nodes")
                expired = [n["node"] for n in nodes if isinstance(n, dict) and n.get("expired")]
                await self._decide_and_apply(lambda e=expired: self.core.tick(time.time(), e))  # type: ignore[misc]
            except PhantomError as exc:
                logger.debug("sharding's node table not read: {}", exc)
            m = self._map
            if m is not None:
                for action in self.core.drift(m.down):
                    with contextlib.suppress(Overloaded):
                        self._enqueue(action)
            if time.monotonic() >= next_discovery:
                next_discovery = time.monotonic() + _DISCOVERY_SYNC
                try:
                    docs = await self.client.request("discovery", "nodes")
                    await self._decide_and_apply(lambda d=docs: self.core.sync_discovery(d, time.time()))  # type: ignore[misc]
                except PhantomError as exc:
                    logger.debug("discovery sync skipped: {}", exc)
            await asyncio.sleep(_LEVEL)

    async def reconcile_loop(self) -> None:
        """Right after taking over: re-issue everything the registry implies (removals
        too); then every so often without removals, as anti-entropy."""
        await asyncio.sleep(0.5)  # let the broker see us and the subscriptions settle
        removals = True
        while True:
            try:
                for action in self.core.reconcile(time.time(), removals=removals):
                    self._enqueue(action)
            except Overloaded:
                pass  # logged by _enqueue; the next round tries again
            removals = False
            await asyncio.sleep(_RECONCILE)

    async def _lead(self) -> None:
        """Elected: load the committed registry, then decide and act until deposed."""
        delay = 0.1
        while True:
            try:
                await self._reload()
                break
            except StoreError as exc:
                if self.store_health.failed(exc, time.monotonic()):
                    logger.error("store: cannot read the registry to take over: {}", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
        self._member_term = MembershipTerm()
        loops = (self.reconcile_loop(), self.map_loop(), self.level_loop(), self.control_loop())
        tasks = [asyncio.ensure_future(c) for c in loops]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self._stop_acting()

    async def _reload(self) -> None:
        """Read the registry from the store into the core."""
        async with self._decide:
            records, tombstones, revision = await self.registry_store.load()
            self.core.reset_registry(Registry.restore(records, tombstones, self.core.config.max_tombstones))
            self._loaded_revision = revision
        self.store_health.succeeded()

    async def follow_loop(self) -> None:
        """Not leading: keep the registry as committed in the store (warm for a takeover)."""
        delay = 0.1
        while True:
            if self.leadership.is_leader:
                await self.leadership.wait_following()
                continue
            try:
                await self._reload()
                async for _change in changes(self.store, PREFIX, self._loaded_revision + 1):
                    break  # a hint: re-read (level-triggered)
                delay = 0.1
            except Compacted:
                continue
            except StoreError as exc:
                if self.store_health.failed(exc, time.monotonic()):
                    logger.warning("store: cannot follow the registry: {}", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

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
        self._loop = asyncio.get_running_loop()
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

    async def _cluster_view(self) -> tuple[Health, list[NodeRecord], int | None]:
        return self.core.health, self.core.nodes(), self.core.epoch

    def metrics(self) -> list[Any]:
        """The cluster view for /metrics. Called from the metrics thread: the core is
        single-threaded, so its state is read on the event loop, not from this thread."""
        loop = self._loop
        if loop is None:
            return []  # metrics_loop has not started: no cluster view yet
        view = asyncio.run_coroutine_threadsafe(self._cluster_view(), loop)
        health, nodes, epoch = view.result(timeout=_METRICS_READ_TIMEOUT)
        return cluster_metrics(health, nodes, epoch, self._moves, self._select_seconds)

    def loops(self) -> list[Any]:
        """The coroutines to run next to the service's own."""
        loops = [self.leadership.run(), self.leadership.while_leading("manager", self._lead), self.follow_loop()]
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
