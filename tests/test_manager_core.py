"""The manager core with virtual time: node and member events, operator commands,
drains, removal, restart reconciliation, and a property test over random histories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phantom_bus.errors import BadRequest, Conflict, NotFound, Refused
from phantom_bus.events import Event
from services.manager.config import ManagerConfig
from services.manager.core import (
    EVENT_FAILOVER,
    EVENT_IGNORED,
    EVENT_RECOVERED,
    EVENT_SUSPECT,
    Action,
    Decision,
    ManagerCore,
    MembershipTerm,
)
from services.manager.health import ShardInfo, assess
from services.manager.registry import (
    ACTIVE,
    DECOMMISSIONED,
    DRAINING,
    FAILED,
    JOINING,
    TRANSITIONS,
    Change,
    NodeRecord,
    Registry,
    Tombstone,
    TombstoneDropped,
)
from tests.test_manager_health import oracle

DELAY = 60.0


class FakeStore:
    """Applies changes the way RegistryStore does, in memory."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        self.tombs: dict[str, Tombstone] = {}
        self.batches = 0
        self.fail = False

    def apply(self, changes: Sequence[Change]) -> None:
        if self.fail:
            raise OSError("disk full")
        self.batches += 1
        for c in changes:
            if isinstance(c, NodeRecord):
                self.nodes[c.id] = c
                self.tombs.pop(c.id, None)
            elif isinstance(c, Tombstone):
                self.nodes.pop(c.id, None)
                self.tombs.pop(c.id, None)
                self.tombs[c.id] = c
            elif isinstance(c, TombstoneDropped):
                self.tombs.pop(c.id, None)

    def registry(self) -> Registry:
        return Registry.restore(self.nodes.values(), self.tombs.values())


class Committing:
    """A core driven the way the manager's shell drives it: every decision's changes are
    committed to the store before the decision is handed on; a failed commit rolls the
    core back to the committed registry and raises."""

    def __init__(self, core: ManagerCore, store: FakeStore) -> None:
        self.core = core
        self.store = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.core, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if isinstance(result, Decision) and result.changes:
                try:
                    self.store.apply(result.changes)
                except OSError:
                    self.core.reset_registry(self.store.registry())
                    raise
            return result

        return cast(Callable[..., Any], call)


def make(auto_join: bool = True, store: FakeStore | None = None) -> ManagerCore:
    store = store if store is not None else FakeStore()
    core = ManagerCore(ManagerConfig(auto_join=auto_join, rereplication_delay=DELAY), store.registry())
    return cast(ManagerCore, Committing(core, store))


def tick(core: ManagerCore, now: float) -> Decision:
    """``core.tick`` with the nodes sharding's dead-delay timer would report expired at ``now``."""
    expired = [r.id for r in core.nodes()
               if r.member in ("dead", "left") and r.member_since is not None and now - r.member_since >= DELAY]
    return core.tick(now, expired)


def disc(node: str, inc: int = 1, address: str | None = None, zone: str = "z1", weight: float = 1.0,
         source: str = "beacon", kind: str = "node.discovered") -> Event:
    return Event(kind, {"node": node, "reason": "first beacon", "address": address or f"127.0.0.1:{7000 + len(node)}",
                        "zone": zone, "weight": weight, "incarnation": inc, "source": source, "state": "alive"})


def mem(state: str, node: str, inc: int = 1, reason: str = "phi") -> Event:
    return Event(f"member.{state}", {"node": node, "incarnation": inc, "phi": 1.0, "reason": reason,
                                     "previous": None})


def ops(d: Decision) -> list[tuple[str, str]]:
    return [(a.service, a.op) for a in d.actions]


def kinds(d: Decision) -> list[str]:
    return [e.kind for e in d.events]


def active_node(core: ManagerCore, node: str = "n1", now: float = 0.0) -> None:
    core.on_event(disc(node), now)
    core.on_event(mem("alive", node), now)
    assert core.node(node).lifecycle == ACTIVE


def placed(*nodes: str, extra: Sequence[tuple[str, str]] = ()) -> list[ShardInfo]:
    """One settled shard over ``nodes`` (first is primary), plus one with ``extra`` copies."""
    roles = (("primary",) + ("replica",) * (len(nodes) - 1))
    shards = [ShardInfo("s0", len(nodes), tuple(zip(nodes, roles, strict=True)))]
    if extra:
        shards.append(ShardInfo("s1", 1, tuple(extra)))
    return shards


# -- auto-join ------------------------------------------------------------------------


def test_auto_join_registers_admits_then_activates_when_alive() -> None:
    core = make()
    d = core.on_event(disc("n1", inc=3), 1.0)
    assert kinds(d) == ["cluster.node_registered"]
    assert ops(d) == [("membership", "admit"), ("balancer", "node_update")]
    assert d.actions[1].args == {"node": "n1", "lifecycle": "joining", "address": "127.0.0.1:7002", "weight": 1.0}
    rec = core.node("n1")
    assert (rec.lifecycle, rec.approved, rec.incarnation, rec.first_seen) == (JOINING, True, 3, 1.0)

    d = core.on_event(mem("alive", "n1", inc=3, reason="joined"), 2.0)
    assert ops(d) == [("sharding", "add_node"), ("balancer", "node_update")]
    assert d.actions[0].args == {"node": "n1", "zone": "z1", "weight": 1.0}
    assert kinds(d) == ["cluster.node_active"]
    assert d.events[0].data["previous"] == JOINING and "alive" in d.events[0].data["reason"]
    assert core.node("n1").lifecycle == ACTIVE and core.node("n1").member == "alive"


