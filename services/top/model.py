"""phantom-top's model: status documents, shard lists and bus events in; rows, text and styles out.

Nothing here does I/O or reads the clock, so the monitor's logic is tested
without a terminal or a cluster. Every field of every input is optional and
may have any type: a missing or unusable value becomes ``None`` and is shown as
``-``; nothing in this module raises on a malformed document.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, tzinfo
from typing import Any

MISSING = "-"

#: Styles (Rich style strings) for node states, health and lifecycles.
STATE_STYLES: Mapping[str, str] = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "grey50"}
HEALTH_STYLES: Mapping[str, str] = {
    "green": "bold white on dark_green",
    "yellow": "bold black on yellow",
    "red": "bold white on red",
}
LIFECYCLE_STYLES: Mapping[str, str] = {
    "joining": "cyan",
    "active": "",
    "draining": "yellow",
    "decommissioned": "grey50",
}
SHARD_STYLES: Mapping[str, str] = {"active": "", "moving": "cyan"}
SERVICE_STYLES: Mapping[str, str] = {"up": "green", "down": "bold red"}
ROLE_CODES: Mapping[str, str] = {"primary": "P", "replica": "R", "joining": "J", "leaving": "L"}

# Dead first when sorting by state: the rows that need attention come to the top.
_STATE_RANK = {"dead": 0, "suspect": 1, "alive": 2, "left": 3}

#: Event kinds shown in the events pane (topic prefixes; also the SUB subscriptions).
EVENT_PREFIXES: tuple[str, ...] = ("cluster.", "member.", "shardmap.changed", "balancer.")
# member.load is a periodic digest of every node's load, not something that happened.
_QUIET_EVENTS = frozenset({"member.load"})

_MAX_TEXT = 40
_SPARK = "▁▂▃▄▅▆▇█"


# --- coercion: any JSON-like value -> a value we can show ------------------------------


def number(value: Any) -> float | None:
    """A finite float from an int, float or numeric string; ``None`` for anything else."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            result = float(value)
        elif isinstance(value, str) and len(value) <= 64:
            result = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return result if math.isfinite(result) else None


def text(value: Any, limit: int = _MAX_TEXT) -> str | None:
    """A printable one-line string of at most ``limit`` characters; ``None`` if empty or not a scalar."""
    if value is None:
        return None
    if isinstance(value, str):
        s = value
    elif isinstance(value, bool):
        s = "true" if value else "false"
    elif isinstance(value, int | float):
        n = number(value)
        s = MISSING if n is None else _plain_number(n)
    elif isinstance(value, bytes):
        s = value.decode("utf-8", "replace")
    else:
        return None
    s = "".join(ch if ch.isprintable() else "?" for ch in s[: limit * 4]).strip()
    if not s:
        return None
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _plain_number(n: float) -> str:
    if n.is_integer() and abs(n) < 1e15:
        return str(int(n))
    return f"{n:.6g}"


