"""Selection strategies in a simulated cluster (heterogeneous, stale, degrading nodes) and the core's throughput.

Three questions. 1: which strategy gives the lowest latency and the evenest
load when nodes differ in speed, when load information is stale, and when
every client balances on its own (below)? 2: the same when one node degrades
for a while (the degradation scenario, further below)? 3: how many
select+release pairs per second does the core sustain in one process?

A discrete-event simulation in virtual time (seconds) that drives the real
balancer core (:class:`services.balancer.Balancer` with its default
:class:`BalancerConfig`, only ``default_strategy`` changed):

* 10 nodes, each one FIFO server; 8 serve a request in ``FAST_MS`` on average,
  2 (``n8``, ``n9``) at 1/3 speed (3 x ``FAST_MS``); service times are
  exponential. Total capacity ``M = sum(1 / mean_i)``.
* Poisson arrivals at 80% of ``M``; every request reads one of ``SHARDS``
  shards, and every shard is replicated on all 10 nodes (each shard lists them
  in a different rotation, its first node as primary; reads from the primary
  are allowed, the default), so every strategy may pick any node and a
  full-scan oracle is well defined.
* Weights: the operator declares each node's capacity as its weight (1 for a
  fast node, 1/3 for a slow one), as ``services.agent --weight`` would.
  ``round_robin`` ignores weights by design. A second set of rows
  (``--unweighted`` on by default for the two feedback strategies) shows
  ``least_connections`` and ``performance`` with every weight 1, because
  ``performance`` already sees slowness through latency and the weight then
  counts it twice.
* Load: like an agent, each node reports its CPU as its busy fraction over
  the last virtual second (memory 50%) through ``node_update``; ``tick`` runs
  every virtual second.
* Common random numbers: for a given seed every strategy sees the same arrival
  times, shards and per-request work (a unit exponential scaled by the
  chosen node's mean service time).
* Oracle: full-scan least connections over all 10 nodes using the simulator's
  own outstanding counts (ground truth, always fresh), random tie-break,
  unweighted (join-the-shortest-queue). No core involved.

Staleness (``--stale``, in mean service times ``S = 10 / M``, the mean
service time of a request when load is spread in proportion to capacity):
with ``k > 0`` the core's view is only updated in batches every ``k * S``.
During a period each select is a lookup (``lease=False``: the strategy decides
on the in-flight counts and latency estimates as of the last batch); at the
batch boundary the period's selections open their leases (a select with the
chosen node as the only candidate, so the core's in-flight count and lease
table are exact afterwards) and the period's completions are released with
their true latency, both at the boundary's time. This models a balancer
whose in-flight view and release feedback arrive every ``k * S`` (e.g.
several balancer replicas or batched client feedback). ``round_robin``,
``random`` and ``weighted`` use no feedback, so their decisions are the same
with stale information; they are run fresh only.

Load of a node = its busy fraction (time serving / arrival window); the
table shows ``max/mean`` of that over the 10 nodes (1.0 = perfectly even
relative to time; the mean is about 0.8). Latency = queueing + service, in
ms of virtual time; the first 2% of requests are warm-up and not counted.

Goals, printed next to the figures: ``performance`` p99 <= 1.3 x
the oracle's and max/mean load <= 1.1 with fresh information; and with stale
information ``performance`` p99 below ``least_connections`` p99.

Per-client balancing (``--clients N``, default 10): the same fresh
``performance`` run, but the arrivals are spread uniformly over N clients,
each with its own core (its own random source, in-flight counts, EWMA and
ejection, fed only by its own releases), as locally routing clients choose;
loads reach every client. The per-client cores take what a
:class:`LocalRouter` takes by default, the balancer's own defaults (power of
two choices over the peak EWMA, with the load penalty). Goal: p99 within
1.1 x the single central core's. Two more lines, same seeds: the best
two-choice variant found (a moving average of about the last ten responses
instead of the peak EWMA, no CPU penalty), and the opt-in
``SCAN_CONFIG`` (the same, comparing all the shard's replicas instead of two).

Next to it, with the same seeds, arrivals and client of each request (common
random numbers: the ``who`` stream), two idealised per-client policies that
use no core, only what one client could at most know of the nodes, as
reference points for what balancing on a client's own feedback gives. Both
scan all 10 nodes (a tie goes to one of the tied nodes at random), weighted
(least ``(q + 1) / weight``, i.e. the shortest expected delay) and unweighted
(least ``q``); both are printed:

* ``pc_jsq``: join-the-shortest-queue on the client's own outstanding requests
  per node, exact (what a client's in-flight counts are, with no latency).
* ``pc_snapshot``: every response carries the node's exact global outstanding
  count as it leaves; the client's estimate of a node is that count from its
  last response from the node plus its own dispatches there since. As
  information this is a generous upper bound on own feedback: a response
  cannot report what happens after it left, and a real one carries a latency
  (the queue the request met on arrival, older and noisier than the count at
  its departure), not a queue length. It is not a bound on what a policy can
  reach with own feedback: it takes a count learned long ago as current (no
  ageing; a node the client stopped picking keeps its old count), where a
  latency average that decays while idle does not; so a real strategy may
  beat it, and the printed ratios say whether this one does.

Why two choices on own feedback miss the goal, measured in the same run
(``two_choice_proof``): a rule that draws two nodes at random is only as good
as what it knows of those two. ``pc_two_stale`` gives every client more than
its own feedback can: every node's exact global count (with exponential
service a node's count is its whole state), refreshed every ``d`` at the
client's own phase (so its age is uniform over ``[0, d]``), plus the client's
own dispatches and completions since, ranked as the bounds above rank (by
expected delay: with both counts of one age, the larger one predicts the
longer queue now). It is run for ``d`` in ``TWO_STALE_MS``. Next to it, the age of what a client's own
feedback says about a node drawn at random (the arrival time of its newest
completed request there, since a latency describes the queue met on arrival)
is sampled at every select of the default per-client run. When exact counts
fresher than own feedback (at p10, p50 and p90) still miss 1.1x, two choices
on own feedback cannot meet it here. The same section prints the default per-client
ratio with the traffic split over 2 and 5 clients, the information thinning
as the clients multiply.

Degradation scenario: Poisson arrivals, each request for a random shard
with three replicas; every node serves ``DEG_WORKERS`` requests at once from
a FIFO queue with exponential service times; nodes report their CPU busy
fraction every second as load. Node ``n5`` is as fast as the best node, then
``DEG_SLOWDOWN`` times slower for the middle third of the run, then recovers.
The baseline in the same run is a least-connections oracle: it picks the
replica with the fewest outstanding requests as the simulator itself counts
them (ground truth, no leases, no core). Ratios are against it; every figure
is the median over the seeds (one with ``--quick``), with the spread of the
p99 ratio.

Core throughput (goal: 50,000 select+release pairs per second), per strategy,
median of several runs, next to a floor measured in the same run (a lock, one
random draw and a dict insert/remove per pair: about the least any
lease-keeping selector must do in Python).

Run: ``python bench/balancer_sim.py [--quick]``; writes
``bench/results/balancer_sim.json``.
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing as mp
import random
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._procs import host_info, write_results  # noqa: E402
from phantom_bus.routing import STRATEGY_NAMES, Balancer, BalancerConfig, Candidate  # noqa: E402
from phantom_bus.routing.local import SCAN_CONFIG  # noqa: E402

NODES = 10
SLOW = ("n8", "n9")
FAST_MS = 10.0
SLOW_FACTOR = 3.0
LOAD = 0.80
SHARDS = 16
WARMUP = 0.02
ORACLE = "oracle"
# Per-client idealised policies (no core): bounds on what own feedback can give.
PC_JSQ = "pc_jsq"
PC_SNAPSHOT = "pc_snapshot"
PER_CLIENT_BOUNDS = (PC_JSQ, PC_SNAPSHOT)
#: Two random choices on every node's exact global count, each client refreshed
#: every ``refresh_s`` (at its own phase) plus its own dispatches and completions
#: since: how fresh the information of a two-choice rule must be.
PC_TWO_STALE = "pc_two_stale"
TWO_STALE_MS = (5.0, 10.0, 15.0, 20.0, 50.0, 150.0)
#: Client counts for the per-client curve (the same total traffic, split further).
CLIENT_CURVE = (2, 5)
#: Per-client core configurations: what a LocalRouter takes by default (the
#: balancer's defaults), the best two-choice variant found, and the opt-in scan.
PER_CLIENT_VARIANTS = {
    "default": BalancerConfig(),
    "average": replace(SCAN_CONFIG, performance_choices=2),
    "scan": SCAN_CONFIG,
}
FEEDBACK = ("least_connections", "performance")

MEAN_MS = {f"n{i}": FAST_MS * (SLOW_FACTOR if f"n{i}" in SLOW else 1.0) for i in range(NODES)}
CAPACITY = sum(1000.0 / ms for ms in MEAN_MS.values())  # requests per second
RATE = LOAD * CAPACITY
MEAN_SERVICE_S = NODES / CAPACITY  # S: mean service time under capacity-proportional split


class Node:
    __slots__ = ("busy_from", "busy_s", "busy_window", "mean_s", "name", "outstanding",
                 "queue", "served")

    def __init__(self, name: str, mean_s: float) -> None:
        self.name = name
        self.mean_s = mean_s
        self.queue: deque[list[Any]] = deque()
        self.outstanding = 0
        self.busy_from: float | None = None
        self.busy_s = 0.0  # inside the arrival window
        self.busy_window = 0.0  # since the last load report
        self.served = 0


def shard_table() -> dict[str, list[Candidate]]:
    names = list(MEAN_MS)
    table = {}
    for s in range(SHARDS):
        order = [names[(s + k) % NODES] for k in range(NODES)]
        table[f"s{s}"] = [Candidate(n, "primary" if k == 0 else "replica") for k, n in enumerate(order)]
    return table


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def simulate(strategy: str, seed: int, stale_k: float, requests: int, weighted: bool = True,
             clients: int = 1, variant: str = "default", refresh_s: float = 0.0) -> dict[str, Any]:
    """One run; ``strategy`` is a core strategy name, ORACLE, one of
    PER_CLIENT_BOUNDS or PC_TWO_STALE (refreshed every ``refresh_s``);
    ``clients`` > 1 gives every client its own core (fresh information only) or,
    for the idealised policies, its own counts; the per-client cores take the
    configuration PER_CLIENT_VARIANTS[``variant``]."""
    arrivals = random.Random(seed)  # inter-arrival times, shards, work: same for every strategy
    tie = random.Random(seed + 7919)  # oracle tie-break
    nodes = {n: Node(n, ms / 1000.0) for n, ms in MEAN_MS.items()}
    shards = shard_table()
    shard_ids = list(shards)
    only = {n: [Candidate(n)] for n in nodes}
    oracle = strategy == ORACLE
    two_stale = strategy == PC_TWO_STALE
    bound = strategy in PER_CLIENT_BOUNDS or two_stale
    cfg = BalancerConfig(default_strategy="performance" if oracle or bound else strategy)
    if clients > 1:
        cfg = replace(PER_CLIENT_VARIANTS[variant], default_strategy=cfg.default_strategy)
    bals = [Balancer(cfg, random.Random(seed + 1 + 1000 * c)) for c in range(clients)]
    bal = bals[0]
    who = random.Random(seed + 31)  # which client sends each request (its own stream: CRN intact)
    for n, ms in MEAN_MS.items():
        weight = FAST_MS / ms if weighted else 1.0
        # now=-1000: any slow-start ramp is long over when the run starts at 0.
        for b in bals:
            b.node_update(n, state="alive", lifecycle="active", weight=weight, address=n, now=-1000.0)
    # Per-client bounds: what client c knows of node n. own: its requests there now
    # (ground truth); snap: the node's global outstanding count stamped on the last
    # response c got from it; since: c's dispatches to it after that response.
    names = list(nodes)
    own = [dict.fromkeys(names, 0) for _ in range(clients)]
    snap = [dict.fromkeys(names, 0) for _ in range(clients)]
    since = [dict.fromkeys(names, 0) for _ in range(clients)]
    # PC_TWO_STALE: client c's own in-flight count per node at its last refresh.
    base = [dict.fromkeys(names, 0) for _ in range(clients)]
    # Per-client cores: the age of what client c last heard from node n (the
    # arrival time of its newest completed request there: a latency describes
    # the queue the request met on arrival), sampled at each select for a node
    # drawn uniformly (as the two choices are) from a stream of its own. A node
    # not heard from yet counts as heard at time 0 (an underestimate of the age).
    index = {id(b): c for c, b in enumerate(bals)}
    heard = [dict.fromkeys(names, 0.0) for _ in range(clients)]
    age_rng = random.Random(seed + 104729)
    ages: list[float] = []
    # Weighted bounds rank by expected delay (queue + 1) x mean service time, i.e.
    # (queue + 1) / capacity weight, as the weighted core strategies do.
    cost_of = {n: (MEAN_MS[n] / FAST_MS if weighted else 1.0) for n in names}
    period = stale_k * MEAN_SERVICE_S
    stale = period > 0
    pending_open: list[list[Any]] = []
    pending_release: list[tuple[list[Any], float]] = []

    heap: list[tuple[float, int, int, Any]] = []
    seq = 0
    ARRIVE, DONE, REPORT, BATCH, REFRESH = 0, 1, 2, 3, 4

    def push(at: float, kind: int, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (at, seq, kind, payload))

    # request record: [arrival, work, node, lease, index]
    latencies: list[float] = []
    warm = int(requests * WARMUP)
    sent = 0
    t_end = 0.0  # the last arrival: the load window is [0, t_end]

    expired = 0

    def release(lease: str, latency_ms: float, now: float, owner: Balancer | None = None) -> None:
        # A request that waited longer than lease_timeout_s (30 s) finds its lease
        # expired: only an overloaded node (round_robin on the slow ones) gets there.
        nonlocal expired
        if (owner or bal).end_lease(lease, latency_ms, True, now=now)[0] == "expired":
            expired += 1

    def start(node: Node, req: list[Any], now: float) -> None:
        node.busy_from = now
        push(now + req[1] * node.mean_s, DONE, (node, req))

    push(arrivals.expovariate(RATE), ARRIVE, None)
    push(1.0, REPORT, None)
    if stale:
        push(period, BATCH, None)
    if two_stale:
        for c in range(clients):
            push(refresh_s * (c + 0.5) / clients, REFRESH, c)
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == ARRIVE:
            sid = shard_ids[int(arrivals.random() * SHARDS)]
            work = arrivals.expovariate(1.0)
            req: list[Any] = [now, work, None, None, sent, None]
            sent += 1
            t_end = now
            if sent < requests:
                push(now + arrivals.expovariate(RATE), ARRIVE, None)
            if oracle:
                cands = shards[sid]
                k0 = int(tie.random() * NODES)
                best = None
                for i in range(NODES):
                    nd = nodes[cands[(k0 + i) % NODES].node]
                    if best is None or nd.outstanding < best.outstanding:
                        best = nd
                node = best
            elif two_stale:
                c = int(who.random() * clients)
                cands = shards[sid]
                i = int(tie.random() * NODES)
                j = int(tie.random() * (NODES - 1))
                j += j >= i
                first, second = cands[i].node, cands[j].node
                cost_1 = (snap[c][first] + own[c][first] - base[c][first] + 1) * cost_of[first]
                cost_2 = (snap[c][second] + own[c][second] - base[c][second] + 1) * cost_of[second]
                chosen = first if cost_1 < cost_2 or (cost_1 == cost_2 and tie.random() < 0.5) else second
                node = nodes[chosen]
                own[c][chosen] += 1
                req[5] = c
            elif bound:
                c = int(who.random() * clients)
                known = own[c] if strategy == PC_JSQ else None
                s_c, n_c = snap[c], since[c]
                cands = shards[sid]
                k0 = int(tie.random() * NODES)
                best, best_cost, ties = None, 0.0, 0
                for i in range(NODES):
                    name = cands[(k0 + i) % NODES].node
                    q = known[name] if known is not None else s_c[name] + n_c[name]
                    cost = (q + 1) * cost_of[name]
                    if best is None or cost < best_cost:
                        best, best_cost, ties = name, cost, 1
                    elif cost == best_cost:
                        ties += 1  # uniform among the tied nodes (generous: no rotation bias)
                        if tie.random() * ties < 1.0:
                            best = name
                assert best is not None
                node = nodes[best]
                own[c][best] += 1
                n_c[best] += 1
                req[5] = c
            elif stale:
                sel = bal.select(sid, shards[sid], lease=False, now=now)
                node = nodes[sel.node]
                pending_open.append(req)
            else:
                mine = bals[int(who.random() * clients)] if clients > 1 else bal
                if clients > 1 and req[4] >= warm:
                    ages.append(now - heard[index[id(mine)]][names[int(age_rng.random() * NODES)]])
                sel = mine.select(sid, shards[sid], now=now)
                node = nodes[sel.node]
                req[3] = sel.lease
                req[5] = mine
            assert node is not None
            req[2] = node
            node.outstanding += 1
            node.served += 1
            if node.busy_from is None:
                start(node, req, now)
            else:
                node.queue.append(req)
        elif kind == DONE:
            node, req = payload
            began = node.busy_from
            node.busy_window += now - began
            if sent < requests:
                node.busy_s += now - began
            else:
                node.busy_s += max(0.0, min(now, t_end) - began)
            node.busy_from = None
            node.outstanding -= 1
            if bound:
                c = req[5]
                own[c][node.name] -= 1
                if not two_stale:
                    snap[c][node.name] = node.outstanding  # stamped as the response leaves
                    since[c][node.name] = 0
            elif clients > 1:
                heard[index[id(req[5])]][node.name] = req[0]
            latency_ms = (now - req[0]) * 1000.0
            if req[4] >= warm:
                latencies.append(latency_ms)
            if stale:
                pending_release.append((req, latency_ms))
            elif req[3] is not None:
                release(req[3], latency_ms, now, req[5])
            if node.queue:
                start(node, node.queue.popleft(), now)
        elif kind == REPORT:
            if sent >= requests:
                continue
            for node in nodes.values():
                window = node.busy_window
                if node.busy_from is not None:
                    window += now - node.busy_from
                    node.busy_window = -(now - node.busy_from)  # the part already counted
                else:
                    node.busy_window = 0.0
                for b in bals:
                    b.node_update(node.name, load={"cpu": min(100.0, 100.0 * window), "mem": 50.0}, now=now)
            for b in bals:
                b.tick(now)
            push(now + 1.0, REPORT, None)
        elif kind == REFRESH:  # PC_TWO_STALE: client ``payload`` learns every exact count
            c = payload
            for n in names:
                snap[c][n] = nodes[n].outstanding
                base[c][n] = own[c][n]
            if sent < requests:
                push(now + refresh_s, REFRESH, c)
        else:  # BATCH: the core learns about the last period's selections and completions
            for req in pending_open:
                req[3] = bal.select(req[2].name + "/feedback", only[req[2].name], now=now).lease
            for req, latency_ms in pending_release:
                release(req[3], latency_ms, now)
            pending_open.clear()
            pending_release.clear()
            if sent < requests or any(n.outstanding for n in nodes.values()):
                push(now + period, BATCH, None)
    # Services still running at t_end count up to t_end (handled above); window [0, t_end].
    busy = [n.busy_s / t_end for n in nodes.values()]
    mean_busy = statistics.fmean(busy)
    latencies.sort()
    ages.sort()
    return {
        "strategy": strategy, "seed": seed, "stale_k": stale_k, "weighted": weighted, "clients": clients,
        "variant": variant, "refresh_s": refresh_s,
        "info_age_ms": {q: pct(ages, p) * 1000.0 for q, p in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))}
        if ages else None,
        "requests": sent, "measured": len(latencies), "expired_leases": expired, "virtual_s": t_end,
        "p50_ms": pct(latencies, 0.50), "p99_ms": pct(latencies, 0.99),
        "p999_ms": pct(latencies, 0.999), "mean_ms": statistics.fmean(latencies),
        "max_over_mean_load": max(busy) / mean_busy, "mean_load": mean_busy,
        "busy": {n: round(b, 4) for n, b in zip(nodes, busy, strict=True)},
        "share": {n: nd.served / sent for n, nd in nodes.items()},
    }


# -- the degradation scenario: n5 slows down for the middle third ----------------------------

DEG_WORKERS = 4
# mean service time per node in ms; n5 degrades during the middle third
DEG_SPEEDS_MS = {"n1": 2.0, "n2": 2.0, "n3": 3.0, "n4": 4.0, "n5": 2.0}
DEG_SLOWDOWN = 8.0
DEG_SHARDS = 10
DEG_REPLICAS = 3


@dataclass
class DegNode:
    """A simulated database node: DEG_WORKERS servers and a FIFO queue."""

    name: str
    mean_ms: float
    free: int = DEG_WORKERS
    queue: deque[tuple[float, str | None]] = field(default_factory=deque)
    outstanding: int = 0
    busy_s: float = 0.0
    busy_window_s: float = 0.0
    served: int = 0
    served_degraded: int = 0


def deg_placement() -> dict[str, list[Candidate]]:
    names = list(DEG_SPEEDS_MS)
    shards = {}
    for s in range(DEG_SHARDS):
        members = [names[(s + k) % len(names)] for k in range(DEG_REPLICAS)]
        shards[f"s{s}"] = [Candidate(n, "primary" if k == 0 else "replica")
                           for k, n in enumerate(members)]
    return shards


def simulate_degraded(strategy: str, seed: int, duration: float, rate: float) -> dict[str, Any]:
    """One run of the degradation scenario; ``strategy`` is a core strategy name or ORACLE."""
    rng = random.Random(seed)
    nodes = {n: DegNode(n, ms) for n, ms in DEG_SPEEDS_MS.items()}
    shards = deg_placement()
    shard_ids = list(shards)
    oracle = strategy == ORACLE
    bal = Balancer(BalancerConfig(default_strategy="performance" if oracle else strategy),
                   random.Random(seed + 1))
    for n, ms in DEG_SPEEDS_MS.items():
        # Operators declare nominal capacity as weight; n5 keeps its weight when it degrades.
        bal.node_update(n, state="alive", lifecycle="active", weight=2.0 / ms, now=-100.0)
    degrade_from, degrade_to = duration / 3, 2 * duration / 3
    events: list[tuple[float, int, int, Any]] = []
    seq = 0
    arrival, completion, report = 0, 1, 2

    def push(at: float, kind: int, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, payload))

    def start(node: DegNode, now: float, began: float, lease: str | None) -> None:
        slow = DEG_SLOWDOWN if node.name == "n5" and degrade_from <= now < degrade_to else 1.0
        service = rng.expovariate(1.0 / (node.mean_ms * slow / 1000.0))
        node.free -= 1
        node.busy_s += service
        node.busy_window_s += service
        push(now + service, completion, (node, began, lease))

    latencies: list[float] = []
    degraded_latencies: list[float] = []
    push(rng.expovariate(rate), arrival, None)
    push(1.0, report, None)
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if now > duration and kind != completion:
            continue
        if kind == arrival:
            push(now + rng.expovariate(rate), arrival, None)
            sid = shard_ids[int(rng.random() * DEG_SHARDS)]
            if oracle:
                cands = shards[sid]
                start_at = int(rng.random() * DEG_REPLICAS)
                order = [cands[(start_at + k) % DEG_REPLICAS].node for k in range(DEG_REPLICAS)]
                target = nodes[min(order, key=lambda n: nodes[n].outstanding)]
                lease = None
            else:
                sel = bal.select(sid, shards[sid], now=now)
                target, lease = nodes[sel.node], sel.lease
            target.outstanding += 1
            target.served += 1
            if degrade_from <= now < degrade_to:
                target.served_degraded += 1
            if target.free:
                start(target, now, now, lease)
            else:
                target.queue.append((now, lease))
        elif kind == completion:
            node, began, lease = payload
            node.free += 1
            node.outstanding -= 1
            latency_ms = (now - began) * 1000.0
            latencies.append(latency_ms)
            if degrade_from <= began < degrade_to:
                degraded_latencies.append(latency_ms)
            if lease is not None:
                bal.release(lease, latency_ms, True, now=now)
            if node.queue:
                queued_at, queued_lease = node.queue.popleft()
                start(node, now, queued_at, queued_lease)
        else:
            for node in nodes.values():
                cpu = min(100.0, 100.0 * node.busy_window_s / DEG_WORKERS)
                node.busy_window_s = 0.0
                bal.node_update(node.name, load={"cpu": cpu, "mem": 50.0}, now=now)
            bal.tick(now)
            push(now + 1.0, report, None)
    utilization = [n.busy_s / (DEG_WORKERS * duration) for n in nodes.values()]
    degraded_total = sum(n.served_degraded for n in nodes.values())
    return {
        "requests": len(latencies),
        "mean_ms": statistics.fmean(latencies),
        "p99_ms": pct(sorted(latencies), 0.99),
        "p99_degraded_ms": pct(sorted(degraded_latencies), 0.99),
        "n5_share_degraded": nodes["n5"].served_degraded / max(1, degraded_total),
        "util_spread": max(utilization) - min(utilization),
        "utilization": {n: round(u, 3) for n, u in zip(nodes, utilization, strict=True)},
    }


def compare_degraded(seeds: int, duration: float, rate: float) -> list[dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in range(seeds):
        oracle = simulate_degraded(ORACLE, seed, duration, rate)
        runs.setdefault(ORACLE, []).append({**oracle, "mean_ratio": 1.0, "p99_ratio": 1.0})
        for name in STRATEGY_NAMES:
            result = simulate_degraded(name, seed, duration, rate)
            result["mean_ratio"] = result["mean_ms"] / oracle["mean_ms"]
            result["p99_ratio"] = result["p99_ms"] / oracle["p99_ms"]
            runs.setdefault(name, []).append(result)
    rows = []
    for name, results in runs.items():
        row: dict[str, Any] = {"strategy": name}
        for metric in ("mean_ms", "p99_ms", "p99_degraded_ms", "n5_share_degraded",
                       "util_spread", "mean_ratio", "p99_ratio"):
            row[metric] = statistics.median(r[metric] for r in results)
        ratios = [r["p99_ratio"] for r in results]
        row["p99_ratio_spread"] = [min(ratios), max(ratios)]
        row["requests"] = sum(r["requests"] for r in results)
        row["utilization_seed0"] = results[0]["utilization"]
        rows.append(row)
    return rows


def throughput(pairs: int, repeats: int) -> list[dict[str, Any]]:
    node_names = [f"node-{i:02d}" for i in range(12)]
    shard_cands = [
        [Candidate(node_names[(s + k) % 12], "primary" if k == 0 else "replica")
         for k in range(3)]
        for s in range(64)
    ]
    shard_ids = [f"ks/{s}" for s in range(64)]

    def floor_run() -> float:
        lock = threading.Lock()
        rng = random.Random(1)
        table: dict[int, int] = {}
        t = time.perf_counter()
        for i in range(pairs):
            with lock:
                table[i] = int(rng.random() * 3)
            with lock:
                del table[i]
        return pairs / (time.perf_counter() - t)

    def core_run(strategy: str, lease: bool) -> float:
        bal = Balancer(BalancerConfig(default_strategy=strategy), random.Random(1))
        for n in node_names:
            bal.node_update(n, state="alive", lifecycle="active", load={"cpu": 20, "mem": 40},
                            now=0.0)
        now = 100.0
        select, release = bal.select, bal.release
        t = time.perf_counter()
        for i in range(pairs):
            now += 1e-5
            k = i & 63
            sel = select(shard_ids[k], shard_cands[k], lease=lease, now=now)
            if lease:
                release(sel.lease, 1.5, True, now=now)  # type: ignore[arg-type]
        return pairs / (time.perf_counter() - t)

    cases: list[tuple[str, Any]] = [("floor: lock + draw + dict", floor_run)]
    cases += [(f"{s} select+release", lambda s=s: core_run(s, True)) for s in STRATEGY_NAMES]
    cases.append(("performance lookup (lease=False)", lambda: core_run("performance", False)))
    rows = []
    for case, fn in cases:
        results = [fn() for _ in range(repeats)]
        rows.append({"case": case, "per_s": statistics.median(results),
                     "spread": [min(results), max(results)]})
    floor = rows[0]["per_s"]
    for row in rows:
        row["vs_floor"] = row["per_s"] / floor
    return rows


def _job(args: tuple[Any, ...]) -> dict[str, Any]:
    return simulate(*args)


def label(strategy: str, weighted: bool) -> str:
    if strategy == ORACLE:
        return "oracle (full-scan LC, fresh)"
    return strategy if weighted else f"{strategy} (weights 1)"


def two_choice_proof(per_client: list[dict[str, Any]], vs_central: Any, perf: dict[str, Any],
                     clients: int) -> dict[str, Any]:
    """Print and return how fresh a two-choice rule's information must be for
    the per-client goal, against how old a client's own information is.

    A rule that draws two nodes at random can only be as good as what it knows
    of those two when it compares them. PC_TWO_STALE gives it more than own
    feedback can: every node's exact global count (with exponential service a
    node's count is its whole state), at most ``d`` old (uniform over [0, d],
    the median d / 2), plus the client's own dispatches and completions since.
    Own feedback says at best what the node was like when the client's last
    response from it arrived there; the age of that, for a node drawn
    uniformly, is measured in the default per-client run. When exact counts
    fresher than that (at p10, p50 and p90) still miss 1.1x, no two-choice rule
    on own feedback meets it in this workload."""
    curve = []
    for ms in TWO_STALE_MS:
        v = vs_central(PC_TWO_STALE, True, refresh_s=ms / 1000.0)
        curve.append({"refresh_ms": ms, "median_age_ms": ms / 2.0, **v})
    own_runs = [r for r in per_client if r["strategy"] == "performance" and r["variant"] == "default"
                and r["clients"] == clients and r["info_age_ms"]]
    own_age = {q: statistics.median(r["info_age_ms"][q] for r in own_runs) for q in ("p10", "p50", "p90")}
    print("    two random choices, idealised: every node's exact count, each client refreshed every d "
          "(its own phase) + its own changes since:")
    print("      " + "; ".join(f"d {c['refresh_ms']:g} ms (median age {c['median_age_ms']:g}): "
                               f"{c['ratio']:.3f}x" for c in curve))
    fresh_enough = [c for c in curve if c["ratio"] <= 1.1]
    needed = max((c["median_age_ms"] for c in fresh_enough), default=0.0)
    # The oldest refresh in the sweep whose information is fresher than own feedback's
    # at p10, p50 and p90 alike (ages uniform over [0, d]: those are 0.1, 0.5, 0.9 d).
    younger = [c for c in curve if all(f * c["refresh_ms"] <= own_age[q]
                                       for q, f in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)))]
    witness = max(younger, key=lambda c: c["median_age_ms"]) if younger else None
    out_of_reach = witness is not None and witness["ratio"] > 1.1 and own_age["p50"] > needed
    print(f"      within 1.1x only up to a median age of {needed:g} ms; a client's own information about "
          f"a node drawn at random is {own_age['p10']:.0f}/{own_age['p50']:.0f}/{own_age['p90']:.0f} ms old "
          f"(p10/p50/p90)")
    curve_n = []
    for n in CLIENT_CURVE:
        if 1 < n < clients:
            v = vs_central("performance", True, clients=n)
            curve_n.append({"clients": n, **v})
    print("    per-client performance by number of clients sharing the traffic: 1 (central) 1.000x; "
          + "; ".join(f"{c['clients']}: {c['ratio']:.3f}x" for c in curve_n)
          + f"; {clients}: {perf['ratio']:.3f}x")
    if out_of_reach and witness is not None:
        d = witness["refresh_ms"]
        print(f"    => two choices on own feedback cannot reach 1.1x here: exact counts of every node "
              f"{0.1 * d:.0f}/{0.5 * d:.0f}/{0.9 * d:.0f} ms old (p10/p50/p90, fresher than own feedback at "
              f"each) give {witness['ratio']:.3f}x")
    else:
        print("    => the freshness argument does not exclude a two-choice rule in this run")
    return {"fresh_counts": curve, "needed_median_age_ms": needed, "own_info_age_ms": own_age,
            "by_clients": curve_n, "out_of_reach": out_of_reach,
            "witness_refresh_ms": witness["refresh_ms"] if witness else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 requests per run (< 1 min)")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--stale", type=float, nargs="*", default=[2.0, 8.0],
                        help="staleness levels in mean service times (fresh is always run)")
    parser.add_argument("--no-unweighted", action="store_true", help="skip the weights-1 rows")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--clients", type=int, default=10,
                        help="also run fresh performance with one core per client (0: skip)")
    args = parser.parse_args()
    requests = args.requests or (20_000 if args.quick else 200_000)
    seeds = list(range(args.seeds))
    levels = [0.0, *args.stale]

    jobs: list[tuple[Any, ...]] = []
    for seed in seeds:
        if args.clients > 1:
            for variant in PER_CLIENT_VARIANTS:
                jobs.append(("performance", seed, 0.0, requests, True, args.clients, variant))
            for s in PER_CLIENT_BOUNDS:
                for w in (True, False):
                    jobs.append((s, seed, 0.0, requests, w, args.clients))
            for ms in TWO_STALE_MS:
                jobs.append((PC_TWO_STALE, seed, 0.0, requests, True, args.clients, "default", ms / 1000.0))
            for n in CLIENT_CURVE:
                if 1 < n < args.clients:
                    jobs.append(("performance", seed, 0.0, requests, True, n))
        jobs.append((ORACLE, seed, 0.0, requests, True))
        for s in STRATEGY_NAMES:
            jobs.append((s, seed, 0.0, requests, True))
        for k in args.stale:
            for s in FEEDBACK:
                jobs.append((s, seed, k, requests, True))
        if not args.no_unweighted:
            for k in levels:
                for s in FEEDBACK:
                    jobs.append((s, seed, k, requests, False))
    started = time.perf_counter()
    with mp.Pool(args.jobs) as pool:
        runs = pool.map(_job, jobs, chunksize=1)
    elapsed = time.perf_counter() - started

    per_client = [r for r in runs if r["clients"] > 1]
    runs = [r for r in runs if r["clients"] == 1]
    oracle_p99 = {r["seed"]: r["p99_ms"] for r in runs if r["strategy"] == ORACLE}
    for r in per_client:
        r["p99_over_oracle"] = r["p99_ms"] / oracle_p99[r["seed"]]
    for r in runs:
        r["p99_over_oracle"] = r["p99_ms"] / oracle_p99[r["seed"]]
    groups: dict[tuple[str, bool, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["strategy"], r["weighted"], r["stale_k"]), []).append(r)

    def med(key: tuple[str, bool, float], metric: str) -> float:
        return statistics.median(r[metric] for r in groups[key])

    def spread(key: tuple[str, bool, float], metric: str) -> str:
        xs = [r[metric] for r in groups[key]]
        return f"{min(xs):.2f}..{max(xs):.2f}"

    rows: list[dict[str, Any]] = []
    table_rows: list[list[Any]] = []
    order = [(ORACLE, True)] + [(s, True) for s in STRATEGY_NAMES] + \
        ([] if args.no_unweighted else [(s, False) for s in FEEDBACK])
    for k in levels:
        for s, w in order:
            key = (s, w, k)
            if key not in groups:
                continue
            row = {"strategy": s, "weighted": w, "stale_k": k, "runs": len(groups[key])}
            for m in ("p50_ms", "p99_ms", "p999_ms", "mean_ms", "max_over_mean_load", "p99_over_oracle"):
                row[m] = med(key, m)
                row[m + "_spread"] = [min(r[m] for r in groups[key]), max(r[m] for r in groups[key])]
            row["expired_leases"] = statistics.median(r["expired_leases"] for r in groups[key])
            row["slow_share"] = statistics.median(sum(r["share"][n] for n in SLOW) for r in groups[key])
            rows.append(row)
            table_rows.append([
                "fresh" if k == 0 else f"{k:g} S", label(s, w),
                f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f} ({spread(key, 'p99_ms')})",
                f"{row['p999_ms']:.1f}", f"{row['p99_over_oracle']:.2f} ({spread(key, 'p99_over_oracle')})",
                f"{row['max_over_mean_load']:.3f} ({spread(key, 'max_over_mean_load')})",
                f"{row['slow_share']:.1%}", f"{row['expired_leases']:g}",
            ])

    print(f"\nBalancer core in a simulated cluster: {NODES} nodes (8 x {FAST_MS:g} ms, "
          f"{len(SLOW)} x {FAST_MS * SLOW_FACTOR:g} ms mean service, exponential, 1 server each), "
          f"Poisson at {LOAD:.0%} of capacity = {RATE:.0f} req/s, {requests:,} requests per run, "
          f"median of {len(seeds)} seeds (min..max); S = {MEAN_SERVICE_S * 1000:.2f} ms; "
          f"weights = capacity unless 'weights 1'")
    print(f"fair share of the slow nodes (by capacity): {sum(1000 / MEAN_MS[n] for n in SLOW) / CAPACITY:.1%}")
    from bench._procs import table

    table("latency in ms of virtual time; load = busy fraction; p99/or = p99 / oracle p99 (same seed)",
          ["info", "strategy", "p50", "p99 (spread)", "p99.9", "p99/or (spread)", "max/mean load (spread)",
           "slow share", "expired"], table_rows)

    def find(s: str, k: float, w: bool = True) -> dict[str, Any] | None:
        return next((r for r in rows if r["strategy"] == s and r["stale_k"] == k and r["weighted"] == w), None)

    goals: dict[str, Any] = {}
    print("\nGoals:")
    for w in (True, False):
        if args.no_unweighted and not w:
            continue
        tag = "" if w else " [weights 1]"
        perf = find("performance", 0.0, w)
        assert perf is not None
        ok1 = perf["p99_over_oracle"] <= 1.3
        ok2 = perf["max_over_mean_load"] <= 1.1
        print(f"  performance{tag} fresh: p99 {perf['p99_over_oracle']:.2f}x oracle (goal <= 1.3): "
              f"{'met' if ok1 else 'NOT met'}; max/mean load {perf['max_over_mean_load']:.3f} (goal <= 1.1): "
              f"{'met' if ok2 else 'NOT met'}")
        goals[f"fresh{tag}"] = {"p99_ratio": perf["p99_over_oracle"], "p99_ok": ok1,
                                "max_mean": perf["max_over_mean_load"], "load_ok": ok2}
        for k in args.stale:
            p, lc = find("performance", k, w), find("least_connections", k, w)
            assert p is not None and lc is not None
            better = p["p99_ms"] < lc["p99_ms"]
            seeds_better = sum(
                a["p99_ms"] < b["p99_ms"]
                for a, b in zip(sorted(groups[("performance", w, k)], key=lambda r: r["seed"]),
                                sorted(groups[("least_connections", w, k)], key=lambda r: r["seed"]), strict=True)
            )
            print(f"  stale {k:g} S{tag}: performance p99 {p['p99_ms']:.1f} ms vs least_connections "
                  f"{lc['p99_ms']:.1f} ms (goal: better): {'met' if better else 'NOT met'} "
                  f"({seeds_better}/{len(seeds)} seeds better); performance p99 {p['p99_over_oracle']:.2f}x "
                  f"fresh oracle, max/mean load {p['max_over_mean_load']:.3f}")
            goals[f"stale_{k:g}{tag}"] = {"perf_p99": p["p99_ms"], "lc_p99": lc["p99_ms"], "ok": better,
                                          "seeds_better": seeds_better}
    if per_client:
        central = {r["seed"]: r for r in runs if r["strategy"] == "performance" and r["weighted"]
                   and r["stale_k"] == 0.0}
        c_p99 = statistics.median(r["p99_ms"] for r in central.values())

        def vs_central(strategy: str, weighted: bool, variant: str = "default", clients: int = args.clients,
                       refresh_s: float = 0.0) -> dict[str, Any]:
            rs = [r for r in per_client if r["strategy"] == strategy and r["weighted"] == weighted
                  and r["variant"] == variant and r["clients"] == clients and r["refresh_s"] == refresh_s]
            ratios = sorted(r["p99_ms"] / central[r["seed"]]["p99_ms"] for r in rs)
            return {"p99_ms": statistics.median(r["p99_ms"] for r in rs), "ratio": statistics.median(ratios),
                    "ratios": ratios, "max_mean": statistics.median(r["max_over_mean_load"] for r in rs)}

        perf = vs_central("performance", True)
        ok = perf["ratio"] <= 1.1
        print(f"  per-client performance ({args.clients} clients, each only its own feedback): p99 "
              f"{perf['p99_ms']:.1f} ms vs central {c_p99:.1f} ms = {perf['ratio']:.3f}x "
              f"({perf['ratios'][0]:.3f}..{perf['ratios'][-1]:.3f}) (goal <= 1.1): "
              f"{'met' if ok else 'NOT met'}; max/mean load {perf['max_mean']:.3f}")
        goals["per_client"] = {"clients": args.clients, "central_p99_ms": c_p99, **perf, "ok": ok,
                               "variants": {}, "idealised": {}}
        for variant, title in (("average", "two choices over the average of the last responses, no CPU penalty"),
                               ("scan", "SCAN_CONFIG (opt-in): all replicas compared, the same average")):
            v = vs_central("performance", True, variant)
            print(f"    {title}: p99 {v['p99_ms']:.1f} ms = {v['ratio']:.3f}x central "
                  f"({v['ratios'][0]:.3f}..{v['ratios'][-1]:.3f}); max/mean load {v['max_mean']:.3f}")
            goals["per_client"]["variants"][variant] = v
        titles = {PC_JSQ: "JSQ on own outstanding (ground truth)",
                  PC_SNAPSHOT: "global count at last own response + own since"}
        for s in PER_CLIENT_BOUNDS:
            both = {w: vs_central(s, w) for w in (True, False)}
            for w in (True, False):
                b = both[w]
                tag = "weighted" if w else "unweighted"
                print(f"    idealised, per-client {titles[s]}, {tag}: p99 {b['p99_ms']:.1f} ms = "
                      f"{b['ratio']:.3f}x central ({b['ratios'][0]:.3f}..{b['ratios'][-1]:.3f}); "
                      f"max/mean load {b['max_mean']:.3f}")
            best = min((True, False), key=lambda w: both[w]["ratio"])
            goals["per_client"]["idealised"][s] = {
                "weighted": both[True], "unweighted": both[False],
                "better": "weighted" if best else "unweighted", "within_goal": both[best]["ratio"] <= 1.1}
        goals["per_client"]["two_choices"] = two_choice_proof(per_client, vs_central, perf, args.clients)
    print(f"\n({len(runs) + len(per_client)} runs in {elapsed:.0f} s wall on {args.jobs} processes)")

    deg_seeds, duration, rate = (1, 3.0, 3000.0) if args.quick else (args.seeds, 12.0, 4000.0)
    sim = compare_degraded(deg_seeds, duration, rate)
    print(f"\nDegradation: {len(DEG_SPEEDS_MS)} nodes x {DEG_WORKERS} workers, service ms "
          f"{DEG_SPEEDS_MS}, n5 x{DEG_SLOWDOWN:g} slower in the middle third; {DEG_SHARDS} shards x "
          f"{DEG_REPLICAS} replicas; {rate:g} req/s for {duration:g} s; median of {deg_seeds} seed(s)")
    header = (f"{'strategy':<26} {'mean ms':>8} {'p99 ms':>8} {'p99 deg':>8} "
              f"{'n5 share':>9} {'util spr':>9} {'mean/or':>8} {'p99/or':>8} {'p99/or spread':>14}")
    print(header)
    print("-" * len(header))
    for r in sim:
        lo, hi = r["p99_ratio_spread"]
        name = "oracle (LC, ground truth)" if r["strategy"] == ORACLE else r["strategy"]
        print(f"{name:<26} {r['mean_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['p99_degraded_ms']:>8.2f} {r['n5_share_degraded']:>9.1%} "
              f"{r['util_spread']:>9.2f} {r['mean_ratio']:>8.2f} {r['p99_ratio']:>8.2f} "
              f"{lo:>6.2f}..{hi:<6.2f}")
    print("p99 deg: p99 of requests sent while n5 was degraded; n5 share: its share of those; "
          "util spr: max - min node utilisation")

    pairs, repeats = (20_000, 2) if args.quick else (100_000, 5)
    tput = throughput(pairs, repeats)
    print(f"\nCore throughput, one thread, 64 shards x 3 replicas over 12 nodes, "
          f"{pairs} pairs, median of {repeats}")
    header = f"{'case':<36} {'per s':>10} {'spread':>21} {'vs floor':>9}"
    print(header)
    print("-" * len(header))
    for r in tput:
        lo, hi = r["spread"]
        print(f"{r['case']:<36} {r['per_s']:>10,.0f} {lo:>10,.0f}..{hi:<9,.0f} "
              f"{r['vs_floor']:>9.2f}")
    worst = min(r["per_s"] for r in tput if "select+release" in r["case"])
    verdict = "met" if worst >= 50_000 else "NOT met"
    print(f"goal >= 50,000 select+release/s: {verdict} (slowest strategy {worst:,.0f}/s)")

    out = write_results("balancer_sim", {
        "params": {"nodes": MEAN_MS, "load": LOAD, "rate": RATE, "capacity": CAPACITY,
                   "mean_service_s": MEAN_SERVICE_S, "requests": requests, "seeds": seeds,
                   "stale_levels": levels, "shards": SHARDS, "warmup": WARMUP, "quick": args.quick},
        "rows": rows, "goals": goals, "runs": runs + per_client, "host": host_info(), "elapsed_s": elapsed,
        "degradation": {"seeds": deg_seeds, "duration_s": duration, "rate": rate, "speeds_ms": DEG_SPEEDS_MS,
                        "slowdown": DEG_SLOWDOWN, "workers": DEG_WORKERS, "rows": sim},
        "throughput": {"pairs": pairs, "repeats": repeats, "rows": tput,
                       "goal_per_s": 50_000, "goal_met": worst >= 50_000},
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
