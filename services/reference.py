"""The operations reference of ``docs/protocol.md``, generated from the code.

Each service's operations, their wire arguments (names, msgpack types,
required or optional with the default) come from the handlers themselves
(:mod:`phantom_bus.opspec`, the same description that checks every request);
who may call them comes from the rule each service declared with the operation
(``allow=``, the one its requests are checked against).
What a signature cannot say (what the result holds, which error codes the
operation itself raises, whether a resend is safe) is declared here, one
:class:`Op` per operation.

``python -m services.reference --write docs/protocol.md`` rewrites the tables
between the markers; ``python -m services.reference`` prints them. A test
fails when the document differs from this output, when a service answers an
operation that is not declared here, or when a declared one is gone, so
adding an operation means: declare it here, run the command, commit both.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phantom_bus import broker as brokermod
from phantom_bus.opspec import OpSpec, Param
from phantom_bus.security import DEFAULT_RULE, Rule


@dataclass(frozen=True, slots=True)
class Op:
    """What an operation's signature does not tell."""

    result: str
    errors: tuple[str, ...] = ()
    #: A resend of the same request (after a lost reply) has the same effect as one.
    idempotent: bool = True
    #: Extra words about some arguments, by name.
    notes: Mapping[str, str] = field(default_factory=dict)


_PING = Op("map: `service` (str), `pid` (int), `ops` (array of str, the operations it answers)")
_STATS = Op("map of counters (int) by name; the names are informational and may grow")

SERVICES = ("broker", "discovery", "membership", "sharding", "balancer", "manager")

