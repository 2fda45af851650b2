"""Who may do what: the role sets of operations and the checks on a message's sender.

Each service declares the rule of each of its operations where it registers it
(``allow=`` of :meth:`phantom_bus.service.Service.operation`); an operation
declared without one, or unknown, gets :data:`DEFAULT_RULE`. The service base
checks every request's caller against that rule (:func:`authorise`) before any
handler runs. Membership takes heartbeats and discovery beacons only from the
agent key of the node they name (:func:`speaks_for`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from phantom_bus.errors import Refused
from phantom_bus.security.names import Principal, parse_user_id

#: Every role that may call something (the broker key only serves; it is never a caller).
CALLERS = frozenset({"client", "operator", "service", "agent"})


@dataclass(frozen=True, slots=True)
class Rule:
    """The roles that may call an operation; for agents, ``own`` names the argument
    that must be their own node id (an agent confirms only its own replicas)."""

    roles: frozenset[str]
    own: str | None = None


#: Anyone with an authorized key (clients, operators, services, agents): reads.
READ = Rule(CALLERS)
#: Clients, operators and services: selecting and releasing.
USE = Rule(frozenset({"client", "operator", "service"}))
#: Operators and services only: everything that changes the cluster. Services may
#: call everything: they call each other on the manager's behalf.
ADMIN = Rule(frozenset({"operator", "service"}))
#: The rule of an operation declared without one, and of an unknown operation:
#: operators and services only (fail closed for the rest).
DEFAULT_RULE = ADMIN


def authorise(
    caller: str | bytes | None, service: str, op: str, args: Mapping[str, Any], rule: Rule = DEFAULT_RULE
) -> Principal:
    """Check that ``caller`` (a ZAP User-Id) may call ``service.op`` with ``args`` under
    ``rule`` (the one the service declared for the operation); returns its principal or
    raises :class:`Refused` saying who may."""
    principal = parse_user_id(caller)
    if principal is None:
        raise Refused(
            f"{service}.{op} refused: the request carries no authenticated caller "
            "(is the broker running with security on?)",
            service=service,
            op=op,
        )
    if principal.role not in rule.roles:
        raise Refused(
            f"{service}.{op} refused: key {principal} has role {principal.role}; "
            f"this operation needs one of: {', '.join(sorted(rule.roles))}",
            service=service,
            op=op,
            caller=principal.user_id,
            allowed=sorted(rule.roles),
        )
    if rule.own is not None and principal.role == "agent" and args.get(rule.own) != principal.name:
        raise Refused(
            f"{service}.{op} refused: agent key {principal} may act only for node {principal.name!r}, "
            f"not {args.get(rule.own)!r}",
            service=service,
            op=op,
            caller=principal.user_id,
        )
    return principal


def speaks_for(user_id: str | bytes | None, node: str) -> bool:
    """True if the sender with ``user_id`` may beacon or heartbeat as ``node``: its
    agent key is filed under that node id."""
    principal = parse_user_id(user_id)
    return principal is not None and principal.role == "agent" and principal.name == node
