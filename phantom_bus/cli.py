"""The ``phantom`` command line.

Human tables by default, ``--json`` for one JSON document on stdout
(``phantom events --json``: one JSON object per line). Exit codes: 0 ok,
2 usage, 3 cluster yellow or red (``status``), 69 broker unreachable, 1 any
other failure, 141 stdout closed early (``| head``), always with one line on
stderr saying what. With ``--json`` a failure is also one JSON document on
stdout, ``{"error": {"code", "message", "exit"}}``, so a script reading
stdout always gets JSON.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from phantom_bus import config as cfgmod
from phantom_bus import protocol
from phantom_bus import security as secmod
from phantom_bus import status as statusmod
from phantom_bus.client import Client
from phantom_bus.errors import BrokerUnreachable, NotFound, PhantomError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNHEALTHY = 3
EXIT_UNREACHABLE = 69
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a tool killed by SIGPIPE returns


def natural_key(text: Any) -> tuple[Any, ...]:
    """Sort key that orders digits by value: ``default/2`` before ``default/10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text)))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("phantom")
    except PackageNotFoundError:
        package = "unknown (not installed)"
    return f"phantom {package} (wire protocol {protocol.PROTOCOL_VERSION})"


def _table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Render ``rows`` as an aligned text table with the given (key, heading) columns."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        if isinstance(value, list | tuple):
            return ",".join(str(v) for v in value) or "-"
        return str(value)

    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.upper().ljust(w) for (_, h), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


NODE_COLUMNS = (
    ("id", "node"),
    ("state", "state"),
    ("lifecycle", "lifecycle"),
    ("address", "address"),
    ("zone", "zone"),
    ("phi", "phi"),
    ("cpu", "cpu%"),
    ("mem", "mem%"),
    ("load", "load"),
    ("replicas", "replicas"),
    ("primaries", "primaries"),
)

SHARD_COLUMNS = (
    ("keyspace", "keyspace"),
    ("shard", "shard"),
    ("range", "range"),
    ("primary", "primary"),
    ("replicas", "replicas"),
    ("state", "state"),
)


