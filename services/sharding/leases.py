"""Primary leases, the control plane's side (sans-I/O).

An agent renews its node's primary lease every ``lease / 4`` seconds with the
sharding operation ``renew``; the reply lists the shards the node is primary
of *now*, and the agent holds each listed shard until ``sent + lease`` on its
own clock, where ``sent`` is when it sent that renewal (see
services/agent/participant.py). The agent fences a primary the moment its
lease runs out.

The rule on this side: when a shard loses its primary (the node died, or
stepped down for a planned hand-off), no other node is promoted until either

* the deposed node said so: a renewal sent after the step-down no longer
  holds the shard (the node has demoted or fenced it), or
* ``lease + lease_drift`` seconds have passed since this service last
  answered a renewal of that node.

Why that is enough: the renewal the agent's lease counts from was *sent*
before this service answered it, so on a clock running at the same rate the
agent's lease ends before ``last answer + lease``. ``lease_drift`` covers the
rest: clocks that run at different rates (monotonic clocks drift by well under
0.1 %, i.e. 2 ms over a 2 s lease) and the time the agent needs to start its
``fence`` callback. After a restart this service has answered nobody yet, so
it counts from its own start: a node that renewed with the previous process
waits out a whole lease.

Renewals carry ``(incarnation, seq)``; an older one than already seen (a
retry that arrived late) neither renews nor releases anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class PrimaryLeases:
    """Last renewal per node and the hand-offs waiting for a deposed primary to let go."""

    lease: float
    drift: float
    started: float | None = None  # set when restored: nodes may hold leases from before
    _last: dict[str, float] = field(default_factory=dict)
    _seq: dict[str, tuple[int, int]] = field(default_factory=dict)
    _deposed: dict[tuple[str, str], bool] = field(default_factory=dict)  # (shard, node) -> let go

    def renew(self, node: str, incarnation: int, seq: int, holding: Iterable[str], now: float) -> bool:
        """Record a renewal; False if it is older than one already seen (ignored).

        A fresh renewal that no longer holds a shard ``node`` was deposed from
        releases that shard: the agent stops leasing what it does not hold
        when it sends a renewal, so it cannot take the shard back later.
        """
        key = (incarnation, seq)
        if key <= self._seq.get(node, (-1, -1)):
            return False
        self._seq[node] = key
        self._last[node] = now
        held = set(holding)
        for pair in self._deposed:
            if pair[1] == node and pair[0] not in held:
                self._deposed[pair] = True
        return True

    def depose(self, shard: str, node: str) -> None:
        """``node`` stopped being ``shard``'s primary in the map: it must let go first."""
        self._deposed[(shard, node)] = False

    def may_promote(self, shard: str, deposed: str, now: float) -> bool:
        """Whether another node may become ``shard``'s primary now that ``deposed`` lost it."""
        return self._deposed.get((shard, deposed), False) or now >= self.expires(deposed)

    def expires(self, node: str) -> float:
        """When any lease ``node`` may still hold has surely ended (on this clock)."""
        last = self._last.get(node, self.started)
        if last is None:
            return -math.inf
        return last + self.lease + self.drift

    def promoted(self, shard: str, deposed: str) -> None:
        """The hand-off is over: forget it."""
        self._deposed.pop((shard, deposed), None)


__all__ = ["PrimaryLeases"]