def test_member_alive_heard_before_discovery_activates_at_registration() -> None:
    core = make()
    assert not core.on_event(mem("alive", "n1", inc=4), 1.0)
    d = core.on_event(disc("n1", inc=2), 2.0)
    assert kinds(d) == ["cluster.node_registered", "cluster.node_active"]
    assert ops(d) == [("membership", "admit"), ("balancer", "node_update"), ("sharding", "add_node"),
                      ("balancer", "node_update")]
    assert core.node("n1").incarnation == 4


def test_auto_join_off_waits_for_operator_registration() -> None:
    core = make(auto_join=False)
    d = core.on_event(disc("n1"), 1.0)
    assert kinds(d) == ["cluster.node_registered"] and d.actions == ()
    assert "phantom register n1" in d.events[0].data["reason"] and d.events[0].data["approved"] is False
    assert not core.on_event(mem("alive", "n1"), 2.0).actions
    assert core.node("n1").lifecycle == JOINING and core.node("n1").member == "alive"

    d = core.register("n1", "127.0.0.1:7002", "z1", now=3.0)
    assert kinds(d) == ["cluster.node_approved", "cluster.node_active"]
    assert ops(d) == [("membership", "admit"), ("balancer", "node_update"), ("sharding", "add_node"),
                      ("balancer", "node_update")]
    assert d.value["lifecycle"] == ACTIVE and d.value["approved"] is True


def test_approve_uses_the_known_values_and_is_idempotent() -> None:
    core = make(auto_join=False)
    core.on_event(disc("n1", zone="z9"), 1.0)
    d = core.approve("n1", now=2.0)
    assert kinds(d) == ["cluster.node_approved"] and ("membership", "admit") in ops(d)
    assert core.node("n1").zone == "z9" and core.node("n1").approved
    assert not core.approve("n1", now=3.0)
    with pytest.raises(NotFound):
        core.approve("ghost", now=3.0)


def test_repeated_discovery_is_idempotent() -> None:
    core = make()
    active_node(core)
    for kind in ("node.discovered", "node.updated"):
        d = core.on_event(disc("n1", kind=kind), 5.0)
        assert not d
    assert len(core.nodes()) == 1


def test_discovery_update_changes_the_record_with_an_event_and_tells_placement() -> None:
    core = make()
    active_node(core)
    d = core.on_event(disc("n1", inc=2, address="10.0.0.9:7001", zone="z2", kind="node.updated"), 5.0)
    assert kinds(d) == ["cluster.node_updated"]
    assert d.events[0].data["changed"] == {"address": ["127.0.0.1:7002", "10.0.0.9:7001"], "zone": ["z1", "z2"]}
    assert ops(d) == [("balancer", "node_update"), ("sharding", "add_node")]
    assert d.actions[1].args == {"node": "n1", "zone": "z2", "weight": 1.0}
    assert core.node("n1").incarnation == 2 and core.node("n1").lifecycle == ACTIVE


def test_zone_change_of_a_draining_node_is_not_sent_to_sharding() -> None:
    core = make()
    active_node(core)
    core.drain("n1", now=1.0)
    d = core.on_event(disc("n1", zone="z2", kind="node.updated"), 2.0)
    assert ("sharding", "add_node") not in ops(d) and core.node("n1").zone == "z2"


def test_discovery_hints_of_loss_decide_nothing() -> None:
    core = make()
    active_node(core)
    for kind in ("node.lost", "node.left", "node.removed", "node.conflict"):
        assert not core.on_event(Event(kind, {"node": "n1", "reason": "x"}), 3.0)
    assert core.node("n1").lifecycle == ACTIVE


# -- membership verdicts ----------------------------------------------------------------


def test_suspect_tells_the_balancer_first_and_nothing_else() -> None:
    core = make()
    active_node(core)
    d = core.on_event(mem("suspect", "n1"), 5.0)
    assert d.actions == (Action("balancer", "node_update", {"node": "n1", "state": "suspect"}, d.actions[0].reason),)
    assert kinds(d) == [EVENT_SUSPECT] and "stops routing" in d.events[0].data["reason"]
    assert core.node("n1").lifecycle == ACTIVE
    assert not core.on_event(mem("suspect", "n1"), 5.5).actions  # repeated verdict


def test_cleared_suspicion_restores_routing() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("suspect", "n1"), 5.0)
    d = core.on_event(mem("alive", "n1", inc=2, reason="refuted"), 5.5)
    assert ops(d) == [("balancer", "node_update")] and d.actions[0].args["state"] == "alive"
    assert kinds(d) == [EVENT_RECOVERED] and "refuted" in d.events[0].data["reason"]
    assert core.node("n1").incarnation == 2


