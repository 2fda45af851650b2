"""One seeded history: a cluster, a schedule of faults, a quiet tail, the verdict.

The fault schedule is drawn from its own random stream (``faults-<seed>``)
before the history runs, one fault per step, so the history of ``--steps K``
is a prefix of the history of ``--steps K+1`` up to the moment the K-th
step's gap ends: a safety violation seen before that moment replays with the
shorter schedule. Everything else (link delays, losses, which worker the broker
picks) comes from the world's stream.

Profiles: ``chaos`` draws every kind of fault; ``observer`` (one seed in five)
only pauses membership, each pause at most :data:`OBSERVER_GUARD` seconds, and
then no node may be declared dead.
"""

from __future__ import annotations

import functools
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.sharding.store import PREFIX as MAP_PREFIX
from services.sharding.store import decode

from . import buggify
from .invariants import Invariants, Violation
from .shells import (
    AgentProc,
    BalancerProc,
    ClientProc,
    DiscoveryProc,
    ManagerProc,
    MembershipProc,
    Params,
    ShardingProc,
    memo,
)
from .store import StoreProc, _run
from .world import Proc, World

#: Longest membership pause (seconds) the observer profile injects: the stalls the
#: detector is documented to absorb (services/membership/config.py: 3 s SIGSTOPs).
OBSERVER_GUARD = 3.0
#: Virtual seconds after the last fault: long enough for the re-replication delay,
#: the manager's anti-entropy period (30 s) and the moves that follow.
QUIET = 45.0
SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
#: The services with one decision maker: they run Params.instances instances each.
LED = ("membership", "sharding", "manager")
FAULT_KINDS = ("crash", "pause", "partition", "clock_jump", "disk_fail", "pubsub_loss", "slow_net",
               "drain", "join", "lose_node", "leader_stall", "observer_pause")


@dataclass
class Outcome:
    """The verdict of one history."""

    seed: int
    steps: int
    profile: str
    violations: list[Violation]
    faults: dict[str, int]
    checks: dict[str, int]
    events: int
    virtual_time: float
    digest: str
    fault_log: list[str] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    cpu: float = 0.0  # CPU seconds this history took
    crashes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


