"""Discovery core and beacon schema, driven with virtual time (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phantom_bus.errors import BadRequest, Conflict, NotFound, TooLarge, UnsupportedVersion
from phantom_bus.events import Event
from services.discovery.beacon import (
    MAX_BEACON_BYTES,
    Beacon,
    decode_beacon,
    encode_beacon,
    new_instance_id,
    parse_beacon,
)
from services.discovery.core import (
    DROP_MALFORMED,
    DROP_OVERSIZE,
    DROP_STALE,
    DROP_TABLE_FULL,
    DROP_VERSION,
    NODE_CONFLICT,
    NODE_DISCOVERED,
    NODE_LEFT,
    NODE_LOST,
    NODE_REMOVED,
    NODE_UPDATED,
    DiscoveryConfig,
    DiscoveryTable,
)


def make(
    node: str = "n1",
    inc: int = 1,
    instance: str = "a",
    address: str = "10.0.0.1:7001",
    zone: str = "z1",
    weight: float = 1.0,
    leaving: bool = False,
    **extra: Any,
) -> Beacon:
    return Beacon(
        node=node,
        incarnation=inc,
        instance=instance,
        address=address,
        zone=zone,
        weight=weight,
        version="1.0",
        started=1700000000.0,
        leaving=leaving,
        **extra,
    )


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def wire(**changes: Any) -> dict[str, Any]:
    doc = make(hb={"endpoint": "tcp://127.0.0.1:5561", "interval": 1.0}).to_wire()
    doc.update(changes)
    return doc


# -- beacon schema -------------------------------------------------------------


def test_beacon_round_trips_through_the_wire() -> None:
    beacon = make(hb={"endpoint": "tcp://h:5561", "interval": 0.5})
    assert decode_beacon(encode_beacon(beacon)) == beacon
    assert parse_beacon(beacon.to_wire()) == beacon
    assert beacon.leave().leaving and not beacon.leaving


def test_beacon_unknown_fields_are_ignored() -> None:
    assert parse_beacon(wire(future_field=[1, 2, 3], ttl=9)).node == "n1"


@pytest.mark.parametrize(
    "name", ["node", "incarnation", "instance", "address", "zone", "weight", "version", "started", "leaving"]
)
def test_beacon_missing_field_is_named(name: str) -> None:
    doc = wire()
    del doc[name]
    with pytest.raises(BadRequest) as err:
        parse_beacon(doc)
    assert err.value.details["field"] == name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("node", ""),
        ("node", "x" * 129),
        ("node", "a b"),
        ("node", "n/1"),
        ("node", 7),
        ("incarnation", -1),
        ("incarnation", 1.5),
        ("incarnation", True),
        ("incarnation", 2**63),
        ("instance", ""),
        ("instance", None),
        ("address", "nohost"),
        ("address", ":7001"),
        ("address", "h:0"),
        ("address", "h:65536"),
        ("address", "h:+80"),
        ("address", "h: 80"),
        ("address", "a b:80"),
        ("address", 7001),
        ("zone", ""),
        ("zone", "z" * 65),
        ("weight", 0),
        ("weight", -1.0),
        ("weight", float("nan")),
        ("weight", float("inf")),
        ("weight", "1"),
        ("weight", True),
        ("version", 1),
        ("version", "v" * 65),
        ("started", -1.0),
        ("started", "yesterday"),
        ("started", float("inf")),
        ("leaving", 1),
        ("leaving", "no"),
        ("hb", "tcp://x"),
        ("hb", {"k": [1]}),
        ("hb", {"k" * 33: 1}),
        ("hb", {"k": "v" * 257}),
        ("hb", {f"k{i}": 1 for i in range(17)}),
        ("hb", {"k": float("nan")}),
        ("v", "1"),
        ("v", True),
    ],
)
def test_beacon_bad_value_is_refused_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(BadRequest) as err:
        parse_beacon(wire(**{name: value}))
    assert err.value.details["field"] == name


@pytest.mark.parametrize(
    "address", ["127.0.0.1:7001", "db-1.example.com:1", "[::1]:65535", "[fe80::1%eth0]:7001"]
)
def test_beacon_accepts_host_port_forms(address: str) -> None:
    assert parse_beacon(wire(address=address)).address == address


def test_beacon_other_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedVersion):
        parse_beacon(wire(v=2))


@pytest.mark.parametrize("obj", [None, [], "beacon", 42, b"\x00"])
def test_beacon_that_is_not_a_map_is_refused(obj: Any) -> None:
    with pytest.raises(BadRequest):
        parse_beacon(obj)


def test_decode_refuses_oversize_before_decoding() -> None:
    with pytest.raises(TooLarge):
        decode_beacon(b"\xc1" * (MAX_BEACON_BYTES + 1))  # 0xc1 would not even decode


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x81\xa1",
        msgpack.packb([1, 2]),
        msgpack.packb({1: 2}),
        b"\x92\x01\x02extra",
        msgpack.packb({"v": 1}) + b"\x00",
    ],
)
def test_decode_refuses_garbage(payload: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_beacon(payload)


def test_encode_refuses_oversize_beacon() -> None:
    big = make(hb={f"k{i}": "x" * 256 for i in range(16)})
    with pytest.raises(TooLarge):
        encode_beacon(big)


def test_instance_ids_are_distinct_and_valid() -> None:
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100
    for token in ids:
        parse_beacon(wire(instance=token))


# -- config --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"beacon_interval": 0}, "beacon_interval"),
        ({"beacon_interval": -1.0}, "beacon_interval"),
        ({"expiry": 0}, "expiry"),
        ({"expiry": 1.0}, "expiry"),  # equal to the interval
        ({"expiry": 0.5}, "expiry"),
        ({"forget_after": 0}, "forget_after"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"beacon_interval": True}, "beacon_interval"),
    ],
)
def test_config_validation_names_the_setting(changes: dict[str, Any], setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        DiscoveryConfig(**changes).validate()
    with pytest.raises(ValueError, match=setting):
        DiscoveryTable(DiscoveryConfig(**changes))


def test_config_defaults_are_valid_and_expiry_scales_with_interval() -> None:
    DiscoveryConfig().validate()
    config = DiscoveryConfig.for_interval(2.0)
    assert (config.beacon_interval, config.expiry) == (2.0, 10.0)
    assert config.expiry > config.conflict_grace > config.beacon_interval


# -- discovery, update, expiry, leave --------------------------------------------


@pytest.fixture
def table() -> DiscoveryTable:
    return DiscoveryTable(DiscoveryConfig(beacon_interval=1.0, expiry=5.0, forget_after=60.0))


def test_first_beacon_discovers_the_node(table: DiscoveryTable) -> None:
    events = table.observe(make(), now=10.0)
    assert kinds(events) == [NODE_DISCOVERED]
    data = events[0].data
    assert data["node"] == "n1" and data["reason"] == "first beacon"
    assert data["address"] == "10.0.0.1:7001" and data["incarnation"] == 1
    row = table.node("n1", now=12.5)
    assert row["state"] == "alive" and row["source"] == "beacon" and not row["pinned"]
    assert row["first_seen"] == 10.0 and row["age"] == 2.5 and row["beacons"] == 1


def test_repeated_identical_beacons_are_silent(table: DiscoveryTable) -> None:
    table.observe(make(), now=0.0)
    for t in range(1, 20):
        assert table.observe(make(), now=float(t)) == []
        assert table.tick(now=t + 0.5) == []
    assert table.node("n1", now=20.0)["beacons"] == 20


@pytest.mark.parametrize(
    ("field", "value"), [("address", "10.0.0.2:7001"), ("zone", "z2"), ("weight", 2.5), ("inc", 2)]
)
def test_changed_field_is_an_update(table: DiscoveryTable, field: str, value: Any) -> None:
    table.observe(make(), now=0.0)
    events = table.observe(make(**{field: value}), now=1.0)
    assert kinds(events) == [NODE_UPDATED]
    key = "incarnation" if field == "inc" else field
    assert list(events[0].data["changed"]) == [key]
    assert events[0].data["changed"][key][1] == value
    assert events[0].data["reason"] == "beacon changed"
    assert table.node("n1", now=1.0)[key] == value


def test_version_change_alone_is_not_an_update(table: DiscoveryTable) -> None:
    table.observe(make(), now=0.0)
    b = Beacon(node="n1", incarnation=1, instance="a", address="10.0.0.1:7001", zone="z1", version="2.0")
    assert table.observe(b, now=1.0) == []
    assert table.node("n1", now=1.0)["version"] == "2.0"


def test_agent_restart_is_an_update_not_a_new_node_or_conflict(table: DiscoveryTable) -> None:
    for t in range(5):
        table.observe(make(inc=100, instance="old"), now=float(t))
    events = table.observe(make(inc=200, instance="new"), now=5.5)
    assert kinds(events) == [NODE_UPDATED]
    assert events[0].data["reason"] == "agent restarted"
    # The old process's last beacon, still queued, arrives after its successor's.
    assert table.observe(make(inc=100, instance="old"), now=5.6) == []
    out: list[Event] = []
    for t in range(6, 20):
        out += table.observe(make(inc=200, instance="new"), now=float(t))
        out += table.tick(now=t + 0.5)
    assert out == []
    row = table.node("n1", now=20.0)
    assert row["instance"] == "new" and row["incarnation"] == 200 and not row["in_conflict"]


def test_silent_node_is_lost_after_expiry_and_not_before(table: DiscoveryTable) -> None:
    table.observe(make(), now=0.0)
    assert table.tick(now=4.999) == []
    events = table.tick(now=5.0)
    assert kinds(events) == [NODE_LOST]
    assert events[0].data["node"] == "n1" and events[0].data["reason"]
    assert events[0].data["silent_for"] == 5.0
    assert table.tick(now=30.0) == []  # reported once
    assert table.node("n1", now=30.0)["state"] == "lost"


def test_lost_node_is_rediscovered_by_its_next_beacon(table: DiscoveryTable) -> None:
    table.observe(make(), now=0.0)
    table.tick(now=6.0)
    events = table.observe(make(address="10.0.0.9:7001"), now=7.0)
    assert kinds(events) == [NODE_DISCOVERED]
    assert events[0].data["reason"] == "beacon after lost"
    assert events[0].data["changed"] == {"address": ["10.0.0.1:7001", "10.0.0.9:7001"]}
    assert table.node("n1", now=7.0)["state"] == "alive"
    assert kinds(table.tick(now=12.0)) == [NODE_LOST]  # and expires again later


def test_only_silent_nodes_expire(table: DiscoveryTable) -> None:
    for i in range(100):
        table.observe(make(node=f"n{i}"), now=0.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        for i in range(0, 100, 2):  # the even ones keep beaconing
            table.observe(make(node=f"n{i}"), now=t)
        lost = table.tick(now=t + 0.1)
    assert sorted(e.data["node"] for e in lost) == sorted(f"n{i}" for i in range(1, 100, 2))
    assert table.stats()["alive"] == 50 and table.stats()["lost"] == 50


def test_leaving_beacon_marks_the_node_left_once(table: DiscoveryTable) -> None:
    table.observe(make(), now=0.0)
    events = table.observe(make(leaving=True), now=1.0)
    assert kinds(events) == [NODE_LEFT]
    assert events[0].data["reason"] == "leaving beacon"
    assert table.observe(make(leaving=True), now=1.1) == []  # agents may repeat it
    assert table.tick(now=50.0) == []  # a left node is not also lost
    assert table.node("n1", now=2.0)["state"] == "left"


def test_leaving_beacon_of_unknown_node_is_announced(table: DiscoveryTable) -> None:
    events = table.observe(make(leaving=True), now=0.0)
    assert kinds(events) == [NODE_LEFT]
    assert table.node("n1", now=0.0)["state"] == "left"


def test_left_node_rejoins_with_higher_incarnation(table: DiscoveryTable) -> None:
    table.observe(make(inc=1), now=0.0)
    table.observe(make(inc=1, leaving=True), now=1.0)
    events = table.observe(make(inc=2, instance="b"), now=2.0)
    assert kinds(events) == [NODE_DISCOVERED]
    assert events[0].data["reason"] == "beacon after left"
    assert table.node("n1", now=2.0)["incarnation"] == 2


# -- incarnation ordering --------------------------------------------------------


def test_stale_incarnation_is_dropped_and_counted(table: DiscoveryTable) -> None:
    table.observe(make(inc=5), now=0.0)
    assert table.observe(make(inc=4, address="10.9.9.9:1"), now=1.0) == []
    row = table.node("n1", now=1.0)
    assert row["incarnation"] == 5 and row["address"] == "10.0.0.1:7001" and row["stale"] == 1
    stats = table.stats()
    assert stats["dropped"] == {DROP_STALE: 1} and stats["accepted"] == 1
    assert stats["last_drop"]["reason"] == DROP_STALE


def test_stale_beacon_does_not_resurrect_a_lost_or_left_node(table: DiscoveryTable) -> None:
    table.observe(make(node="lost", inc=5), now=0.0)
    table.observe(make(node="left", inc=5), now=0.0)
    table.observe(make(node="left", inc=5, leaving=True), now=0.5)
    table.tick(now=10.0)
    assert table.observe(make(node="lost", inc=4, instance="b"), now=11.0) == []
    assert table.observe(make(node="left", inc=4, instance="b"), now=11.0) == []
    assert table.node("lost", now=11.0)["state"] == "lost"
    assert table.node("left", now=11.0)["state"] == "left"


def test_equal_incarnation_from_another_process_waits_until_followed_is_silent(table: DiscoveryTable) -> None:
    table.observe(make(inc=3, instance="a"), now=0.0)
    assert table.observe(make(inc=3, instance="b", address="10.0.0.2:1"), now=1.0) == []
    assert table.node("n1", now=1.0)["instance"] == "a"
    table.tick(now=5.0)
    events = table.observe(make(inc=3, instance="b", address="10.0.0.2:1"), now=5.5)
    assert kinds(events) == [NODE_DISCOVERED]
    assert table.node("n1", now=5.5)["instance"] == "b"


def test_refutation_raises_incarnation_of_the_same_process(table: DiscoveryTable) -> None:
    table.observe(make(inc=7), now=0.0)
    events = table.observe(make(inc=8), now=1.0)
    assert kinds(events) == [NODE_UPDATED]
    assert events[0].data["reason"] == "beacon changed"


# -- conflicts -------------------------------------------------------------------


def alternate(table: DiscoveryTable, start: float, end: float, a: Beacon, b: Beacon) -> list[Event]:
    """Both processes beacon once a second, half a second apart."""
    out: list[Event] = []
    t = start
    while t < end:
        out += table.observe(a, now=t)
        out += table.observe(b, now=t + 0.5)
        out += table.tick(now=t + 0.75)
        t += 1.0
    return out


def test_two_live_processes_on_one_id_are_a_conflict_reported_once(table: DiscoveryTable) -> None:
    table.observe(make(inc=5, instance="a"), now=0.0)
    out = alternate(
        table, 1.0, 30.0, make(inc=5, instance="a"), make(inc=7, instance="b", address="10.0.0.2:7001")
    )
    conflicts = [e for e in out if e.kind == NODE_CONFLICT]
    assert len(conflicts) == 1
    data = conflicts[0].data
    assert data["node"] == "n1" and data["reason"]
    assert data["kept"] == {"instance": "b", "incarnation": 7}
    assert data["rival"] == {"instance": "a", "incarnation": 5}
    # Not flapped: after the takeover the table stays on the newer incarnation.
    assert kinds(out).count(NODE_UPDATED) == 1
    row = table.node("n1", now=30.0)
    assert row["instance"] == "b" and row["address"] == "10.0.0.2:7001"
    assert row["in_conflict"] and row["conflicts"] == 1
    assert [c["instance"] for c in row["claims"]] == ["a"]
    assert table.stats()["conflicts"] == 1
    assert table.stats()["dropped"][DROP_STALE] >= 25


def test_conflict_detected_when_the_older_process_appears_second(table: DiscoveryTable) -> None:
    table.observe(make(inc=9, instance="a"), now=0.0)
    out = alternate(table, 1.0, 6.0, make(inc=9, instance="a"), make(inc=2, instance="b"))
    assert kinds(out) == [NODE_CONFLICT]
    assert out[0].data["kept"]["instance"] == "a"


def test_conflict_with_equal_incarnations_is_reported(table: DiscoveryTable) -> None:
    table.observe(make(inc=4, instance="a"), now=0.0)
    out = alternate(table, 1.0, 6.0, make(inc=4, instance="a"), make(inc=4, instance="b"))
    assert kinds(out) == [NODE_CONFLICT]


def test_conflict_episode_ends_and_a_new_one_is_reported(table: DiscoveryTable) -> None:
    table.observe(make(inc=5, instance="a"), now=0.0)
    first = alternate(table, 1.0, 10.0, make(inc=5, instance="a"), make(inc=7, instance="b"))
    assert kinds(first).count(NODE_CONFLICT) == 1
    for t in range(10, 20):  # "a" is shut down; only "b" beacons
        table.observe(make(inc=7, instance="b"), now=float(t))
    assert not table.node("n1", now=20.0)["in_conflict"]
    second = alternate(table, 20.0, 30.0, make(inc=7, instance="b"), make(inc=5, instance="a"))
    assert kinds(second) == [NODE_CONFLICT]
    assert table.node("n1", now=30.0)["conflicts"] == 2


def test_stale_process_alone_is_not_a_conflict(table: DiscoveryTable) -> None:
    table.observe(make(inc=5, instance="a"), now=0.0)
    table.tick(now=6.0)
    out: list[Event] = []
    for t in range(7, 20):
        out += table.observe(make(inc=3, instance="b"), now=float(t))
    assert out == []
    assert table.node("n1", now=20.0)["stale"] == 13


def test_rival_leaving_ends_its_claim(table: DiscoveryTable) -> None:
    table.observe(make(inc=5, instance="a"), now=0.0)
    table.observe(make(inc=3, instance="b"), now=0.5)
    table.observe(make(inc=3, instance="b", leaving=True), now=0.6)
    assert table.node("n1", now=0.7)["claims"] == []
    assert table.node("n1", now=0.7)["state"] == "alive"


def test_claims_per_node_are_bounded(table: DiscoveryTable) -> None:
    table.observe(make(inc=50), now=0.0)
    for i in range(100):
        table.observe(make(inc=1, instance=f"x{i}"), now=0.01 * i)
    assert len(table.node("n1", now=1.0)["claims"]) <= 4


# -- manual entries --------------------------------------------------------------


def test_manual_node_stays_until_removed(table: DiscoveryTable) -> None:
    events = table.register("m1", "10.1.0.1:7001", "z2", 2.0, now=0.0)
    assert kinds(events) == [NODE_DISCOVERED]
    assert events[0].data["reason"] == "manual registration"
    assert table.tick(now=10_000.0) == []
    row = table.node("m1", now=10_000.0)
    assert (row["state"], row["source"], row["pinned"]) == ("alive", "manual", True)
    assert (row["address"], row["zone"], row["weight"]) == ("10.1.0.1:7001", "z2", 2.0)
    events = table.remove("m1", now=10_001.0)
    assert kinds(events) == [NODE_REMOVED]
    assert events[0].data == {**events[0].data, "node": "m1", "reason": "manual removal"}
    assert "m1" not in table


def test_repeated_registration_is_harmless_but_a_different_one_conflicts(table: DiscoveryTable) -> None:
    table.register("m1", "10.1.0.1:7001", "z1", 1.0, now=0.0)
    assert table.register("m1", "10.1.0.1:7001", "z1", 1.0, now=1.0) == []
    with pytest.raises(Conflict, match="already registered"):
        table.register("m1", "10.1.0.2:7001", "z1", 1.0, now=2.0)


def test_registration_contradicting_a_beaconing_node_is_refused(table: DiscoveryTable) -> None:
    table.observe(make(), now=0.0)
    with pytest.raises(Conflict, match="beaconing"):
        table.register("n1", "10.9.9.9:7001", "z1", 1.0, now=1.0)
    assert table.node("n1", now=1.0)["address"] == "10.0.0.1:7001"


def test_registration_matching_a_beaconing_node_pins_it(table: DiscoveryTable) -> None:
    table.observe(make(), now=0.0)
    assert table.register("n1", "10.0.0.1:7001", "z1", 1.0, now=1.0) == []
    assert table.tick(now=100.0) == []
    row = table.node("n1", now=100.0)
    assert row["pinned"] and row["state"] == "alive"


def test_registration_revives_a_lost_node_as_manual(table: DiscoveryTable) -> None:
    table.observe(make(inc=5), now=0.0)
    table.tick(now=10.0)
    events = table.register("n1", "10.0.0.7:7001", "z1", 1.0, now=11.0)
    assert kinds(events) == [NODE_DISCOVERED]
    row = table.node("n1", now=11.0)
    assert (row["state"], row["source"], row["address"]) == ("alive", "manual", "10.0.0.7:7001")
    assert table.observe(make(inc=4, instance="z"), now=12.0) == []  # order still kept


def test_beacon_for_manual_node_takes_over_its_fields_and_it_stays_pinned(table: DiscoveryTable) -> None:
    table.register("n1", "10.1.0.1:7001", "z9", 1.0, now=0.0)
    events = table.observe(make(inc=3), now=1.0)
    assert kinds(events) == [NODE_UPDATED]
    assert set(events[0].data["changed"]) == {"address", "zone", "incarnation"}
    row = table.node("n1", now=1.0)
    assert (row["source"], row["pinned"], row["address"]) == ("beacon", True, "10.0.0.1:7001")
    assert table.tick(now=1000.0) == []  # beacons stopped: still there, not lost
    assert kinds(table.observe(make(inc=3, leaving=True), now=1001.0)) == [NODE_LEFT]
    table.tick(now=1_000_000.0)
    assert table.node("n1", now=1_000_000.0)["state"] == "left"  # pinned: never forgotten


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("bad id", "h:1", "z", 1.0), "node"),
        (("m", "h", "z", 1.0), "address"),
        (("m", "h:99999", "z", 1.0), "address"),
        (("m", "h:1", "", 1.0), "zone"),
        (("m", "h:1", "z", 0.0), "weight"),
    ],
)
def test_registration_with_bad_values_names_the_field(
    table: DiscoveryTable, args: tuple[str, str, str, float], field: str
) -> None:
    node, address, zone, weight = args
    with pytest.raises(BadRequest) as err:
        table.register(node, address, zone, weight, now=0.0)
    assert err.value.details["field"] == field
    assert len(table) == 0


@pytest.mark.parametrize("node", ["ghost", "", 42])
def test_removing_or_reading_an_unknown_node_is_not_found(table: DiscoveryTable, node: Any) -> None:
    with pytest.raises(NotFound, match="not in the discovery table"):
        table.remove(node, now=0.0)
    with pytest.raises(NotFound):
        table.node(node, now=0.0)


def test_removed_beaconing_node_comes_back_with_its_next_beacon(table: DiscoveryTable) -> None:
    table.observe(make(), now=0.0)
    table.remove("n1", now=0.5)
    assert table.tick(now=100.0) == []  # no lost event for a removed node
    assert kinds(table.observe(make(), now=101.0)) == [NODE_DISCOVERED]


# -- returned events ------------------------------------------------------------------


def test_events_are_returned_once_in_the_order_the_table_changed(table: DiscoveryTable) -> None:
    returned = table.observe(make(node="a"), now=0.0) + table.observe(make(node="b"), now=0.0)
    assert [(e.kind, e.data["node"]) for e in returned] == [(NODE_DISCOVERED, "a"), (NODE_DISCOVERED, "b")]
    lost = table.tick(now=9.0)
    assert kinds(lost) == [NODE_LOST, NODE_LOST] and sorted(e.data["node"] for e in lost) == ["a", "b"]
    assert all(table.node(e.data["node"], 9.0)["state"] == "lost" for e in lost)
    assert table.tick(now=9.5) == []


# -- bad input, capacity, forgetting -----------------------------------------------


def test_receive_drops_and_counts_bad_payloads_without_raising(table: DiscoveryTable) -> None:
    assert table.receive(b"\x00" * (MAX_BEACON_BYTES + 1), now=0.0) == []
    assert table.receive(b"\xc1\xc1", now=0.0) == []
    assert table.receive(msgpack.packb(wire(weight=-3)), now=0.0) == []
    assert table.receive(msgpack.packb(wire(v=99)), now=0.0) == []
    assert kinds(table.receive(encode_beacon(make()), now=0.0)) == [NODE_DISCOVERED]
    table.count_dropped("frames", "3 frames, expected 1")
    stats = table.stats()
    assert stats["dropped"] == {DROP_OVERSIZE: 1, DROP_MALFORMED: 2, DROP_VERSION: 1, "frames": 1}
    assert stats["beacons"] == 6 and stats["accepted"] == 1 and stats["dropped_total"] == 5
    assert stats["last_drop"] == {"reason": "frames", "detail": "3 frames, expected 1"}


def test_lost_and_left_nodes_are_forgotten_after_forget_after(table: DiscoveryTable) -> None:
    table.observe(make(node="a"), now=0.0)
    table.observe(make(node="b"), now=0.0)
    table.observe(make(node="b", leaving=True), now=1.0)
    table.tick(now=5.0)  # "a" lost at 5, "b" left at 1
    table.tick(now=60.9)
    assert "a" in table and "b" in table
    table.tick(now=61.0)
    assert "a" in table and "b" not in table
    table.tick(now=65.0)
    assert len(table) == 0 and table.stats()["forgotten"] == 2


def test_full_table_evicts_the_oldest_tombstone_then_drops(table: DiscoveryTable) -> None:
    small = DiscoveryTable(DiscoveryConfig(max_nodes=2))
    small.observe(make(node="a"), now=0.0)
    small.observe(make(node="b"), now=3.0)
    small.tick(now=5.0)  # "a" lost
    assert kinds(small.observe(make(node="c"), now=6.0)) == [NODE_DISCOVERED]
    assert "a" not in small
    assert small.observe(make(node="d"), now=6.0) == []
    assert small.stats()["dropped"] == {DROP_TABLE_FULL: 1}


def test_time_going_backwards_does_not_break_expiry(table: DiscoveryTable) -> None:
    table.observe(make(node="a"), now=10.0)
    table.observe(make(node="b"), now=9.0)  # treated as 10.0
    assert sorted(e.data["node"] for e in table.tick(now=15.0)) == ["a", "b"]


def test_nodes_lists_every_node_sorted_with_documented_keys(table: DiscoveryTable) -> None:
    table.observe(make(node="b"), now=0.0)
    table.register("a", "10.0.0.3:1", "z1", 1.0, now=0.0)
    rows = table.nodes(now=2.0)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert set(rows[0]) == {
        "id",
        "address",
        "zone",
        "weight",
        "incarnation",
        "instance",
        "version",
        "started",
        "hb",
        "state",
        "source",
        "pinned",
        "first_seen",
        "last_seen",
        "age",
        "beacons",
        "stale",
        "conflicts",
        "in_conflict",
        "claims",
    }
    assert rows[1]["age"] == 2.0


def test_interleaved_observers_keep_the_table_whole() -> None:
    table = DiscoveryTable()
    counted: list[Event] = []
    for i in range(300):
        for worker in range(4):
            counted += [e for e in table.observe(make(node=f"w{worker}-{i % 50}"), now=float(i) * 0.01)
                        if e.kind == NODE_DISCOVERED]
            table.tick(now=float(i) * 0.01)
    assert len(table) == 200 and len(counted) == 200
    assert table.stats()["accepted"] == 1200


# -- property: the table always reflects the last valid beacon per node ----------------

NODES = ["n0", "n1", "n2"]
INSTANCES = ["a", "b", "c"]
ADDRESSES = ["10.0.0.1:1", "10.0.0.2:2", "[::1]:3"]
EXPIRY = 5.0


@dataclass
class Model:
    """Last accepted beacon per node, by the rules in the core's docstring."""

    beacon: Beacon
    at: float
    state: str


