"""Load sampling core: raw readings in, a load document out. Sans-I/O.

:class:`Readings` is what the probe saw at one instant; :class:`LoadSampler`
turns a series of them into :data:`LoadDocument` values, computing byte rates
from the deltas of cumulative counters. Tests feed it made-up readings.

Load document keys (a plain dict, sent in heartbeats; ``None`` = not known):

=================  ======  ===================================================
key                unit    meaning
=================  ======  ===================================================
sampled_at         s       ``Readings.taken_at`` (the agent's monotonic clock)
interval           s       time the rates cover; None on the first sample
cpu                %       host CPU busy, 0..100 over all cores
cpu_count          count   logical CPUs
load1_per_core     ratio   1-minute load average / cpu_count
load5_per_core     ratio   5-minute load average / cpu_count
load15_per_core    ratio   15-minute load average / cpu_count
mem                %       memory in use, 0..100
mem_available      bytes   memory available without swapping
mem_total          bytes   physical memory
disk_used_pct      %       data directory's file system in use; None if unreadable
disk_free          bytes   free on that file system; None if unreadable
disk_read_bps      B/s     host disk read rate; None first sample / no counters
disk_write_bps     B/s     host disk write rate; same
net_rx_bps         B/s     host network receive rate; same
net_tx_bps         B/s     host network send rate; same
proc_alive         bool    watched database process exists; None when not watching
proc_cpu           %       its CPU, 100 = one full core (can exceed 100)
proc_rss           bytes   its resident memory
=================  ======  ===================================================

Rates are None rather than 0 when unknown, so a consumer never mistakes "no
data yet" for "idle". A counter that went backwards (reset by a driver, an
interface re-created, a device removed from the sum) gives a rate of 0 for
that interval instead of a negative number, and is counted in
:attr:`LoadSampler.counter_resets`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TypedDict


@dataclass(frozen=True, slots=True)
class Readings:
    """What the host looked like at one instant; counters are cumulative since boot.

    ``None`` marks a reading the platform could not give (no disk counters in
    some containers, the data directory gone, no watched process).
    """

    taken_at: float  # monotonic seconds
    cpu_percent: float  # host, 0..100, since the previous reading
    loadavg: tuple[float, float, float]
    cpu_count: int
    mem_percent: float
    mem_available: int  # bytes
    mem_total: int  # bytes
    disk_percent: float | None = None  # data directory's file system
    disk_free: int | None = None  # bytes
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_recv_bytes: int | None = None
    net_sent_bytes: int | None = None
    proc_alive: bool | None = None  # None: no process watched
    proc_cpu_percent: float | None = None  # 100 = one core
    proc_rss: int | None = None  # bytes


class LoadDocument(TypedDict):
    """The load report of one sample; keys and units in the module docstring."""

    sampled_at: float
    interval: float | None
    cpu: float
    cpu_count: int
    load1_per_core: float
    load5_per_core: float
    load15_per_core: float
    mem: float
    mem_available: int
    mem_total: int
    disk_used_pct: float | None
    disk_free: int | None
    disk_read_bps: float | None
    disk_write_bps: float | None
    net_rx_bps: float | None
    net_tx_bps: float | None
    proc_alive: bool | None
    proc_cpu: float | None
    proc_rss: int | None


_COUNTERS = (
    ("disk_read_bytes", "disk_read_bps"),
    ("disk_write_bytes", "disk_write_bps"),
    ("net_recv_bytes", "net_rx_bps"),
    ("net_sent_bytes", "net_tx_bps"),
)


class LoadSampler:
    """Turns successive :class:`Readings` into :data:`LoadDocument` values.

    Keeps the previous reading to compute rates. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._previous: Readings | None = None
        self.counter_resets = 0
        """How many times a cumulative counter went backwards."""

    def update(self, readings: Readings) -> LoadDocument:
        """Take one reading and return the load document for it.

        Rates cover the time since the previous reading; on the first reading,
        or when ``taken_at`` did not advance, they are None.
        """
        with self._lock:
            previous, self._previous = self._previous, readings
            elapsed = readings.taken_at - previous.taken_at if previous is not None else None
            if elapsed is not None and elapsed <= 0:
                elapsed = None
            rates: dict[str, float | None] = {}
            for counter, key in _COUNTERS:
                rates[key] = self._rate(previous, readings, counter, elapsed)
        cores = max(readings.cpu_count, 1)
        load1, load5, load15 = readings.loadavg
        watching = readings.proc_alive is not None
        return LoadDocument(
            sampled_at=readings.taken_at,
            interval=elapsed,
            cpu=_percent(readings.cpu_percent),
            cpu_count=cores,
            load1_per_core=load1 / cores,
            load5_per_core=load5 / cores,
            load15_per_core=load15 / cores,
            mem=_percent(readings.mem_percent),
            mem_available=readings.mem_available,
            mem_total=readings.mem_total,
            disk_used_pct=(_percent(readings.disk_percent)
                           if readings.disk_percent is not None else None),
            disk_free=readings.disk_free,
            disk_read_bps=rates["disk_read_bps"],
            disk_write_bps=rates["disk_write_bps"],
            net_rx_bps=rates["net_rx_bps"],
            net_tx_bps=rates["net_tx_bps"],
            proc_alive=readings.proc_alive,
            # A gone process has no CPU or memory to report, whatever the probe left.
            proc_cpu=readings.proc_cpu_percent if watching and readings.proc_alive else None,
            proc_rss=readings.proc_rss if watching and readings.proc_alive else None,
        )

    def reset(self) -> None:
        """Forget the previous reading, e.g. after the host was suspended."""
        with self._lock:
            self._previous = None

    def _rate(self, previous: Readings | None, current: Readings, counter: str,
              elapsed: float | None) -> float | None:
        if previous is None or elapsed is None:
            return None
        before: int | None = getattr(previous, counter)
        after: int | None = getattr(current, counter)
        if before is None or after is None:
            return None
        delta = after - before
        if delta < 0:
            self.counter_resets += 1
            return 0.0
        return delta / elapsed


def _percent(value: float) -> float:
    # psutil can report slightly above 100 from rounding across cores; the
    # document promises 0..100.
    return min(max(float(value), 0.0), 100.0)
