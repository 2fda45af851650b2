"""Persistence of the sharding core: the state saved with the map, and resuming from it.

Plain functions over a :class:`~services.sharding.core.ShardingCore`;
:meth:`ShardingCore.snapshot` and :meth:`ShardingCore.restore` call these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from phantom_bus.errors import BadRequest
from phantom_bus.shardmap import ShardMap
from services.sharding.records import _Node, _node_id, _number, _Space

if TYPE_CHECKING:
    from services.sharding.core import ShardingCore

STATE_VERSION = 1


def snapshot_state(core: ShardingCore, t: float) -> dict[str, Any]:
    """Everything but the map needed to resume, with times relative to ``t``."""
    nodes = [
        {
            "id": n,
            "zone": r.zone,
            "weight": r.weight,
            "state": r.state,
            "alive": r.alive,
            "expired": r.expired,
            "dead_for": None if r.dead_since is None else t - r.dead_since,
        }
        for n, r in core._nodes.items()
    ]
    state = {
        "v": STATE_VERSION,
        "epoch": core._map.epoch,
        "nodes": nodes,
        "next_seq": {name: sp.next_seq for name, sp in core._spaces.items()},
        "merges": [[h, low] for h, low in core._merges.items()],
        "avoid": [[s, n, until - t] for (s, n), until in core._avoid.items()],
        "joined": [[s, n, e] for (s, n), e in core._joined.items()],
        "engine": core._engine.to_state(t),
    }
    return state


def restore_into(core: ShardingCore, shard_map: ShardMap, state: Mapping[str, Any], t: float) -> None:
    """Load :func:`snapshot_state` output into a fresh ``core`` at time ``t``."""
    try:
        if state.get("v") != STATE_VERSION:
            raise BadRequest(f"stored sharding state version {state.get('v')!r} is not {STATE_VERSION}")
        if state["epoch"] != shard_map.epoch:
            raise BadRequest(f"stored state is for epoch {state['epoch']}, the map is at {shard_map.epoch}")
        for doc in state["nodes"]:
            dead_for = doc["dead_for"]
            core._nodes[_node_id(doc["id"])] = _Node(
                str(doc["zone"]),
                _number(doc["weight"], "weight"),
                "draining" if doc["state"] == "draining" else "active",
                bool(doc["alive"]),
                None if dead_for is None else t - float(dead_for),
                bool(doc["expired"]),
            )
        roles = {}
        for ks in shard_map.keyspaces:
            sp = _Space(ks.name, ks.kind, ks.rf, ks.slots, next_seq=int(state["next_seq"][ks.name]))
            for sh in ks.shards:
                sp.order.append(sh.id)
                core._space_of[sh.id] = ks.name
                if ks.kind == "hash":
                    sp.slot_ranges[sh.id] = sh.slots
                else:
                    sp.ranges[sh.id] = (sh.start, sh.end)
                roles[sh.id] = {r.node: r.role for r in sh.replicas}
            core._spaces[ks.name] = sp
        core._engine.load_state(roles, state["engine"], t)
        core._merges = {str(h): str(low) for h, low in state["merges"]}
        core._avoid = {(str(s), str(n)): t + float(left) for s, n, left in state["avoid"]}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadRequest(f"stored sharding state is malformed: {exc!r}") from exc
    core._map = shard_map
    # A state saved before joining epochs were kept: date them to the restored epoch.
    core._note_joining(shard_map)
    core._joined.update(
        {(str(sh), str(n)): int(e) for sh, n, e in state.get("joined", ()) if (str(sh), str(n)) in core._joined}
    )
    # Agents may hold leases granted by the previous process: count from now.
    core.leases.started = t
    # The stored targets are kept as they were: replanning here could
    # retarget copies that are half done. The next membership change replans.
