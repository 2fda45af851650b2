"""The manager's node registry and lifecycle state machine (sans-I/O, no sockets)."""

from __future__ import annotations

import itertools
import threading

import pytest

from phantom_bus.errors import BadRequest, Conflict, NotFound
from services.manager.registry import (
    ACTIVE,
    DECOMMISSIONED,
    DRAINING,
    EVENT_APPROVED,
    EVENT_REGISTERED,
    EVENT_REMOVED,
    EVENT_UPDATED,
    FAILED,
    JOINING,
    LIFECYCLES,
    SOURCE_MANUAL,
    TRANSITIONS,
    NodeRecord,
    Registry,
    Tombstone,
    TombstoneDropped,
    check_address,
)


def reg_node(r: Registry, node: str = "n1", now: float = 0.0, **kw: object) -> NodeRecord:
    args: dict[str, object] = {"reason": "test"}
    args.update(kw)
    return r.register(node, "127.0.0.1:7001", "z1", 1.0, now, **args).record  # type: ignore[arg-type]


def walk_to(r: Registry, node: str, lifecycle: str) -> None:
    """Drive ``node`` from joining to ``lifecycle`` by legal steps."""
    paths = {
        JOINING: [],
        ACTIVE: [ACTIVE],
        DRAINING: [ACTIVE, DRAINING],
        DECOMMISSIONED: [ACTIVE, DRAINING, DECOMMISSIONED],
        FAILED: [ACTIVE, FAILED],
        "left": [ACTIVE, "left"],
    }
    for step in paths[lifecycle]:
        r.transition(node, step, "walk", 1.0)


def test_new_node_is_joining_with_all_fields_and_one_event() -> None:
    r = Registry()
    reg = r.register("n1", "10.0.0.1:7001", "z1", 2.0, 5.0, incarnation=3, reason="first beacon")
    rec = reg.record
    assert reg.created
    assert (rec.id, rec.address, rec.zone, rec.weight, rec.incarnation) == ("n1", "10.0.0.1:7001", "z1", 2.0, 3)
    assert rec.lifecycle == JOINING and rec.member is None and rec.approved
    assert rec.first_seen == rec.last_change == 5.0 and rec.reason == "first beacon"
    assert [e.kind for e in reg.events] == [EVENT_REGISTERED]
    assert reg.events[0].data["node"] == "n1" and reg.events[0].data["reason"] == "first beacon"


def test_duplicate_registration_is_idempotent_and_makes_no_double() -> None:
    r = Registry()
    reg_node(r)
    r.take_changes()
    again = r.register("n1", "127.0.0.1:7001", "z1", 1.0, 9.0, reason="again")
    assert not again.created and again.events == () and again.changed == {}
    assert len(r) == 1 and r.take_changes() == []
    assert r.get("n1").last_change == 0.0


def test_reregistration_with_new_address_updates_with_an_event() -> None:
    r = Registry()
    reg_node(r)
    reg = r.register("n1", "127.0.0.1:7999", "z2", 1.0, 4.0, reason="moved")
    assert reg.changed == {"address": ["127.0.0.1:7001", "127.0.0.1:7999"], "zone": ["z1", "z2"]}
    assert [e.kind for e in reg.events] == [EVENT_UPDATED]
    assert reg.events[0].data["changed"]["zone"] == ["z1", "z2"]
    assert r.get("n1").address == "127.0.0.1:7999" and r.get("n1").last_change == 4.0
    assert len(r) == 1


def test_higher_incarnation_is_recorded_silently_and_never_goes_down() -> None:
    r = Registry()
    reg_node(r, incarnation=5)
    reg = r.register("n1", "127.0.0.1:7001", "z1", 1.0, 1.0, incarnation=7, reason="restart")
    assert reg.events == () and r.get("n1").incarnation == 7
    r.register("n1", "127.0.0.1:7001", "z1", 1.0, 2.0, incarnation=2, reason="stale")
    assert r.get("n1").incarnation == 7


def test_approval_is_given_once_and_never_withdrawn() -> None:
    r = Registry()
    reg_node(r, approved=False)
    assert not r.get("n1").approved
    reg = r.register("n1", "127.0.0.1:7001", "z1", 1.0, 1.0, approved=True, reason="operator")
    assert [e.kind for e in reg.events] == [EVENT_APPROVED]
    r.register("n1", "127.0.0.1:7001", "z1", 1.0, 2.0, approved=False, reason="beacon")
    assert r.get("n1").approved


@pytest.mark.parametrize(("start", "target"), list(itertools.product(LIFECYCLES, LIFECYCLES)))
def test_only_legal_transitions_are_allowed(start: str, target: str) -> None:
    r = Registry()
    reg_node(r)
    walk_to(r, "n1", start)
    if target in TRANSITIONS[start]:
        rec, event = r.transition("n1", target, "because", 2.0)
        assert rec.lifecycle == target and rec.reason == "because" and rec.last_change == 2.0
        assert event.data["previous"] == start and event.data["lifecycle"] == target
        assert event.kind == f"cluster.node_{target}" or (target == JOINING)
    else:
        with pytest.raises(Conflict) as info:
            r.transition("n1", target, "because", 2.0)
        assert start in info.value.message and target in info.value.message
        assert r.get("n1").lifecycle == start


