"""End to end: how long do joins and failures take to reach clients?

A whole cluster on free ports of 127.0.0.1 (broker, discovery, membership,
sharding, balancer, manager, 4 agents; ``PHANTOM_DEAD_DELAY=5``,
``PHANTOM_COPY_TIME=0.1``), green before the first trial. Each trial:

1. join: a new agent ``node-N`` starts at ``t0``. Measured: time to the first
   read routed to it (a prober calls ``select(key, lease=False)`` over many
   keys in a loop until one lands on the new node) and time until the
   cluster is green again (rebalanced onto it).
2. kill: SIGKILL of the agent holding the most primaries at ``t1``. Measured:
   time until no shard of the sharding map (``sharding.map``) names it as
   primary (failover), time until it is dead in ``status``, and time until
   green again (after the dead delay its replicas are re-created elsewhere).

Throughout, a background client process does ``select(key)`` + ``release``
on random keys back to back, recording each select's latency and errors;
the table splits them by phase (steady before the join, join -> green,
kill -> failover, failover -> green). Several trials on the same cluster
(each joins a fresh node and kills another); the table shows medians and the
spread (min..max) over trials.

    python bench/e2e.py [--quick] [--trials N]

Writes ``bench/results/e2e.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bench._procs import Cluster, EventWatch, host_info, interruptible, log, machine_busy, table, write_results  # noqa: E402
from bench.select_throughput import start_cluster, status  # noqa: E402
from phantom_bus.client import Client  # noqa: E402
from phantom_bus.errors import PhantomError  # noqa: E402

DEAD_DELAY = 5.0
AGENTS = 4
KEYS = [f"user:{i}" for i in range(4096)]


def background(endpoint: str, stop: Any, ready: Any, out: Any) -> None:
    """select(key)+release back to back until ``stop``; report (t, select seconds, ok, node)."""
    import random

    rng = random.Random(1)
    ctx = zmq.Context()
    samples: list[tuple[float, float, bool, str]] = []
    try:
        with Client(endpoint, timeout=1.0, retries=2, ctx=ctx, routing="broker") as c:
            ready.set()
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    sel = c.select(KEYS[int(rng.random() * len(KEYS))])
                except PhantomError as exc:
                    samples.append((t0, time.monotonic() - t0, False, type(exc).__name__))
                    time.sleep(0.01)  # an outage must not become a busy loop
                    continue
                dt = time.monotonic() - t0
                samples.append((t0, dt, True, sel.node))
                with contextlib.suppress(PhantomError):
                    c.release(sel, latency_ms=dt * 1000.0, ok=True)
                time.sleep(0.002)  # a steady reader, not a load test (~300/s)
    finally:
        out.put(samples)
        ctx.destroy(0)


def primaries_of(client: Client, node: str) -> int:
    doc = client.request("sharding", "map")
    return sum(1 for ks in doc["keyspaces"] for sh in ks["shards"] for r in sh["replicas"]
               if r["node"] == node and r["role"] == "primary")


def roles_of(client: Client, node: str) -> set[str]:
    doc = client.request("sharding", "map")
    return {r["role"] for ks in doc["keyspaces"] for sh in ks["shards"] for r in sh["replicas"] if r["node"] == node}


def wait(pred: Any, timeout: float, interval: float = 0.1) -> float | None:
    """Monotonic time at which ``pred()`` first held, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return time.monotonic()
        except PhantomError:
            pass
        time.sleep(interval)
    return None


