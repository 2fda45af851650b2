"""Events: what cores return and what shells publish on the bus.

A core never publishes anything itself; it returns :class:`Event` values. The
shell publishes them on the bus (topic = ``kind``); code that embeds a core
reads the events its calls return.

With several brokers, a publisher sends every event to each of them and a
subscriber hears each event once per broker. :class:`Deduplicator` turns those
copies back into one stream: every event carries its publisher's ``origin``
and a per-origin ``seq`` (1, 2, 3...), and an event is delivered only if its
``seq`` is above the last one delivered from its origin. So each event is
delivered at most once and the events of one origin never out of order; an
event that every broker lost, or that a faster copy of a later one overtook,
is skipped and counted as a gap (events are hints: consumers re-read state).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: ``kind`` such as ``node.discovered`` and its data."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The event body as published on the bus."""
        return {"kind": self.kind, **self.data}


#: Publishers remembered by a :class:`Deduplicator`: far more than the processes
#: of a cluster that publish (services restart with a new origin each time).
MAX_ORIGINS = 4096


class Deduplicator:
    """Delivers each bus event once and in per-origin order, from the copies that
    several brokers relay (sans-I/O; see the module docstring).

    ``accept(event)`` is True when the event should be delivered. An event
    without ``origin``/``seq`` (an older publisher) is always delivered. The
    least recently heard origins beyond ``max_origins`` are forgotten.
    """

    __slots__ = ("_last", "counters", "max_origins")

    def __init__(self, max_origins: int = MAX_ORIGINS) -> None:
        if max_origins < 1:
            raise ValueError("max_origins must be at least 1")
        self.max_origins = max_origins
        self._last: OrderedDict[str, int] = OrderedDict()
        self.counters = {"delivered": 0, "duplicates": 0, "gaps": 0, "unnumbered": 0}

    def accept(self, event: Mapping[str, Any]) -> bool:
        """True if ``event`` is new (deliver it), False for a copy or an older event."""
        origin, seq = event.get("origin"), event.get("seq")
        if not isinstance(origin, str) or not isinstance(seq, int) or isinstance(seq, bool):
            self.counters["unnumbered"] += 1
            return True
        last = self._last.get(origin)
        if last is not None:
            self._last.move_to_end(origin)
            if seq <= last:
                self.counters["duplicates"] += 1
                return False
            if seq > last + 1:
                self.counters["gaps"] += seq - last - 1
        elif len(self._last) >= self.max_origins:
            self._last.popitem(last=False)
        self._last[origin] = seq
        self.counters["delivered"] += 1
        return True

    def origins(self) -> int:
        """How many publishers are remembered."""
        return len(self._last)
