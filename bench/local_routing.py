"""Local routing: select speed, map-change propagation, memory (one run, same machine).

* **select+release / s** in one thread with ``Client(routing="local")`` (the
  real API, its follower thread running) against a live cluster, versus raw
  pyzmq REQ -> ROUTER echo round trips per second in one thread on the same
  machine (the floor of anything that asks the network). Goal: >= 100 x.
  In the same rounds, the **floor** of any CPython client: the contract's key
  hash, one table lookup and a result, nothing else; and the **semantic
  floor**: that plus the least a select+release must do (power of two
  choices over the replicas, a lease opened and closed, the latency EWMA
  updated), in the tightest CPython. Semantic floor / raw is the best ratio a
  CPython client with the select semantics can reach on this machine at this
  load; when it is below 100 x, the goal is out of reach of any such client.
* **propagation**: ``--clients`` (100) local clients (``RoutingFeed`` +
  ``LocalRouter``, exactly what ``AsyncClient`` runs) in ``--procs`` load
  processes; ``--changes`` map changes (``sharding.create_keyspace``); delay
  from the ``shardmap.changed`` publication (its ``ts``) to each client's
  router holding the new epoch. Goal: p99 <= 100 ms. Its floors, in the same
  run: as many bare subscribers in the same processes receiving a trivial
  event (``bench.ping``) from the broker at a quiet moment, and the map event
  itself reaching one bare subscriber in the (idle) bench process: at the
  moment of a change every follower of the control plane on this host reacts
  at once, and that delivery shows what the contention costs before any
  client does anything.
* **memory**: one client's router holding a 4,096-shard map (100 nodes, rf 3)
  after selecting keys of every shard (tracemalloc, Python heap).

Run: ``python bench/local_routing.py [--quick]``; writes
``bench/results/local_routing.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import random
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402
from loguru import logger  # noqa: E402

from bench._procs import Cluster, free_port, host_info, log, summary, table, write_results  # noqa: E402
from phantom_bus import protocol  # noqa: E402
from phantom_bus import security as secmod  # noqa: E402
from phantom_bus.client import AsyncClient, Client, Selection  # noqa: E402
from phantom_bus.local import RoutingFeed  # noqa: E402
from phantom_bus.routing.local import LocalRouter  # noqa: E402
from phantom_bus.shardmap import Keyspace, Replica, Shard, ShardMap  # noqa: E402
from phantom_bus.wire import LoopSocket  # noqa: E402

SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
KEYS = [f"user:{i}" for i in range(10_000)]


def _raw_server(endpoint: str) -> None:
    from bench.broker_roundtrip import raw_echo_server

    raw_echo_server(endpoint)


def raw_rate(endpoint: str, seconds: float) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    body = msgpack.packb({"op": "select", "args": {"key": "user:42", "write": False}}, use_bin_type=True)
    try:
        for _ in range(200):
            sock.send(body)
            sock.recv()
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            for _ in range(100):
                sock.send(body)
                msgpack.unpackb(sock.recv(), raw=False)
            n += 100
            now = time.perf_counter()
            if now >= end:
                return n / (now - start)
    finally:
        ctx.destroy(0)


def keyed_rate(op: Callable[[str], Any], seconds: float) -> float:
    """Calls of ``op`` per second on keys drawn from KEYS (the same draws every time)."""
    rng = random.Random(1)
    keys = KEYS
    size = len(keys)
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(1000):
            op(keys[int(rng.random() * size)])
        n += 1000
        now = time.perf_counter()
        if now >= end:
            return n / (now - start)


def local_rate(client: Client, seconds: float) -> float:
    def select_release(key: str) -> None:
        client.release(client.select(key), latency_ms=0.5, ok=True)

    return keyed_rate(select_release, seconds)


def floor_rate(shard_map: ShardMap, seconds: float) -> float:
    """The cheapest CPython code a local select could be: the contract's key hash,
    one table lookup, a result returned (no health, no strategy, no lease, no
    release), in the same loop as :func:`local_rate` (:func:`keyed_rate`). No Python client can beat
    this, so floor / raw is the best ratio local routing in CPython can reach."""
    ks = shard_map.keyspace("default")
    slots = ks.slots
    table: list[Any] = [None] * slots
    for shard in ks.shards:
        for a, b in shard.slots:
            for i in range(a, b):
                table[i] = (shard.id, shard.replicas[0].node)
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes

    def route(key: str) -> Any:
        return table[from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little") % slots]

    return keyed_rate(route, seconds)


class _Bare:
    """A node as the semantic floor keeps it: requests in flight and a latency EWMA."""

    __slots__ = ("ewma", "in_flight", "node")

    def __init__(self, node: str) -> None:
        self.node = node
        self.in_flight = 0
        self.ewma = 1.0


def semantic_floor_rate(shard_map: ShardMap, seconds: float) -> float:
    """The cheapest CPython code that does what a local select+release must do,
    called as :func:`local_rate` calls the client (``release(select(key))``):
    the contract's key hash and one table lookup (as :func:`floor_rate`); power
    of two choices over the shard's replicas by EWMA x (in flight + 1); a lease
    opened (a counter, a dict insert, a deadline from one clock read); the
    answer as the contract's :class:`Selection`; for the release, the lease
    closed (a dict pop) and the EWMA updated with a constant weight. Nothing
    else: no health, no panic mode, no slow start, no decay over time, no lease
    expiry, no statistics, no errors. Any client with these semantics does at
    least this much per pair, so semantic floor / raw bounds the ratio a
    CPython client can reach."""
    ks = shard_map.keyspace("default")
    slots = ks.slots
    bare: dict[str, _Bare] = {}
    table: list[Any] = [None] * slots
    for shard in ks.shards:
        pool = tuple(bare.setdefault(r.node, _Bare(r.node)) for r in shard.replicas)
        for a, b in shard.slots:
            for i in range(a, b):
                table[i] = (shard.id, pool)
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    rnd = random.Random(7).random
    clock = time.monotonic
    new, epoch = tuple.__new__, shard_map.epoch
    open_: dict[int, tuple[_Bare, float]] = {}
    seq = 0

    def select(key: str) -> Selection:
        nonlocal seq
        shard, pool = table[from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little") % slots]
        size = len(pool)
        i = int(rnd() * size)
        j = int(rnd() * (size - 1))
        if j >= i:
            j += 1
        a, b = pool[i], pool[j]
        node = a if a.ewma * (a.in_flight + 1) <= b.ewma * (b.in_flight + 1) else b
        seq += 1
        open_[seq] = (node, clock() + 30.0)
        node.in_flight += 1
        return new(Selection, (key, "default", shard, node.node, "", epoch, "replica", seq, "local", False))

    def release(sel: Selection, latency_ms: float) -> None:
        done = open_.pop(sel.lease)[0]  # type: ignore[index]
        done.in_flight -= 1
        done.ewma = done.ewma * 0.9 + latency_ms * 0.1

    return keyed_rate(lambda key: release(select(key), 0.5), seconds)


# --- propagation ------------------------------------------------------------------------


class TimedRouter(LocalRouter):
    """A router that notes when it received each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.when: dict[int, float] = {}

    def set_map(self, shard_map: ShardMap) -> None:
        super().set_map(shard_map)
        self.when[shard_map.epoch] = time.time()