DECLARED: dict[str, dict[str, Op]] = {
    "broker": {
        "ping": Op("map: `pong` (true), `time` (float, unix seconds)"),
        "services": Op(
            "map service name -> map: `workers`, `inflight`, `queued`, `requests`, `rejected` (int), "
            "`instances` (array of map: `pid`, `host`, `inflight`, `served`, `up`)"
        ),
        "events": Op(
            "array of event bodies (maps with `kind`, `ts`, `service`, ...), oldest first: the last `limit` "
            "events the broker relayed (it keeps 1000; `member.load` and `shardmap.current` are not kept)",
            ("bad_request",),
            notes={"limit": "1..1000"},
        ),
        "stats": Op(
            "map: `requests`, `replies`, `bad_client`, `bad_worker`, `events` (int), `uptime` (float, s), "
            "`pid` (int), `services` (as `services`), `security` (map)"
        ),
    },
    "discovery": {
        "ping": _PING,
        "nodes": Op("array of node maps (`id`, `address`, `zone`, `weight`, `state`, `incarnation`, `source`, ...)"),
        "node": Op("one node map, as in `nodes`", ("not_found",)),
        "register": Op(
            "the node map; the node stays until `remove` (it needs no beacons)",
            ("conflict", "refused"),
            notes={"address": "`host:port`"},
        ),
        "remove": Op("map: `removed` (str, the node id)", ("not_found",), idempotent=False),
        "stats": _STATS,
    },
    "membership": {
        "ping": _PING,
        "members": Op(
            "array of member maps (`id`, `state`: alive, suspect, dead or left, `incarnation`, `phi`, `load`, ...)"
        ),
        "member": Op("one member map, as in `members`", ("not_found",)),
        "admit": Op(
            "map: `node` (str), `new` (bool, false if it was already admitted)",
            notes={
                "interval": "the node's heartbeat interval in seconds; nil: the `heartbeat_interval` setting",
                "incarnation": "the node's incarnation as known (its beacons, the registry): a node that never "
                "heartbeats is declared dead at the highest one given",
            },
        ),
        "forget": Op("map: `node` (str), `forgotten` (true)"),
        "stats": _STATS,
        "verdicts": Op(
            "map: `term` (int, the leader's), `instance` (str), `members` (as `members`): the verdicts that count",
            ("not_leader",),
        ),
    },
    "sharding": {
        "ping": _PING,
        "lookup": Op(
            "route map: `keyspace`, `shard` (str), `primary` (str or nil), `readers` (array of str), `epoch` (int)",
            ("no_such_keyspace", "not_leader"),
            notes={"key": "str keys hash as their UTF-8 bytes (see shardmap.md)"},
        ),
        "map": Op(
            "the whole shard map (shardmap.md), or nil when its epoch is not above `since_epoch`",
            ("not_leader",),
            notes={"since_epoch": "an int >= 0; a follower answers only with a newer map"},
        ),
        "shards": Op("array of map: `keyspace`, `shard`, `range`, `replicas`, `primary`, `state`, `roles`"),
        "moves": Op("array of map, one per move not finished yet"),
        "nodes": Op("array of map: the nodes replicas are placed on, with their counts"),
        "health": Op(
            "map: `total`, `under_replicated`, `unavailable`, `moving` (int), `epoch` (int), `shortfall`, "
            "`store` (map: `ok` (bool), `error` (str or nil), `failing_for` (float s or nil)), "
            "`leader` (map: `instance`, `term`, `leader` (bool: this instance), `self`)"
        ),
        "sole_replicas": Op("array of str: shards whose only live replica is on `node`"),
        "create_keyspace": Op(
            "the key space map (shardmap.md)",
            ("conflict",),
            idempotent=False,
            notes={"kind": "`hash` or `range`", "split_points": "range key spaces: the shard boundaries"},
        ),
        "split": Op(
            "map: `shards` (array of the two new shard ids), `epoch` (int)",
            ("not_found", "no_such_keyspace", "refused"),
            idempotent=False,
            notes={
                "at": "range: a key; hash: a slot (int); nil: the middle of the keys seen (range) or slots (hash)",
                "keyspace": "nil: the shard's own",
            },
        ),
        "merge": Op(
            "map: `shard` (str), `absorbed` (str), `done` (bool: false while replicas still move), `epoch` (int)",
            ("no_such_keyspace", "conflict", "refused"),
            idempotent=False,
        ),
        "add_node": Op("the node view; re-adding updates zone and weight and ends a drain"),
        "drain_node": Op("the node view", ("not_found",)),
        "remove_node": Op("map: `node` (str), `dropped`", ("not_found", "refused"), idempotent=False),
        "node_dead": Op("the node view", ("not_found",)),
        "node_alive": Op("the node view", ("not_found",)),
        "confirm": Op(
            "map: `shard`, `node`, `role` (str); a repeated confirmation changes nothing",
            ("not_found", "conflict"),
            notes={
                "epoch": "optional int: the map epoch in which the node was asked to copy; `conflict` with "
                "`details.since` when that assignment was cancelled since (copy again)"
            },
        ),
        "report_load": Op(
            "map: `split` (array of new shard ids), `ignored` (array of unknown shard ids)",
            notes={"rates": "map shard id -> requests per second (float)"},
        ),
        "report_keys": Op("int: keys recorded", ("no_such_keyspace",), notes={"keys": "array of str or bin"}),
        "renew": Op(
            "map: `epoch` (int), `primaries` (array of str: the shards `node` is primary of now; empty for a dead "
            "node or a stale renewal), `lease` (float, seconds), `fresh` (bool, false: older than one seen); "
            "see integrating.md",
            notes={
                "incarnation": "the agent's incarnation; with `seq` orders renewals",
                "seq": "grows with every renewal of one agent process",
                "holding": "array of str: shards the node's database is primary of or becoming so",
            },
        ),
    },
    "balancer": {
        "ping": _PING,
        "select": Op(
            "map: `key`, `keyspace`, `shard`, `node`, `address` (str, empty if unknown), `epoch` (int), "
            "`role` (`primary` or `replica`), `lease` (str, or nil with `lease: false`), `strategy` (str: the "
            "strategy that chose, `primary` for a write), `panic` (bool) - see *Leases*",
            ("no_such_keyspace", "no_live_replica"),
            idempotent=False,
            notes={
                "write": "true: the shard's primary",
                "keyspace": 'nil: `"default"`',
                "strategy": "`round_robin`, `random`, `least_connections`, `weighted` or `performance`; "
                "nil: the default",
                "lease": "false: only where the key lives, no lease and no in-flight count",
            },
        ),
        "release": Op(
            "map: `released` (str, the lease id), `status` (`released`, `already_released`, `expired` or "
            "`unknown`) - see *Leases*",
            notes={
                "latency_ms": "what the caller measured, >= 0; nil: no latency recorded",
                "ok": "false: the request failed (counts toward ejection)",
            },
        ),
        "node_update": Op(
            "map: `node` (str)",
            notes={"state": "alive, suspect, dead or left", "lifecycle": "joining, active, draining, decommissioned"},
        ),
        "forget_node": Op("map: `node` (str), `leases_dropped` (int)"),
        "stats": Op("map: per node and per shard statistics (`nodes`, `shards`, `totals`, ...), `epoch`, `map` "
                    "(how the shard map is followed)"),
        "routing": Op(
            "map: `epoch` (int or nil), `nodes` (map node id -> `state`, `version` ([incarnation, change] or nil), "
            "`lifecycle`, `address`, `weight`, `load` ({`cpu`, `mem`, `age_s`} or nil)) - see *Routing locally*"
        ),
        "report": Op(
            "map: `epoch`, `counted` (int: selects counted), `nodes` (the node table, as `routing`)",
            idempotent=False,
            notes={
                "client": "the reporting client's name (for logs)",
                "nodes": "map node id -> `picks`, `successes`, `failures` (counts since the last report), "
                "`latencies` (array of ms, a sample)",
                "shards": "map shard id -> `reads`, `writes` (counts since the last report)",
            },
        ),
    },
    "manager": {
        "ping": _PING,
        "status": Op("the status document (`phantom status --json`)", ("not_leader",)),
        "health": Op(
            "map: `leader` (as sharding's), `store` (as sharding's), `queues` (map service -> actions waiting), "
            "`queue_limit`, `membership_term`, `overloaded`, `dropped`, `stale_verdicts` (int)"
        ),
        "nodes": Op("array of node records: `id`, `lifecycle`, `address`, `zone`, `weight`, ..."),
        "node": Op("one node record, as in `nodes`", ("not_found",)),
        "register": Op("the node record", ("conflict",)),
        "approve": Op("the node record", ("not_found", "conflict")),
        "drain": Op("the node record", ("not_found", "conflict")),
        "remove": Op("the node record", ("not_found", "refused"), idempotent=False),
    },
}