def test_dead_node_fails_its_primaries_over_at_once_balancer_first() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("suspect", "n1"), 5.0)
    d = core.on_event(mem("dead", "n1"), 6.0)
    assert ops(d) == [("balancer", "node_update"), ("sharding", "node_dead")]
    assert d.actions[0].args == {"node": "n1", "state": "dead"}
    assert kinds(d) == [EVENT_FAILOVER]
    assert "fail over now" in d.events[0].data["reason"] and d.events[0].data["delay"] == DELAY
    rec = core.node("n1")
    assert rec.lifecycle == ACTIVE and rec.member == "dead" and rec.member_since == 6.0


def test_node_back_within_the_delay_keeps_its_replicas() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("dead", "n1"), 10.0)
    assert not tick(core, 10.0 + DELAY - 1)
    d = core.on_event(mem("alive", "n1", inc=2, reason="rejoined"), 10.0 + DELAY - 1)
    assert ops(d) == [("sharding", "node_alive"), ("balancer", "node_update")]
    assert kinds(d) == [EVENT_RECOVERED] and "nothing moves" in d.events[0].data["reason"]
    assert d.events[0].data["down_for"] == DELAY - 1
    assert not tick(core, 10.0 + 10 * DELAY)
    assert core.node("n1").lifecycle == ACTIVE


def test_dead_node_becomes_failed_after_the_delay() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("dead", "n1"), 10.0)
    d = tick(core, 10.0 + DELAY)
    assert kinds(d) == ["cluster.node_failed"] and d.actions == ()
    assert "re-created elsewhere" in d.events[0].data["reason"] and d.events[0].data["previous"] == ACTIVE
    assert core.node("n1").lifecycle == FAILED
    assert not tick(core, 10.0 + 2 * DELAY)


def test_failed_node_returning_becomes_active_again() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("dead", "n1"), 10.0)
    tick(core, 100.0)
    d = core.on_event(mem("alive", "n1", inc=2), 120.0)
    assert ops(d) == [("sharding", "add_node"), ("sharding", "node_alive"), ("balancer", "node_update")]
    assert d.actions[2].args == {"node": "n1", "state": "alive", "lifecycle": "active"}
    assert kinds(d) == ["cluster.node_active"] and d.events[0].data["previous"] == FAILED
    assert core.node("n1").lifecycle == ACTIVE


def test_left_is_an_outage_like_dead_and_dead_then_left_is_one_outage() -> None:
    core = make()
    active_node(core)
    d = core.on_event(mem("left", "n1", reason="leave"), 10.0)
    assert ops(d) == [("balancer", "node_update"), ("sharding", "node_dead")]
    d = core.on_event(mem("dead", "n1"), 20.0)
    assert d.actions == () and d.events == ()
    assert core.node("n1").member == "dead" and core.node("n1").member_since == 10.0
    assert kinds(tick(core, 10.0 + DELAY)) == ["cluster.node_failed"]


def test_gracefully_left_node_is_labelled_left_not_failed_and_returns_to_active() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("left", "n1", reason="leave"), 10.0)
    assert kinds(tick(core, 10.0 + DELAY)) == ["cluster.node_left"]
    assert core.node("n1").lifecycle == "left"
    d = core.on_event(mem("alive", "n1", inc=2), 10.0 + DELAY + 5)
    assert ("sharding", "node_alive") in ops(d)
    assert kinds(d) == ["cluster.node_active"] and core.node("n1").lifecycle == ACTIVE


def test_suspect_after_dead_means_it_came_back_when_the_alive_event_was_lost() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("dead", "n1"), 10.0)
    d = core.on_event(mem("suspect", "n1", inc=2), 20.0)
    assert ops(d) == [("balancer", "node_update"), ("sharding", "node_alive")]  # routing stops first
    assert d.actions[0].args == {"node": "n1", "state": "suspect"}
    assert kinds(d) == [EVENT_SUSPECT, EVENT_RECOVERED]


def test_failed_node_seen_suspect_is_back_and_active_but_not_routed_to() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("dead", "n1"), 10.0)
    tick(core, 10.0 + DELAY)
    d = core.on_event(mem("suspect", "n1", inc=2), 200.0)
    assert ops(d) == [("balancer", "node_update"), ("sharding", "add_node"), ("sharding", "node_alive"),
                      ("balancer", "node_update")]
    assert d.actions[0].args["state"] == "suspect" and "state" not in d.actions[3].args
    assert core.node("n1").lifecycle == ACTIVE


def test_death_of_a_joining_node_moves_nothing() -> None:
    core = make()
    core.on_event(disc("n1"), 0.0)
    assert not core.on_event(mem("dead", "n1"), 1.0).actions
    assert not tick(core, 1000.0)
    assert core.node("n1").lifecycle == JOINING


# -- drain ------------------------------------------------------------------------------


def test_drain_moves_replicas_away_then_decommissions_when_it_holds_nothing() -> None:
    core = make()
    for n in ("a", "b", "c"):
        active_node(core, n)
    core.observe_shards(placed("a", "b", "c"), now=1.0, epoch=4)
    d = core.drain("c", now=2.0)
    assert ops(d) == [("sharding", "drain_node"), ("balancer", "node_update")]
    assert d.actions[1].args == {"node": "c", "lifecycle": "draining"}
    assert kinds(d) == ["cluster.node_draining"] and d.value["lifecycle"] == DRAINING
    # Mid-drain: c still holds a leaving copy.
    assert not core.observe_shards(placed("a", "b", extra=[("c", "leaving"), ("a", "primary")]), now=3.0).actions
    assert core.node("c").lifecycle == DRAINING
    d = core.observe_shards(placed("a", "b"), now=4.0)
    assert kinds(d)[0] == "cluster.node_decommissioned"
    assert ops(d) == [("balancer", "node_update")] and d.actions[0].args["lifecycle"] == DECOMMISSIONED
    assert core.node("c").lifecycle == DECOMMISSIONED


