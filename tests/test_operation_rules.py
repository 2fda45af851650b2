"""Who may call what: each service declares the rule of each of its operations
(``allow=``), and those rules are exactly the ones of the single table the bus
used to hold (kept below as test data), so moving them widened or narrowed nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from phantom_bus import config
from phantom_bus import security as secmod
from phantom_bus.errors import Refused
from phantom_bus.security import ADMIN, READ, USE, Rule
from phantom_bus.service import Service
from services import reference

_OWN_NODE = Rule(frozenset({"agent", "operator", "service"}), own="node")

#: The role table as phantom_bus/security.py held it, by operation name or ``service.op``.
FORMER_TABLE: Mapping[str, Rule] = {
    **dict.fromkeys(
        (
            "ping", "status", "nodes", "node", "members", "member", "stats",
            "lookup", "map", "shards", "moves", "health", "sole_replicas",
        ),
        READ,
    ),
    **dict.fromkeys(("select", "release"), USE),
    **dict.fromkeys(
        (
            "register", "remove", "drain", "approve", "admit", "forget",
            "create_keyspace", "split", "merge", "add_node", "remove_node", "drain_node",
            "node_dead", "node_alive", "node_update", "forget_node", "report_load", "report_keys",
        ),
        ADMIN,
    ),
    "sharding.confirm": _OWN_NODE,
    "balancer.routing": READ,
    "balancer.report": USE,
    "sharding.renew": _OWN_NODE,
}  # fmt: skip


def former_rule(service: str, op: str) -> Rule:
    """The rule the former table gave ``service.op``: its own entry, else the operation's, else ADMIN."""
    return FORMER_TABLE.get(f"{service}.{op}") or FORMER_TABLE.get(op) or ADMIN


@pytest.fixture(scope="module")
def rules() -> dict[str, dict[str, Rule]]:
    return reference.actual_rules()


def test_every_standard_service_declares_the_rules_of_the_former_table(rules: dict[str, dict[str, Rule]]) -> None:
    assert set(rules) == {"discovery", "membership", "sharding", "balancer", "manager"}
    differ = {
        f"{service}.{op}": (rule, former_rule(service, op))
        for service, ops in rules.items()
        for op, rule in ops.items()
        if rule != former_rule(service, op)
    }
    assert differ == {}
    # Every entry of the former table names an operation some service still answers.
    answered = {op for ops in rules.values() for op in ops} | {f"{s}.{op}" for s, ops in rules.items() for op in ops}
    assert set(FORMER_TABLE) - answered == set()


def test_an_operation_declared_without_a_rule_or_unknown_is_for_operators_and_services_only() -> None:
    svc = Service("echo", config.load({"security": "off"}, env={}))
    svc.add_operation("new_op", lambda: None)
    svc.add_operation("open_op", lambda: None, allow=READ)
    assert svc.rule("new_op") == ADMIN == secmod.DEFAULT_RULE
    assert svc.rule("no_such_op") == ADMIN
    assert svc.rule("open_op") == READ
    assert svc.rule("ping") == READ


@pytest.mark.parametrize(
    ("caller", "service", "op", "args", "allowed"),
    [
        ("client:app", "balancer", "select", {"key": "k"}, True),
        ("client:app", "balancer", "release", {}, True),
        ("client:app", "manager", "status", {}, True),
        ("client:app", "sharding", "map", {}, True),
        ("client:app", "manager", "drain", {"node": "node-1"}, False),
        ("client:app", "discovery", "register", {}, False),
        ("client:app", "sharding", "split", {}, False),
        ("client:app", "echo", "anything-new", {}, False),  # declared by no one: operators and services only
        ("operator:admin", "manager", "drain", {"node": "node-1"}, True),
        ("operator:admin", "sharding", "merge", {}, True),
        ("service:manager", "sharding", "node_dead", {"node": "node-1"}, True),
        ("service:balancer", "sharding", "report_load", {}, True),
        ("agent:node-1", "sharding", "map", {}, True),
        ("agent:node-1", "sharding", "confirm", {"shard": "s", "node": "node-1"}, True),
        ("agent:node-1", "sharding", "confirm", {"shard": "s", "node": "node-2"}, False),
        ("agent:node-1", "manager", "register", {}, False),
        ("agent:node-1", "balancer", "select", {}, False),
        ("broker:broker", "manager", "status", {}, False),
        (None, "manager", "status", {}, False),
        ("not-a-user-id", "manager", "status", {}, False),
    ],
)
def test_role_table(
    rules: dict[str, dict[str, Rule]], caller: str | None, service: str, op: str, args: dict[str, Any], allowed: bool
) -> None:
    rule = rules.get(service, {}).get(op, secmod.DEFAULT_RULE)
    if allowed:
        assert secmod.authorise(caller, service, op, args, rule).user_id == caller
    else:
        with pytest.raises(Refused):
            secmod.authorise(caller, service, op, args, rule)
