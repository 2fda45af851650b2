"""The psutil side of load sampling: reads the host, returns :class:`Readings`.

Kept thin on purpose: every decision (rates, resets, units) is in
:mod:`services.agent.load`, which is tested with made-up readings. Reading
``/proc`` is blocking I/O of about a millisecond, so the asyncio shell calls
:meth:`PsutilProbe.read` through ``asyncio.to_thread``.

Only APIs that are stable across psutil 6 and 7 are used, and never
``net_connections`` (it walks every socket of the host: far too slow for a
periodic loop and it needs root on some systems).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from loguru import logger

from services.agent.load import Readings


class PsutilProbe:
    """Takes :class:`Readings` of this host and, optionally, of one database process.

    Call :meth:`prime` once at start: psutil's CPU percentages compare against
    the previous call, so the very first call has nothing to compare with and
    returns a meaningless 0.0.
    """

    def __init__(self, data_dir: str | Path, watch_pid: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._cpu_count = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        self._process: psutil.Process | None = None
        self._watch_pid: int | None = None
        self._warned: set[str] = set()
        self.watch(watch_pid)

    @property
    def watch_pid(self) -> int | None:
        """The pid being watched, or None."""
        return self._watch_pid

    def watch(self, pid: int | None) -> None:
        """Watch another process (e.g. the database restarted) or stop watching (None)."""
        self._watch_pid = pid
        self._process = None
        if pid is None:
            return
        try:
            self._process = psutil.Process(pid)
            self._process.cpu_percent(interval=None)
        except psutil.Error:
            # A pid that does not exist yet is reported as gone, not a start failure:
            # the agent may start before the database, and --watch-pid is optional data.
            self._process = None

    def prime(self) -> None:
        """Make the first real reading meaningful (see the class docstring)."""
        psutil.cpu_percent(interval=None)
        if self._process is not None:
            try:
                self._process.cpu_percent(interval=None)
            except psutil.Error:
                self._process = None

    def read(self, now: float) -> Readings:
        """Read the host now; ``now`` is the caller's monotonic clock in seconds."""
        cpu = psutil.cpu_percent(interval=None)
        try:
            load = psutil.getloadavg()
        except OSError as exc:
            self._warn_once("loadavg", f"load average not readable: {exc}")
            load = (0.0, 0.0, 0.0)
        mem = psutil.virtual_memory()
        disk_percent: float | None = None
        disk_free: int | None = None
        try:
            usage = psutil.disk_usage(str(self.data_dir))
            disk_percent, disk_free = usage.percent, usage.free
        except OSError as exc:
            self._warn_once("disk_usage", f"disk usage of {self.data_dir} not readable: {exc}")
        read_bytes = write_bytes = recv_bytes = sent_bytes = None
        # Containers often lack /proc/diskstats and /sys/block.
        disk_io = self._counters(psutil.disk_io_counters, "disk_io", "disk I/O counters")
        if disk_io is not None:
            read_bytes, write_bytes = disk_io.read_bytes, disk_io.write_bytes
        net_io = self._counters(psutil.net_io_counters, "net_io", "network I/O counters")
        if net_io is not None:
            recv_bytes, sent_bytes = net_io.bytes_recv, net_io.bytes_sent
        proc_alive, proc_cpu, proc_rss = self._read_process()
        return Readings(
            taken_at=now,
            cpu_percent=cpu,
            loadavg=(float(load[0]), float(load[1]), float(load[2])),
            cpu_count=self._cpu_count,
            mem_percent=mem.percent,
            mem_available=mem.available,
            mem_total=mem.total,
            disk_percent=disk_percent,
            disk_free=disk_free,
            disk_read_bytes=read_bytes,
            disk_write_bytes=write_bytes,
            net_recv_bytes=recv_bytes,
            net_sent_bytes=sent_bytes,
            proc_alive=proc_alive,
            proc_cpu_percent=proc_cpu,
            proc_rss=proc_rss,
        )

    def _counters(self, read: Callable[[], Any], key: str, what: str) -> Any:
        """``read()``, or None (warned about once) where the host does not provide it."""
        try:
            return read()
        except (OSError, NotImplementedError) as exc:
            self._warn_once(key, f"{what} not available: {exc}")
            return None

    def _read_process(self) -> tuple[bool | None, float | None, int | None]:
        if self._watch_pid is None:
            return None, None, None
        process = self._process
        # is_running() also catches a pid reused by an unrelated process.
        if process is None or not process.is_running():
            self._process = None
            return False, None, None
        try:
            with process.oneshot():
                return True, process.cpu_percent(interval=None), process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            self._process = None
            return False, None, None
        except psutil.AccessDenied:
            self._warn_once("proc", f"not allowed to read process {self._watch_pid}")
            return True, None, None

    def _warn_once(self, what: str, message: str) -> None:
        # A missing counter stays missing; one log line says so, not one per sample.
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message)
