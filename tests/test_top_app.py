"""phantom-top's app, headless (Textual's run_test and pilot) with a fake feed; its feed
against in-process sockets; its command line without a cluster."""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import pytest
import zmq
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from phantom_bus import protocol
from phantom_bus.errors import BrokerUnreachable, ServiceUnavailable
from services.top import app as topapp
from services.top.app import ConfirmDrain, HelpScreen, NodeDetails, PhantomTop, SortChooser
from services.top.feed import BusFeed, Sink
from tests.conftest import free_port, wait_until
from tests.test_top_model import SAMPLE, SAMPLE_SHARDS, SAMPLE_SNAPSHOT

SIZE = (120, 36)

EVENTS: list[dict[str, Any]] = [
    {"kind": "member.suspect", "ts": 36000.0, "service": "membership", "node": "node-2",
     "reason": "phi 8.1 > 8.0", "previous": "alive"},
    {"kind": "member.dead", "ts": 36004.0, "service": "membership", "node": "node-10",
     "reason": "phi 16.0 > 12.0", "previous": "suspect"},
    {"kind": "shardmap.changed", "ts": 36005.0, "service": "sharding", "epoch": 7, "reason": "node.dead"},
    {"kind": "member.load", "ts": 36006.0, "service": "membership", "loads": {}},
]  # fmt: skip


class FakeFeed:
    """Stands in for BusFeed: the test decides what arrives and when."""

    endpoint = "tcp://127.0.0.1:5555"

    def __init__(self, doc: Any = None, events: list[dict[str, Any]] | None = None) -> None:
        self.sink: Sink | None = None
        self.initial, self.initial_events = doc, events
        self.shards_wanted: list[bool] = []
        self.polls = 0
        self.drained: list[str] = []
        self.drain_error: Exception | None = None
        self.stopped = False

    def start(self, sink: Sink) -> None:
        self.sink = sink
        if self.initial is not None:
            sink.status(self.initial)
        if self.initial_events:
            sink.events(self.initial_events)

    def stop(self) -> None:
        self.stopped = True

    def want_shards(self, on: bool) -> None:
        self.shards_wanted.append(on)

    def poll_now(self) -> None:
        self.polls += 1

    def drain(self, node: str) -> Any:
        self.drained.append(node)
        if self.drain_error is not None:
            raise self.drain_error
        return {"node": node, "lifecycle": "draining"}

    # test helpers
    def push(self, doc: Any) -> None:
        assert self.sink is not None
        self.sink.status(doc)


def make_app(doc: Any = SAMPLE, events: list[dict[str, Any]] | None = None) -> tuple[PhantomTop, FakeFeed]:
    feed = FakeFeed(copy.deepcopy(doc), events)
    return PhantomTop(feed, tz=UTC), feed


@contextlib.asynccontextmanager
async def running(
    doc: Any = SAMPLE, events: list[dict[str, Any]] | None = None
) -> AsyncIterator[tuple[PhantomTop, FakeFeed, Pilot[None]]]:
    """:func:`make_app` running headless at SIZE, past its first refresh."""
    app, feed = make_app(doc, events)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        yield app, feed, pilot


def nodes_table(app: PhantomTop) -> DataTable[Any]:
    return app.query_one("#nodes", DataTable)


def column(table: DataTable[Any], key: str) -> list[str]:
    return [str(c) for c in table.get_column(key)]


def static_text(app: PhantomTop, selector: str) -> str:
    content = app.query_one(selector, Static).render()
    return str(content)


# --- the tables ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_table_fills_from_a_status_document():
    async with running() as (app, _, _pilot):
        table = nodes_table(app)
        assert table.row_count == 5
        assert column(table, "id") == ["node-1", "node-2", "node-3", "node-4", "node-10"]
        assert column(table, "replicas") == ["22", "21", "21", "-", "0"]
        assert column(table, "heartbeat_age") == ["0.4s", "4.8s", "0.2s", "-", "42s"]
        assert column(table, "cpu")[0].startswith(" 12.5 ")  # value, then its sparkline
        header = static_text(app, "#header")
        assert "YELLOW" in header and "epoch 7" in header and "nodes 5: 2 alive 1 suspect 1 dead 1 left" in header
        assert "64 total  2 under-replicated  0 unavailable" in header and "selects/s 1520.0" in header


