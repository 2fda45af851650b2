"""How fast is ``Client.select`` through the broker, against a raw pyzmq echo?

In one run, on free ports of 127.0.0.1:

* raw:    REQ -> ROUTER echo process (``bench.broker_roundtrip.raw_echo_server``:
          decodes the msgpack request, encodes a reply): the floor of one round
          trip between two Python processes on this machine;
* lookup: ``Client.select(key, lease=False)`` -> broker -> balancer -> broker -> client;
* lease:  ``Client.select(key)`` then ``Client.release(sel, ...)``: two round trips,
          reported as pairs (latency of the pair, pairs per second).

A whole cluster runs: broker, discovery, membership, sharding, balancer,
manager and 3 agents, green before measuring. Each path is measured with 1
client process (latency of every operation) and 8 concurrent client processes
(all start measuring together, after a warm-up, for the same window). Several
rounds, interleaved (raw, lookup, lease each round); tables show the median
over rounds and the spread (min..max); ratios are select over raw of the
medians. CPU of the broker and the balancer during the 8-client windows shows
which process saturates.

    python bench/select_throughput.py [--quick] [--rounds N] [--seconds S]

Writes ``bench/results/select_throughput.json``. ``start_cluster`` and
``wait_green`` are reused by ``bench/e2e.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import zmq  # noqa: E402

from bench._procs import (  # noqa: E402
    Cluster,
    CpuMeter,
    free_port,
    host_info,
    interruptible,
    log,
    machine_busy,
    table,
    write_results,
)
from bench.broker_roundtrip import PAYLOAD  # noqa: E402
from phantom_bus.client import Client  # noqa: E402
from phantom_bus.errors import PhantomError  # noqa: E402

SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
KEYS = [f"user:{i}" for i in range(4096)]


# --- the cluster (also used by bench/e2e.py) -------------------------------------------


def status(cluster: Cluster) -> dict[str, Any]:
    return cluster.status()


def wait_green(cluster: Cluster, timeout: float = 90.0) -> float:
    """Seconds until ``status()["health"] == "green"``; RuntimeError after ``timeout``."""
    t0 = time.monotonic()
    last: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout:
        last = status(cluster)
        if last.get("health") == "green":
            return time.monotonic() - t0
        time.sleep(0.2)
    cluster.failed = True
    raise RuntimeError(f"cluster not green within {timeout:g} s; last status: "
                       f"health={last.get('health')} shards={last.get('shards')} services={last.get('services')}")


def start_cluster(cluster: Cluster, agents: int, **env: str) -> dict[str, subprocess.Popen[bytes]]:
    """Broker, the five services and ``agents`` agents (node-1..), waiting until green."""
    cluster.env.update({"PHANTOM_COPY_TIME": "0.1", **env})
    procs = {"broker": cluster.start("phantom_bus.broker")}
    for name in SERVICES:
        procs[name] = cluster.start(f"services.{name}")
    for n in range(1, agents + 1):
        procs[f"node-{n}"] = cluster.agent(f"node-{n}", n)
    took = wait_green(cluster)
    log(f"cluster green after {took:.1f} s ({agents} agents)")
    return procs


# --- client processes -------------------------------------------------------------------


def _raw_server(endpoint: str) -> None:
    from bench.broker_roundtrip import raw_echo_server

    raw_echo_server(endpoint)


def client_proc(mode: str, endpoint: str, seconds: float, warmup: int, seed: int,
                barrier: Any, out: Any) -> None:
    """One client: warm up, wait for the others, then run ``mode`` for ``seconds``."""
    import random

    rng = random.Random(seed)
    ctx = zmq.Context()
    samples: list[float] = []
    errors = 0
    count = 0
    try:
        if mode == "raw":
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            body = msgpack.packb(PAYLOAD, use_bin_type=True)

            def op() -> None:
                sock.send(body)
                reply = sock.recv()
                assert msgpack.unpackb(reply, raw=False)["ok"]
        else:
            client = Client(endpoint, timeout=2.0, retries=1, ctx=ctx, routing="broker")

            if mode == "lookup":
                def op() -> None:
                    client.select(KEYS[int(rng.random() * len(KEYS))], lease=False)
            else:
                def op() -> None:
                    t = time.perf_counter()
                    sel = client.select(KEYS[int(rng.random() * len(KEYS))])
                    # What a real caller would report: its own request's latency (here the select's).
                    client.release(sel, latency_ms=(time.perf_counter() - t) * 1000.0, ok=True)
        for _ in range(warmup):
            op()
        barrier.wait(60)
        start = time.perf_counter()
        end = start + seconds
        now = start
        while now < end:
            t0 = now
            try:
                op()
            except PhantomError:
                errors += 1
            now = time.perf_counter()
            samples.append(now - t0)
            count += 1
        out.put({"count": count, "elapsed": now - start, "samples": samples, "errors": errors})
    except Exception as exc:  # report, never hang the parent
        out.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        ctx.destroy(0)


def measure(mode: str, endpoint: str, clients: int, seconds: float, warmup: int,
            cpu: CpuMeter | None) -> dict[str, Any]:
    mpc = mp.get_context("spawn")  # no zmq context inherited through fork
    q: Any = mpc.Queue()
    barrier = mpc.Barrier(clients + 1)
    procs = [mpc.Process(target=client_proc, args=(mode, endpoint, seconds, warmup, i, barrier, q), daemon=True)
             for i in range(clients)]
    for p in procs:
        p.start()
    try:
        barrier.wait(120)
        if cpu is not None:
            cpu.start()
        results = [q.get(timeout=seconds + 120) for _ in procs]
        used = cpu.read() if cpu is not None else {}
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    bad = [r["error"] for r in results if "error" in r]
    if bad:
        raise RuntimeError(f"{mode} client failed: {bad[0]}")
    samples = sorted(s for r in results for s in r["samples"])
    elapsed = max(r["elapsed"] for r in results)
    return {
        "throughput": sum(r["count"] for r in results) / elapsed,
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
        "errors": sum(r["errors"] for r in results),
        "cpu": used,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 1.5 s (< 1 min)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the process logs")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    warmup = 100 if args.quick else 300
    c = args.concurrency
    interruptible()

    cluster = Cluster("select", log_level="WARNING", keep=args.keep)
    data: dict[str, dict[str, list[Any]]] = {m: {} for m in ("raw", "lookup", "lease")}
    busy = machine_busy(0.5)
    try:
        raw_ep = f"tcp://127.0.0.1:{free_port()}"
        serve = f"from bench.select_throughput import _raw_server; _raw_server({raw_ep!r})"
        cluster.spawn([sys.executable, "-c", serve], "raw-echo")
        procs = start_cluster(cluster, agents=3)
        broker_ep = cluster.endpoint("broker")
        cpu = CpuMeter({"broker": procs["broker"].pid, "balancer": procs["balancer"].pid})
        for r in range(rounds):
            for mode, ep in (("raw", raw_ep), ("lookup", broker_ep), ("lease", broker_ep)):
                one = measure(mode, ep, 1, seconds, warmup, None)
                many = measure(mode, ep, c, seconds, warmup // 4, cpu)
                d = data[mode]
                for key, value in (("p50_us_1", one["p50_us"]), ("p99_us_1", one["p99_us"]),
                                   ("rps_1", one["throughput"]), (f"p50_us_{c}", many["p50_us"]),
                                   (f"p99_us_{c}", many["p99_us"]), (f"rps_{c}", many["throughput"]),
                                   ("errors", one["errors"] + many["errors"]),
                                   (f"cpu_broker_{c}", many["cpu"].get("broker")),
                                   (f"cpu_balancer_{c}", many["cpu"].get("balancer"))):
                    d.setdefault(key, []).append(value)
            log(f"round {r + 1}/{rounds}: raw {data['raw']['rps_1'][-1]:,.0f}/s, lookup "
                f"{data['lookup']['rps_1'][-1]:,.0f}/s, lease pairs {data['lease']['rps_1'][-1]:,.0f}/s (1 client)")
    finally:
        cluster.close()

    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in data.items()}

    def cell(mode: str, key: str, fmt: str = "{:,.0f}") -> str:
        xs = data[mode][key]
        return f"{fmt.format(med[mode][key])} ({fmt.format(min(xs))}..{fmt.format(max(xs))})"

    labels = {"raw": "raw pyzmq echo", "lookup": "select lease=False", "lease": "select+release pair"}
    rows = [[labels[m], cell(m, "p50_us_1"), cell(m, "p99_us_1"), cell(m, "rps_1"), cell(m, f"p50_us_{c}"),
             cell(m, f"p99_us_{c}"), cell(m, f"rps_{c}"), sum(data[m]["errors"])] for m in data]
    table(f"select through the broker vs raw echo; {rounds} rounds x {seconds:g} s, median (min..max); "
          f"machine busy at start {busy:.0%} of 2 cores",
          ["path", "p50 us (1)", "p99 us (1)", "ops/s (1)", f"p50 us ({c})", f"p99 us ({c})", f"ops/s ({c})",
           "errors"], rows)
    ratios: dict[str, dict[str, float]] = {}
    ratio_rows = []
    for m in ("lookup", "lease"):
        ratios[m] = {k: med[m][k] / med["raw"][k] for k in ("p50_us_1", "p99_us_1", "rps_1", f"p50_us_{c}",
                                                            f"p99_us_{c}", f"rps_{c}")}
        ratio_rows.append([labels[m] + " / raw", *(f"{ratios[m][k]:.2f}x" for k in ratios[m])])
    table("ratios (a pair is two round trips; latency ratio > 1 and throughput ratio < 1 mean slower than raw)",
          ["ratio", "p50 (1)", "p99 (1)", "ops/s (1)", f"p50 ({c})", f"p99 ({c})", f"ops/s ({c})"], ratio_rows)
    cpu_rows = [[labels[m], f"{med[m][f'cpu_broker_{c}']:.2f}", f"{med[m][f'cpu_balancer_{c}']:.2f}"]
                for m in ("lookup", "lease")]
    table(f"CPU during the {c}-client windows (1.0 = one core), median", ["path", "broker", "balancer"], cpu_rows)
    out = write_results("select_throughput", {
        "rounds": rounds, "seconds": seconds, "concurrency": c, "data": data, "median": med,
        "ratios": ratios, "machine_busy_at_start": busy, "host": host_info(), "quick": args.quick,
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
