"""Every tunable of the balancer core, with its unit and the reason for its default.

The unit and reason of each field live in the field's metadata rather than in
comments only, so that tables of them can be generated (:func:`describe`). A
field that operators set is a setting of :mod:`phantom_bus.config`: its default,
unit and reason are that setting's (:func:`_setting`), and a shell builds the
config from its resolved settings (:meth:`BalancerConfig.from_settings`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from phantom_bus.config import SETTINGS

# Kept here (not derived from the strategy registry) so that this module has no
# imports from the rest of the package; a test pins the two lists equal.
STRATEGY_NAMES: tuple[str, ...] = (
    "round_robin",
    "random",
    "least_connections",
    "weighted",
    "performance",
)


def _doc(default: Any, unit: str, why: str) -> Any:
    return field(default=default, metadata={"unit": unit, "why": why})


def _setting(name: str) -> Any:
    """A field that is the setting ``name``: its default, unit and reason come from there."""
    setting = SETTINGS[name]
    return field(default=setting.default, metadata={"unit": setting.unit, "why": setting.why, "setting": name})


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """Tunables of :class:`phantom_bus.routing.balancer.Balancer`; call :meth:`validate` once."""

    default_strategy: str = _doc(
        "performance", "name",
        "Strategy used when a select names none. Power of two choices over peak-EWMA latency "
        "follows slow or loaded nodes without a global scan and without herding.",
    )
    lease_timeout_s: float = _setting("lease_timeout")
    expired_memory: int = _doc(
        4096, "leases",
        "Recently expired lease ids remembered so a late release gets a precise 'expired' "
        "answer instead of 'unknown'; bounded so a client that never releases costs O(1) memory.",
    )
    reads_from_primary: bool = _doc(
        True, "bool",
        "Whether a shard's primary also serves reads. On by default: the primary holds the "
        "newest data and excluding it wastes a third of a 3-replica shard's read capacity.",
    )
    eject_consecutive_failures: int = _doc(
        5, "failures",
        "Consecutive failed releases that eject a node. Five in a row is very unlikely from "
        "a healthy node with a few percent of errors, yet reacts within milliseconds under load.",
    )
    eject_base_s: float = _doc(
        30.0, "s",
        "Length of a node's first ejection; each further ejection doubles it. Long enough "
        "for a restart or a GC storm to pass, short enough that a false ejection costs little.",
    )
    eject_max_s: float = _doc(
        300.0, "s",
        "Cap on one ejection. A node that keeps failing is still re-probed every five minutes, "
        "so it comes back on its own once it recovers.",
    )
    eject_backoff_reset_s: float = _doc(
        60.0, "s",
        "Each full period this long without an ejection lowers a node's backoff level by "
        "one, so a node that failed once last week starts again from the base time.",
    )
    eject_max_fraction: float = _doc(
        0.10, "fraction",
        "At most this fraction of known nodes (and at least one) is ejected at once, so a "
        "fault on the client side or in the network cannot eject the whole cluster.",
    )
    panic_threshold: float = _doc(
        0.50, "fraction",
        "When fewer than this fraction of a shard's read candidates are healthy, all "
        "reachable candidates are used: overloading the few healthy ones is worse than "
        "trying the doubtful ones.",
    )
    slow_start_s: float = _doc(
        30.0, "s",
        "A node that becomes servable (alive again, active, restored) ramps its weight "
        "linearly over this window so cold caches are warmed by a trickle, not a flood.",
    )
    slow_start_floor: float = _doc(
        0.10, "fraction",
        "Weight a ramping node starts from; non-zero so it is probed and its latency "
        "estimate exists before it takes full traffic.",
    )
    ewma_decay_s: float = _doc(
        10.0, "s",
        "Time constant of the peak-EWMA latency estimate. About ten seconds smooths noise "
        "while following a degrading node within a few seconds; the estimate also decays "
        "toward zero while a node is not picked, so a node once slow is retried.",
    )
    ewma_sample_weight: float = _doc(
        0.0, "fraction",
        "0: the latency estimate is a peak EWMA (a slower sample replaces it at once), which "
        "suits a core that also sees every request in flight. Above 0: a moving average in "
        "which each sample has this weight (0.1: about the last ten responses), a measure of "
        "the node's current queueing delay; locally routing clients use it, because they see "
        "only their own share of what is in flight and a held peak would then outweigh it.",
    )
    performance_choices: int = _doc(
        2, "nodes",
        "Nodes of a shard's pool that performance compares: two at random (power of two "
        "choices), or 0 for all. Two avoid the herd a full scan causes when many requests are "
        "decided on the same stale view (batched feedback, several balancer replicas); a "
        "locally routing client's own in-flight counts are never stale, so it scans all.",
    )
    load_stale_s: float = _doc(
        5.0, "s",
        "Load samples older than this are ignored (no penalty): five heartbeat intervals "
        "at the default 1 s, so one or two late heartbeats do not drop the penalty.",
    )
    cpu_penalty: float = _doc(
        1.0, "factor",
        "Cost multiplier added at 100% CPU (cost x (1 + cpu_penalty x cpu/100)); CPU "
        "saturation lengthens queues roughly in proportion.",
    )
    mem_knee_percent: float = _doc(
        75.0, "%",
        "Memory use below this is not pressure (databases fill their caches on purpose); "
        "above it the memory penalty grows linearly to its maximum at 100%.",
    )
    mem_penalty: float = _doc(
        2.0, "factor",
        "Cost multiplier added at 100% memory. Larger than the CPU penalty because a node "
        "that starts swapping or evicting slows down abruptly.",
    )
    shard_rate_window_s: float = _doc(
        10.0, "s",
        "Window of the per-shard select rate reported to sharding for load-based splits; "
        "long enough that a burst does not trigger a split.",
    )
    shard_forget_s: float = _doc(
        600.0, "s",
        "Per-shard state (rate, counters, round-robin position) of a shard not selected for "
        "this long is dropped, so shards that were split or merged away do not accumulate.",
    )
    latency_relative_error: float = _doc(
        0.02, "fraction",
        "Relative error of the p50/p99 latency sketch; 2% keeps a node's sketch under 600 "
        "buckets over 1 us .. 3 h.",
    )
    latency_window_s: float = _doc(
        60.0, "s",
        "Reported latency percentiles cover the last one to two windows, so they describe "
        "the node as it is now, not its whole history.",
    )

    def validate(self) -> None:
        """Raise ValueError naming the first setting whose value cannot be used."""
        if self.default_strategy not in STRATEGY_NAMES:
            raise ValueError(
                f"default_strategy: {self.default_strategy!r} is not one of "
                f"{', '.join(STRATEGY_NAMES)}"
            )
        positive = (
            "lease_timeout_s", "eject_base_s", "eject_max_s", "eject_backoff_reset_s",
            "slow_start_s", "ewma_decay_s", "load_stale_s", "shard_rate_window_s",
            "shard_forget_s", "latency_window_s",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or math.isinf(value):
                raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
        choices = self.performance_choices
        if isinstance(choices, bool) or not isinstance(choices, int) or choices < 0 or choices == 1:
            raise ValueError(f"performance_choices: expected 0 (all) or a whole number >= 2, "
                             f"got {choices!r}")
        for name in ("expired_memory", "eject_consecutive_failures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a whole number >= 1, got {value!r}")
        if not isinstance(self.reads_from_primary, bool):
            raise ValueError(f"reads_from_primary: expected true or false, got "
                             f"{self.reads_from_primary!r}")
        if self.eject_max_s < self.eject_base_s:
            raise ValueError(
                f"eject_max_s: {self.eject_max_s} is below eject_base_s {self.eject_base_s}"
            )
        fractions = {
            "eject_max_fraction": (0.0, 1.0, False),
            "panic_threshold": (0.0, 1.0, True),
            "slow_start_floor": (0.0, 1.0, False),
            "latency_relative_error": (0.0, 0.5, False),
            "ewma_sample_weight": (0.0, 1.0, True),
        }
        for name, (low, high, low_ok) in fractions.items():
            value = getattr(self, name)
            ok = _is_number(value) and (low <= value if low_ok else low < value) and value <= high
            if not ok:
                bracket = "[" if low_ok else "("
                raise ValueError(f"{name}: expected a number in {bracket}{low}, {high}], "
                                 f"got {value!r}")
        for name in ("cpu_penalty", "mem_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0 or math.isinf(value):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if not _is_number(self.mem_knee_percent) or not 0 <= self.mem_knee_percent < 100:
            raise ValueError(f"mem_knee_percent: expected a number in [0, 100), got "
                             f"{self.mem_knee_percent!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BalancerConfig:
        """Build and validate a config whose setting fields take their value from the
        resolved ``settings`` (a :class:`phantom_bus.config.Config`); the rest keep their defaults."""
        return cls.from_mapping(
            {f.name: settings[f.metadata["setting"]] for f in fields(cls) if "setting" in f.metadata}
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BalancerConfig:
        """Build and validate a config from ``name -> value`` (e.g. parsed settings).

        Unknown names and values of the wrong type raise ValueError naming the
        setting; numbers given as strings (environment variables) are converted.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown balancer setting(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, raw in values.items():
            default = known[name].default
            try:
                kwargs[name] = _coerce(raw, default)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: cannot use {raw!r} (expected "
                                 f"{type(default).__name__})") from None
        config = cls(**kwargs)
        config.validate()
        return config


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _coerce(raw: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if isinstance(default, int):
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        return int(raw)
    if isinstance(default, float):
        if isinstance(raw, bool):
            raise ValueError(raw)
        return float(raw)
    return str(raw)


def describe() -> list[dict[str, Any]]:
    """One row per setting: name, default, unit and why (for docs and settings tables)."""
    rows = []
    for f in fields(BalancerConfig):
        default = f.default if f.default is not MISSING else None
        rows.append({"name": f.name, "default": default, "unit": f.metadata["unit"],
                     "why": f.metadata["why"]})
    return rows
