"""phantom-top: the full-screen monitor (Textual) and its command line.

The app never talks to the bus itself: a :class:`~services.top.feed.Feed`
delivers status documents, shard lists and events from its own threads as
messages on the app's queue, and the one blocking action (drain) runs in a
thread worker. Tests pass a fake feed and drive the app with Textual's pilot.

``--once`` (or a stdout that is not a terminal) prints one plain snapshot and
exits; ``--json`` prints the status document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from datetime import tzinfo
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, ContentSwitcher, DataTable, Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from phantom_bus import config as cfgmod
from phantom_bus import security as secmod
from phantom_bus.errors import BrokerUnreachable, PhantomError
from services.top import model
from services.top.feed import BusFeed, Feed, fetch_status
from services.top.model import (
    COMPACT_COLUMNS,
    LIFECYCLE_STYLES,
    NODE_COLUMNS,
    SHARD_COLUMNS,
    SHARD_STYLES,
    STATE_STYLES,
    WIDE_ENOUGH,
    Column,
    EventLog,
    History,
    NodeRow,
    ShardRow,
    Status,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69

#: Width of the CPU and select-rate sparklines, in samples (one per poll).
SPARK_WIDTH = 6

HELP = """\
[b]phantom-top[/b]: the cluster, refreshed about once a second

  [b]q[/b]       quit
  [b]?[/b]       this help
  [b]/[/b]       filter rows: words, or field:word (state:dead zone:z1);
          enter keeps the filter, escape clears it
  [b]s[/b]       sort: choose the column      [b]r[/b]  reverse the order
          (or click a column heading; again reverses)
  [b]p[/b]       pause / resume updates
  [b]tab[/b]     switch between nodes and shards
  [b]enter[/b]   details of the selected node
  [b]d[/b]       drain the selected node (asks first)

Node states: [green]alive[/] [yellow]suspect[/] [red]dead[/] [grey50]left[/].
Shard roles: P primary, R replica, J joining, L leaving.
Sparklines show the last few samples of CPU (0-100 %) and select rate
(on a terminal at least 118 columns wide; narrower ones drop MEM%, LOAD,
INFL and P99 MS so that HB AGE stays in view). Dimmed rows: a node not
alive or not heard from for 5 s. STALE in the header: the broker does not
answer and everything shown is the last known state.

escape closes this window."""


# --- messages from the feed's threads ---------------------------------------------------


class StatusArrived(Message):
    """A status document from the feed."""

    def __init__(self, doc: Any) -> None:
        super().__init__()
        self.doc = doc


class ShardsArrived(Message):
    """A shard list (or why there is none) from the feed."""

    def __init__(self, rows: Any, error: str | None) -> None:
        super().__init__()
        self.rows = rows
        self.error = error


class EventsArrived(Message):
    """Bus events from the feed."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__()
        self.events = events


class FeedTrouble(Message):
    """The status could not be read."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message


class DrainDone(Message):
    """The drain request finished: ``error`` is ``None`` when it was accepted."""

    def __init__(self, node: str, error: str | None) -> None:
        super().__init__()
        self.node = node
        self.error = error


class AppSink:
    """Feed callbacks -> messages on the app's queue (``post_message`` is thread-safe)."""

    def __init__(self, app: App[Any]) -> None:
        self._app = app

    def _post(self, message: Message) -> None:
        with contextlib.suppress(RuntimeError):  # the app's event loop is closed: we are exiting
            self._app.post_message(message)

    def status(self, doc: dict[str, Any]) -> None:
        self._post(StatusArrived(doc))

    def shards(self, rows: Any, error: str | None) -> None:
        self._post(ShardsArrived(rows, error))

    def events(self, events: list[dict[str, Any]]) -> None:
        self._post(EventsArrived(events))

    def trouble(self, message: str) -> None:
        self._post(FeedTrouble(message))


# --- modal screens ------------------------------------------------------------------------