def test_drain_progress_decommissions_at_zero_and_ignores_stale_reports() -> None:
    core = make()
    active_node(core)
    assert not core.drain_progress("n1", 0, now=1.0)  # not draining: a late report
    core.drain("n1", now=2.0)
    assert not core.drain_progress("n1", 3, now=3.0)
    assert kinds(core.drain_progress("n1", 0, now=4.0)) == ["cluster.node_decommissioned"]
    assert not core.drain_progress("ghost", 0, now=5.0)
    with pytest.raises(BadRequest):
        core.drain_progress("n1", -1, now=5.0)


def test_drain_of_a_joining_node_decommissions_it_at_once() -> None:
    core = make()
    core.on_event(disc("n1"), 0.0)
    d = core.drain("n1", now=1.0)
    assert kinds(d) == ["cluster.node_decommissioned"] and ops(d) == [("balancer", "node_update")]
    assert "before it held any replica" in d.events[0].data["reason"]


def test_drain_is_idempotent_and_unknown_nodes_are_not_found() -> None:
    core = make()
    active_node(core)
    core.drain("n1", now=1.0)
    again = core.drain("n1", now=2.0)
    assert not again and again.value["lifecycle"] == DRAINING
    core.drain_progress("n1", 0, now=3.0)
    assert not core.drain("n1", now=4.0)
    with pytest.raises(NotFound):
        core.drain("ghost", now=5.0)


def test_failed_node_can_be_drained() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("dead", "n1"), 0.0)
    tick(core, DELAY)
    d = core.drain("n1", now=DELAY + 1)
    assert ("sharding", "drain_node") in ops(d) and core.node("n1").lifecycle == DRAINING


def test_draining_node_that_dies_stays_draining_and_its_return_continues_the_drain() -> None:
    core = make()
    active_node(core)
    core.drain("n1", now=1.0)
    d = core.on_event(mem("dead", "n1"), 2.0)
    assert ops(d) == [("balancer", "node_update"), ("sharding", "node_dead")]
    assert not tick(core, 2.0 + 5 * DELAY)
    assert core.node("n1").lifecycle == DRAINING
    d = core.on_event(mem("alive", "n1", inc=2), 3.0 + 5 * DELAY)
    assert ("sharding", "node_alive") in ops(d) and "drain continues" in d.events[0].data["reason"]


# -- remove ----------------------------------------------------------------------------


def test_remove_refuses_while_the_node_holds_the_only_live_replica_saying_which() -> None:
    store = FakeStore()
    core = make(store=store)
    active_node(core)
    batches = store.batches
    with pytest.raises(Refused) as info:
        core.remove("n1", ["default/7", "default/3"], now=1.0)
    assert "default/3, default/7" in info.value.message and "drain" in info.value.message
    assert info.value.details["shards"] == ["default/3", "default/7"] and info.value.details["count"] == 2
    assert core.node("n1").lifecycle == ACTIVE and store.batches == batches
    with pytest.raises(Refused):
        core.check_remove("n1", ["default/3"])


def test_remove_refusal_names_a_bounded_number_of_shards() -> None:
    core = ManagerCore(ManagerConfig(refusal_names=3))
    core.on_event(disc("n1"), 0.0)
    with pytest.raises(Refused) as info:
        core.remove("n1", [f"s{i:02}" for i in range(10)], now=1.0)
    assert "s00, s01, s02 and 7 more" in info.value.message and info.value.details["count"] == 10


def test_remove_forgets_the_node_everywhere_routing_first() -> None:
    store = FakeStore()
    core = make(store=store)
    active_node(core)
    core.drain("n1", now=1.0)
    core.drain_progress("n1", 0, now=2.0)
    d = core.remove("n1", [], now=3.0)
    assert ops(d) == [("balancer", "node_update"), ("sharding", "remove_node"), ("membership", "forget"),
                      ("discovery", "remove"), ("balancer", "forget_node")]
    assert kinds(d) == ["cluster.node_removed"] and d.value == {"removed": "n1", "incarnation": 1}
    assert "n1" not in store.nodes and "n1" in store.tombs
    with pytest.raises(NotFound):
        core.node("n1")
    with pytest.raises(NotFound):
        core.remove("n1", [], now=4.0)


def test_removed_agent_still_beaconing_is_ignored_until_it_restarts() -> None:
    core = make()
    core.on_event(disc("n1", inc=5), 0.0)
    core.remove("n1", [], now=1.0)
    d = core.on_event(disc("n1", inc=5), 2.0)
    assert kinds(d) == [EVENT_IGNORED] and d.actions == () and "restart its agent" in d.events[0].data["reason"]
    assert "n1" not in {r.id for r in core.nodes()}
    d = core.on_event(disc("n1", inc=6), 3.0)
    assert kinds(d) == ["cluster.node_registered"] and core.node("n1").incarnation == 6


