"""The balancer: which node serves a request for a key (core; the shell is ``service``).

The core is sans-I/O: :class:`Balancer` takes candidates from the shard map,
membership and load updates, lease feedback and ``now``, and returns
selections and events. See ``core`` for the selection rules, ``strategies``
for the five strategies, ``health`` for ejection, panic mode and slow start,
``stats`` for the bounded latency sketch and rate meter, ``config`` for
every tunable.
"""

from services.balancer.config import STRATEGY_NAMES, BalancerConfig
from services.balancer.core import (
    EJECTED,
    LEASES_EXPIRED,
    RESTORED,
    Balancer,
    Candidate,
    Selection,
)
from services.balancer.stats import LatencySketch

__all__ = [
    "EJECTED",
    "LEASES_EXPIRED",
    "RESTORED",
    "STRATEGY_NAMES",
    "Balancer",
    "BalancerConfig",
    "Candidate",
    "LatencySketch",
    "Selection",
]
