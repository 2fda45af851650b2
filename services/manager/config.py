"""Every tunable of the manager core, with its unit and the reason for its default.

Defaults that operators set come from the manager's settings
(:mod:`services.manager.settings`; ``dead_delay`` from sharding's, which enforces
it); the internal limits are here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.manager.settings import DEFAULTS
from services.sharding.settings import DEFAULTS as SHARDING_DEFAULTS


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    """Settings of the node registry, the join policy and failure handling."""

    auto_join: bool = DEFAULTS["auto_join"]
    """Whether a node seen by discovery joins by itself (bool). On: a node that
    beacons and heartbeats gets replicas with nobody typing anything, which is
    what `make up` and a scaling operator want. Off: a discovered node waits in
    ``joining`` (not approved) until ``phantom register NODE``, for clusters
    where an unknown host on the network must not receive data."""

    rereplication_delay: float = SHARDING_DEFAULTS["dead_delay"]
    """Seconds a dead (or left) node stays ``active`` before the manager records
    it as ``failed``. The delay itself is enforced by the sharding core (its
    ``dead_delay``), which is what actually re-creates the replicas; this copy
    only labels the lifecycle, so the two must be equal (hence one central
    setting, ``dead_delay``). 60 s turns a process restart or a VM reboot into
    zero data moves while primaries fail over at once."""

    max_tombstones: int = 1024
    """Removed nodes remembered (count). A removed node whose agent keeps running
    would be rediscovered by its next beacon; the tombstone keeps it out until
    it comes back with a higher incarnation (a restarted agent) or an operator
    registers it. Removals are rare operator acts, so 1,024 covers years of
    them; the oldest are forgotten first, which bounds the table."""

    max_heard: int = 65536
    """Member verdicts remembered for nodes not registered yet (count). Membership
    admits nodes from discovery by itself, so ``member.alive`` may arrive before
    the manager has seen ``node.discovered``; the verdict is kept until the node
    registers. Same bound as discovery's table so a stream of made-up ids
    cannot grow memory without limit."""

    refusal_names: int = 20
    """Shard ids named in a refused removal (count): enough for an operator to
    act on, short enough for one terminal line's worth of error details."""

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first setting that is out of range."""
        if not isinstance(self.auto_join, bool):
            raise ValueError(f"manager auto_join must be true or false, got {self.auto_join!r}")
        delay = self.rereplication_delay
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not math.isfinite(delay) or delay < 0:
            raise ValueError(f"manager rereplication_delay must be a finite number of seconds >= 0, got {delay!r}")
        for name in ("max_tombstones", "max_heard", "refusal_names"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"manager {name} must be a positive integer, got {value!r}")