def trial(cluster: Cluster, procs: dict[str, Any], new: int, victim_pool: list[str],
          watch: EventWatch) -> dict[str, Any]:
    node = f"node-{new}"
    res: dict[str, Any] = {"joined": node}
    with cluster.client(timeout=2.0, retries=2) as c, cluster.client(timeout=1.0, retries=2) as probe:
        res["t_steady"] = time.monotonic()
        time.sleep(3.0)
        # --- join ---------------------------------------------------------------
        t0 = time.monotonic()
        res["t_join"] = t0
        procs[node] = cluster.agent(node, new)
        i = 0
        first: float | None = None
        assigned = readable = t_green = None
        next_map = next_status = t0

        def green_with_node() -> bool:
            doc = status(cluster)
            return doc.get("health") == "green" and any(n["id"] == node and n["replicas"] > 0
                                                        for n in doc.get("nodes", []))

        while time.monotonic() - t0 < 90:
            i += 1
            if t_green is None and time.monotonic() >= next_status:
                # Checked inside the probe loop, so green is timed even before the first read.
                next_status = time.monotonic() + 0.2
                if green_with_node():
                    t_green = time.monotonic()
            if (assigned is None or readable is None) and time.monotonic() >= next_map:
                # Breakdown: when sharding first gives the node a replica, and when one is readable.
                next_map = time.monotonic() + 0.1
                with contextlib.suppress(PhantomError):
                    roles = roles_of(c, node)
                    if roles and assigned is None:
                        assigned = time.monotonic() - t0
                    if roles & {"primary", "replica"} and readable is None:
                        readable = time.monotonic() - t0
            try:
                sel = probe.select(KEYS[i % len(KEYS)], lease=False)
            except PhantomError:
                time.sleep(0.01)
                continue
            if sel.node == node:
                first = time.monotonic()
                break
        res["first_read_s"] = None if first is None else first - t0
        res["map_assigned_s"], res["map_readable_s"] = assigned, readable
        res["probes"] = i
        if t_green is None:
            t_green = wait(green_with_node, 120, 0.2)
        res["join_green_s"] = None if t_green is None else t_green - t0
        res["t_join_green"] = t_green or time.monotonic()
        res["join_events_s"] = events_after(watch, t0, node)
        time.sleep(1.0)
        # --- kill ---------------------------------------------------------------
        doc = status(cluster)
        alive = {n["id"]: n for n in doc.get("nodes", []) if n["state"] == "alive"}
        candidates = [v for v in victim_pool if v in alive]
        victim = max(candidates, key=lambda v: alive[v]["primaries"])
        victim_pool.remove(victim)
        res["killed"] = victim
        res["victim_primaries"] = primaries_of(c, victim)
        t1 = time.monotonic()
        res["t_kill"] = t1
        Cluster.kill(procs[victim], signal.SIGKILL)
        t_fail = wait(lambda: primaries_of(c, victim) == 0, 60, 0.05)
        res["failover_s"] = None if t_fail is None else t_fail - t1
        res["t_failover"] = t_fail or time.monotonic()
        t_dead = wait(lambda: any(n["id"] == victim and n["state"] == "dead" for n in status(cluster)["nodes"]),
                      60, 0.1)
        res["dead_s"] = None if t_dead is None else t_dead - t1
        t_green2 = wait(lambda: status(cluster).get("health") == "green", 120, 0.2)
        res["kill_green_s"] = None if t_green2 is None else t_green2 - t1
        res["t_kill_green"] = t_green2 or time.monotonic()
        res["kill_events_s"] = events_after(watch, t1, victim)
        time.sleep(1.0)
    return res


WATCHED = ("node.discovered", "member.alive", "member.suspect", "member.dead", "cluster.node_", "balancer.")


def events_after(watch: EventWatch, t0: float, node: str) -> dict[str, float]:
    """Seconds from ``t0`` to the first event of each kind about ``node`` (the breakdown)."""
    out: dict[str, float] = {}
    for t, e in watch.since(t0, node=node):
        out.setdefault(e["kind"], round(t - t0, 3))
    return out


PHASES = (("steady", "t_steady", "t_join"), ("join -> green", "t_join", "t_join_green"),
          ("kill -> failover", "t_kill", "t_failover"), ("failover -> green", "t_failover", "t_kill_green"))


