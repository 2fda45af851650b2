"""Discovery with real processes: how soon is a new agent seen, and how many nodes can one discovery follow?

Two questions, on free ports of 127.0.0.1:

1. **Start to discovered.** Time from spawning ``python -m services.agent`` to
   the ``node.discovered`` event arriving on the bus, at the default 1 s
   beacon interval and at 0.2 s. Each trial is split with the agent's own
   ``started`` stamp (its beacon field) and discovery's ``first_seen`` (both on
   this host's clocks): process start-up, first beacon accepted, event
   relayed. Baseline in the same run: spawning a Python that only imports the
   agent module (the floor of process start-up).

2. **Scale.** One discovery process fed by beacon sender processes that
   simulate N nodes at 1 Hz each, spread evenly over the second (each sender
   owns a slice of node ids, at most 5,000 per sender). For each N: discovery's
   CPU over three windows (psutil, fraction of one core), beacons accepted per
   second against beacons sent, false ``node.lost`` events, and event lag
   measured with probe nodes beaconed from this process meanwhile: first
   beacon sent -> ``node.discovered`` received, and last beacon sent ->
   ``node.lost`` received minus the expiry. It keeps up at N when it accepts
   what is sent, reports no false loss, and its CPU stays under 50 % of a core.
   Baseline in the same run (at 5,000 nodes): a bare pyzmq SUB that receives and
   msgpack-decodes the same beacons, the floor of the transport.

The sender processes share the same 2 cores as discovery; their CPU is
reported next to discovery's.

    .venv/bin/python bench/discovery.py [--quick] [--counts 1000,2000,5000,10000,20000,40000]

Prints tables and writes ``bench/results/discovery.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import (
    ROOT,
    Cluster,
    CpuMeter,
    EventWatch,
    fmt_spread,
    host_info,
    interruptible,
    log,
    summary,
    table,
    write_results,
)

from phantom_bus import protocol
from phantom_bus.errors import PhantomError
from services.discovery.beacon import Beacon, encode_beacon

NODES_PER_SENDER = 5000
EXPIRY_MULTIPLE = 5.0  # the default expiry is 5 beacon intervals


# --- roles run in child processes ----------------------------------------------------


def _beacon(node: str, n: int, instance: str, hb_interval: float = 0.25) -> bytes:
    return encode_beacon(
        Beacon(
            node=node,
            incarnation=1,
            instance=instance,
            address=f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}:7000",
            zone=f"z{n % 3 + 1}",
            weight=1.0,
            version="bench",
            started=time.time(),
            hb={"endpoint": "tcp://127.0.0.1:5561", "interval": hb_interval},
        )
    )


class _Stop(Exception):
    pass


def _on_term(*_: Any) -> None:
    raise _Stop


def _write_stat(path: str, count: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{count} {time.monotonic()}")
    os.replace(tmp, path)


def _role_socket(kind: int, hwm_option: int, hwm: int) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    """For a role process: SIGTERM ends it cleanly, and its own context and socket."""
    signal.signal(signal.SIGTERM, _on_term)
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(hwm_option, hwm)
    return ctx, sock


def role_sender(spec: dict[str, Any]) -> None:
    """Beacon ``count`` node ids at ``1/interval`` Hz each, phases spread over the interval."""
    ctx, sock = _role_socket(zmq.PUB, zmq.SNDHWM, 1_000_000)
    sock.connect(spec["endpoint"])
    instance = secrets.token_hex(8)
    first, count, interval = spec["first"], spec["count"], spec["interval"]
    payloads = [_beacon(f"{spec['prefix']}{i}", i, instance) for i in range(first, first + count)]
    header = protocol.BEACON
    step = interval / count
    time.sleep(0.3)  # the SUB's subscription has to reach this PUB, or the first round is dropped
    t0 = time.monotonic()
    sent = 0
    late: list[float] = []
    stat_at = t0
    try:
        while True:
            now = time.monotonic()
            # The node due now is number `sent`: its beacon was due at t0 + sent * step.
            due_upto = int((now - t0) / step) + 1
            if due_upto > sent:
                late.append(now - (t0 + sent * step))
                if len(late) > 100_000:
                    late = late[-50_000:]
            while sent < due_upto:
                sock.send(header, zmq.SNDMORE)
                sock.send(payloads[sent % count])
                sent += 1
            if now - stat_at >= 0.25:
                _write_stat(spec["stat"], sent)
                stat_at = now
            next_due = t0 + sent * step
            time.sleep(max(0.002, next_due - time.monotonic()))
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        _write_stat(spec["stat"], sent)
        late.sort()
        print(json.dumps({"sent": sent, "late_p50": late[len(late) // 2] if late else 0.0,
                          "late_p99": late[int(len(late) * 0.99)] if late else 0.0}), flush=True)
        sock.close(0)
        ctx.term()


def role_raw(spec: dict[str, Any]) -> None:
    """The floor: a bare SUB that receives and msgpack-decodes beacons, nothing else."""
    import msgpack

    ctx, sock = _role_socket(zmq.SUB, zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind(spec["endpoint"])
    received = 0
    stat_at = time.monotonic()
    try:
        while True:
            if sock.poll(100):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) == 2 and frames[0] == protocol.BEACON:
                        msgpack.unpackb(frames[1], raw=False)
                    received += 1
            now = time.monotonic()
            if now - stat_at >= 0.25:
                _write_stat(spec["stat"], received)
                stat_at = now
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        _write_stat(spec["stat"], received)
        sock.close(0)
        ctx.term()


def read_stat(path: Path) -> tuple[int, float]:
    try:
        count, at = path.read_text().split()
        return int(count), float(at)
    except (OSError, ValueError):
        return 0, time.monotonic()


# --- part 1: agent start -> node.discovered -------------------------------------------------


def import_floor(cluster: Cluster, trials: int) -> list[float]:
    """Seconds to spawn a Python that imports the agent module and exits."""
    out = []
    for _ in range(trials):
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", "import services.agent.agent, services.agent.__main__"],
            cwd=ROOT,
            env=cluster.env,
            check=True,
        )
        out.append(time.monotonic() - t0)
    return out


def start_to_discovered(cluster: Cluster, watch: EventWatch, interval: float, trials: int) -> dict[str, Any]:
    expiry = interval * EXPIRY_MULTIPLE
    env = {"PHANTOM_BEACON_INTERVAL": str(interval), "PHANTOM_BEACON_EXPIRY": str(expiry)}
    disc = cluster.start("services.discovery", name=f"discovery-{interval:g}", **env)
    rows: list[dict[str, Any]] = []
    try:
        cluster.wait_service("discovery")
        time.sleep(0.5)
        wall_minus_mono = time.time() - time.monotonic()
        for k in range(trials):
            node = f"start-{interval:g}-{k}-{secrets.token_hex(2)}"
            t0 = time.monotonic()
            agent = cluster.agent(node, k, **env)
            got = watch.wait_for(lambda e, n=node: e["kind"] == "node.discovered" and e.get("node") == n, t0, 20)
            if got is None:
                cluster.failed = True
                raise RuntimeError(f"{node}: no node.discovered within 20 s")
            t_event = got[0]
            doc = cluster.request("discovery", "node", node=node)
            started = float(doc["started"]) - wall_minus_mono  # agent init, on the monotonic clock
            first_seen = float(doc["first_seen"])
            rows.append(
                {
                    "node": node,
                    "total": t_event - t0,
                    "spawn_to_agent": started - t0,
                    "agent_to_accepted": first_seen - started,
                    "accepted_to_event": t_event - first_seen,
                    "first_beacon_missed": (first_seen - started) > 0.5 * interval,
                }
            )
            cluster.kill(agent, signal.SIGTERM)
            time.sleep(0.2)
    finally:
        cluster.stop([disc])
    return {
        "interval": interval,
        "trials": rows,
        "total": summary([r["total"] for r in rows]),
        "spawn_to_agent": summary([r["spawn_to_agent"] for r in rows]),
        "agent_to_accepted": summary([r["agent_to_accepted"] for r in rows]),
        "accepted_to_event": summary([r["accepted_to_event"] for r in rows]),
        "first_beacon_missed": sum(r["first_beacon_missed"] for r in rows),
    }


# --- part 2: scale ---------------------------------------------------------------------------


class Probes:
    """Probe nodes beaconed from this process: discovered lag and lost lag, under load."""

    def __init__(self, endpoint: str, tag: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.instance = secrets.token_hex(8)
        self.tag = tag
        self.first_send: dict[str, float] = {}
        self.last_send: dict[str, float] = {}
        self.sends: dict[str, int] = {}
        self.n = 0

    def send(self, node: str) -> None:
        payload = _beacon(node, 1, self.instance)
        now = time.monotonic()
        self.sock.send_multipart([protocol.BEACON, payload])
        self.first_send.setdefault(node, now)
        self.last_send[node] = now
        self.sends[node] = self.sends.get(node, 0) + 1

    def warm(self, watch: EventWatch) -> None:
        """Until a probe beacon gets through (the SUB's subscription reached this PUB)."""
        node = f"probe-{self.tag}-warm"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            self.send(node)
            if watch.wait_for(lambda e: e["kind"] == "node.discovered" and e.get("node") == node, t0, 0.3):
                return
        raise RuntimeError("probe beacons do not reach discovery")

    def run(self, seconds: float, beacons_each: int = 2) -> None:
        """For ``seconds``: a new probe node every second, each beaconed ``beacons_each`` times at 1 Hz."""
        live: dict[str, int] = {}
        t_end = time.monotonic() + seconds
        next_tick = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if now >= next_tick:
                node = f"probe-{self.tag}-{self.n}"
                self.n += 1
                live[node] = 0
                for p in list(live):
                    self.send(p)
                    live[p] += 1
                    if live[p] >= beacons_each:
                        del live[p]
                next_tick += 1.0
            time.sleep(max(0.0, min(next_tick, t_end) - time.monotonic()))
        # The rest are simply stopped: their last beacon stands.

    def lags(self, watch: EventWatch, expiry: float) -> tuple[list[float], list[float]]:
        disc, lost = [], []
        for node, t_first in self.first_send.items():
            if node.endswith("-warm"):
                continue
            evs = watch.since(t_first, node=node)
            d = [t for t, e in evs if e["kind"] == "node.discovered"]
            lo = [t for t, e in evs if e["kind"] == "node.lost"]
            if d:
                disc.append(d[0] - t_first)
            if lo:
                lost.append(lo[0] - self.last_send[node] - expiry)
        return disc, lost

    def close(self) -> None:
        self.sock.close(0)


def machine_cpu() -> tuple[float, float]:
    import psutil

    t = psutil.cpu_times()
    return time.monotonic(), float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def broker_log_time(line: str) -> float:
    """Unix time of a log line (loguru's local ``YYYY-MM-DD HH:MM:SS.mmm`` prefix)."""
    import datetime

    try:
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return 0.0


def discovery_stats(cluster: Cluster) -> dict[str, Any] | None:
    """Discovery's counters, or None if it does not answer within ~2 s (its loop is starved)."""
    try:
        with cluster.client(timeout=1.0, retries=2) as c:
            result: dict[str, Any] = c.request("discovery", "stats")
            return result
    except PhantomError:
        return None


def scale_point(
    cluster: Cluster, watch: EventWatch, nodes: int, warmup: float, windows: int, window: float, raw: bool = False
) -> dict[str, Any]:
    """One discovery (or the raw floor) fed ``nodes`` simulated nodes at 1 Hz.

    The senders all start at once, as after a restart of discovery in a
    cluster of ``nodes`` nodes: the time until every node is discovered is the
    cold-start figure. Steady-state windows start ``warmup`` seconds later.
    """
    interval, expiry = 1.0, EXPIRY_MULTIPLE
    tag = f"{'raw' if raw else 'n'}{nodes}"
    prefix = f"sim-{tag}-"
    stat_dir = cluster.tmp / f"stat-{tag}"
    stat_dir.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"nodes": nodes, "problems": []}
    try:
        if raw:
            target = cluster.spawn(
                [sys.executable, __file__, "_raw", json.dumps({"endpoint": cluster.endpoint("beacon"),
                                                                 "stat": str(stat_dir / "raw")})],
                "raw-sub",
            )
            procs.append(target)
            time.sleep(0.5)
        else:
            target = cluster.start("services.discovery", name=f"discovery-{tag}")
            procs.append(target)
            cluster.wait_service("discovery")
        senders = []
        per = math.ceil(nodes / math.ceil(nodes / NODES_PER_SENDER))
        stats_files = [stat_dir / f"sender-{first}" for first in range(0, nodes, per)]
        t_senders = time.monotonic()
        for first, stat in zip(range(0, nodes, per), stats_files, strict=True):
            spec = {
                "endpoint": cluster.endpoint("beacon"),
                "prefix": prefix,
                "first": first,
                "count": min(per, nodes - first),
                "interval": interval,
                "stat": str(stat),
            }
            senders.append(cluster.spawn([sys.executable, __file__, "_sender", json.dumps(spec)], "sender",
                                         stdout_pipe=True))
        procs.extend(senders)
        result["senders"] = len(senders)
        cpu_names = {"target": target.pid, **{f"sender{i}": p.pid for i, p in enumerate(senders)}}
        probes = None
        if not raw:
            # Cold start: every node new at once. Count node.discovered of the simulated ids.
            deadline = time.monotonic() + max(30.0, nodes / 1000)
            seen = 0
            while time.monotonic() < deadline:
                seen = sum(1 for _, e in watch.since(t_senders, kind="node.discovered")
                           if str(e.get("node", "")).startswith(prefix))
                if seen >= nodes:
                    break
                time.sleep(0.2)
            last = [t for t, e in watch.since(t_senders, kind="node.discovered")
                    if str(e.get("node", "")).startswith(prefix)]
            # Senders wait 0.3 s for their subscription before the first round.
            result["cold_start_s"] = (max(last) - t_senders - 0.3) if seen >= nodes else None
            result["cold_start_discovered"] = seen
            if seen < nodes:
                result["problems"].append(f"only {seen} of {nodes} nodes discovered")
            probes = Probes(cluster.endpoint("beacon"), tag)
            try:
                probes.warm(watch)
            except RuntimeError as exc:
                result["problems"].append(str(exc))
        time.sleep(max(0.0, t_senders + warmup - time.monotonic()))
        samples: list[dict[str, Any]] = []
        t_window = time.monotonic()
        for w in range(windows):
            meter = CpuMeter(cpu_names)
            meter.start()
            m0 = machine_cpu()
            sent0 = [read_stat(f) for f in stats_files]
            st0 = None if raw else discovery_stats(cluster)
            raw0 = read_stat(stat_dir / "raw")
            got0 = None if raw else (st0["beacons"] if st0 else None)
            t_st0 = time.monotonic()
            if probes:
                probes.run(window)
            else:
                time.sleep(window)
            cpu = meter.read()
            m1 = machine_cpu()
            sent1 = [read_stat(f) for f in stats_files]
            st1 = None if raw else discovery_stats(cluster)
            t_st1 = time.monotonic()
            # Each counter file carries the time it was written: rates over its own span.
            sent_rate = sum((c1 - c0) / max(1e-9, a1 - a0) for (c0, a0), (c1, a1) in zip(sent0, sent1, strict=True))
            if raw:
                raw1 = read_stat(stat_dir / "raw")
                received: float | None = (raw1[0] - raw0[0]) / max(1e-9, raw1[1] - raw0[1])
            elif got0 is not None and st1 is not None:
                received = (st1["beacons"] - got0) / (t_st1 - t_st0)
            else:
                received = None
            if received is None:
                result["problems"].append(f"window {w + 1}: discovery did not answer 'stats' (loop starved?)")
            samples.append(
                {
                    "cpu": cpu["target"],
                    "senders_cpu": sum(v for k, v in cpu.items() if k.startswith("sender")),
                    "machine_busy_cores": (m1[1] - m0[1]) / (m1[0] - m0[0]),
                    "sent_per_s": sent_rate,
                    "received_per_s": received,
                }
            )
            log(f"  {tag} window {w + 1}: cpu {cpu['target']:.3f} of a core, received "
                f"{'?' if received is None else f'{received:.0f}'}/s sent {samples[-1]['sent_per_s']:.0f}/s")
        result.update(
            windows=samples,
            cpu=summary([s["cpu"] for s in samples]),
            senders_cpu=summary([s["senders_cpu"] for s in samples]),
            machine_busy_cores=summary([s["machine_busy_cores"] for s in samples]),
            sent_per_s=summary([s["sent_per_s"] for s in samples]),
            received_per_s=summary([s["received_per_s"] for s in samples if s["received_per_s"] is not None]),
        )
        if probes:
            # The last probes' node.lost comes `expiry` after their last beacon.
            time.sleep(expiry + 1.5)
            disc, lost = probes.lags(watch, expiry)
            probes.close()
            stats = discovery_stats(cluster)
            false_lost = [e for t, e in watch.since(t_window, kind="node.lost")
                          if str(e.get("node", "")).startswith(prefix)]
            expected_lost = len([n for n in probes.first_send if not n.endswith("-warm")])
            result.update(
                discovered_lag=summary(disc),
                lost_lag=summary(lost),
                lost_probes_reported=f"{len(lost)}/{expected_lost}",
                false_lost=len(false_lost),
                dropped=stats["dropped"] if stats else None,
                table_alive=stats["alive"] if stats else None,
            )
            rec = result["received_per_s"].get("median")
            ratio = rec / max(1.0, result["sent_per_s"]["median"]) if rec is not None else 0.0
            result["received_over_sent"] = ratio
            if stats is None:
                result["problems"].append("discovery did not answer 'stats' after the windows")
            elif stats["dropped_total"]:
                result["problems"].append(f"dropped beacons {stats['dropped']}")
            if false_lost:
                result["problems"].append(f"{len(false_lost)} false node.lost")
            if len(lost) < expected_lost:
                result["problems"].append(f"node.lost for only {len(lost)} of {expected_lost} silenced probes")
            if ratio < 0.98:
                result["problems"].append(f"accepted {ratio:.1%} of the beacons sent")
            if result["cpu"]["median"] >= 0.5:
                result["problems"].append("CPU >= 50 % of a core")
            result["keeps_up"] = not result["problems"]
        for s in senders:
            s.send_signal(signal.SIGTERM)
        sender_stats = []
        for s in senders:
            try:
                out, _ = s.communicate(timeout=5)
                sender_stats.append(json.loads(out.decode().strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                pass
        result["sender_lateness_p99"] = max((s["late_p99"] for s in sender_stats), default=None)
        if not raw:
            # The broker logs each time it drops a worker that stopped heartbeating.
            window_wall = t_window + (time.time() - time.monotonic())
            drops = [broker_log_time(line) for line in cluster.log(cluster.procs[0]).splitlines()
                     if f"(pid {target.pid}) stopped heartbeating" in line]
            in_windows = sum(1 for t in drops if t >= window_wall)
            result["worker_dropped_by_broker"] = {"cold_start": len(drops) - in_windows, "steady": in_windows}
            if in_windows:
                result["problems"].append(
                    f"the broker dropped discovery's worker {in_windows}x in steady state: it stopped heartbeating "
                    "(event loop starved)"
                )
                result["keeps_up"] = False
        return result
    finally:
        cluster.stop(procs)


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (< 1 min)")
    parser.add_argument("--trials", type=int, help="agent starts per beacon interval")
    parser.add_argument("--intervals", help="beacon intervals for part 1, comma-separated (s)")
    parser.add_argument("--counts", help="simulated node counts for part 2, comma-separated")
    parser.add_argument("--window", type=float, help="seconds per CPU window")
    parser.add_argument("--keep", action="store_true", help="keep the process logs")
    args = parser.parse_args()
    quick = args.quick
    trials = args.trials or (5 if quick else 10)
    intervals = [float(x) for x in (args.intervals or ("1.0" if quick else "1.0,0.2")).split(",")]
    default_counts = "1000,5000" if quick else "1000,2000,5000,10000,20000,40000"
    counts = [int(x) for x in (args.counts or default_counts).split(",")]
    window = args.window or (3.0 if quick else 8.0)
    windows = 2 if quick else 3
    warmup = 4.0 if quick else 8.0

    interruptible()
    t_begin = time.monotonic()
    doc: dict[str, Any] = {"host": host_info(), "quick": quick,
                           "args": {"trials": trials, "intervals": intervals, "counts": counts,
                                    "window": window, "windows": windows, "warmup": warmup}}
    with Cluster("discovery", keep=args.keep) as cluster:
        cluster.start("phantom_bus.broker")
        cluster.wait_service("broker")
        watch = EventWatch(cluster.endpoint("events_out"), ["node."])
        try:
            # Part 1
            log("part 1: agent start -> node.discovered")
            floor = import_floor(cluster, 5 if not quick else 3)
            doc["import_floor"] = summary(floor)
            doc["start"] = []
            for interval in intervals:
                log(f"  beacon interval {interval:g} s, {trials} trials")
                doc["start"].append(start_to_discovered(cluster, watch, interval, trials))
            # Part 2
            log("part 2: scale")
            doc["scale"] = []
            for n in counts:
                log(f"  {n} simulated nodes")
                doc["scale"].append(scale_point(cluster, watch, n, warmup, windows, window))
            goal = 5000 if 5000 in counts or not quick else counts[-1]
            log(f"  baseline: raw SUB at {goal} nodes")
            doc["raw_floor"] = scale_point(cluster, watch, goal, warmup / 2, windows, window, raw=True)
        finally:
            watch.close()
    doc["elapsed_s"] = time.monotonic() - t_begin

    # --- tables ---
    fl = doc["import_floor"]
    rows = []
    for s in doc["start"]:
        rows.append([
            f"{s['interval']:g}",
            s["total"]["n"],
            fmt_spread(s["total"]),
            f"{s['total']['p90']:.2f}",
            fmt_spread(s["spawn_to_agent"]),
            fmt_spread(s["agent_to_accepted"]),
            fmt_spread(s["accepted_to_event"], 1000, 1),
            f"{s['first_beacon_missed']}/{s['total']['n']}",
        ])
    table(
        "1. agent spawn -> node.discovered on the bus, seconds, median (min..max)"
        f"   [floor: spawn python + import agent = {fmt_spread(fl)} s]",
        ["beacon s", "n", "total", "p90", "spawn->agent init", "init->beacon accepted", "accepted->event ms",
         "1st beacon lost"],
        rows,
    )
    rows = []
    for s in doc["scale"]:
        rec = s["received_per_s"].get("median")
        rows.append([
            s["nodes"],
            s["senders"],
            fmt_spread(s["cpu"], 100, 1),
            fmt_spread(s["senders_cpu"], 100, 0),
            f"{s['machine_busy_cores']['median']:.2f}",
            f"{'?' if rec is None else f'{rec:.0f}'}/{s['sent_per_s']['median']:.0f}",
            s["false_lost"],
            "-" if s.get("cold_start_s") is None else f"{s['cold_start_s']:.1f}",
            fmt_spread(s["discovered_lag"], 1000, 1),
            f"{fmt_spread(s['lost_lag'], 1000, 0)} [{s['lost_probes_reported']}]",
            "{cold_start}/{steady}".format(**s.get("worker_dropped_by_broker", {"cold_start": 0, "steady": 0})),
            "yes" if s["keeps_up"] else "NO",
        ])
    raw = doc["raw_floor"]
    table(
        "2. one discovery, N simulated nodes at 1 Hz; CPU % of one core, median (min..max) over "
        f"{windows} x {window:g} s windows (the senders share the same 2 cores)",
        ["nodes", "senders", "discovery CPU %", "senders CPU %", "machine cores busy", "recv/sent per s",
         "false lost", "cold start s", "discovered lag ms", "lost lag - expiry ms [reported]",
         "worker drops cold/steady",
         "keeps up"],
        rows,
    )
    for s in doc["scale"]:
        if s["problems"]:
            print(f"  {s['nodes']} nodes: " + "; ".join(dict.fromkeys(s["problems"])))
    ok = [s["nodes"] for s in doc["scale"] if s["keeps_up"]]
    doc["largest_kept_up"] = max(ok) if ok else None
    at = next((s for s in doc["scale"] if s["nodes"] == raw["nodes"]), None)
    if at:
        doc["discovery_over_raw_cpu"] = at["cpu"]["median"] / max(1e-9, raw["cpu"]["median"])
    print(
        "\nlargest count kept up (CPU < 50 %, all beacons accepted, no false node.lost, answers requests): "
        f"{doc['largest_kept_up']} (goal 5,000)\n"
        f"baseline at {raw['nodes']} nodes: bare SUB + msgpack decode {fmt_spread(raw['cpu'], 100, 1)} % "
        f"of a core, {raw['received_per_s']['median']:.0f} msgs/s"
        + (f"; discovery / bare = {doc['discovery_over_raw_cpu']:.1f}x" if at else "")
        + f"\nelapsed {doc['elapsed_s']:.0f} s"
    )
    out = write_results("discovery", doc)
    print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_sender":
        role_sender(json.loads(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "_raw":
        role_raw(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
