"""Many seeded histories: run them (in worker processes), sum them up, print the verdict."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from . import buggify
from .history import Outcome, run_history
from .invariants import NAMES


@dataclass
class Summary:
    """Totals over a run of histories."""

    seeds: int = 0
    failed: list[Outcome] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))
    violations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))
    faults: dict[str, int] = field(default_factory=dict)
    profiles: dict[str, int] = field(default_factory=dict)
    events: int = 0
    longest: tuple[int, int, float] = (0, -1, 0.0)  # events, seed, virtual seconds
    virtual: float = 0.0
    wall: float = 0.0
    cpu: float = 0.0
    first_failure_index: int | None = None

    def add(self, index: int, o: Outcome) -> None:
        self.seeds += 1
        for k, v in o.checks.items():
            self.checks[k] = self.checks.get(k, 0) + v
        for k, v in o.faults.items():
            self.faults[k] = self.faults.get(k, 0) + v
        self.profiles[o.profile] = self.profiles.get(o.profile, 0) + 1
        self.events += o.events
        self.virtual += o.virtual_time
        self.cpu += o.cpu
        if o.events > self.longest[0]:
            self.longest = (o.events, o.seed, o.virtual_time)
        if o.violations:
            for name in {v.invariant for v in o.violations}:
                self.violations[name] = self.violations.get(name, 0) + 1
            self.failed.append(o)
            if self.first_failure_index is None or index < self.first_failure_index:
                self.first_failure_index = index


def _one(job: tuple[int, int, tuple[str, ...]]) -> Outcome:
    seed, steps, variants = job
    buggify.enable(*variants)
    return run_history(seed, steps)


def run_many(seeds: Iterable[int], steps: int, *, workers: int = 1, variants: Sequence[str] = (),
             stop_on_failure: bool = False, progress: TextIO | None = None) -> Summary:
    """Run one history per seed and total them; ``workers`` > 1 uses a process pool.

    The cores iterate over sets of string ids, so a history depends on the string
    hash seed: in a process whose PYTHONHASHSEED is not 0 (pytest, say) the
    histories run in worker processes started with PYTHONHASHSEED=0, so a seed
    gives the same history here as on the command line, whatever the number of
    workers.
    """
    jobs = [(s, steps, tuple(variants)) for s in seeds]
    summary = Summary()
    t0 = time.perf_counter()
    pinned = os.environ.get("PYTHONHASHSEED") == "0"
    if workers <= 1 and pinned:
        for i, job in enumerate(jobs):
            o = _one(job)
            summary.add(i, o)
            if stop_on_failure and o.violations:
                break
        buggify.enable()
    else:
        pool = _pool(max(1, workers), pinned)
        if stop_on_failure:
            # In rounds of a few seeds per worker: nothing runs on after the first failure.
            step = 2 * max(1, workers)
            for start in range(0, len(jobs), step):
                outcomes = pool.map(_one, jobs[start:start + step], chunksize=1)
                for i, o in enumerate(outcomes, start):
                    summary.add(i, o)
                if any(o.violations for o in outcomes):
                    break
        else:
            for i, o in enumerate(pool.imap(_one, jobs, chunksize=8)):
                summary.add(i, o)
                if progress is not None and (i + 1) % 500 == 0:
                    t = time.perf_counter() - t0
                    first = f" (first: seed {summary.failed[0].seed})" if summary.failed else ""
                    progress.write(f"  {i + 1} histories, {(i + 1) / t:.1f}/s, {len(summary.failed)} failing{first}\n")
                    progress.flush()
    summary.wall = time.perf_counter() - t0
    return summary


_POOLS: dict[tuple[int, bool], Any] = {}


def _pool(workers: int, pinned: bool) -> Any:
    """A pool of ``workers`` processes hashing strings with seed 0, kept for the next run.

    A spawned interpreter reads PYTHONHASHSEED afresh; a forked one keeps ours
    (already 0 when ``pinned``).
    """
    pool = _POOLS.get((workers, pinned))
    if pool is None:
        ctx = multiprocessing.get_context("fork" if pinned else "spawn")
        saved = os.environ.get("PYTHONHASHSEED")
        os.environ["PYTHONHASHSEED"] = "0"
        try:
            if not _POOLS:
                # Ended before the interpreter tears the pool's queues down under it.
                atexit.register(close_pools)
            pool = _POOLS[(workers, pinned)] = ctx.Pool(workers)
        finally:
            if saved is None:
                del os.environ["PYTHONHASHSEED"]
            else:
                os.environ["PYTHONHASHSEED"] = saved
    return pool


def close_pools() -> None:
    """End the worker processes kept by :func:`_pool`."""
    for pool in _POOLS.values():
        pool.close()
        pool.join()
    _POOLS.clear()


def replay_steps(o: Outcome) -> int:
    """The fewest steps whose schedule still holds everything that led to the first violation."""
    first = min(o.violations, key=lambda v: v.time)
    if first.invariant in ("dead_node_loses_replicas", "live_nodes_healthy_again"):
        return o.steps  # judged at the end of the history: needs all of it
    n = sum(1 for t in o.step_times if t <= first.time)
    return max(1, min(o.steps, n))


def minimal_replay(o: Outcome, variants: Sequence[str] = ()) -> tuple[int, Outcome]:
    """A shorter schedule that fails the same way, if one does; else the full one."""
    k = replay_steps(o)
    if k < o.steps:
        buggify.enable(*variants)
        try:
            short = run_history(o.seed, k)
        finally:
            buggify.enable()
        first = min(o.violations, key=lambda v: v.time).invariant
        if any(v.invariant == first for v in short.violations):
            return k, short
    return o.steps, o


def report(summary: Summary, steps: int, variants: Sequence[str] = (), out: TextIO = sys.stdout) -> None:
    w = out.write
    rate = summary.seeds / summary.wall if summary.wall else 0.0
    w(f"{summary.seeds} histories of {steps} steps in {summary.wall:.1f} s ({rate:.1f} seeds/s); "
      f"profiles {summary.profiles}\n")
    ev, seed, vt = summary.longest
    per = summary.cpu / max(1, summary.seeds)
    w(f"CPU {summary.cpu:.1f} s ({per * 1000:.0f} ms per history, {1 / per if per else 0:.1f} seeds per CPU-second): "
      f"on an idle machine {summary.seeds} histories take about {summary.cpu / default_workers():.0f} s\n")
    w(f"events {summary.events} ({summary.events / max(1, summary.seeds):.0f} per history), longest history: "
      f"seed {seed}, {ev} events, {vt:.0f} virtual s\n")
    nfaults = sum(summary.faults.values())
    w(f"faults injected: {nfaults} ({nfaults / max(1, summary.seeds):.1f} per history)\n")
    for kind in sorted(summary.faults):
        w(f"  {kind:<16} {summary.faults[kind]}\n")
    w(f"{'invariant':<34} {'checks':>10} {'violated in':>12}\n")
    for name in NAMES:
        w(f"  {name:<32} {summary.checks.get(name, 0):>10} {summary.violations.get(name, 0):>12}\n")
    if not summary.failed:
        w("no violations\n")
        return
    w(f"{len(summary.failed)} failing histories\n")
    flag = "".join(f" --buggify {v}" for v in variants)
    for o in summary.failed[:5]:
        k, short = minimal_replay(o, variants)
        w(f"seed {o.seed} ({o.profile}):\n")
        for v in short.violations[:5]:
            w(f"  {v}\n")
        w("  faults:\n")
        for line in short.fault_log[:30]:
            w(f"    {line}\n")
        w(f"  replay: python -m phantom_sim --seed {o.seed} --seeds 1 --steps {k}{flag}\n")


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
