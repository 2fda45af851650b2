"""The manager's settings: how a discovered node joins."""

from __future__ import annotations

from typing import Any

from phantom_bus.config import Setting, defaults, parse_bool

#: Offered to the bus through the ``phantom.settings`` entry point (pyproject.toml).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "auto_join",
        True,
        parse_bool,
        "bool",
        "A node that beacons and heartbeats gets replicas by itself; off: it waits for "
        "`phantom register NODE` (clusters where an unknown host must not receive data).",
    ),
)

#: The default of each of these settings by name, for the cores of this service.
DEFAULTS: dict[str, Any] = defaults(SETTINGS)
