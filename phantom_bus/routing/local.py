"""A client's own balancer: route from a local copy of the map (sans-I/O).

:class:`LocalRouter` holds the newest shard map a client has and a
:class:`~phantom_bus.routing.balancer.Balancer` of its own, fed with the same
node-health inputs as the balancer process (:mod:`phantom_bus.routing.inputs`)
and with this client's own ``release`` feedback. A select makes the
balancer's decision with the balancer's code: the same :class:`Plan` (who may
serve: writes to the primary, reads among live, non-joining, non-ejected
replicas, panic threshold) and the same strategy objects (``performance`` is
power of two choices over this client's own latency EWMA and in-flight
counts, as Finagle's clients do; :data:`SCAN_CONFIG` is an opt-in variant
that compares all of a shard's replicas).

What differs is only the bookkeeping around it, so that a select+release
costs a few microseconds instead of the core's tens:

* a shard's plans are computed once and cached on its route until the core's
  ``generation`` moves (a node's serving class, an ejection) or an ejection
  among its replicas ends; a route per shard is built at its first select;
* the hot path takes no lock: leases live in this router's own table (open
  and close are one dict operation; expiry runs from ``select`` about once a
  second), counters are plain attributes. A client is used from one thread
  (or one event loop) at a time, like its requests; the I/O thread only
  swaps in maps and node health, which the hot path reads atomically;
* the key hash is the contract's (BLAKE2b, 8 bytes, little-endian), inlined.

The I/O (following the map and the events, reporting) is the caller's; see
:mod:`phantom_bus.local`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from typing import Any

from phantom_bus.errors import BadRequest, NoLiveReplica, PhantomError
from phantom_bus.routing.balancer import Balancer, Candidate, Plan, Selection
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.routing.health import NodeState
from phantom_bus.routing.inputs import Update, from_event, from_routing_table
from phantom_bus.routing.strategies import Strategy
from phantom_bus.shardmap import Keyspace, Shard, ShardMap, key_bytes

DEFAULT_KEYSPACE = "default"
#: Latency samples per node kept for one report (a uniform reservoir beyond it).
REPORT_SAMPLES = 64
#: An opt-in configuration for locally routing clients
#: (``Client(balancer=SCAN_CONFIG)``): ``performance`` compares all of a shard's
#: replicas (not two) over the moving average of about the last ten responses
#: (not the peak EWMA), without the CPU penalty. A client sees only its own
#: requests in flight, about 1/N of the truth with N clients, so a held latency
#: peak outweighs them; its own counts are never stale (a select counts at
#: once), so comparing all replicas cannot herd its own requests; what would
#: herd them is a signal every client shares and that is stale, the CPU load
#: reported once a second, whose penalty is therefore off (the latency average
#: shows the queueing a busy CPU causes, and sooner; the memory penalty stays).
#: In ``bench/balancer_sim.py`` ten such clients come within 1.06x of the
#: central balancer's p99, against 1.5x with the default power of two choices.
#: Not the default: ``performance`` is power of two choices with the load
#: penalty wherever it runs.
SCAN_CONFIG = BalancerConfig(ewma_sample_weight=0.1, performance_choices=0, cpu_penalty=0.0)
#: Seconds between scans for expired local leases (run from ``select``).
EXPIRE_EVERY_S = 1.0

_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes
_NUMBERS = (int, float)
_INF = math.inf

#: What :meth:`LocalRouter.choose` returns: keyspace, epoch, shard, node,
#: address, role, lease, strategy, panic.
Choice = tuple[str, int, str, str, str, str, "str | None", str, bool]


class _Route:
    """One shard as the local path uses it: its candidates, cached plans, counts."""

    __slots__ = ("candidates", "counts", "id", "read", "write")

    def __init__(self, shard: Shard, counts: list[int]) -> None:
        self.id = shard.id
        self.candidates = tuple(Candidate(r.node, r.role) for r in shard.replicas)
        self.read: Plan | None = None
        self.write: Plan | None = None
        # [reads, writes] of this shard id, shared by its routes of every epoch.
        self.counts = counts


class _Space:
    """One key space of the routed map: its slot table and its routes."""

    __slots__ = ("by_slot", "keyspace", "routes", "slots", "table")

    def __init__(self, keyspace: Keyspace) -> None:
        self.keyspace = keyspace
        self.slots = keyspace.slots
        # The key space's slot -> shard table (hash key spaces; empty for range).
        self.table: tuple[Shard, ...] = keyspace._table
        self.by_slot: list[_Route | None] = [None] * len(self.table)
        self.routes: dict[str, _Route] = {}


class _View:
    """The map routed on and its key spaces, swapped as one reference."""

    __slots__ = ("epoch", "map", "spaces")

    def __init__(self, shard_map: ShardMap) -> None:
        self.map = shard_map
        self.epoch = shard_map.epoch
        # Built at a key space's first select: taking a new map costs nothing
        # per key space (a change reaches many clients of one process at once).
        self.spaces: dict[str, _Space] = {}


class LocalRouter:
    """The map, the node health and a Balancer core, for one client."""

    def __init__(self, config: BalancerConfig | None = None, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self.core = Balancer(config, self._rng)
        self._default: Strategy = self.core.strategy(None)
        self._lease_s = self.core.config.lease_timeout_s
        self._view: _View | None = None
        self._counts: dict[str, list[int]] = {}
        # Local leases: id -> (node, deadline), in opening order (hence deadline order).
        self._open: dict[str, tuple[NodeState, float]] = {}
        # Not from the random source: that is the strategies' (and seeds reproduce runs).
        self._prefix = f"l{id(self):x}-"
        self._seq = 0
        self._expire_at = -math.inf
        self._samples: dict[str, list[float]] = {}
        self._sent_nodes: dict[str, tuple[int, int, int]] = {}
        self._sent_shards: dict[str, tuple[int, int]] = {}
        self._pending: tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int]]] = ({}, {})
        self.ignored = 0
        self.counters = {"panics": 0, "no_live_replica": 0, "expired": 0, "not_open": 0}

    # --- inputs -----------------------------------------------------------------------

    @property
    def map(self) -> ShardMap | None:
        """The map routed on, None before the first one."""
        view = self._view
        return None if view is None else view.map

    @property
    def epoch(self) -> int | None:
        """The epoch of the map routed on."""
        view = self._view
        return None if view is None else view.epoch

    def set_map(self, shard_map: ShardMap) -> None:
        """Route on ``shard_map`` from now on (the follower has checked its epoch)."""
        self._view = _View(shard_map)

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

    def choose(self, key: str | bytes, write: bool, keyspace: str | None, strategy: str | None,
               lease: bool, now: float) -> Choice:
        """The balancer's choice for ``key``, as :data:`Choice`; the balancer's
        errors (NoLiveReplica, BadRequest, NoSuchKeyspace) for the same inputs."""
        view = self._view
        if view is None:
            raise NoLiveReplica("no shard map yet: the client has not reached sharding")
        name = keyspace or DEFAULT_KEYSPACE
        space = view.spaces.get(name)
        if space is None:
            # NoSuchKeyspace for a name the map does not have.
            space = view.spaces[name] = _Space(view.map.keyspace(name))
        if space.table:
            # shardmap.key_hash, inlined (a call costs a tenth of a local select); the
            # agreement tests with the balancer would catch the two drifting apart.
            if type(key) is str:
                try:
                    data = key.encode("utf-8")
                except UnicodeEncodeError:
                    data = key_bytes(key)  # raises the helpful BadRequest
            elif type(key) is bytes:
                data = key
            else:
                data = key_bytes(key)
            slot = _from_bytes(_blake2b(data, digest_size=8).digest(), "little") % space.slots
            route = space.by_slot[slot]
            if route is None:
                route = self._route(space, space.table[slot])
                space.by_slot[slot] = route
        else:
            shard = space.keyspace.lookup(key)
            route = space.routes.get(shard.id) or self._route(space, shard)
        core = self.core
        plan = route.write if write else route.read
        if plan is None or plan.gen != core.generation or now >= plan.until:
            plan = core.plan(route.id, route.candidates, write, now)
            if write:
                route.write = plan
            else:
                route.read = plan
        if plan.error is not None:
            if plan.error[0] != "bad":
                self.counters["no_live_replica"] += 1
            raise core.refuse(plan.error)
        if write:
            ns = plan.pool[0]
            role = used = "primary"
            route.counts[1] += 1
        else:
            chooser = self._default if strategy is None else core.strategy(strategy)
            ns = chooser.pick(route.id, plan.pool, now)
            role = "primary" if ns.node == plan.primary else "replica"
            used = chooser.name
            route.counts[0] += 1
            if plan.panic:
                self.counters["panics"] += 1
        ns.picks += 1
        lease_id: str | None = None
        if lease:
            self._seq += 1
            lease_id = f"{self._prefix}{self._seq:x}"
            self._open[lease_id] = (ns, now + self._lease_s)
            ns.leases += 1
            ns.in_flight += 1
            if now >= self._expire_at:
                self._expire(now)
        return name, view.epoch, route.id, ns.node, ns.address or "", role, lease_id, used, plan.panic

    def select(self, key: str | bytes, *, write: bool = False, keyspace: str | None = None,
               strategy: str | None = None, lease: bool = True,
               now: float) -> tuple[str, int, Selection]:
        """``(keyspace, epoch, selection)`` for ``key``: :meth:`choose` as the
        balancer core's :class:`Selection` (the client itself uses :meth:`choose`)."""
        name, epoch, shard, node, address, role, lease_id, used, panic = self.choose(
            key, write, keyspace, strategy, lease, now)
        deadline = None if lease_id is None else self._open[lease_id][1]
        return name, epoch, Selection(node, role, shard, address or None, lease_id, deadline, used, panic)

    def _route(self, space: _Space, shard: Shard) -> _Route:
        counts = self._counts.get(shard.id)
        if counts is None:
            counts = self._counts[shard.id] = [0, 0]
        route = space.routes[shard.id] = _Route(shard, counts)
        return route

    def _expire(self, now: float) -> None:
        self._expire_at = now + EXPIRE_EVERY_S
        open_ = self._open
        due = []
        for lease_id, (_, deadline) in open_.items():
            if deadline > now:
                break
            due.append(lease_id)
        for lease_id in due:
            ns = open_.pop(lease_id)[0]
            ns.in_flight -= 1
            ns.expired += 1
        self.counters["expired"] += len(due)

    def release(self, node: str, lease: str, latency_ms: float | None, ok: bool, *,
                now: float) -> None:
        """End a local lease; the outcome feeds this client's strategy and its report.

        A lease no longer open (released already, expired) learns nothing, so
        a repeated release counts nothing twice. BadRequest for a latency that
        is not a number >= 0."""
        if latency_ms is not None and (type(latency_ms) not in _NUMBERS or not 0 <= latency_ms < _INF):
            raise BadRequest(f"latency_ms must be a number >= 0, got {latency_ms!r}")
        opened = self._open.pop(lease, None)
        if opened is None:
            self.counters["not_open"] += 1
            return
        ns = opened[0]
        ns.in_flight -= 1
        self.core.learn(ns, latency_ms, ok, now)
        if latency_ms is not None and ok:
            # A uniform sample of this report interval's latencies (reservoir
            # sampling with geometric skips, Li's algorithm L): most releases only
            # count. Row: [seen, next to keep, weight, samples...].
            row = self._samples.get(ns.node)
            if row is None:
                row = self._samples[ns.node] = [0, REPORT_SAMPLES + 1, 1.0]
            seen = row[0] = row[0] + 1
            if seen <= REPORT_SAMPLES:
                row.append(latency_ms)
                if seen == REPORT_SAMPLES:
                    self._next_keep(row)
            elif seen == row[1]:
                row[3 + int(self._rng.random() * REPORT_SAMPLES)] = latency_ms
                self._next_keep(row)

    def _next_keep(self, row: list[float]) -> None:
        rnd = self._rng.random
        row[2] *= math.exp(math.log(rnd() or 1e-300) / REPORT_SAMPLES)
        skip = math.floor(math.log(rnd() or 1e-300) / math.log1p(-row[2])) if row[2] < 1.0 else 0
        row[1] = row[0] + skip + 1

    def tick(self, now: float) -> None:
        """End ejections whose time is over (call about once a second)."""
        self.core.tick(now)

    # --- report -----------------------------------------------------------------------

    def report(self, now: float) -> dict[str, Any]:
        """The traffic since the last committed report, as the balancer's ``report``
        arguments; call :meth:`commit` once the balancer has taken it (counts of a
        report that failed go out with the next one; its latency sample is dropped)."""
        nodes: dict[str, Any] = {}
        node_counts: dict[str, tuple[int, int, int]] = {}
        for nid, counts in self.core.counts().items():
            last = self._sent_nodes.get(nid, (0, 0, 0))
            samples = [float(ms) for ms in self._samples.pop(nid, [0, 0, 0.0])[3:]]
            if counts != last or samples:
                nodes[nid] = {"picks": counts[0] - last[0], "successes": counts[1] - last[1],
                              "failures": counts[2] - last[2], "latencies": samples}
                node_counts[nid] = counts
        shards: dict[str, Any] = {}
        shard_counts: dict[str, tuple[int, int]] = {}
        # A snapshot: the selecting thread may add a shard meanwhile.
        for sid, row in list(self._counts.items()):
            counts2 = (row[0], row[1])
            last2 = self._sent_shards.get(sid, (0, 0))
            if counts2 != last2:
                shards[sid] = {"reads": counts2[0] - last2[0], "writes": counts2[1] - last2[1]}
                shard_counts[sid] = counts2
        self._pending = (node_counts, shard_counts)
        return {"nodes": nodes, "shards": shards}

    def commit(self) -> None:
        """The last :meth:`report` reached the balancer: count it as sent."""
        node_counts, shard_counts = self._pending
        self._sent_nodes.update(node_counts)
        self._sent_shards.update(shard_counts)
        self._pending = ({}, {})
