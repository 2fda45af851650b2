"""Real Phantom processes on 127.0.0.1 for the tests and the benchmarks: one harness for both.

:class:`Processes` is a private bus (its own free port per endpoint, its own
data directory, security off) and the processes started on it. Each process
runs in its own session, so its whole process group can be signalled (a
SIGSTOP freezes it, a SIGKILL leaves nothing behind), and its stdout and
stderr go to one log file per process in the bus's directory.
:meth:`Processes.close` stops every process it started, whatever happened:
thaw, SIGTERM the group, SIGKILL what is left after a grace period, then
SIGKILL the group again for children that outlived their leader.

tests/conftest.py builds the ``bus`` fixture on it, bench/_procs.py the
benchmarks' ``Cluster``, tests/ha_hosts.py its several hosts and
tests/conformance/conftest.py its raw peer on :func:`phantom_env`,
:func:`spawn` and :func:`stop`, tests/etcd_fixture.py its etcd on the last
two. Nothing here uses pytest, so a benchmark imports it as it is, and nothing
of Phantom is imported until a client is asked for, so the conformance
harness (raw pyzmq against the processes under test) stays free of it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import zmq

if TYPE_CHECKING:
    from phantom_bus.client import Client

ROOT = Path(__file__).resolve().parent.parent
#: Every endpoint a bus has, as in PHANTOM_<NAME>.
ENDPOINTS = ("broker", "backend", "events_in", "events_out", "beacon", "heartbeat")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout:g} s (last value {last!r})")


def phantom_env(endpoints: Mapping[str, str], data: Path, log_level: str) -> dict[str, str]:
    """This process's environment without any PHANTOM_ variable, plus a private bus:
    ``endpoints`` (name -> address list), its data directory, security off (the tests
    of security turn it on), ``log_level``, and this checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHANTOM_")}
    env.update({f"PHANTOM_{k.upper()}": v for k, v in endpoints.items()})
    env["PHANTOM_DATA"] = str(data)
    env["PHANTOM_SECURITY"] = "off"
    env["PHANTOM_LOG_LEVEL"] = log_level
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def example_participant_env(tmp: Path, log: Path) -> dict[str, str]:
    """Settings for agents that run deploy/examples/participant.sh as their participant,
    keeping its data under ``tmp`` and writing its transitions to ``log``; copies take 0.05 s."""
    return {
        "PHANTOM_PARTICIPANT": "exec",
        "PHANTOM_PARTICIPANT_EXEC": f"sh {ROOT / 'deploy/examples/participant.sh'}",
        "PARTICIPANT_DIR": str(tmp / "participant"),
        "PARTICIPANT_LOG": str(log),
        "COPY_SECONDS": "0.05",
    }


