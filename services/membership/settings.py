"""Membership's settings: heartbeats and the phi-accrual failure detector.

The evidence for these values is in :mod:`services.membership.config` and
bench/failure_detection*.py.
"""

from __future__ import annotations

from typing import Any

from phantom_bus.config import Setting, defaults, positive_float, positive_int

#: Offered to the bus through the ``phantom.settings`` entry point (pyproject.toml).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "heartbeat_interval",
        0.25,
        positive_float,
        "s",
        "Seconds between an agent's heartbeats to membership; detection needs about 5 of them "
        "of silence, so 250 ms gives detection in about 1.3 s, under the 2 s goal.",
    ),
    Setting(
        "phi_window",
        200,
        positive_int,
        "samples",
        "Inter-arrival gaps kept per node: 50 s at 4 Hz, so one late heartbeat barely moves the "
        "estimate and a changed network is learned within a minute.",
    ),
    Setting(
        "phi_min_std_dev",
        0.1,
        positive_float,
        "s",
        "Floor on the gap's standard deviation: loopback jitter is a few ms, and without a floor "
        "phi explodes at the first 20 ms delay. 0.05 s triples false convictions under 1 s agent "
        "pauses; 0.2 s pushes worst detection to 1.94 s.",
    ),
    Setting(
        "acceptable_pause",
        0.5,
        positive_float,
        "s",
        "Silence beyond the mean gap that counts as no evidence at all: two intervals cover an "
        "agent's GC or scheduler stall.",
    ),
    Setting(
        "phi_suspect",
        3.0,
        positive_float,
        "phi",
        "Phi at which a node becomes suspect (about 1.06 s of silence at the defaults); suspicion "
        "is cheap and refutable.",
    ),
    Setting(
        "phi_dead",
        8.0,
        positive_float,
        "phi",
        "Phi at which a suspect node is declared dead (about 1.31 s of silence at the defaults).",
    ),
    Setting(
        "suspicion_timeout",
        1.0,
        positive_float,
        "s",
        "Longest a node may stay suspect before it is dead, whatever its history: bounds detection "
        "for nodes whose window learned long gaps.",
    ),
    Setting(
        "incarnation_lead",
        3600.0,
        positive_float,
        "s",
        "How far ahead of membership's wall clock (or of the incarnation it holds, if higher) a "
        "heartbeat's incarnation may be; further is refused and counted (incarnation_ahead). "
        "Agents number incarnations in milliseconds of their clock, so only a clock more than an "
        "hour fast or a forged heartbeat exceeds it; one such heartbeat could otherwise push a "
        "node's incarnation to 2^63-1, past which its agent can never refute.",
    ),
)

#: The default of each of these settings by name, for the cores of this service.
DEFAULTS: dict[str, Any] = defaults(SETTINGS)