beacon_ops = st.tuples(
    st.just("beacon"),
    st.sampled_from([0.0, 0.3, 1.0, 2.5, 5.0, 7.0]),
    st.builds(
        Beacon,
        node=st.sampled_from(NODES),
        incarnation=st.integers(0, 4),
        instance=st.sampled_from(INSTANCES),
        address=st.sampled_from(ADDRESSES),
        zone=st.sampled_from(["z1", "z2"]),
        weight=st.sampled_from([1.0, 2.0]),
        leaving=st.sampled_from([False, False, False, False, True]),
    ),
)
tick_ops = st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 3.0, 6.0]), st.none())
junk_ops = st.tuples(st.just("junk"), st.just(0.0), st.binary(max_size=40))
# Mostly beacons, some ticks, a little junk.
any_op = st.integers(0, 9).flatmap(lambda i: beacon_ops if i < 7 else tick_ops if i < 9 else junk_ops)
histories = st.lists(any_op, min_size=20, max_size=80)

# Allowed state changes as seen through events: a subscriber that only follows
# events must always agree with the table.
_TRANSITIONS: dict[str, tuple[set[str | None], str]] = {
    NODE_DISCOVERED: ({None, "lost", "left"}, "alive"),
    NODE_UPDATED: ({"alive"}, "alive"),
    NODE_LOST: ({"alive"}, "lost"),
    NODE_LEFT: ({None, "alive", "lost"}, "left"),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories)