def spawn(
    argv: Sequence[str], env: Mapping[str, str], log: Path, *, stdout_pipe: bool = False, append: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session from the checkout; stderr (and stdout unless piped) to ``log``."""
    with log.open("ab" if append else "wb") as out:
        return subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE if stdout_pipe else out,
            stderr=out,
            start_new_session=True,
        )


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal one process (not its group) and reap it if the signal ends it."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    if sig in (signal.SIGKILL, signal.SIGTERM):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def stop(procs: Iterable[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """Thaw and SIGTERM each process group, then SIGKILL whatever is left after ``grace``."""
    procs = list(procs)
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.05, deadline - time.monotonic()))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    for proc in procs:
        # A group may outlive its leader (a child it started); leave nothing behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def status_of(client: Callable[[], Client]) -> dict[str, Any]:
    """The status document through the client ``client()`` makes (and this closes), or {} if
    nobody answers (any failure reads as no document)."""
    try:
        with client() as c:
            return c.status()
    except Exception:
        return {}


class Processes:
    """A private bus on free ports of 127.0.0.1 and every process started on it."""

    #: Keyword arguments of :meth:`client` unless the caller gives them.
    client_defaults: ClassVar[dict[str, Any]] = {"timeout": 1.0, "routing": "broker"}

    def __init__(self, tmp: Path, log_level: str) -> None:
        self.tmp = tmp
        self.ports = {k: free_port() for k in ENDPOINTS}
        self.env = phantom_env({k: f"tcp://127.0.0.1:{p}" for k, p in self.ports.items()}, tmp / "var", log_level)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    # --- starting ----------------------------------------------------------------

    def spawn(
        self, argv: Sequence[str], name: str, *, stdout_pipe: bool = False, **env: str
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with this bus's environment plus ``env``; its output to ``<name>-<n>.log``."""
        return self._launch(argv, name, env, stdout_pipe)

    def start(self, module: str, *args: str, name: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        """Start ``python -m module args`` with this bus's environment."""
        return self._launch([sys.executable, "-m", module, *args], name or module.rsplit(".", 1)[-1], env, False)

    def _launch(
        self, argv: Sequence[str], name: str, env: Mapping[str, str], stdout_pipe: bool
    ) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        proc = spawn(argv, {**self.env, **env}, log, stdout_pipe=stdout_pipe)
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    # --- stopping ------------------------------------------------------------------

    kill = staticmethod(kill)

    def stop(self, procs: Iterable[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
        """Stop ``procs`` (see :func:`stop`)."""
        stop(procs, grace)

    def close(self) -> None:
        """Stop every process this bus started."""
        stop(self.procs)

    # --- the bus -------------------------------------------------------------------

    def client(self, **kw: Any) -> Client:
        """A client of this bus's broker, subscribed to its events; ``client_defaults`` unless given."""
        from phantom_bus.client import Client

        kw = {**self.client_defaults, "events": self.env["PHANTOM_EVENTS_OUT"], **kw}
        return Client(self.env["PHANTOM_BROKER"], **kw)

    def subscriber(self, *prefixes: bytes) -> zmq.Socket[bytes]:
        """A SUB socket on this bus's events, subscribed to ``prefixes``; the caller closes it."""
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        for prefix in prefixes:
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        sock.connect(self.env["PHANTOM_EVENTS_OUT"])
        return sock

    def request(self, service: str, op: str, **args: Any) -> Any:
        with self.client() as c:
            return c.request(service, op, **args)

    def answer(self, service: str, op: str, *, timeout: float = 1.0, retries: int = 4, **args: Any) -> Any:
        """``service``'s reply to ``op``, or None if it did not answer (for polling)."""
        from phantom_bus.errors import PhantomError

        with self.client(timeout=timeout, retries=retries) as c:
            try:
                return c.request(service, op, **args)
            except PhantomError:
                return None

    def status(self) -> dict[str, Any]:
        """The status document, or {} if nobody answers."""
        return status_of(lambda: self.client(timeout=2.0, retries=1))

    def wait_service(self, service: str, timeout: float = 20.0) -> None:
        """Until ``service`` answers a ping through the broker; RuntimeError after ``timeout``."""
        from phantom_bus.errors import PhantomError

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with self.client(timeout=0.5, retries=1) as c:
            while time.monotonic() < deadline:
                try:
                    c.request(service, "ping")
                    return
                except PhantomError as exc:
                    last = exc
                    time.sleep(0.1)
        raise RuntimeError(f"service {service} did not come up within {timeout:g} s: {last}")

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """What ``proc`` wrote so far."""
        return self.logs[proc.pid].read_text(errors="replace")

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class BrokeredLoad(threading.Thread):
    """Brokered selects (every fifth one a write) and releases on ``keys`` keys until
    ``halt`` is set: every failure that reached the caller (``errors``), the successes
    (``ok``) and the broker each went through (``brokers``), the longest gap between two
    successes, and the longest one within 5 s after a fault :meth:`mark` ed. ``slow``
    counts selects that took a whole attempt timeout or more: one of their attempts may
    have been given up on after the balancer opened its lease (a loaded machine does that)."""

    #: The client's timeout per attempt.
    attempt_timeout: ClassVar[float] = 2.0

    def __init__(self, endpoint: str, keys: int = 200) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.keys = endpoint, keys
        self.halt = threading.Event()
        self.errors: list[str] = []
        self.ok = 0
        self.brokers: Counter[int] = Counter()
        self.longest_gap = self.gap_after_kill = 0.0
        self.killed_at: float | None = None
        self.slow = 0

    @property
    def failed(self) -> int:
        return len(self.errors)

    def mark(self, at: float) -> None:
        """A fault happens at ``at``: measure the longest gap from here on."""
        self.gap_after_kill, self.killed_at = 0.0, at

    def run(self) -> None:
        from phantom_bus.client import Client

        with Client(self.endpoint, timeout=self.attempt_timeout, retries=3, routing="broker") as c:
            last = time.monotonic()
            i = 0
            while not self.halt.is_set():
                i += 1
                try:
                    started = time.monotonic()
                    sel = c.select(f"user:{i % self.keys}", write=i % 5 == 0)
                    self.slow += time.monotonic() - started >= self.attempt_timeout
                    c.release(sel, latency_ms=1.0)
                except Exception as exc:  # every failure is the finding
                    self.errors.append(repr(exc))
                    continue
                now = time.monotonic()
                gap, last = now - last, now
                self.longest_gap = max(self.longest_gap, gap)
                if self.killed_at is not None and now - gap <= self.killed_at + 5.0:
                    self.gap_after_kill = max(self.gap_after_kill, gap)
                self.ok += 1
                self.brokers[c.preferred] += 1
                time.sleep(0.002)
