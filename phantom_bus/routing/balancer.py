"""The balancer core: which node serves a request for a shard (sans-I/O).

The shell turns a key into its shard and the shard's replicas (from the shard
map) into :class:`Candidate` values, then asks :meth:`Balancer.select`.
Membership, lifecycle and load arrive through :meth:`Balancer.node_update`;
callers report each request's outcome with :meth:`Balancer.release`; the shell
calls :meth:`Balancer.tick` about once a second and publishes the events that
``release`` and ``tick`` return. Nothing here reads the clock: ``now`` is the
caller's monotonic time in seconds.

Selection rules:

* a write goes to the shard's primary, whatever the strategy, unless the
  primary's node is dead, left or decommissioned (:class:`NoLiveReplica`);
* a read goes to a replica (the primary included, unless configured
  otherwise) chosen by the strategy among the healthy ones; joining
  replicas and nodes whose lifecycle is ``joining`` are never read;
* suspect, draining, ejected and never-heard-of nodes and ``leaving``
  replicas are skipped, unless fewer than ``panic_threshold`` of the read
  candidates are healthy: then they are used too (panic mode).

All public methods are safe to call from several threads.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from phantom_bus import ids
from phantom_bus.errors import BadRequest, NoLiveReplica, NotFound, PhantomError
from phantom_bus.events import Event
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.routing.health import (
    DOUBTFUL,
    HEALTHY,
    LIFECYCLES,
    NO_READS,
    OUT,
    ROLES,
    STATES,
    NodeState,
    base_class,
    ejection_cap,
    ejection_duration,
    load_penalty,
)
from phantom_bus.routing.leases import Lease, LeaseTable
from phantom_bus.routing.stats import RateMeter
from phantom_bus.routing.strategies import Strategy, build_strategies

EJECTED = "balancer.ejected"
RESTORED = "balancer.restored"
LEASES_EXPIRED = "balancer.leases_expired"

_MAX_WEIGHT = 1e6
# Rows a client report may carry: a generous bound on a cluster's nodes and shards.
_MAX_REPORT = 65536


@dataclass(frozen=True, slots=True)
class Candidate:
    """One replica of a shard as the shard map describes it.

    ``role`` is ``primary``, ``replica``, ``joining`` (being copied to, not
    readable yet) or ``leaving`` (being moved away, still complete). Built by
    the shell from the map; checked here so that the core can trust it.
    """

    node: str
    role: str = "replica"

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node:
            raise BadRequest(f"candidate node must be a non-empty string, got {self.node!r}")
        if self.role not in ROLES:
            raise BadRequest(
                f"candidate role {self.role!r} for node {self.node} is not one of "
                f"{', '.join(ROLES)}"
            )


@dataclass(frozen=True, slots=True)
class Selection:
    """The answer to a select: where to send the request, and the lease if any.

    ``role`` is ``primary`` or ``replica`` (a leaving replica reads as a
    replica). ``lease`` and ``deadline`` are None for a lookup
    (``lease=False``). ``strategy`` is the strategy that chose, or
    ``primary`` for a write. ``panic`` says the choice was made among
    doubtful nodes because too few healthy ones were left.
    """

    node: str
    role: str
    shard: str
    address: str | None
    lease: str | None
    deadline: float | None
    strategy: str
    panic: bool

    def to_wire(self) -> dict[str, Any]:
        """The selection as a plain map (the shell adds key, key space and epoch)."""
        return {
            "node": self.node, "role": self.role, "shard": self.shard,
            "address": self.address, "lease": self.lease, "deadline": self.deadline,
            "strategy": self.strategy, "panic": self.panic,
        }


class Plan:
    """Who may serve one shard's reads, or its writes, under the selection rules.

    Computed by :meth:`Balancer.plan` from the shard's candidates and the
    nodes' serving classes; valid while the balancer's ``generation`` stays
    ``gen`` (it moves whenever a node's class, ejection or existence changes)
    and until ``until`` (when an ejection among the candidates ends). ``pool``
    is what the strategy picks from (for a write, the primary alone),
    ``primary`` the node of the primary replica when it is in the read pool,
    ``panic`` whether doubtful nodes were let in. ``error`` is
    ``(kind, message, details)`` when nothing can serve (``kind``
    ``no_live`` or ``bad``): the select raises it. Immutable once built, so a
    caller may cache it and use it without the balancer's lock.
    """

    __slots__ = ("error", "gen", "panic", "pool", "primary", "until")

    def __init__(self, gen: int, pool: tuple[NodeState, ...], *, primary: str | None = None,
                 panic: bool = False, until: float = math.inf,
                 error: tuple[str, str, dict[str, Any]] | None = None) -> None:
        self.gen = gen
        self.pool = pool
        self.primary = primary
        self.panic = panic
        self.until = until
        self.error = error


class ShardState:
    """Per-shard counters and the select rate reported to sharding."""

    __slots__ = ("expired", "failures", "last_select", "lookups", "meter", "no_live",
                 "panics", "reads", "shard", "successes", "writes")

    def __init__(self, shard: str, window_s: float, now: float) -> None:
        self.shard = shard
        self.meter = RateMeter(window_s, now)
        self.last_select = now
        self.reads = 0
        self.writes = 0
        self.lookups = 0
        self.panics = 0
        self.no_live = 0
        self.successes = 0
        self.failures = 0
        self.expired = 0


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Balancer:
    """Selection state and statistics for every shard and node (soft state).

    ``config`` defaults to :class:`BalancerConfig` and is validated here;
    ``rng`` is the only source of randomness, seeded by the caller (a shell
    draws the seed and logs it, so a run can be replayed). Lease ids are
    ``<lease_prefix>-<counter>``: a shell passes a prefix of its own for each
    instance run (drawn from the OS's entropy, never from ``rng``, whose seed a
    restart may reuse), so no two instances and no restart issue the same id;
    the default suits a core whose leases never leave its process (tests,
    simulations).
    """

    def __init__(self, config: BalancerConfig | None, rng: random.Random, *,
                 lease_prefix: str = "lease") -> None:
        self.config = config if config is not None else BalancerConfig()
        self.config.validate()
        self._rng = rng
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeState] = {}
        self._shards: dict[str, ShardState] = {}
        self._ejected: set[str] = set()
        #: Moves whenever a plan could change: a node appears or is forgotten, its
        #: serving class changes, it is ejected or restored (see :class:`Plan`).
        self.generation = 0
        self._strategies: dict[str, Strategy] = build_strategies(self._rng, self.config)
        self._default = self._strategies[self.config.default_strategy]
        self._leases = LeaseTable(self.config.lease_timeout_s, lease_prefix, self.config.expired_memory)
        self._ops = {"select": 0, "release": 0, "node_update": 0, "forget_node": 0, "tick": 0}
        self._errors = {"bad_request": 0, "not_found": 0, "no_live_replica": 0}
        self._releases = {"released": 0, "already_released": 0, "expired": 0, "unknown": 0}
        self._totals = {
            "reads": 0, "writes": 0, "lookups": 0, "panics": 0, "leases": 0,
            "successes": 0, "failures": 0, "expired": 0, "dropped": 0,
            "ejections": 0, "ejections_refused": 0, "restores": 0, "stale_updates": 0, "reported": 0,
        }

    # --- inputs ---------------------------------------------------------------------

    def node_update(
        self,
        node: str,
        *,
        state: str | None = None,
        lifecycle: str | None = None,
        weight: float | None = None,
        load: Mapping[str, Any] | None = None,
        address: str | None = None,
        version: Sequence[int] | None = None,
        now: float,
    ) -> bool:
        """Record what membership, the manager or an agent says about ``node``.

        Only the fields given change. ``state``: alive, suspect, dead, left.
        ``lifecycle``: joining, active, draining, decommissioned. ``weight``: a
        positive number (default 1). ``load``: a map with ``cpu`` and ``mem`` in
        percent and, optionally, when it was sampled: ``at`` (the caller's
        monotonic clock, same as ``now``) or ``age`` (seconds before ``now``);
        without either it counts as sampled at ``now``. A node that becomes
        able to serve (alive and not joining, draining or decommissioned)
        starts a slow-start ramp. Raises BadRequest on a malformed value.

        ``version`` orders liveness verdicts: membership's ``(incarnation,
        change)``, compared as a pair. A ``state`` older than the one held is
        ignored, and so is an unversioned ``state`` that contradicts a
        versioned one (a relay or an old snapshot cannot undo a fresher
        verdict of the owner). A load sampled before the one held is ignored
        too. Returns False when something was ignored as stale.
        """
        if not ids.is_node_id(node):
            try:
                ids.check_node_id(node)
            except BadRequest as exc:
                raise self._bad(exc.message) from None
        if state is not None and state not in STATES:
            raise self._bad(f"node {node}: state {state!r} is not one of {', '.join(STATES)}")
        if lifecycle is not None and lifecycle not in LIFECYCLES:
            raise self._bad(
                f"node {node}: lifecycle {lifecycle!r} is not one of {', '.join(LIFECYCLES)}"
            )
        if weight is not None and (not _number(weight) or not 0 < weight <= _MAX_WEIGHT):
            raise self._bad(f"node {node}: weight must be a number in (0, {_MAX_WEIGHT:g}], "
                            f"got {weight!r}")
        if address is not None and not isinstance(address, str):
            raise self._bad(f"node {node}: address must be a string, got {address!r}")
        sample = self._parse_load(node, load, now) if load is not None else None
        stamp = self._version(node, version) if version is not None else None
        fresh = True
        with self._lock:
            self._ops["node_update"] += 1
            ns = self._nodes.get(node)
            if ns is None:
                ns = self._nodes[node] = NodeState(node, self.config, now)
                self.generation += 1
            was_healthy = ns.klass == HEALTHY
            held = ns.version
            if state is not None and held is not None and (
                    (stamp is None and state != ns.state) or (stamp is not None and stamp < held)):
                self._totals["stale_updates"] += 1
                state = None
                fresh = False
            if state is not None:
                ns.state = state
                if stamp is not None:
                    ns.version = stamp
            if lifecycle is not None:
                ns.lifecycle = lifecycle
            klass = base_class(ns.state, ns.lifecycle)
            if klass != ns.klass:
                ns.klass = klass
                self.generation += 1
            if ns.klass == HEALTHY and not was_healthy:
                ns.start_ramp(now, self.config.slow_start_s)
            if weight is not None:
                ns.weight = float(weight)
            if address is not None:
                ns.address = address
            if sample is not None and sample[2] < ns.load_at:
                self._totals["stale_updates"] += 1
                fresh = False
            elif sample is not None:
                ns.cpu, ns.mem, ns.load_at = sample
                ns.penalty = load_penalty(ns.cpu, ns.mem, self.config)
            return fresh

    def _version(self, node: str, version: Any) -> tuple[int, int]:
        if (not isinstance(version, Sequence) or isinstance(version, str | bytes)
                or len(version) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                           for v in version)):
            raise self._bad(f"node {node}: version must be two integers >= 0 "
                            f"(incarnation, change), got {version!r}")
        return int(version[0]), int(version[1])

    def _parse_load(self, node: str, load: Any, now: float) -> tuple[float, float, float]:
        if not isinstance(load, Mapping):
            raise self._bad(f"node {node}: load must be a map with cpu and mem, got {load!r}")
        values = []
        for name in ("cpu", "mem"):
            value = load.get(name)
            if not _number(value):
                raise self._bad(f"node {node}: load {name} must be a number (percent), "
                                f"got {value!r}")
            # psutil can report slightly over 100% on some kernels; clamp, not refuse.
            values.append(min(max(float(value), 0.0), 100.0))
        at = now
        sampled = load.get("at")
        age = load.get("age")
        if sampled is not None:
            if not _number(sampled):
                raise self._bad(f"node {node}: load at must be a number, got {sampled!r}")
            at = min(float(sampled), now)
        elif age is not None:
            if not _number(age) or age < 0:
                raise self._bad(f"node {node}: load age must be a number >= 0, got {age!r}")
            at = now - float(age)
        return values[0], values[1], at

    def forget_node(self, node: str, *, now: float) -> int:
        """Drop everything known about ``node`` (removed from the cluster).

        Its open leases are dropped (counted as ``dropped``, not as failures);
        returns how many. NotFound if the node is not known.
        """
        with self._lock:
            self._ops["forget_node"] += 1
            if node not in self._nodes:
                self._errors["not_found"] += 1
                raise NotFound(f"node {node!r} is not known to the balancer", node=node)
            del self._nodes[node]
            self.generation += 1
            self._ejected.discard(node)
            dropped = self._leases.drop_node(node)
            self._totals["dropped"] += len(dropped)
            return len(dropped)

    # --- selection --------------------------------------------------------------

    def select(
        self,
        shard: str,
        candidates: Sequence[Candidate],
        *,
        write: bool = False,
        strategy: str | None = None,
        lease: bool = True,
        now: float,
    ) -> Selection:
        """Choose the node that serves one request for ``shard``.

        ``candidates`` are the shard's replicas from the map. ``write`` sends
        the request to the primary; otherwise ``strategy`` (default from the
        config) picks among servable replicas. With ``lease`` the node's
        in-flight count rises until :meth:`release` or expiry; without it this
        is a pure lookup. Raises NoLiveReplica when nothing can serve,
        BadRequest for an unknown strategy or a malformed candidate list.
        """
        with self._lock:
            self._ops["select"] += 1
            chooser = self.strategy(strategy)
            if len({c.node for c in candidates}) != len(candidates):
                raise self._bad(f"shard {shard}: a node appears twice among its candidates "
                                f"{[c.node for c in candidates]}", shard=shard)
            sh = self._shards.get(shard)
            if sh is None:
                sh = self._shards[shard] = ShardState(shard, self.config.shard_rate_window_s, now)
            sh.meter.add(now)
            sh.last_select = now
            totals = self._totals
            plan = self._plan(shard, candidates, write, now)
            if plan.error is not None:
                raise self._refuse(sh, plan.error)
            if write:
                chosen, role, panic = plan.pool[0], "primary", False
                sh.writes += 1
                totals["writes"] += 1
                name = "primary"
            else:
                panic = plan.panic
                if panic:
                    sh.panics += 1
                    totals["panics"] += 1
                chosen = chooser.pick(shard, plan.pool, now)
                role = "primary" if chosen.node == plan.primary else "replica"
                sh.reads += 1
                totals["reads"] += 1
                name = chooser.name
            chosen.picks += 1
            if lease:
                opened = self._leases.open(chosen, shard, now)
                chosen.leases += 1
                chosen.in_flight += 1
                totals["leases"] += 1
                lease_id: str | None = opened.id
                deadline: float | None = opened.deadline
            else:
                sh.lookups += 1
                totals["lookups"] += 1
                lease_id = deadline = None
            return Selection(chosen.node, role, shard, chosen.address, lease_id, deadline, name,
                             panic)

    def strategy(self, name: str | None) -> Strategy:
        """The strategy called ``name`` (None: the default); BadRequest if there is none."""
        if name is None:
            return self._default
        found = self._strategies.get(name)
        if found is None:
            raise self._bad(f"unknown strategy {name!r}; use one of {', '.join(self._strategies)}",
                            strategy=name)
        return found

    def plan(self, shard: str, candidates: Sequence[Candidate], write: bool, now: float) -> Plan:
        """Who may serve ``shard`` now (see :class:`Plan`): the selection rules
        without the choice, for a caller that caches them between selects.
        BadRequest for a candidate list that names a node twice."""
        with self._lock:
            if len({c.node for c in candidates}) != len(candidates):
                raise self._bad(f"shard {shard}: a node appears twice among its candidates "
                                f"{[c.node for c in candidates]}", shard=shard)
            return self._plan(shard, candidates, write, now)

    def refuse(self, error: tuple[str, str, dict[str, Any]]) -> PhantomError:
        """The exception a select raises for a plan's ``error`` (counted)."""
        kind, message, details = error
        if kind == "bad":
            return self._bad(message, **details)
        self._errors["no_live_replica"] += 1
        return NoLiveReplica(message, **details)

    def _refuse(self, sh: ShardState, error: tuple[str, str, dict[str, Any]]) -> PhantomError:
        if error[0] != "bad":
            sh.no_live += 1
        return self.refuse(error)

    def _node(self, node: str, now: float) -> NodeState:
        ns = self._nodes.get(node)
        if ns is None:
            # Never heard of through node_update: track it (as doubtful) so its
            # leases and outcomes are counted like anyone else's.
            ns = self._nodes[node] = NodeState(node, self.config, now)
            self.generation += 1
        return ns

    def _plan(self, shard: str, candidates: Sequence[Candidate], write: bool, now: float) -> Plan:
        # The generation is read last: a node first heard of here moves it.
        plan = self._write_plan(shard, candidates, now) if write else self._read_plan(shard, candidates, now)
        plan.gen = self.generation
        return plan

    def _write_plan(self, shard: str, candidates: Sequence[Candidate], now: float) -> Plan:
        primaries = [c for c in candidates if c.role == "primary"]
        if len(primaries) > 1:
            return Plan(0, (), error=("bad", f"shard {shard} has {len(primaries)} primaries "
                                      f"({', '.join(c.node for c in primaries)}); the map is inconsistent",
                                      {"shard": shard}))
        if not primaries:
            return Plan(0, (), error=("no_live", f"shard {shard} has no primary; writes wait until "
                                      f"sharding elects one", {"shard": shard}))
        ns = self._node(primaries[0].node, now)
        if ns.klass == OUT:
            return Plan(0, (), error=(
                "no_live", f"primary {ns.node} of shard {shard} is {self._why_out(ns)}; writes wait "
                f"until sharding moves the primary", {"shard": shard, "node": ns.node}))
        return Plan(0, (ns,), primary=ns.node)

    def _read_plan(self, shard: str, candidates: Sequence[Candidate], now: float) -> Plan:
        nodes = self._nodes
        from_primary = self.config.reads_from_primary
        healthy: list[NodeState] = []
        doubtful: list[NodeState] = []
        primary: str | None = None
        total = 0
        until = math.inf
        for c in candidates:
            role = c.role
            if role == "joining":
                continue
            if role == "primary":
                if not from_primary:
                    continue
                primary = c.node
            ns = nodes.get(c.node)
            if ns is None:
                ns = self._node(c.node, now)
            total += 1
            klass = ns.klass
            if klass == HEALTHY:
                if ns.ejected_until > now:
                    until = min(until, ns.ejected_until)
                    doubtful.append(ns)
                elif role == "leaving":
                    doubtful.append(ns)
                else:
                    healthy.append(ns)
            elif klass == DOUBTFUL:
                doubtful.append(ns)
        panic = len(healthy) < self.config.panic_threshold * total
        if panic and doubtful:
            return Plan(0, (*healthy, *doubtful), primary=primary, panic=True, until=until)
        if healthy:
            return Plan(0, tuple(healthy), primary=primary, until=until)
        return Plan(0, (), until=until, error=(
            "no_live", f"no replica of shard {shard} can serve reads: {self._describe(candidates, now)}",
            {"shard": shard}))

    def _describe(self, candidates: Sequence[Candidate], now: float) -> str:
        if not candidates:
            return "it has no replicas"
        parts = []
        for c in candidates:
            ns = self._nodes.get(c.node)
            if c.role == "joining":
                why = "joining replica"
            elif c.role == "primary" and not self.config.reads_from_primary:
                why = "primary (reads_from_primary is off)"
            elif ns is None or ns.state is None:
                why = "no membership news"
            elif ns.klass == OUT:
                why = self._why_out(ns)
            elif ns.klass == NO_READS:
                why = "node joining"
            elif ns.is_ejected(now):
                why = "ejected"
            else:
                why = ns.state if ns.state != "alive" else (ns.lifecycle or c.role)
            parts.append(f"{c.node} {why}")
        return ", ".join(parts)

    @staticmethod
    def _why_out(ns: NodeState) -> str:
        if ns.lifecycle == "decommissioned":
            return "decommissioned"
        return str(ns.state)

    def _bad(self, message: str, **details: Any) -> BadRequest:
        # Lock-free on purpose: a lost increment under a race only skews a counter.
        self._errors["bad_request"] += 1
        return BadRequest(message, **details)

    # --- feedback -----------------------------------------------------------------

    def release(self, lease_id: str, latency_ms: float | None = None, ok: bool = True, *,
                now: float) -> list[Event]:
        """:meth:`end_lease` without the status: the events only."""
        return self.end_lease(lease_id, latency_ms, ok, now=now)[1]

    def end_lease(self, lease_id: str, latency_ms: float | None = None, ok: bool = True, *,
                  now: float) -> tuple[str, list[Event]]:
        """End a lease and learn from the request's outcome; returns (status, events).

        ``latency_ms`` is what the caller measured; None records no latency
        (the lease's age would include the caller's own delays), while the
        outcome still counts. A failure counts toward outlier ejection; the
        events (usually none) say when this release ejected the node.

        Never an error for a lease that is not open: the status says what it
        was (``released`` when this call ended it; ``already_released``,
        ``expired`` or ``unknown`` otherwise, and then nothing is learnt, so a
        resend counts nothing twice). Each status is counted in ``stats``.
        """
        if not isinstance(lease_id, str):
            raise self._bad("the lease id must be a str")
        if latency_ms is not None and (not _number(latency_ms) or latency_ms < 0):
            raise self._bad(f"latency_ms must be a number >= 0, got {latency_ms}")
        if not isinstance(ok, bool):
            raise self._bad("ok must be true or false")
        with self._lock:
            self._ops["release"] += 1
            lease = self._leases.close(lease_id, now)
            if isinstance(lease, str):
                self._releases[lease] += 1
                return lease, []
            self._releases["released"] += 1
            node = lease.node
            node.in_flight -= 1
            sh = self._shards.get(lease.shard)
            if ok:
                self.learn(node, latency_ms, True, now)
                if latency_ms is not None:
                    node.latency.add(latency_ms, now)
                self._totals["successes"] += 1
                if sh is not None:
                    sh.successes += 1
                return "released", []
            self._totals["failures"] += 1
            if sh is not None:
                sh.failures += 1
            return "released", self._failed(node, latency_ms, now)

    def learn(self, node: NodeState, latency_ms: float | None, ok: bool, now: float) -> list[Event]:
        """Learn from one request's outcome on ``node`` as :meth:`end_lease` does
        (for a caller that keeps its own leases: a locally routing client).
        A success touches only the node's own counters and EWMA and takes no
        lock (the caller serialises its releases); a failure takes the lock, as
        it may eject the node (the events say so)."""
        if ok:
            node.successes += 1
            node.consecutive_failures = 0
            if latency_ms is not None:
                node.ewma.observe(latency_ms, now)
            return []
        with self._lock:
            return self._failed(node, latency_ms, now)

    def _failed(self, node: NodeState, latency_ms: float | None, now: float) -> list[Event]:
        node.failures += 1
        node.consecutive_failures += 1
        if latency_ms is not None:
            # A fast failure (connection refused) must not make a node look fast.
            last = node.ewma.last
            node.ewma.observe(latency_ms if last is None else max(latency_ms, last), now)
        if (node.consecutive_failures >= self.config.eject_consecutive_failures
                and not node.is_ejected(now) and node.klass != OUT):
            return self._eject(node, now)
        return []

    def _eject(self, node: NodeState, now: float) -> list[Event]:
        cfg = self.config
        known = sum(1 for n in self._nodes.values() if n.klass != OUT)
        ejected_now = sum(1 for n in self._ejected if self._nodes[n].is_ejected(now))
        if ejected_now >= ejection_cap(known, cfg):
            self._totals["ejections_refused"] += 1
            return []
        if node.eject_level > 0:
            # Forgive one backoff level per full quiet period since the last ejection ended.
            quiet = now - node.ejected_until
            if quiet > 0:
                node.eject_level = max(0, node.eject_level - int(quiet // cfg.eject_backoff_reset_s))
        duration = ejection_duration(node.eject_level, cfg)
        node.eject_level += 1
        node.ejected_until = now + duration
        # The ramp begins when the ejection ends, so a restored node warms up
        # even if tick() runs late.
        node.start_ramp(node.ejected_until, cfg.slow_start_s)
        failures = node.consecutive_failures
        node.consecutive_failures = 0
        node.ejections += 1
        self._ejected.add(node.node)
        self.generation += 1
        self._totals["ejections"] += 1
        return [Event(EJECTED, {
            "node": node.node,
            "reason": f"{failures} consecutive failures",
            "duration_s": duration,
            "ejections": node.ejections,
        })]

    # --- time -----------------------------------------------------------------------

    def tick(self, now: float) -> list[Event]:
        """Expire overdue leases, restore nodes whose ejection is over, drop idle shards.

        Call about once a second; returns the events to publish:
        ``balancer.restored`` per restored node and one ``balancer.leases_expired``
        summary when leases expired.
        """
        events: list[Event] = []
        with self._lock:
            self._ops["tick"] += 1
            expired = self._leases.expire(now)
            if expired:
                events.append(self._expire(expired))
            for node_id in sorted(self._ejected):
                ns = self._nodes[node_id]
                if ns.ejected_until <= now:
                    self._ejected.discard(node_id)
                    self.generation += 1
                    self._totals["restores"] += 1
                    events.append(Event(RESTORED, {
                        "node": node_id,
                        "reason": "ejection time elapsed",
                        "ejections": ns.ejections,
                    }))
            horizon = now - self.config.shard_forget_s
            idle = [sid for sid, sh in self._shards.items() if sh.last_select < horizon]
            for sid in idle:
                del self._shards[sid]
                for chooser in self._strategies.values():
                    chooser.forget(sid)
        return events

    def _expire(self, expired: list[Lease]) -> Event:
        per_node: dict[str, int] = {}
        for lease in expired:
            node = lease.node
            node.in_flight -= 1
            node.expired += 1
            per_node[node.node] = per_node.get(node.node, 0) + 1
            sh = self._shards.get(lease.shard)
            if sh is not None:
                sh.expired += 1
        self._totals["expired"] += len(expired)
        return Event(LEASES_EXPIRED, {"count": len(expired), "nodes": per_node})

    # --- locally routing clients ------------------------------------------------------

    def routing_table(self, now: float) -> dict[str, dict[str, Any]]:
        """Every node's health inputs (state and its version, lifecycle, address,
        weight, load with its age): what a client that routes locally loads."""
        with self._lock:
            return {
                nid: {
                    "state": ns.state,
                    "version": None if ns.version is None else list(ns.version),
                    "lifecycle": ns.lifecycle,
                    "address": ns.address,
                    "weight": ns.weight,
                    "load": None if ns.cpu is None else {
                        "cpu": ns.cpu, "mem": ns.mem, "age_s": max(0.0, now - ns.load_at)},
                }
                for nid, ns in self._nodes.items()
            }

    def absorb(self, nodes: Mapping[str, Any], shards: Mapping[str, Any], *, now: float) -> int:
        """Count the traffic a locally routing client reports, so that stats and
        shard rates still see it. ``nodes``: per node ``picks``, ``successes``,
        ``failures`` (counts since the last report) and ``latencies`` (a sample,
        in ms). ``shards``: per shard ``reads`` and ``writes``. Feeds statistics
        only, never this balancer's own strategy state (in-flight, EWMA,
        ejection): those describe its own clients. Returns the selects counted;
        BadRequest (nothing counted) on a malformed report."""
        if not isinstance(nodes, Mapping) or not isinstance(shards, Mapping):
            raise self._bad("a report has 'nodes' and 'shards' maps")
        if len(nodes) > _MAX_REPORT or len(shards) > _MAX_REPORT:
            raise self._bad(f"a report covers at most {_MAX_REPORT} nodes and shards")
        parsed_nodes = []
        for node, row in nodes.items():
            if not isinstance(node, str) or not node or not isinstance(row, Mapping):
                raise self._bad(f"report row for node {node!r} must be a map")
            counts = [row.get(k, 0) for k in ("picks", "successes", "failures")]
            lat = row.get("latencies", [])
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise self._bad(f"report for node {node}: picks, successes and failures are "
                                f"counts >= 0, got {counts!r}")
            if (not isinstance(lat, list | tuple) or len(lat) > _MAX_REPORT
                    or not all(_number(v) and v >= 0 for v in lat)):
                raise self._bad(f"report for node {node}: latencies is a list of at most "
                                f"{_MAX_REPORT} numbers >= 0")
            parsed_nodes.append((node, counts, lat))
        parsed_shards = []
        for shard, row in shards.items():
            if not isinstance(shard, str) or not isinstance(row, Mapping):
                raise self._bad(f"report row for shard {shard!r} must be a map")
            reads, writes = row.get("reads", 0), row.get("writes", 0)
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                       for c in (reads, writes)):
                raise self._bad(f"report for shard {shard}: reads and writes are counts >= 0")
            parsed_shards.append((shard, reads, writes))
        with self._lock:
            self._ops["report"] = self._ops.get("report", 0) + 1
            totals = self._totals
            selects = 0
            for node, (picks, ok, failed), lat in parsed_nodes:
                ns = self._node(node, now)
                ns.picks += picks
                ns.successes += ok
                ns.failures += failed
                totals["successes"] += ok
                totals["failures"] += failed
                for ms in lat:
                    ns.latency.add(float(ms), now)
            for shard, reads, writes in parsed_shards:
                sh = self._shards.get(shard)
                if sh is None:
                    sh = self._shards[shard] = ShardState(shard, self.config.shard_rate_window_s, now)
                if reads + writes:
                    sh.meter.add(now, reads + writes)
                    sh.last_select = now
                sh.reads += reads
                sh.writes += writes
                totals["reads"] += reads
                totals["writes"] += writes
                selects += reads + writes
            totals["reported"] += selects
            return selects

    # --- reports --------------------------------------------------------------------

    def counts(self) -> dict[str, tuple[int, int, int]]:
        """``(picks, successes, failures)`` of every node, counted since it was first seen."""
        with self._lock:
            return {nid: (ns.picks, ns.successes, ns.failures) for nid, ns in self._nodes.items()}

    def shard_rates(self, now: float) -> dict[str, float]:
        """Selects per second of every shard over the rate window (for load-based splits)."""
        with self._lock:
            return {sid: sh.meter.rate(now) for sid, sh in self._shards.items()}

    def stats(self, now: float) -> dict[str, Any]:
        """Per-node, per-shard and total statistics as plain, msgpack-ready data."""
        cfg = self.config
        with self._lock:
            nodes: dict[str, Any] = {}
            for nid, ns in self._nodes.items():
                sketch = ns.latency.snapshot(now)
                ewma = ns.ewma.last
                load_fresh = now - ns.load_at <= cfg.load_stale_s
                nodes[nid] = {
                    "state": ns.state,
                    "version": None if ns.version is None else list(ns.version),
                    "lifecycle": ns.lifecycle,
                    "address": ns.address,
                    "weight": ns.weight,
                    "healthy": ns.klass == HEALTHY and not ns.is_ejected(now),
                    "ejected": ns.is_ejected(now),
                    "ejected_for_s": max(0.0, ns.ejected_until - now),
                    "ejections": ns.ejections,
                    "slow_start": ns.ramp(now, cfg.slow_start_floor),
                    "picks": ns.picks,
                    "leases": ns.leases,
                    "in_flight": ns.in_flight,
                    "successes": ns.successes,
                    "failures": ns.failures,
                    "expired": ns.expired,
                    "consecutive_failures": ns.consecutive_failures,
                    "latency_ms": {
                        "p50": sketch.quantile(0.5),
                        "p99": sketch.quantile(0.99),
                        "ewma": ewma,
                        "samples": sketch.count,
                    },
                    "load": {
                        "cpu": ns.cpu,
                        "mem": ns.mem,
                        "age_s": None if ns.cpu is None else now - ns.load_at,
                        "stale": ns.cpu is not None and not load_fresh,
                    },
                }
            shards = {
                sid: {
                    "rate": sh.meter.rate(now), "reads": sh.reads, "writes": sh.writes,
                    "lookups": sh.lookups, "panics": sh.panics, "no_live_replica": sh.no_live,
                    "successes": sh.successes, "failures": sh.failures, "expired": sh.expired,
                }
                for sid, sh in self._shards.items()
            }
            totals: dict[str, Any] = dict(self._totals)
            totals["selects"] = self._totals["reads"] + self._totals["writes"]
            totals["in_flight"] = len(self._leases)
            totals["ejected"] = sum(1 for n in self._ejected if self._nodes[n].is_ejected(now))
            return {
                "strategy": cfg.default_strategy,
                "strategies": list(self._strategies),
                "totals": totals,
                "ops": dict(self._ops),
                "errors": dict(self._errors),
                "releases": dict(self._releases),
                "nodes": nodes,
                "shards": shards,
            }