def test_operator_can_bring_a_removed_node_back() -> None:
    core = make()
    core.on_event(disc("n1", inc=5), 0.0)
    core.remove("n1", [], now=1.0)
    core.register("n1", "127.0.0.1:7002", "z1", now=2.0)
    assert core.registry.tombstone("n1") is None
    assert not kinds(core.on_event(disc("n1", inc=5), 3.0))


# -- manual registration ------------------------------------------------------------------


def test_register_by_operator_pins_the_node_in_discovery_and_admits_it() -> None:
    core = make()
    d = core.register("n1", "10.1.1.1:5432", "rack-2", 2.0, now=1.0)
    assert ops(d) == [("discovery", "register"), ("membership", "admit"), ("balancer", "node_update")]
    assert d.actions[0].args == {"node": "n1", "address": "10.1.1.1:5432", "zone": "rack-2", "weight": 2.0}
    assert kinds(d) == ["cluster.node_registered"] and d.events[0].data["source"] == "manual"
    assert d.value["lifecycle"] == JOINING and d.value["source"] == "manual"
    assert kinds(core.on_event(mem("alive", "n1"), 2.0)) == ["cluster.node_active"]


def test_registering_the_same_node_twice_changes_nothing() -> None:
    core = make()
    core.register("n1", "10.1.1.1:5432", now=1.0)
    d = core.register("n1", "10.1.1.1:5432", now=2.0)
    assert not d and d.value["id"] == "n1" and len(core.nodes()) == 1


def test_reregistering_a_node_elsewhere_updates_routing_but_never_unpins_it_in_discovery() -> None:
    core = make()
    core.register("n1", "10.1.1.1:5432", now=1.0)
    core.on_event(mem("alive", "n1"), 1.5)
    d = core.register("n1", "10.1.1.2:5432", "default", now=2.0)
    assert kinds(d) == ["cluster.node_updated"]
    # discovery.remove would make membership forget the node: a false failover.
    assert ops(d) == [("balancer", "node_update")]
    assert d.actions[0].args == {"node": "n1", "address": "10.1.1.2:5432", "weight": 1.0}
    assert core.node("n1").address == "10.1.1.2:5432"


def test_registering_a_decommissioned_node_is_a_conflict() -> None:
    core = make()
    core.on_event(disc("n1"), 0.0)
    core.drain("n1", now=1.0)
    with pytest.raises(Conflict, match="phantom remove n1"):
        core.register("n1", "127.0.0.1:7002", "z1", now=2.0)


@pytest.mark.parametrize(
    "args", [("", "h:1"), ("n 1", "h:1"), ("n1", "nohost"), ("n1", "h:1", ""), ("n1", "h:1", "z", -1.0)]
)
def test_register_refuses_bad_values(args: tuple[Any, ...]) -> None:
    core = make()
    with pytest.raises(BadRequest):
        core.register(*args, now=0.0)
    assert core.nodes() == []


# -- plumbing -----------------------------------------------------------------------------


def test_a_decision_carries_its_registry_changes_once_for_the_shell_to_commit() -> None:
    core = ManagerCore(ManagerConfig(rereplication_delay=DELAY))
    d = core.on_event(disc("n1"), 1.0)
    assert kinds(d)[0] == "cluster.node_registered" and d.changes == (core.node("n1"),)
    d = core.on_event(mem("alive", "n1"), 2.0)
    # Only what this input changed, the newest record last: nothing is handed out twice.
    assert d.changes and d.changes[-1] == core.node("n1") and core.node("n1").lifecycle == ACTIVE
    assert core.drift(down=[]) == [] and core.reconcile(3.0) and core.registry.take_changes() == []


def test_verdicts_of_an_older_membership_term_are_stale() -> None:
    terms = MembershipTerm()
    assert terms.fresh(3) and terms.term == 3
    assert terms.fresh(3) and not terms.fresh(2) and terms.term == 3
    assert terms.fresh(None) and terms.fresh(True) and terms.term == 3  # no term: a membership without leaders
    assert terms.fresh(7) and not terms.fresh(3) and terms.term == 7


def test_a_failed_commit_rolls_the_core_back_and_the_next_commit_carries_on() -> None:
    store = FakeStore()
    core = make(store=store)
    store.fail = True
    with pytest.raises(OSError):
        core.on_event(disc("n1"), 1.0)
    assert "n1" not in store.nodes
    with pytest.raises(NotFound):
        core.node("n1")  # rolled back: memory holds what the store holds
    store.fail = False
    core.on_event(disc("n2"), 2.0)
    core.on_event(disc("n1"), 3.0)  # discovery's beacons (or sync_discovery) bring it again
    assert set(store.nodes) == {"n1", "n2"} and store.nodes == {r.id: r for r in core.nodes()}


