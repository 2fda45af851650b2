"""A client's own balancer: route from a local copy of the map (sans-I/O).

:class:`LocalRouter` holds the newest shard map a client has and a
:class:`~phantom_bus.routing.balancer.Balancer` of its own, fed with the same
node-health inputs as the balancer process (:mod:`phantom_bus.routing.inputs`)
and with this client's own ``release`` feedback. A select is therefore the
balancer's exact decision (same code), made in memory: writes to the
primary, reads by strategy among live, non-joining, non-ejected replicas,
panic threshold, and ``performance`` as power of two choices over this
client's own latency EWMA and in-flight counts (as Finagle's clients do).

The I/O (following the map and the events, reporting) is the caller's; see
:mod:`phantom_bus.local`. Safe to use from several threads: the map and its
candidate lists are swapped as one reference, and the core has its own lock.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from phantom_bus.errors import NoLiveReplica, PhantomError
from phantom_bus.routing.balancer import Balancer, Candidate, Selection
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.routing.inputs import Update, from_event, from_routing_table
from phantom_bus.shardmap import ShardMap

DEFAULT_KEYSPACE = "default"
#: Latency samples per node kept for one report (a uniform reservoir beyond it).
REPORT_SAMPLES = 64


class LocalRouter:
    """The map, the node health and a Balancer core, for one client."""

    def __init__(self, config: BalancerConfig | None = None, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self.core = Balancer(config, self._rng)
        self._view: tuple[ShardMap, dict[str, tuple[Candidate, ...]]] | None = None
        self._samples: dict[str, list[float]] = {}
        self._seen: dict[str, int] = {}
        self._sent_nodes: dict[str, tuple[int, int, int]] = {}
        self._sent_shards: dict[str, tuple[int, int]] = {}
        self._pending: tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int]], list[str]] = ({}, {}, [])
        self.ignored = 0

    # --- inputs -----------------------------------------------------------------------

    @property
    def map(self) -> ShardMap | None:
        """The map routed on, None before the first one."""
        return None if self._view is None else self._view[0]

    @property
    def epoch(self) -> int | None:
        """The epoch of the map routed on."""
        return None if self._view is None else self._view[0].epoch

    def set_map(self, shard_map: ShardMap) -> None:
        """Route on ``shard_map`` from now on (the follower has checked its epoch)."""
        self._view = (shard_map, {})

    def apply(self, updates: list[Update], now: float) -> None:
        """Node updates (from :mod:`~phantom_bus.routing.inputs`); malformed ones are skipped."""
        for node, fields in updates:
            try:
                self.core.node_update(node, now=now, **fields)
            except PhantomError:
                self.ignored += 1

    def on_event(self, event: Mapping[str, Any], now: float) -> None:
        """A ``member.*``, ``node.*`` or ``cluster.node_*`` event."""
        self.apply(from_event(event), now)

    def on_routing_table(self, nodes: Any, now: float) -> None:
        """The balancer's node table (the answer to ``routing`` or ``report``)."""
        self.apply(from_routing_table(nodes), now)

    # --- selection --------------------------------------------------------------------

    def select(self, key: str | bytes, *, write: bool = False, keyspace: str | None = None,
               strategy: str | None = None, lease: bool = True,
               now: float) -> tuple[str, int, Selection]:
        """``(keyspace, epoch, selection)`` for ``key``; the balancer's errors
        (NoLiveReplica, BadRequest, NoSuchKeyspace) for the same inputs."""
        view = self._view
        if view is None:
            raise NoLiveReplica("no shard map yet: the client has not reached sharding")
        shard_map, cache = view
        name = keyspace or DEFAULT_KEYSPACE
        shard = shard_map.lookup(name, key)
        candidates = cache.get(shard.id)
        if candidates is None:
            candidates = cache[shard.id] = tuple(Candidate(r.node, r.role) for r in shard.replicas)
        sel = self.core.select(shard.id, candidates, write=write, strategy=strategy, lease=lease,
                               now=now)
        return name, shard_map.epoch, sel

    def release(self, node: str, lease: str, latency_ms: float | None, ok: bool, *,
                now: float) -> None:
        """End a local lease; the outcome feeds this client's strategy and its report."""
        status, _ = self.core.end_lease(lease, latency_ms, ok, now=now)
        if status == "released" and latency_ms is not None and ok:
            samples = self._samples.get(node)
            if samples is None:
                samples = self._samples[node] = []
            seen = self._seen[node] = self._seen.get(node, 0) + 1
            if len(samples) < REPORT_SAMPLES:
                samples.append(float(latency_ms))
            else:
                slot = int(self._rng.random() * seen)
                if slot < REPORT_SAMPLES:
                    samples[slot] = float(latency_ms)

    def tick(self, now: float) -> None:
        """Expire forgotten leases and end ejections (call about once a second)."""
        self.core.tick(now)

    # --- report -----------------------------------------------------------------------

    def report(self, now: float) -> dict[str, Any]:
        """The traffic since the last committed report, as the balancer's ``report``
        arguments; call :meth:`commit` once the balancer has taken it (counts of a
        report that failed go out with the next one; its latency sample is dropped)."""
        stats = self.core.stats(now)
        nodes: dict[str, Any] = {}
        node_counts: dict[str, tuple[int, int, int]] = {}
        for nid, row in stats["nodes"].items():
            counts = (row["picks"], row["successes"], row["failures"])
            last = self._sent_nodes.get(nid, (0, 0, 0))
            samples = self._samples.pop(nid, [])
            self._seen.pop(nid, None)
            if counts != last or samples:
                nodes[nid] = {"picks": counts[0] - last[0], "successes": counts[1] - last[1],
                              "failures": counts[2] - last[2], "latencies": samples}
                node_counts[nid] = counts
        shards: dict[str, Any] = {}
        shard_counts: dict[str, tuple[int, int]] = {}
        for sid, row in stats["shards"].items():
            counts2 = (row["reads"], row["writes"])
            last2 = self._sent_shards.get(sid, (0, 0))
            if counts2 != last2:
                shards[sid] = {"reads": counts2[0] - last2[0], "writes": counts2[1] - last2[1]}
                shard_counts[sid] = counts2
        # A shard forgotten by the core (idle) restarts its counts from zero.
        live = stats["shards"]
        self._pending = (node_counts, shard_counts, [s for s in self._sent_shards if s not in live])
        return {"nodes": nodes, "shards": shards}

    def commit(self) -> None:
        """The last :meth:`report` reached the balancer: count it as sent."""
        node_counts, shard_counts, gone = self._pending
        self._sent_nodes.update(node_counts)
        self._sent_shards.update(shard_counts)
        for sid in gone:
            if sid not in shard_counts:
                self._sent_shards.pop(sid, None)
        self._pending = ({}, {}, [])
