"""Fixtures for tests that run real processes on 127.0.0.1.

``bus`` gives each test its own free ports, its own data directory and a
process list that is always emptied at teardown (SIGTERM, then SIGKILL),
whether the test passed or failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from phantom_bus.client import Client
from phantom_bus.errors import PhantomError
from tests.net import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent

# Security is on by default and finds the keys `make up` leaves in this checkout's
# var/keys: the test process itself (its in-process clients) runs without unless a
# test says otherwise, like the processes a Bus starts. Tests of security set it.
os.environ["PHANTOM_SECURITY"] = "off"



def phantom(
    bus: Bus | Mapping[str, str], *args: str, timeout: float = 120.0, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the ``phantom`` CLI with ``bus``'s environment (or the environment given) plus ``env``."""
    base = bus.env if isinstance(bus, Bus) else bus
    return subprocess.run(
        [sys.executable, "-m", "phantom_bus.cli", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    return wait_for(predicate, timeout, interval)


class Bus:
    """A private set of Phantom processes for one test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {
            name: free_port() for name in ("broker", "backend", "events_in", "events_out", "beacon", "heartbeat")
        }
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PHANTOM_")}
        self.env.update({f"PHANTOM_{k.upper()}": f"tcp://127.0.0.1:{p}" for k, p in self.ports.items()})
        self.env["PHANTOM_DATA"] = str(tmp / "var")
        # Fast and key-free by default; tests of security turn it on (see test_security.py).
        self.env["PHANTOM_SECURITY"] = "off"
        self.env["PHANTOM_LOG_LEVEL"] = "DEBUG"
        self.env["PYTHONPATH"] = str(ROOT)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    @property
    def endpoint(self) -> str:
        return self.env["PHANTOM_BROKER"]

    def start(self, module: str, *args: str, name: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        """Start ``python -m module args`` with this bus's environment."""
        label = name or module.rsplit(".", 1)[-1]
        log = self.tmp / f"{label}-{len(self.procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def broker(self) -> subprocess.Popen[bytes]:
        return self.start("phantom_bus.broker")

    def echo(self, name: str = "echo") -> subprocess.Popen[bytes]:
        return self.start("services.echo", "--name", name, name=name)

    def agent(self, n: int, *args: str) -> subprocess.Popen[bytes]:
        """Agent ``node-n`` in zone ``z{n % 3 + 1}`` advertising ``127.0.0.1:7000+n``."""
        return self.start(
            "services.agent",
            "--node-id",
            f"node-{n}",
            "--zone",
            f"z{n % 3 + 1}",
            "--address",
            f"127.0.0.1:{7000 + n}",
            *args,
            name=f"agent-{n}",
        )

    def request(self, service: str, op: str, **args: Any) -> Any:
        with self.client() as c:
            return c.request(service, op, **args)

    def client(self, **kw: Any) -> Client:
        kw.setdefault("timeout", 1.0)
        # Most cluster tests pin the balancer's own behaviour: brokered unless asked.
        kw.setdefault("routing", "broker")
        kw.setdefault("events", self.env["PHANTOM_EVENTS_OUT"])
        return Client(self.endpoint, **kw)

    def workers(self, service: str) -> int:
        with self.client(retries=1, timeout=0.5) as c:
            try:
                return int(c.services().get(service, {}).get("workers", 0))
            except PhantomError:
                return 0

    def wait_workers(self, service: str, count: int = 1, timeout: float = 15.0) -> None:
        wait_until(lambda: self.workers(service) == count, timeout)

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    b = Bus(tmp_path)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def etcd() -> Iterator[Any]:
    """One throwaway etcd per test session (per xdist worker); skipped, with the reason, without a binary."""
    from tests.etcd_fixture import find_etcd, running_etcd

    binary, why = find_etcd()
    if binary is None:
        pytest.skip(why)
    with running_etcd(binary) as server:
        yield server