def test_malformed_events_are_bad_requests_and_unknown_kinds_decide_nothing() -> None:
    core = make()
    for bad in (
        Event("node.discovered", {"node": "", "address": "h:1", "zone": "z"}),
        Event("node.discovered", {"node": "n1", "address": "nohost", "zone": "z"}),
        Event("member.alive", {"node": None}),
        Event("member.dead", {"node": "n1", "incarnation": -3}),
        {"no": "kind"},
    ):
        with pytest.raises(BadRequest):
            core.on_event(bad, 1.0)
    with pytest.raises(BadRequest):
        core.tick(float("nan"))
    assert not core.on_event(Event("member.load", {"loads": {}}), 1.0)
    assert not core.on_event(Event("shardmap.changed", {"epoch": 3}), 1.0)
    assert not core.on_event({"kind": "member.zombie", "node": "n1"}, 1.0)
    assert core.nodes() == []


def test_wire_form_events_are_accepted() -> None:
    core = make()
    d = core.on_event(disc("n1").to_wire(), 1.0)
    assert kinds(d) == ["cluster.node_registered"]


def test_sync_members_replays_verdicts_whose_events_were_lost() -> None:
    core = make()
    core.on_event(disc("n1"), 0.0)
    core.on_event(disc("n2"), 0.0)
    d = core.sync_members(
        [{"id": "n1", "state": "alive", "incarnation": 1}, {"id": "n2", "state": "dead", "incarnation": 1},
         {"id": "n3", "state": "alive", "incarnation": 7}, {"id": 5, "state": "alive"}, {"id": "x", "state": "?"}],
        1.0,
    )
    assert kinds(d) == ["cluster.node_active"] and core.node("n2").member == "dead"
    assert not core.sync_members([{"id": "n1", "state": "alive"}, {"id": "n2", "state": "dead"}], 2.0)
    # A registered node membership's leader does not know (it restarted, and discovery forgot
    # a node that died meanwhile) is admitted again at its incarnation, so it gets a verdict.
    again = core.sync_members([{"id": "n1", "state": "alive"}], 2.5)
    assert [(a.service, a.op, a.args) for a in again.actions] == [
        ("membership", "admit", {"node": "n2", "incarnation": core.node("n2").incarnation})
    ]
    # n3 was heard before it registered.
    assert kinds(core.on_event(disc("n3"), 3.0)) == ["cluster.node_registered", "cluster.node_active"]
    assert core.node("n3").incarnation == 7


def test_sync_discovery_registers_nodes_whose_events_were_lost() -> None:
    core = make()
    d = core.sync_discovery(
        [{"id": "n1", "address": "h:1", "zone": "z", "weight": 1.0, "incarnation": 2, "state": "alive",
          "source": "beacon"},
         {"id": "n2", "address": "h:2", "zone": "z", "state": "lost"},
         {"id": "bad", "address": "nohost", "zone": "z"}],
        1.0,
    )
    assert kinds(d) == ["cluster.node_registered"] and [r.id for r in core.nodes()] == ["n1"]


def test_health_event_follows_member_verdicts_once_a_map_is_known() -> None:
    core = make()
    for n in ("a", "b", "c"):
        active_node(core, n)
    d = core.observe_shards(placed("a", "b", "c"), now=1.0, epoch=2)
    assert [e.data["health"] for e in d.events if e.kind == "cluster.health"] == ["green"]
    d = core.on_event(mem("dead", "a"), 2.0)
    health = [e for e in d.events if e.kind == "cluster.health"]
    assert health and health[0].data["health"] == "red" and health[0].data["why"]["unavailable"] == ["s0"]
    assert kinds(d)[0] == EVENT_FAILOVER  # the decision first, then what it did to health
    assert core.health.status == "red"


def test_registering_a_node_heard_alive_earlier_re_assesses_health() -> None:
    core = make()
    active_node(core, "a")
    core.observe_shards(placed("a", "b"), now=1.0)
    assert core.health.status == "yellow"  # b unknown: its copy is not live
    core.on_event(mem("alive", "b"), 2.0)  # not registered yet: only heard
    d = core.on_event(disc("b"), 3.0)
    assert [e.data["health"] for e in d.events if e.kind == "cluster.health"] == ["green"]


def test_no_health_event_before_any_map() -> None:
    core = make()
    active_node(core)
    assert "cluster.health" not in kinds(core.on_event(mem("dead", "n1"), 1.0))
    assert core.health.status == "red" and not core.health.known


def test_status_and_sole_shards_come_from_the_last_map() -> None:
    core = make()
    for n in ("a", "b"):
        active_node(core, n)
    assert core.sole_shards("a") == []
    core.observe_shards(placed("a", "b", extra=[("a", "primary")]), now=1.0, down=(), epoch=9)
    assert core.sole_shards("a") == ["s1"]
    doc = core.status([{"id": "a", "state": "alive"}, {"id": "b", "state": "alive"}], {"sharding": True})
    assert doc["epoch"] == 9 and doc["health"] == "green" and doc["shards"]["total"] == 2
    assert [(n["id"], n["replicas"], n["primaries"]) for n in doc["nodes"]] == [("a", 2, 2), ("b", 1, 0)]


# -- restart ---------------------------------------------------------------------------------


def build_cluster(store: FakeStore) -> ManagerCore:
    core = make(store=store)
    for n in ("act", "dead", "drn", "fail", "gone", "join", "dec"):
        core.on_event(disc(n), 0.0)
    for n in ("act", "dead", "drn", "fail", "gone", "dec"):
        core.on_event(mem("alive", n), 1.0)
    core.on_event(mem("dead", "fail"), 2.0)
    tick(core, 2.0 + DELAY)
    core.on_event(mem("dead", "dead"), 3.0 + DELAY)
    core.drain("drn", now=4.0 + DELAY)
    core.drain("dec", now=4.0 + DELAY)
    core.drain_progress("dec", 0, now=5.0 + DELAY)
    core.remove("gone", [], now=6.0 + DELAY)
    return core


