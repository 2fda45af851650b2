"""What the manager core asks of the shell: actions (with their retry rules) and decisions.

An :class:`Action` is one idempotent request to another service; a
:class:`Decision` is everything one input led to (actions in order, events,
registry changes). :class:`_Out` collects them while the core handles an input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from phantom_bus.errors import BadRequest, Conflict, NotFound, PhantomError, Refused
from phantom_bus.events import Event

from .registry import Change

MEMBERSHIP: Final = "membership"
DISCOVERY: Final = "discovery"
SHARDING: Final = "sharding"
BALANCER: Final = "balancer"

#: Sharding operations retried for as long as the verdict behind them stands.
FAILOVER: Final = ("node_dead", "node_alive")
#: Attempts of an action that is not a failover before it is given up (count);
#: with the shell's back-off that is about half a minute, the reconcile period.
MAX_ATTEMPTS: Final = 10


@dataclass(frozen=True, slots=True)
class Action:
    """One request for the shell to send: ``service``, ``op`` and its ``args``.

    ``args`` always holds ``node``. ``reason`` is for the log line. Every
    action is idempotent, so the shell may retry it (also after a restart).
    """

    service: str
    op: str
    args: Mapping[str, Any] = field(default_factory=dict, hash=False)
    reason: str = ""

    @property
    def node(self) -> str | None:
        """The node the action is about."""
        node = self.args.get("node")
        return node if isinstance(node, str) else None

    def to_dict(self) -> dict[str, Any]:
        """The action as a plain map (for logs and tests)."""
        return {"service": self.service, "op": self.op, "args": dict(self.args), "reason": self.reason}

    @property
    def failover(self) -> bool:
        """A failover (``sharding.node_dead`` / ``node_alive``): retried whatever the error."""
        return self.service == SHARDING and self.op in FAILOVER

    def done_by(self, err: PhantomError) -> bool:
        """Whether ``err`` means the action had already taken effect (it is idempotent)."""
        if isinstance(err, NotFound) and self.op in ("forget", "remove", "remove_node", "forget_node"):
            return True
        if isinstance(err, NotFound) and self.failover:
            return True  # sharding does not hold the node: nothing to fail over or back
        return isinstance(err, Conflict) and self.service == DISCOVERY and self.op == "register"

    def gives_up(self, err: PhantomError, attempt: int) -> bool:
        """Whether attempt number ``attempt``, answered ``err``, is the last: a definitive
        answer (bad request, refused, not found, conflict) ends a non-failover action at
        once, anything else (store_unavailable, timeout, internal) after MAX_ATTEMPTS.
        A failover is never given up while its verdict stands."""
        definitive = isinstance(err, BadRequest | Refused | NotFound | Conflict)
        return not self.failover and (definitive or attempt >= MAX_ATTEMPTS)


@dataclass(frozen=True, slots=True)
class Decision:
    """What one input led to: actions to carry out in order, events, registry changes.

    ``value`` is the reply to an operator command (the node record as a map),
    ``None`` for other inputs.
    """

    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    changes: tuple[Change, ...] = ()
    value: Any = None

    def __bool__(self) -> bool:
        return bool(self.actions or self.events or self.changes)


class _Out:
    """Actions and events collected while one input is handled."""

    __slots__ = ("actions", "events")

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.events: list[Event] = []

    def act(self, service: str, op: str, reason: str, **args: Any) -> None:
        self.actions.append(Action(service, op, args, reason))