def _print_rows(args: argparse.Namespace, rows: Any, columns: Sequence[tuple[str, str]], none: str) -> int:
    """A listing: ``rows`` as JSON with ``--json``, else as a table (``none`` when empty)."""
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, columns) if rows else none)
    return EXIT_OK


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    """``phantom status``: health, nodes, shards and services; exit 3 when yellow or red,
    1 when the manager does not answer (no verdict on the cluster, see phantom_bus.status)."""
    doc = client.status()
    if args.json:
        _print_json(doc)
    else:
        health = doc.get("health", "unknown")
        line = f"health: {health}"
        if doc.get("reason"):
            line += f" ({doc['reason']})"
        print(line)
        print(f"epoch:  {doc.get('epoch') if doc.get('epoch') is not None else '-'}")
        shards = doc.get("shards") or {}
        moves = doc.get("moves_in_flight")

        def count(name: str) -> Any:
            return "-" if shards.get(name) is None else shards[name]

        print(
            f"shards: {count('total')} total, {count('under_replicated')} under-replicated, "
            f"{count('unavailable')} unavailable, {shards.get('moving') or 0} moving"
            + (f" ({moves} moves in flight)" if moves else "")
        )
        for reason in doc.get("reasons") or []:
            if isinstance(reason, dict):
                print(f"reason: {reason.get('severity')}: {reason.get('message')}")
        services = doc.get("services") or {}
        print("services: " + "  ".join(f"{name} {state}" for name, state in services.items()))
        for text in statusmod.control_text(doc):
            print(text)
        nodes = doc.get("nodes") or []
        print()
        print(_table(nodes, NODE_COLUMNS) if nodes else "no nodes")
    if statusmod.not_answering(doc):
        print(f"phantom: {doc.get('reason')}", file=sys.stderr)
        return EXIT_FAILURE
    health = doc.get("health")
    if health in ("yellow", "red"):
        return EXIT_UNHEALTHY
    if health != "green":
        print(f"phantom: status failed: the cluster reported health {health!r}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_nodes(client: Client, args: argparse.Namespace) -> int:
    """``phantom nodes``: one row per node."""
    doc = client.status()
    return _print_rows(args, doc.get("nodes") or [], NODE_COLUMNS, "no nodes")


def cmd_shards(client: Client, args: argparse.Namespace) -> int:
    """``phantom shards``: one row per shard."""
    shards = client.request("sharding", "shards")
    if isinstance(shards, list):
        shards.sort(key=lambda r: (natural_key(r.get("keyspace")), natural_key(r.get("shard"))))
    return _print_rows(args, shards, SHARD_COLUMNS, "no shards")


def cmd_select(client: Client, args: argparse.Namespace) -> int:
    """``phantom select KEY``: where a key lives (no lease is taken); a broker
    request unless ``--local`` (load the map and choose here)."""
    if not args.key:
        raise UsageError("select: KEY must not be empty (every key is at least one byte)")
    if args.local:
        client.routing = "local"
    sel = client.select(
        args.key, write=args.write, keyspace=args.keyspace, strategy=args.strategy, lease=False
    )
    doc = sel.to_dict()
    doc.pop("lease", None)
    if not args.local:
        doc.pop("source", None)
        doc.pop("stale", None)
    if args.json:
        _print_json(doc)
    else:
        print(f"{sel.key} -> {sel.node} ({sel.address}) shard {sel.shard} {sel.role} epoch {sel.epoch}")
    return EXIT_OK


def cmd_register(client: Client, args: argparse.Namespace) -> int:
    """``phantom register NODE --address HOST:PORT [--zone Z]``."""
    result = client.request(
        _owner(client, "register"), "register", node=args.node, address=args.address, zone=args.zone
    )
    _print_json(result) if args.json else print(f"registered {args.node}")
    return EXIT_OK


def cmd_drain(client: Client, args: argparse.Namespace) -> int:
    """``phantom drain NODE [--wait]``: by the manager, or by sharding when no manager runs."""
    owner = _owner(client, "drain")
    if owner == "manager":
        result = client.request("manager", "drain", node=args.node)
        note = ""
    else:
        # Sharding's own operation: the replicas move, but only the manager marks
        # the node decommissioned, so that waits until a manager runs again.
        result = client.request("sharding", "drain_node", node=args.node)
        note = (
            " (the manager is not running: sharding moves its replicas away, and the node is marked "
            "decommissioned once a manager runs again)"
        )
    if not args.wait:
        hint = "" if note else f" (`phantom drain {args.node} --wait` returns when it is decommissioned)"
        _print_json(result) if args.json else print(f"draining {args.node}{note or hint}")
        return EXIT_OK
    if owner != "manager":
        raise PhantomError(
            f"drain --wait needs the manager, which decides when {args.node} is decommissioned; "
            "sharding was asked to move its replicas away meanwhile. Start the manager (`make up`) and "
            "run the command again"
        )
    final = _wait_decommissioned(client, args.node, args.wait_timeout)
    done = f"{args.node} is decommissioned: `phantom remove {args.node}` forgets it"
    _print_json(final) if args.json else print(done)
    return EXIT_OK


def _wait_decommissioned(client: Client, node: str, limit: float | None) -> dict[str, Any]:
    """Poll the status until ``node`` is decommissioned; progress lines on stderr."""
    deadline = None if not limit else time.monotonic() + limit
    last = ""
    idle = 0
    while True:
        doc = client.status()
        row = next((n for n in doc.get("nodes") or [] if n.get("id") == node), None)
        if row is None:
            raise NotFound(f"node {node} is no longer listed (was it removed meanwhile?)", node=node)
        if row.get("lifecycle") == "decommissioned":
            return dict(row)
        line = (
            f"phantom: {node} {row.get('lifecycle')}: {row.get('replicas') or 0} replica(s) left, "
            f"{doc.get('moves_in_flight') or 0} move(s) in flight, health {doc.get('health')}"
        )
        idle = idle + 1 if line == last and not doc.get("moves_in_flight") else 0
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        elif idle == 10:
            print(
                f"phantom: nothing is moving off {node}: there may be too few other nodes or zones to take "
                "its replicas (each shard keeps its replication factor); `phantom moves` shows what waits",
                file=sys.stderr,
                flush=True,
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise PhantomError(f"{node} is not decommissioned after {limit:g} s (still {row.get('lifecycle')})")
        time.sleep(1.0)


def cmd_remove(client: Client, args: argparse.Namespace) -> int:
    """``phantom remove NODE``; says so when the node is still listed alive afterwards."""
    owner = _owner(client, "remove")
    result = client.request(owner, "remove", node=args.node)
    still = _still_alive(client, args.node)
    if still and owner != "manager":
        msg = (
            f"discovery forgot {args.node}, but its agent still runs and beacons, so it is listed alive again "
            "(no manager runs to ignore it). Stop the agent on its host"
        )
    elif still:
        # The manager ignores the agent's beacons (cluster.node_ignored) until it
        # restarts with a new incarnation: the removal holds, but the node is listed.
        msg = (
            f"{args.node} was removed (no shard is placed on it any more), but its agent still runs and "
            f"is still listed alive; the manager ignores it (cluster.node_ignored). Stop the agent on its "
            f"host; restarting it, or `phantom register {args.node}`, brings it back as a new node"
        )
    if still:
        print(f"phantom: remove: {msg}", file=sys.stderr)
        if args.json:
            _print_json({**(result if isinstance(result, dict) else {"result": result}), "still_listed": True,
                         "warning": msg})
        return EXIT_FAILURE
    _print_json(result) if args.json else print(f"removed {args.node}")
    return EXIT_OK


def _still_alive(client: Client, node: str, settle: float = 5.0) -> bool:
    """Whether ``node`` is listed alive ``settle`` seconds after a removal.

    The manager's forget actions run asynchronously, and an agent that keeps
    beaconing is rediscovered (and admitted by membership again) within a
    beacon interval or two: so the answer is the listing at the end of the
    window, not the first one without the node.
    """
    deadline = time.monotonic() + settle
    alive = False
    while True:
        try:
            nodes = client.status().get("nodes") or []
        except PhantomError:
            return False
        alive = any(n.get("id") == node and n.get("state") == "alive" for n in nodes)
        if time.monotonic() >= deadline:
            return alive
        time.sleep(0.5)


# --- key spaces, split, merge, moves --------------------------------------------

KEYSPACE_COLUMNS = (("name", "keyspace"), ("kind", "kind"), ("shards", "shards"), ("rf", "rf"), ("slots", "slots"))
MOVE_COLUMNS = (("shard", "shard"), ("node", "node"), ("state", "state"), ("age", "age s"), ("failures", "failures"))


def cmd_keyspaces(client: Client, args: argparse.Namespace) -> int:
    """``phantom keyspaces``: one row per key space."""
    doc = client.request("sharding", "map")
    rows = []
    for ks in (doc or {}).get("keyspaces") or []:
        rows.append(
            {
                "name": ks.get("name"),
                "kind": ks.get("kind"),
                "shards": len(ks.get("shards") or []),
                "rf": ks.get("rf"),
                "slots": ks.get("slots") or None,
            }
        )
    rows.sort(key=lambda r: natural_key(r["name"]))
    return _print_rows(args, rows, KEYSPACE_COLUMNS, "no key spaces")


def cmd_create_keyspace(client: Client, args: argparse.Namespace) -> int:
    """``phantom create-keyspace NAME``: a hash or range key space, placed at once."""
    if args.kind == "hash" and args.split_points:
        raise UsageError("create-keyspace: --split-points is for --kind range (hash key spaces take --shards)")
    if args.kind == "range" and (args.shards or args.slots):
        raise UsageError("create-keyspace: --shards/--slots are for --kind hash (range key spaces take --split-points)")
    result = client.request(
        "sharding",
        "create_keyspace",
        name=args.name,
        kind=args.kind,
        shards=args.shards,
        split_points=_names(args.split_points) or None,
        rf=args.rf,
        slots=args.slots,
    )
    count = len(result.get("shards") or []) if isinstance(result, dict) else "?"
    _print_json(result) if args.json else print(f"created {args.kind} key space {args.name} with {count} shard(s)")
    return EXIT_OK


def cmd_split(client: Client, args: argparse.Namespace) -> int:
    """``phantom split SHARD [--at KEY|SLOT]``."""
    text: str | None = args.at
    at: str | int | None = text
    if text is not None and text.isdigit():
        at = int(text)  # a hash shard splits at a slot; a range key made of digits needs --at-key
    if args.at_key is not None:
        at = args.at_key
    result = client.request("sharding", "split", shard=args.shard, at=at, keyspace=args.keyspace)
    _print_json(result) if args.json else print(
        f"split {args.shard} into {', '.join(result.get('shards', []))} (epoch {result.get('epoch')})"
    )
    return EXIT_OK


def cmd_merge(client: Client, args: argparse.Namespace) -> int:
    """``phantom merge SHARD OTHER``: adjacent shards; the lower keeps its id."""
    result = client.request("sharding", "merge", shard=args.shard, other=args.other, keyspace=args.keyspace)
    if args.json:
        _print_json(result)
    elif result.get("done"):
        print(f"merged {result.get('absorbed')} into {result.get('shard')} (epoch {result.get('epoch')})")
    else:
        print(f"merging {args.other} into {args.shard}: replicas are moved next to each other first "
              "(`phantom moves` shows them)")
    return EXIT_OK


def cmd_moves(client: Client, args: argparse.Namespace) -> int:
    """``phantom moves``: replica moves not finished yet."""
    rows = client.request("sharding", "moves") or []
    rows.sort(key=lambda r: (natural_key(r.get("shard")), natural_key(r.get("node"))))
    return _print_rows(args, rows, MOVE_COLUMNS, "no moves in flight")


# --- events ---------------------------------------------------------------------


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    """``phantom events [--follow] [--type PATTERN] [--json]``: recent events, then (``--follow``) new ones."""
    pattern = args.type or "*"
    shown = _chatty_shown(pattern)
    # Subscribe before asking for the recent ones, so nothing falls between the two.
    sock = _event_socket(args.events_out, pattern) if args.follow else None
    try:
        recent = client.request("broker", "events", limit=args.limit)
        seen = set()
        for event in recent if isinstance(recent, list) else []:
            seen.add(_event_id(event))
            if _wanted(event, pattern, shown):
                _print_event(event, args.json)
        if sock is None:
            return EXIT_OK
        for event in _follow(sock):
            if _event_id(event) in seen:
                continue  # already printed from the recent list
            if _wanted(event, pattern, shown):
                _print_event(event, args.json)
        return EXIT_OK
    finally:
        if sock is not None:
            sock.close(0)


#: Chatty event kinds, and the word a ``--type`` pattern must contain to show them:
#: one member.load per node per heartbeat, and sharding's shardmap.current once a
#: second, would bury everything else.
_CHATTY = {"member.load": "load", "shardmap.current": "current"}


def _chatty_shown(pattern: str) -> tuple[str, ...]:
    """The chatty kinds ``pattern`` asks for by name."""
    return tuple(kind for kind, word in _CHATTY.items() if word in pattern)


def _wanted(event: dict[str, Any], pattern: str, shown: tuple[str, ...]) -> bool:
    kind = str(event.get("kind"))
    return fnmatch.fnmatchcase(kind, pattern) and (kind not in _CHATTY or kind in shown)


def _event_socket(events_out: str, pattern: str) -> Any:
    import zmq

    sock: Any = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10000)
    # The literal part before the first wildcard is a topic prefix the broker can filter on.
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    secmod.current().connect(sock, events_out)
    return sock


def _follow(sock: Any) -> Iterator[dict[str, Any]]:
    from phantom_bus.events import Deduplicator

    dedupe = Deduplicator()  # with several brokers, each event arrives once per broker
    while True:
        if not sock.poll(500):
            continue
        frames = sock.recv_multipart()
        try:
            event = protocol.decode_event(frames)
        except PhantomError:
            continue  # a malformed event is dropped, like every subscriber does
        if dedupe.accept(event):
            yield event


def _event_id(event: dict[str, Any]) -> tuple[Any, ...]:
    return (event.get("ts"), event.get("kind"), event.get("service"), event.get("node"))


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    event = protocol.event_summary(event)
    if as_json:
        sys.stdout.write(json.dumps(event, default=_jsonable, sort_keys=False) + "\n")
    else:
        ts = event.get("ts")
        when = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) else "--:--:--"
        skip = {"kind", "ts", "service", "node", "reason", "origin", "seq"}
        rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip and not isinstance(v, dict | list))
        node = f" {event['node']}" if event.get("node") else ""
        reason = f": {event['reason']}" if event.get("reason") else ""
        print(f"{when} {event.get('kind')} [{event.get('service')}]{node}{reason}" + (f"  {rest}" if rest else ""))
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def cmd_keygen(args: argparse.Namespace) -> int:
    """``phantom keygen DIR``: key pairs per role and the authorized-keys tree (no broker needed)."""
    directory = Path(args.dir)
    try:
        report = secmod.keygen(
            directory,
            agents=_names(args.agents),
            services=_names(args.services),
            operators=_names(args.operators),
            clients=_names(args.clients),
            force=args.force,
        )
    except (OSError, ValueError) as exc:
        print(f"phantom: keygen failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    rows = [
        {
            "key": p.ref,
            "user_id": p.user_id,
            "what": what,
            "secret": str(secmod.secret_path(directory, p)),
            "public": str(secmod.public_path(directory, p)),
        }
        for p, what in report
    ]
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, (("key", "key"), ("what", "what"), ("secret", "secret key (keep on its host)"))))
        print(f"\nauthorized public keys: {directory / secmod.AUTHORIZED}")
        print(f"turn security on: PHANTOM_CURVE_DIR={directory} for every process (docs: Production)")
    return EXIT_OK


