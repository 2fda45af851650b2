"""The sharding core's records: a node and a key space as the core holds them, and shared checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from phantom_bus import ids
from phantom_bus.errors import BadRequest
from phantom_bus.shardmap import Kind
from services.sharding.placement import NodeState


@dataclass
class _Node:
    zone: str
    weight: float
    state: Literal["active", "draining"] = "active"
    alive: bool = True
    dead_since: float | None = None
    expired: bool = False  # dead for longer than dead_delay: its replicas are re-created

    def planner_state(self) -> NodeState:
        if self.state == "draining":
            return "draining"
        if self.alive:
            return "active"
        return "dead" if self.expired else "down"


@dataclass
class _Space:
    name: str
    kind: Kind
    rf: int
    slots: int
    order: list[str] = field(default_factory=list)  # shard ids in key order
    slot_ranges: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    ranges: dict[str, tuple[bytes, bytes | None]] = field(default_factory=dict)
    next_seq: int = 0


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _node_id(node: Any) -> str:
    return ids.check_node_id(node)
