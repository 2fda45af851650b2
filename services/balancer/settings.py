"""The balancer's settings: leases of selections."""

from __future__ import annotations

from typing import Any

from phantom_bus.config import Setting, defaults, positive_float

#: Offered to the bus through the ``phantom.settings`` entry point (pyproject.toml).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "lease_timeout",
        30.0,
        positive_float,
        "s",
        "A select's lease never released ends after this long (counted as expired, not as a node "
        "failure). Well above a client's worst case (3 attempts x 2.5 s) so live requests keep "
        "their lease; short enough that a crashed client stops skewing in-flight counts quickly.",
    ),
)

#: The default of each of these settings by name, for the cores of this service.
DEFAULTS: dict[str, Any] = defaults(SETTINGS)
