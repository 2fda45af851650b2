"""A virtual-time driver for the sharding core: fake agents, a fake clock, every epoch kept.

Used by the tests and bench/rebalance.py. Agents confirm a joining replica
``copy_time`` seconds after they first see it, unless they are listed in
``silent``; the clock moves only when :meth:`Simulation.run` is called.
Every map the core publishes is recorded with the operation that made it,
so safety properties can be checked across epochs afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from phantom_bus.errors import NotFound
from phantom_bus.shardmap import SERVING, ShardMap
from services.sharding.core import CHANGED, Result, ShardingCore


@dataclass
class Epoch:
    """One published map and the operation that produced it."""

    op: str
    shard_map: ShardMap


@dataclass
class Simulation:
    """Drives a :class:`ShardingCore` with virtual time and well-behaved agents."""

    core: ShardingCore
    now: float = 0.0
    copy_time: float = 2.0
    tick: float = 0.5
    silent: set[str] = field(default_factory=set)
    epochs: list[Epoch] = field(default_factory=list)
    _seen: dict[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = self.core.map().value
        assert m is not None
        self.epochs.append(Epoch("start", m))

    def call(self, op: str, fn: Callable[..., Result[Any]], *args: Any, **kwargs: Any) -> Any:
        """Run one core operation and record the map it published, if any."""
        result = fn(*args, **kwargs)
        if any(e.kind == CHANGED for e in result.events):
            m = self.core.map().value
            assert m is not None
            self.epochs.append(Epoch(op, m))
        return result.value

    def run(self, seconds: float) -> None:
        """Advance the clock, letting agents confirm finished copies and the core tick."""
        end = self.now + seconds
        while self.now < end:
            self.now += self.tick
            m = self.core.map().value
            assert m is not None
            joining = {(sh.id, r.node) for _, sh in m.shards() for r in sh.replicas if r.role == "joining"}
            for key in joining:
                self._seen.setdefault(key, self.now)
            for key in sorted(joining):
                sid, node = key
                if node in self.silent or self.now - self._seen[key] < self.copy_time:
                    continue
                # An earlier confirmation of this round may have ended this copy (the shard
                # has its replicas now): an agent reads that from the map and stops.
                if self._role(sid, node) == "joining":
                    self.call("confirm", self.core.confirm, sid, node, self.now)
            for key in [k for k in self._seen if k not in joining]:
                del self._seen[key]
            self.call("tick", self.core.tick, self.now)

    def _role(self, shard_id: str, node: str) -> str | None:
        m = self.core.map().value
        assert m is not None
        try:
            return m.shard(shard_id).role_of(node)
        except NotFound:
            return None

    def settle(self, limit: float = 3600.0) -> float:
        """Run until nothing is moving; returns the virtual seconds it took."""
        start = self.now
        while self.core.health()["moving"] and self.now - start < limit:
            self.run(self.tick)
        return self.now - start


def live_counts(shard_map: ShardMap) -> dict[str, int]:
    """Live replicas per shard: primary or replica on a node not marked down."""
    down = shard_map.down
    return {
        sh.id: sum(1 for r in sh.replicas if r.role in SERVING and r.node not in down) for _, sh in shard_map.shards()
    }
