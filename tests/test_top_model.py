"""phantom-top's model: status documents, shard lists and events -> rows and text. No I/O."""

from __future__ import annotations

import math
from datetime import UTC
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.top import model
from services.top.model import (
    NODE_COLUMNS,
    SHARD_COLUMNS,
    EventLog,
    History,
    fmt_age,
    node_matches,
    number,
    parse_status,
    render_snapshot,
    shard_matches,
    shard_rows,
    sort_rows,
    sparkline,
    text,
)

SERVICES = {n: "up" for n in ("broker", "discovery", "membership", "sharding", "balancer", "manager")}

#: A fixed status document with nodes in every state; the app tests and the snapshot use it too.
SAMPLE: dict[str, Any] = {
    "health": "yellow",
    "reason": "2 shards under-replicated",
    "epoch": 7,
    "nodes": [
        {"id": "node-1", "state": "alive", "lifecycle": "active", "address": "127.0.0.1:7001", "zone": "z1",
         "cpu": 12.5, "mem": 41.0, "load": 0.42, "replicas": 22, "primaries": 11, "inflight": 3,
         "p99_ms": 4.2, "select_rate": 310.5, "heartbeat_age": 0.4, "phi": 0.1, "incarnation": 3},
        {"id": "node-2", "state": "suspect", "lifecycle": "active", "address": "127.0.0.1:7002", "zone": "z2",
         "cpu": 93.0, "mem": 77.5, "load": 2.1, "replicas": 21, "primaries": 10, "inflight": 9,
         "p99_ms": 48.0, "select_rate": 120.0, "heartbeat_age": 4.8, "phi": 6.1, "incarnation": 5},
        {"id": "node-10", "state": "dead", "lifecycle": "active", "address": "127.0.0.1:7010", "zone": "z1",
         "cpu": None, "mem": None, "replicas": 0, "primaries": 0, "heartbeat_age": 42.0, "phi": 16.0},
        {"id": "node-3", "state": "alive", "lifecycle": "draining", "address": "127.0.0.1:7003", "zone": "z3",
         "cpu": 55.0, "mem": 30.2, "load": 0.9, "replicas": 21, "primaries": 11, "inflight": 1,
         "p99_ms": 6.5, "select_rate": 89.5, "heartbeat_age": 0.2},
        {"id": "node-4", "state": "left", "lifecycle": "decommissioned", "address": "127.0.0.1:7004",
         "zone": "z2"},
    ],
    "shards": {"total": 64, "under_replicated": 2, "unavailable": 0},
    "services": SERVICES,
    "moves_in_flight": 1,
    "selects_per_s": 1520.0,
}  # fmt: skip

SAMPLE_SHARDS: list[dict[str, Any]] = [
    {"keyspace": "default", "shard": "s10", "range": "slots 640-703", "replicas": ["node-3", "node-1"],
     "primary": "node-3", "state": "active"},
    {"keyspace": "default", "shard": "s2", "range": "slots 128-191", "replicas": ["node-1", "node-2", "node-3"],
     "primary": "node-1", "state": "moving", "roles": {"node-3": "joining"}, "select_rate": 12.0},
    {"keyspace": "users", "shard": "u1", "range": ["a", None], "replicas": [{"node": "node-2", "role": "primary"}],
     "primary": "node-2", "state": "active"},
]  # fmt: skip

SAMPLE_SNAPSHOT = """\
phantom-top  tcp://127.0.0.1:5555
health: yellow (2 shards under-replicated)
epoch: 7
nodes: 5 (2 alive, 1 suspect, 1 dead, 1 left)
shards: 64 total, 2 under-replicated, 0 unavailable
moves in flight: 1   selects/s: 1520.0
services: broker up  discovery up  membership up  sharding up  balancer up  manager up

NODE     STATE    LIFECYCLE       ZONE  ADDRESS         CPU%  MEM%  LOAD  REPL  PRIM  INFL  P99 MS  SEL/S  HB AGE
node-1   alive    active          z1    127.0.0.1:7001  12.5  41.0  0.42    22    11     3     4.2  310.5    0.4s
node-2   suspect  active          z2    127.0.0.1:7002  93.0  77.5  2.10    21    10     9    48.0  120.0    4.8s
node-3   alive    draining        z3    127.0.0.1:7003  55.0  30.2  0.90    21    11     1     6.5   89.5    0.2s
node-4   left     decommissioned  z2    127.0.0.1:7004     -     -     -     -     -     -       -      -       -
node-10  dead     active          z1    127.0.0.1:7010     -     -     -     0     0     -       -      -     42s
"""


