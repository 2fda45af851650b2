"""Losing a whole control-plane host: how long until every service leads again, and what a client notices.

Three hosts (h1, h2, h3) on 127.0.0.1, each with its own broker and one
instance of discovery, membership, sharding, the balancer and the manager,
on a throwaway etcd, with three agents and the production leader lease
(``--ttl``, default 4 s). Two clients select (read and write) all the time:
one through the brokers (``routing="broker"``), one routing locally (the
library default). Then, host by host:

- ``kill``: SIGKILL every process of the host;
- ``freeze``: SIGSTOP every process of the host for 2 x ttl, then SIGCONT.

For each, the **takeover** of every service whose leader ran there (time
from the signal until another instance says it leads, in a newer term), and
each client's **stall**: the longest gap between two successful selects in
the ttl + 5 s after the signal, beside the longest gap in the 3 s before it
(the baseline of the same run: the client's own pace). Failed client
operations (after the client's retries) and selections whose epoch went
back are counted; both must be 0. After each round the host is restarted
(kill) or thawed (freeze) and the cluster must be green again before the
next one.

    .venv/bin/python bench/ha_failover.py [--ttl 4] [--ways kill,freeze] [--rounds 1]

Prints a table per way and a summary per service; writes
``bench/results/ha_failover.json``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loguru import logger

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._procs import fmt_spread, host_info, interruptible, log, summary, table, write_results  # noqa: E402
from tests.etcd_fixture import find_etcd, running_etcd  # noqa: E402
from tests.ha_hosts import LEADING, Hosts, Traffic, wait_for  # noqa: E402


def takeovers(ha: Hosts, before: dict[str, tuple[str, int] | None], host: str, t0: float,
              timeout: float) -> dict[str, float | None]:  # fmt: skip
    """Seconds from ``t0`` until each service that ``host`` led has another leader (in
    parallel, one watcher per service; None if none took over within ``timeout``)."""
    out: dict[str, float | None] = {}

    def watch(service: str, old: tuple[str, int]) -> None:
        try:
            ha.wait_new_leader(service, old, timeout)
            out[service] = time.monotonic() - t0
        except AssertionError:
            out[service] = None

    threads = [
        threading.Thread(target=watch, args=(s, seen), daemon=True)
        for s, seen in before.items()
        if seen is not None and seen[0] == host
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return out


def all_instances_back(ha: Hosts) -> bool:
    control = ha.status().get("control") or {}
    instances = control.get("instances") or {}
    return all(instances.get(s) == list(ha.hosts) for s in ("broker", "discovery", "membership", *LEADING))


def one_round(ha: Hosts, way: str, host: str, loads: dict[str, Traffic], ttl: float) -> dict[str, Any]:
    before = ha.leaders()
    errors_before = {name: len(t.errors) for name, t in loads.items()}
    regressions_before = {name: len(t.regressions) for name, t in loads.items()}
    t0 = time.monotonic()
    ha.signal_host(host, signal.SIGKILL if way == "kill" else signal.SIGSTOP)
    took = takeovers(ha, before, host, t0, timeout=ttl * 4 + 10)
    window_end = t0 + ttl + 5.0
    if way == "freeze":
        time.sleep(max(0.0, t0 + 2 * ttl - time.monotonic()))
        ha.signal_host(host, signal.SIGCONT)
    time.sleep(max(0.0, window_end - time.monotonic()))
    stalls = {name: t.longest_gap(t0, window_end) for name, t in loads.items()}
    # The baseline, same run: the longest gap in the 3 s before the signal (the client's own pace).
    normal = {name: t.longest_gap(t0 - 3.0, t0) for name, t in loads.items()}
    if way == "kill":
        ha.start_host(host)
    ha.wait_green(timeout=240)
    wait_for(lambda: all_instances_back(ha), 60, interval=0.5, what="every instance registered again")
    return {
        "way": way,
        "host": host,
        "led": sorted(took),
        "takeover_s": took,
        "stall_s": stalls,
        "normal_gap_s": normal,
        "failed_ops": {name: len(t.errors) - errors_before[name] for name, t in loads.items()},
        "epoch_regressions": {name: len(t.regressions) - regressions_before[name] for name, t in loads.items()},
        "errors": {name: t.errors[errors_before[name]:][:3] for name, t in loads.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttl", type=float, default=4.0, help="leader lease (s)")
    parser.add_argument("--ways", default="kill,freeze", help="kill, freeze or both")
    parser.add_argument("--rounds", type=int, default=1, help="times each host is lost per way")
    args = parser.parse_args()
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or any(w not in ("kill", "freeze") for w in ways):
        parser.error("--ways takes kill and/or freeze")
    interruptible()
    logger.remove()  # the in-process clients' debug lines are not the figures
    logger.add(sys.stderr, level="WARNING")
    binary, why = find_etcd()
    if binary is None:
        print(f"ha_failover: {why}", file=sys.stderr)
        return 1
    rounds: list[dict[str, Any]] = []
    info = host_info()
    with running_etcd(binary) as etcd:
        tmp = Path(tempfile.mkdtemp(prefix="phantom-bench-ha-"))
        ha = Hosts(tmp, etcd.url, ttl=args.ttl, copy_time="0.1", dead_delay="600")
        loads: dict[str, Traffic] = {}
        try:
            for h in ha.hosts:
                ha.start_host(h)
            for n in (1, 2, 3):
                ha.start_agent(n)
            log("waiting for green")
            ha.wait_green(timeout=240)
            wait_for(lambda: all_instances_back(ha), 60, interval=0.5, what="every instance registered")
            events = ha.env["PHANTOM_EVENTS_OUT"]
            loads = {
                "brokered": Traffic(ha.brokers, events, routing="broker", pause=0.01),
                "local": Traffic(ha.brokers, events, routing="local", pause=0.01),
            }
            for t in loads.values():
                t.start()
            for t in loads.values():
                t.wait_ops(20, 60)
            for _ in range(args.rounds):
                for way in ways:
                    for host in ha.hosts:
                        log(f"{way} {host}")
                        rounds.append(one_round(ha, way, host, loads, args.ttl))
                        log(f"  {rounds[-1]['takeover_s']} stall {rounds[-1]['stall_s']}")
        finally:
            for t in loads.values():
                t.halt.set()
            for t in loads.values():
                t.join(30)
            ha.close()
    for way in ways:
        rows = []
        for r in (r for r in rounds if r["way"] == way):
            took = ", ".join(
                f"{s} {v:.2f}" if v is not None else f"{s} none" for s, v in sorted(r["takeover_s"].items())
            )
            rows.append([r["host"], took or "(led nothing)", r["stall_s"]["brokered"], r["normal_gap_s"]["brokered"],
                         r["stall_s"]["local"], r["normal_gap_s"]["local"],
                         sum(r["failed_ops"].values()), sum(r["epoch_regressions"].values())])  # fmt: skip
        table(f"{way}: takeover per service (s), client stall (s) against its normal longest gap, ttl {args.ttl:g} s",
              ["host", "takeover", "stall brokered", "(normal)", "stall local", "(normal)", "failed ops",
               "epoch back"], rows)  # fmt: skip
    per_service: dict[str, dict[str, Any]] = {}
    for way in ways:
        for service in LEADING:
            xs = [v for r in rounds if r["way"] == way for s, v in r["takeover_s"].items() if s == service and v]
            per_service[f"{way}/{service}"] = summary(xs)
    stall = {f"{way}/{name}": summary([r["stall_s"][name] for r in rounds if r["way"] == way])
             for way in ways for name in ("brokered", "local")}  # fmt: skip
    figures = {**per_service, **{f"stall {k}": v for k, v in stall.items()}}
    table("summary: median (min..max), s", ["what", "n", "median (min..max)"],
          [[k, v.get("n", 0), fmt_spread(v)] for k, v in figures.items()])  # fmt: skip
    failed = sum(sum(r["failed_ops"].values()) for r in rounds)
    back = sum(sum(r["epoch_regressions"].values()) for r in rounds)
    out = write_results("ha_failover", {"host": info, "ttl": args.ttl, "rounds": rounds, "takeover": per_service,
                                        "stall": stall, "failed_ops": failed, "epoch_regressions": back})  # fmt: skip
    print(f"\nfailed client operations: {failed}, selections with an epoch that went back: {back}  ({out})")
    return 0 if failed == 0 and back == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
