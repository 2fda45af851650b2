"""Deliberately broken variants of the real code, switched on only by the simulator's tests.

Each variant is a patch applied for the length of one run (:func:`active`), to
show the invariants have teeth: with it on, the short run must fail. Nothing
here is imported by the services.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

#: name -> (description, install() -> undo())
VARIANTS: dict[str, tuple[str, Callable[[], Callable[[], None]]]] = {}
_on: list[str] = []


Install = Callable[[], Callable[[], None]]


def variant(name: str, description: str) -> Callable[[Install], Install]:
    def register(install: Install) -> Install:
        VARIANTS[name] = (description, install)
        return install

    return register


def enable(*names: str) -> None:
    """Switch variants on for the runs that follow (in this process)."""
    for name in names:
        if name not in VARIANTS:
            raise KeyError(f"no broken variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    _on[:] = list(names)


def on(name: str) -> bool:
    """Whether the simulator switched ``name`` on (a fault point in a simulated shell)."""
    return name in _on


@contextlib.contextmanager
def active() -> Iterator[None]:
    undo = [VARIANTS[name][1]() for name in _on if name in VARIANTS]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def _patch(obj: Any, attr: str, new: Any) -> Callable[[], None]:
    old = getattr(obj, attr)
    setattr(obj, attr, new)
    return lambda: setattr(obj, attr, old)


# --- the variants ---------------------------------------------------------------------


@variant("promote_unconfirmed", "the migration engine lets a new replica serve before its copy is confirmed")
def _promote_unconfirmed() -> Callable[[], None]:
    from services.sharding.migration import Migrations

    original = Migrations._add_replicas

    def add_replicas(self: Any, sid: str, st: Any, ctx: Any) -> None:
        st.seeded = False  # "nothing to copy": places the new replica as a serving one at once
        original(self, sid, st, ctx)

    return _patch(Migrations, "_add_replicas", add_replicas)


@variant("no_silent_verdict", "membership never judges an admitted node that has not heartbeated (the old core)")
def _no_silent_verdict() -> Callable[[], None]:
    from services.membership.core import Membership

    return _patch(Membership, "_expire_silent", lambda self, now, events: None)


@variant("step_down_late", "a planned primary hand-off promotes the new primary before the old one steps down")
def _step_down_late() -> Callable[[], None]:
    from services.sharding.migration import Migrations

    original = Migrations._elect

    def elect(self: Any, sid: str, st: Any, ctx: Any) -> None:
        tp = st.target_primary
        if tp is not None and st.roles.get(tp) == "replica" and tp not in self._down:
            self._set(sid, st, tp, "primary", ctx.changes)  # promoted while the old primary still is one
            return
        original(self, sid, st, ctx)

    return _patch(Migrations, "_elect", elect)


@variant("confirm_any_round", "sharding takes a confirmation without the epoch of its assignment (the old core)")
def _confirm_any_round() -> Callable[[], None]:
    return lambda: None  # a fault point in phantom_sim.shells.ShardingProc (confirm)


@variant("skip_fencing", "the store takes a write without checking its writer's fence (term)")
def _skip_fencing() -> Callable[[], None]:
    from phantom_bus.store.memory import MemoryStore

    original = MemoryStore.txn

    async def txn(self: Any, compares: Any, ops: Any, fence: Any = None) -> int:
        return await original(self, compares, ops, None)

    return _patch(MemoryStore, "txn", txn)


@variant("ignore_observer_lag", "the membership shell does not hand its own loop lag to the core")
def _ignore_observer_lag() -> Callable[[], None]:
    return lambda: None  # a fault point in phantom_sim.shells.MembershipProc.tick_loop


@variant("older_state_wins", "a consumer of membership's verdicts takes an older node-state update over a newer one")
def _older_state_wins() -> Callable[[], None]:
    from phantom_bus.routing.balancer import Balancer

    original = Balancer.node_update

    def node_update(self: Any, node: str, **fields: Any) -> bool:
        held = self._nodes.get(node)
        if held is not None and fields.get("version") is not None:
            held.version = None  # forget the version held: whatever comes last wins
        return original(self, node, **fields)

    return _patch(Balancer, "node_update", node_update)


@variant("silent_at_zero", "membership declares a node it never heard dead at incarnation 0, not at the one "
         "its beacons announced (the core before the fix)")
def _silent_at_zero() -> Callable[[], None]:
    from services.membership.core import Membership

    admit = Membership.admit

    def without_incarnation(self: Any, node: str, now: float, interval: float | None = None,
                            incarnation: int | None = None) -> bool:
        return admit(self, node, now, interval)

    return _patch(Membership, "admit", without_incarnation)


@variant("registry_not_readmitted", "the manager does not admit into membership the registered nodes its "
         "leader does not know (the core before the fix)")
def _registry_not_readmitted() -> Callable[[], None]:
    from services.manager import core

    # The core calls readmit() by the name it imported: patch that name.
    return _patch(core, "readmit", lambda out, registry, known: None)


@variant("per_instance_change", "membership publishes each instance's own change count (the shell before the fix)")
def _per_instance_change() -> Callable[[], None]:
    return lambda: None  # a fault point in phantom_sim.shells.MembershipProc