def ids(rows: list[Any]) -> list[str | None]:
    return [r.id if hasattr(r, "id") else r.shard for r in rows]


# --- coercion -----------------------------------------------------------------------------


def test_number_accepts_numbers_and_numeric_strings_only():
    assert number(3) == 3.0
    assert number(2.5) == 2.5
    assert number(" 12.5 ") == 12.5
    bad: Any
    for bad in (True, False, None, "x", [], {}, b"1", math.nan, math.inf, "nan", 10**400):
        assert number(bad) is None, bad


def test_text_is_one_printable_line_and_bounded():
    assert text("node-1") == "node-1"
    assert text("a\nb\x1bc") == "a?b?c"
    assert text(7) == "7"
    assert text(7.0) == "7"
    assert text(True) == "true"
    assert text("") is None
    assert text([1, 2]) is None
    assert text({"a": 1}) is None
    long = text("x" * 100, limit=10)
    assert long is not None and len(long) == 10 and long.endswith("…")


def test_age_is_short_and_never_negative():
    assert [fmt_age(v) for v in (None, -1.0, 0.44, 12.4, 150.0, 7300.0, 200000.0)] == [
        "-", "0.0s", "0.4s", "12s", "2m", "2h", "2d",
    ]  # fmt: skip


def test_clock_formats_in_the_given_zone_and_survives_bad_times():
    assert model.clock(0.0, UTC) == "00:00:00"
    assert model.clock(3723.0, UTC) == "01:02:03"
    assert model.clock(None) == "--:--:--"
    assert model.clock(1e300, UTC) == "--:--:--"


def test_natural_key_orders_numbers_inside_ids():
    assert sorted(["node-10", "node-2", "node-1"], key=model.natural_key) == ["node-1", "node-2", "node-10"]


# --- status documents ------------------------------------------------------------------------


def test_header_counts_states_and_reads_shard_totals():
    h = parse_status(SAMPLE).header
    assert (h.health, h.epoch, h.reason) == ("yellow", "7", "2 shards under-replicated")
    assert (h.alive, h.suspect, h.dead, h.left, h.nodes) == (2, 1, 1, 1, 5)
    assert (h.shards_total, h.under_replicated, h.unavailable) == (64, 2, 0)
    assert (h.moves_in_flight, h.selects_per_s) == (1, 1520.0)
    assert dict(h.services) == SERVICES


def test_selects_per_second_falls_back_to_the_sum_of_node_rates():
    doc = {k: v for k, v in SAMPLE.items() if k != "selects_per_s"}
    assert parse_status(doc).header.selects_per_s == 310.5 + 120.0 + 89.5
    assert parse_status({"nodes": [{"id": "a"}]}).header.selects_per_s is None


def test_moves_in_flight_may_be_a_list_of_moves():
    assert parse_status({"moves_in_flight": [{"shard": "s1"}, {"shard": "s2"}]}).header.moves_in_flight == 2


def test_node_fields_are_read_with_aliases_and_missing_ones_are_none():
    row = model.node_row({"id": "n", "in_flight": 4, "last_heartbeat_age": 1.5, "cpu": "bad"}, "n")
    assert (row.inflight, row.heartbeat_age, row.cpu, row.zone) == (4, 1.5, None, None)


def test_duplicate_and_malformed_node_entries_still_get_unique_keys():
    rows = model.node_rows([{"id": "a"}, "junk", {"id": "a"}, {}, {"id": None}, 3])
    assert [r.key for r in rows] == ["a", "a#2", "?", "?#2"]


def test_a_document_that_is_not_a_map_gives_an_empty_status():
    doc: Any
    for doc in (None, [], "red", 3, {"nodes": {"a": 1}, "shards": [1], "services": "up"}):
        st_ = parse_status(doc)
        assert st_.nodes == ()
        assert st_.header.shards_total is None


def test_header_segments_colour_health_and_nonzero_problem_counts():
    line1, line2, line3 = model.header_segments(parse_status(SAMPLE).header)
    assert line1[0] == (" YELLOW ", model.HEALTH_STYLES["yellow"])
    assert ("1 dead", "red") in line1
    assert ("1 suspect", "yellow") in line1
    assert (" │ 2 shards under-replicated", "italic") in line1
    assert ("2 under-replicated  ", "yellow") in line2
    assert ("up  ", "green") in line3
    empty1, _, empty3 = model.header_segments(parse_status({}).header)
    assert empty1[0] == (" UNKNOWN ", "reverse")
    assert ("0 dead", "dim") in empty1
    assert empty3 == [("services ", "dim"), ("-", "")]


