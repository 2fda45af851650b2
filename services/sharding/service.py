"""The sharding process: owner of the shard map, its placement and its moves.

Several instances may run; one leads (a lease in the store, see
:mod:`services.leadership`). Only the leader holds a :class:`ShardingCore`,
changes the map and runs the timers; followers follow the committed map in
the store (a watch is a hint to re-read it). Since a follower may lag the
leader by a moment, it serves ``map`` only when it holds a map newer than
the reader's ``since_epoch``, and leaves ``lookup`` to the leader, so no
reader ever sees an epoch go back; it answers the operator reads (``shards``,
``moves``, ``nodes``, ``health``, ``sole_replicas``) from its committed
state. Anything else gets the retryable ``not_leader`` error naming the
leader; a client's retry reaches the leader through the broker.

Every change goes through :meth:`ShardingService._commit`: the core computes
it, the new epoch and the state needed to resume its moves are committed to
the store in one fenced compare-and-swap, and only then is
``shardmap.changed`` (with ``epoch`` and the leader's ``term``) published and
the new map served. If the commit fails (store unreachable, disk full or
read-only, a newer leader) the core is rolled back to the last committed
state, so memory never runs ahead of the store, and the caller gets the
retryable ``store_unavailable`` error with the store's own message (or
``not_leader`` once fenced).

Planning and encoding run in a worker thread (the core is thread-safe): a
large cluster takes a noticeable part of a second and must not stall the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any, TypeVar

from loguru import logger

from phantom_bus.config import Config
from phantom_bus.errors import BadRequest, PhantomError, ServiceUnavailable
from phantom_bus.events import Event
from phantom_bus.follower import CURRENT
from phantom_bus.protocol import Encoded
from phantom_bus.security import ADMIN, READ, Rule
from phantom_bus.service import Service
from phantom_bus.shardmap import KeyspaceDoc, RouteDoc, ShardMap
from phantom_bus.store import CasFailed, Compacted, Fenced, Store, StoreError
from services.leadership import Leadership
from services.sharding.config import ShardingConfig
from services.sharding.core import CHANGED, Result, ShardingCore
from services.sharding.store import LEGACY_FILE, PREFIX, Committed, MapStore, Prepared
from services.shared_store import StoreHealth, changes, open_shared_store

#: An agent confirms only its own replicas and renews only its own node's primary lease.
OWN_NODE = Rule(frozenset({"agent", "operator", "service"}), own="node")

SETTINGS = ("dead_delay", "store", "store_prefix", "leader_ttl", "instance", "primary_lease", "lease_drift")

T = TypeVar("T")
#: Largest encoded map pushed inside ``shardmap.changed`` (bytes). 64 KiB holds the
#: map of several hundred shards; every subscriber receives it, and the broker
#: keeps its recent events, so a larger map is announced only (readers ask for it).
INLINE_MAP_MAX = 64 * 1024
#: Seconds between the leader's ``shardmap.current`` events (the epoch it serves).
#: Followers poll only when they have heard none for a few of these, so the cost
#: of every reader's poll becomes one small event a second.
CURRENT_EVERY = 1.0
# Seconds between the leader's ticks of the core's timers (dead_delay and the primary
# leases are settings, seconds long at their defaults, so half a second late is noise):
# not a setting for that reason.
_TICK = 0.5
# Longest pause (s) between retries of a failed store read or takeover (doubling from
# 0.1 s); shorter than the manager's because sharding's map is what every select waits
# for after a failover. Not a setting: it only bounds how soon a recovered store is used.
_BACKOFF_MAX = 2.0


def _prepare(core: ShardingCore, previous: Committed | None, term: int) -> Prepared:
    """Snapshot ``core`` and encode the commit (CPU-bound: runs in a worker thread)."""
    shard_map, state = core.snapshot(time.monotonic())
    return MapStore.prepare(shard_map, state, previous=previous, term=term, wall=time.time())


def resume(committed: Committed, config: ShardingConfig, now: float, wall: float) -> ShardingCore:
    """A core that carries on from ``committed``, its timers advanced by the wall-clock
    time that passed since the save (the saver may have been another process or host)."""
    elapsed = max(0.0, wall - committed.wall)
    core = ShardingCore.restore(committed.map, committed.state, now - elapsed, config)
    # Agents may hold primary leases granted by the previous leader up to now:
    # the lease rule counts from this moment, not from the save.
    core.leases.started = now
    return core


class ShardingService:
    """Sharding's shell: leader or follower over the shared store."""

    def __init__(self, cfg: Config, store: Store | None = None) -> None:
        self.cfg = cfg
        self.config = ShardingConfig(
            dead_delay=cfg.dead_delay, primary_lease=cfg.primary_lease, lease_drift=cfg.lease_drift
        )
        self.store = store if store is not None else open_shared_store(cfg, LEGACY_FILE)
        self.maps = MapStore(self.store)
        self.leadership = Leadership(self.store, "sharding", cfg)
        self.store_health = StoreHealth()
        # The leader's core; None on a follower (and while taking over).
        self.core: ShardingCore | None = None
        # The last epoch known to be committed: what readers are served.
        self.committed: Committed | None = None
        self._reader_core: tuple[int, ShardingCore] | None = None  # a follower's read-only core, per revision
        self._write = asyncio.Lock()
        self._loaded = asyncio.Event()
        # The leader's last epoch announced in shardmap.changed, with its term:
        # what its shardmap.current says (never an epoch readers were not told of).
        self._announced: tuple[int, int] | None = None
        self.service = Service("sharding", cfg)
        self.service.leader_probe = lambda: self.leadership.is_leader
        operations: tuple[tuple[Rule, dict[str, Callable[..., Any]]], ...] = (
            (READ, {"lookup": self.op_lookup, "map": self.op_map, "shards": self.op_shards, "moves": self.op_moves,
                    "nodes": self.op_nodes, "health": self.op_health, "sole_replicas": self.op_sole_replicas}),
            (ADMIN, {"create_keyspace": self.op_create_keyspace, "split": self.op_split, "merge": self.op_merge,
                     "add_node": self.op_add_node, "remove_node": self.op_remove_node,
                     "drain_node": self.op_drain_node, "node_dead": self.op_node_dead,
                     "node_alive": self.op_node_alive, "report_load": self.op_report_load,
                     "report_keys": self.op_report_keys}),
            (OWN_NODE, {"confirm": self.op_confirm, "renew": self.op_renew}),
        )  # fmt: skip
        for allow, handlers in operations:
            for name, handler in handlers.items():
                self.service.add_operation(name, handler, allow=allow)

    # --- the committed map -----------------------------------------------------------

    @property
    def published(self) -> ShardMap:
        """The committed map; ``service_unavailable`` (retryable) before the first read."""
        if self.committed is None:
            raise ServiceUnavailable("sharding has not read the shard map from the store yet; retry")
        return self.committed.map

    def _adopt(self, committed: Committed) -> bool:
        """Serve ``committed`` if it is not older than what is served; False (and a loud
        log line) for an epoch that went back."""
        old = self.committed
        if old is not None and committed.epoch < old.epoch:
            logger.error(
                "the store holds epoch {} but epoch {} was already committed: refusing to serve an older map",
                committed.epoch,
                old.epoch,
            )
            return False
        self.committed = committed
        self._loaded.set()
        return True

    def _reader(self) -> ShardingCore:
        """A core for queries: the leader's own, else one restored from the committed state."""
        core = self.core
        if core is not None:
            return core
        committed = self.committed
        if committed is None:
            raise ServiceUnavailable("sharding has not read the shard map from the store yet; retry")
        cached = self._reader_core
        if cached is None or cached[0] != committed.revision:
            core = resume(committed, self.config, time.monotonic(), time.time())
            self._reader_core = cached = (committed.revision, core)
        return cached[1]

    def _store_failed(self, exc: BaseException, what: str) -> None:
        if self.store_health.failed(exc, time.monotonic()):
            logger.error("store: {} failed: {}", what, exc)
        else:
            logger.debug("store: {} still failing: {}", what, exc)

    def _store_ok(self) -> None:
        if not self.store_health.ok:
            logger.info("store: commits work again")
        self.store_health.succeeded()

    # --- leading ------------------------------------------------------------------------

    async def _lead(self) -> None:
        """Elected: read the committed state, resume it (or create the first map), serve."""
        delay = 0.1
        while True:
            try:
                async with self._write:
                    await self._take_over()
                break
            except (StoreError, CasFailed) as exc:
                if isinstance(exc, Fenced):
                    return  # deposed before we even started; the elector notices too
                self._store_failed(exc, "taking over")
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
        try:
            # Lead until deposed (this task is cancelled then), saying which epoch is
            # served: followers that hear it need not poll, and one that missed a
            # shardmap.changed learns of it within a second.
            while True:
                await asyncio.sleep(CURRENT_EVERY)
                if self.core is not None and self._announced is not None:
                    epoch, term = self._announced
                    if term == self.leadership.term:
                        await self.service.publish(CURRENT, {"epoch": epoch, "term": term})
        finally:
            self.core = None

    async def _take_over(self) -> None:
        term = self.leadership.term
        fence = self.leadership.fence
        committed = await self.maps.load()
        if committed is None:
            core = ShardingCore(self.config)
            shard_map, state = core.snapshot(time.monotonic())
            prepared = await asyncio.to_thread(
                MapStore.prepare, shard_map, state, previous=None, term=term, wall=time.time()
            )
            committed = await self.maps.commit(prepared, fence)
            logger.info("new shard map at epoch {} (term {})", committed.epoch, term)
        else:
            core = await asyncio.to_thread(resume, committed, self.config, time.monotonic(), time.time())
            logger.info("shard map resumed at epoch {} (term {})", committed.epoch, term)
        self._store_ok()
        self._adopt(committed)
        self.core = core
        # Readers re-read on this hint: the first map, or the same one under a new term.
        await self.service.publish(
            CHANGED, _with_map({"epoch": committed.epoch, "term": term, "reason": "leader.elected"}, committed.blob)
        )
        self._announced = (committed.epoch, term)

    async def _commit(self, call: Callable[[ShardingCore], Result[T]]) -> T:
        """Run a mutation off the loop, commit the new epoch (fenced CAS), then publish it.

        On any commit failure the core is rolled back to the committed state.
        """
        async with self._write:  # one writer at a time: epochs are committed in order
            core = self.core
            if core is None or not self.leadership.is_leader:
                raise self.leadership.not_leader()
            term = self.leadership.term
            fence = self.leadership.fence
            result = await asyncio.to_thread(call, core)
            if not result.events:
                return result.value
            prepared = await asyncio.to_thread(_prepare, core, self.committed, term)
            shard_map = prepared.map
            try:
                committed = await self.maps.commit(prepared, fence)
            except Fenced as exc:
                self.core = None
                logger.warning("epoch {} refused, this instance no longer leads: {}", shard_map.epoch, exc)
                raise self.leadership.not_leader() from None
            except CasFailed as exc:
                # Someone else committed (should not happen under a fence): start from theirs.
                logger.error("epoch {} refused, the stored map moved on: {}; re-reading it", shard_map.epoch, exc)
                await self._rollback(reload=True)
                raise StoreError(f"the shard map changed in the store meanwhile; re-read it, retry: {exc}") from None
            except StoreError as exc:
                self._store_failed(exc, f"committing epoch {shard_map.epoch}")
                await self._rollback(reload=False)
                raise StoreError(
                    f"epoch {shard_map.epoch} could not be committed and was rolled back; retry: {exc}"
                ) from None
            self._store_ok()
            self._adopt(committed)

            def with_term(event: Event) -> dict[str, Any]:
                data = {**event.data, "term": term}
                return _with_map(data, committed.blob) if event.kind == CHANGED else data

            await self.service.publish_events(
                result.events, prepare=with_term, bind="epoch",
                describe=lambda kind, data: f"{kind} ({data.get('reason')}, term {term})",
            )
            self._announced = (committed.epoch, term)
            return result.value

    async def _rollback(self, *, reload: bool) -> None:
        """Throw away what the core did since the last commit (lock held)."""
        committed = self.committed
        if reload:
            try:
                fresh = await self.maps.load()
            except StoreError as exc:
                self._store_failed(exc, "re-reading the shard map")
                fresh = None
            if fresh is not None and self._adopt(fresh):
                committed = fresh
            elif fresh is not None and committed is not None:
                # The store went back (restored from an older snapshot): keep the newer
                # epoch already served and commit it on top, so the map never goes back.
                committed = dataclasses.replace(committed, epoch_revision=fresh.epoch_revision)
                self.committed = committed
                logger.error("the store went back to epoch {}; epoch {} is committed on top of it", fresh.epoch,
                             committed.epoch)
        if committed is None:
            self.core = None
            return
        self.core = await asyncio.to_thread(resume, committed, self.config, time.monotonic(), time.time())

    async def _probe(self) -> None:
        """While commits fail: re-commit the current (rolled back) state, so that the store
        is known to work again as soon as it does, even when nothing changes."""
        async with self._write:
            core, committed = self.core, self.committed
            if core is None or committed is None or not self.leadership.is_leader:
                return
            prepared = await asyncio.to_thread(_prepare, core, committed, self.leadership.term)
            if prepared.map.epoch != committed.epoch:
                return
            try:
                fresh = await self.maps.commit(prepared, self.leadership.fence)
            except StoreError as exc:
                self._store_failed(exc, "probing")
                return
            except CasFailed:
                return  # the commit path sorts this out
            self._store_ok()
            self._adopt(fresh)

    # --- following ----------------------------------------------------------------------

    async def follow_loop(self) -> None:
        """Read the committed map, then re-read it whenever the store says it changed."""
        delay = 0.1
        while True:
            if self.core is not None and self.leadership.is_leader:
                # The leader's own commits are what the store holds; a newer leader's
                # writes reach it as Fenced on its next commit.
                await self.leadership.wait_following()
                continue
            try:
                committed = await self.maps.load()
                if not self.leadership.is_leader:
                    self._store_ok()
                start = 1
                if committed is not None:
                    start = committed.revision + 1
                    if (self.committed is None or committed.revision > self.committed.revision) and self._adopt(
                        committed
                    ):
                        # A warm core for the queries a follower answers, built off the loop.
                        core = await asyncio.to_thread(resume, committed, self.config, time.monotonic(), time.time())
                        self._reader_core = (committed.revision, core)
                async for _change in changes(self.store, PREFIX, start):
                    break  # a hint: re-read the whole committed epoch (level-triggered)
                delay = 0.1
            except Compacted as exc:
                logger.info("store watch fell behind ({}); re-reading the map", exc)
            except StoreError as exc:
                if not self.leadership.is_leader:
                    self._store_failed(exc, "reading the shard map")
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    async def tick_loop(self) -> None:
        """The leader advances the core's timers (dead-node delays, copy timeouts, hand-offs)."""
        while True:
            await asyncio.sleep(_TICK)
            if self.core is None or not self.leadership.is_leader:
                continue
            if not self.store_health.ok:
                await self._probe()
            try:
                await self._commit(lambda core: core.tick(time.monotonic()))
            except PhantomError as exc:
                logger.debug("tick not committed: {}", exc)

    def loops(self) -> list[Any]:
        """The coroutines to run next to the service's own."""
        return [
            self.leadership.run(),
            self.leadership.while_leading("sharding", self._lead),
            self.follow_loop(),
            self.tick_loop(),
        ]

    # --- queries --------------------------------------------------------------------------

    def op_lookup(self, key: str | bytes, keyspace: str = "default") -> RouteDoc:
        """The shard owning ``key`` and its replicas (the leader's map: see :meth:`op_map`)."""
        core = self.core
        if core is None or not self.leadership.is_leader:
            raise self.leadership.not_leader()
        route = self.published.route(keyspace, key).to_wire()
        core.lookup(keyspace, key)  # records the key for split points
        return route

    def op_map(self, since_epoch: int | None = None) -> Encoded | None:
        """The whole map, or nil when it is not newer than ``since_epoch``.

        The reply is the committed map's encoding, made once per epoch (it is
        what the store holds), never re-encoded per request.

        A follower may lag the leader by a moment, and a reader that got epoch
        N from the leader must never get N-1 from a follower next. So a
        follower answers only with a map newer than ``since_epoch``; anything
        else (no ``since_epoch``, or nothing newer here) is ``not_leader``, and
        the retry reaches the leader.
        """
        leading = self.core is not None and self.leadership.is_leader
        blob = map_reply(self.committed, since_epoch, leading, self.leadership.not_leader)
        return None if blob is None else Encoded(blob)

    def op_shards(self) -> list[dict[str, Any]]:
        """One row per shard (``phantom shards``), with each replica's role."""
        shard_map = self.published
        rows = self._reader().shard_rows(shard_map)
        for row in rows:
            shard = shard_map.shard(row["shard"])
            row["roles"] = {r.node: r.role for r in shard.replicas}
        return rows

    def op_moves(self) -> list[dict[str, Any]]:
        """Moves not finished yet."""
        return self._reader().pending_moves(time.monotonic())

    def op_nodes(self) -> list[dict[str, Any]]:
        """The nodes sharding places replicas on, with their counts and dead-delay state."""
        return self._reader().nodes()

    def op_health(self) -> dict[str, Any]:
        """Shard counts (total, under-replicated, unavailable), the epoch, the store and the leader."""
        core = self._reader()
        return {
            **core.health(),
            "epoch": self.published.epoch,
            "shortfall": core.shortfall(),
            "store": self.store_health.to_wire(time.monotonic()),
            "leader": self.leadership.describe(),
        }

    def op_sole_replicas(self, node: str) -> list[str]:
        """Shards whose only live replica is on ``node``."""
        return self._reader().sole_replicas(node)

    # --- changes ------------------------------------------------------------------------

    async def op_create_keyspace(
        self,
        name: str,
        kind: str = "hash",
        shards: int | None = None,
        split_points: list[str | bytes] | None = None,
        rf: int | None = None,
        slots: int | None = None,
    ) -> KeyspaceDoc:
        """Create a key space at run time."""
        now = time.monotonic()
        ks = await self._commit(lambda c: c.create_keyspace(name, kind, shards, split_points, rf, slots, now=now))
        return ks.to_wire()

    async def op_split(self, shard: str, at: str | bytes | int | None = None, keyspace: str | None = None) -> Any:
        """Split a shard (range: at a key or the middle of observed keys; hash: at a slot)."""
        now = time.monotonic()
        name = keyspace or self._keyspace_of(shard)
        low, high = await self._commit(lambda c: c.split(name, shard, at, now=now))
        return {"shards": [low.id, high.id], "epoch": self.published.epoch}

    async def op_merge(self, shard: str, other: str, keyspace: str | None = None) -> Any:
        """Merge two adjacent shards (at once if colocated, else after moving replicas)."""
        now = time.monotonic()
        name = keyspace or self._keyspace_of(shard)
        merged = await self._commit(lambda c: c.merge(name, shard, other, now=now))
        return {"shard": merged.shard, "absorbed": merged.absorbed, "done": merged.done, "epoch": self.published.epoch}

    def _keyspace_of(self, shard: str) -> str:
        return self.published.locate(shard)[0].name

    async def op_add_node(self, node: str, zone: str = "default", weight: float = 1.0) -> dict[str, Any]:
        """Place replicas on a node (or update its zone/weight)."""
        now = time.monotonic()
        return await self._commit(lambda c: c.add_node(node, zone, weight, now=now))

    async def op_drain_node(self, node: str) -> dict[str, Any]:
        """Move every replica off a node, safely, under the move caps."""
        now = time.monotonic()
        return await self._commit(lambda c: c.drain_node(node, now=now))

    async def op_remove_node(self, node: str) -> dict[str, Any]:
        """Forget a node; refused while it holds the only live replica of a shard."""
        now = time.monotonic()
        return await self._commit(lambda c: c.remove_node(node, now=now))

    async def op_node_dead(self, node: str) -> dict[str, Any]:
        """Fail over the node's primaries now; re-create its replicas after the delay."""
        now = time.monotonic()
        return await self._commit(lambda c: c.node_dead(node, now))

    async def op_node_alive(self, node: str) -> dict[str, Any]:
        """The node is back: within the delay nothing moves."""
        now = time.monotonic()
        return await self._commit(lambda c: c.node_alive(node, now))

    async def op_confirm(self, shard: str, node: str, epoch: int | None = None) -> dict[str, Any]:
        """An agent's copy of ``shard`` is complete; ``epoch``: the map epoch it was asked for."""
        now = time.monotonic()
        return await self._commit(lambda c: c.confirm(shard, node, now, epoch))

    async def op_renew(
        self, node: str, incarnation: int = 0, seq: int = 0, holding: list[str] | None = None
    ) -> dict[str, Any]:
        """An agent renews its primary lease (services/sharding/leases.py)."""
        now = time.monotonic()
        return await self._commit(lambda c: c.renew(node, incarnation, seq, holding or [], now))

    async def op_report_load(self, rates: dict[str, float]) -> dict[str, Any]:
        """Select rates per shard from the balancer (load-based splits)."""
        if not isinstance(rates, dict):
            raise BadRequest("rates is a map shard -> requests per second")
        now = time.monotonic()
        return await self._commit(lambda c: c.report_load(rates, now))

    async def op_report_keys(self, keys: list[str | bytes], keyspace: str = "default") -> int:
        """Keys seen elsewhere, for split-point sampling."""
        return await self._commit(lambda c: c.report_keys(keyspace, keys))


