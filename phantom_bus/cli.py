"""The ``phantom`` command line.

Human tables by default, ``--json`` for one JSON document on stdout. Exit
codes: 0 ok, 2 usage, 3 cluster not healthy (``status``), 69 broker
unreachable, 1 any other failure, always with one line on stderr saying what.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from phantom_bus import config as cfgmod
from phantom_bus import security as secmod
from phantom_bus import status as statusmod
from phantom_bus.client import Client
from phantom_bus.errors import BrokerUnreachable, PhantomError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNHEALTHY = 3
EXIT_UNREACHABLE = 69


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


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    """``phantom status``: health, nodes, shards and services; exit 3 unless green,
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
        def count(name: str) -> Any:
            return "-" if shards.get(name) is None else shards[name]

        print(
            f"shards: {count('total')} total, {count('under_replicated')} under-replicated, "
            f"{count('unavailable')} unavailable"
        )
        for reason in doc.get("reasons") or []:
            if isinstance(reason, dict):
                print(f"reason: {reason.get('severity')}: {reason.get('message')}")
        services = doc.get("services") or {}
        print("services: " + "  ".join(f"{name} {state}" for name, state in services.items()))
        nodes = doc.get("nodes") or []
        print()
        print(_table(nodes, NODE_COLUMNS) if nodes else "no nodes")
    if statusmod.not_answering(doc):
        print(f"phantom: {doc.get('reason')}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if doc.get("health") == "green" else EXIT_UNHEALTHY


def cmd_nodes(client: Client, args: argparse.Namespace) -> int:
    """``phantom nodes``: one row per node."""
    doc = client.status()
    nodes = doc.get("nodes") or []
    if args.json:
        _print_json(nodes)
    else:
        print(_table(nodes, NODE_COLUMNS) if nodes else "no nodes")
    return EXIT_OK


def cmd_shards(client: Client, args: argparse.Namespace) -> int:
    """``phantom shards``: one row per shard."""
    shards = client.request("sharding", "shards")
    if args.json:
        _print_json(shards)
    else:
        print(_table(shards, SHARD_COLUMNS) if shards else "no shards")
    return EXIT_OK


def cmd_select(client: Client, args: argparse.Namespace) -> int:
    """``phantom select KEY``: where a key lives (no lease is taken); a broker
    request unless ``--local`` (load the map and choose here)."""
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
    """``phantom drain NODE``."""
    result = client.request(_owner(client, "drain"), "drain", node=args.node)
    _print_json(result) if args.json else print(f"draining {args.node}")
    return EXIT_OK


def cmd_remove(client: Client, args: argparse.Namespace) -> int:
    """``phantom remove NODE``."""
    result = client.request(_owner(client, "remove"), "remove", node=args.node)
    _print_json(result) if args.json else print(f"removed {args.node}")
    return EXIT_OK


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


def _owner(client: Client, op: str) -> str:
    """Which service carries out a node operation: the manager when it runs,
    else the service that holds the table (discovery registers and removes)."""
    services = client.services()
    if services.get("manager", {}).get("workers"):
        return "manager"
    return "sharding" if op == "drain" else "discovery"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``phantom``."""
    parser = argparse.ArgumentParser(prog="phantom", description="Phantom cluster control plane")
    parser.add_argument("--broker", help="broker endpoint [PHANTOM_BROKER, default tcp://127.0.0.1:5555]")
    parser.add_argument("--timeout", type=float, help="seconds per attempt [PHANTOM_TIMEOUT]")
    parser.add_argument("--curve-dir", help="key directory: security on [PHANTOM_CURVE_DIR]")
    parser.add_argument("--curve-key", help="ROLE/NAME or .key path, default operator/admin [PHANTOM_CURVE_KEY]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, fn: Callable[[Client, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.set_defaults(fn=fn)
        return p

    command("status", cmd_status, "cluster health, nodes, shards, services (exit 3 unless green)")
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
    p = command("remove", cmd_remove, "forget a node (refused while it holds the only live replica)")
    p.add_argument("node")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return cmd_keygen(args)
    if args.command == "snapshot":
        return cmd_snapshot(args)
    flags = {"broker": args.broker, "timeout": args.timeout, "curve_dir": args.curve_dir, "curve_key": args.curve_key}
    try:
        cfg = cfgmod.load(flags, names=tuple(flags))
        security = secmod.setup(cfg, "operator/admin")
    except cfgmod.ConfigError as exc:
        print(f"phantom: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(cfg.broker, timeout=cfg.timeout, security=security, routing="broker") as client:
            # A quick ping first: an absent broker is reported in about a second
            # instead of after every retry of the real request.
            if not client.ping(timeout=min(cfg.timeout, 1.0)):
                raise client.unreachable()
            code: int = args.fn(client, args)
            return code
    except BrokerUnreachable as exc:
        hint = " (is it running? `make up` starts the cluster)" if str(exc).endswith("does not answer") else ""
        print(f"phantom: {exc}{hint}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except PhantomError as exc:
        print(f"phantom: {args.command} failed: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except cfgmod.ConfigError as exc:  # e.g. a key file that went away
        print(f"phantom: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
