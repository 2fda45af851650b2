"""Balancer strategies in a simulated cluster, and the select throughput of the core.

Question 1: which strategy gives the lowest mean and p99 latency, and how
evenly does it load the nodes, when nodes differ in speed and one of them
degrades for a while? A discrete-event simulation in virtual time drives the
real :class:`services.balancer.Balancer`: Poisson arrivals, each request for a
random shard with three replicas; every node serves ``WORKERS`` requests at
once from a FIFO queue with exponential service times; nodes report their
CPU busy fraction every second as load. Node ``n5`` is as fast as the best
node, then ``SLOWDOWN`` times slower for the middle third of the run, then
recovers. The baseline in the same run is a least-connections oracle: it
picks the replica with the fewest outstanding requests as the simulator
itself counts them (ground truth, no leases, no core). Ratios are against
it; every figure is the median over ``SEEDS`` runs, with the spread of the
p99 ratio.

Question 2: how many select+release pairs per second does the core sustain
in one process (goal: 50,000)? Measured per strategy, median of several
runs, next to a floor measured in the same run (a lock, one random draw and
a dict insert/remove per pair: about the least any lease-keeping selector
must do in Python).

Run: ``python bench/balancer_simulation.py [--quick]``. Prints two tables and
writes ``bench/results/balancer_simulation.json``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import random
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.balancer import STRATEGY_NAMES, Balancer, BalancerConfig, Candidate

WORKERS = 4
# mean service time per node in ms; n5 degrades during the middle third
SPEEDS_MS = {"n1": 2.0, "n2": 2.0, "n3": 3.0, "n4": 4.0, "n5": 2.0}
SLOWDOWN = 8.0
SHARDS = 10
REPLICAS = 3
ORACLE = "oracle (LC, ground truth)"


@dataclass
class SimNode:
    """A simulated database node: WORKERS servers and a FIFO queue."""

    name: str
    mean_ms: float
    free: int = WORKERS
    queue: deque[tuple[float, str | None]] = field(default_factory=deque)
    outstanding: int = 0
    busy_s: float = 0.0
    busy_window_s: float = 0.0
    served: int = 0
    served_degraded: int = 0


def placement() -> dict[str, list[Candidate]]:
    names = list(SPEEDS_MS)
    shards = {}
    for s in range(SHARDS):
        members = [names[(s + k) % len(names)] for k in range(REPLICAS)]
        shards[f"s{s}"] = [Candidate(n, "primary" if k == 0 else "replica")
                           for k, n in enumerate(members)]
    return shards


def simulate(strategy: str, seed: int, duration: float, rate: float) -> dict[str, Any]:
    """Run one simulation; ``strategy`` is a balancer strategy name or ORACLE."""
    rng = random.Random(seed)
    nodes = {n: SimNode(n, ms) for n, ms in SPEEDS_MS.items()}
    shards = placement()
    shard_ids = list(shards)
    oracle = strategy == ORACLE
    bal = Balancer(BalancerConfig(default_strategy="performance" if oracle else strategy),
                   random.Random(seed + 1))
    for n, ms in SPEEDS_MS.items():
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

    def start(node: SimNode, now: float, began: float, lease: str | None) -> None:
        slow = SLOWDOWN if node.name == "n5" and degrade_from <= now < degrade_to else 1.0
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
            sid = shard_ids[int(rng.random() * SHARDS)]
            if oracle:
                cands = shards[sid]
                start_at = int(rng.random() * REPLICAS)
                order = [cands[(start_at + k) % REPLICAS].node for k in range(REPLICAS)]
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
                cpu = min(100.0, 100.0 * node.busy_window_s / WORKERS)
                node.busy_window_s = 0.0
                bal.node_update(node.name, load={"cpu": cpu, "mem": 50.0}, now=now)
            bal.tick(now)
            push(now + 1.0, report, None)
    utilization = [n.busy_s / (WORKERS * duration) for n in nodes.values()]
    degraded_total = sum(n.served_degraded for n in nodes.values())
    return {
        "requests": len(latencies),
        "mean_ms": statistics.fmean(latencies),
        "p99_ms": percentile(latencies, 0.99),
        "p99_degraded_ms": percentile(degraded_latencies, 0.99),
        "n5_share_degraded": nodes["n5"].served_degraded / max(1, degraded_total),
        "util_spread": max(utilization) - min(utilization),
        "utilization": {n: round(u, 3) for n, u in zip(nodes, utilization, strict=True)},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def compare(seeds: int, duration: float, rate: float) -> list[dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in range(seeds):
        oracle = simulate(ORACLE, seed, duration, rate)
        runs.setdefault(ORACLE, []).append({**oracle, "mean_ratio": 1.0, "p99_ratio": 1.0})
        for name in STRATEGY_NAMES:
            result = simulate(name, seed, duration, rate)
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
         for k in range(REPLICAS)]
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
    for label, fn in cases:
        results = [fn() for _ in range(repeats)]
        rows.append({"case": label, "per_s": statistics.median(results),
                     "spread": [min(results), max(results)]})
    floor = rows[0]["per_s"]
    for row in rows:
        row["vs_floor"] = row["per_s"] / floor
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    args = parser.parse_args()
    seeds, duration, rate = (1, 3.0, 3000.0) if args.quick else (3, 12.0, 4000.0)
    pairs, repeats = (20_000, 2) if args.quick else (100_000, 5)

    started = time.perf_counter()
    sim = compare(seeds, duration, rate)
    print(f"\nSimulated cluster: {len(SPEEDS_MS)} nodes x {WORKERS} workers, service ms "
          f"{SPEEDS_MS}, n5 x{SLOWDOWN:g} slower in the middle third; {SHARDS} shards x "
          f"{REPLICAS} replicas; {rate:g} req/s for {duration:g} s; median of {seeds} seed(s)")
    header = (f"{'strategy':<26} {'mean ms':>8} {'p99 ms':>8} {'p99 deg':>8} "
              f"{'n5 share':>9} {'util spr':>9} {'mean/or':>8} {'p99/or':>8} {'p99/or spread':>14}")
    print(header)
    print("-" * len(header))
    for r in sim:
        lo, hi = r["p99_ratio_spread"]
        print(f"{r['strategy']:<26} {r['mean_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['p99_degraded_ms']:>8.2f} {r['n5_share_degraded']:>9.1%} "
              f"{r['util_spread']:>9.2f} {r['mean_ratio']:>8.2f} {r['p99_ratio']:>8.2f} "
              f"{lo:>6.2f}..{hi:<6.2f}")
    print("p99 deg: p99 of requests sent while n5 was degraded; n5 share: its share of those; "
          "util spr: max - min node utilisation")

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

    out = Path(__file__).resolve().parent / "results" / "balancer_simulation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "python": platform.python_version(), "machine": platform.machine(),
        "simulation": {"seeds": seeds, "duration_s": duration, "rate": rate,
                       "speeds_ms": SPEEDS_MS, "slowdown": SLOWDOWN, "rows": sim},
        "throughput": {"pairs": pairs, "repeats": repeats, "rows": tput,
                       "goal_per_s": 50_000, "goal_met": worst >= 50_000},
        "elapsed_s": time.perf_counter() - started,
    }, indent=2))
    print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