def _shell_classes() -> dict[str, Any]:
    from services.balancer.service import BalancerService
    from services.discovery.service import Discovery
    from services.manager.service import ManagerService
    from services.membership.service import MembershipService
    from services.sharding.service import ShardingService

    return {
        "discovery": Discovery,
        "membership": MembershipService,
        "sharding": ShardingService,
        "balancer": BalancerService,
        "manager": ManagerService,
    }


def actual_operations() -> dict[str, dict[str, OpSpec]]:
    """Every operation each service answers, read from the running code (the shells are
    built on a throw-away data directory; nothing is started)."""
    return {service: dict(ops) for service, ops in _built()[0].items()}


def actual_rules() -> dict[str, dict[str, Rule]]:
    """Who may call each operation of each service (not the broker's: any caller), as
    the built services declare it."""
    return {service: dict(rules) for service, rules in _built()[1].items()}


@functools.cache
def _built() -> tuple[dict[str, dict[str, OpSpec]], dict[str, dict[str, Rule]]]:
    from loguru import logger

    from phantom_bus import config as cfgmod
    from phantom_bus.opspec import params_of

    out: dict[str, dict[str, OpSpec]] = {
        "broker": {
            op: params_of(brokermod.events_args) if op == "events" else OpSpec(()) for op in brokermod.OPERATIONS
        }
    }
    rules: dict[str, dict[str, Rule]] = {}
    logger.disable("services")
    try:
        with tempfile.TemporaryDirectory() as data:
            cfg = cfgmod.load({"data": data, "security": "off"}, env={})
            for name, cls in _shell_classes().items():
                shell = cls(cfg)
                out[name] = shell.service.operations()
                rules[name] = {op: shell.service.rule(op) for op in out[name]}
                store = getattr(shell, "store", None)
                close = getattr(store, "close", None)
                if callable(close):
                    closing = close()
                    if inspect.iscoroutine(closing):
                        asyncio.run(closing)
    finally:
        logger.enable("services")
    return out, rules