@pytest.mark.asyncio
async def test_state_cells_are_coloured_by_state():
    async with running() as (app, _, _pilot):
        table = nodes_table(app)
        styles = {}
        for key in ("node-1", "node-2", "node-10", "node-4"):
            cell = table.get_cell(key, "state")
            assert isinstance(cell, Text)
            styles[cell.plain] = str(cell.style)
        assert styles == {"alive": "green", "suspect": "yellow", "dead": "red", "left": "grey50"}


@pytest.mark.asyncio
async def test_table_follows_new_documents_and_keeps_the_selected_node():
    async with running() as (app, feed, pilot):
        await pilot.press("down", "down")  # node-3
        assert app.selected_node().id == "node-3"  # type: ignore[union-attr]
        doc = copy.deepcopy(SAMPLE)
        doc["nodes"].insert(0, {"id": "node-0", "state": "alive"})
        doc["nodes"][4]["cpu"] = 99.0  # node-3
        feed.push(doc)
        await pilot.pause()
        table = nodes_table(app)
        assert column(table, "id")[0] == "node-0"
        assert app.selected_node().id == "node-3"  # type: ignore[union-attr]
        assert str(table.get_cell("node-3", "cpu").style) == "red"


@pytest.mark.asyncio
async def test_sort_key_is_chosen_from_the_columns_and_r_reverses():
    async with running() as (app, _, pilot):
        await pilot.press("s")
        assert isinstance(app.screen, SortChooser)
        await pilot.press("down", "enter")  # from NODE to STATE
        assert app.sort_key["nodes"] == "state"
        assert column(nodes_table(app), "state") == ["dead", "suspect", "alive", "alive", "left"]
        await pilot.press("s", "down", "down", "down", "enter")  # lifecycle, zone, cpu
        assert app.sort_key["nodes"] == "cpu"
        assert column(nodes_table(app), "id") == ["node-1", "node-3", "node-2", "node-4", "node-10"]
        await pilot.press("r")
        assert column(nodes_table(app), "id") == ["node-2", "node-3", "node-1", "node-4", "node-10"]
        labels = [str(c.label) for c in nodes_table(app).columns.values()]
        assert "CPU% ▼" in labels


@pytest.mark.asyncio
async def test_filter_narrows_rows_and_escape_clears_it():
    async with running() as (app, _, pilot):
        await pilot.press("slash", *"z1")
        assert column(nodes_table(app), "id") == ["node-1", "node-10"]
        await pilot.press("enter")  # keeps the filter, back to the table
        assert nodes_table(app).has_focus
        assert "filter: z1" in static_text(app, "#header")
        await pilot.press("slash", "escape")
        await pilot.pause()
        assert nodes_table(app).row_count == 5
        assert app.filter_text == ""


@pytest.mark.asyncio
async def test_keys_typed_into_the_filter_are_text_not_commands():
    async with running() as (app, _, pilot):
        await pilot.press("slash", *"state:dead", "q", "p")
        assert app.is_running and not app.paused
        assert app.filter_text == "state:deadqp"
        assert nodes_table(app).row_count == 0


@pytest.mark.asyncio
async def test_pause_stops_updates_and_resume_shows_the_latest():
    async with running() as (app, feed, pilot):
        await pilot.press("p")
        assert "PAUSED" in static_text(app, "#header")
        for n in (1, 2):
            doc = copy.deepcopy(SAMPLE)
            doc["nodes"] = [{"id": f"new-{n}", "state": "alive"}]
            feed.push(doc)
        assert feed.sink is not None
        feed.sink.events(EVENTS)
        await pilot.pause()
        assert nodes_table(app).row_count == 5
        assert "no events yet" in static_text(app, "#events")
        await pilot.press("p")
        assert column(nodes_table(app), "id") == ["new-2"]
        assert "member.dead" in static_text(app, "#events")
        assert "PAUSED" not in static_text(app, "#header")


# --- drain --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_drain_asks_for_confirmation_then_sends_the_request():
    async with running() as (app, feed, pilot):
        await pilot.press("down", "d")
        assert isinstance(app.screen, ConfirmDrain)
        assert app.screen.node == "node-2"
        assert feed.drained == []
        await pilot.press("y")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert feed.drained == ["node-2"]
        assert [n.message for n in app._notifications] == ["draining node-2"]
        assert feed.polls == 1


@pytest.mark.asyncio
async def test_drain_cancelled_sends_nothing():
    async with running() as (app, feed, pilot):
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmDrain)
        await pilot.press("enter")  # the focused button is Cancel
        await pilot.press("d", "escape", "d", "n")
        await app.workers.wait_for_complete()
        assert not isinstance(app.screen, ConfirmDrain)
        assert feed.drained == []