def test_restart_rebuilds_the_same_registry_from_the_store() -> None:
    store = FakeStore()
    before = build_cluster(store)
    after = make(store=store)
    assert after.nodes() == before.nodes()
    assert {r.id: r.lifecycle for r in after.nodes()} == {
        "act": ACTIVE, "dead": ACTIVE, "drn": DRAINING, "fail": FAILED, "join": JOINING, "dec": DECOMMISSIONED}
    assert after.registry.tombstone("gone") is not None


def test_reconcile_reissues_everything_still_owed_after_a_restart() -> None:
    store = FakeStore()
    build_cluster(store)
    core = make(store=store)
    actions = core.reconcile(100.0)
    per: dict[str, list[tuple[str, str]]] = {}
    for a in actions:
        assert a.node is not None
        per.setdefault(a.node, []).append((a.service, a.op))
    assert per["act"] == [("membership", "admit"), ("balancer", "node_update"), ("sharding", "add_node"),
                          ("sharding", "node_alive")]
    assert per["dead"][-2:] == [("sharding", "add_node"), ("sharding", "node_dead")]
    assert per["drn"][-2:] == [("sharding", "drain_node"), ("sharding", "node_alive")]  # the drain continues
    assert ("sharding", "add_node") not in per["drn"]  # that would stop the drain
    assert per["fail"][-1] == ("sharding", "node_dead") and ("sharding", "add_node") not in per["fail"]
    assert per["join"] == [("membership", "admit"), ("balancer", "node_update")]
    assert per["dec"] == [("balancer", "node_update")]
    assert per["gone"] == [("sharding", "remove_node"), ("membership", "forget"), ("discovery", "remove"),
                           ("balancer", "forget_node")]
    balancer = {a.node: a.args for a in actions if a.op == "node_update"}
    assert balancer["dec"]["lifecycle"] == DECOMMISSIONED and "lifecycle" not in balancer["fail"]
    assert balancer["dead"]["state"] == "dead"
    # Idempotent and pure: asking twice gives the same list and changes nothing.
    assert core.reconcile(101.0) == actions
    assert "gone" not in {a.node for a in core.reconcile(102.0, removals=False)}


def test_unapproved_nodes_get_nothing_from_reconcile() -> None:
    store = FakeStore()
    core = make(auto_join=False, store=store)
    core.on_event(disc("n1"), 0.0)
    assert make(auto_join=False, store=store).reconcile(1.0) == []


def test_dead_timer_survives_a_restart() -> None:
    store = FakeStore()
    core = make(store=store)
    active_node(core)
    core.on_event(mem("dead", "n1"), 10.0)
    again = make(store=store)
    assert not tick(again, 10.0 + DELAY - 1)
    assert kinds(tick(again, 10.0 + DELAY)) == ["cluster.node_failed"]


# -- property: random histories -----------------------------------------------------------------

NODES = ["a", "b", "c"]
_node = st.sampled_from(NODES)
_BY_KIND: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "disc": st.tuples(st.just("disc"), _node, st.integers(0, 3), st.sampled_from(["z1", "z2"])),
    "mem": st.tuples(st.just("mem"), _node, st.sampled_from(["alive", "alive", "suspect", "dead", "left"]),
                     st.integers(0, 3)),
    "register": st.tuples(st.just("register"), _node, st.sampled_from(["z1", "z2"])),
    "approve": st.tuples(st.just("approve"), _node),
    "drain": st.tuples(st.just("drain"), _node),
    "remove": st.tuples(st.just("remove"), _node, st.booleans()),
    "progress": st.tuples(st.just("progress"), _node, st.integers(0, 2)),
    "observe": st.tuples(st.just("observe"), st.lists(st.tuples(_node, st.sampled_from(
        ["primary", "replica", "joining", "leaving"])), max_size=6)),
    "tick": st.tuples(st.just("tick"), st.sampled_from([DELAY, 30.0, 1.0])),
    "restart": st.tuples(st.just("restart")),
}
# Node and member events are weighted up so that histories get deep (active,
# failed, draining, back again) rather than stopping at unknown-node errors.
_WEIGHTS = {"disc": 4, "mem": 8, "register": 1, "approve": 1, "drain": 2, "remove": 1, "progress": 1,
            "observe": 2, "tick": 3, "restart": 1}
OPS = st.sampled_from([k for k, w in _WEIGHTS.items() for _ in range(w)]).flatmap(lambda k: _BY_KIND[k])


