"""What the planner reads and returns: nodes, shards, targets, moves and the plan."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from phantom_bus.errors import BadRequest

NodeState = Literal["active", "draining", "dead", "down"]
NODE_STATES: tuple[NodeState, ...] = ("active", "draining", "dead", "down")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node as the planner sees it. Weight 0 means "no replicas" (like draining)."""

    zone: str = ""
    weight: float = 1.0
    state: NodeState = "active"


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """A shard to place: its replication factor and the nodes that hold it now."""

    id: str
    rf: int
    holders: tuple[str, ...] = ()
    primary: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a shard should live: its nodes (kept ones first) and its primary."""

    nodes: tuple[str, ...]
    primary: str | None


@dataclass(frozen=True, slots=True)
class Move:
    """One step from the current assignment toward the target.

    ``copy`` moves give ``to_node`` a new replica (``from_node`` None: a new
    replica for an under-replicated shard) and then drop ``from_node``'s.
    ``handoff`` says the primary role passes from ``from_node`` to ``to_node``;
    with ``copy=False`` it is a role change between two existing replicas.
    ``to_node`` None drops ``from_node``'s replica with no replacement.
    """

    shard: str
    from_node: str | None
    to_node: str | None
    handoff: bool = False
    copy: bool = True


@dataclass(frozen=True)
class Plan:
    """A plan: targets per shard, the moves, and what could not be satisfied."""

    targets: dict[str, Target]
    moves: tuple[Move, ...]
    # Replicas per shard that could not be placed (too few active nodes/zones).
    shortfall: dict[str, int] = field(default_factory=dict)
    # Replica and primary counts per active node, and the real-valued ideals.
    quotas: dict[str, int] = field(default_factory=dict)
    primary_quotas: dict[str, int] = field(default_factory=dict)
    ideal: dict[str, float] = field(default_factory=dict)
    primary_ideal: dict[str, float] = field(default_factory=dict)
    # Nodes the planner could not bring to their quota (pathological zones).
    unbalanced: tuple[str, ...] = ()

    @property
    def copies(self) -> int:
        """Replicas that must be copied (the data moves)."""
        return sum(1 for m in self.moves if m.copy)

    @property
    def handoffs(self) -> int:
        """Primary role changes."""
        return sum(1 for m in self.moves if m.handoff)


def validate(shards: Sequence[ShardSpec], nodes: Mapping[str, NodeSpec]) -> None:
    for name, spec in nodes.items():
        if not isinstance(name, str) or not name:
            raise BadRequest(f"node ids must be non-empty strings, got {name!r}")
        w = spec.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise BadRequest(f"node {name}: weight must be a finite number >= 0, got {w!r}")
        if spec.state not in NODE_STATES:
            raise BadRequest(f"node {name}: state {spec.state!r} is not one of {', '.join(NODE_STATES)}")
        if not isinstance(spec.zone, str):
            raise BadRequest(f"node {name}: zone must be a string, got {spec.zone!r}")
    seen: set[str] = set()
    for sh in shards:
        if sh.id in seen:
            raise BadRequest(f"shard {sh.id} is listed twice")
        seen.add(sh.id)
        if type(sh.rf) is not int or sh.rf < 1:
            raise BadRequest(f"shard {sh.id}: rf must be an integer >= 1, got {sh.rf!r}")
