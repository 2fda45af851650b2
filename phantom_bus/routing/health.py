"""What the balancer knows about one node, and whether it may serve.

A node's fitness to serve combines four things that arrive separately:

* membership state (``alive | suspect | dead | left``) from ``member.*`` events,
* lifecycle (``joining | active | draining | decommissioned``) from the manager,
* outlier ejection, decided here from lease feedback,
* the replica's role in the shard (``primary | replica | joining | leaving``),
  which comes with each select.

They fold into three classes. ``OUT`` nodes never serve (dead, left,
decommissioned): sending a client there can only fail. ``DOUBTFUL`` nodes
(suspect, draining, ejected, never heard of, or a replica on its way out)
serve reads only in panic mode, when too few healthy replicas are left.
``HEALTHY`` nodes serve. A node whose lifecycle is ``joining`` never serves
reads, because its data may be incomplete; availability is not worth a wrong
answer. Writes go to the primary unless it is ``OUT``.
"""

from __future__ import annotations

import math

from phantom_bus.routing.config import BalancerConfig
from phantom_bus.routing.stats import PeakEwma, WindowedLatency

STATES = ("alive", "suspect", "dead", "left")
LIFECYCLES = ("joining", "active", "draining", "decommissioned")
ROLES = ("primary", "replica", "joining", "leaving")

HEALTHY = 0
DOUBTFUL = 1
OUT = 2
# Lifecycle joining: may take writes as primary (placement never does that,
# but the map is authoritative), never reads.
NO_READS = 3

_NEVER = -math.inf


def base_class(state: str | None, lifecycle: str | None) -> int:
    """Serving class from membership and lifecycle alone (ejection is checked per call)."""
    if state in ("dead", "left") or lifecycle == "decommissioned":
        return OUT
    if lifecycle == "joining":
        return NO_READS
    # An unknown state (no membership event yet) is doubtful rather than out,
    # so that a freshly started balancer still serves through panic mode.
    if state != "alive" or lifecycle == "draining":
        return DOUBTFUL
    return HEALTHY


class NodeState:
    """Everything the balancer holds about one node: health inputs, counters, latency.

    Plain attributes, read directly by the strategies on the hot path; every
    mutation happens under the balancer's lock.
    """

    __slots__ = (
        "address", "consecutive_failures", "cpu", "eject_level", "ejected_until",
        "ejections", "ewma", "expired", "failures", "in_flight", "klass", "latency",
        "leases", "lifecycle", "load_at", "mem", "node", "penalty", "picks", "ramp_end",
        "ramp_start", "state", "successes", "version", "weight",
    )

    def __init__(self, node: str, config: BalancerConfig, now: float) -> None:
        self.node = node
        self.state: str | None = None
        # (incarnation, change) of ``state`` when its source gave one.
        self.version: tuple[int, int] | None = None
        self.lifecycle: str | None = None
        self.klass = base_class(None, None)
        self.weight = 1.0
        self.address: str | None = None
        self.cpu: float | None = None
        self.mem: float | None = None
        self.load_at = _NEVER
        # Load multiplier of the cost, precomputed when load arrives.
        self.penalty = 1.0
        self.ramp_start = _NEVER
        self.ramp_end = _NEVER
        self.ejected_until = _NEVER
        self.eject_level = 0
        self.picks = 0
        self.leases = 0
        self.in_flight = 0
        self.successes = 0
        self.failures = 0
        self.expired = 0
        self.ejections = 0
        self.consecutive_failures = 0
        self.ewma = PeakEwma(config.ewma_decay_s, config.ewma_sample_weight)
        self.latency = WindowedLatency(config.latency_window_s, config.latency_relative_error,
                                       now)

    def ramp(self, now: float, floor: float) -> float:
        """Slow-start factor in [floor, 1]: how much of its weight the node gets now."""
        if now >= self.ramp_end:
            return 1.0
        span = self.ramp_end - self.ramp_start
        return max(floor, (now - self.ramp_start) / span)

    def start_ramp(self, start: float, window: float) -> None:
        """Begin a slow-start ramp at ``start`` lasting ``window`` seconds."""
        self.ramp_start = start
        self.ramp_end = start + window

    def is_ejected(self, now: float) -> bool:
        """Whether outlier ejection currently keeps the node out of the healthy pool."""
        return self.ejected_until > now


def load_penalty(cpu: float, mem: float, config: BalancerConfig) -> float:
    """Cost multiplier (>= 1) for a node at ``cpu``% CPU and ``mem``% memory."""
    penalty = 1.0 + config.cpu_penalty * cpu / 100.0
    knee = config.mem_knee_percent
    if mem > knee:
        penalty += config.mem_penalty * (mem - knee) / (100.0 - knee)
    return penalty


def ejection_duration(level: int, config: BalancerConfig) -> float:
    """Length of an ejection at backoff ``level`` (0 for the first): doubling, capped."""
    # Beyond 2**40 the cap has long been reached; avoid building huge floats.
    return min(config.eject_base_s * 2.0 ** min(level, 40), config.eject_max_s)


def ejection_cap(known_nodes: int, config: BalancerConfig) -> int:
    """How many nodes may be ejected at once: the configured fraction, at least one."""
    # The epsilon keeps e.g. 0.3 * 10 from flooring to 2 through rounding.
    return max(1, int(known_nodes * config.eject_max_fraction + 1e-9))