PING = "bench.ping"


def feeds_proc(endpoint: str, events: str, count: int, stop: Any, out: Any) -> None:
    """``count`` local clients in one loop until ``stop`` is set; report when each saw
    each epoch. Next to them, ``count`` bare subscribers of a trivial event
    (``bench.ping``, read the cheapest way: from the loop's reader callback, no
    decoding beyond the body): the floor of this process layout."""
    quiet()

    async def main() -> tuple[list[dict[int, float]], list[dict[int, float]]]:
        ctx = zmq.asyncio.Context()
        sec = secmod.current()
        routers = [TimedRouter() for _ in range(count)]
        clients = [AsyncClient(endpoint, timeout=2.5, retries=1, ctx=ctx, routing="broker") for _ in routers]
        feeds = [RoutingFeed(r, c, events=events, security=sec, ctx=ctx, name=f"bench-{i}")
                 for i, (r, c) in enumerate(zip(routers, clients, strict=True))]
        tasks = [asyncio.ensure_future(f.run()) for f in feeds]
        plain: zmq.Context[Any] = zmq.Context.shadow(ctx.underlying)
        pings: list[dict[int, float]] = [{} for _ in range(count)]
        bare = []
        for got in pings:
            sock = plain.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, PING.encode())
            sock.connect(events)
            loop_sock = LoopSocket(sock)

            def on_ping(frames: list[bytes], got: dict[int, float] = got) -> None:
                got[msgpack.unpackb(frames[2])["seq"]] = time.time()

            loop_sock.serve(on_ping)
            bare.append(loop_sock)
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for b in bare:
            b.close()
        for c in clients:
            await c.close()
        ctx.destroy(0)
        return [r.when for r in routers], pings

    try:
        out.put(asyncio.run(main()))
    except Exception as exc:  # report, never hang the parent
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def publications(events: str, stop: threading.Event, seen: dict[int, float],
                 heard: dict[int, float]) -> None:
    """Each epoch's publication time (the event's ``ts``) into ``seen`` and when
    this bare subscriber, in the otherwise idle bench process, received it into
    ``heard``: the same event's delivery with no client work at all."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"shardmap.changed")
    sub.connect(events)
    try:
        while not stop.is_set():
            if sub.poll(200):
                ev = protocol.decode_event(sub.recv_multipart())
                if isinstance(ev.get("epoch"), int):
                    seen.setdefault(ev["epoch"], float(ev["ts"]))
                    heard.setdefault(ev["epoch"], time.time())
    finally:
        ctx.destroy(0)


def propagation(cluster: Cluster, clients: int, procs: int, changes: int) -> dict[str, Any]:
    events = cluster.endpoint("events_out")
    seen: dict[int, float] = {}
    stop = threading.Event()
    heard: dict[int, float] = {}
    listener = threading.Thread(target=publications, args=(events, stop, seen, heard), daemon=True)
    listener.start()
    q: Any = mp.Queue()
    done = mp.Event()
    workers = [mp.Process(target=feeds_proc, args=(cluster.endpoint("broker"), events, clients // procs, done, q))
               for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(5.0)  # every client has loaded the map
    made: list[int] = []
    ping_ts: dict[int, float] = {}
    pctx = zmq.Context()
    pub = pctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(cluster.endpoint("events_in"))
    time.sleep(0.5)  # a PUB drops what it sends before its connection is up
    with cluster.client(timeout=5.0) as c:
        for i in range(changes):
            c.request("sharding", "create_keyspace", name=f"bench{i}_{random.getrandbits(20)}", shards=4)
            made.append(c.request("sharding", "health")["epoch"])
            time.sleep(0.75)
            ping_ts[i] = time.time()
            pub.send_multipart(protocol.encode_event(PING, {"seq": i}, source="bench", ts=ping_ts[i]))
            time.sleep(0.75)
    pctx.destroy(0)
    time.sleep(5.0)  # the last change reaches everyone (or counts as missing)
    done.set()
    results = [q.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(10)
    stop.set()
    listener.join(2)
    delays: list[float] = []
    floor: list[float] = []
    by_change: dict[int, list[float]] = {epoch: [] for epoch in made}
    missing = 0
    for res in results:
        if isinstance(res, dict):
            raise RuntimeError(res["error"])
        whens, pings = res
        for got in pings:
            floor.extend(max(0.0, got[i] - ts) for i, ts in ping_ts.items() if i in got)
        for when in whens:
            for epoch in made:
                if epoch in seen:
                    # A client may jump straight to a later epoch: it held this one from then.
                    got = [t for e, t in when.items() if e >= epoch]
                    if got:
                        delays.append(max(0.0, min(got) - seen[epoch]))
                        by_change[epoch].append(delays[-1])
                    else:
                        missing += 1
    # The map event itself, to the bench's own bare subscriber: what delivery costs
    # at the moment of a change (the whole control plane reacts to it too).
    bare = sorted(max(0.0, heard[e] - seen[e]) for e in made if e in seen and e in heard)
    delays.sort()
    floor.sort()

    def ms(xs: list[float], p: float) -> float:
        return 1000 * xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    # Each change's own spread: one slow change for every client (a stall of the
    # host) reads differently from slow clients at every change.
    changes_ms = [{"epoch": e, "min_ms": ms(sorted(d), 0.0), "p50_ms": ms(sorted(d), 0.5),
                   "max_ms": ms(sorted(d), 1.0),
                   "bare_ms": 1000 * max(0.0, heard[e] - seen[e]) if e in heard and e in seen else None}
                  for e, d in by_change.items()]
    return {"clients": clients, "procs": procs, "changes": len(made), "samples": len(delays), "missing": missing,
            "by_change": changes_ms,
            "p50_ms": ms(delays, 0.5), "p99_ms": ms(delays, 0.99), "max_ms": ms(delays, 1.0),
            # The same subscribers in the same processes receiving a trivial event.
            "floor": {"samples": len(floor), "missing": len(ping_ts) * clients - len(floor),
                      "p50_ms": ms(floor, 0.5), "p99_ms": ms(floor, 0.99), "max_ms": ms(floor, 1.0)},
            "map_event_to_bare_subscriber": {"samples": len(bare), "p50_ms": ms(bare, 0.5),
                                             "max_ms": ms(bare, 1.0)}}


# --- memory -----------------------------------------------------------------------------


def big_map(shards: int = 4096, nodes: int = 100, rf: int = 3) -> dict[str, Any]:
    slots = shards
    rows = []
    for i in range(shards):
        picks = [f"node-{(i + k * 37) % nodes}" for k in range(rf)]
        rows.append(Shard(f"default/{i}", tuple(Replica(n, "primary" if k == 0 else "replica")
                                                for k, n in enumerate(picks)), slots=((i, i + 1),)))
    return ShardMap(1, (Keyspace("default", "hash", rf, tuple(rows), slots),)).to_wire()


def memory(shards: int = 4096) -> dict[str, Any]:
    doc = big_map(shards)
    wire = len(msgpack.packb(doc, use_bin_type=True))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    router = LocalRouter()
    shard_map = ShardMap.from_wire(doc)
    router.set_map(shard_map)
    after_map = tracemalloc.get_traced_memory()[0]
    for n in range(100):
        router.core.node_update(f"node-{n}", state="alive", lifecycle="active", address=f"h{n}:1", now=0.0)
    for i in range(shards * 8):
        _, _, sel = router.select(f"k{i}", now=1.0)
        assert sel.lease is not None
        router.release(sel.node, sel.lease, 1.0, True, now=1.0)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"shards": shards, "wire_bytes": wire, "map_bytes": after_map - base, "client_bytes": used - base}


def quiet() -> None:
    """Warnings only: a hundred clients logging every epoch would measure stderr."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def main() -> int:
    quiet()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--changes", type=int, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    changes = args.changes or (5 if args.quick else 10)
    out: dict[str, Any] = {"host": host_info(), "load_average": list(os.getloadavg())}

    log("memory with 4,096 shards")
    out["memory"] = mem = memory()

    with Cluster("local") as cluster:
        cluster.env["PHANTOM_COPY_TIME"] = "0.1"
        cluster.start("phantom_bus.broker")
        for name in SERVICES:
            cluster.start(f"services.{name}")
        for n in (1, 2, 3):
            cluster.agent(f"node-{n}", n)
        deadline = time.monotonic() + 90
        while True:
            try:
                with cluster.client(timeout=2.0, retries=1) as c:
                    if c.status().get("health") == "green":
                        break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("cluster never went green")
            time.sleep(0.5)

        echo = f"tcp://127.0.0.1:{free_port()}"
        server = mp.Process(target=_raw_server, args=(echo,), daemon=True)
        server.start()
        time.sleep(0.5)
        raw, local, floor, semantic = [], [], [], []
        with Client(cluster.endpoint("broker"), timeout=5.0, routing="local",
                    events=cluster.endpoint("events_out")) as client:
            client.select("warm")
            shard_map = client._router.map if client._router is not None else None
            assert shard_map is not None
            for r in range(args.rounds):
                log(f"round {r + 1}: raw echo, floors, local select+release, {seconds:g} s each")
                raw.append(raw_rate(echo, seconds))
                floor.append(floor_rate(shard_map, seconds))
                semantic.append(semantic_floor_rate(shard_map, seconds))
                local.append(local_rate(client, seconds))
            reported = None
            time.sleep(3.0)
            reported = cluster.request("balancer", "stats")["totals"]["reported"]
        server.terminate()
        # Ratios within each round (same load), then their median.
        ratios = [lo / ra for lo, ra in zip(local, raw, strict=True)]
        floor_ratios = [fl / ra for fl, ra in zip(floor, raw, strict=True)]
        of_floor = [lo / fl for lo, fl in zip(local, floor, strict=True)]
        semantic_ratios = [se / ra for se, ra in zip(semantic, raw, strict=True)]
        of_semantic = [lo / se for lo, se in zip(local, semantic, strict=True)]
        out["throughput"] = {"raw_per_s": summary(raw), "local_per_s": summary(local),
                             "floor_per_s": summary(floor), "ratio": summary(ratios),
                             "floor_ratio": summary(floor_ratios), "local_over_floor": summary(of_floor),
                             "semantic_floor_per_s": summary(semantic),
                             "semantic_floor_ratio": summary(semantic_ratios),
                             "local_over_semantic_floor": summary(of_semantic),
                             "seconds": seconds, "balancer_counted": reported}

        log(f"propagation to {args.clients} local clients, {changes} map changes")
        out["propagation"] = prop = propagation(cluster, args.clients, args.procs, changes)

    tp = out["throughput"]
    bare = prop["map_event_to_bare_subscriber"]
    table("local routing", ["measure", "value", "goal"], [
        ["raw pyzmq echo round trips / s (1 thread)", f"{tp['raw_per_s']['median']:,.0f}", ""],
        ["local select+release / s (1 thread)", f"{tp['local_per_s']['median']:,.0f}", ""],
        ["floor: key hash + table lookup only / s (1 thread)", f"{tp['floor_per_s']['median']:,.0f}", ""],
        ["ratio local / raw (median of rounds, min..max)",
         f"{tp['ratio']['median']:.1f}x ({tp['ratio']['min']:.1f}..{tp['ratio']['max']:.1f})", ">= 100x"],
        ["ratio floor / raw: the best a CPython client can reach",
         f"{tp['floor_ratio']['median']:.1f}x ({tp['floor_ratio']['min']:.1f}..{tp['floor_ratio']['max']:.1f})", ""],
        ["local / floor (share of the floor reached)",
         f"{tp['local_over_floor']['median']:.2f} ({tp['local_over_floor']['min']:.2f}.."
         f"{tp['local_over_floor']['max']:.2f})", ""],
        ["semantic floor: + P2C, lease open/close, EWMA / s (1 thread)",
         f"{tp['semantic_floor_per_s']['median']:,.0f}", ""],
        ["ratio semantic floor / raw: the best a CPython select+release can reach",
         f"{tp['semantic_floor_ratio']['median']:.1f}x ({tp['semantic_floor_ratio']['min']:.1f}.."
         f"{tp['semantic_floor_ratio']['max']:.1f})", ""],
        ["local / semantic floor",
         f"{tp['local_over_semantic_floor']['median']:.2f} ({tp['local_over_semantic_floor']['min']:.2f}.."
         f"{tp['local_over_semantic_floor']['max']:.2f})", ""],
        [f"map change -> {prop['clients']} clients p50 / p99 / max",
         f"{prop['p50_ms']:.1f} / {prop['p99_ms']:.1f} / {prop['max_ms']:.1f} ms "
         f"({prop['samples']} samples, {prop['missing']} missing)", "p99 <= 100 ms"],
        ["the map event itself -> one bare subscriber in the idle bench process, p50 / max",
         f"{bare['p50_ms']:.1f} / {bare['max_ms']:.1f} ms ({bare['samples']} changes)", ""],
        [f"floor: trivial event -> {prop['clients']} bare subscribers, same processes, p50 / p99 / max",
         f"{prop['floor']['p50_ms']:.1f} / {prop['floor']['p99_ms']:.1f} / {prop['floor']['max_ms']:.1f} ms "
         f"({prop['floor']['samples']} samples, {prop['floor']['missing']} missing)", ""],
        ["memory per client, 4,096 shards (map / whole router)",
         f"{mem['map_bytes'] / 1e6:.1f} / {mem['client_bytes'] / 1e6:.1f} MB (wire {mem['wire_bytes'] / 1e3:.0f} kB)",
         ""],
    ])
    print("each change: clients min / p50 / max, the map event to the bare subscriber (ms): " + ", ".join(
        f"{c['min_ms']:.0f}/{c['p50_ms']:.0f}/{c['max_ms']:.0f} ({c['bare_ms']:.0f})"
        for c in prop["by_change"] if c["bare_ms"] is not None))
    print(f"selects the balancer counted from this client's reports: {tp['balancer_counted']}")
    print(f"load average at start: {out['load_average']} (on {os.cpu_count()} cores)")
    path = write_results("local_routing", out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