@pytest.mark.asyncio
async def test_view_keys_do_nothing_while_a_dialog_is_open():
    async with running() as (app, feed, pilot):
        await pilot.press("d")
        dialog = app.screen
        await pilot.press("tab", "d", "s", "p")
        assert app.screen is dialog and len(app.screen_stack) == 2
        assert (app.view, app.sort_key["nodes"], app.paused) == ("nodes", "id", False)
        assert feed.shards_wanted == []


@pytest.mark.asyncio
async def test_clicking_a_column_heading_sorts_by_it_and_again_reverses():
    async with running() as (app, _, pilot):
        table = nodes_table(app)
        cpu = table.get_column_index("cpu")
        table.post_message(DataTable.HeaderSelected(table, list(table.columns)[cpu], cpu, Text("CPU%")))
        await pilot.pause()
        assert (app.sort_key["nodes"], app.reverse["nodes"]) == ("cpu", False)
        table.post_message(DataTable.HeaderSelected(table, list(table.columns)[cpu], cpu, Text("CPU%")))
        await pilot.pause()
        assert app.reverse["nodes"]
        assert column(table, "id")[0] == "node-2"


@pytest.mark.asyncio
async def test_drain_failure_is_a_notification_not_a_crash():
    app, feed = make_app()
    feed.drain_error = ServiceUnavailable("no worker for service 'manager'")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("d", "y")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.is_running
        (note,) = app._notifications
        assert note.severity == "error" and "service_unavailable" in note.message


# --- trouble and odd input ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_unreachable_broker_shows_a_banner_that_goes_away_on_recovery():
    async with running() as (app, feed, pilot):
        banner = app.query_one("#banner", Static)
        assert not banner.display
        assert feed.sink is not None
        feed.sink.trouble("the broker at tcp://127.0.0.1:5555 does not answer; retrying every 1 s")
        await pilot.pause()
        assert banner.display
        assert "does not answer" in static_text(app, "#banner")
        assert nodes_table(app).row_count == 5  # the last known state stays on screen
        feed.push(SAMPLE)
        await pilot.pause()
        assert not banner.display


@pytest.mark.asyncio
async def test_malformed_documents_never_crash_the_app():
    async with running(doc=None) as (app, feed, pilot):
        assert "waiting for status" in static_text(app, "#header")
        weird: list[Any] = [
            {},
            {"nodes": "none"},
            {"nodes": [None, 1, {"id": {"x": 1}, "state": ["alive"], "cpu": "hot"}, {"id": "[/red]", "cpu": 1e308}]},
            {"health": 3, "epoch": [], "shards": [], "services": {"x": {"workers": 1}}, "moves_in_flight": "a"},
            [],
            "red",
        ]
        for doc in weird:
            feed.push(doc)
            await pilot.pause()
        assert feed.sink is not None
        feed.sink.events([{"kind": 5}, {"kind": "member.dead", "ts": "soon", "node": {"a": 1}}, {}])
        feed.sink.shards({"weird": True}, None)
        await pilot.press("tab", "s", "r", "tab", "s", "enter", "escape", "d", "escape")
        await pilot.pause()
        assert app.is_running
        assert "UNKNOWN" in static_text(app, "#header")


# --- the other views ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tab_shows_shards_with_their_roles_and_asks_the_feed_for_them():
    async with running() as (app, feed, pilot):
        await pilot.press("tab")
        assert feed.shards_wanted == [True] and feed.polls == 1
        assert "waiting for the shard list" in static_text(app, "#shards-message")
        assert feed.sink is not None
        feed.sink.shards(SAMPLE_SHARDS, None)
        await pilot.pause()
        table = app.query_one("#shard-table", DataTable)
        assert column(table, "shard") == ["s2", "s10", "u1"]
        assert column(table, "replicas")[0] == "node-1:P node-2:R node-3:J"
        assert str(table.get_cell("default/s2", "state").style) == "cyan"  # moving
        assert not app.query_one("#shards-message", Static).display
        await pilot.press("tab")
        assert feed.shards_wanted == [True, False]
        assert nodes_table(app).has_focus


