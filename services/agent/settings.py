"""The agent's settings: its node, its load samples, and how it drives the database."""

from __future__ import annotations

from typing import Any

from phantom_bus.config import Setting, defaults, nonnegative_float, optional_text, parse_path, positive_float

#: Offered to the bus through the ``phantom.settings`` entry point (pyproject.toml).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "load_interval",
        1.0,
        positive_float,
        "s",
        "Seconds between an agent's psutil samples: fine enough for balancing, and one "
        "sample costs about a millisecond of the host's CPU.",
    ),
    Setting(
        "copy_time",
        0.5,
        nonnegative_float,
        "s",
        "How long an agent takes to 'copy' a shard it is asked to hold before it confirms the "
        "replica: the agent stands in for the database here, so this simulates the copy.",
    ),
    Setting(
        "participant",
        "sim",
        parse_path,
        "name",
        "How the agent drives the database: sim (a simulated copy of copy_time seconds, the demo), "
        "exec (run participant_exec per transition) or module:Class (a Python class, see "
        "docs/integrating.md).",
    ),
    Setting(
        "participant_exec",
        "",
        optional_text,
        "command",
        "The command run per transition with participant=exec (split like a shell would, no shell); "
        "its environment says what to do (docs/integrating.md).",
    ),
    Setting(
        "participant_timeout",
        600.0,
        positive_float,
        "s",
        "Longest one transition may run before it is killed and counted as failed: a copy of a few "
        "GiB takes well under that; a hung callback must not hold a shard for ever.",
    ),
    Setting("node_id", "", optional_text, "id", "The agent's node id (required for an agent)."),
    Setting("zone", "default", parse_path, "name", "The agent's failure zone (rack, availability zone)."),
    Setting(
        "address",
        "",
        optional_text,
        "host:port",
        "The database address the agent advertises; may differ from any bound address "
        "(NAT, containers). Empty: 127.0.0.1 and a port derived from the node id.",
    ),
    Setting(
        "weight", 1.0, positive_float, "ratio", "The node's relative capacity for placement and balancing."
    ),
)

#: The default of each of these settings by name, for the cores of this service.
DEFAULTS: dict[str, Any] = defaults(SETTINGS)