# --- sorting and filtering -------------------------------------------------------------------


def test_default_order_is_natural_by_id():
    assert ids(sort_rows(parse_status(SAMPLE).nodes, "id")) == ["node-1", "node-2", "node-3", "node-4", "node-10"]


def test_sort_by_number_puts_missing_values_last_in_both_directions():
    rows = parse_status(SAMPLE).nodes
    assert ids(sort_rows(rows, "cpu")) == ["node-1", "node-3", "node-2", "node-4", "node-10"]
    assert ids(sort_rows(rows, "cpu", reverse=True)) == ["node-2", "node-3", "node-1", "node-4", "node-10"]


def test_sort_by_state_puts_trouble_first():
    rows = parse_status(SAMPLE).nodes
    assert [r.state for r in sort_rows(rows, "state")] == ["dead", "suspect", "alive", "alive", "left"]


def test_sort_ties_keep_natural_id_order():
    rows = parse_status(SAMPLE).nodes
    assert ids(sort_rows(rows, "zone")) == ["node-1", "node-10", "node-2", "node-4", "node-3"]


def test_next_column_cycles_through_every_column():
    keys = [c.key for c in NODE_COLUMNS]
    seen = ["id"]
    for _ in range(len(keys)):
        seen.append(model.next_column(NODE_COLUMNS, seen[-1]))
    assert seen[:-1] == keys and seen[-1] == "id"
    assert model.next_column(NODE_COLUMNS, "nonsense") == "id"


def test_filter_matches_words_in_any_field_or_in_a_named_field():
    rows = parse_status(SAMPLE).nodes
    assert ids(model.filter_rows(rows, "z1")) == ["node-1", "node-10"]
    assert ids(model.filter_rows(rows, "state:dead")) == ["node-10"]
    assert ids(model.filter_rows(rows, "ALIVE z3")) == ["node-3"]
    assert ids(model.filter_rows(rows, "lifecycle:drain")) == ["node-3"]
    assert model.filter_rows(rows, "nothing-like-this") == []
    assert len(model.filter_rows(rows, "   ")) == 5
    assert node_matches(rows[0], "address:7001")


# --- shards ----------------------------------------------------------------------------------


def test_shard_rows_carry_roles_from_primary_roles_map_or_replica_maps():
    rows = shard_rows(SAMPLE_SHARDS)
    assert [r.key for r in rows] == ["default/s2", "default/s10", "users/u1"]
    s2, s10, u1 = rows
    assert s2.replicas == (("node-1", "primary"), ("node-2", "replica"), ("node-3", "joining"))
    assert model.replicas_text(s2.replicas) == "node-1:P node-2:R node-3:J"
    assert s10.replicas == (("node-3", "primary"), ("node-1", "replica"))
    assert u1.replicas == (("node-2", "primary"),)
    assert u1.range == "[a, +inf)"
    assert s2.select_rate == 12.0 and s10.select_rate is None


def test_shard_rows_accept_a_map_holding_the_list_and_slot_pairs():
    rows = shard_rows({"shards": [{"shard": "s1", "slots": [[0, 64], [128, 192]], "replicas": "junk"}]})
    assert rows[0].range == "slots 0-63,128-191"
    assert rows[0].replicas == ()
    assert shard_rows("sharding down") == ()
    assert shard_rows([None, 1, {"id": "x"}])[0].shard == "x"


def test_shard_filter_looks_at_nodes_and_shard_ids():
    rows = shard_rows(SAMPLE_SHARDS)
    assert [r.shard for r in model.filter_rows(rows, "node-2", shard_matches)] == ["s2", "u1"]
    assert [r.shard for r in model.filter_rows(rows, "keyspace:users", shard_matches)] == ["u1"]
    assert [r.shard for r in model.filter_rows(rows, "moving", shard_matches)] == ["s2"]


def test_shards_sort_by_any_column():
    rows = shard_rows(SAMPLE_SHARDS)
    for col in SHARD_COLUMNS:
        assert len(sort_rows(rows, col.key, tiebreak="shard")) == 3
    assert [r.shard for r in sort_rows(rows, "select_rate", tiebreak="shard")] == ["s2", "s10", "u1"]


# --- events ----------------------------------------------------------------------------------


def test_only_cluster_member_shardmap_and_balancer_events_are_shown():
    assert model.wanted_event("member.suspect")
    assert model.wanted_event("cluster.health")
    assert model.wanted_event("shardmap.changed")
    assert model.wanted_event("balancer.ejected")
    assert not model.wanted_event("member.load")  # a periodic digest, not news
    assert not model.wanted_event("node.discovered")
    assert not model.wanted_event(None)


