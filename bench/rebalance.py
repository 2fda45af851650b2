"""How well does placement balance, how little does it move, how fast does it plan and route?

Run from the repo root: ``.venv/bin/python bench/rebalance.py [--quick]``.

For n nodes (three zones, round robin) holding S shards at RF 3, it plans the
cluster, then one join and one leave, and reports the copies each made
against the optimum for that step (the fewest copies that bring every node
within one of its ideal: what the shedding nodes hold above the best
rounding of their ideal, plus the replicas of a leaver), the spread of
replicas per node and zone violations. The same shards are placed by a
consistent-hash ring (100 virtual nodes per node) and by jump consistent
hash, as baselines measured in the same run. Then it times planning at
1,000 nodes x 4,096 shards x RF 3 and the map's lookups (hash and range
key spaces) against the bare BLAKE2b hash, median of several runs.

Prints a table and writes bench/results/rebalance.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phantom_bus.shardmap import Keyspace, Replica, Shard, ShardMap, key_hash  # noqa: E402
from services.sharding.placement import NodeSpec, Plan, ShardSpec, plan  # noqa: E402

RF = 3
ZONES = 3


# -- helpers ----------------------------------------------------------------------------


def nodes_for(n: int, zones: int = ZONES) -> dict[str, NodeSpec]:
    return {f"n{i:04d}": NodeSpec(zone=f"z{i % zones}") for i in range(n)}


def settle(shards: list[ShardSpec], p: Plan) -> list[ShardSpec]:
    return [replace(sh, holders=p.targets[sh.id].nodes, primary=p.targets[sh.id].primary) for sh in shards]


def counts(shards: list[ShardSpec], nodes: dict[str, NodeSpec]) -> Counter[str]:
    c: Counter[str] = Counter({n: 0 for n, s in nodes.items() if s.state == "active"})
    c.update(h for sh in shards for h in sh.holders if h in c)
    return c


def zone_violations(assign: dict[str, tuple[str, ...]], zone_of: dict[str, str]) -> int:
    """Shards with two replicas in one zone (the layouts here always have >= RF zones)."""
    return sum(1 for v in assign.values() if len({zone_of[n] for n in v}) < len(v))


def deviation(c: Counter[str], p: Plan) -> float:
    """Largest distance of a node's replica count from its ideal."""
    return max(abs(c[n] - x) for n, x in p.ideal.items())


def optimum(before: list[ShardSpec], p: Plan) -> int:
    """Fewest copies reaching the plan's ideal within one: count bound with the best rounding."""
    x = p.ideal
    cur = Counter(h for sh in before for h in sh.holders if h in x)
    fills = sum(max(0, len(p.targets[sh.id].nodes) - sum(1 for h in sh.holders if h in x)) for sh in before)
    floors = {n: math.floor(v + 1e-9) for n, v in x.items()}
    extra = round(sum(x.values())) - sum(floors.values())
    excess = sum(max(0, cur[n] - floors[n]) for n in x)
    sticky = sum(1 for n in x if cur[n] > floors[n] and x[n] - floors[n] > 1e-9)
    return fills + excess - min(extra, sticky)


