"""How long until a new leader leads, after the leader process is stopped, killed or frozen?

Two candidate processes run an :class:`~phantom_bus.leader.Elector` for one
service on the same store (one SQLite file, or a throwaway etcd) and, while
leading, make a fenced write every 100 ms. The bench then, five times per
way and backend:

- ``sigterm``: stops the leader cleanly (its ``run()`` is cancelled and
  resigns by revoking its lease);
- ``sigkill``: kills it (its lease must expire);
- ``sigstop``: freezes it for 2 x ttl, then SIGCONTs it. Its stale fenced
  writes after the successor's election are counted (they must all be
  refused: ``stale_writes_accepted`` must be 0).

Takeover = the successor's election time minus the signal time, both on
CLOCK_MONOTONIC (shared by all processes of the host). The target is
``leader_ttl + 1 s``. Prints a table, writes ``bench/results/store_takeover.json``.

    .venv/bin/python bench/store_takeover.py [--ttl 4] [--rounds 5] [--backends sqlite,etcd]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._procs import host_info, interruptible, summary, table, write_results  # noqa: E402
from phantom_bus import config  # noqa: E402


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# --- the candidate process -----------------------------------------------------------------


def candidate(url: str, data: str, prefix: str, instance: str, ttl: float) -> None:
    """Run an Elector; print 'elected|deposed|wrote|fenced INSTANCE TERM T' lines."""
    from phantom_bus.errors import Fenced, PhantomError
    from phantom_bus.leader import Elector
    from phantom_bus.store import open_store

    def say(what: str, term: int | None) -> None:
        print(f"{what} {instance} {term} {now():.6f}", flush=True)

    async def main() -> None:
        store = open_store(url, data_dir=data, prefix=prefix)
        elector = Elector(
            store,
            "bench",
            instance,
            ttl,
            on_elected=lambda term: say("elected", term),
            on_deposed=lambda term, _reason: say("deposed", term),
        )
        task = asyncio.create_task(elector.run())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        held = None
        try:
            while not task.done():
                await asyncio.sleep(0.1)
                fence = elector.fence
                if fence is not None:
                    held = fence
                if held is None:
                    continue
                # Keep writing with the last fence held, leader or not: a woken
                # old leader that did not yet notice must be refused by the store.
                try:
                    await store.put("bench/value", instance.encode(), fence=held)
                    say("wrote", held.revision)
                except Fenced:
                    say("fenced", held.revision)
                    held = None
                except PhantomError:
                    pass
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await store.close()

    asyncio.run(main())


# --- the driver ---------------------------------------------------------------------------


class Candidate:
    def __init__(self, args: list[str], lines: queue.Queue[tuple[str, str, int, float]], log: Path) -> None:
        self.instance = args[3]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--candidate", *args],
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PHANTOM_LOG_LEVEL": "WARNING"},
        )
        self.lines = lines
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            parts = raw.decode().split()
            if len(parts) == 4:
                term = int(parts[2]) if parts[2] != "None" else 0
                self.lines.put((parts[0], parts[1], term, float(parts[3])))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)


class Race:
    """Two candidates on one store; the log of their lines."""

    def __init__(self, url: str, tmp: Path, ttl: float) -> None:
        self.url, self.tmp, self.ttl = url, tmp, ttl
        self.prefix = f"/bench-{time.time_ns()}/"
        self.lines: queue.Queue[tuple[str, str, int, float]] = queue.Queue()
        self.seen: list[tuple[str, str, int, float]] = []
        self.candidates: dict[str, Candidate] = {}
        self.count = 0

    def spawn(self) -> Candidate:
        self.count += 1
        name = f"c{self.count}"
        cand = Candidate([self.url, str(self.tmp), self.prefix, name, str(self.ttl)], self.lines, self.tmp / "log")
        self.candidates[name] = cand
        return cand

    def wait(self, what: str, *, not_instance: str | None = None, after: float = 0.0, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        for line in self.seen:
            if line[0] == what and line[1] != not_instance and line[3] >= after:
                return line
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line[0] == what and line[1] != not_instance and line[3] >= after:
                return line
        raise RuntimeError(f"no '{what}' within {timeout:g} s; log: {self.tmp / 'log'}")

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.lines.get(timeout=0.05))

    def close(self) -> None:
        for cand in self.candidates.values():
            cand.stop()


def run_backend(url: str, tmp: Path, ttl: float, rounds: int) -> dict[str, Any]:
    race = Race(url, tmp, ttl)
    out: dict[str, Any] = {}
    try:
        race.spawn()
        race.spawn()
        _, leader, _, _ = race.wait("elected", timeout=30)
        for how in ("sigterm", "sigkill", "sigstop"):
            times: list[float] = []
            stale_accepted = stale_refused = 0
            for _ in range(rounds):
                time.sleep(ttl * 0.5 + (len(times) % 3) * ttl * 0.1)  # vary the phase against renewals
                old = race.candidates[leader]
                t0 = now()
                old.signal({"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP}[how])
                _, new_leader, new_term, t_elected = race.wait("elected", not_instance=leader, after=t0)
                times.append(t_elected - t0)
                if how == "sigstop":
                    time.sleep(max(0.0, t0 + 2 * ttl - now()))
                    t_cont = now()
                    old.signal(signal.SIGCONT)
                    race.drain(1.5)
                    for what, who, term, t in race.seen:
                        if who == leader and t >= t_cont and term < new_term:
                            stale_accepted += what == "wrote"
                            stale_refused += what == "fenced"
                else:
                    old.proc.wait(10)
                    del race.candidates[leader]
                    race.spawn()
                leader = new_leader
            out[how] = {
                "takeover_s": summary(times),
                "runs": times,
                "within_target": sum(t <= ttl + 1.0 for t in times),
            }
            if how == "sigstop":
                out[how]["stale_writes_accepted"] = stale_accepted
                out[how]["stale_writes_refused"] = stale_refused
    finally:
        race.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttl", type=float, default=config.default("leader_ttl"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="sqlite,etcd")
    args = parser.parse_args()
    interruptible()
    results: dict[str, Any] = {"ttl": args.ttl, "target_s": args.ttl + 1.0, "host": host_info(), "backends": {}}
    for backend in args.backends.split(","):
        tmp = Path(tempfile.mkdtemp(prefix=f"phantom-takeover-{backend}-"))
        if backend == "sqlite":
            results["backends"]["sqlite"] = run_backend("sqlite", tmp, args.ttl, args.rounds)
        elif backend == "etcd":
            from tests.etcd_fixture import find_etcd, running_etcd

            binary, why = find_etcd()
            if binary is None:
                print(f"etcd skipped: {why}")
                results["backends"]["etcd"] = {"skipped": why}
                continue
            with running_etcd(binary) as server:
                results["backends"]["etcd"] = run_backend(server.url, tmp, args.ttl, args.rounds)
        else:
            raise SystemExit(f"unknown backend {backend!r}")
    rows = []
    for backend, modes in results["backends"].items():
        for how, doc in modes.items():
            if not isinstance(doc, dict):
                continue
            s = doc["takeover_s"]
            stale = doc.get("stale_writes_accepted", "")
            rows.append([backend, how, s["median"], s["min"], s["max"], f"{doc['within_target']}/{s['n']}", stale])
    table(
        f"leader takeover (ttl {args.ttl:g} s, target ttl + 1 s = {args.ttl + 1:g} s; seconds, {args.rounds} runs)",
        ["store", "leader", "median", "min", "max", "<= target", "stale writes accepted"],
        rows,
    )
    print(f"\nwrote {write_results('store_takeover', results)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--candidate":
        url, data, prefix, instance, ttl = sys.argv[2:7]
        candidate(url, data, prefix, instance, float(ttl))
    else:
        main()
