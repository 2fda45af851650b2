"""Fixtures for tests that run real processes on 127.0.0.1.

``bus`` gives each test its own free ports, its own data directory and a
process list that is always emptied at teardown (SIGTERM, then SIGKILL),
whether the test passed or failed. The harness itself is tests/procs.py,
which the benchmarks use too.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from phantom_bus.errors import PhantomError
from tests.procs import ROOT, Processes, free_port, wait_for

__all__ = ["ROOT", "Bus", "command", "free_port", "phantom", "wait_until"]

# Security is on by default and finds the keys `make up` leaves in this checkout's
# var/keys: the test process itself (its in-process clients) runs without unless a
# test says otherwise, like the processes a Bus starts. Tests of security set it.
os.environ["PHANTOM_SECURITY"] = "off"


def command(
    bus: Bus | Mapping[str, str], argv: list[str], *, timeout: float = 120.0, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` from the checkout with ``bus``'s environment (or the environment given)
    plus ``env``, its output captured as text."""
    base = bus.env if isinstance(bus, Bus) else bus
    return subprocess.run(argv, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=timeout)


def phantom(
    bus: Bus | Mapping[str, str], *args: str, timeout: float = 120.0, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the ``phantom`` CLI (see :func:`command`)."""
    return command(bus, [sys.executable, "-m", "phantom_bus.cli", *args], timeout=timeout, **env)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    return wait_for(predicate, timeout, interval)


class Bus(Processes):
    """A private set of Phantom processes for one test, logging at DEBUG (see tests/procs.py)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, log_level="DEBUG")

    @property
    def endpoint(self) -> str:
        return self.env["PHANTOM_BROKER"]

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

    def workers(self, service: str) -> int:
        with self.client(retries=1, timeout=0.5) as c:
            try:
                return int(c.services().get(service, {}).get("workers", 0))
            except PhantomError:
                return 0

    def wait_workers(self, service: str, count: int = 1, timeout: float = 15.0) -> None:
        wait_until(lambda: self.workers(service) == count, timeout)


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


@pytest.fixture(params=["memory", "sqlite"])
def store_run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Callable[[Any], Awaitable[Any]]], Any]:
    """Run an async test body against a fresh store of each local backend (memory, SQLite)."""
    from phantom_bus.store.memory import MemoryStore
    from phantom_bus.store.sqlite import SqliteStore

    def run(body: Callable[[Any], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "s.sqlite3")
            try:
                return await asyncio.wait_for(body(store), 30)
            finally:
                await store.close()

        return asyncio.run(main())

    return run
