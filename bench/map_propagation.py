"""How fast does a new shard map reach 1,000 agents, and what does each change cost sharding?

Run from the repo root: ``.venv/bin/python bench/map_propagation.py [--agents N] [--shards S] [--quick]``.

One load process simulates the agents (coroutines sharing a few clients). A
real broker and a real sharding process serve them; the map has a key space
of ``--shards`` shards (256 by default, next to the 64 of the default key
space) on 12 nodes. Each change is a ``node_dead`` / ``node_alive`` of one
node, which bumps the epoch. Two
behaviours are measured in the same run:

* **pull** (the behaviour before the shared store): sharding from the
  baseline commit, which encodes the whole map for every ``map`` request,
  and agents that pull the whole map every 5 s (random phase);
* **hint** (now): this checkout's sharding, which serves the committed
  map's encoding (made once per epoch), and agents that treat
  ``shardmap.changed`` as a hint and fetch ``map since_epoch`` (nil when
  they are current) within a 0.5 s jitter, still polling every 30 s in case
  an event is lost.

For each: the time from the change until every agent holds the new epoch
(median and spread of several changes), sharding's CPU seconds from the
change until then (per change), and sharding's CPU per second while nothing
changes. The baseline sharding runs from a temporary ``git worktree`` of
:data:`BASELINE`; without git history the pull row is skipped and says so.

Prints a table and writes bench/results/map_propagation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import ROOT, Cluster, interruptible, write_results

from phantom_bus import protocol
from phantom_bus.client import AsyncClient
from phantom_bus.errors import PhantomError

#: The last commit whose sharding encoded the whole map for every request (before the shared store).
BASELINE = "90bc912"
POLL = 5.0  # the old agents' full pull period
# With hints the poll is only the safety net for a lost event: 1,000 agents polling
# every 5 s would cost the broker 200 requests/s for nothing.
HINT_POLL = 30.0
JITTER = 0.5
CLIENTS = 25


def baseline_tree(tmp: Path) -> Path | None:
    """A worktree of :data:`BASELINE` under ``tmp``, or None if the history is not there."""
    dest = tmp / "baseline"
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(dest), BASELINE],
                          capture_output=True, text=True)
    return dest if done.returncode == 0 else None


class Agents:
    """``n`` simulated agents, each holding the epoch of the last map it fetched."""

    def __init__(self, endpoint: str, events: str, n: int, *, hint: bool) -> None:
        self.endpoint, self.events, self.n, self.hint = endpoint, events, n, hint
        self.epochs = [0] * n
        self.errors: dict[str, int] = {}
        self.fetches = 0
        self._wake = [asyncio.Event() for _ in range(n)]
        self.hinted_at = 0.0

    async def _fetch(self, client: AsyncClient, i: int) -> None:
        try:
            if self.hint:
                doc = await client.request("sharding", "map", since_epoch=self.epochs[i])
            else:
                doc = await client.request("sharding", "map")
        except PhantomError as exc:
            self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
            return
        self.fetches += 1
        if doc is not None:
            self.epochs[i] = max(self.epochs[i], int(doc["epoch"]))

    async def _agent(self, client: AsyncClient, i: int) -> None:
        await asyncio.sleep(random.random() * POLL)
        period = HINT_POLL if self.hint else POLL
        while True:
            await self._fetch(client, i)
            with_hint = asyncio.ensure_future(self._wake[i].wait())
            await asyncio.wait({with_hint}, timeout=period)
            if not with_hint.done():
                with_hint.cancel()
            else:
                # Real agents spread their fetch after a hint, so that a thousand of them
                # do not all ask in the same millisecond.
                await asyncio.sleep(random.random() * JITTER)
            self._wake[i].clear()

    async def _hints(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"shardmap.changed")
        sub.connect(self.events)
        try:
            while True:
                frames = await sub.recv_multipart()
                protocol.decode_event(frames)
                self.hinted_at = time.monotonic()
                for wake in self._wake:
                    wake.set()
        finally:
            sub.close(0)

    async def run(self) -> None:
        clients = [AsyncClient(self.endpoint, timeout=10.0, retries=3) for _ in range(CLIENTS)]
        tasks = [asyncio.ensure_future(self._agent(clients[i % CLIENTS], i)) for i in range(self.n)]
        if self.hint:
            tasks.append(asyncio.ensure_future(self._hints()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients:
                await c.close()


async def measure(cluster: Cluster, sharding: psutil.Process, n: int, hint: bool, changes: int) -> dict[str, Any]:
    agents = Agents(cluster.endpoint("broker"), cluster.endpoint("events_out"), n, hint=hint)
    runner = asyncio.ensure_future(agents.run())
    control = AsyncClient(cluster.endpoint("broker"), timeout=30.0, retries=3)
    try:
        deadline = time.monotonic() + 60
        while min(agents.epochs) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        cpu0, t0 = sum(sharding.cpu_times()[:2]), time.monotonic()
        await asyncio.sleep(POLL)
        idle_cpu = (sum(sharding.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        spans, cpus, commits = [], [], []
        hints: list[float | None] = []
        for k in range(changes):
            op = "node_dead" if k % 2 == 0 else "node_alive"
            cpu0, start = sum(sharding.cpu_times()[:2]), time.monotonic()
            await control.request("sharding", op, node="n0")
            commits.append(time.monotonic() - start)
            target = int((await control.request("sharding", "map"))["epoch"])
            while min(agents.epochs) < target and time.monotonic() - start < 120:
                await asyncio.sleep(0.01)
            spans.append(time.monotonic() - start)
            hints.append(agents.hinted_at - start if agents.hinted_at >= start else None)
            cpus.append(sum(sharding.cpu_times()[:2]) - cpu0)
            await asyncio.sleep(1.0)
        return {
            "agents": n,
            "propagation_s": spans,
            "propagation_median_s": statistics.median(spans),
            "propagation_spread_s": [min(spans), max(spans)],
            "sharding_cpu_per_change_s": statistics.median(cpus),
            "change_committed_median_s": statistics.median(commits),
            "hint_received_s": hints,
            "sharding_cpu_idle_per_s": idle_cpu,
            "fetch_errors": dict(agents.errors),
        }
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await control.close()


def run_mode(name: str, tree: Path, n: int, shards: int, changes: int) -> dict[str, Any]:
    with Cluster(f"mapprop-{name}") as cluster:
        cluster.start("phantom_bus.broker")
        code = f"import sys, runpy; sys.path.insert(0, {str(tree)!r}); runpy.run_module('services.sharding', " \
               "run_name='__main__')"
        proc = cluster.spawn([sys.executable, "-c", code], "sharding", PYTHONPATH=str(tree))
        cluster.wait_service("sharding", timeout=60)
        with cluster.client(timeout=60.0, retries=3) as c:
            deadline = time.monotonic() + 30
            while True:  # a new leader takes a moment to load or create the map
                try:
                    c.request("sharding", "map")
                    break
                except PhantomError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            c.request("sharding", "create_keyspace", name="big", shards=shards)
            for i in range(12):
                c.request("sharding", "add_node", node=f"n{i}", zone=f"z{i % 3}")
            size = len(protocol.pack(c.request("sharding", "map")))
        result = asyncio.run(measure(cluster, psutil.Process(proc.pid), n, name == "hint", changes))
        result["map_bytes"] = size
        return result


def main() -> int:
    interruptible()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--changes", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="200 agents, 256 shards, 2 changes")
    ap.add_argument("--only", choices=("pull", "hint"), help="measure one behaviour only")
    args = ap.parse_args()
    if args.quick:
        args.agents, args.shards, args.changes = 200, 256, 2
    out: dict[str, Any] = {"agents": args.agents, "shards": args.shards + 64, "baseline": BASELINE}
    tmp = Path(tempfile.mkdtemp(prefix="phantom-bench-mapprop-"))
    try:
        if args.only != "pull":
            out["hint"] = run_mode("hint", ROOT, args.agents, args.shards, args.changes)
        base = baseline_tree(tmp) if args.only != "hint" else None
        if base is None and args.only != "hint":
            out["pull"] = None
            print(f"baseline commit {BASELINE} not available (no git history): the pull row is skipped")
        elif base is not None:
            try:
                out["pull"] = run_mode("pull", base, args.agents, args.shards, args.changes)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                               capture_output=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [("behaviour", "agents", "map KiB", "all hold new epoch (median, spread) s", "change committed s",
             "sharding CPU/change s",
             "sharding CPU idle s/s", "errors")]
    for name in ("pull", "hint"):
        r = out.get(name)
        if r:
            lo, hi = r["propagation_spread_s"]
            spans = f"{r['propagation_median_s']:.2f} ({lo:.2f}-{hi:.2f})"
            rows.append((name, str(r["agents"]), f"{r['map_bytes'] / 1024:.0f}", spans,
                         f"{r['change_committed_median_s']:.2f}", f"{r['sharding_cpu_per_change_s']:.3f}",
                         f"{r['sharding_cpu_idle_per_s']:.3f}", str(sum(r["fetch_errors"].values()))))
    if out.get("pull") and out.get("hint"):
        out["speedup_propagation"] = out["pull"]["propagation_median_s"] / out["hint"]["propagation_median_s"]
        out["cpu_ratio_per_change"] = out["pull"]["sharding_cpu_per_change_s"] / max(
            out["hint"]["sharding_cpu_per_change_s"], 1e-9)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if "speedup_propagation" in out:
        print(f"propagation {out['speedup_propagation']:.1f}x faster, sharding CPU per change "
              f"{out['cpu_ratio_per_change']:.1f}x lower with hints and the cached encoding")
    path = write_results("map_propagation", out)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
