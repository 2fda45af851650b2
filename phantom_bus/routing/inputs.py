"""What the bus says about nodes, as :meth:`Balancer.node_update` arguments.

The balancer process and every locally routing client learn node health
from the same events and snapshots, so the translation lives here, once:

* ``member.alive|suspect|dead|left`` -> ``state``, versioned by membership's
  ``(incarnation, change)`` when the event carries both;
* ``member.load`` -> ``load`` per node;
* ``node.discovered|updated`` (discovery) -> ``address`` and ``weight``;
* ``cluster.node_registered|active|draining|decommissioned`` (the manager)
  -> ``lifecycle``.

Each function returns ``(node, fields)`` pairs and skips what is malformed:
a bad event from one process must not stop anyone's routing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

LIFECYCLE_EVENTS = {
    "cluster.node_registered": "joining",
    "cluster.node_active": "active",
    "cluster.node_draining": "draining",
    "cluster.node_decommissioned": "decommissioned",
}

#: Event prefixes a node-health follower subscribes to.
PREFIXES = ("member.", "node.", "cluster.node_")

Update = tuple[str, dict[str, Any]]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def member_version(doc: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(incarnation, change)`` of a membership event or row, None if it has no version."""
    inc, change = doc.get("incarnation"), doc.get("change")
    if isinstance(inc, int) and isinstance(change, int) and _count(inc) and _count(change):
        return inc, change
    return None


def load(doc: Any) -> dict[str, Any] | None:
    """The part of an agent's load document selection uses (cpu and mem percent)."""
    if not isinstance(doc, Mapping):
        return None
    cpu, mem = doc.get("cpu"), doc.get("mem")
    if not isinstance(cpu, int | float) or not isinstance(mem, int | float):
        return None
    return {"cpu": float(cpu), "mem": float(mem)}


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def from_event(event: Mapping[str, Any]) -> list[Update]:
    """The node updates one bus event implies (none for other kinds)."""
    kind = str(event.get("kind", ""))
    node = event.get("node")
    if kind == "member.load":
        loads = event.get("loads")
        if not isinstance(loads, Mapping):
            return []
        return [(n, {"load": sample}) for n, raw in loads.items()
                if isinstance(n, str) and (sample := load(raw)) is not None]
    if not isinstance(node, str) or not node:
        return []
    if kind.startswith("member."):
        return [(node, _clean({"state": kind.split(".", 1)[1], "version": member_version(event)}))]
    if kind in ("node.discovered", "node.updated"):
        weight = event.get("weight")
        fields = _clean({
            "address": event.get("address") if isinstance(event.get("address"), str) else None,
            "weight": weight if isinstance(weight, int | float) and not isinstance(weight, bool)
            and weight > 0 else None,
        })
        return [(node, fields)] if fields else []
    lifecycle = LIFECYCLE_EVENTS.get(kind)
    if lifecycle is not None:
        return [(node, {"lifecycle": lifecycle})]
    return []


def from_members(rows: Iterable[Any]) -> list[Update]:
    """Updates from membership's ``members`` snapshot."""
    out: list[Update] = []
    for m in rows:
        if isinstance(m, Mapping) and isinstance(m.get("id"), str):
            out.append((m["id"], _clean({"state": m.get("state"), "version": member_version(m),
                                         "load": load(m.get("load"))})))
    return out


def from_discovery(rows: Iterable[Any]) -> list[Update]:
    """Updates from discovery's ``nodes`` snapshot (addresses)."""
    return [(d["id"], {"address": d["address"]}) for d in rows
            if isinstance(d, Mapping) and isinstance(d.get("id"), str)
            and isinstance(d.get("address"), str)]


def from_routing_table(nodes: Any) -> list[Update]:
    """Updates from the balancer's ``routing`` table (what a local client loads)."""
    out: list[Update] = []
    if not isinstance(nodes, Mapping):
        return out
    for node, row in nodes.items():
        if not isinstance(node, str) or not isinstance(row, Mapping):
            continue
        version = row.get("version")
        weight = row.get("weight")
        sample = load(row.get("load"))
        age = row.get("load", {}).get("age_s") if sample is not None else None
        if sample is not None and isinstance(age, int | float) and age >= 0:
            sample["age"] = float(age)
        out.append((node, _clean({
            "state": row.get("state") if isinstance(row.get("state"), str) else None,
            "version": tuple(version) if isinstance(version, list | tuple) else None,
            "lifecycle": row.get("lifecycle") if isinstance(row.get("lifecycle"), str) else None,
            "address": row.get("address") if isinstance(row.get("address"), str) else None,
            "weight": weight if isinstance(weight, int | float) and not isinstance(weight, bool)
            and weight > 0 else None,
            "load": sample,
        })))
    return out