def map_reply(
    committed: Committed | None, since_epoch: int | None, leading: bool, not_leader: Callable[[], PhantomError]
) -> bytes | None:
    """What the ``map`` operation answers (see :meth:`ShardingService.op_map`): the
    committed map's bytes, or None when it is not newer than ``since_epoch``.
    ``bad_request`` for a malformed ``since_epoch``; ``not_leader()`` on a
    follower that has nothing newer to give; ``service_unavailable`` on a leader
    that has not read the map yet."""
    if since_epoch is not None and (type(since_epoch) is not int or since_epoch < 0):
        raise BadRequest(f"since_epoch must be a non-negative integer, got {since_epoch!r}")
    if committed is None or (not leading and (since_epoch is None or committed.epoch <= since_epoch)):
        if not leading:
            raise not_leader()
        raise ServiceUnavailable("sharding has not read the shard map from the store yet; retry")
    if since_epoch is not None and committed.epoch <= since_epoch:
        return None
    return committed.blob


def _with_map(data: dict[str, Any], blob: bytes) -> dict[str, Any]:
    """A ``shardmap.changed`` body with the committed map pushed in it when it is
    small enough (``map``: the bytes the ``map`` operation answers): readers then
    take it from the event instead of all asking for it at once."""
    return {**data, "map": blob} if len(blob) <= INLINE_MAP_MAX else data