def test_event_line_has_time_kind_node_reason_and_other_fields():
    row = model.event_row(
        {"kind": "member.suspect", "ts": 3600.0, "service": "membership", "node": "node-2",
         "reason": "phi 8.1 > 8.0", "previous": "alive", "incarnation": 5, "phi": 8.1}
    )  # fmt: skip
    assert row is not None
    assert row.line(UTC) == "01:00:00  member.suspect      node-2  phi 8.1 > 8.0  incarnation=5 phi=8.1 previous=alive"
    assert model.event_style(row.kind) == "yellow"


def test_event_colour_follows_severity_not_the_event_family():
    green = model.event_row({"kind": "cluster.health", "ts": 1.0, "health": "green", "reason": "all fine"})
    red = model.event_row({"kind": "cluster.health", "ts": 2.0, "health": "red", "reason": "no primary"})
    dead = model.event_row({"kind": "member.dead", "ts": 3.0, "node": "n1"})
    assert green is not None and red is not None and dead is not None
    assert (green.severity, red.severity, dead.severity) == ("ok", "error", "error")
    assert model.event_style(green.kind, green.severity) == "green"
    assert model.event_style(red.kind, red.severity) == "bold red"
    assert model.event_style("shardmap.changed") == ""


def test_repeated_shardmap_ticks_fold_into_one_counted_line():
    log = EventLog()
    ticks = [{"kind": "shardmap.changed", "ts": float(i), "reason": "tick", "epoch": i} for i in range(12)]
    log.add([{"kind": "member.suspect", "ts": 0.0, "node": "n1"}, *ticks])
    rows = log.latest(5)
    assert [r.kind for r in rows] == ["member.suspect", "shardmap.changed"]
    assert rows[1].repeats == 12 and rows[1].ts == 11.0 and rows[1].line(UTC).endswith("(x12)")
    log.add([{"kind": "shardmap.changed", "ts": 20.0, "reason": "node.dead", "epoch": 20}])
    assert len(log.latest(5)) == 3  # another reason is news: its own line


def test_event_log_is_bounded_and_finds_events_about_a_node():
    log = EventLog(size=3)
    kept = log.add([{"kind": "member.dead", "node": f"n{i}", "ts": i} for i in range(5)] + [{"kind": "member.load"}])
    assert kept == 5
    assert len(log) == 3
    assert [r.node for r in log.latest(2)] == ["n3", "n4"]
    assert [r.node for r in log.about("n2")] == ["n2"]
    assert log.about("n0") == [] and log.about(None) == [] and log.latest(0) == []


# --- sparklines and history ------------------------------------------------------------------


def test_sparkline_scales_to_top_and_pads_gaps():
    assert sparkline([0.0, 50.0, 100.0], 3, top=100.0) == "▁▅█"
    assert sparkline([None, 2.0], 4) == "   █"
    assert sparkline([0.0, 0.0], 2) == "▁▁"
    assert sparkline([200.0], 1, top=100.0) == "█"
    assert sparkline([1.0, 2.0, 3.0], 2) == "▆█"
    assert sparkline([1.0], 0) == ""


def test_history_keeps_the_last_samples_and_forgets_gone_nodes():
    h = History(size=2)
    for cpu in (10.0, 20.0, 30.0):
        h.record([model.node_row({"id": "a", "cpu": cpu, "select_rate": cpu * 2}, "a")])
    assert h.cpu("a") == [20.0, 30.0]
    assert h.rate("a") == [40.0, 60.0]
    h.record([model.node_row({"id": "b"}, "b")])
    assert h.cpu("a") == [] and h.cpu("b") == [None]


# --- details and the snapshot ----------------------------------------------------------------


def test_details_list_every_field_of_the_node_entry():
    row = model.node_row({"id": "n", "cpu": 1.5, "load": {"cpu": 3}, "tags": None}, "n")
    assert model.details(row) == [("id", "n"), ("cpu", "1.5"), ("load", '{"cpu": 3}'), ("tags", "-")]


def test_snapshot_of_the_sample_document():
    assert render_snapshot(SAMPLE, "tcp://127.0.0.1:5555") == SAMPLE_SNAPSHOT


def test_snapshot_of_an_empty_document_shows_dashes():
    out = render_snapshot({})
    assert out.splitlines()[:3] == ["phantom-top", "health: unknown", "epoch: -"]
    assert "shards: - total, - under-replicated, - unavailable" in out
    assert out.endswith("no nodes\n")