@pytest.mark.asyncio
async def test_shards_view_says_so_when_the_sharding_service_is_down():
    app, feed = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("tab")
        assert feed.sink is not None
        feed.sink.shards(SAMPLE_SHARDS, None)
        feed.sink.shards(None, "the sharding service did not answer: service_unavailable: no worker")
        await pilot.pause()
        assert "service_unavailable" in static_text(app, "#shards-message")
        assert app.query_one("#shard-table", DataTable).row_count == 3  # last known list kept


@pytest.mark.asyncio
async def test_events_pane_shows_the_latest_events_newest_first():
    async with running(events=EVENTS) as (app, _, _pilot):
        lines = static_text(app, "#events").splitlines()
        assert lines[0].startswith("10:00:05  shardmap.changed")
        assert lines[1] == "10:00:04  member.dead         node-10  phi 16.0 > 12.0  previous=suspect"
        assert len(lines) == 3  # member.load is not shown


@pytest.mark.asyncio
async def test_enter_opens_the_details_of_the_selected_node():
    async with running(events=EVENTS) as (app, _, pilot):
        await pilot.press("down", "enter")
        assert isinstance(app.screen, NodeDetails)
        assert app.screen.row.id == "node-2"
        body_widget = app.screen.query_one("#details-body", Static)
        body = str(body_widget.render())
        assert "127.0.0.1:7002" in body and "member.suspect" in body and "incarnation" in body
        # Shown, not only built: the dialog has room for its fields.
        assert body_widget.region.height > 10 and body_widget.region.width > 40
        assert footer_keys(app) == ["Close"]
        await pilot.press("escape")
        assert not isinstance(app.screen, NodeDetails)


def footer_keys(app: PhantomTop) -> list[str]:
    """What the footer of the screen on top offers."""
    return [b.binding.description for b in app.screen.active_bindings.values() if b.binding.show and b.enabled]


@pytest.mark.asyncio
async def test_footer_follows_the_view_and_the_dialog():
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        nodes = footer_keys(app)
        assert {"Details", "Drain", "Shards"} <= set(nodes) and "Nodes" not in nodes
        await pilot.press("tab")
        shards = footer_keys(app)
        assert "Nodes" in shards and not {"Details", "Drain", "Shards"} & set(shards)
        await pilot.press("s")
        assert footer_keys(app) == ["Cancel"]


@pytest.mark.asyncio
async def test_header_says_stale_when_the_broker_is_down_and_rows_dim():
    async with running() as (app, feed, pilot):
        assert feed.sink is not None
        feed.sink.trouble("the broker at tcp://127.0.0.1:5555 does not answer")
        await pilot.pause()
        header = static_text(app, "#header")
        assert "STALE" in header and "last known health yellow" in header
        assert "YELLOW" not in header and "broker up" not in header
        assert str(nodes_table(app).get_cell("node-1", "id").style) == "dim"
        feed.push(copy.deepcopy(SAMPLE))
        await pilot.pause()
        assert "YELLOW" in static_text(app, "#header")
        assert str(nodes_table(app).get_cell("node-1", "id").style) == ""


@pytest.mark.asyncio
async def test_question_mark_shows_help_and_q_quits():
    app, feed = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "q")
        await pilot.pause()
        assert not app.is_running
    assert feed.stopped


def test_snapshot_of_a_fixed_status_document(snap_compare):
    app, _ = make_app(events=EVENTS)
    assert snap_compare(app, terminal_size=SIZE)


def test_snapshot_at_80x24_keeps_the_footer_and_hb_age(snap_compare):
    app, _ = make_app(events=EVENTS)
    assert snap_compare(app, terminal_size=(80, 24))


# --- the feed, with in-process sockets and a fake client -----------------------------------


class Collect:
    """A sink that records what it is given."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []
        self.changed = threading.Event()

    def status(self, doc: dict[str, Any]) -> None:
        self.got.append(("status", doc))

    def shards(self, rows: Any, error: str | None) -> None:
        self.got.append(("shards", error or rows))

    def events(self, events: list[dict[str, Any]]) -> None:
        self.got.append(("events", events))

    def trouble(self, message: str) -> None:
        self.got.append(("trouble", message))


class ScriptedClient:
    """Answers status() and request() from a script of results and exceptions."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)

    def _next(self) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def status(self) -> Any:
        return self._next()

    def request(self, service: str, op: str, **args: Any) -> Any:
        return self._next()