class UsageError(Exception):
    """A command line that parses but cannot be right (exit 2)."""


def _owner(client: Client, op: str) -> str:
    """Which service carries out a node operation: the manager when it runs,
    else the service that holds the table (discovery registers and removes)."""
    services = client.services()
    if services.get("manager", {}).get("workers"):
        return "manager"
    return "sharding" if op == "drain" else "discovery"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= EVENTS_LIMIT:
        raise argparse.ArgumentTypeError(f"expected 1..{EVENTS_LIMIT}, got {text}")
    return value


EVENTS_LIMIT = 1000


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``phantom``."""
    parser = _Parser(prog="phantom", description="Phantom cluster control plane")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--broker", help="broker endpoint [PHANTOM_BROKER, default tcp://127.0.0.1:5555]")
    parser.add_argument("--timeout", type=float, help="seconds per attempt [PHANTOM_TIMEOUT]")
    parser.add_argument("--curve-dir", help="key directory: security on [PHANTOM_CURVE_DIR]")
    parser.add_argument("--curve-key", help="ROLE/NAME or .key path, default operator/admin [PHANTOM_CURVE_KEY]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(
        name: str, fn: Callable[[Client, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.set_defaults(fn=fn)
        return p

    command("status", cmd_status, "cluster health, nodes, shards, services (exit 3 when yellow or red)")
    command("nodes", cmd_nodes, "one row per node")
    command("shards", cmd_shards, "one row per shard")
    p = command("select", cmd_select, "which node serves KEY")
    p.add_argument("key")
    p.add_argument("--write", action="store_true", help="the primary, for a write")
    p.add_argument("--keyspace", help="key space (default: the default key space)")
    p.add_argument("--strategy", help="round_robin, random, least_connections, weighted, performance")
    p.add_argument("--local", action="store_true", help="route here from the shard map, not via the broker")
    p = command("register", cmd_register, "register a node that cannot beacon")
    p.add_argument("node")
    p.add_argument("--address", required=True, help="HOST:PORT of the node's database")
    p.add_argument("--zone", default="default")
    p = command("drain", cmd_drain, "move a node's replicas away, then decommission it")
    p.add_argument("node")
    p.add_argument("--wait", action="store_true", help="return when it is decommissioned (progress on stderr)")
    p.add_argument("--wait-timeout", type=_positive, metavar="S", help="give up waiting after S seconds (exit 1)")
    p = command("remove", cmd_remove, "forget a node (refused while it holds the only live replica)")
    p.add_argument("node")
    p = command("events", cmd_events, "recent bus events, and with --follow new ones as they happen")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")
    p.add_argument("--type", metavar="PATTERN", help="only kinds matching PATTERN, e.g. 'member.*' or 'cluster.health'")
    p.add_argument("--limit", type=_limit, default=100, help="recent events to show first [%(default)s]")
    command("keyspaces", cmd_keyspaces, "one row per key space")
    p = command("create-keyspace", cmd_create_keyspace, "create a hash or range key space and place its shards")
    p.add_argument("name")
    p.add_argument("--kind", choices=("hash", "range"), default="hash")
    p.add_argument("--shards", type=int, help="hash: number of shards [sharding's default_shards]")
    p.add_argument("--slots", type=int, help="hash: number of slots [sharding's default]")
    p.add_argument("--split-points", metavar="K1,K2,...", help="range: keys where shards start")
    p.add_argument("--rf", type=int, help="replication factor [sharding's default]")
    p = command("split", cmd_split, "split a shard in two (the lower half keeps the id)")
    p.add_argument("shard")
    p.add_argument("--at", help="hash: the slot; range: the key (default: the middle, or the median of seen keys)")
    p.add_argument("--at-key", help="range: split at this key even if it is all digits")
    p.add_argument("--keyspace", help="the shard's key space (default: looked up)")
    p = command("merge", cmd_merge, "merge two adjacent shards (the lower keeps its id)")
    p.add_argument("shard")
    p.add_argument("other")
    p.add_argument("--keyspace", help="the shards' key space (default: looked up)")
    command("moves", cmd_moves, "replica moves not finished yet")
    p = sub.add_parser(
        "keygen",
        help="make CURVE key pairs per role and the authorized-keys directory",
        description="Make (or complete) a key directory: DIR/<role>/<name>.key secret key pairs, "
        "DIR/authorized/<role>/<name>.pub public keys. Existing secret keys are kept unless --force.",
    )
    p.add_argument("dir", help="key directory (PHANTOM_CURVE_DIR of the cluster)")
    p.add_argument("--agents", help="comma-separated node ids, e.g. node-1,node-2")
    p.add_argument("--services", default=",".join(secmod.DEFAULT_SERVICES), help="service names [%(default)s]")
    p.add_argument("--operators", default=",".join(secmod.DEFAULT_OPERATORS), help="operator keys [%(default)s]")
    p.add_argument("--clients", default=",".join(secmod.DEFAULT_CLIENTS), help="client keys [%(default)s]")
    p.add_argument("--force", action="store_true", help="replace existing secret keys (every holder needs the new one)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(fn=None)
    _add_snapshot_parser(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error under ``--json`` is also a JSON document on stdout."""

    def error(self, message: str) -> Any:
        if _JSON_WANTED[0]:
            _print_json({"error": {"code": "usage", "message": message, "exit": EXIT_USAGE}})
        return super().error(message)