class HelpScreen(ModalScreen[None]):
    """The key list."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark,q", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help", classes="dialog")
        yield Footer()


class ConfirmDrain(ModalScreen[bool]):
    """Asks before draining a node; dismisses with True to go ahead."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Drain"),
        Binding("n,escape", "answer(False)", "Cancel"),
    ]
    AUTO_FOCUS = "#cancel"  # enter on a reflex keeps the node

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm"):
            yield Static(
                Text.assemble(
                    "Drain ",
                    (self.node, "bold"),
                    "?\n\nIts replicas move to other nodes, then it is decommissioned.\ny drains, n or escape cancels.",
                )
            )
            with Horizontal(id="buttons"):
                yield Button("Drain", variant="error", id="drain")
                yield Button("Cancel", variant="primary", id="cancel")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "drain")


class NodeDetails(ModalScreen[None]):
    """Everything the status document says about one node, its recent samples and events."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("enter,q", "dismiss", "Close", show=False),
    ]

    def __init__(self, row: NodeRow, cpu: list[float | None], rate: list[float | None], events: Text) -> None:
        super().__init__()
        self.row, self.cpu, self.rate, self.events = row, cpu, rate, events

    def compose(self) -> ComposeResult:
        body = Text()
        body.append(f"node {self.row.id or model.MISSING}\n\n", style="bold")
        for name, value in model.details(self.row):
            body.append(f"{name:<20}", style="dim")
            style = STATE_STYLES.get(value, "") if name == "state" else ""
            body.append(f"{value}\n", style=style)
        body.append("\ncpu history          ", style="dim")
        body.append(model.sparkline(self.cpu, len(self.cpu), top=100.0) or model.MISSING)
        body.append("\nselect rate history  ", style="dim")
        body.append(model.sparkline(self.rate, len(self.rate)) or model.MISSING)
        body.append("\n\nrecent events\n", style="bold")
        body.append_text(self.events if self.events.plain else Text("none seen since phantom-top started"))
        body.append("\n\nescape closes this window", style="dim")
        with VerticalScroll(classes="dialog", id="details"):
            yield Static(body, id="details-body")
        yield Footer()


class SortChooser(ModalScreen[str | None]):
    """Pick the column to sort by; dismisses with its key (``None``: cancelled)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("q", "cancel", "Cancel", show=False),
    ]

    def __init__(self, columns: Sequence[Column], current: str) -> None:
        super().__init__()
        self.columns, self.current = list(columns), current

    def compose(self) -> ComposeResult:
        options = OptionList(*(Option(c.heading, id=c.key) for c in self.columns), id="sort-options",
                             classes="dialog")
        options.border_title = "sort by"
        keys = [c.key for c in self.columns]
        options.highlighted = keys.index(self.current) if self.current in keys else 0
        yield options
        yield Footer()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class NodesTable(DataTable[Any]):
    """The nodes table; enter opens the details (the footer says so)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "Details")]


class FilterInput(Input):
    """The filter line: escape clears the filter and closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Clear filter")]

    class Cancelled(Message):
        """The user pressed escape."""

    def action_cancel(self) -> None:
        self.post_message(self.Cancelled())


# --- the app ------------------------------------------------------------------------------


