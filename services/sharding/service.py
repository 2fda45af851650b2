"""The sharding process: owner of the shard map, its placement and its moves.

Every operation that changes the map goes through :meth:`ShardingService._commit`:
the new epoch (and the state needed to resume its moves) is committed to
SQLite first, and only then is ``shardmap.changed`` published, so a SIGKILL
at any moment restarts from exactly the last published epoch.

Mutations run in a worker thread (the core is thread-safe): planning a large
cluster takes a noticeable part of a second and must not stall the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from loguru import logger

from phantom_bus.config import Config
from phantom_bus.errors import BadRequest
from phantom_bus.service import Service
from phantom_bus.shardmap import ShardMap
from services.sharding.config import ShardingConfig
from services.sharding.core import Result, ShardingCore
from services.sharding.store import MapStore

SETTINGS = ("dead_delay",)

T = TypeVar("T")
_TICK = 0.5


class ShardingService:
    """Sharding's shell around one :class:`ShardingCore` and its :class:`MapStore`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.config = ShardingConfig(dead_delay=cfg.dead_delay)
        self.store = MapStore(cfg.data)
        loaded = self.store.load()
        now = time.monotonic()
        # What readers are served: the last map *committed to disk*. The core runs
        # ahead of it while a save is in progress; serving that would let a SIGKILL
        # take the epoch clients saw backwards.
        self.published: ShardMap
        if loaded is None:
            self.core = ShardingCore(self.config)
            self.published, state = self.core.snapshot(now)
            self.store.save(self.published, state)
            logger.info("new shard map at epoch {}", self.published.epoch)
        else:
            self.published = loaded[0]
            self.core = ShardingCore.restore(loaded[0], loaded[1], now, self.config)
            logger.info("shard map restored at epoch {}", self.core.epoch)
        self._write = asyncio.Lock()
        self.service = Service("sharding", cfg)
        svc = self.service
        for name in (
            "lookup", "map", "shards", "moves", "nodes", "health", "sole_replicas",
            "create_keyspace", "split", "merge", "add_node", "remove_node", "drain_node",
            "node_dead", "node_alive", "confirm", "report_load", "report_keys",
        ):  # fmt: skip
            svc.add_operation(name, getattr(self, f"op_{name}"))

    async def _commit(self, call: Callable[[], Result[T]]) -> T:
        """Run a mutation off the loop, persist the new epoch, then publish it."""
        async with self._write:  # one writer at a time: epochs are saved in order
            result = await asyncio.to_thread(call)
            if result.events:
                shard_map, state = self.core.snapshot(time.monotonic())
                await asyncio.to_thread(self.store.save, shard_map, state)
                self.published = shard_map
                for event in result.events:
                    logger.bind(epoch=event.data.get("epoch")).info("{} ({})", event.kind, event.data.get("reason"))
                    await self.service.publish(event.kind, event.data)
            return result.value

    # --- queries --------------------------------------------------------------------------

    def op_lookup(self, key: str | bytes, keyspace: str = "default") -> dict[str, Any]:
        """The shard owning ``key`` and its replicas."""
        self.core.lookup(keyspace, key)  # records the key for split points
        return self.published.route(keyspace, key).to_wire()

    def op_map(self, since_epoch: int | None = None) -> dict[str, Any] | None:
        """The whole map, or nil when it is not newer than ``since_epoch``."""
        if since_epoch is not None and (type(since_epoch) is not int or since_epoch < 0):
            raise BadRequest(f"since_epoch must be a non-negative integer, got {since_epoch!r}")
        shard_map = self.published
        return None if since_epoch is not None and shard_map.epoch <= since_epoch else shard_map.to_wire()

    def op_shards(self) -> list[dict[str, Any]]:
        """One row per shard (``phantom shards``), with each replica's role."""
        shard_map = self.published
        rows = self.core.shard_rows(shard_map)
        for row in rows:
            shard = shard_map.shard(row["shard"])
            row["roles"] = {r.node: r.role for r in shard.replicas}
        return rows

    def op_moves(self) -> list[dict[str, Any]]:
        """Moves not finished yet."""
        return self.core.pending_moves(time.monotonic())

    def op_nodes(self) -> list[dict[str, Any]]:
        """The nodes sharding places replicas on, with their counts."""
        return self.core.nodes()

    def op_health(self) -> dict[str, Any]:
        """Shard counts: total, under-replicated, unavailable; and the epoch."""
        return {**self.core.health(), "epoch": self.published.epoch, "shortfall": self.core.shortfall()}

    def op_sole_replicas(self, node: str) -> list[str]:
        """Shards whose only live replica is on ``node``."""
        return self.core.sole_replicas(node)

    # --- changes ------------------------------------------------------------------------

    async def op_create_keyspace(
        self,
        name: str,
        kind: str = "hash",
        shards: int | None = None,
        split_points: list[str | bytes] | None = None,
        rf: int | None = None,
        slots: int | None = None,
    ) -> dict[str, Any]:
        """Create a key space at run time."""
        now = time.monotonic()
        ks = await self._commit(lambda: self.core.create_keyspace(name, kind, shards, split_points, rf, slots, now))
        return ks.to_wire()

    async def op_split(self, shard: str, at: str | bytes | int | None = None, keyspace: str | None = None) -> Any:
        """Split a shard (range: at a key or the middle of observed keys; hash: at a slot)."""
        now = time.monotonic()
        name = keyspace or self._keyspace_of(shard)
        low, high = await self._commit(lambda: self.core.split(name, shard, at, now))
        return {"shards": [low.id, high.id], "epoch": self.core.epoch}

    async def op_merge(self, shard: str, other: str, keyspace: str | None = None) -> Any:
        """Merge two adjacent shards (at once if colocated, else after moving replicas)."""
        now = time.monotonic()
        name = keyspace or self._keyspace_of(shard)
        merged = await self._commit(lambda: self.core.merge(name, shard, other, now))
        return {"shard": merged.shard, "absorbed": merged.absorbed, "done": merged.done, "epoch": self.core.epoch}

    def _keyspace_of(self, shard: str) -> str:
        return self.published.locate(shard)[0].name

    async def op_add_node(self, node: str, zone: str = "default", weight: float = 1.0) -> dict[str, Any]:
        """Place replicas on a node (or update its zone/weight)."""
        now = time.monotonic()
        return await self._commit(lambda: self.core.add_node(node, zone, weight, now))

    async def op_drain_node(self, node: str) -> dict[str, Any]:
        """Move every replica off a node, safely, under the move caps."""
        now = time.monotonic()
        return await self._commit(lambda: self.core.drain_node(node, now))

    async def op_remove_node(self, node: str) -> dict[str, Any]:
        """Forget a node; refused while it holds the only live replica of a shard."""
        now = time.monotonic()
        return await self._commit(lambda: self.core.remove_node(node, now))

    async def op_node_dead(self, node: str) -> dict[str, Any]:
        """Fail over the node's primaries now; re-create its replicas after the delay."""
        now = time.monotonic()
        return await self._commit(lambda: self.core.node_dead(node, now))

    async def op_node_alive(self, node: str) -> dict[str, Any]:
        """The node is back: within the delay nothing moves."""
        now = time.monotonic()
        return await self._commit(lambda: self.core.node_alive(node, now))

    async def op_confirm(self, shard: str, node: str) -> dict[str, Any]:
        """An agent's copy of ``shard`` is complete."""
        now = time.monotonic()
        return await self._commit(lambda: self.core.confirm(shard, node, now))

    async def op_report_load(self, rates: dict[str, float]) -> dict[str, Any]:
        """Select rates per shard from the balancer (load-based splits)."""
        if not isinstance(rates, dict):
            raise BadRequest("rates is a map shard -> requests per second")
        now = time.monotonic()
        return await self._commit(lambda: self.core.report_load(rates, now))

    async def op_report_keys(self, keys: list[str | bytes], keyspace: str = "default") -> int:
        """Keys seen elsewhere, for split-point sampling."""
        return await self._commit(lambda: self.core.report_keys(keyspace, keys))

    async def tick_loop(self) -> None:
        """Advance the core's timers (dead-node delays, copy timeouts, hand-offs)."""
        while True:
            await asyncio.sleep(_TICK)
            await self._commit(lambda: self.core.tick(time.monotonic()))

    def loops(self) -> list[Any]:
        """The coroutines to run next to the service's own."""
        return [self.tick_loop()]