_JSON_WANTED = [False]


def _fail(args: argparse.Namespace | None, code: int, error: str, message: str) -> int:
    """One line on stderr and, under ``--json``, the error document on stdout."""
    print(f"phantom: {message}", file=sys.stderr)
    if args is not None and getattr(args, "json", False):
        _print_json({"error": {"code": error, "message": message, "exit": code}})
    return code


def _add_snapshot_parser(sub: Any) -> None:
    """``phantom snapshot save|restore FILE`` (the SQLite store; etcd has its own tools)."""
    p = sub.add_parser(
        "snapshot",
        help="save or restore the control-plane store (SQLite)",
        description="Save a consistent copy of DATA/store.sqlite3 while the control plane runs, or restore "
        "one while it is stopped. With store=etcd://... use etcdctl snapshot save / etcdutl snapshot restore.",
    )
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("file", help="the snapshot file")
    p.add_argument("--data", help="state directory [PHANTOM_DATA, default var]")
    p.add_argument("--store", help="store url [PHANTOM_STORE, default sqlite]")
    p.add_argument("--force", action="store_true", help="restore even while the control plane runs")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(fn=None)


def cmd_snapshot(args: argparse.Namespace) -> int:
    """``phantom snapshot save|restore FILE``: no broker needed, it works on the store file."""
    import asyncio

    from phantom_bus import snapshot
    from phantom_bus.store.sqlite import SqliteStore

    try:
        cfg = cfgmod.load({"data": args.data, "store": args.store}, names=("data", "store"))
    except cfgmod.ConfigError as exc:
        print(f"phantom: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if str(cfg.store).startswith("etcd://"):
        endpoints = str(cfg.store)[len("etcd://") :]
        tool = (
            f"etcdctl --endpoints={endpoints} snapshot save {args.file}"
            if args.action == "save"
            else f"etcdutl snapshot restore {args.file} --data-dir NEW_DIR (then start etcd on NEW_DIR)"
        )
        print(f"phantom: the store is etcd ({cfg.store}); use etcd's own tool: {tool}", file=sys.stderr)
        return EXIT_FAILURE
    store_path = Path(str(cfg.store)[len("sqlite:") :]) if str(cfg.store).startswith("sqlite:") else None
    store_path = store_path or Path(cfg.data) / "store.sqlite3"
    file = Path(args.file)
    try:
        if args.action == "save":
            if not store_path.exists():
                raise PhantomError(f"no store at {store_path} (wrong --data, or the control plane never ran)")

            async def save() -> snapshot.SnapshotInfo:
                store = SqliteStore(store_path)
                try:
                    return await snapshot.save(store, file)
                finally:
                    await store.close()

            info = asyncio.run(save())
            verb = "saved"
        else:
            info = snapshot.restore(file, store_path, force=args.force)
            verb = "restored"
    except PhantomError as exc:
        print(f"phantom: snapshot {args.action} failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    doc = {
        "action": args.action,
        "file": str(info.path),
        "store": str(store_path),
        "revision": info.revision,
        "keys": info.keys,
    }
    if args.json:
        _print_json(doc)
    else:
        where = f"{store_path} -> {info.path}" if args.action == "save" else f"{info.path} -> {store_path}"
        print(f"{verb} store revision {info.revision} ({info.keys} keys): {where}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phantom`` console script; returns the exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`phantom status | head`): no traceback, and keep the
        # interpreter's last flush at exit from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    _JSON_WANTED[0] = "--json" in raw
    parser = build_parser()
    args = parser.parse_args(raw)
    if args.command == "keygen":
        return cmd_keygen(args)
    if args.command == "snapshot":
        return cmd_snapshot(args)
    flags = {"broker": args.broker, "timeout": args.timeout, "curve_dir": args.curve_dir, "curve_key": args.curve_key}
    names = (*flags, "events_out")
    try:
        cfg = cfgmod.load(flags, names=names)
        security = secmod.setup(cfg, "operator/admin")
    except cfgmod.ConfigError as exc:
        return _fail(args, EXIT_USAGE, "config", str(exc))
    args.events_out = cfg.events_out
    try:
        with Client(cfg.broker, timeout=cfg.timeout, security=security, routing="broker") as client:
            # A quick ping first: an absent broker is reported in about a second
            # instead of after every retry of the real request.
            if not client.ping(timeout=min(cfg.timeout, 1.0)):
                raise client.unreachable()
            code: int = args.fn(client, args)
            return code
    except UsageError as exc:
        return _fail(args, EXIT_USAGE, "usage", str(exc))
    except BrokerUnreachable as exc:
        hint = " (is it running? `make up` starts the cluster)" if str(exc).endswith("does not answer") else ""
        return _fail(args, EXIT_UNREACHABLE, exc.code, f"{exc}{hint}")
    except PhantomError as exc:
        return _fail(args, EXIT_FAILURE, exc.code, f"{args.command} failed: {exc.code}: {exc}")
    except cfgmod.ConfigError as exc:  # e.g. a key file that went away
        return _fail(args, EXIT_USAGE, "config", str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