def test_table_matches_the_last_valid_beacon_per_node(history: list[tuple[str, float, Any]]) -> None:
    table = DiscoveryTable(DiscoveryConfig(beacon_interval=1.0, expiry=EXPIRY, forget_after=1e9))
    model: dict[str, Model] = {}
    followed: dict[str, str | None] = {}
    highest: dict[str, int] = {}
    now = 0.0
    offered = 0
    for op, dt, arg in history:
        now += dt
        if op == "beacon":
            offered += 1
            b: Beacon = arg
            m = model.get(b.node)
            live = m is not None and m.state != "left" and now - m.at < EXPIRY
            valid = (
                m is None
                or b.incarnation > m.beacon.incarnation
                or (b.incarnation == m.beacon.incarnation and (b.instance == m.beacon.instance or not live))
            )
            events = table.observe(b, now)
            if valid:
                model[b.node] = Model(b, now, "left" if b.leaving else "alive")
        elif op == "tick":
            events = table.tick(now)
            for m in model.values():
                if m.state == "alive" and now - m.at >= EXPIRY:
                    m.state = "lost"
        else:
            offered += 1
            events = table.receive(arg, now)

        for event in events:
            node = event.data["node"]
            assert event.data["reason"]
            if event.kind == NODE_CONFLICT:
                assert event.data["kept"]["instance"] == table.node(node, now)["instance"]
                continue
            before, after = _TRANSITIONS[event.kind]
            assert followed.get(node) in before, (event, followed.get(node))
            followed[node] = after

        assert {r["id"] for r in table.nodes(now)} == set(model)
        for node, m in model.items():
            row = table.node(node, now)
            expect = (
                m.beacon.address,
                m.beacon.zone,
                m.beacon.weight,
                m.beacon.incarnation,
                m.beacon.instance,
                m.state,
            )
            assert (
                row["address"],
                row["zone"],
                row["weight"],
                row["incarnation"],
                row["instance"],
                row["state"],
            ) == expect
            assert row["state"] == followed[node]
            # An older incarnation never overrides a newer one.
            assert row["incarnation"] >= highest.get(node, 0)
            highest[node] = row["incarnation"]
        stats = table.stats()
        assert stats["beacons"] == offered == stats["accepted"] + stats["dropped_total"]
