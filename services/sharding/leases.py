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
  answered a renewal of that node *before* the step-down.

Why that is enough: a renewal's reply lists only the shards the map says the
node is primary of when it is answered, and the agent holds exactly the listed
shards; so after the step-down no reply grants the shard again, and the last
grant came with the last answer before it. That renewal was *sent* before it
was answered, so on a clock running at the same rate the agent's lease ends
before ``last answer + lease``. ``lease_drift`` covers the rest: clocks that
run at different rates (monotonic clocks drift by well under 0.1 %, i.e. 2 ms
over a 2 s lease) and the time the agent needs to start its ``fence`` callback.
A node that keeps renewing but never lets go (a demote that hangs) thus holds
up the hand-off for at most ``lease + lease_drift``, never for ever.

After a restart or a leader take-over this service has answered nobody yet:
it counts from its own start (``started``), so a shard that lost its primary
just before waits at most ``lease + lease_drift`` from then, or less if the
deposed node lets go sooner. Every answer the previous leader gave came
before this one started: it stops answering before its leadership lease ends,
and this one takes over only after that.

Renewals carry ``(incarnation, seq)``; an older one than already seen (a
retry that arrived late) neither renews nor releases anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Handoff:
    until: float | None  # the deposed node's lease has surely ended by then (None: count from ``started``)
    released: bool = False  # it said it let go


@dataclass
class PrimaryLeases:
    """Last renewal per node and the hand-offs waiting for a deposed primary to let go."""

    lease: float
    drift: float
    started: float | None = None  # set when restored: nodes may hold leases from before
    _last: dict[str, float] = field(default_factory=dict)
    _seq: dict[str, tuple[int, int]] = field(default_factory=dict)
    _handoffs: dict[tuple[str, str], _Handoff] = field(default_factory=dict)  # (shard, deposed node)

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
        for (shard, deposed), h in self._handoffs.items():
            if deposed == node and shard not in held:
                h.released = True
        return True

    def depose(self, shard: str, node: str) -> None:
        """``node`` stopped being ``shard``'s primary in the map: it must let go first.

        No reply after this grants ``node`` the shard, so its lease ends at
        the latest ``lease + drift`` after the last renewal answered so far.
        """
        self._handoffs[(shard, node)] = _Handoff(self.expires(node))

    def depose_restored(self, shard: str, node: str) -> None:
        """A hand-off the previous process began: ``node`` may hold a lease it granted."""
        self._handoffs[(shard, node)] = _Handoff(None)

    def may_promote(self, shard: str, deposed: str, now: float) -> bool:
        """Whether another node may become ``shard``'s primary now that ``deposed`` lost it."""
        return now >= self.waiting_until(shard, deposed)

    def waiting_until(self, shard: str, deposed: str) -> float:
        """When the hand-off of ``shard`` from ``deposed`` may go ahead at the latest."""
        h = self._handoffs.get((shard, deposed))
        if h is None or h.until is None:  # deposed before this process started: count from its start
            if h is not None and h.released:
                return -math.inf
            return -math.inf if self.started is None else self.started + self.lease + self.drift
        return -math.inf if h.released else h.until

    def expires(self, node: str) -> float:
        """When any lease ``node`` holds from renewals answered so far has surely ended (on this clock)."""
        last = self._last.get(node, self.started)
        if last is None:
            return -math.inf
        return last + self.lease + self.drift

    def promoted(self, shard: str, deposed: str) -> None:
        """The hand-off is over: forget it."""
        self._handoffs.pop((shard, deposed), None)


__all__ = ["PrimaryLeases"]
