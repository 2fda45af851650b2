"""Anti-entropy of the manager: what the durable registry implies, re-sent after a restart.

Plain functions over a :class:`.registry.Registry`; :meth:`.core.ManagerCore.reconcile`
and :meth:`.core.ManagerCore.sync_members` call these.
"""

from __future__ import annotations

from typing import Any

from .actions import BALANCER, DISCOVERY, MEMBERSHIP, SHARDING, Action, _Out
from .registry import _DOWN, _PLACED, ACTIVE, AWAY, DECOMMISSIONED, DRAINING, Registry


def readmit(out: _Out, registry: Registry, known: set[str]) -> None:
    # A node the registry holds and membership's leader does not know (a restarted
    # instance admits from discovery, which forgets a node that died meanwhile) would
    # never get a verdict: admit it again, at its incarnation, so it is judged.
    for record in registry.records():
        if record.id not in known and record.lifecycle != DECOMMISSIONED:
            out.act(MEMBERSHIP, "admit", "membership does not know it", node=record.id, incarnation=record.incarnation)


def implied_actions(registry: Registry, *, removals: bool = True) -> list[Action]:
    """Every action the durable registry implies, for a shell that just (re)started.

    Re-sends what may have been lost with a crash between a decision and its
    actions: admission of approved nodes, lifecycle and state to the
    balancer, ``add_node`` for active nodes, ``drain_node`` for
    draining ones (an unfinished drain continues), and the last member
    verdict (``node_dead``/``node_alive``) for every node sharding holds;
    and, with ``removals``, the forgetting of every removed node still
    tombstoned (a crash may have cut a removal short). All idempotent.
    Pass ``removals=False`` for periodic anti-entropy: removals only need
    re-sending after a restart.
    """
    out = _Out()
    why = "reconcile after restart"
    for rec in registry.records():
        node = rec.id
        if not rec.approved:
            continue
        if rec.lifecycle != DECOMMISSIONED:
            out.act(MEMBERSHIP, "admit", why, node=node)
        update: dict[str, Any] = {"node": node, "address": rec.address, "weight": rec.weight}
        if rec.lifecycle not in AWAY:
            update["lifecycle"] = rec.lifecycle
        if rec.member is not None:
            update["state"] = rec.member
        out.actions.append(Action(BALANCER, "node_update", update, why))
        if rec.lifecycle == ACTIVE:
            out.act(SHARDING, "add_node", why, node=node, zone=rec.zone, weight=rec.weight)
        elif rec.lifecycle == DRAINING:
            out.act(SHARDING, "drain_node", why, node=node)
        if rec.lifecycle in _PLACED:
            if rec.member in _DOWN:
                out.act(SHARDING, "node_dead", why, node=node)
            elif rec.member in ("alive", "suspect"):
                out.act(SHARDING, "node_alive", why, node=node)
    for tomb in registry.tombstones() if removals else ():
        reason = "reconcile after restart: finish removal"
        out.act(SHARDING, "remove_node", reason, node=tomb.id)
        out.act(MEMBERSHIP, "forget", reason, node=tomb.id)
        out.act(DISCOVERY, "remove", reason, node=tomb.id)
        out.act(BALANCER, "forget_node", reason, node=tomb.id)
    return out.actions