class History:
    """Builds the cluster for ``seed`` and runs ``steps`` faults then the quiet tail."""

    def __init__(self, seed: int, steps: int, params: Params | None = None, *, trace: bool = False) -> None:
        self.seed = seed
        self.steps = steps
        self.params = params or Params()
        self.world = w = World(seed)
        w.params = self.params  # type: ignore[attr-defined]
        self.inv = Invariants(w)
        w.checker = self.inv  # type: ignore[attr-defined]
        self.plan_rng = random.Random(f"faults-{seed}")
        self.profile = "observer" if self.plan_rng.random() < 0.2 else "chaos"
        self.inv.observer_only = self.profile == "observer"
        self.fault_log: list[str] = []
        self.lost: dict[str, float] = {}  # node -> when it was lost for good
        self.drained: set[str] = set()
        self.drain_asked: set[str] = set()  # drains sent, taken or not
        self._hash = hashlib.blake2b(digest_size=12)
        self._trace = trace
        self.store = w.add(StoreProc(w, "store", "h-store"))
        self.services: list[Proc] = []
        for name in SERVICES:
            cls = {"discovery": DiscoveryProc, "membership": MembershipProc, "sharding": ShardingProc,
                   "balancer": BalancerProc, "manager": ManagerProc}[name]
            names = [f"{name}-{i}" for i in range(1, self.params.instances + 1)] if name in LED else [name]
            for proc_name in names:
                self.services.append(w.add(cls(w, proc_name, f"h-{proc_name}")))
        self.agents: list[AgentProc] = []
        for _i in range(4):
            self._agent()
        self.spare = [self._agent(start=False) for _ in range(2)]
        self.client = w.add(ClientProc(w, "client", "h-client"))
        w.on_step = self._step if trace else None

    def _agent(self, start: bool = True) -> AgentProc:
        i = len(self.agents) + 1
        agent = AgentProc(self.world, f"node-{i}", f"h-node-{i}", f"z{(i - 1) % 3 + 1}")
        self.agents.append(agent)
        self.world.add(agent)
        return agent

    def _step(self) -> None:
        if self._trace:
            self._hash.update(f"{self.world.now:.9f}".encode())

    # -- the schedule --------------------------------------------------------------

    def plan(self) -> list[tuple[float, str, Any]]:
        """``steps`` faults: (time, kind, parameters), drawn from the plan's own stream."""
        r = self.plan_rng
        out: list[tuple[float, str, Any]] = []
        t = 3.0  # let the cluster form first
        kinds = FAULT_KINDS[:-1]
        weights = (5, 4, 4, 2, 3, 2, 2, 1, 1, 1, 2)
        for _ in range(self.steps):
            t += r.uniform(0.3, 4.0)
            if self.profile == "observer":
                out.append((t, "observer_pause", r.uniform(0.05, OBSERVER_GUARD)))
                t += OBSERVER_GUARD
                continue
            kind = r.choices(kinds, weights)[0]
            out.append((t, kind, (r.random(), r.random(), r.random())))
        self.gap_end = t + r.uniform(0.3, 4.0)
        return out

    def _aim(self, p: Proc, x: float) -> Proc:
        """Three times in four, a fault meant for an instance of a led service hits its leader."""
        service = p.service
        if service in LED and x < 0.75:
            return self.leader(service) or p
        return p

    def _pick(self, u: float, procs: Sequence[Proc]) -> Proc:
        return procs[min(int(u * len(procs)), len(procs) - 1)]

    def inject(self, kind: str, arg: Any) -> None:
        w = self.world
        svc = list(self.services)
        agents: list[Proc] = [a for a in self.agents if (a.up or a.name not in self.lost) and a not in self.spare]
        if kind == "observer_pause":
            # The leading instance (its verdicts are the ones that count), else the first.
            m = self.leader("membership") or w.procs["membership-1"]
            if m.up:
                m.paused_until = max(m.paused_until, w.now + arg)
            self._log(kind, f"{m.name} for {arg:.2f} s")
            return
        u, v, x = arg
        if kind == "crash":
            p = self._aim(self._pick(u, svc + agents), x)
            if p.up:
                p.crash(restart=True, delay=0.5 + v * 2.5)
                self._log(kind, f"{p.name}, back in {0.5 + v * 2.5:.2f} s")
        elif kind == "pause":
            p = self._aim(self._pick(u, svc + agents + [self.store]), x)
            d = 0.05 + v * 4.0
            p.paused_until = max(p.paused_until, w.now + d)
            self._log(kind, f"{p.name} for {d:.2f} s")
        elif kind == "partition":
            hosts = [p.host for p in svc + agents] + [w.broker_host, self.store.host]
            host = hosts[min(int(u * len(hosts)), len(hosts) - 1)]
            if host in w.procs_by_host:
                host = self._aim(w.procs_by_host[host], x).host
            d = 0.5 + v * 7.5
            w.isolated.add(host)
            w.after(None, d, w.isolated.discard, host)
            self._log(kind, f"{host} for {d:.2f} s")
        elif kind == "clock_jump":
            p = self._pick(u, svc + agents)
            # Up to ±25 min from true time per host, so two hosts never differ by more than
            # membership's incarnation_lead (1 h): beyond that refusing a node is by design.
            old = w.wall_offset.get(p.host, 0.0)
            new = max(-1500.0, min(1500.0, old + (v - 0.5) * 2 * 1500.0))
            jump = new - old
            w.wall_offset[p.host] = new
            self._log(kind, f"wall clock of {p.host} {jump:+.0f} s")
        elif kind == "disk_fail":
            # The store most of the time (sharding's and the manager's commits fail: "disk
            # full"), else an agent's incarnation file.
            withdisk: list[Proc] = [self.store] * 4 + agents
            p = self._pick(u, withdisk)
            d = 0.5 + v * 4.5
            p.disk_fail_until = max(p.disk_fail_until, w.now + d)
            self._log(kind, f"{p.name} for {d:.2f} s")
        elif kind == "pubsub_loss":
            d = 1.0 + v * 9.0
            w.pubsub_loss = 0.5
            w.after(None, d, setattr, w, "pubsub_loss", 0.0)
            self._log(kind, f"half of all events for {d:.2f} s")
        elif kind == "slow_net":
            d = 1.0 + v * 4.0
            w.delay_scale = 30.0
            w.after(None, d, setattr, w, "delay_scale", 1.0)
            self._log(kind, f"30x link delays for {d:.2f} s")
        elif kind == "drain":
            live = [a for a in agents if a.name not in self.drain_asked]
            if len(live) > self.params.rf:
                node = self._pick(u, live).name
                self.drain_asked.add(node)
                # Drained once the manager took the command: one it refused (a node it has
                # not registered yet) leaves the node as it was.
                self._operator("drain", node, functools.partial(self.drained.add, node))
                self._log(kind, node)
        elif kind == "join":
            if self.spare:
                agent = self.spare.pop(0)
                agent.start()
                self._log(kind, agent.name)
        elif kind == "leader_stall":
            # The leader of sharding or the manager stops (SIGSTOP, a long GC, swapped out) in
            # the middle of its next commit, after its leadership check and before its fenced
            # write, for longer than its lease: when it wakes another instance leads.
            leader = self.leader("sharding" if u < 0.5 else "manager")
            if leader is not None:
                d = self.params.leader_ttl + 0.5 + v * 3.0
                leader.stall_next = d
                self._log(kind, f"{leader.name} for {d:.2f} s in its next commit")
        elif kind == "lose_node":
            live = [a for a in agents if a.up and a.name not in self.drain_asked]
            if not self.lost and len(live) > self.params.rf:
                p = self._pick(u, live)
                p.crash(restart=False)
                self.lost[p.name] = w.now
                self._log(kind, p.name)

    def _operator(self, op: str, node: str, done: Callable[[], None]) -> None:
        """An operator's command to the manager (``phantom drain``), retried until answered."""
        self.client.operator(op, node, done)  # type: ignore[attr-defined]

    def leader(self, service: str) -> Proc | None:
        """The instance of a led service that leads now, if one does."""
        for p in self.world.services.get(service, ()):
            if p.up and p.leadership.is_leader:  # type: ignore[attr-defined]
                return p
        return None

    def _log(self, kind: str, what: str) -> None:
        if self.world.debug is not None:
            self.world.debug.append(f"{self.world.now:9.3f} FAULT      {kind}: {what}")
        self.world.stats.fault(kind)
        self.fault_log.append(f"t={self.world.now:8.3f} {kind}: {what}")

    # -- running ---------------------------------------------------------------------------

    def run(self) -> Outcome:
        w = self.world
        with buggify.active(), memo():
            self.store.start()
            for p in self.services + [a for a in self.agents if a not in self.spare]:
                p.start()
            self.client.start()
            plan = self.plan()
            for t, kind, arg in plan:
                w.at(t, None, self.inject, kind, arg)
            w.run_until(self.gap_end)
            self._heal()
            # Liveness: healthy again within QUIET seconds of the last fault (stop as soon as it is).
            end = w.now + QUIET
            problems = self._liveness()
            while problems and w.now < end:
                w.run_until(min(end, w.now + 1.0))
                problems = self._liveness()
            for name, detail in problems:
                self.inv.fail(name, detail)
            for name in ("dead_node_loses_replicas", "live_nodes_healthy_again"):
                self.inv.checks[name] += 1
        return Outcome(
            seed=self.seed, steps=self.steps, profile=self.profile, violations=self.inv.violations,
            faults=dict(w.stats.faults), checks=dict(self.inv.checks), events=w.stats.steps,
            virtual_time=w.now, digest=self._hash.hexdigest() if self._trace else "",
            fault_log=self.fault_log, step_times=[t for t, _, _ in plan], crashes=w.stats.crashes,
        )

    def _heal(self) -> None:
        """Faults stop: links heal, clocks stay where they jumped, crashed processes come back."""
        w = self.world
        w.isolated.clear()
        w.pubsub_loss = 0.0
        w.delay_scale = 1.0
        self.heal_time = w.now
        for p in w.procs.values():
            p.disk_fail_until = -1.0
            if not p.up and p.name not in self.lost and p not in self.spare:
                p.start()

    def _liveness(self) -> list[tuple[str, str]]:
        """What still keeps the cluster from being healthy, as (invariant, detail) pairs."""
        w = self.world
        out: list[tuple[str, str]] = []
        balancer = w.procs["balancer"]
        leaders = {name: self.leader(name) for name in LED}
        for name, proc in leaders.items():
            if proc is None:
                out.append(("live_nodes_healthy_again", f"no {name} instance leads"))
        if None in leaders.values():
            return out
        membership: Any = leaders["membership"]
        manager: Any = leaders["manager"]
        committed = decode(*_run(self.store.store.range(MAP_PREFIX)))  # type: ignore[attr-defined]
        if committed is None:
            return [("live_nodes_healthy_again", "no shard map was ever committed")]
        m = committed.map
        holding = {r.node for _, sh in m.shards() for r in sh.replicas}
        for node, since in self.lost.items():
            if node in holding:
                out.append(("dead_node_loses_replicas",
                            f"{node} lost at t={since:.1f} still holds replicas at epoch {m.epoch}"))
        members = {d["id"]: d["state"] for d in membership.core.members(w.now)}
        bstats = balancer.core.stats(w.now)["nodes"]  # type: ignore[attr-defined]
        for node, since in self.lost.items():
            b = bstats.get(node)
            if b is not None and b["state"] in ("alive", "suspect"):
                out.append(("dead_node_loses_replicas",
                            f"{node} lost at t={since:.1f}: the balancer sees it {b['state']}"))
        for agent in self.agents:
            if not agent.up or agent.name in self.lost:
                continue
            node = agent.name
            problems = []
            if members.get(node) != "alive":
                problems.append(f"membership says {members.get(node)}")
            try:
                rec = manager.core.node(node)
                if rec.member != "alive":
                    problems.append(f"manager holds member={rec.member}")
                want = ("draining", "decommissioned") if node in self.drained else ("active",)
                if rec.lifecycle not in want:
                    problems.append(f"manager lifecycle {rec.lifecycle}")
            except Exception as exc:
                problems.append(f"manager: {exc}")
            b = bstats.get(node)
            if node not in self.drained and (b is None or b["state"] != "alive" or b["lifecycle"] != "active"):
                problems.append(f"balancer sees {None if b is None else (b['state'], b['lifecycle'])}")
            if node in m.down and node not in self.drained:
                # (A node decommissioned while it was dead stays in the map's down set: the
                # manager only tells sharding node_alive for nodes that may hold replicas.)
                problems.append(f"sharding holds it down at epoch {m.epoch}")
            if problems:
                out.append(("live_nodes_healthy_again", f"{node}: " + "; ".join(problems)))
        for ks in m.keyspaces:
            for sh in ks.shards:
                live = [r for r in sh.replicas if r.role in ("primary", "replica") and r.node not in m.down]
                if sh.primary is None or sh.primary in m.down or len(live) < ks.rf:
                    out.append(("live_nodes_healthy_again",
                                f"shard {sh.id} at epoch {m.epoch}: primary {sh.primary}, "
                             f"{len(live)} of {ks.rf} live replicas: {[(r.node, r.role) for r in sh.replicas]}"))
                elif sh.state != "active":
                    out.append(("live_nodes_healthy_again", f"shard {sh.id} still moving at epoch {m.epoch}"))
        return out


def run_history(seed: int, steps: int, *, trace: bool = False, debug: list[str] | None = None) -> Outcome:
    """Run one history (the unit of work of :mod:`phantom_sim.run`); ``debug`` collects a log."""
    t0 = time.process_time()
    h = History(seed, steps, trace=trace)
    h.world.debug = debug
    outcome = h.run()
    outcome.cpu = time.process_time() - t0
    return outcome