def _apply(core: ManagerCore, op: tuple[Any, ...], now: float) -> tuple[Decision, list[ShardInfo] | None]:
    kind = op[0]
    if kind == "disc":
        return core.on_event(disc(op[1], inc=op[2], zone=op[3]), now), None
    if kind == "mem":
        return core.on_event(mem(op[2], op[1], inc=op[3]), now), None
    if kind == "register":
        return core.register(op[1], "127.0.0.1:7002", op[2], now=now), None
    if kind == "approve":
        return core.approve(op[1], now=now), None
    if kind == "drain":
        return core.drain(op[1], now=now), None
    if kind == "remove":
        return core.remove(op[1], ["s0"] if op[2] else [], now=now), None
    if kind == "progress":
        return core.drain_progress(op[1], op[2], now=now), None
    if kind == "observe":
        seen: dict[str, str] = {}
        for node, role in op[1]:
            if role == "primary" and "primary" in seen.values():
                role = "replica"
            seen.setdefault(node, role)
        shards = [ShardInfo("s0", 2, tuple(seen.items()))]
        return core.observe_shards(shards, now=now, epoch=1), shards
    if kind == "tick":
        return tick(core, now), None
    raise AssertionError(kind)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(auto_join=st.booleans(), history=st.lists(OPS, min_size=10, max_size=60))
def test_random_histories_keep_the_registry_sound(auto_join: bool, history: list[tuple[Any, ...]]) -> None:
    store = FakeStore()
    core = make(auto_join, store)
    shards: list[ShardInfo] | None = None
    now = 0.0
    for op in history:
        now += op[1] if op[0] == "tick" else 1.0
        before = {r.id: r for r in core.nodes()}
        if op[0] == "restart":
            core = make(auto_join, store)
            assert {r.id: r for r in core.nodes()} == before  # nothing forgotten, nothing doubled
            actions = core.reconcile(now)
            assert core.reconcile(now) == actions  # reconcile decides nothing by itself
            for rec in before.values():
                mine = [(a.service, a.op) for a in actions if a.node == rec.id]
                if not rec.approved:
                    assert mine == []
                elif rec.lifecycle == DRAINING:
                    assert ("sharding", "drain_node") in mine and ("sharding", "add_node") not in mine
                elif rec.lifecycle == ACTIVE:
                    assert ("sharding", "add_node") in mine
                elif rec.lifecycle in (FAILED, "left"):
                    assert ("sharding", "node_dead") in mine
            if shards is not None:
                core.observe_shards(shards, now=now, epoch=1)
            continue
        try:
            d, new_shards = _apply(core, op, now)
        except (NotFound, Conflict, Refused):
            # A refused command changes nothing, in memory or on disk.
            assert {r.id: r for r in core.nodes()} == before
            assert store.nodes == before
            continue
        if new_shards is not None:
            shards = new_shards
        after = {r.id: r for r in core.nodes()}

        # Every decision is explained: actions come with events, events with node and reason.
        if d.actions:
            assert d.events, (op, d.actions)
        for e in d.events:
            assert "node" in e.data and isinstance(e.data["reason"], str) and e.data["reason"], e
        for a in d.actions:
            assert a.node is not None and a.reason

        # Lifecycle moves only along legal edges, one event per move.
        moves = [e for e in d.events if e.kind in ("cluster.node_active", "cluster.node_draining",
                                                    "cluster.node_decommissioned", "cluster.node_failed",
                                                    "cluster.node_left")]
        for e in moves:
            assert e.data["lifecycle"] in TRANSITIONS[e.data["previous"]], e
        for node, rec in after.items():
            old = before.get(node)
            if old is not None and old.lifecycle != rec.lifecycle:
                assert any(e.data["node"] == node for e in moves)
            assert rec.approved or rec.lifecycle in (JOINING, DECOMMISSIONED)

        # Suspicion: the balancer hears it before anything else happens to the node.
        if op[0] == "mem" and op[2] in ("suspect", "dead", "left"):
            first = [a for a in d.actions if a.node == op[1]][:1]
            if first:
                assert (first[0].service, first[0].op, first[0].args.get("state")) == ("balancer", "node_update",
                                                                                       op[2])
        # Removal happens only without sole replicas.
        if op[0] == "remove":
            assert not op[2] and op[1] not in after

        # Durable state is memory's state: no node forgotten or doubled.
        assert store.nodes == after
        assert not set(store.tombs) & set(after)

        # Health agrees with a brute-force oracle over the last map.
        if shards is not None:
            states = {r.id: r.member for r in after.values()}
            assert core.health.status == oracle(shards, states, set())["status"]
            assert core.health == assess(shards, states)
            # ...and no colour change went without its cluster.health event.
            last = core._tracker.current
            assert last is not None and last.status == core.health.status


def test_drift_repairs_a_lost_failover_or_return_from_shardings_down_set() -> None:
    core = make()
    active_node(core, "n1")
    active_node(core, "n2")
    core.on_event(mem("dead", "n1"), 10.0)
    # Sharding never heard of n1's death, and still holds n2 down from an old verdict.
    actions = [(a.service, a.op, a.node) for a in core.drift(down=["n2"])]
    assert actions == [("sharding", "node_dead", "n1"), ("sharding", "node_alive", "n2")]
    assert core.drift(down=["n1"]) == []  # in line: nothing to do


def test_only_sharding_expired_nodes_become_failed() -> None:
    core = make()
    active_node(core)
    core.on_event(mem("dead", "n1"), 10.0)
    assert not core.tick(10.0 + 10 * DELAY)  # the manager keeps no timer of its own
    d = core.tick(11.0, expired=["n1"])
    assert kinds(d) == ["cluster.node_failed"] and core.node("n1").lifecycle == FAILED