def test_unapproved_node_cannot_become_active() -> None:
    r = Registry()
    reg_node(r, approved=False)
    with pytest.raises(Conflict, match="waiting for approval"):
        r.transition("n1", ACTIVE, "x", 1.0)


def test_unknown_ids_are_not_found() -> None:
    r = Registry()
    for call in (
        lambda: r.get("ghost"),
        lambda: r.transition("ghost", ACTIVE, "x", 0.0),
        lambda: r.set_member("ghost", "alive", 0.0),
        lambda: r.remove("ghost", "x", 0.0),
    ):
        with pytest.raises(NotFound):
            call()
    assert r.find("ghost") is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("node", ""), ("node", "a b"), ("node", "a/b"), ("node", 7), ("address", "nohost"), ("address", "h:0"),
     ("address", "h:99999"), ("zone", ""), ("zone", "z" * 65), ("weight", 0), ("weight", float("nan")),
     ("weight", True), ("incarnation", -1), ("incarnation", 1.5)],
)
def test_bad_values_are_bad_requests(field: str, value: object) -> None:
    args: dict[str, object] = {"node": "n1", "address": "h:1", "zone": "z", "weight": 1.0, "incarnation": 0}
    args[field] = value
    r = Registry()
    with pytest.raises(BadRequest):
        r.register(args["node"], args["address"], args["zone"], args["weight"], 0.0,  # type: ignore[arg-type]
                   incarnation=args["incarnation"], reason="x")  # type: ignore[arg-type]
    assert len(r) == 0


def test_address_accepts_ipv6_and_names() -> None:
    assert check_address("[::1]:7001") == "[::1]:7001"
    assert check_address("db-1.example:5432") == "db-1.example:5432"


def test_member_state_since_moves_on_change_but_dead_then_left_is_one_outage() -> None:
    r = Registry()
    reg_node(r)
    r.set_member("n1", "alive", 1.0)
    r.set_member("n1", "alive", 2.0)
    assert r.get("n1").member_since == 1.0
    r.set_member("n1", "dead", 3.0)
    r.set_member("n1", "left", 4.0)
    assert r.get("n1").member == "left" and r.get("n1").member_since == 3.0
    r.set_member("n1", "alive", 5.0, incarnation=9)
    assert r.get("n1").member_since == 5.0 and r.get("n1").incarnation == 9
    with pytest.raises(BadRequest):
        r.set_member("n1", "zombie", 6.0)


def test_remove_deletes_and_tombstones_with_the_incarnation() -> None:
    r = Registry()
    reg_node(r, incarnation=4)
    r.take_changes()
    tomb, event = r.remove("n1", "operator", 7.0)
    assert tomb == Tombstone("n1", 4, 7.0, "operator")
    assert event.kind == EVENT_REMOVED and event.data["previous"] == JOINING
    assert "n1" not in r and r.tombstone("n1") == tomb
    assert r.take_changes() == [tomb]
    # Registering it again clears the tombstone.
    reg_node(r, now=8.0)
    assert r.tombstone("n1") is None and r.get("n1").first_seen == 8.0


def test_tombstones_are_bounded_oldest_first() -> None:
    r = Registry(max_tombstones=2)
    for i in range(3):
        reg_node(r, f"n{i}")
        r.remove(f"n{i}", "x", float(i))
    assert [t.id for t in r.tombstones()] == ["n1", "n2"]
    assert TombstoneDropped("n0") in r.take_changes()


def test_changes_are_handed_out_once_in_order() -> None:
    r = Registry()
    a = reg_node(r, "a")
    b = reg_node(r, "b")
    first = r.take_changes()
    assert first == [a, b]
    assert r.take_changes() == []
    c = reg_node(r, "c")
    assert r.take_changes() == [c]


def test_restore_rebuilds_the_same_registry() -> None:
    r = Registry()
    reg_node(r, "a")
    reg_node(r, "b", source=SOURCE_MANUAL)
    walk_to(r, "b", DRAINING)
    reg_node(r, "c")
    r.remove("c", "gone", 3.0)
    again = Registry.restore(r.records(), r.tombstones())
    assert again.records() == r.records() and again.tombstones() == r.tombstones()
    with pytest.raises(BadRequest):
        Registry.restore([r.get("a"), r.get("a")])


def test_record_round_trips_through_a_plain_map() -> None:
    r = Registry()
    rec = reg_node(r, member="alive")
    assert NodeRecord.from_dict(rec.to_dict()) == rec
    doc = rec.to_dict()
    doc["lifecycle"] = "zombie"
    with pytest.raises(BadRequest):
        NodeRecord.from_dict(doc)
    with pytest.raises(BadRequest):
        NodeRecord.from_dict({"id": "x"})


def test_concurrent_registrations_never_double_a_node() -> None:
    r = Registry()
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for k in range(50):
            r.register(f"n{k % 10}", "127.0.0.1:7001", "z1", 1.0, float(i), reason="race")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(r) == 10
    created = [c for c in r.take_changes() if isinstance(c, NodeRecord)]
    assert len(created) == 10
