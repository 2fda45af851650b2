"""How long a shard takes no writes after its primary's host dies: lease + detection + promotion.

A cluster of the real processes (broker, the five services, three agents)
runs with the exec participant (deploy/examples/participant.sh logs every
transition with wall-clock timestamps). Each trial SIGKILLs the agent of a
node holding primaries (its "host" dies: no fence ever comes), then reads
from the transition log, per shard that node was primary of, when the new
primary's ``primary`` callback finished. Write unavailability per shard =
that time minus the kill. Detection = the ``member.dead`` event minus the
kill. The killed agent is restarted between trials.

Reported per lease setting: the median over 5 trials of the per-trial median
(and max) over shards, with the spread; next to it the floor the lease rule
allows (lease + drift) and the detection time, so the share of the lease is
visible.

    .venv/bin/python bench/write_unavailability.py [--trials 5] [--leases 1,2]

Writes ``bench/results/write_unavailability.json``.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._procs import ROOT, Cluster, EventWatch, host_info, interruptible, write_results
from tests.procs import example_participant_env

SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
NODES = ("node-1", "node-2", "node-3")
DRIFT = 0.5


def wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except Exception:
            v = None
        if v:
            return v
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def primaries(c: Cluster) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n: [] for n in NODES}
    for row in c.request("sharding", "shards"):
        if row.get("primary") in out:
            out[row["primary"]].append(row["shard"])
    return out


def settled(c: Cluster) -> bool:
    rows = c.request("sharding", "shards")
    return all(r.get("primary") for r in rows) and not any(r.get("state") == "moving" for r in rows)


def transitions(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def trial(c: Cluster, agents: dict[str, Any], watch: EventWatch, log: Path, k: int) -> dict[str, Any]:
    held = wait(lambda: {n: s for n, s in primaries(c).items() if s}, 30, "primaries")
    victim = sorted(held, key=lambda n: (-len(held[n]), (NODES.index(n) - k) % 3))[0]
    shards = set(held[victim])
    t_wall, t_mono = time.time(), time.monotonic()
    c.kill(agents[victim], signal.SIGKILL)

    def done() -> dict[str, float] | None:
        ends: dict[str, float] = {}
        for f in transitions(log):
            if f[3] == "primary" and f[4] in shards and f[2] != victim and float(f[0]) > t_wall:
                ends.setdefault(f[4], float(f[1]))
        return ends if len(ends) == len(shards) else None

    ends = wait(done, 60, "every shard to have a new primary")
    dead = [t for t, e in watch.events if e.get("kind") == "member.dead" and t > t_mono]
    detection = (dead[0] - t_mono) if dead else float("nan")
    per_shard = sorted(e - t_wall for e in ends.values())
    # Back to three nodes and settled before the next trial.
    agents[victim] = c.agent(victim, NODES.index(victim) + 1)
    wait(lambda: settled(c) and any(primaries(c)[victim]), 90, f"{victim} to rejoin with primaries")
    return {
        "victim": victim,
        "shards": len(shards),
        "median": statistics.median(per_shard),
        "max": per_shard[-1],
        "detection": detection,
    }


def run(lease: float, trials: int) -> dict[str, Any]:
    with Cluster(f"unavail-{lease:g}") as c:
        log = c.tmp / "transitions.log"
        c.env.update(
            {
                **example_participant_env(c.tmp, log),
                "PHANTOM_PRIMARY_LEASE": str(lease),
                "PHANTOM_LEASE_DRIFT": str(DRIFT),
                "PHANTOM_DEAD_DELAY": "600",
            }
        )
        c.start("phantom_bus.broker")
        for s in SERVICES:
            c.start(f"services.{s}")
        agents = {n: c.agent(n, i + 1) for i, n in enumerate(NODES)}
        wait(lambda: settled(c) and all(primaries(c).values()), 90, "a settled cluster")
        watch = EventWatch(c.endpoint("events_out"), ["member."])
        try:
            rows = [trial(c, agents, watch, log, k) for k in range(trials)]
        finally:
            watch.close()
    medians = [r["median"] for r in rows]
    return {
        "lease": lease,
        "drift": DRIFT,
        "trials": rows,
        "median": statistics.median(medians),
        "spread": [min(medians), max(medians)],
        "max": max(r["max"] for r in rows),
        "detection": statistics.median(r["detection"] for r in rows),
    }


def main() -> int:
    interruptible()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--leases", default="1,2", help="primary_lease values to compare, seconds")
    args = ap.parse_args()
    results = [run(float(x), args.trials) for x in args.leases.split(",")]
    print(f"write unavailability after a primary's host dies (median of {args.trials} trials, seconds)")
    print(f"{'lease':>6} {'drift':>6} {'detect':>7} {'median':>7} {'spread':>13} {'worst':>6}")
    for r in results:
        lo, hi = r["spread"]
        print(
            f"{r['lease']:>6.2f} {r['drift']:>6.2f} {r['detection']:>7.2f} {r['median']:>7.2f} "
            f"{lo:>6.2f}..{hi:<5.2f} {r['max']:>6.2f}"
        )
    out = write_results("write_unavailability", {"host": host_info(), "results": results})
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
