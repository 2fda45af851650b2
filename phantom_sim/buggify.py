"""Deliberately broken variants of the real code, switched on only by the simulator's tests.

Each variant is a patch applied for the length of one run (:func:`active`), to
show the invariants have teeth: with it on, the short run must fail. Nothing
here is imported by the services.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

#: name -> (description, install() -> undo())
VARIANTS: dict[str, tuple[str, Callable[[], Callable[[], None]]]] = {}
_on: list[str] = []


def variant(name: str, description: str) -> Callable[[Callable[[], Callable[[], None]]], Callable[[], Callable[[], None]]]:
    def register(install: Callable[[], Callable[[], None]]) -> Callable[[], Callable[[], None]]:
        VARIANTS[name] = (description, install)
        return install

    return register


def enable(*names: str) -> None:
    """Switch variants on for the runs that follow (in this process)."""
    for name in names:
        if name not in VARIANTS:
            raise KeyError(f"no broken variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    _on[:] = list(names)


def on(name: str) -> bool:
    """Whether the simulator switched ``name`` on (a fault point in a simulated shell)."""
    return name in _on


@contextlib.contextmanager
def active() -> Iterator[None]:
    undo = [VARIANTS[name][1]() for name in _on if name in VARIANTS]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def _patch(obj: Any, attr: str, new: Any) -> Callable[[], None]:
    old = getattr(obj, attr)
    setattr(obj, attr, new)
    return lambda: setattr(obj, attr, old)