def _types(p: Param) -> str:
    return " or ".join(p.types) if p.types else "any"


def _default(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _args_cell(spec: OpSpec, op: Op) -> str:
    if not spec.params:
        return "none"
    parts = []
    for p in spec.params:
        need = "**required**" if p.required else f"default {_default(p.default)}"
        note = op.notes.get(p.name)
        parts.append(f"`{p.name}` {_types(p)}, {need}" + (f" ({note})" if note else ""))
    return "; ".join(parts)


def _roles(rules: Mapping[str, Mapping[str, Rule]], service: str, op: str) -> str:
    if service == "broker":
        return "any"
    rule = rules.get(service, {}).get(op, DEFAULT_RULE)
    roles = ", ".join(r for r in ("client", "operator", "service", "agent") if r in rule.roles)
    if rule.own:
        roles += f" (agent: only with `{rule.own}` = its own node id)"
    return roles


def markdown(
    actual: Mapping[str, Mapping[str, OpSpec]], rules: Mapping[str, Mapping[str, Rule]] | None = None
) -> str:
    """The reference tables for ``actual`` (see :func:`actual_operations`), ``rules``
    (default :func:`actual_rules`) and :data:`DECLARED`."""
    rules = actual_rules() if rules is None else rules
    out: list[str] = []
    for service in SERVICES:
        out += ["", f"#### `{service}`", ""]
        out += ["| op | arguments | result | errors | roles | idempotent |", "|---|---|---|---|---|---|"]
        ops = actual.get(service, {})
        for name in sorted(ops):
            op = DECLARED.get(service, {}).get(name)
            if op is None:
                raise KeyError(f"{service}.{name} is not declared in services/reference.py")
            errors = ", ".join(f"`{e}`" for e in op.errors) or "-"
            out.append(
                f"| `{name}` | {_args_cell(ops[name], op)} | {op.result} | {errors} | "
                f"{_roles(rules, service, name)} | {'yes' if op.idempotent else 'no'} |"
            )
    return "\n".join(out[1:])


def drift(actual: Mapping[str, Mapping[str, OpSpec]]) -> list[str]:
    """What differs between the declared and the answered operations (empty: nothing)."""
    problems = []
    for service in SERVICES:
        have, declared = set(actual.get(service, {})), set(DECLARED.get(service, {}))
        problems += [f"{service}.{op} is answered but not declared" for op in sorted(have - declared)]
        problems += [f"{service}.{op} is declared but not answered" for op in sorted(declared - have)]
        for op, decl in DECLARED.get(service, {}).items():
            names = {p.name for p in actual.get(service, {}).get(op, OpSpec(())).params}
            problems += [f"{service}.{op}: note for unknown argument {a}" for a in decl.notes if a not in names]
    return problems


BEGIN_MARK = "<!-- operations reference: generated by `python -m services.reference --write docs/protocol.md` -->"
END_MARK = "<!-- end of operations reference -->"


def render_into(text: str, tables: str) -> str:
    """``text`` with the part between the markers replaced by ``tables``."""
    start, end = text.index(BEGIN_MARK) + len(BEGIN_MARK), text.index(END_MARK)
    return text[:start] + "\n" + tables + "\n" + text[end:]


def main(argv: list[str]) -> int:
    """Print the tables, or ``--write FILE`` them between the markers."""
    actual = actual_operations()
    problems = drift(actual)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    tables = markdown(actual)
    if len(argv) == 2 and argv[0] == "--write":
        path = Path(argv[1])
        path.write_text(render_into(path.read_text(), tables))
    else:
        print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
