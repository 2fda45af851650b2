"""Discovery's settings: how often agents beacon (agents and discovery must agree) and how
long discovery keeps a silent node."""

from __future__ import annotations

from typing import Any

from phantom_bus.config import Setting, defaults, positive_float

#: Offered to the bus through the ``phantom.settings`` entry point (pyproject.toml).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "beacon_interval",
        1.0,
        positive_float,
        "s",
        "Seconds between an agent's beacons (agents and discovery must agree): a new node is seen "
        "within a second, and 5,000 nodes cost discovery a few percent of a core.",
    ),
    Setting(
        "beacon_expiry",
        5.0,
        positive_float,
        "s",
        "Silence after which discovery reports node.lost; must exceed beacon_interval. Five "
        "intervals: PUB/SUB drops silently under load, so 4 beacons in a row must go missing "
        "before a false alarm. Discovery is a hint; membership decides liveness.",
    ),
    Setting(
        "discovery_forget",
        600.0,
        positive_float,
        "s",
        "How long lost and left nodes stay listed (and keep their incarnation order) before "
        "they are forgotten: covers a reboot, bounds the table under churn.",
    ),
)

#: The default of each of these settings by name, for the cores of this service.
DEFAULTS: dict[str, Any] = defaults(SETTINGS)
