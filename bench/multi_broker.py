"""What do several brokers cost, and what does losing one cost a client?

Two clusters run side by side on free ports of 127.0.0.1, the same services
and three agents in each: one with a single broker, one with three brokers
(every service registered with all three, every process given the lists).
Rounds alternate between them, so both see the same machine noise; each
round is one client making brokered selects (``routing="broker"``, a
release after each) for ``--seconds``: select latency p50/p99 and
throughput, median and spread over the rounds, and the three/one ratio. A
third row has the three-broker cluster with a client given only the first
broker: the difference from the second row is what the client's failover
logic costs, the difference from the first what the cluster's extra brokers
cost (every event relayed and decoded three times, three sets of heartbeats).

Then, on the three-broker cluster, under the same load from ``--clients``
threads, the broker every client prefers is SIGKILLed, and later the next
one is frozen (SIGSTOP, a hung host): for each, failed operations (after the
client's own retries) and the longest gap between two successful selects of
any one client.

    python bench/multi_broker.py [--seconds 3] [--rounds 5] [--clients 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._procs import (  # noqa: E402
    Cluster,
    fmt_spread,
    free_port,
    host_info,
    interruptible,
    log,
    summary,
    table,
    write_results,
)
from phantom_bus.client import Client  # noqa: E402
from phantom_bus.errors import PhantomError  # noqa: E402
from tests.procs import BrokeredLoad  # noqa: E402

SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
BUS = ("broker", "backend", "events_in", "events_out")


class Brokers:
    """A cluster whose bus is ``count`` brokers; every other process gets the lists."""

    def __init__(self, count: int) -> None:
        self.cluster = Cluster(f"brokers{count}")
        self.count = count
        self.ports = [{k: free_port() for k in BUS} for _ in range(count)]
        for key in BUS:
            self.cluster.env[f"PHANTOM_{key.upper()}"] = ",".join(
                f"tcp://127.0.0.1:{p[key]}" for p in self.ports
            )
        self.cluster.env["PHANTOM_COPY_TIME"] = "0.1"
        self.brokers: list[Any] = []

    @property
    def endpoint(self) -> str:
        return self.cluster.endpoint("broker")

    def start(self) -> None:
        c = self.cluster
        for i, ports in enumerate(self.ports, 1):
            own = {f"PHANTOM_{k.upper()}": f"tcp://127.0.0.1:{v}" for k, v in ports.items()}
            self.brokers.append(c.start("phantom_bus.broker", name=f"broker{i}", PHANTOM_INSTANCE=f"b{i}", **own))
        for name in SERVICES:
            c.start(f"services.{name}")
        for n in (1, 2, 3):
            c.agent(f"node-{n}", n)

    def wait_green(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with Client(self.endpoint, timeout=2.0, retries=1, routing="broker") as client:
                    if client.status().get("health") == "green":
                        return
            except PhantomError:
                pass
            time.sleep(0.5)
        self.cluster.failed = True
        raise RuntimeError(f"the {self.count}-broker cluster did not turn green within {timeout:g} s")


def select_round(endpoint: str, seconds: float) -> dict[str, Any]:
    """One client, brokered selects and releases for ``seconds``: latencies in ms."""
    latencies: list[float] = []
    errors = 0
    with Client(endpoint, timeout=2.0, retries=3, routing="broker") as client:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            i += 1
            started = time.perf_counter()
            try:
                sel = client.select(f"user:{i % 500}")
            except PhantomError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            client.release(sel, latency_ms=1.0)
    latencies.sort()
    n = len(latencies)
    return {
        "selects": n,
        "errors": errors,
        "p50_ms": latencies[n // 2] if n else float("nan"),
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] if n else float("nan"),
        "per_s": n / seconds,
    }


def faults(three: Brokers, clients: int, seconds: float) -> list[dict[str, Any]]:
    """SIGKILL the broker every client prefers, then SIGSTOP the next, under load."""
    loads = [BrokeredLoad(three.endpoint, keys=500) for _ in range(clients)]
    for load in loads:
        load.start()
    out = []
    try:
        time.sleep(seconds)
        for fault, index, sig in (("SIGKILL", 0, signal.SIGKILL), ("SIGSTOP", 1, signal.SIGSTOP)):
            before = [load.ok for load in loads]
            failed = sum(load.failed for load in loads)
            now = time.monotonic()
            for load in loads:
                load.mark(now)
            three.cluster.kill(three.brokers[index], sig)
            time.sleep(seconds)
            out.append({
                "fault": f"{fault} broker {index + 1} of 3",
                "clients": clients,
                "failed": sum(load.failed for load in loads) - failed,
                "selects_after": [load.ok - b for load, b in zip(loads, before, strict=True)],
                "longest_gap_s": max(load.gap_after_kill for load in loads),
            })
    finally:
        for load in loads:
            load.halt.set()
        for load in loads:
            load.join(20)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per cluster")
    parser.add_argument("--clients", type=int, default=3, help="load threads for the broker kill")
    args = parser.parse_args()
    interruptible()
    one, three = Brokers(1), Brokers(3)
    try:
        for cluster in (one, three):
            cluster.start()
        for cluster in (one, three):
            cluster.wait_green()
        log("both clusters green; measuring")
        first_only = three.endpoint.split(",")[0]
        setups = {1: one.endpoint, 3: three.endpoint, 0: first_only}
        names = {1: "1 broker", 3: "3 brokers", 0: "3 brokers, client lists 1"}
        rounds: dict[int, list[dict[str, Any]]] = {k: [] for k in setups}
        for r in range(args.rounds):
            order = [1, 3, 0] if r % 2 == 0 else [0, 3, 1]
            for key in order:
                rounds[key].append(select_round(setups[key], args.seconds))
        rows, doc = [], {"host": host_info(), "seconds": args.seconds,
                         "rounds": {names[k]: v for k, v in rounds.items()}}
        for count in (1, 3, 0):
            p50 = summary([r["p50_ms"] for r in rounds[count]])
            p99 = summary([r["p99_ms"] for r in rounds[count]])
            rate = summary([r["per_s"] for r in rounds[count]])
            errors = sum(r["errors"] for r in rounds[count])
            rows.append([names[count], fmt_spread(p50, digits=3), fmt_spread(p99, digits=3),
                         fmt_spread(rate, digits=0), errors])
            doc[names[count]] = {"p50_ms": p50, "p99_ms": p99, "per_s": rate, "errors": errors}
        ratio = {
            key: statistics.median(r[key] for r in rounds[3]) / statistics.median(r[key] for r in rounds[1])
            for key in ("p50_ms", "p99_ms", "per_s")
        }
        doc["ratio_three_to_one"] = ratio
        rows.append(["3 / 1", f"{ratio['p50_ms']:.2f}", f"{ratio['p99_ms']:.2f}", f"{ratio['per_s']:.2f}", ""])
        table("brokered select, one client (median (min..max) over rounds)",
              ["bus", "p50 ms", "p99 ms", "selects/s", "errors"], rows)
        log("killing, then freezing, one of three brokers under load")
        doc["faults"] = hit = faults(three, args.clients, args.seconds)
        table("a broker lost under select load (three brokers)",
              ["fault", "clients", "failed ops", "selects after (per client)", "longest gap s"],
              [[f["fault"], f["clients"], f["failed"], f["selects_after"], f["longest_gap_s"]] for f in hit])
        print(f"\nwrote {write_results('multi_broker', doc)}")
        return 0
    finally:
        one.cluster.close()
        three.cluster.close()


if __name__ == "__main__":
    sys.exit(main())