def fmt_number(value: float | None, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals (none for counts), ``-`` when missing."""
    if value is None:
        return MISSING
    if abs(value) >= 1e9:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def fmt_age(seconds: float | None) -> str:
    """A short age: ``0.4s``, ``12s``, ``3m``, ``5h``, ``2d``."""
    if seconds is None:
        return MISSING
    s = max(seconds, 0.0)
    if s < 10:
        return f"{s:.1f}s"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.0f}h"
    return fmt_number(s / 86400, 0) + "d"


def clock(ts: float | None, tz: tzinfo | None = None) -> str:
    """``HH:MM:SS`` of a Unix time in ``tz`` (local time when ``None``)."""
    if ts is None:
        return "--:--:--"
    try:
        return datetime.fromtimestamp(ts, tz).strftime("%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "--:--:--"


def natural_key(value: str | None) -> tuple[tuple[int, int, str], ...]:
    """Sort key that puts ``node-2`` before ``node-10``."""
    if value is None:
        return ()
    parts = re.split(r"([0-9]+)", value)
    return tuple((0, int(p), "") if p.isdigit() and p.isascii() else (1, 0, p.lower()) for p in parts if p)


def _mapping(value: Any) -> Mapping[Any, Any]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


# --- nodes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node as phantom-top shows it. ``key`` is unique within one document."""

    key: str
    id: str | None = None
    state: str | None = None
    lifecycle: str | None = None
    zone: str | None = None
    address: str | None = None
    cpu: float | None = None
    mem: float | None = None
    load: float | None = None
    replicas: float | None = None
    primaries: float | None = None
    inflight: float | None = None
    p99_ms: float | None = None
    select_rate: float | None = None
    heartbeat_age: float | None = None
    phi: float | None = None
    incarnation: float | None = None
    raw: Mapping[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def get(self, name: str) -> Any:
        """The value of field ``name`` (``None`` for an unknown name)."""
        return getattr(self, name, None) if name in _NODE_FIELDS else None


_NODE_FIELDS = frozenset(NodeRow.__dataclass_fields__) - {"raw"}
_NODE_NUMBERS = (
    "cpu", "mem", "load", "replicas", "primaries", "inflight", "p99_ms", "select_rate",
    "heartbeat_age", "phi", "incarnation",
)  # fmt: skip
# Alternative spellings a newer or older status document may use.
_ALIASES = {"inflight": ("in_flight",), "heartbeat_age": ("last_heartbeat_age",), "select_rate": ("selects_per_s",)}


def node_row(doc: Any, key: str) -> NodeRow:
    """A :class:`NodeRow` from one entry of the status document's ``nodes``."""
    d = _mapping(doc)
    values: dict[str, Any] = {}
    for name in _NODE_NUMBERS:
        raw = d.get(name)
        for alias in _ALIASES.get(name, ()):
            if raw is None:
                raw = d.get(alias)
        values[name] = number(raw)
    return NodeRow(
        key=key,
        id=text(d.get("id")),
        state=text(d.get("state")),
        lifecycle=text(d.get("lifecycle")),
        zone=text(d.get("zone")),
        address=text(d.get("address")),
        raw=d,
        **values,
    )


def node_rows(nodes: Any) -> tuple[NodeRow, ...]:
    """Rows for the ``nodes`` list of a status document; entries that are not maps are skipped."""
    rows: list[NodeRow] = []
    seen: dict[str, int] = {}
    for entry in _sequence(nodes):
        if not isinstance(entry, Mapping):
            continue
        base = text(entry.get("id")) or "?"
        seen[base] = seen.get(base, 0) + 1
        # Table rows are keyed; two entries with one id (a bug elsewhere) must still both show.
        rows.append(node_row(entry, base if seen[base] == 1 else f"{base}#{seen[base]}"))
    return tuple(rows)


# --- the header -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Control:
    """The control plane's shape: the store, who leads what, which instances run."""

    store: str | None = None
    #: (service, leader instance or None, term or None), in the document's order.
    leaders: tuple[tuple[str, str | None, str | None], ...] = ()
    #: (service, instance names), in the document's order.
    instances: tuple[tuple[str, tuple[str, ...]], ...] = ()


def parse_control(value: Any) -> Control | None:
    """The document's ``control`` part; ``None`` when it has none."""
    if not isinstance(value, Mapping):
        return None
    leaders: list[tuple[str, str | None, str | None]] = []
    for service, seen in _mapping(value.get("leaders")).items():
        name = text(service, 24)
        if name is None:
            continue
        entry = _mapping(seen)
        leaders.append((name, text(entry.get("instance"), 24), text(entry.get("term"), 12)))
    instances: list[tuple[str, tuple[str, ...]]] = []
    for service, names in _mapping(value.get("instances")).items():
        name = text(service, 24)
        if name is None:
            continue
        kept = (text(n, 24) for n in _sequence(names))
        instances.append((name, tuple(sorted((n for n in kept if n is not None), key=natural_key))))
    return Control(text(value.get("store"), 16), tuple(leaders), tuple(instances))


def missing_instances(c: Control) -> dict[str, tuple[str, ...]]:
    """Per service, the hosts it has no instance on. Services that share an instance
    name with another service are named by host (``h1``, ``h2``, ...); the hosts are
    every name those services use. A service named otherwise (the HOST:PID default,
    unique per process) says nothing about hosts and gets no such list."""
    named = [set(names) for _, names in c.instances]
    by_host = [any(names & other for j, other in enumerate(named) if j != i) for i, names in enumerate(named)]
    hosts = set().union(*(names for names, h in zip(named, by_host, strict=True) if h))
    out: dict[str, tuple[str, ...]] = {}
    for (service, names), h in zip(c.instances, by_host, strict=True):
        gone = tuple(sorted(hosts - set(names), key=natural_key)) if h else ()
        if gone:
            out[service] = gone
    return out


def control_segments(c: Control) -> list[tuple[str, str]]:
    """The header's control line: store, leaders (instance and term), instances per
    service, a service short of an instance that runs the others in yellow."""
    line: list[tuple[str, str]] = [("control ", "dim"), (c.store or MISSING, "bold")]
    line.append(("  │ leaders ", "dim"))
    for service, instance, term in c.leaders:
        line.append((f"{service} ", ""))
        if instance is None:
            line.append(("none  ", "bold red"))
        else:
            line.append((instance, "bold"))
            line.append((f" t{term or MISSING}  ", "dim"))
    if not c.leaders:
        line.append((MISSING, ""))
    line.append(("│ instances ", "dim"))
    gone = missing_instances(c)
    for service, names in c.instances:
        line.append((f"{service} ", ""))
        line.append((str(len(names)), "bold red" if not names else "yellow" if service in gone else ""))
        if service in gone:
            line.append((f" (no {','.join(gone[service])})", "yellow"))
        line.append(("  ", ""))
    if not c.instances:
        line.append((MISSING, ""))
    return line


def control_lines(c: Control) -> list[str]:
    """The control part as plain lines, for the snapshot."""
    leaders = ", ".join(
        f"{service} {instance} (term {term or MISSING})" if instance else f"{service} none"
        for service, instance, term in c.leaders
    )
    instances = "; ".join(f"{service} {' '.join(names) or 'none'}" for service, names in c.instances)
    return [
        f"control: store {c.store or MISSING}; leaders {leaders or MISSING}",
        f"instances: {instances or MISSING}",
    ]


@dataclass(frozen=True, slots=True)
class Header:
    """The cluster summary shown above the tables."""

    health: str | None = None
    reason: str | None = None
    epoch: str | None = None
    alive: int = 0
    suspect: int = 0
    dead: int = 0
    left: int = 0
    nodes: int = 0
    shards_total: float | None = None
    under_replicated: float | None = None
    unavailable: float | None = None
    moves_in_flight: float | None = None
    selects_per_s: float | None = None
    services: tuple[tuple[str, str | None], ...] = ()
    control: Control | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """A parsed status document."""

    header: Header
    nodes: tuple[NodeRow, ...]


def _count(value: Any) -> float | None:
    if isinstance(value, list | tuple):
        return float(len(value))
    return number(value)


def parse_status(doc: Any) -> Status:
    """Turn a status document (anything, really) into a :class:`Status`."""
    d = _mapping(doc)
    nodes = node_rows(d.get("nodes"))
    states = [n.state for n in nodes]
    shards = _mapping(d.get("shards"))
    sps = number(d.get("selects_per_s"))
    if sps is None:
        rates = [n.select_rate for n in nodes if n.select_rate is not None]
        sps = sum(rates) if rates else None
    services = tuple(
        (name, text(state, 16))
        for name, state in ((text(k, 24), v) for k, v in _mapping(d.get("services")).items())
        if name is not None
    )
    header = Header(
        health=text(d.get("health"), 16),
        reason=text(d.get("reason"), 120),
        epoch=text(d.get("epoch"), 20),
        alive=states.count("alive"),
        suspect=states.count("suspect"),
        dead=states.count("dead"),
        left=states.count("left"),
        nodes=len(nodes),
        shards_total=number(shards.get("total")),
        under_replicated=number(shards.get("under_replicated")),
        unavailable=number(shards.get("unavailable")),
        moves_in_flight=_count(d.get("moves_in_flight")),
        selects_per_s=sps,
        services=services,
        control=parse_control(d.get("control")),
    )
    return Status(header, nodes)


STALE_STYLE = "bold white on grey35"


def header_segments(h: Header, stale: str | None = None) -> list[list[tuple[str, str]]]:
    """The header as three lines of ``(text, style)`` segments: health and nodes,
    shards and traffic, services; and a fourth, the control plane (store, leaders,
    instances), when the document has a ``control`` part.

    ``stale`` (why the data is old, e.g. the broker does not answer): the
    colour is replaced by ``STALE``, the last known health is shown as such,
    and the services line says they are unknown rather than repeating ``up``.
    """
    health = h.health or "unknown"
    if stale is not None:
        line1: list[tuple[str, str]] = [(" STALE ", STALE_STYLE), (f"  last known health {health}", "dim")]
        line1.append((f"  epoch {h.epoch or MISSING}", "dim"))
        line1.append((f"  │ {h.nodes} nodes when last seen", "dim"))
        line2: list[tuple[str, str]] = [("shards ", "dim"), (f"{fmt_number(h.shards_total, 0)} total when last seen",
                                                            "dim")]
        line3: list[tuple[str, str]] = [("services unknown: ", "bold"), (stale, "")]
        if h.control is not None:
            return [line1, line2, line3, [("control: last seen ", "dim"), *control_segments(h.control)[1:]]]
        return [line1, line2, line3]
    line1 = [(f" {health.upper()} ", HEALTH_STYLES.get(health, "reverse"))]
    line1.append((f"  epoch {h.epoch or MISSING}", "bold"))
    line1.append((f"  │ nodes {h.nodes}: ", "dim"))
    for count, name in ((h.alive, "alive"), (h.suspect, "suspect"), (h.dead, "dead"), (h.left, "left")):
        line1.append((f"{count} {name}", STATE_STYLES[name] if count else "dim"))
        line1.append((" ", ""))
    if h.reason:
        line1.append((f" │ {h.reason}", "italic"))
    line2 = [("shards ", "dim"), (f"{fmt_number(h.shards_total, 0)} total  ", "")]
    line2.append((f"{fmt_number(h.under_replicated, 0)} under-replicated  ", "yellow" if h.under_replicated else ""))
    line2.append((f"{fmt_number(h.unavailable, 0)} unavailable", "bold red" if h.unavailable else ""))
    line2.append(("  │ moves in flight ", "dim"))
    line2.append((fmt_number(h.moves_in_flight, 0), "cyan" if h.moves_in_flight else ""))
    line2.append(("  │ selects/s ", "dim"))
    line2.append((fmt_number(h.selects_per_s, 1), ""))
    line3 = [("services ", "dim")]
    for name, state in h.services:
        line3.append((f"{name} ", ""))
        line3.append((f"{state or MISSING}  ", SERVICE_STYLES.get(state or "", "yellow")))
    if not h.services:
        line3.append((MISSING, ""))
    if h.control is not None:
        return [line1, line2, line3, control_segments(h.control)]
    return [line1, line2, line3]


# --- columns, sorting, filtering ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """One table column: the row field it shows, its heading and how to format it."""

    key: str
    heading: str
    digits: int | None = None  # None: text; else a number with this many decimals
    age: bool = False

    def cell(self, value: Any) -> str:
        """The plain text of one cell."""
        if self.age:
            return fmt_age(value)
        if self.digits is not None:
            return fmt_number(value, self.digits)
        return MISSING if value is None else str(value)

    @property
    def numeric(self) -> bool:
        """Right-aligned and sorted by value."""
        return self.age or self.digits is not None


NODE_COLUMNS: tuple[Column, ...] = (
    Column("id", "NODE"),
    Column("state", "STATE"),
    Column("lifecycle", "LIFECYCLE"),
    Column("zone", "ZONE"),
    Column("cpu", "CPU%", 1),
    Column("mem", "MEM%", 1),
    Column("load", "LOAD", 2),
    Column("replicas", "REPL", 0),
    Column("primaries", "PRIM", 0),
    Column("inflight", "INFL", 0),
    Column("p99_ms", "P99 MS", 1),
    Column("select_rate", "SEL/S", 1),
    Column("heartbeat_age", "HB AGE", age=True),
)
#: The columns that fit 80 columns (sparklines off): what a narrow terminal must still show.
COMPACT_COLUMNS: tuple[Column, ...] = tuple(
    c for c in NODE_COLUMNS if c.key not in ("mem", "load", "inflight", "p99_ms")
)
#: Below this many columns the nodes table uses :data:`COMPACT_COLUMNS`.
WIDE_ENOUGH = 118
#: The plain snapshot also shows the address, which the full-screen table leaves to the details view.
SNAPSHOT_COLUMNS: tuple[Column, ...] = (*NODE_COLUMNS[:4], Column("address", "ADDRESS"), *NODE_COLUMNS[4:])


#: A node not heard from for this long shows dimmed: its numbers are old.
STALE_AFTER = 5.0


def row_is_stale(row: NodeRow) -> bool:
    """Whether a node's row shows old data: not alive, or no heartbeat for :data:`STALE_AFTER` s."""
    age = row.heartbeat_age
    return row.state != "alive" or (age is not None and age > STALE_AFTER)


def _sort_value(row: Any, key: str) -> Any:
    value = row.get(key)
    if value is None:
        return None
    if key == "state":
        return (_STATE_RANK.get(value, len(_STATE_RANK)), value)
    if isinstance(value, str):
        return natural_key(value)
    return value


def sort_rows(rows: Iterable[Any], key: str, reverse: bool = False, tiebreak: str = "id") -> list[Any]:
    """Rows sorted by field ``key``; rows without a value come last either way,
    and equal values keep a stable order by ``tiebreak`` (natural order)."""
    rows = list(rows)

    def tie(row: Any) -> tuple[Any, ...]:
        return (natural_key(row.get(tiebreak)), row.key)

    present = [r for r in rows if _sort_value(r, key) is not None]
    missing = [r for r in rows if _sort_value(r, key) is None]
    present.sort(key=tie)
    present.sort(key=lambda r: _sort_value(r, key), reverse=reverse)
    missing.sort(key=tie)
    return present + missing


_NODE_FILTER_FIELDS = ("id", "state", "lifecycle", "zone", "address")


def _terms_match(fields: Mapping[str, str | None], query: str) -> bool:
    for term in query.lower().split():
        name, sep, want = term.partition(":")
        if sep and name in fields:
            value = fields[name]
            if value is None or want not in value.lower():
                return False
        elif not any(v is not None and term in v.lower() for v in fields.values()):
            return False
    return True


def node_matches(row: NodeRow, query: str) -> bool:
    """True if every word of ``query`` occurs in one of the row's text fields;
    ``field:word`` (``state:dead``, ``zone:z1``) looks only in that field."""
    return _terms_match({f: row.get(f) for f in _NODE_FILTER_FIELDS}, query)


def filter_rows(rows: Iterable[Any], query: str, match: Callable[[Any, str], bool] = node_matches) -> list[Any]:
    """The rows that ``match`` the ``query`` (all of them for an empty query)."""
    return [r for r in rows if match(r, query)] if query.strip() else list(rows)


def next_column(columns: Sequence[Column], current: str) -> str:
    """The key of the column after ``current`` (wrapping), for the sort key."""
    keys = [c.key for c in columns]
    return keys[(keys.index(current) + 1) % len(keys)] if current in keys else keys[0]


# --- shards -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardRow:
    """One shard of the shards view."""

    key: str
    keyspace: str | None = None
    shard: str | None = None
    range: str | None = None
    primary: str | None = None
    replicas: tuple[tuple[str, str], ...] = ()  # (node, role)
    state: str | None = None
    select_rate: float | None = None

    def get(self, name: str) -> Any:
        """The value of field ``name`` (``None`` for an unknown name)."""
        if name == "replicas":
            return replicas_text(self.replicas) if self.replicas else None
        return getattr(self, name, None) if name in _SHARD_FIELDS else None


_SHARD_FIELDS = frozenset(ShardRow.__dataclass_fields__)

SHARD_COLUMNS: tuple[Column, ...] = (
    Column("keyspace", "KEYSPACE"),
    Column("shard", "SHARD"),
    Column("range", "RANGE / SLOTS"),
    Column("primary", "PRIMARY"),
    Column("replicas", "REPLICAS (P primary R replica J joining L leaving)"),
    Column("state", "STATE"),
    Column("select_rate", "SEL/S", 1),
)


def replicas_text(replicas: Iterable[tuple[str, str]]) -> str:
    """``node-1:P node-2:R node-3:J``."""
    return " ".join(f"{n}:{ROLE_CODES.get(r, r)}" for n, r in replicas)


def _range_text(d: Mapping[Any, Any]) -> str | None:
    rng = d.get("range")
    if isinstance(rng, list | tuple) and len(rng) == 2 and not any(isinstance(x, list | tuple) for x in rng):
        return text(f"[{text(rng[0]) or ''}, {text(rng[1]) or '+inf'})", 60)
    if rng is not None:
        return text(rng, 60)
    spans = []
    for item in _sequence(d.get("slots")):
        pair = _sequence(item)
        lo, hi = (number(pair[0]), number(pair[1])) if len(pair) == 2 else (number(item), None)
        if lo is not None:
            spans.append(f"{lo:.0f}" if hi is None else f"{lo:.0f}-{hi - 1:.0f}")
    return text("slots " + ",".join(spans), 60) if spans else None


def _roles(d: Mapping[Any, Any], primary: str | None) -> tuple[tuple[str, str], ...]:
    explicit = {text(k): text(v, 16) for k, v in _mapping(d.get("roles")).items()}
    out: list[tuple[str, str]] = []
    for item in _sequence(d.get("replicas")):
        if isinstance(item, Mapping):
            node, role = text(item.get("node") or item.get("id")), text(item.get("role"), 16)
        else:
            node, role = text(item), None
        if node is None:
            continue
        role = role or explicit.get(node) or ("primary" if node == primary else "replica")
        out.append((node, role))
    listed = {n for n, _ in out}
    out += [(n, r or "replica") for n, r in explicit.items() if n is not None and n not in listed]
    return tuple(out)


def shard_rows(doc: Any) -> tuple[ShardRow, ...]:
    """Rows for the answer of ``sharding.shards`` (a list of shard maps, or a map holding one)."""
    items = doc.get("shards") if isinstance(doc, Mapping) else doc
    rows: list[ShardRow] = []
    seen: dict[str, int] = {}
    for entry in _sequence(items):
        if not isinstance(entry, Mapping):
            continue
        keyspace = text(entry.get("keyspace"))
        shard = text(entry.get("shard") if entry.get("shard") is not None else entry.get("id"))
        primary = text(entry.get("primary"))
        base = f"{keyspace or '?'}/{shard or '?'}"
        seen[base] = seen.get(base, 0) + 1
        rows.append(
            ShardRow(
                key=base if seen[base] == 1 else f"{base}#{seen[base]}",
                keyspace=keyspace,
                shard=shard,
                range=_range_text(entry),
                primary=primary,
                replicas=_roles(entry, primary),
                state=text(entry.get("state")),
                select_rate=number(entry.get("select_rate")),
            )
        )
    return tuple(sorted(rows, key=lambda r: (natural_key(r.keyspace), natural_key(r.shard), r.key)))


def shard_matches(row: ShardRow, query: str) -> bool:
    """Like :func:`node_matches`, over keyspace, shard, primary, replicas and state."""
    fields = {
        "keyspace": row.keyspace,
        "shard": row.shard,
        "primary": row.primary,
        "replicas": " ".join(n for n, _ in row.replicas),
        "state": row.state,
    }
    return _terms_match(fields, query)


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventRow:
    """One bus event as the events pane shows it; ``repeats`` > 1 when several
    like events were folded into this line (see :meth:`EventLog.add`)."""

    ts: float | None
    kind: str
    node: str | None
    reason: str | None
    detail: str
    severity: str = "info"
    repeats: int = 1

    def line(self, tz: tzinfo | None = None) -> str:
        """``12:03:04  member.suspect  node-3  reason  detail``."""
        times = f"(x{self.repeats})" if self.repeats > 1 else ""
        parts = [clock(self.ts, tz), f"{self.kind:<18}", self.node or "", self.reason or "", self.detail, times]
        return "  ".join(p for p in parts if p)


#: Line style per severity: what needs a look is red or yellow, good news green, the rest plain.
SEVERITY_STYLES: Mapping[str, str] = {"error": "bold red", "warning": "yellow", "ok": "green", "info": ""}
_ERROR_KINDS = frozenset({"member.dead", "cluster.node_failed", "cluster.failover", "sharding.move_stuck"})
_WARNING_KINDS = frozenset({"member.suspect", "balancer.ejected", "cluster.node_suspect", "cluster.node_ignored",
                            "cluster.node_draining", "node.conflict", "node.lost"})
_OK_KINDS = frozenset({"member.alive", "balancer.restored", "cluster.node_recovered", "cluster.node_active",
                       "cluster.node_decommissioned"})
_HEALTH_SEVERITY: Mapping[str, str] = {"green": "ok", "yellow": "warning", "red": "error"}


def event_severity(kind: str, data: Mapping[str, Any] | None = None) -> str:
    """``error``, ``warning``, ``ok`` or ``info`` for an event: by what it says, not its
    family (``cluster.health`` is as good or bad as the colour it reports)."""
    d = data or {}
    if kind == "cluster.health":
        return _HEALTH_SEVERITY.get(str(d.get("health")), "info")
    if kind in _ERROR_KINDS:
        return "error"
    if kind in _WARNING_KINDS:
        return "warning"
    if kind in _OK_KINDS:
        return "ok"
    return "info"


def event_style(kind: str, severity: str | None = None) -> str:
    """The style of an event line, by its severity."""
    return SEVERITY_STYLES.get(severity or event_severity(kind), "")


_ENVELOPE = frozenset({"kind", "ts", "service", "node", "reason"})


def wanted_event(kind: Any) -> bool:
    """True for the event kinds the events pane shows."""
    return isinstance(kind, str) and kind not in _QUIET_EVENTS and kind.startswith(EVENT_PREFIXES)


def _short(value: Any) -> str:
    s = text(value, 30)
    if s is not None:
        return s
    try:
        return text(json.dumps(value, default=str, sort_keys=True), 30) or MISSING
    except (TypeError, ValueError, RecursionError):
        return MISSING


def event_row(doc: Any) -> EventRow | None:
    """An :class:`EventRow` for an event body, or ``None`` if the pane does not show it."""
    d = _mapping(doc)
    kind = d.get("kind")
    if not wanted_event(kind):
        return None
    extras = sorted((str(k), v) for k, v in d.items() if k not in _ENVELOPE and v is not None)
    detail = " ".join(f"{k}={_short(v)}" for k, v in extras[:6])
    return EventRow(
        ts=number(d.get("ts")),
        kind=text(kind, 40) or MISSING,
        node=text(d.get("node")),
        reason=text(d.get("reason"), 80),
        detail=detail,
        severity=event_severity(str(kind), d),
    )


#: Events folded into the previous line when they repeat it: during a rebalance
#: sharding publishes a ``shardmap.changed`` per step, which would bury the rest.
COALESCED: frozenset[str] = frozenset({"shardmap.changed"})


class EventLog:
    """The latest events, newest last; bounded."""

    def __init__(self, size: int = 200) -> None:
        self._rows: deque[EventRow] = deque(maxlen=size)

    def add(self, docs: Iterable[Any]) -> int:
        """Keep the events the pane shows; returns how many were kept.

        A :data:`COALESCED` event with the same kind and reason as the newest
        line replaces it, counted (``x12``) and with the newest time and detail.
        """
        kept = 0
        for doc in docs:
            row = event_row(doc)
            if row is None:
                continue
            last = self._rows[-1] if self._rows else None
            if (
                last is not None
                and row.kind in COALESCED
                and last.kind == row.kind
                and last.reason == row.reason
                and last.node == row.node
            ):
                self._rows[-1] = replace(row, repeats=last.repeats + 1)
            else:
                self._rows.append(row)
            kept += 1
        return kept

    def latest(self, n: int) -> list[EventRow]:
        """The ``n`` newest events, oldest first."""
        return list(self._rows)[-n:] if n > 0 else []

    def about(self, node: str | None, n: int = 10) -> list[EventRow]:
        """The ``n`` newest events naming ``node``."""
        return [r for r in self._rows if node is not None and r.node == node][-n:]

    def __len__(self) -> int:
        return len(self._rows)


# --- sparklines -------------------------------------------------------------------------


def sparkline(values: Sequence[float | None], width: int, top: float | None = None) -> str:
    """The last ``width`` values as block characters scaled to ``top`` (default: their maximum);
    a gap is a space, and the line is padded on the left to ``width``."""
    values = list(values)[-width:] if width > 0 else []
    present = [v for v in values if v is not None]
    scale = top if top is not None and top > 0 else max(present, default=0.0)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif scale <= 0:
            out.append(_SPARK[0])
        else:
            level = round(min(max(v / scale, 0.0), 1.0) * (len(_SPARK) - 1))
            out.append(_SPARK[level])
    return "".join(out).rjust(width)


class History:
    """The last few CPU and select-rate samples of every node, one per status document."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._cpu: dict[str, deque[float | None]] = {}
        self._rate: dict[str, deque[float | None]] = {}

    def record(self, rows: Iterable[NodeRow]) -> None:
        """Add one sample per row; nodes no longer in the document are forgotten."""
        keys = set()
        for row in rows:
            keys.add(row.key)
            self._cpu.setdefault(row.key, deque(maxlen=self.size)).append(row.cpu)
            self._rate.setdefault(row.key, deque(maxlen=self.size)).append(row.select_rate)
        for gone in set(self._cpu) - keys:
            del self._cpu[gone], self._rate[gone]

    def cpu(self, key: str) -> list[float | None]:
        """CPU samples of node ``key``, oldest first."""
        return list(self._cpu.get(key, ()))

    def rate(self, key: str) -> list[float | None]:
        """Select-rate samples of node ``key``, oldest first."""
        return list(self._rate.get(key, ()))


# --- details and the plain snapshot -----------------------------------------------------


def details(row: NodeRow) -> list[tuple[str, str]]:
    """Every field of a node's entry in the status document as ``(name, value)`` text."""
    out = []
    for k, v in row.raw.items():
        name = text(k, 30)
        if name is None:
            continue
        value = text(v, 80)
        if value is None and v is not None:
            try:
                value = text(json.dumps(v, default=str, sort_keys=True), 200)
            except (TypeError, ValueError, RecursionError):
                value = None
        out.append((name, value or MISSING))
    return out


def plain_table(rows: Sequence[Any], columns: Sequence[Column]) -> str:
    """An aligned text table (numbers right-aligned)."""
    cells = [[c.cell(r.get(c.key)) for c in columns] for r in rows]
    widths = [max([len(c.heading)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if c.numeric else v.ljust(w) for v, w, c in zip(values, widths, columns, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line([c.heading for c in columns]), *(line(r) for r in cells)])


def render_snapshot(doc: Any, endpoint: str | None = None) -> str:
    """The plain-text snapshot that ``phantom-top --once`` prints: health, counts,
    services and the nodes table, ending with a newline."""
    st = parse_status(doc)
    h = st.header
    title = "phantom-top" + (f"  {endpoint}" if endpoint else "")
    health = f"health: {h.health or 'unknown'}" + (f" ({h.reason})" if h.reason else "")
    lines = [
        title,
        health,
        f"epoch: {h.epoch or MISSING}",
        f"nodes: {h.nodes} ({h.alive} alive, {h.suspect} suspect, {h.dead} dead, {h.left} left)",
        f"shards: {fmt_number(h.shards_total, 0)} total, {fmt_number(h.under_replicated, 0)} under-replicated, "
        f"{fmt_number(h.unavailable, 0)} unavailable",
        f"moves in flight: {fmt_number(h.moves_in_flight, 0)}   selects/s: {fmt_number(h.selects_per_s, 1)}",
        "services: " + ("  ".join(f"{n} {s or MISSING}" for n, s in h.services) or MISSING),
        *(control_lines(h.control) if h.control is not None else ()),
        "",
    ]
    nodes = sort_rows(st.nodes, "id")
    lines.append(plain_table(nodes, SNAPSHOT_COLUMNS) if nodes else "no nodes")
    return "\n".join(lines) + "\n"
