"""Selection: which node serves a request for a shard (sans-I/O, shared code).

One implementation for both places that choose a node: the balancer process
(every select a request) and a library client routing locally from its own
copy of the map. :class:`Balancer` (``balancer``) holds the selection rules,
``strategies`` the five strategies, ``health`` ejection, panic mode and slow
start, ``stats`` the bounded latency sketch and rate meter, ``leases`` the
open leases, ``config`` every tunable, and ``local`` the client's side
(a map plus node health turned into the balancer's inputs).
"""

from phantom_bus.routing.balancer import (
    EJECTED,
    LEASES_EXPIRED,
    RESTORED,
    Balancer,
    Candidate,
    Selection,
)
from phantom_bus.routing.config import STRATEGY_NAMES, BalancerConfig
from phantom_bus.routing.stats import LatencySketch

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
