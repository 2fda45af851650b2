"""Prometheus ``/metrics`` for every process, through ``prometheus_client``.

The setting ``metrics`` (``PHANTOM_METRICS``, ``HOST:PORT``, empty = off) is
the address a process serves its own ``/metrics`` on, in the Prometheus text
format. The HTTP server is ``prometheus_client``'s, on a daemon thread, so a
scrape never runs on (or blocks) a process's event loop; what a scrape reads
is state with its own lock (the select timers), plain values that the loops
replace whole, or, for a single-threaded core, what the shell reads for it on
its event loop.

Every process exports the library's ``process_*`` series and
``phantom_up{service}``; a shell adds its own by giving a ``metrics()``
method returning metric families (see :class:`ShellCollector`). The manager's
are the cluster view (``phantom_cluster_health``, ``phantom_nodes``,
``phantom_shards``, ``phantom_shardmap_epoch``, ``phantom_select_seconds``);
``python -m phantom_bus.metrics`` prints the reference table of every series
(the docs embed that output and a test keeps the two equal).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

#: Upper bounds (seconds) of ``phantom_select_seconds``: a select is answered in
#: well under a millisecond when healthy, so the buckets are fine at the low end.
SELECT_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)

HEALTH_VALUES: Mapping[str, int] = {"green": 0, "yellow": 1, "red": 2}
NODE_STATES: tuple[str, ...] = ("alive", "suspect", "dead", "left", "unknown")
SHARD_STATES: tuple[str, ...] = ("ok", "under_replicated", "unavailable", "moving", "degraded")


@dataclass(frozen=True, slots=True)
class Series:
    """One documented series: name, type, labels, who exports it, what it means."""

    name: str
    kind: str
    labels: str
    source: str
    help: str


#: Every series Phantom exports (beyond ``process_*``), for the docs and the collectors' help text.
SERIES: tuple[Series, ...] = (
    Series("phantom_up", "gauge", "service", "every process", "1 while the process serves /metrics."),
    Series(
        "phantom_broker_messages_total", "counter", "kind", "broker",
        "Messages the broker handled since it started: requests, replies, events, bad_client, bad_worker.",
    ),
    Series(
        "phantom_cluster_health", "gauge", "", "manager",
        "Cluster health: 0 green, 1 yellow, 2 red (no shard map known: 2).",
    ),
    Series(
        "phantom_nodes", "gauge", "state", "manager",
        "Registered nodes per membership state: alive, suspect, dead, left, unknown (not heard yet).",
    ),
    Series(
        "phantom_node_lifecycle", "gauge", "lifecycle", "manager",
        "Registered nodes per lifecycle: joining, active, draining, decommissioned, failed, left.",
    ),
    Series(
        "phantom_shards", "gauge", "state", "manager",
        "Shards per state: ok, under_replicated, unavailable, moving, degraded (a shard may count in "
        "several; ok = none of the others).",
    ),
    Series("phantom_shardmap_epoch", "gauge", "", "manager", "Epoch of the last shard map the manager saw."),
    Series(
        "phantom_moves_in_flight", "gauge", "", "manager",
        "Replica moves not finished yet, as sharding last reported them.",
    ),
    Series(
        "phantom_select_seconds", "histogram", "", "balancer, manager",
        "Time the balancer takes to answer a select (the manager re-exports the balancer's counts).",
    ),
)

_HELP = {s.name.removesuffix("_total"): s.help for s in SERIES}


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:9555``) -> ``(host, port)``; ValueError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:9555")
    return host, int(port)


class ShellCollector(Collector):
    """``phantom_up`` plus whatever ``source()`` yields, read at scrape time."""

    def __init__(self, service: str, source: Callable[[], Iterable[Metric]] | None = None) -> None:
        self.service = service
        self.source = source

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("phantom_up", _HELP["phantom_up"], labels=["service"])
        up.add_metric([self.service], 1)
        yield up
        if self.source is not None:
            yield from self.source()


def serve(address: str, service: str, source: Callable[[], Iterable[Metric]] | None = None) -> CollectorRegistry:
    """Serve ``/metrics`` on ``address`` from a thread; returns the registry served.

    Raises ``OSError`` when the address cannot be bound (the caller says so and
    goes on: metrics are never a reason for a process to stop).
    """
    host, port = parse_address(address)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(ShellCollector(service, source))
    start_http_server(port, addr=host, registry=registry)
    return registry


class SelectTimer:
    """The balancer's ``phantom_select_seconds``: observe in the loop, read from any thread."""

    def __init__(self) -> None:
        # Not registered anywhere: the shell yields it from its own collector, so
        # several balancers in one test process do not clash in a global registry.
        self._hist = Histogram("phantom_select_seconds", _HELP["phantom_select_seconds"],
                               buckets=SELECT_BUCKETS, registry=None)
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Count one select that took ``seconds``."""
        self._hist.observe(seconds)

    def families(self) -> list[Metric]:
        """The histogram as metric families (for a collector)."""
        return list(self._hist.collect())

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counts per bucket, sum and count, as plain data for the ``stats`` reply."""
        buckets: list[list[Any]] = []
        total = count = 0.0
        for family in self._hist.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets.append([sample.labels["le"], sample.value])
                elif sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
        return {"buckets": buckets, "sum": total, "count": count}


def histogram_from_snapshot(name: str, snapshot: Any) -> list[Metric]:
    """A histogram family rebuilt from :meth:`SelectTimer.snapshot` (nothing if it is unusable)."""
    if not isinstance(snapshot, Mapping) or not isinstance(snapshot.get("buckets"), list):
        return []
    try:
        buckets = [(str(le), float(v)) for le, v in snapshot["buckets"]]
        total = float(snapshot.get("sum", 0.0))
    except (TypeError, ValueError):
        return []
    family = HistogramMetricFamily(name, _HELP.get(name, name))
    family.add_metric([], buckets, total)
    return [family]


def reference() -> str:
    """The metrics reference table (Markdown) for the operator's guide."""
    lines = ["| series | type | labels | exported by | meaning |", "|---|---|---|---|---|"]
    for s in SERIES:
        lines.append(f"| `{s.name}` | {s.kind} | {s.labels or '-'} | {s.source} | {s.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