def test_feed_reports_trouble_then_recovers_and_fetches_shards_when_wanted():
    feed = BusFeed("tcp://127.0.0.1:1", None)
    sink = Collect()
    client: Any = ScriptedClient(
        BrokerUnreachable("the broker at x does not answer"),
        ValueError("garbled"),
        {"health": "green"},
        {"health": "green"},
        SAMPLE_SHARDS,
        {"health": "green"},
        ServiceUnavailable("no worker"),
    )
    feed.poll_once(client, sink)
    feed.poll_once(client, sink)
    feed.poll_once(client, sink)
    feed.want_shards(True)
    feed.poll_once(client, sink)
    feed.poll_once(client, sink)
    kinds = [k for k, _ in sink.got]
    assert kinds == ["trouble", "trouble", "status", "status", "shards", "status", "shards"]
    assert "does not answer; retrying every 1 s" in sink.got[0][1]
    assert "ValueError: garbled" in sink.got[1][1]
    assert sink.got[4][1] == SAMPLE_SHARDS
    assert "service_unavailable" in sink.got[6][1]


def test_feed_threads_poll_and_listen_and_stop():
    ctx: zmq.Context[Any] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("inproc://events")
    polls = threading.Semaphore(0)

    class CountingClient(ScriptedClient):
        def status(self) -> Any:
            polls.release()
            return {"health": "green"}

        def close(self) -> None:
            pass

    factory: Any = lambda *a, **k: CountingClient()  # noqa: E731
    feed = BusFeed("tcp://127.0.0.1:1", "inproc://events", interval=0.01, client_factory=factory, ctx=ctx)
    sink = Collect()
    feed.start(sink)
    try:
        for _ in range(3):
            assert polls.acquire(timeout=10)

        def delivered() -> list[dict[str, Any]]:
            # A SUB socket misses what is published before its subscription lands: keep publishing.
            pub.send_multipart([b"member.dead", b"PHX9", b"garbage"])
            pub.send_multipart(protocol.encode_event("member.dead", {"node": "n1"}, source="membership", ts=1.0))
            return [e for k, v in list(sink.got) if k == "events" for e in v]

        got = wait_until(delivered, timeout=10)
        assert got[0]["kind"] == "member.dead" and got[0]["node"] == "n1"
    finally:
        feed.stop()
        feed.join()
        pub.close(0)
        ctx.term()
    assert not any(t.is_alive() for t in feed._threads)


# --- the command line -----------------------------------------------------------------------


def test_once_prints_the_plain_snapshot(monkeypatch, capsys):
    monkeypatch.setattr(topapp, "fetch_status", lambda endpoint, timeout: copy.deepcopy(SAMPLE))
    assert topapp.main(["--once", "--broker", "tcp://127.0.0.1:5555"]) == 0
    assert capsys.readouterr().out == SAMPLE_SNAPSHOT


def test_json_prints_the_status_document(monkeypatch, capsys):
    monkeypatch.setattr(topapp, "fetch_status", lambda endpoint, timeout: copy.deepcopy(SAMPLE))
    assert topapp.main(["--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out) == SAMPLE


def test_stdout_that_is_not_a_terminal_gets_the_snapshot(monkeypatch, capsys):
    monkeypatch.setattr(topapp, "fetch_status", lambda endpoint, timeout: copy.deepcopy(SAMPLE))
    monkeypatch.setattr(topapp, "PhantomTop", None)  # would fail if the app were started
    assert topapp.main([]) == 0  # capsys's stdout is not a TTY
    assert capsys.readouterr().out.startswith("phantom-top  tcp://")


def test_unreachable_broker_exits_69_with_one_line(capsys):
    started = time.monotonic()
    code = topapp.main(["--once", "--broker", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3"])
    out, err = capsys.readouterr()
    assert code == 69 and out == ""
    assert len(err.strip().splitlines()) == 1 and "does not answer" in err
    assert time.monotonic() - started < 30  # generous: it is about a second


def test_bad_settings_exit_2(capsys):
    assert topapp.main(["--once", "--broker", "nonsense"]) == 2
    assert "broker" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_header_shows_the_leaders_and_instances_of_the_control_plane():
    control = {"store": "etcd", "leaders": {"sharding": {"instance": "h2", "term": 7}},
               "instances": {"broker": ["h1", "h2", "h3"], "sharding": ["h1", "h3"]}}  # fmt: skip
    async with running({**SAMPLE, "control": control}) as (app, _, _pilot):
        header = static_text(app, "#header")
        assert "control etcd" in header and "sharding h2 t7" in header and "sharding 2 (no h2)" in header
        assert "nodes 5: 2 alive" in header  # the other lines are still there
