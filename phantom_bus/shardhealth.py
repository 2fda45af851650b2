"""The health of a shard map given the liveness of its nodes. Pure functions.

One rule set, used by sharding (``health`` counts over its own view of which
nodes are down), by the manager (the cluster colour over membership's verdicts)
and by anything else that judges a map.

Health: **green** = every shard has its primary and all replicas live (a
planned move adds the new copy as ``joining`` before the old one is dropped,
so a shard that is only moving stays green; the moves in flight are reported
beside the colour); **yellow** = some shard under-replicated; **red** = some
shard has no live primary. Precisely, with ``states`` membership's verdict per node
and ``down`` the nodes the shard map lists as down:

* a node is **healthy** when its state is ``alive`` and it is not down;
* a node is **available** when its state is ``alive`` or ``suspect`` and it
  is not down (a suspect primary still takes writes: the balancer only
  refuses dead, left and decommissioned primaries);
* a shard is **unavailable** when its primary is missing or not available,
  except during a planned hand-off (no primary, shard ``moving``, and an
  available ``primary``/``replica`` to promote), which sharding finishes in
  its next step and which counts as moving;
* **under-replicated** when fewer than ``rf`` of its ``primary``/``replica``
  copies are on healthy nodes;
* **degraded** when it has enough healthy copies but some copy is on a node
  that is not healthy (a replica on a suspect or dead node);
* **moving** when the map says so or it has ``joining``/``leaving`` copies.

Red if any shard is unavailable; yellow if any is under-replicated or
degraded; green otherwise (also with no shards at all), moving shards
included: their count is in the reason and in ``shards.moving``. With no shard map at
all (sharding never answered) nobody can vouch for the data: red.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from phantom_bus.shardmap import SERVING, ShardMap

GREEN: Final = "green"
YELLOW: Final = "yellow"
RED: Final = "red"

# Shard ids listed per reason in events and the status document; the counts
# are always complete.
_LIST_LIMIT = 20


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """What health needs to know about one shard.

    ``replicas`` are ``(node, role)`` pairs with role ``primary``, ``replica``,
    ``joining`` or ``leaving``; ``moving`` is the map's shard state.
    """

    id: str
    rf: int
    replicas: tuple[tuple[str, str], ...]
    moving: bool = False
    keyspace: str = ""

    @property
    def primary(self) -> str | None:
        """The node of the primary, or ``None``."""
        for node, role in self.replicas:
            if role == "primary":
                return node
        return None


def shards_from_map(shard_map: ShardMap) -> list[ShardInfo]:
    """Every shard of ``shard_map`` as :class:`ShardInfo` (its ``down`` set is ``shard_map.down``)."""
    return [
        ShardInfo(sh.id, ks.rf, tuple((r.node, r.role) for r in sh.replicas), sh.state == "moving", ks.name)
        for ks, sh in shard_map.shards()
    ]


@dataclass(frozen=True, slots=True)
class Health:
    """The verdict: colour, counts, the shards behind it and per-node replica counts.

    ``per_node`` maps a node to ``{"replicas", "primaries", "joining",
    "leaving"}``: ``replicas`` counts ``primary`` and ``replica`` copies (what
    the node serves), so a node holds nothing when all four are zero.
    """

    status: str
    reason: str
    total: int = 0
    under_replicated: int = 0
    unavailable: int = 0
    moving: int = 0
    degraded: int = 0
    unavailable_shards: tuple[str, ...] = ()
    under_replicated_shards: tuple[str, ...] = ()
    moving_shards: tuple[str, ...] = ()
    degraded_shards: tuple[str, ...] = ()
    per_node: Mapping[str, Mapping[str, int]] = field(default_factory=dict, hash=False)
    known: bool = True

    def counts(self) -> dict[str, int]:
        """The ``shards`` part of the status document (contract keys first)."""
        return {
            "total": self.total,
            "under_replicated": self.under_replicated,
            "unavailable": self.unavailable,
            "moving": self.moving,
            "degraded": self.degraded,
        }

    def holdings(self, node: str) -> int:
        """Copies of any role ``node`` holds (0: it holds nothing)."""
        c = self.per_node.get(node)
        return 0 if c is None else c["replicas"] + c["joining"] + c["leaving"]

    def why(self) -> dict[str, list[str]]:
        """The shards behind the colour, per reason (each list at most 20 long)."""
        return {
            "unavailable": list(self.unavailable_shards[:_LIST_LIMIT]),
            "under_replicated": list(self.under_replicated_shards[:_LIST_LIMIT]),
            "degraded": list(self.degraded_shards[:_LIST_LIMIT]),
            "moving": list(self.moving_shards[:_LIST_LIMIT]),
        }


def _listing(what: str, shards: Sequence[str]) -> str:
    shown = ", ".join(shards[:5])
    more = f" and {len(shards) - 5} more" if len(shards) > 5 else ""
    return f"{len(shards)} shard(s) {what} ({shown}{more})"


def assess(
    shards: Iterable[ShardInfo] | None,
    states: Mapping[str, str | None],
    down: Iterable[str] = (),
) -> Health:
    """Health of the cluster from the shards, membership ``states`` and the map's ``down`` nodes.

    ``shards`` ``None`` means no map is known: red. See the module docstring
    for the rules.
    """
    if shards is None:
        return Health(RED, "no shard map: sharding has not answered yet", known=False)
    down_set = frozenset(down)

    def healthy(node: str) -> bool:
        return states.get(node) == "alive" and node not in down_set

    def available(node: str) -> bool:
        return states.get(node) in ("alive", "suspect") and node not in down_set

    per_node: dict[str, dict[str, int]] = {}
    unavailable: list[str] = []
    under: list[str] = []
    moving: list[str] = []
    degraded: list[str] = []
    total = 0
    for sh in shards:
        total += 1
        primary = None
        serving: list[str] = []
        in_flight = False
        for node, role in sh.replicas:
            c = per_node.get(node)
            if c is None:
                c = per_node[node] = {"replicas": 0, "primaries": 0, "joining": 0, "leaving": 0}
            if role in SERVING:
                c["replicas"] += 1
                serving.append(node)
                if role == "primary":
                    c["primaries"] += 1
                    primary = node
            elif role in ("joining", "leaving"):
                c[role] += 1
                in_flight = True
        is_moving = sh.moving or in_flight
        live = sum(1 for n in serving if healthy(n))
        if primary is None or not available(primary):
            handing_off = primary is None and sh.moving and any(available(n) for n in serving)
            if handing_off:
                is_moving = True
            else:
                unavailable.append(sh.id)
        if live < sh.rf:
            under.append(sh.id)
        elif live < len(serving):
            degraded.append(sh.id)
        if is_moving:
            moving.append(sh.id)
    if unavailable:
        status, reason = RED, _listing("without a live primary", unavailable)
    elif under or degraded:
        status = YELLOW
        parts = []
        if under:
            parts.append(_listing("under-replicated", under))
        if degraded:
            parts.append(_listing("with a copy on a node that is not alive", degraded))
        if moving:
            parts.append(_listing("moving", moving))
        reason = "; ".join(parts)
    elif total == 0:
        status, reason = GREEN, "no shards"
    else:
        status, reason = GREEN, f"all {total} shards have their primary and all replicas live"
        if moving:
            # Planned moves add a copy before dropping one: beside the colour, not in it.
            reason += f"; {_listing('moving', moving)}"
    return Health(
        status,
        reason,
        total,
        len(under),
        len(unavailable),
        len(moving),
        len(degraded),
        tuple(unavailable),
        tuple(under),
        tuple(moving),
        tuple(degraded),
        per_node,
    )


def sole_replicas(
    shards: Iterable[ShardInfo], node: str, states: Mapping[str, str | None], down: Iterable[str] = ()
) -> list[str]:
    """Shards that would be left without any live copy if ``node`` were removed.

    A shard is listed when ``node`` holds a ``primary``/``replica`` copy of it
    and no *other* node holds one that is live (not down, not dead or left).
    This covers "the only live replica" and, more strictly than the sharding
    core, a dead node holding the last copy of a shard whose other holders are
    down too: removing it would throw away data that may come back.
    """
    down_set = frozenset(down)

    def live(n: str) -> bool:
        return n not in down_set and states.get(n) not in ("dead", "left")

    out = []
    for sh in shards:
        holders = [n for n, r in sh.replicas if r in SERVING]
        if node in holders and not any(live(n) for n in holders if n != node):
            out.append(sh.id)
    return sorted(out)


