"""Who a key belongs to: roles, names and the ZAP User-Id ``"<role>:<name>"``.

``role`` is one of :data:`ROLES`; an agent's ``name`` is its node id, a
service's its service name. The path of an authorized key *is* its identity:
the ZAP handler answers a successful handshake with the User-Id
``"<role>:<name>"``, which libzmq then stamps on every message of that
connection, so a receiver knows who sent each message without trusting
anything in it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from phantom_bus import ids
from phantom_bus.config import ConfigError

ROLES = ("broker", "service", "agent", "operator", "client")


class SecurityError(ConfigError):
    """Security is on but cannot be used as configured (missing or bad key, no handler)."""


def check_name(name: str, what: str = "key name") -> str:
    """A key name: the node-id rule (:mod:`phantom_bus.ids`: 1..128 chars of
    ``[A-Za-z0-9._:-]`` starting with a letter or digit), since an agent's key is named
    after its node; raises ValueError otherwise."""
    if not ids.is_node_id(name):
        raise ValueError(f"bad {what} {name!r}: 1..128 of A-Z a-z 0-9 . _ : -, starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a key belongs to: a role and a name (``agent``, ``node-1``)."""

    role: str
    name: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: one of {', '.join(ROLES)}")
        check_name(self.name)

    @property
    def user_id(self) -> str:
        """The ZAP User-Id of this principal, ``role:name``."""
        return f"{self.role}:{self.name}"

    @property
    def ref(self) -> str:
        """``role/name``, as in ``PHANTOM_CURVE_KEY`` and the key directory."""
        return f"{self.role}/{self.name}"

    @classmethod
    def parse_ref(cls, ref: str) -> Principal:
        """``role/name`` -> Principal; ValueError if malformed."""
        role, sep, name = ref.partition("/")
        if not sep:
            raise ValueError(f"expected ROLE/NAME, got {ref!r}")
        return cls(role, name)

    def __str__(self) -> str:
        return self.user_id


@functools.lru_cache(maxsize=4096)
def parse_user_id(user_id: str | bytes | None) -> Principal | None:
    """The principal of a ZAP User-Id (``role:name``), or None if it is not one of ours."""
    if user_id is None:
        return None
    text = user_id.decode("utf-8", "replace") if isinstance(user_id, bytes) else user_id
    role, sep, name = text.partition(":")
    if not sep:
        return None
    try:
        return Principal(role, name)
    except ValueError:
        return None
