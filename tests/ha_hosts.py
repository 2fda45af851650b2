"""Several control-plane "hosts" on 127.0.0.1, for tests/test_ha.py and bench/ha_failover.py.

A host is one broker plus one instance of discovery, membership, sharding,
the balancer and the manager, with its own block of free ports and
``instance`` = the host's name; every process binds only its own host's
endpoints and connects to the lists of all of them, as on real hosts. The
store is an etcd given by URL (each :class:`Hosts` uses its own key prefix).
Every process runs in its own session, so a host is killed (SIGKILL),
frozen (SIGSTOP) and thawed (SIGCONT) as one; :meth:`Hosts.close` stops
everything, thawing first, whatever happened.

:class:`Traffic` is a client thread that selects under load and records
what a user of the database would notice: every failure that reaches the
caller, every selection whose epoch is lower than one the same client saw
before, and the times of its successes (so the longest gap between two
successful selects is the stall a host loss caused).

Built on tests/procs.py; no pytest here and nothing from tests.conftest, so the bench can use it.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phantom_bus.client import Client
from phantom_bus.errors import NotFound, PhantomError
from tests.procs import ENDPOINTS, free_port, phantom_env, spawn, status_of, stop, wait_for

HOSTS = ("h1", "h2", "h3")
SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
#: The services with one leader, and the operation whose reply names it.
LEADING = ("sharding", "manager", "membership")


class Hosts:
    """Control-plane hosts and agents on free ports of 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        tmp: Path,
        store: str,
        *,
        hosts: Iterable[str] = HOSTS,
        ttl: float = 2.0,
        log_level: str = "INFO",
        **settings: str,
    ) -> None:
        self.tmp = tmp
        self.hosts = tuple(hosts)
        self.ports = {h: {k: free_port() for k in ENDPOINTS} for h in self.hosts}
        lists = {kind: ",".join(self.endpoint(h, kind) for h in self.hosts) for kind in ENDPOINTS}
        self.env = phantom_env(lists, tmp / "var", log_level)
        self.env.update(
            {
                "PHANTOM_STORE": store,
                "PHANTOM_STORE_PREFIX": f"/ha-{os.getpid()}-{time.time_ns()}/",
                "PHANTOM_LEADER_TTL": str(ttl),
                **{f"PHANTOM_{k.upper()}": v for k, v in settings.items()},
            }
        )
        self.ttl = ttl
        self.procs: dict[str, dict[str, subprocess.Popen[bytes]]] = {}
        self.logs: dict[str, Path] = {}
        self.frozen: set[str] = set()

    def endpoint(self, host: str, kind: str) -> str:
        return f"tcp://127.0.0.1:{self.ports[host][kind]}"

    @property
    def brokers(self) -> str:
        """The broker list a client is given."""
        return self.env["PHANTOM_BROKER"]

    # --- processes -----------------------------------------------------------------

    def _spawn(self, group: str, label: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{group}-{label}.log"
        proc = spawn(argv, {**self.env, **env}, log, append=True)
        self.procs.setdefault(group, {})[label] = proc
        self.logs[f"{group}-{label}"] = log
        return proc

    def start_host(self, host: str) -> None:
        """The six processes of ``host``, each binding its own endpoints only."""
        own = {f"PHANTOM_{k.upper()}": self.endpoint(host, k) for k in ENDPOINTS}
        py = sys.executable
        self._spawn(host, "broker", [py, "-m", "phantom_bus.broker"], PHANTOM_INSTANCE=host,
                    **{k: own[k] for k in ("PHANTOM_BROKER", "PHANTOM_BACKEND", "PHANTOM_EVENTS_IN",
                                           "PHANTOM_EVENTS_OUT")})  # fmt: skip
        binds = {"discovery": "PHANTOM_BEACON", "membership": "PHANTOM_HEARTBEAT"}
        for service in SERVICES:
            extra = {binds[service]: own[binds[service]]} if service in binds else {}
            self._spawn(host, service, [py, "-m", f"services.{service}"], PHANTOM_INSTANCE=host, **extra)

    def start_agent(self, n: int, zone: str | None = None) -> subprocess.Popen[bytes]:
        """Agent ``node-n`` (zone ``z1..z3`` by n) that beacons and heartbeats to every host."""
        zone = zone or f"z{(n - 1) % 3 + 1}"
        argv = [sys.executable, "-m", "services.agent", "--node-id", f"node-{n}", "--zone", zone,
                "--address", f"127.0.0.1:{7000 + n}"]  # fmt: skip
        return self._spawn("agents", f"node-{n}", argv)

    def signal_host(self, host: str, sig: int) -> None:
        """Send ``sig`` to every process group of ``host`` (SIGKILL also reaps them)."""
        for proc in self.procs.get(host, {}).values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
        if sig == signal.SIGSTOP:
            self.frozen.add(host)
        elif sig == signal.SIGCONT:
            self.frozen.discard(host)
        elif sig == signal.SIGKILL:
            for proc in self.procs.get(host, {}).values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            self.frozen.discard(host)

    def alive_hosts(self) -> list[str]:
        """Hosts whose processes all run (frozen ones included)."""
        return [h for h in self.hosts if h in self.procs and all(p.poll() is None for p in self.procs[h].values())]

    def log(self, group: str, label: str) -> str:
        return self.logs[f"{group}-{label}"].read_text(errors="replace")

    def close(self) -> None:
        """Stop every process: thaw, SIGTERM, then SIGKILL what is left."""
        stop([p for group in self.procs.values() for p in group.values()])

    # --- asking the cluster ----------------------------------------------------------

    def client(self, timeout: float = 1.0, retries: int = 2, routing: str = "broker") -> Client:
        return Client(self.brokers, timeout=timeout, retries=retries, routing=routing,
                      events=self.env["PHANTOM_EVENTS_OUT"])  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The status document, or {} if nobody answers."""
        return status_of(lambda: self.client(timeout=2.0, retries=2))

    def wait_green(self, timeout: float) -> dict[str, Any]:
        """Until green with no move in flight."""

        def settled() -> dict[str, Any] | None:
            doc = self.status()
            ok = doc.get("health") == "green" and not (doc.get("shards") or {}).get("moving")
            return doc if ok else None

        return wait_for(settled, timeout, interval=0.3, what="green and settled")  # type: ignore[no-any-return]

    def leader(self, service: str, c: Client | None = None) -> tuple[str, int] | None:
        """(instance, term) of ``service``'s leader by its own word (its ``health`` reply
        says it leads; membership's ``verdicts`` only its leader answers); None if no
        leader answered a few tries."""
        own = c is None
        c = c or self.client(timeout=0.5, retries=1)
        try:
            for _ in range(4):  # until the brokers hear who leads (its next heartbeat)
                try:
                    if service == "membership":
                        reply = c.request("membership", "verdicts")
                        seen = {"instance": reply.get("instance"), "term": reply.get("term"), "leader": True}
                    else:
                        seen = c.request(service, "health")["leader"]
                except (PhantomError, KeyError, TypeError, AttributeError):
                    continue
                if seen.get("leader") is True and seen.get("instance") and isinstance(seen.get("term"), int):
                    return str(seen["instance"]), int(seen["term"])
            return None
        finally:
            if own:
                c.close()

    def leaders(self) -> dict[str, tuple[str, int] | None]:
        with self.client(timeout=0.5, retries=1) as c:
            return {s: self.leader(s, c) for s in LEADING}

    def wait_new_leader(self, service: str, old: tuple[str, int], timeout: float) -> tuple[str, int]:
        """Until an instance other than ``old``'s leads ``service`` in a newer term."""
        with self.client(timeout=0.5, retries=1) as c:

            def moved() -> tuple[str, int] | None:
                now = self.leader(service, c)
                return now if now is not None and now[0] != old[0] and now[1] > old[1] else None

            return wait_for(moved, timeout, interval=0.05, what=f"a new {service} leader")  # type: ignore[no-any-return]


class Traffic(threading.Thread):
    """Selects (and write selects) under load until stopped, as a database client would.

    ``errors``: every exception that reached the caller (after the client's own
    retries), and every write selection that did not name a primary.
    ``regressions``: selections whose epoch was lower than the highest this client
    had seen. ``times``: monotonic time of each successful round (a select and, with
    ``writes``, a write select). ``reads``, ``written``: selections made;
    ``nodes``: how many reads each node got. A lease that its balancer lost (it died
    with its host) is counted in ``lost_leases``, or is an error without ``lost_leases_ok``.
    """

    def __init__(self, brokers: str, events: str | None, *, routing: str = "broker", writes: bool = True,
                 keys: int = 200, timeout: float = 1.0, retries: int = 5, pause: float = 0.005,
                 lost_leases_ok: bool = True) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.brokers, self.events, self.routing, self.writes = brokers, events, routing, writes
        self.keys, self.timeout, self.retries, self.pause = keys, timeout, retries, pause
        self.lost_leases_ok = lost_leases_ok
        self.halt = threading.Event()
        self.errors: list[str] = []
        self.regressions: list[tuple[str, int, int]] = []
        self.times: list[float] = []
        self.highest = 0
        self.reads = self.written = self.lost_leases = 0
        self.nodes: Counter[str] = Counter()

    @property
    def ops(self) -> int:
        return len(self.times)

    def run(self) -> None:
        with Client(self.brokers, timeout=self.timeout, retries=self.retries, routing=self.routing,
                    events=self.events) as c:  # fmt: skip
            i = 0
            while not self.halt.is_set():
                key = f"user:{i % self.keys}"
                i += 1
                try:
                    sel = c.select(key)
                    self.reads += 1
                    self.nodes[sel.node] += 1
                    self._saw(key, sel.epoch)
                    self._release(c, sel)
                    if self.writes:
                        w = c.select(key, write=True)
                        self._saw(key, w.epoch)
                        if w.role != "primary":
                            self.errors.append(f"{key}: a write selection with role {w.role}")
                        self.written += 1
                        self._release(c, w)
                    self.times.append(time.monotonic())
                except Exception as exc:  # every failure is the finding
                    self.errors.append(f"{key}: {exc!r}")
                time.sleep(self.pause)

    def _saw(self, key: str, epoch: int) -> None:
        if epoch < self.highest:
            self.regressions.append((key, self.highest, epoch))
        self.highest = max(self.highest, epoch)

    def _release(self, c: Client, sel: Any) -> None:
        try:
            c.release(sel, latency_ms=1.0, ok=True)
        except NotFound:
            # A lease of a balancer that died with its host is gone with its soft state.
            if not self.lost_leases_ok:
                raise
            self.lost_leases += 1

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time between two successful selects within [start, end] (its ends count)."""
        times = self.times[bisect.bisect_left(self.times, start): bisect.bisect_right(self.times, end)]
        points = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(points))

    def wait_ops(self, more: int, timeout: float) -> None:
        """Until ``more`` further selects succeeded (or one failed)."""
        target = self.ops + more
        wait_for(lambda: self.ops >= target or self.errors, timeout, what=f"{more} more selects")

    def __enter__(self) -> Traffic:
        self.start()
        self.wait_ops(20, 60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(30)
