"""Cluster health over time and the status document. Pure functions.

The rules that judge a shard map (green, yellow, red; unavailable,
under-replicated, degraded, moving) are in :mod:`phantom_bus.shardhealth`,
shared with sharding; this module adds what only the manager does: the
``cluster.health`` event on a colour change and the ``phantom status``
document.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from phantom_bus.events import Event
from phantom_bus.shardhealth import (
    GREEN,
    RED,
    SERVING,
    YELLOW,
    Health,
    ShardInfo,
    assess,
    shards_from_map,
    sole_replicas,
)

from .registry import NodeRecord

__all__ = [
    "EVENT_HEALTH",
    "GREEN",
    "RED",
    "SERVICES",
    "SERVING",
    "YELLOW",
    "Health",
    "HealthTracker",
    "ShardInfo",
    "assess",
    "shards_from_map",
    "sole_replicas",
    "status_document",
]

EVENT_HEALTH: Final = "cluster.health"
SERVICES: Final = ("broker", "discovery", "membership", "sharding", "balancer", "manager")


class HealthTracker:
    """Remembers the last colour and returns a ``cluster.health`` event when it changes.

    Only colour changes make an event: during a rebalance the counts change
    with every epoch, and an event per epoch would bury the ones that matter.
    The event still carries the counts and the shards behind the colour.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Health | None = None

    @property
    def current(self) -> Health | None:
        """The last health given to :meth:`update`, or ``None``."""
        with self._lock:
            return self._last

    def update(self, health: Health) -> list[Event]:
        """Record ``health``; one ``cluster.health`` event if the colour changed (or is the first)."""
        with self._lock:
            previous = self._last.status if self._last is not None else None
            self._last = health
        if previous == health.status:
            return []
        return [
            Event(
                EVENT_HEALTH,
                {
                    # Cluster-wide: no node, but the key is there like on every cluster.* event.
                    "node": None,
                    "reason": health.reason,
                    "health": health.status,
                    "previous": previous,
                    "shards": health.counts(),
                    "why": health.why(),
                },
            )
        ]


def _service_state(value: Any) -> str:
    if isinstance(value, str):
        return "up" if value == "up" else "down"
    return "up" if value else "down"


def status_document(
    records: Iterable[NodeRecord],
    members: Iterable[Mapping[str, Any]] | None,
    shards: Sequence[ShardInfo] | None,
    services: Mapping[str, Any],
    epoch: int | None = None,
    down: Iterable[str] = (),
    health: Health | None = None,
) -> dict[str, Any]:
    """The ``phantom status --json`` document (the documented contract, plus extra keys).

    ``records`` is the registry; ``members`` membership's ``members`` reply
    (``None`` when membership did not answer: each node's ``state``, load and
    ``phi`` are then null); ``shards`` the shard map as :class:`ShardInfo`
    (``None`` when no map is known: ``replicas``/``primaries`` null, shard
    counts null, health red); ``services`` maps a service name to up/down
    (bool or ``"up"``/``"down"``; the manager and the broker are up unless
    said otherwise, since the request that asks for this came through them).
    ``health`` defaults to :func:`assess` over membership's states when it
    answered, else the registry's last-heard ones.
    """
    recs = {r.id: r for r in records}
    views = None if members is None else {str(m.get("id")): m for m in members if isinstance(m, Mapping)}
    if health is None:
        if views is not None:
            states: dict[str, str | None] = {n: v.get("state") for n, v in views.items()}
        else:
            states = {r.id: r.member for r in recs.values()}
        health = assess(shards, states, down)
    per_node = health.per_node if shards is not None else None
    ids = set(recs) | set(views or ()) | set(per_node or ())
    nodes = []
    for node in sorted(ids):
        rec = recs.get(node)
        view = views.get(node) if views is not None else None
        load = view.get("load") if view is not None else None
        fresh = isinstance(load, Mapping) and not view.get("load_stale", False) if view is not None else False
        counts = per_node.get(node) if per_node is not None else None
        nodes.append(
            {
                "id": node,
                "state": view.get("state") if view is not None else None,
                "lifecycle": rec.lifecycle if rec is not None else None,
                "address": rec.address if rec is not None else None,
                "zone": rec.zone if rec is not None else None,
                "cpu": load.get("cpu") if fresh and isinstance(load, Mapping) else None,
                "mem": load.get("mem") if fresh and isinstance(load, Mapping) else None,
                "replicas": (counts["replicas"] if counts else 0) if per_node is not None else None,
                "primaries": (counts["primaries"] if counts else 0) if per_node is not None else None,
                "load": load.get("load1_per_core") if fresh and isinstance(load, Mapping) else None,
                "phi": view.get("phi") if view is not None else None,
                "heartbeat_age": view.get("last_heartbeat_age") if view is not None else None,
                "incarnation": (
                    view.get("incarnation") if view is not None else rec.incarnation if rec is not None else None
                ),
                "weight": rec.weight if rec is not None else None,
                "approved": rec.approved if rec is not None else None,
                "reason": rec.reason if rec is not None else None,
                "last_change": rec.last_change if rec is not None else None,
                "registered": rec is not None,
            }
        )
    svc = {name: _service_state(services.get(name, name in ("broker", "manager"))) for name in SERVICES}
    return {
        "health": health.status,
        "reason": health.reason,
        "epoch": epoch,
        "nodes": nodes,
        "shards": health.counts() if shards is not None else {"total": None, "under_replicated": None,
                                                               "unavailable": None},
        "services": svc,
        "why": health.why(),
    }
