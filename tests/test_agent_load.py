"""Load sampler core with made-up readings, and a smoke test of the psutil probe."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from services.agent.load import LoadDocument, LoadSampler, Readings
from services.agent.probe import PsutilProbe

GIB = 1 << 30


def reading(t: float, **changes: object) -> Readings:
    base = Readings(
        taken_at=t,
        cpu_percent=25.0,
        loadavg=(2.0, 1.0, 0.5),
        cpu_count=4,
        mem_percent=40.0,
        mem_available=6 * GIB,
        mem_total=10 * GIB,
        disk_percent=70.0,
        disk_free=30 * GIB,
        disk_read_bytes=1_000_000,
        disk_write_bytes=2_000_000,
        net_recv_bytes=5_000_000,
        net_sent_bytes=7_000_000,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


DOCUMENT_KEYS = set(LoadDocument.__annotations__)


def test_first_sample_has_levels_but_no_rates() -> None:
    doc = LoadSampler().update(reading(100.0))
    assert set(doc) == DOCUMENT_KEYS
    assert doc["interval"] is None
    assert doc["disk_read_bps"] is doc["disk_write_bps"] is None
    assert doc["net_rx_bps"] is doc["net_tx_bps"] is None
    assert (doc["cpu"], doc["mem"], doc["disk_used_pct"]) == (25.0, 40.0, 70.0)
    assert doc["mem_available"] == 6 * GIB and doc["mem_total"] == 10 * GIB
    assert doc["sampled_at"] == 100.0


def test_rates_come_from_counter_deltas_over_elapsed_time() -> None:
    sampler = LoadSampler()
    sampler.update(reading(10.0))
    doc = sampler.update(
        reading(
            12.0,
            disk_read_bytes=1_000_000 + 4_000,
            disk_write_bytes=2_000_000 + 10_000,
            net_recv_bytes=5_000_000 + 2_000_000,
            net_sent_bytes=7_000_000,
        )
    )
    assert doc["interval"] == 2.0
    assert doc["disk_read_bps"] == 2_000.0
    assert doc["disk_write_bps"] == 5_000.0
    assert doc["net_rx_bps"] == 1_000_000.0
    assert doc["net_tx_bps"] == 0.0


def test_counter_that_goes_backwards_gives_zero_not_negative() -> None:
    sampler = LoadSampler()
    sampler.update(reading(0.0, net_recv_bytes=2**32 - 10))
    doc = sampler.update(reading(1.0, net_recv_bytes=500))  # wrapped or reset
    assert doc["net_rx_bps"] == 0.0
    assert sampler.counter_resets == 1
    # The next interval is measured from the reset value.
    assert sampler.update(reading(2.0, net_recv_bytes=1500))["net_rx_bps"] == 1000.0


def test_missing_counters_give_none_and_recover() -> None:
    sampler = LoadSampler()
    sampler.update(reading(0.0))
    doc = sampler.update(reading(1.0, disk_read_bytes=None, disk_write_bytes=None))
    assert doc["disk_read_bps"] is None and doc["disk_write_bps"] is None
    assert doc["net_rx_bps"] == 0.0  # the other counters are unaffected
    sampler.update(reading(2.0, disk_read_bytes=100, disk_write_bytes=100))
    doc = sampler.update(reading(3.0, disk_read_bytes=300, disk_write_bytes=100))
    assert (doc["disk_read_bps"], doc["disk_write_bps"]) == (200.0, 0.0)


def test_time_not_advancing_gives_no_rates() -> None:
    sampler = LoadSampler()
    sampler.update(reading(5.0))
    doc = sampler.update(reading(5.0, net_recv_bytes=9_000_000))
    assert doc["interval"] is None and doc["net_rx_bps"] is None


def test_reset_forgets_the_previous_reading() -> None:
    sampler = LoadSampler()
    sampler.update(reading(0.0))
    sampler.reset()
    assert sampler.update(reading(1.0))["disk_read_bps"] is None


def test_load_is_divided_per_core() -> None:
    doc = LoadSampler().update(reading(0.0, loadavg=(8.0, 4.0, 2.0), cpu_count=8))
    assert (doc["load1_per_core"], doc["load5_per_core"], doc["load15_per_core"]) == (1.0, 0.5, 0.25)
    doc = LoadSampler().update(reading(0.0, loadavg=(3.0, 3.0, 3.0), cpu_count=0))
    assert doc["load1_per_core"] == 3.0 and doc["cpu_count"] == 1


def test_percentages_are_clamped_to_0_100() -> None:
    doc = LoadSampler().update(reading(0.0, cpu_percent=100.4, mem_percent=-0.1, disk_percent=101.0))
    assert (doc["cpu"], doc["mem"], doc["disk_used_pct"]) == (100.0, 0.0, 100.0)


def test_unreadable_data_directory_gives_none() -> None:
    doc = LoadSampler().update(reading(0.0, disk_percent=None, disk_free=None))
    assert doc["disk_used_pct"] is None and doc["disk_free"] is None


def test_watched_process_is_reported_and_gone_process_has_no_numbers() -> None:
    sampler = LoadSampler()
    unwatched = sampler.update(reading(0.0))
    assert unwatched["proc_alive"] is None and unwatched["proc_cpu"] is None
    alive = sampler.update(reading(1.0, proc_alive=True, proc_cpu_percent=150.0, proc_rss=512 << 20))
    assert (alive["proc_alive"], alive["proc_cpu"], alive["proc_rss"]) == (True, 150.0, 512 << 20)
    gone = sampler.update(reading(2.0, proc_alive=False, proc_cpu_percent=3.0, proc_rss=1))
    assert (gone["proc_alive"], gone["proc_cpu"], gone["proc_rss"]) == (False, None, None)


def test_sampler_is_safe_to_share_between_threads() -> None:
    sampler = LoadSampler()
    errors: list[float] = []

    def feed(offset: int) -> None:
        for i in range(500):
            doc = sampler.update(reading(offset * 10_000 + i, net_recv_bytes=i * 1000))
            rate = doc["net_rx_bps"]
            if rate is not None and rate < 0:
                errors.append(rate)

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# -- the real probe: reads this host, no sockets ------------------------------------


def test_probe_reads_this_host(tmp_path: Path) -> None:
    probe = PsutilProbe(tmp_path)
    probe.prime()
    first = probe.read(now=1.0)
    second = probe.read(now=2.0)
    assert 0.0 <= second.cpu_percent <= 100.0
    assert second.cpu_count >= 1 and len(second.loadavg) == 3
    assert 0 < second.mem_available <= second.mem_total
    assert second.disk_percent is not None and second.disk_free is not None
    assert second.proc_alive is None
    sampler = LoadSampler()
    sampler.update(first)
    doc = sampler.update(second)
    assert set(doc) == DOCUMENT_KEYS and doc["interval"] == 1.0
    for rate in (doc["disk_read_bps"], doc["disk_write_bps"], doc["net_rx_bps"], doc["net_tx_bps"]):
        assert rate is None or rate >= 0


def test_probe_reports_watched_process(tmp_path: Path) -> None:
    probe = PsutilProbe(tmp_path, watch_pid=os.getpid())
    probe.prime()
    sum(i * i for i in range(200_000))  # some CPU to measure
    readings = probe.read(now=1.0)
    assert readings.proc_alive is True
    assert readings.proc_rss is not None and readings.proc_rss > 0
    assert readings.proc_cpu_percent is not None and readings.proc_cpu_percent >= 0


def test_probe_reports_a_gone_process_instead_of_failing(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        probe = PsutilProbe(tmp_path, watch_pid=child.pid)
        probe.prime()
        assert probe.read(now=1.0).proc_alive is True
    finally:
        child.kill()
        child.wait()
    readings = probe.read(now=2.0)
    assert (readings.proc_alive, readings.proc_cpu_percent, readings.proc_rss) == (False, None, None)
    probe.watch(os.getpid())
    assert probe.read(now=3.0).proc_alive is True


def test_probe_with_missing_data_directory_reports_no_disk_usage(tmp_path: Path) -> None:
    probe = PsutilProbe(tmp_path / "not-there")
    readings = probe.read(now=1.0)
    assert readings.disk_percent is None and readings.disk_free is None


def test_probe_survives_hosts_without_io_counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    def unavailable() -> None:
        raise NotImplementedError("no /proc/diskstats")

    monkeypatch.setattr(psutil, "disk_io_counters", unavailable)
    monkeypatch.setattr(psutil, "net_io_counters", lambda: None)
    readings = PsutilProbe(tmp_path).read(now=1.0)
    assert readings.disk_read_bytes is None and readings.net_recv_bytes is None
