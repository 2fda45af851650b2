"""Events: what cores return and what shells publish on the bus.

A core never publishes anything itself; it returns :class:`Event` values. The
shell publishes them on the bus (topic = ``kind``) and runs the callbacks that
embedding code registered with :class:`EventHooks`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: ``kind`` such as ``node.discovered`` and its data."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The event body as published on the bus."""
        return {"kind": self.kind, **self.data}


Callback = Callable[[Event], None]


class EventHooks:
    """Callbacks per event kind for code that embeds a core.

    ``on("node.lost", fn)`` registers ``fn``; ``on("*", fn)`` receives every
    event. A callback that raises is logged and skipped: the others still run
    and the caller never sees the exception.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: dict[str, list[Callback]] = {}

    def on(self, kind: str, fn: Callback) -> Callback:
        """Register ``fn`` for ``kind`` (``"*"`` for all); returns ``fn``."""
        with self._lock:
            self._hooks.setdefault(kind, []).append(fn)
        return fn

    def off(self, kind: str, fn: Callback) -> None:
        """Unregister ``fn``; unknown pairs are ignored."""
        with self._lock:
            fns = self._hooks.get(kind, [])
            if fn in fns:
                fns.remove(fn)

    def fire(self, events: Iterable[Event]) -> None:
        """Run the callbacks of each event in order."""
        for event in events:
            with self._lock:
                fns = [*self._hooks.get(event.kind, ()), *self._hooks.get("*", ())]
            for fn in fns:
                try:
                    fn(event)
                except Exception:
                    logger.exception("callback {} for {} raised", getattr(fn, "__name__", fn), event.kind)
