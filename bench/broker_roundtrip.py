"""How much does the broker cost? Round trips through it against a raw pyzmq echo.

In one run, on free ports of 127.0.0.1:

* raw:    REQ -> ROUTER echo process (decodes the msgpack request, encodes a reply);
* floor:  REQ -> bare poll-loop forwarder -> DEALER echo -> forwarder -> REQ: the same
          four hops as the broker with nothing else, i.e. the least any broker design
          with a separate worker process can cost on this machine;
* frames: the floor's forwarder and worker speaking the Phantom frames (client
          ``[PHC1, service, reqid, body]``, worker ``[PHW1, REQ|REP, route, reqid,
          body]``): 20 frames on the wire per round trip against the floor's 10,
          and nothing else; the least any broker that keeps this wire contract can
          cost over four hops;
* broker: REQ -> broker -> echo service (phantom_bus.service) -> broker -> REQ,
          with the same payload and the Phantom frames.

Each is measured with 1 client (latency p50/p99 and throughput) and with 8
concurrent client processes (throughput). Several rounds; the table shows
the median and the spread (min..max) and the broker/raw ratios. The floors
and the broker run back to back in every round, in alternating order, and
the broker/floor figures are medians of the per-round ratios, so that a load
change on a shared machine hits both sides of a ratio alike. The CPU time the
path's processes spend per request is shown too (on a loaded VM it is
inflated as well, but less than wall-clock latency).

    python bench/broker_roundtrip.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phantom_bus import protocol  # noqa: E402
from tests.procs import free_port  # noqa: E402

PAYLOAD = {"op": "echo", "args": {"key": "user:42", "write": False, "n": 12345, "pad": "x" * 64}}


def echo_forever(sock: zmq.Socket[bytes]) -> None:
    """Answer every request on ``sock`` with its own arguments until SIGTERM ends the process."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        frames = sock.recv_multipart()
        doc = msgpack.unpackb(frames[-1], raw=False)
        frames[-1] = msgpack.packb({"ok": True, "result": doc["args"]}, use_bin_type=True)
        sock.send_multipart(frames)


def raw_echo_server(endpoint: str) -> None:
    """A bare ROUTER that decodes each request and answers it: the floor."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    echo_forever(sock)


def floor_worker(endpoint: str) -> None:
    """A bare DEALER echo worker behind :func:`floor_forwarder`."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart([b"ready"])
    echo_forever(sock)


def floor_forwarder(front: str, back: str) -> None:
    """The least any broker can do: a poll loop that passes frames to one worker and
    back, with no service names, liveness or checks. Client -> forwarder -> worker is
    four hops like the real broker, so this is the floor for that shape."""
    ctx = zmq.Context()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    fe.bind(front)
    be.bind(back)
    poller = zmq.Poller()
    poller.register(fe, zmq.POLLIN)
    poller.register(be, zmq.POLLIN)
    worker = None
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        ready = dict(poller.poll())
        if be in ready:
            frames = be.recv_multipart()
            if worker is None:
                worker = frames[0]
            else:
                fe.send_multipart(frames[1:])
        if fe in ready and worker is not None:
            fe_frames = fe.recv_multipart()
            be.send_multipart([worker, *fe_frames])


