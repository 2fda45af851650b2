"""Sharding's settings: re-replication after a failure, and the primary leases it grants
(agents renew them and fence their primaries by the same figures)."""

from __future__ import annotations

from typing import Any

from phantom_bus.config import Setting, defaults, nonnegative_float, positive_float

#: Offered to the bus through the ``phantom.settings`` entry point (pyproject.toml).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "dead_delay",
        60.0,
        nonnegative_float,
        "s",
        "How long a dead node's replicas wait before they are re-created elsewhere (its primaries "
        "fail over at once): a restart or reboot within it costs no data movement.",
    ),
    Setting(
        "primary_lease",
        2.0,
        positive_float,
        "s",
        "How long a primary keeps taking writes after its agent's last successful lease renewal "
        "(renewed every quarter of it). Failure detection takes about 1.3 s, so a 2 s lease adds "
        "little to a failover, while a control-plane restart of under 1.5 s costs no writes.",
    ),
    Setting(
        "lease_drift",
        0.5,
        nonnegative_float,
        "s",
        "Added to primary_lease before the control plane promotes another primary: covers clock-rate "
        "differences between hosts (well under 1 ms per second) and the time an agent takes to start "
        "its fence callback once its lease ran out.",
    ),
)

#: The default of each of these settings by name, for the cores of this service.
DEFAULTS: dict[str, Any] = defaults(SETTINGS)
