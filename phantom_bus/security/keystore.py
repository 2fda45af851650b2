"""The authorized public keys as read at one moment, and what tells that they changed."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zmq.utils import z85

from phantom_bus.security.keys import read_key_file
from phantom_bus.security.names import ROLES, Principal


def directory_signature(authorized: Path) -> tuple[Any, ...]:
    """What changes whenever a key under ``authorized`` is added, removed or rewritten."""
    parts: list[Any] = []
    for role in ROLES:
        try:
            with os.scandir(authorized / role) as entries:
                for entry in entries:
                    if entry.name.endswith(".pub") and not entry.name.startswith("."):
                        st = entry.stat()
                        parts.append((role, entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return tuple(sorted(parts))


class KeyStore:
    """The authorized public keys: Z85 key -> :class:`Principal`, as read at one moment.

    A file that cannot be read, and a key filed under two identities, are left
    out (and listed in :attr:`problems`): when in doubt, nobody gets in.
    """

    def __init__(self, keys: Mapping[bytes, Principal] | None = None, problems: Iterable[str] = ()) -> None:
        self.keys: dict[bytes, Principal] = dict(keys or {})
        self.users: frozenset[str] = frozenset(p.user_id for p in self.keys.values())
        self.problems = list(problems)

    @classmethod
    def load(cls, authorized: Path) -> KeyStore:
        """Read every ``<role>/<name>.pub`` under ``authorized``."""
        keys: dict[bytes, Principal] = {}
        problems: list[str] = []
        ambiguous: set[bytes] = set()
        for role in ROLES:
            folder = authorized / role
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.suffix != ".pub":
                    continue
                try:
                    principal = Principal(role, path.stem)
                    public, _ = read_key_file(path)
                except (OSError, ValueError) as exc:
                    problems.append(f"{path}: {exc}")
                    continue
                if public in keys and keys[public] != principal:
                    problems.append(f"{path}: the same key is also filed as {keys[public].ref}; both refused")
                    ambiguous.add(public)
                keys[public] = principal
        for public in ambiguous:
            keys.pop(public, None)
        return cls(keys, problems)

    def lookup(self, public: bytes) -> Principal | None:
        """The principal of a binary (32-byte) or Z85 (40-byte) public key."""
        if len(public) == 32:
            public = z85.encode(public)
        return self.keys.get(public)

    def __len__(self) -> int:
        return len(self.keys)