class PhantomTop(App[None]):
    """The live cluster monitor."""

    TITLE = "phantom-top"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #banner { display: none; height: auto; background: $error; color: $text; padding: 0 1; }
    #banner.shown { display: block; }
    #header { height: auto; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    #main { height: 1fr; }
    #main DataTable { height: 1fr; }
    #shards-message { display: none; height: auto; padding: 0 1; color: $warning; }
    #shards-message.shown { display: block; }
    #events { height: 9; border-top: solid $primary; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    #filter { display: none; }
    #filter.shown { display: block; }
    ModalScreen { align: center middle; }
    .dialog { width: auto; max-width: 90%; height: auto; max-height: 90%;
              border: thick $primary; background: $surface; padding: 1 2; }
    #confirm { width: 60; }
    #details { width: 80; max-width: 95%; height: 90%; }
    #sort-options { width: 30; height: auto; }
    #buttons { height: auto; margin-top: 1; }
    #buttons Button { margin-right: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("s", "sort", "Sort"),
        Binding("r", "reverse", "Reverse", show=False),
        Binding("p", "pause", "Pause", show=False),
        # One key, two labels: the footer names the view tab switches to.
        Binding("tab", "show_view('shards')", "Shards", priority=True),
        Binding("tab", "show_view('nodes')", "Nodes", priority=True),
        Binding("enter", "details", "Details", show=False),
        Binding("d", "drain", "Drain"),
    ]

    #: Lines of the events pane.
    EVENT_LINES = 8

    def __init__(self, feed: Feed, *, tz: tzinfo | None = None) -> None:
        super().__init__()
        self.feed = feed
        self.tz = tz
        self.status: Status | None = None
        self.shard_list: tuple[ShardRow, ...] | None = None
        self.shards_error: str | None = None
        self.events_log = EventLog()
        self.history = History(SPARK_WIDTH)
        self.view = "nodes"
        self.sort_key = {"nodes": "id", "shards": "keyspace"}
        self.reverse = {"nodes": False, "shards": False}
        self.filter_text = ""
        self.paused = False
        self.trouble: str | None = None
        self._pending_doc: Any = None
        self._pending_shards: ShardsArrived | None = None
        self._columns_shown: dict[str, tuple[str, bool, tuple[str, ...]]] = {}

    # --- layout -------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="banner")
        yield Static(id="header")
        with ContentSwitcher(initial="nodes", id="main"):
            yield NodesTable(id="nodes", cursor_type="row")
            with Vertical(id="shards"):
                yield Static(id="shards-message")
                yield DataTable(id="shard-table", cursor_type="row")
        yield Static(id="events")
        yield FilterInput(placeholder="filter: words or field:word (state:dead zone:z1)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#events", Static).border_title = "events"
        self.query_one("#nodes", DataTable).focus()
        self._render_all()
        self.feed.start(AppSink(self))

    def on_unmount(self) -> None:
        self.feed.stop()

    # --- what the feed delivers -------------------------------------------------------

    def on_status_arrived(self, message: StatusArrived) -> None:
        if self.trouble is not None:
            self.trouble = None
            self._render_banner()
            self._render_header()
        if self.paused:
            self._pending_doc = message.doc
            return
        self._apply_status(message.doc)

    def on_shards_arrived(self, message: ShardsArrived) -> None:
        if self.paused:
            self._pending_shards = message
            return
        self._apply_shards(message)

    def on_events_arrived(self, message: EventsArrived) -> None:
        if self.events_log.add(message.events) and not self.paused:
            self._render_events()

    def on_feed_trouble(self, message: FeedTrouble) -> None:
        changed = self.trouble is None
        self.trouble = message.message
        self._render_banner()
        if changed:
            self._render_header()
            self._render_nodes()

    def on_drain_done(self, message: DrainDone) -> None:
        if message.error is None:
            self.notify(f"draining {message.node}", title="drain", markup=False)
            self.feed.poll_now()
        else:
            self.notify(message.error, title=f"drain {message.node} failed", severity="error", markup=False)

    def _apply_status(self, doc: Any) -> None:
        self.status = model.parse_status(doc)
        self.history.record(self.status.nodes)
        self._render_header()
        self._render_nodes()

    def _apply_shards(self, message: ShardsArrived) -> None:
        if message.error is None:
            self.shard_list = model.shard_rows(message.rows)
        self.shards_error = message.error
        self._render_shards()

    # --- rendering ----------------------------------------------------------------------

    def _render_all(self) -> None:
        self._render_banner()
        self._render_header()
        self._render_nodes()
        self._render_shards()
        self._render_events()

    def _render_banner(self) -> None:
        banner = self.query_one("#banner", Static)
        if self.trouble is None:
            banner.remove_class("shown")
            return
        banner.update(
            Text.assemble(
                ("⚠ ", "bold"),
                (self.trouble, "bold"),
                "  (showing the last known state; reconnecting by itself)",
            )
        )
        banner.add_class("shown")

    def _render_header(self) -> None:
        if self.status is None:
            lines: list[list[tuple[str, str]]] = [[("waiting for status…", "dim")], [], []]
        else:
            lines = model.header_segments(self.status.header, stale=self.trouble)
        extra: list[tuple[str, str]] = []
        if self.paused:
            extra.append(("  PAUSED ", "bold black on yellow"))
        key = self.sort_key[self.view]
        extra.append((f"  │ {self.view} by {key} {'▼' if self.reverse[self.view] else '▲'}", "dim"))
        if self.filter_text:
            extra.append((f"  filter: {self.filter_text}", "bold cyan"))
        # The control plane's line, when the document has one.
        control: list[str | tuple[str, str]] = ["\n", *lines[3]] if len(lines) > 3 else []
        text = Text.assemble(*lines[0], "\n", *lines[1], "\n", *lines[2], *extra, *control)
        self.query_one("#header", Static).update(text)

    def node_columns(self) -> tuple[Column, ...]:
        """The nodes table's columns for the terminal's width."""
        return NODE_COLUMNS if self.size.width >= WIDE_ENOUGH else COMPACT_COLUMNS

    def on_resize(self) -> None:
        self._render_nodes()

    def _columns(self, table: DataTable[Any], view: str, columns: Sequence[Column]) -> None:
        """(Re)build the column headings when the sort or the columns changed, else keep them."""
        shown = (self.sort_key[view], self.reverse[view], tuple(c.key for c in columns))
        if self._columns_shown.get(view) == shown and table.columns:
            table.clear()
            return
        table.clear(columns=True)
        for col in columns:
            arrow = (" ▼" if self.reverse[view] else " ▲") if col.key == self.sort_key[view] else ""
            table.add_column(Text(col.heading + arrow, justify="right" if col.numeric else "left"), key=col.key)
        self._columns_shown[view] = shown

    @staticmethod
    def _cursor_key(table: DataTable[Any]) -> str | None:
        if not table.row_count:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # the cursor is off the rows (the table was just emptied)
            return None

    @staticmethod
    def _restore_cursor(table: DataTable[Any], key: str | None, index: int) -> None:
        if not table.row_count:
            return
        if key is not None and key in table.rows:
            table.move_cursor(row=table.get_row_index(key), animate=False)
        else:
            table.move_cursor(row=min(index, table.row_count - 1), animate=False)

    def visible_nodes(self) -> list[NodeRow]:
        """The node rows shown, filtered and sorted."""
        rows = model.filter_rows(self.status.nodes if self.status else (), self.filter_text, model.node_matches)
        return model.sort_rows(rows, self.sort_key["nodes"], self.reverse["nodes"])

    def visible_shards(self) -> list[ShardRow]:
        """The shard rows shown, filtered and sorted."""
        rows = model.filter_rows(self.shard_list or (), self.filter_text, model.shard_matches)
        return model.sort_rows(rows, self.sort_key["shards"], self.reverse["shards"], tiebreak="shard")

    def _node_cell(self, row: NodeRow, col: Column, *, sparks: bool = True, dim: bool = False) -> Text:
        value = row.get(col.key)
        cell = col.cell(value)
        style = ""
        if col.key == "state":
            style = STATE_STYLES.get(value or "", "")
        elif col.key == "lifecycle":
            style = LIFECYCLE_STYLES.get(value or "", "")
        elif col.key == "cpu":
            style = "red" if (row.cpu or 0) >= 90 else "yellow" if (row.cpu or 0) >= 70 else ""
            if sparks:
                spark = model.sparkline(self.history.cpu(row.key), SPARK_WIDTH, top=100.0)
                return Text(f"{cell:>5} {spark}", style="dim" if dim else style, no_wrap=True)  # fixed width
        elif col.key == "select_rate" and sparks:
            spark = model.sparkline(self.history.rate(row.key), SPARK_WIDTH)
            return Text(f"{cell:>7} {spark}", style="dim" if dim else "", no_wrap=True)
        if dim and col.key != "state":
            style = "dim"  # the state keeps its colour: it says why the row is dimmed
        return Text(cell, style=style, justify="right" if col.numeric else "left", no_wrap=True)

    def _render_nodes(self) -> None:
        table = self.query_one("#nodes", DataTable)
        key, index = self._cursor_key(table), table.cursor_row
        columns = self.node_columns()
        sparks = columns is NODE_COLUMNS
        self._columns(table, "nodes", columns)
        for row in self.visible_nodes():
            dim = self.trouble is not None or model.row_is_stale(row)
            table.add_row(*(self._node_cell(row, c, sparks=sparks, dim=dim) for c in columns), key=row.key)
        self._restore_cursor(table, key, index)

    def _render_shards(self) -> None:
        message = self.query_one("#shards-message", Static)
        if self.shards_error:
            message.update(Text(f"{self.shards_error} (showing the last known list)"))
            message.add_class("shown")
        elif self.shard_list is None:
            message.update(Text("waiting for the shard list…"))
            message.add_class("shown")
        else:
            message.remove_class("shown")
        table = self.query_one("#shard-table", DataTable)
        key, index = self._cursor_key(table), table.cursor_row
        self._columns(table, "shards", SHARD_COLUMNS)
        for row in self.visible_shards():
            cells = []
            for col in SHARD_COLUMNS:
                value = row.get(col.key)
                style = SHARD_STYLES.get(value or "", "") if col.key == "state" else ""
                if col.key == "primary" and value is None:
                    value, style = "none", "bold red"  # no primary: the shard cannot take writes
                cells.append(Text(col.cell(value), style=style, justify="right" if col.numeric else "left"))
            table.add_row(*cells, key=row.key)
        self._restore_cursor(table, key, index)

    def _event_lines(self, rows: Sequence[model.EventRow]) -> Text:
        out = Text(no_wrap=True, overflow="ellipsis")
        for i, row in enumerate(reversed(rows)):  # newest first
            if i:
                out.append("\n")
            out.append(row.line(self.tz), style=model.event_style(row.kind, row.severity))
        return out

    def _render_events(self) -> None:
        rows = self.events_log.latest(self.EVENT_LINES)
        body = self._event_lines(rows) if rows else Text("no events yet", style="dim")
        self.query_one("#events", Static).update(body)

    # --- actions ------------------------------------------------------------------------

    _VIEW_ACTIONS = frozenset(
        {"help", "filter", "sort", "reverse", "pause", "switch_view", "show_view", "details", "drain"}
    )

    _NODE_ACTIONS = frozenset({"details", "drain"})

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # While a dialog is open its keys are its own: tab must not switch the view
        # behind a confirmation, nor d open a second one. Node actions are not
        # offered in the shards view. False also hides the key from the footer.
        if action in self._VIEW_ACTIONS and isinstance(self.screen, ModalScreen):
            return False
        if action == "show_view":
            return parameters[:1] != (self.view,)
        return not (action in self._NODE_ACTIONS and self.view != "nodes")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        box = self.query_one("#filter", FilterInput)
        box.add_class("shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self._render_header()
        self._render_nodes()
        self._render_shards()

    @on(Input.Submitted, "#filter")
    def _filter_kept(self, event: Input.Submitted) -> None:
        self._close_filter()

    @on(FilterInput.Cancelled)
    def _filter_cancelled(self) -> None:
        self.query_one("#filter", FilterInput).value = ""  # posts Changed: the rows come back
        self._close_filter()

    def _close_filter(self) -> None:
        self.query_one("#filter", FilterInput).remove_class("shown")
        self._table().focus()

    def _table(self) -> DataTable[Any]:
        return self.query_one("#nodes" if self.view == "nodes" else "#shard-table", DataTable)

    def action_sort(self) -> None:
        view = self.view
        columns = self.node_columns() if view == "nodes" else SHARD_COLUMNS

        def chosen(key: str | None) -> None:
            if key is not None:
                self.sort_key[view] = key
                self._rerender_view()

        self.push_screen(SortChooser(columns, self.sort_key[view]), chosen)

    @on(DataTable.HeaderSelected)
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        key = event.column_key.value
        if key == self.sort_key[self.view]:
            self.reverse[self.view] = not self.reverse[self.view]
        elif key is not None:
            self.sort_key[self.view], self.reverse[self.view] = key, False
        self._rerender_view()

    def action_reverse(self) -> None:
        self.reverse[self.view] = not self.reverse[self.view]
        self._rerender_view()

    def _rerender_view(self) -> None:
        self._render_header()
        if self.view == "nodes":
            self._render_nodes()
        else:
            self._render_shards()

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            if self._pending_doc is not None:
                doc, self._pending_doc = self._pending_doc, None
                self._apply_status(doc)
            if self._pending_shards is not None:
                shards, self._pending_shards = self._pending_shards, None
                self._apply_shards(shards)
            self._render_events()
        self._render_header()

    def action_show_view(self, view: str) -> None:
        if view != self.view:
            self.action_switch_view()

    def action_switch_view(self) -> None:
        self.view = "shards" if self.view == "nodes" else "nodes"
        self.refresh_bindings()
        self.query_one("#main", ContentSwitcher).current = self.view
        self.feed.want_shards(self.view == "shards")
        if self.view == "shards":
            self.feed.poll_now()
        self._render_header()
        self._table().focus()

    def selected_node(self) -> NodeRow | None:
        """The node under the cursor of the nodes table."""
        if self.view != "nodes" or self.status is None:
            return None
        key = self._cursor_key(self.query_one("#nodes", DataTable))
        return next((r for r in self.status.nodes if r.key == key), None)

    def action_details(self) -> None:
        row = self.selected_node()
        if row is None:
            return
        events = self._event_lines(list(reversed(self.events_log.about(row.id))))
        self.push_screen(NodeDetails(row, self.history.cpu(row.key), self.history.rate(row.key), events))

    @on(DataTable.RowSelected, "#nodes")
    def _row_selected(self) -> None:
        self.action_details()

    def action_drain(self) -> None:
        row = self.selected_node()
        if row is None or row.id is None:
            self.notify("select a node in the nodes view first", severity="warning")
            return
        node = row.id

        def answered(yes: bool | None) -> None:
            if yes:
                self.drain(node)

        self.push_screen(ConfirmDrain(node), answered)

    @work(thread=True, group="drain", exit_on_error=False)
    def drain(self, node: str) -> None:
        """Ask the manager to drain ``node`` (in a thread: the request blocks)."""
        try:
            self.feed.drain(node)
        except PhantomError as exc:
            self.post_message(DrainDone(node, f"{exc.code}: {exc}"))
        except Exception as exc:
            self.post_message(DrainDone(node, f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(DrainDone(node, None))


# --- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``phantom-top``."""
    parser = argparse.ArgumentParser(
        prog="phantom-top",
        description="Live cluster monitor. With --once, --json or a stdout that is not a terminal, "
        "prints one snapshot and exits.",
    )
    parser.add_argument("--once", action="store_true", help="print one plain-text snapshot and exit")
    parser.add_argument("--json", action="store_true", help="print the status document as JSON and exit")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between status polls (default 1)")
    parser.add_argument("--broker", help="broker endpoint [PHANTOM_BROKER, default tcp://127.0.0.1:5555]")
    parser.add_argument("--timeout", type=float, help="seconds per request attempt [PHANTOM_TIMEOUT]")
    return parser


def snapshot(endpoint: str, timeout: float, as_json: bool) -> int:
    """Print one snapshot (text or JSON) of the cluster; returns the exit code."""
    try:
        doc = fetch_status(endpoint, timeout)
    except BrokerUnreachable as exc:
        print(f"phantom-top: {exc} (is it running? `make up` starts the cluster)", file=sys.stderr)
        return EXIT_UNREACHABLE
    except PhantomError as exc:
        print(f"phantom-top: status failed: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if as_json:
            json.dump(doc, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(model.render_snapshot(doc, endpoint))
        sys.stdout.flush()
    except BrokenPipeError:
        # `phantom-top --once | head -3`: the reader has what it wanted. Point stdout
        # at /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bin/phantom-top``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.interval > 0:
        parser.error("--interval must be a positive number of seconds")
    try:
        names = ("broker", "events_out", "timeout", "curve_dir", "curve_key")
        cfg = cfgmod.load({"broker": args.broker, "timeout": args.timeout}, names=names)
        secmod.setup(cfg, "operator/admin")  # an operator's tool (it can drain); security off without keys
    except cfgmod.ConfigError as exc:
        print(f"phantom-top: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.json or args.once or not sys.stdout.isatty():
            return snapshot(cfg.broker, cfg.timeout, args.json)
        feed = BusFeed(cfg.broker, cfg.events_out, interval=args.interval, timeout=cfg.timeout)
        PhantomTop(feed).run()
        feed.stop()
        feed.join(timeout=1.0)
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