# --- arbitrary documents never crash the model ------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELDS = [c.key for c in NODE_COLUMNS] + ["address", "phi", "incarnation", "in_flight", "last_heartbeat_age"]
odd_node = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8) | json_values
odd_status = st.fixed_dictionaries(
    {},
    optional={
        "health": json_values,
        "reason": json_values,
        "epoch": json_values,
        "nodes": st.lists(odd_node, max_size=6) | json_values,
        "shards": st.dictionaries(st.sampled_from(["total", "under_replicated", "unavailable"]), json_values)
        | json_values,
        "services": st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
        "control": st.dictionaries(st.sampled_from(["store", "leaders", "instances"]), json_values) | json_values,
        "moves_in_flight": json_values,
        "selects_per_s": json_values,
    },
)
odd_shard = st.dictionaries(
    st.sampled_from(["keyspace", "shard", "id", "range", "slots", "replicas", "primary", "state", "roles"]),
    json_values,
    max_size=7,
)


@settings(max_examples=300, deadline=None)
@given(doc=odd_status | json_values)
def test_any_status_document_renders_without_raising(doc):
    status = parse_status(doc)
    keys = [r.key for r in status.nodes]
    assert len(keys) == len(set(keys))
    out = render_snapshot(doc)
    assert out.endswith("\n") and "health:" in out
    model.header_segments(status.header)
    for col in NODE_COLUMNS:
        ordered = sort_rows(status.nodes, col.key, reverse=True)
        assert sorted(r.key for r in ordered) == sorted(keys)
        for row in ordered:
            cell = col.cell(row.get(col.key))
            assert cell and "\n" not in cell
    for row in status.nodes:
        model.details(row)
        node_matches(row, "state:alive z1")
    history = History()
    history.record(status.nodes)


@settings(max_examples=200, deadline=None)
@given(doc=st.lists(odd_shard | json_values, max_size=6) | json_values)
def test_any_shard_list_renders_without_raising(doc):
    rows = shard_rows(doc)
    assert len({r.key for r in rows}) == len(rows)
    for col in SHARD_COLUMNS:
        for row in sort_rows(rows, col.key, tiebreak="shard"):
            assert "\n" not in col.cell(row.get(col.key))
    model.filter_rows(rows, "node primary:x", shard_matches)


@settings(max_examples=200, deadline=None)
@given(
    doc=st.fixed_dictionaries(
        {"kind": st.sampled_from(["member.dead", "balancer.ejected", "cluster.x", "node.lost"]) | json_values},
        optional={"ts": json_values, "node": json_values, "reason": json_values, "extra": json_values},
    )
    | json_values
)
def test_any_event_body_is_shown_or_skipped_without_raising(doc):
    log = EventLog()
    log.add([doc])
    for row in log.latest(5):
        assert "\n" not in row.line(UTC)


CONTROL = {
    "store": "etcd",
    "leaders": {"sharding": {"instance": "h2", "term": 7}, "manager": {"instance": "h1", "term": 9},
                "membership": None},
    "instances": {"broker": ["h3", "h1", "h2"], "sharding": ["h1", "h3"], "manager": ["h1", "h2", "h3"],
                  "echo": ["box:42"]},
}  # fmt: skip


def test_control_line_shows_store_leaders_with_terms_and_a_host_short_of_an_instance():
    header = parse_status({**SAMPLE, "control": CONTROL}).header
    lines = model.header_segments(header)
    assert len(lines) == 4
    text = "".join(t for t, _ in lines[3])
    assert text.startswith("control etcd")
    assert "sharding h2 t7" in text and "manager h1 t9" in text and "membership none" in text
    assert "broker 3" in text and "sharding 2 (no h2)" in text and "echo 1  " in text  # HOST:PID names: no verdict
    styles = dict((t, style) for t, style in lines[3])
    assert styles["none  "] == "bold red" and styles[" (no h2)"] == "yellow"
    # Stale: the control line stays, marked as last seen.
    stale = model.header_segments(header, stale="broker not answering")
    assert "".join(t for t, _ in stale[3]).startswith("control: last seen etcd")
    # A document without a control part keeps the three lines.
    assert len(model.header_segments(parse_status(SAMPLE).header)) == 3


def test_snapshot_lists_leaders_and_instances_when_the_document_has_them():
    out = render_snapshot({**SAMPLE, "control": CONTROL})
    assert "control: store etcd; leaders sharding h2 (term 7), manager h1 (term 9), membership none" in out
    assert "instances: broker h1 h2 h3; sharding h1 h3; manager h1 h2 h3; echo box:42" in out