def median_spread(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# -- baselines ----------------------------------------------------------------------------


class Ring:
    """Consistent hashing with virtual nodes; replicas are the next distinct nodes clockwise."""

    def __init__(self, names: list[str], vnodes: int = 100) -> None:
        points = sorted((key_hash(f"{n}#{v}"), n) for n in names for v in range(vnodes))
        self.keys = [p for p, _ in points]
        self.owner = [n for _, n in points]
        self.distinct = len(names)

    def place(self, key: str, rf: int) -> tuple[str, ...]:
        out: list[str] = []
        i = bisect_right(self.keys, key_hash(key))
        while len(out) < min(rf, self.distinct):
            n = self.owner[i % len(self.owner)]
            if n not in out:
                out.append(n)
            i += 1
        return tuple(out)


def jump(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping and Veach, 2014): a bucket in [0, buckets)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def jump_place(key: str, n: int, rf: int) -> tuple[int, ...]:
    # The usual way to get replicas from jump hash: the next buckets after the first.
    first = jump(key_hash(key), n)
    return tuple((first + i) % n for i in range(min(rf, n)))


def moved(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> int:
    return sum(len(set(after[k]) - set(before[k])) for k in before)


def spread(assign: dict[str, tuple[Any, ...]], members: list[Any]) -> int:
    c: Counter[Any] = Counter({m: 0 for m in members})
    c.update(x for v in assign.values() for x in v)
    return max(c.values()) - min(c.values())


# -- the measurements -----------------------------------------------------------------------


def ours(n: int, zones: int, ids: list[str]) -> dict[str, Any]:
    nodes = nodes_for(n, zones)
    fresh = [ShardSpec(sid, RF) for sid in ids]
    base = settle(fresh, plan(fresh, nodes))
    joined = {**nodes, "new": NodeSpec(zone=f"z{n % zones}")}
    pj = plan(base, joined)
    after_join = settle(base, pj)
    leaver = "n0000"
    left = {**nodes, leaver: replace(nodes[leaver], state="draining")}
    pl = plan(base, left)
    after_leave = settle(base, pl)
    cj, cl = counts(after_join, joined), counts(after_leave, left)
    zone_of = {k: v.zone for k, v in joined.items()}
    return {
        "join_copies": pj.copies,
        "join_optimum": optimum(base, pj),
        "join_to_new_only": all(m.to_node == "new" for m in pj.moves if m.copy),
        "leave_copies": pl.copies,
        "leave_optimum": optimum(base, pl),
        "leave_from_leaver_only": all(m.from_node == leaver for m in pl.moves if m.copy),
        "spread": max(max(cj.values()) - min(cj.values()), max(cl.values()) - min(cl.values())),
        "max_deviation": max(deviation(cj, pj), deviation(cl, pl)),
        "zone_violations": zone_violations({sh.id: sh.holders for sh in after_join}, zone_of) if zones >= RF else 0,
        "unbalanced": len(pj.unbalanced) + len(pl.unbalanced),
    }


def sweep(sizes: list[int], shard_count: int) -> list[dict[str, Any]]:
    rows = []
    ids = [f"s/{i}" for i in range(shard_count)]
    for n in sizes:
        names = sorted(nodes_for(n))
        leaver = "n0000"
        zone_of = {k: v.zone for k, v in nodes_for(n).items()} | {"new": f"z{n % ZONES}"}
        ring0 = Ring(names)
        ring1 = Ring([*names, "new"])
        ring2 = Ring([x for x in names if x != leaver])
        r0 = {k: ring0.place(k, RF) for k in ids}
        r1 = {k: ring1.place(k, RF) for k in ids}
        r2 = {k: ring2.place(k, RF) for k in ids}
        j0 = {k: jump_place(k, n, RF) for k in ids}
        j1 = {k: jump_place(k, n + 1, RF) for k in ids}
        j2 = {k: jump_place(k, n - 1, RF) for k in ids}  # jump can only drop the last bucket
        bucket_zone = {i: f"z{i % ZONES}" for i in range(n + 1)}
        rows.append(
            {
                "nodes": n,
                "one_zone": ours(n, 1, ids),
                "three_zones": ours(n, ZONES, ids),
                "ring": {
                    "join_moves": moved(r0, r1),
                    "leave_moves": moved(r0, r2),
                    "spread": spread(r1, [*names, "new"]),
                    "zone_violations": zone_violations(r1, zone_of),
                },
                "jump": {
                    "join_moves": moved(j0, j1),
                    "leave_last_moves": moved(j0, j2),
                    "spread": spread(j1, list(range(n + 1))),
                    "zone_violations": zone_violations(j1, bucket_zone),  # type: ignore[arg-type]
                },
            }
        )
    return rows


def planning_time(runs: int) -> dict[str, Any]:
    nodes = nodes_for(1000)
    fresh = [ShardSpec(f"s/{i}", RF) for i in range(4096)]
    zone_of = {k: v.zone for k, v in nodes.items()} | {"new": "z1"}
    initial = timed(lambda: plan(fresh, nodes), runs)
    base = settle(fresh, plan(fresh, nodes))
    joined = {**nodes, "new": NodeSpec(zone="z1")}
    join = timed(lambda: plan(base, joined), runs)
    left = {**nodes, "n0000": replace(nodes["n0000"], state="draining")}
    leave = timed(lambda: plan(base, left), runs)
    pj = plan(base, joined)
    after = settle(base, pj)
    c = counts(after, joined)
    return {
        "zone_violations": zone_violations({sh.id: sh.holders for sh in after}, zone_of),
        "initial_s": median_spread(initial),
        "join_s": median_spread(join),
        "leave_s": median_spread(leave),
        "join_copies": pj.copies,
        "join_optimum": optimum(base, pj),
        "spread": max(c.values()) - min(c.values()),
    }


def lookup_rate(runs: int, keys: int) -> dict[str, Any]:
    slots, n = 4096, 64
    hash_shards = tuple(
        Shard(f"h/{i}", (Replica("a", "primary"),), slots=((i * slots // n, (i + 1) * slots // n),)) for i in range(n)
    )
    starts = [b""] + [f"user:{i * 1000 // n:04d}".encode() for i in range(1, n)]
    range_shards = tuple(
        Shard(f"r/{i}", (Replica("a", "primary"),), start=starts[i], end=starts[i + 1] if i + 1 < n else None)
        for i in range(n)
    )
    m = ShardMap(1, (Keyspace("h", "hash", 1, hash_shards, slots), Keyspace("r", "range", 1, range_shards)))
    sample = [f"user:{i}" for i in range(keys)]

    def run(name: str) -> None:
        lookup = m.lookup
        for k in sample:
            lookup(name, k)

    def bare() -> None:
        b2 = hashlib.blake2b
        for k in sample:
            int.from_bytes(b2(k.encode(), digest_size=8).digest(), "little")

    out: dict[str, Any] = {}
    for label, fn in (("hash", lambda: run("h")), ("range", lambda: run("r")), ("bare_blake2b", bare)):
        rates = [keys / t for t in timed(fn, runs)]
        out[label] = median_spread(rates)
    out["hash_vs_bare"] = out["hash"]["median"] / out["bare_blake2b"]["median"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run: fewer cluster sizes and repetitions")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rebalance.json"))
    args = ap.parse_args()
    sizes = [3, 4, 5, 8, 16, 32, 64, 100] if args.quick else list(range(3, 101))
    shard_count = 1024
    runs = 3 if args.quick else 5
    t0 = time.perf_counter()
    rows = sweep(sizes, shard_count)
    scale = planning_time(runs)
    lookups = lookup_rate(runs, 100_000 if args.quick else 300_000)

    print(f"placement of {shard_count} shards x RF {RF}: copies per join / leave (optimum), replicas spread")
    print("one zone: ours vs a consistent-hash ring (100 vnodes) and jump hash on the same shard ids")
    print("three zones (nodes round robin): ours vs the same baselines; zoneX = shards with 2 replicas in a zone")
    head = (
        f"{'nodes':>5} | {'join':>9} {'leave':>9} {'sprd':>4} | {'ring j':>6} {'ring l':>6} {'sprd':>4} | "
        f"{'jump j':>6} {'sprd':>4} | {'3z join':>9} {'3z leave':>9} {'dev':>4} {'zoneX':>5} | "
        f"{'ringX':>5} {'jumpX':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        a, b, ring, jmp = r["one_zone"], r["three_zones"], r["ring"], r["jump"]
        print(
            f"{r['nodes']:>5} | {a['join_copies']:>4}({a['join_optimum']:>4}) "
            f"{a['leave_copies']:>4}({a['leave_optimum']:>4}) "
            f"{a['spread']:>4} | {ring['join_moves']:>6} {ring['leave_moves']:>6} {ring['spread']:>4} | "
            f"{jmp['join_moves']:>6} {jmp['spread']:>4} | {b['join_copies']:>4}({b['join_optimum']:>4}) "
            f"{b['leave_copies']:>4}({b['leave_optimum']:>4}) {b['max_deviation']:>4.2f} {b['zone_violations']:>5} | "
            f"{ring['zone_violations']:>5} {jmp['zone_violations']:>5}"
        )

    def ratio(key: str, part: str) -> dict[str, float]:
        vals = [r[part][f"{key}_copies"] / r[part][f"{key}_optimum"] for r in rows if r[part][f"{key}_optimum"]]
        return median_spread(vals)

    summary = {
        "one_zone_join_vs_optimum": ratio("join", "one_zone"),
        "one_zone_leave_vs_optimum": ratio("leave", "one_zone"),
        "three_zones_join_vs_optimum": ratio("join", "three_zones"),
        "three_zones_leave_vs_optimum": ratio("leave", "three_zones"),
        "ring_join_vs_optimum": median_spread(
            [r["ring"]["join_moves"] / r["one_zone"]["join_optimum"] for r in rows if r["one_zone"]["join_optimum"]]
        ),
        "jump_join_vs_optimum": median_spread(
            [r["jump"]["join_moves"] / r["one_zone"]["join_optimum"] for r in rows if r["one_zone"]["join_optimum"]]
        ),
        "one_zone_max_spread": max(r["one_zone"]["spread"] for r in rows),
        "ring_max_spread": max(r["ring"]["spread"] for r in rows),
        "jump_max_spread": max(r["jump"]["spread"] for r in rows),
        "three_zones_max_deviation": max(r["three_zones"]["max_deviation"] for r in rows),
        "zone_violations": sum(r["three_zones"]["zone_violations"] for r in rows),
        "ring_zone_violations_max": max(r["ring"]["zone_violations"] for r in rows),
        "jump_zone_violations_max": max(r["jump"]["zone_violations"] for r in rows),
        "joins_only_to_new_node": all(r[p]["join_to_new_only"] for r in rows for p in ("one_zone", "three_zones")),
        "leaves_only_from_leaver": all(
            r[p]["leave_from_leaver_only"] for r in rows for p in ("one_zone", "three_zones")
        ),
        "unbalanced": sum(r[p]["unbalanced"] for r in rows for p in ("one_zone", "three_zones")),
    }
    print()
    print(
        "copies / optimum, median (max): one zone join {:.3f} ({:.3f}) leave {:.3f} ({:.3f}); "
        "three zones join {:.3f} ({:.3f}) leave {:.3f} ({:.3f})".format(
            summary["one_zone_join_vs_optimum"]["median"],
            summary["one_zone_join_vs_optimum"]["max"],
            summary["one_zone_leave_vs_optimum"]["median"],
            summary["one_zone_leave_vs_optimum"]["max"],
            summary["three_zones_join_vs_optimum"]["median"],
            summary["three_zones_join_vs_optimum"]["max"],
            summary["three_zones_leave_vs_optimum"]["median"],
            summary["three_zones_leave_vs_optimum"]["max"],
        )
    )
    print(
        "baselines, join moves / optimum, median: ring {:.2f}, jump {:.2f}; max spread ours {} ring {} jump {}".format(
            summary["ring_join_vs_optimum"]["median"],
            summary["jump_join_vs_optimum"]["median"],
            summary["one_zone_max_spread"],
            summary["ring_max_spread"],
            summary["jump_max_spread"],
        )
    )
    print(
        f"three zones: max |replicas - ideal| {summary['three_zones_max_deviation']:.2f}, zone violations "
        f"{summary['zone_violations']} (ring up to {summary['ring_zone_violations_max']}, jump up to "
        f"{summary['jump_zone_violations_max']}); joins only to the new node: {summary['joins_only_to_new_node']}; "
        f"leaves only from the leaver: {summary['leaves_only_from_leaver']}; unbalanced plans: {summary['unbalanced']}"
    )
    print()
    print("planning 1,000 nodes x 4,096 shards x RF 3 (seconds, median [min-max]):")
    for k in ("initial_s", "join_s", "leave_s"):
        v = scale[k]
        print(f"  {k[:-2]:<8} {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}]")
    print(f"  join copies {scale['join_copies']} (optimum {scale['join_optimum']}), spread {scale['spread']}")
    print()
    print("lookups per second (median [min-max]):")
    for k in ("hash", "range", "bare_blake2b"):
        v = lookups[k]
        print(f"  {k:<13} {v['median']:>12,.0f} [{v['min']:,.0f}-{v['max']:,.0f}]")
    print(f"  hash lookup / bare hash: {lookups['hash_vs_bare']:.2f}")
    out = {
        "params": {"shards": shard_count, "rf": RF, "zones": ZONES, "sizes": sizes, "runs": runs, "quick": args.quick},
        "rows": rows,
        "summary": summary,
        "planning_1000x4096": scale,
        "lookups": lookups,
        "elapsed_s": time.perf_counter() - t0,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} in {out['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
