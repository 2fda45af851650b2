"""Shared plumbing for the process benchmarks: free ports, process groups, events, CPU.

Not a benchmark itself. :class:`Cluster` is the harness the tests use too
(tests/procs.py: Phantom processes and any other command on free ports of
127.0.0.1 with their own data directory, each in its own session so that the
whole process group can be signalled) in a fresh temporary directory that
:meth:`Cluster.close` removes unless a run failed; it stops every process,
and the benchmarks call it from ``finally`` (SIGTERM and SIGHUP are turned
into ``KeyboardInterrupt`` by :func:`interruptible` so that ``finally`` also
runs when the bench is killed politely). :class:`EventWatch` records bus events with their arrival time on
this machine's monotonic clock, which is the same clock (CLOCK_MONOTONIC) the
services use for ``since`` and ages, so times from both sides compare.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import psutil
import zmq

# The benchmarks' clusters run without CURVE (see Cluster.env); so do their
# in-process clients, even in a checkout where `make up` left keys in var/keys.
os.environ.setdefault("PHANTOM_SECURITY", "off")
_CHECKOUT = str(Path(__file__).resolve().parent.parent)
if _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

from phantom_bus import protocol  # noqa: E402
from phantom_bus.errors import PhantomError  # noqa: E402
from tests.procs import ROOT, Processes, free_port  # noqa: E402

__all__ = [
    "ROOT", "Cluster", "CpuMeter", "EventWatch", "fmt_spread", "free_port", "host_info", "interruptible", "log",
    "machine_busy", "summary", "table", "write_results",
]  # fmt: skip


def interruptible() -> None:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt so ``finally`` blocks clean up."""

    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


class Cluster(Processes):
    """A private set of processes on free ports in a fresh temporary directory;
    :meth:`close` stops all of them and removes the directory unless kept."""

    # Brokered by default: most benches measure the balancer's own choices.
    client_defaults: ClassVar[dict[str, Any]] = {"timeout": 2.0, "retries": 2, "routing": "broker"}

    def __init__(self, name: str, log_level: str = "INFO", keep: bool = False) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix=f"phantom-bench-{name}-")), log_level)
        self.keep = keep
        self.failed = False

    def endpoint(self, name: str) -> str:
        return self.env[f"PHANTOM_{name.upper()}"]

    def agent(self, node: str, n: int, **env: str) -> subprocess.Popen[bytes]:
        return self.start(
            "services.agent",
            "--node-id",
            node,
            "--zone",
            f"z{n % 3 + 1}",
            "--address",
            f"127.0.0.1:{7000 + n % 1000}",
            name=node,
            **env,
        )

    def spinners(self, count: int) -> list[subprocess.Popen[bytes]]:
        """``count`` pure-Python busy loops, one core each."""
        return [self.spawn([sys.executable, "-c", "while True: pass"], "spin") for _ in range(count)]

    def wait_service(self, service: str, timeout: float = 20.0) -> None:
        try:
            super().wait_service(service, timeout)
        except RuntimeError:
            self.failed = True
            raise

    def close(self) -> None:
        """Stop every process this cluster started; keep the logs if something failed."""
        super().close()
        if self.keep or self.failed:
            print(f"(process logs kept in {self.tmp})", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None:
            self.failed = True
        self.close()


class EventWatch:
    """Bus events as ``(arrival on the monotonic clock, body)``, collected by a thread."""

    def __init__(self, endpoint: str, prefixes: Sequence[str]) -> None:
        self.endpoint = endpoint
        self.prefixes = [p.encode() for p in prefixes]
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.errors = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-watch", daemon=True)
        self._thread.start()
        self._ready.wait(5)
        time.sleep(0.3)  # let the subscription reach the broker's XPUB

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1_000_000)
        for p in self.prefixes:
            sock.setsockopt(zmq.SUBSCRIBE, p)
        sock.connect(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    t = time.monotonic()
                    try:
                        body = protocol.decode_event(frames, max_size=64 * 1024 * 1024)
                    except PhantomError:
                        self.errors += 1
                        continue
                    with self._cond:
                        self.events.append((t, body))
                        self._cond.notify_all()
        finally:
            sock.close(0)

    def since(self, t0: float, kind: str | None = None, node: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        with self._cond:
            return [
                (t, e)
                for t, e in self.events
                if t >= t0 and (kind is None or e["kind"] == kind) and (node is None or e.get("node") == node)
            ]

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], t0: float, timeout: float
    ) -> tuple[float, dict[str, Any]] | None:
        """The first event received at or after ``t0`` matching ``pred``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        start = 0
        with self._cond:
            while True:
                for i in range(start, len(self.events)):
                    t, e = self.events[i]
                    if t >= t0 and pred(e):
                        return t, e
                start = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


class CpuMeter:
    """CPU time of processes over a window, as a fraction of one core (1.0 = one core busy)."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.ps = {name: psutil.Process(pid) for name, pid in procs.items()}
        self.t0 = 0.0
        self.c0: dict[str, float] = {}

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return float("nan")

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {n: self._cpu(p) for n, p in self.ps.items()}

    def read(self) -> dict[str, float]:
        """Fraction of one core each process used since :meth:`start`."""
        dt = time.monotonic() - self.t0
        return {n: (self._cpu(p) - self.c0[n]) / dt for n, p in self.ps.items()}


def machine_busy(seconds: float = 1.0) -> float:
    """Whole-machine CPU busy fraction (0..1 over all cores) right now: how noisy it is."""
    return psutil.cpu_percent(interval=seconds) / 100.0


# --- numbers and tables -------------------------------------------------------------


def summary(xs: Sequence[float]) -> dict[str, Any]:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "min": xs[0],
        "median": statistics.median(xs),
        "p90": xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))],
        "max": xs[-1],
    }


def fmt_spread(s: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    """``median (min..max)``."""
    if not s.get("n"):
        return "-"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'] * scale)} ({f.format(s['min'] * scale)}..{f.format(s['max'] * scale)})"


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def write_results(name: str, doc: dict[str, Any]) -> Path:
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{name}.json"
    out.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return out


def host_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "zmq": zmq.zmq_version(),
        "pyzmq": zmq.__version__,
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