def frames_worker(endpoint: str) -> None:
    """A bare DEALER echo worker that speaks the worker protocol's frames
    (``[PHW1, REQ, route, reqid, body]`` in, ``[PHW1, REP, route, reqid, reply]``
    out) and nothing else: no heartbeats, no checks, a blocking receive."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart([b"ready"])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        _, _, route, reqid, body = sock.recv_multipart()
        doc = msgpack.unpackb(body, raw=False)
        reply = msgpack.packb({"ok": True, "result": doc["args"]}, use_bin_type=True)
        sock.send_multipart([protocol.WORKER, protocol.REPLY, route, reqid, reply])


def frames_forwarder(front: str, back: str) -> None:
    """:func:`floor_forwarder` with the Phantom frames on both sides: a client
    request ``[id, "", PHC1, service, reqid, body]`` goes to the worker as
    ``[worker, PHW1, REQ, route, reqid, body]`` and the reply comes back as
    ``[id, "", PHC1, service, reqid, body]``; the route is the client identity,
    nothing is checked or looked up. The floor of any broker that speaks this
    protocol over four hops: what separates it from :func:`floor_forwarder` is
    only the number of frames the wire contract puts on each hop."""
    ctx = zmq.Context()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    fe.bind(front)
    be.bind(back)
    poller = zmq.Poller()
    poller.register(fe, zmq.POLLIN)
    poller.register(be, zmq.POLLIN)
    worker = None
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        ready = dict(poller.poll())
        if be in ready:
            frames = be.recv_multipart()
            if worker is None:
                worker = frames[0]
            else:
                _, _, _, route, reqid, body = frames
                fe.send_multipart([route, b"", protocol.CLIENT, b"echo", reqid, body])
        if fe in ready and worker is not None:
            ident, _, _, _, reqid, body = fe.recv_multipart()
            be.send_multipart([worker, protocol.WORKER, protocol.REQUEST, ident, reqid, body])


def client_loop(endpoint: str, via_broker: bool, seconds: float, out: Any, record: bool) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    body = msgpack.packb(PAYLOAD, use_bin_type=True)
    frames = [protocol.CLIENT, b"echo", b"", body] if via_broker else [body]
    # Warm up: connections, first-call costs.
    for _ in range(200):
        sock.send_multipart(frames)
        sock.recv_multipart()
    samples: list[float] = []
    count = 0
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        t0 = time.perf_counter()
        sock.send_multipart(frames)
        reply = sock.recv_multipart()
        now = time.perf_counter()
        if record:
            samples.append(now - t0)
        count += 1
    assert msgpack.unpackb(reply[-1], raw=False)["ok"]
    out.put({"count": count, "elapsed": now - start, "samples": samples})
    sock.close()
    ctx.term()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by the processes ``pids``."""
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def measure(endpoint: str, via_broker: bool, clients: int, seconds: float,
            servers: list[int] | None = None) -> dict[str, float]:
    """Round trips through ``endpoint``; with ``servers`` (the pids on the path),
    also their CPU time per request: what the path costs whatever the load."""
    q: Any = mp.Queue()
    procs = [
        mp.Process(target=client_loop, args=(endpoint, via_broker, seconds, q, clients == 1)) for _ in range(clients)
    ]
    cpu0 = [cpu_seconds([pid]) for pid in servers or []]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    cpu1 = [cpu_seconds([pid]) for pid in servers or []]
    for p in procs:
        p.join()
    total = sum(r["count"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    out = {"throughput": total / elapsed}
    if servers:
        # Includes the 200 warm-up round trips of each client.
        per = [(b - a) / (total + 200 * clients) * 1e6 for a, b in zip(cpu0, cpu1, strict=True)]
        out["cpu_us"] = sum(per)
        if len(per) == 2:  # the forwarder (or broker), then the worker (or echo service)
            out["cpu_front_us"], out["cpu_worker_us"] = per
    if clients == 1:
        s = sorted(results[0]["samples"])
        out["p50_us"] = s[len(s) // 2] * 1e6
        out["p99_us"] = s[int(len(s) * 0.99)] * 1e6
    return out


def start_broker_stack(env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    procs = [
        subprocess.Popen([sys.executable, "-m", "phantom_bus.broker"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL),
    ]
    procs.append(
        subprocess.Popen(
            os.environ.get("ECHO_CMD", f"{sys.executable} -m services.echo").split(),
            env=env,
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
    )
    return procs


def wait_for_echo(endpoint: str) -> None:
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart([protocol.CLIENT, b"echo", b"", protocol.encode_request("ping")])
        if sock.poll(500):
            ok, _ = protocol.decode_reply(sock.recv_multipart()[-1])
            sock.close()
            if ok:
                return
        sock.close()
        time.sleep(0.1)
    raise RuntimeError("echo service did not come up")


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}..{max(values):,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backend-ipc", action="store_true", help="broker <-> worker over ipc://")
    args = parser.parse_args()

    raw_ep = f"tcp://127.0.0.1:{free_port()}"
    ports = {k: free_port() for k in ("BROKER", "BACKEND", "EVENTS_IN", "EVENTS_OUT")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update({f"PHANTOM_{k}": f"tcp://127.0.0.1:{p}" for k, p in ports.items()})
    if args.backend_ipc:
        # Services on the broker's host may reach it over a Unix socket.
        env["PHANTOM_BACKEND"] = f"ipc:///tmp/phantom-bench-{os.getpid()}.sock"
    env["PHANTOM_LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("PHANTOM_SECURITY", "off")  # the raw bus, for its clients here too
    env.setdefault("PHANTOM_SECURITY", "off")
    broker_ep = env["PHANTOM_BROKER"]

    raw = mp.Process(target=raw_echo_server, args=(raw_ep,), daemon=True)
    raw.start()
    floor_ep, floor_back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    floor = [
        mp.Process(target=floor_forwarder, args=(floor_ep, floor_back), daemon=True),
        mp.Process(target=floor_worker, args=(floor_back,), daemon=True),
    ]
    frames_ep, frames_back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    floor += [
        mp.Process(target=frames_forwarder, args=(frames_ep, frames_back), daemon=True),
        mp.Process(target=frames_worker, args=(frames_back,), daemon=True),
    ]
    for p in floor:
        p.start()
    stack = start_broker_stack(env)
    rows: dict[str, dict[str, list[float]]] = {"raw": {}, "floor": {}, "frames": {}, "broker": {}}
    try:
        wait_for_echo(broker_ep)
        pids = {"raw": [raw.pid], "floor": [p.pid for p in floor[:2]], "frames": [p.pid for p in floor[2:]],
                "broker": [p.pid for p in stack]}
        paths = [("raw", raw_ep, False), ("floor", floor_ep, False), ("frames", frames_ep, True),
                 ("broker", broker_ep, True)]
        for r in range(args.rounds):
            # Floors and broker back to back, in alternating order: a load change
            # on a shared machine then hits both sides of a round's ratio alike.
            order = paths if r % 2 == 0 else [paths[0], paths[3], paths[2], paths[1]]
            for name, ep, via in order:
                one = measure(ep, via, 1, args.seconds, pids[name])
                many = measure(ep, via, args.concurrency, args.seconds)
                split = [(k, one[k]) for k in ("cpu_front_us", "cpu_worker_us") if k in one]
                for key, value in (
                    ("p50_us", one["p50_us"]),
                    ("p99_us", one["p99_us"]),
                    ("cpu_us", one["cpu_us"]),
                    *split,
                    ("rps_1", one["throughput"]),
                    (f"rps_{args.concurrency}", many["throughput"]),
                ):
                    rows[name].setdefault(key, []).append(value)
    finally:
        raw.terminate()
        for p in floor:
            p.terminate()
        for p in stack:
            p.terminate()
        for p in stack:
            p.wait(10)

    c = args.concurrency
    med = {n: {k: statistics.median(v) for k, v in rows[n].items()} for n in rows}
    ratios = {
        "p50": med["broker"]["p50_us"] / med["raw"]["p50_us"],
        "p99": med["broker"]["p99_us"] / med["raw"]["p99_us"],
        "rps_1": med["broker"]["rps_1"] / med["raw"]["rps_1"],
        f"rps_{c}": med["broker"][f"rps_{c}"] / med["raw"][f"rps_{c}"],
    }
    print(f"broker round trip, {args.rounds} rounds x {args.seconds:g} s, median (min..max)")
    print(f"{'path':8} {'p50 us':>16} {'p99 us':>16} {'req/s 1 client':>22} {f'req/s {c} clients':>22}")
    for name in ("raw", "floor", "frames", "broker"):
        r = rows[name]
        print(
            f"{name:8} {med[name]['p50_us']:>6.0f} ({spread(r['p50_us']):>8}) "
            f"{med[name]['p99_us']:>6.0f} ({spread(r['p99_us']):>8}) "
            f"{med[name]['rps_1']:>8,.0f} ({spread(r['rps_1']):>12}) "
            f"{med[name][f'rps_{c}']:>8,.0f} ({spread(r[f'rps_{c}']):>12})"
        )
    print(
        f"{'ratio':8} p50 {ratios['p50']:.2f}x (goal <= 2.0)  p99 {ratios['p99']:.2f}x  "
        f"req/s 1: {ratios['rps_1']:.2f}x  req/s {c}: {ratios[f'rps_{c}']:.2f}x (goal >= 0.5)"
    )
    # The broker against the floor round by round (same load), then the median.
    per_round = sorted(b / f for b, f in zip(rows["broker"]["p50_us"], rows["floor"]["p50_us"], strict=True))
    floor_ratio = {
        "p50": med["floor"]["p50_us"] / med["raw"]["p50_us"],
        f"rps_{c}": med["floor"][f"rps_{c}"] / med["raw"][f"rps_{c}"],
        "broker_over_floor_p50": statistics.median(per_round),
        "broker_over_floor_p50_rounds": per_round,
    }
    per_round_frames = sorted(b / f for b, f in zip(rows["broker"]["p50_us"], rows["frames"]["p50_us"], strict=True))
    frames_over_floor = sorted(f / g for f, g in zip(rows["frames"]["p50_us"], rows["floor"]["p50_us"], strict=True))
    floor_ratio["broker_over_frames_p50"] = statistics.median(per_round_frames)
    floor_ratio["broker_over_frames_p50_rounds"] = per_round_frames
    floor_ratio["frames_over_floor_p50"] = statistics.median(frames_over_floor)
    floor_ratio["frames_over_floor_p50_rounds"] = frames_over_floor
    cpu_rounds = sorted(b / f for b, f in zip(rows["broker"]["cpu_us"], rows["floor"]["cpu_us"], strict=True))
    floor_ratio["broker_over_floor_cpu"] = statistics.median(cpu_rounds)
    floor_ratio["broker_over_floor_cpu_rounds"] = cpu_rounds
    ratios.update({f"floor_{k}": v for k, v in floor_ratio.items()})
    print(
        f"{'floor':8} a bare 4-hop forwarder: p50 {floor_ratio['p50']:.2f}x raw, req/s {c}: "
        f"{floor_ratio[f'rps_{c}']:.2f}x raw; the broker's p50 is "
        f"{floor_ratio['broker_over_floor_p50']:.2f}x the floor "
        f"(median of {len(per_round)} rounds, {per_round[0]:.2f}..{per_round[-1]:.2f}; goal <= 1.2)"
    )
    print(
        f"{'frames':8} the same forwarder speaking the protocol's frames (20 on the wire per round trip, against 10): "
        f"p50 {floor_ratio['frames_over_floor_p50']:.2f}x the floor "
        f"({frames_over_floor[0]:.2f}..{frames_over_floor[-1]:.2f}); the broker's p50 is "
        f"{floor_ratio['broker_over_frames_p50']:.2f}x this protocol floor "
        f"({per_round_frames[0]:.2f}..{per_round_frames[-1]:.2f})"
    )
    print(
        f"{'cpu':8} CPU time per request of the processes on the path (1 client): raw "
        f"{med['raw']['cpu_us']:.0f} us, floor {med['floor']['cpu_us']:.0f} us (forwarder + worker), broker "
        f"{med['broker']['cpu_us']:.0f} us (broker + echo service): {floor_ratio['broker_over_floor_cpu']:.2f}x the "
        f"floor (median of rounds, {cpu_rounds[0]:.2f}..{cpu_rounds[-1]:.2f})"
    )
    print(
        f"{'':8} per process: forwarder {med['floor']['cpu_front_us']:.0f} + worker "
        f"{med['floor']['cpu_worker_us']:.0f} us; protocol forwarder {med['frames']['cpu_front_us']:.0f} + "
        f"worker {med['frames']['cpu_worker_us']:.0f} us; broker {med['broker']['cpu_front_us']:.0f} + "
        f"echo service {med['broker']['cpu_worker_us']:.0f} us"
    )
    print(f"load average: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")
    out = ROOT / "bench" / "results" / "broker_roundtrip.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "median": med, "ratios": ratios, "args": vars(args),
                               "load_average": list(os.getloadavg())}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