def phase_stats(samples: list[tuple[float, float, bool, str]], a: float, b: float) -> dict[str, Any]:
    inside = [s for s in samples if a <= s[0] < b]
    ok = sorted(s[1] for s in inside if s[2])
    errs = [s[3] for s in inside if not s[2]]
    out: dict[str, Any] = {"n": len(inside), "errors": len(errs), "error_kinds": sorted(set(errs)),
                           "seconds": b - a}
    if ok:
        out["p50_ms"] = ok[len(ok) // 2] * 1000
        out["p99_ms"] = ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1000
        out["max_ms"] = ok[-1] * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one trial (about a minute)")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the process logs")
    args = parser.parse_args()
    trials = args.trials or (1 if args.quick else 3)
    interruptible()

    busy = machine_busy(0.5)
    cluster = Cluster("e2e", log_level="WARNING", keep=args.keep)
    mpc = mp.get_context("spawn")
    stop, ready, q = mpc.Event(), mpc.Event(), mpc.Queue()
    bg = None
    watch: EventWatch | None = None
    results: list[dict[str, Any]] = []
    samples: list[tuple[float, float, bool, str]] = []
    started = time.monotonic()
    try:
        procs = start_cluster(cluster, AGENTS, PHANTOM_DEAD_DELAY=f"{DEAD_DELAY:g}")
        bg = mpc.Process(target=background, args=(cluster.endpoint("broker"), stop, ready, q), daemon=True)
        bg.start()
        ready.wait(30)
        watch = EventWatch(cluster.endpoint("events_out"), WATCHED)
        victims = [f"node-{n}" for n in range(1, AGENTS + 1)]
        for t in range(trials):
            res = trial(cluster, procs, AGENTS + 1 + t, victims, watch)
            results.append(res)
            log(f"trial {t + 1}/{trials}: {res['joined']} first read {res['first_read_s']}, green "
                f"{res['join_green_s']}; kill {res['killed']}: failover {res['failover_s']}, dead {res['dead_s']}, "
                f"green {res['kill_green_s']}")
    except BaseException:
        cluster.failed = True
        raise
    finally:
        if watch is not None:
            watch.close()
        stop.set()
        if bg is not None:
            try:
                samples = q.get(timeout=15)
            except Exception:  # the queue is empty if the client died; the cluster still must stop
                samples = []
            bg.join(5)
            if bg.is_alive():
                bg.kill()
                bg.join(5)
        cluster.close()

    for res in results:
        res["phases"] = {name: phase_stats(samples, res[a], res[b]) for name, a, b in PHASES}

    def agg(values: list[float | None]) -> str:
        xs = [v for v in values if v is not None]
        missing = len(values) - len(xs)
        if not xs:
            return "timeout"
        s = f"{statistics.median(xs):.2f} ({min(xs):.2f}..{max(xs):.2f})"
        return s + (f" [{missing} timed out]" if missing else "")

    timing = [
        ["new agent start -> first read routed to it", agg([r["first_read_s"] for r in results])],
        ["new agent start -> first replica in the map (any role)", agg([r["map_assigned_s"] for r in results])],
        ["new agent start -> first readable replica in the map", agg([r["map_readable_s"] for r in results])],
        ["new agent start -> green (rebalanced)", agg([r["join_green_s"] for r in results])],
        ["SIGKILL -> no primary on the dead node", agg([r["failover_s"] for r in results])],
        ["SIGKILL -> node dead in status", agg([r["dead_s"] for r in results])],
        [f"SIGKILL -> green (dead delay {DEAD_DELAY:g} s + re-replication)",
         agg([r["kill_green_s"] for r in results])],
    ]
    table(f"end to end, {len(results)} trial(s), seconds, median (min..max); machine busy at start {busy:.0%}",
          ["what", "seconds"], timing)
    for key, title in (("join_events_s", "join"), ("kill_events_s", "kill")):
        kinds = sorted({k for r in results for k in r.get(key, {})},
                       key=lambda k: statistics.median(r[key][k] for r in results if k in r.get(key, {})))
        table(f"{title}: seconds from the {'agent start' if title == 'join' else 'SIGKILL'} to the first event "
              f"about that node (bus events), median (min..max)",
              ["event", "seconds", "trials"],
              [[k, agg([r[key].get(k) for r in results if k in r.get(key, {})]),
                sum(1 for r in results if k in r.get(key, {}))] for k in kinds])
    rows = []
    for name, _, _ in PHASES:
        ph = [r["phases"][name] for r in results]
        rows.append([
            name, agg([p["seconds"] for p in ph]), sum(p["n"] for p in ph),
            agg([p.get("p50_ms") for p in ph]), agg([p.get("p99_ms") for p in ph]),
            agg([p.get("max_ms") for p in ph]), sum(p["errors"] for p in ph),
            ",".join(sorted({k for p in ph for k in p["error_kinds"]})) or "-",
        ])
    table("background select(key)+release during each phase (select latency in ms; median over trials)",
          ["phase", "length s", "selects", "p50 ms", "p99 ms", "max ms", "errors", "error kinds"], rows)
    out = write_results("e2e", {"trials": results, "dead_delay": DEAD_DELAY, "agents": AGENTS,
                                "machine_busy_at_start": busy, "host": host_info(),
                                "elapsed_s": time.monotonic() - started, "quick": args.quick})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
