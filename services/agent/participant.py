"""The participant state machine: what the database on this node should be, per shard (sans-I/O).

The agent tells the database, in order and one step at a time per shard, what
to become. Per shard the database is in one of five states and moves between
them only by these transitions::

    offline --join--> joining --replica--> replica --primary--> primary
       ^                 |                 ^  |  ^                |  |
       |                 |     (demote) ---+  |  +--- demote -----+  |
       +------ drop -----+--------------------+                      |
                                               fenced <-- fence -----+
    offline --replica--> replica     (a copy the node already has, e.g. after a restart)
    replica --drop--> offline --join--> joining   (the map asks this node for a new copy)
    fenced  --primary--> primary     (the lease came back and the map still says primary)
    fenced  --demote---> replica

Inputs (each with ``now``, the caller's monotonic clock):

* :meth:`Participant.desire`: the shard map's view of this node, the role it
  should have per shard and the sources to copy from, at a map epoch. A map
  older than one already taken is refused (counted, nothing changes); the same
  epoch again is a duplicate and changes nothing.
* :meth:`Participant.granted`: a reply of the control plane's lease renewal,
  sent at ``sent_at``: the shards this node is primary of. Each listed shard is
  leased until ``sent_at + lease``.
* :meth:`Participant.done`: the database finished (or failed) a transition.
* :meth:`Participant.tick`: time passes; a lease that ran out fences.

Outputs: lists of :class:`Transition` to carry out, in order. At most one
transition per shard is in flight; the next one for that shard comes only after
:meth:`done`. Every transition carries the map epoch it was decided under, and
the epochs of one shard's transitions never go down.

The primary rule: a shard becomes ``primary`` only while this node holds an
unexpired lease for it, and a ``primary`` shard whose lease ends (no renewal in
``lease`` seconds, or a renewal that no longer lists it) is ``fence``d at once:
the database must stop taking writes for it. The control plane waits at least
``lease`` plus a drift margin after its last renewal of this node before it
promotes another node (see services/sharding/leases.py), so two nodes never
both hold an unexpired primary lease for one shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

State = Literal["offline", "joining", "replica", "primary", "fenced"]
Kind = Literal["join", "replica", "primary", "demote", "fence", "drop"]
Wanted = Literal["joining", "replica", "primary"]

STATES: tuple[State, ...] = ("offline", "joining", "replica", "primary", "fenced")
KINDS: tuple[Kind, ...] = ("join", "replica", "primary", "demote", "fence", "drop")

# (kind, from) -> to: the only legal moves.
MOVES: dict[tuple[Kind, State], State] = {
    ("join", "offline"): "joining",
    ("replica", "joining"): "replica",
    ("replica", "offline"): "replica",
    ("primary", "replica"): "primary",
    ("primary", "fenced"): "primary",
    ("demote", "primary"): "replica",
    ("demote", "fenced"): "replica",
    ("fence", "primary"): "fenced",
    ("drop", "joining"): "offline",
    ("drop", "replica"): "offline",
    ("drop", "primary"): "offline",
    ("drop", "fenced"): "offline",
}

# Safety first: stop writes, then step down, then free space, then take new work.
_ORDER: dict[Kind, int] = {"fence": 0, "demote": 1, "drop": 2, "join": 3, "replica": 4, "primary": 5}


@dataclass(frozen=True, slots=True)
class Transition:
    """One step the database must take for one shard.

    ``sources`` are the node ids to copy from (``join``) or catch up from
    (``replica``), the shard's primary first. ``lease_until`` (``primary``
    only) is when the lease ends unless renewed, on the caller's clock.
    """

    shard: str
    kind: Kind
    epoch: int
    before: State
    after: State
    sources: tuple[str, ...] = ()
    lease_until: float | None = None


@dataclass(slots=True)
class _Shard:
    state: State = "offline"
    epoch: int = 0  # epoch of the last transition applied (or started)
    busy: Transition | None = None
    copied: bool = False  # the join finished: ready to be confirmed
    retry_at: float = -math.inf  # after a failed transition
    recopy: bool = False  # sharding refused the copy as made for a cancelled assignment
    join_after: int = -1  # join only at a map epoch at least this (the current assignment's)


@dataclass(frozen=True, slots=True)
class Desired:
    """What the map wants of this node for one shard."""

    role: Wanted
    sources: tuple[str, ...] = ()


@dataclass
class Participant:
    """Per-shard states of one node's database; see the module docstring."""

    lease: float
    retry_after: float = 2.0
    map_epoch: int = -1
    refused: int = 0  # stale maps and stale lease replies ignored
    _shards: dict[str, _Shard] = field(default_factory=dict)
    _wanted: dict[str, Desired] = field(default_factory=dict)
    _leased: frozenset[str] = frozenset()
    _lease_until: float = -math.inf
    _lease_epoch: int = -1
    _renewal_sent: float = -math.inf

    # -- inputs --------------------------------------------------------------------

    def desire(self, epoch: int, wanted: Mapping[str, Desired], now: float) -> list[Transition]:
        """The map at ``epoch`` wants ``wanted`` (shards absent: nothing on this node)."""
        if epoch < self.map_epoch:
            self.refused += 1
            return []
        if epoch == self.map_epoch:
            return self.tick(now)
        self.map_epoch = epoch
        self._wanted = dict(wanted)
        for shard in wanted:
            self._shards.setdefault(shard, _Shard())
        return self.tick(now)

    def granted(self, epoch: int, primaries: Iterable[str], sent_at: float, now: float) -> list[Transition]:
        """A lease renewal sent at ``sent_at`` came back: ``primaries`` are leased until ``sent_at + lease``.

        The lease is checked at ``sent_at`` first: a renewal sent after the old
        lease had run out (the agent was paused, say) fences before it renews.
        """
        if epoch < self._lease_epoch or sent_at < self._renewal_sent:
            # An older map, or the reply to a renewal older than the last one sent
            # (which gave up what it did not hold): it grants nothing.
            self.refused += 1
            return self.tick(now)
        out = self._expire(sent_at)
        self._lease_epoch = epoch
        self._leased = frozenset(primaries)
        self._lease_until = sent_at + self.lease
        return self._merge(out, self.tick(now))

    def renewal(self, now: float) -> list[str]:
        """What to send with a renewal sent at ``now``: :meth:`holding`; stops leasing anything else.

        A shard leased but not held (granted, but the map has not said primary
        yet) is given up until the reply: the control plane may take a renewal
        that does not hold a deposed shard as that node letting go of it. For
        the same reason a reply to an earlier renewal, if it comes after this
        one was sent, is ignored.
        """
        held = self.holding()
        self._leased = self._leased & frozenset(held)
        self._renewal_sent = max(self._renewal_sent, now)
        return held

    def copy_refused(self, shard: str, epoch: int, since: int, now: float) -> list[Transition]:
        """Sharding refused the copy of ``shard`` made at ``epoch``: its assignment was
        cancelled and the current one began at map epoch ``since``. Copy again, from a
        map at least that new (a stale copy might have missed writes)."""
        st = self._shards.get(shard)
        if st is not None and st.state == "joining" and st.copied and st.epoch == epoch:
            st.copied = False
            st.recopy = True
            st.join_after = max(st.join_after, since)
        return self.tick(now)

    def done(self, transition: Transition, ok: bool, now: float) -> list[Transition]:
        """The database finished ``transition`` (``ok``) or failed it (it is retried later)."""
        st = self._shards.get(transition.shard)
        if st is None or st.busy != transition:
            return self.tick(now)  # a duplicate or unknown completion changes nothing
        st.busy = None
        if ok:
            st.state = transition.after
            st.copied = transition.kind == "join" or (st.copied and st.state == "joining")
        else:
            st.retry_at = now + self.retry_after
            if transition.kind == "fence":
                st.retry_at = now  # stopping writes is retried at once
        if st.state == "offline" and transition.shard not in self._wanted:
            del self._shards[transition.shard]
        return self.tick(now)

    def tick(self, now: float) -> list[Transition]:
        """Transitions due now: lease expiry first, then whatever moves a shard toward the map."""
        out = self._expire(now)
        for shard, st in self._shards.items():
            if st.busy is None and now >= st.retry_at:
                t = self._next(shard, st, now)
                if t is not None:
                    out.append(self._start(st, t))
        return sorted(out, key=lambda t: _ORDER[t.kind])

    # -- queries -------------------------------------------------------------------

    def state(self, shard: str) -> State:
        """The state of ``shard`` on this node (``offline`` when unknown)."""
        st = self._shards.get(shard)
        return "offline" if st is None else st.state

    def states(self) -> dict[str, State]:
        """Every shard this node holds or is working on, with its state."""
        return {s: st.state for s, st in self._shards.items()}

    def ready(self) -> list[str]:
        """Joining shards whose copy is complete: the agent confirms these to sharding."""
        return [s for s, st in self._shards.items() if st.state == "joining" and st.copied]

    def copy_epoch(self, shard: str) -> int:
        """The map epoch ``shard``'s copy was asked for (sent with its confirmation)."""
        st = self._shards.get(shard)
        return -1 if st is None else st.epoch

    def holding(self) -> list[str]:
        """Shards this node takes writes for or is becoming primary of (sent with each renewal)."""
        return sorted(
            s
            for s, st in self._shards.items()
            if st.state == "primary" or (st.busy is not None and st.busy.kind == "primary")
        )

    def awaiting_lease(self, now: float) -> bool:
        """Whether the map wants this node primary of a shard it holds no lease for (renew now)."""
        return any(
            want.role == "primary" and not self.leased(shard, now) and self.state(shard) in ("replica", "fenced")
            for shard, want in self._wanted.items()
        )

    def lease_until(self) -> float:
        """When the current lease ends (-inf before the first renewal)."""
        return self._lease_until

    def leased(self, shard: str, now: float) -> bool:
        """Whether this node holds an unexpired primary lease for ``shard``."""
        return shard in self._leased and now < self._lease_until

    # -- decisions -----------------------------------------------------------------

    def _expire(self, now: float) -> list[Transition]:
        out: list[Transition] = []
        for shard, st in self._shards.items():
            if st.state == "primary" and st.busy is None and not self.leased(shard, now):
                out.append(self._start(st, self._make(shard, st, "fence", max(st.epoch, self._lease_epoch))))
        return out

    def _next(self, shard: str, st: _Shard, now: float) -> Transition | None:
        want = self._wanted.get(shard)
        epoch = self.map_epoch
        if want is None:
            return None if st.state == "offline" else self._make(shard, st, "drop", epoch)
        if st.state == "primary":
            return None if want.role == "primary" else self._make(shard, st, "demote", epoch)
        if st.state == "fenced":
            if want.role == "primary":
                return self._make(shard, st, "primary", epoch) if self.leased(shard, now) else None
            return self._make(shard, st, "demote", epoch)
        if st.state == "offline":
            if want.role == "joining":
                if epoch < st.join_after:
                    return None  # the map with the current assignment has not come yet
                return self._make(shard, st, "join", epoch, want.sources)
            return self._make(shard, st, "replica", epoch, want.sources)
        if st.state == "joining":
            if want.role == "joining":
                # Copying, or copied and waiting for the confirmation to land; a copy
                # refused as stale is thrown away and made again.
                return self._make(shard, st, "drop", epoch) if st.recopy else None
            return self._make(shard, st, "replica", epoch, want.sources)
        # replica
        if want.role == "joining":
            # The map took this replica away and asks for a new copy (a leaving
            # replica dropped and re-added between two maps this node read): what
            # it holds missed writes meanwhile, so it copies afresh.
            return self._make(shard, st, "drop", epoch)
        if want.role == "primary" and self.leased(shard, now):
            return self._make(shard, st, "primary", epoch)
        return None

    def _make(self, shard: str, st: _Shard, kind: Kind, epoch: int, sources: tuple[str, ...] = ()) -> Transition:
        return Transition(
            shard,
            kind,
            max(epoch, st.epoch),
            st.state,
            MOVES[(kind, st.state)],
            sources,
            self._lease_until if kind == "primary" else None,
        )

    @staticmethod
    def _start(st: _Shard, t: Transition) -> Transition:
        st.busy = t
        st.epoch = t.epoch
        if t.kind != "join":
            st.copied = False
        st.recopy = False
        return t

    @staticmethod
    def _merge(a: list[Transition], b: list[Transition]) -> list[Transition]:
        return sorted([*a, *b], key=lambda t: _ORDER[t.kind])


def desired_from_map(node: str, replicas: Iterable[tuple[str, Iterable[tuple[str, str]]]]) -> dict[str, Desired]:
    """This node's :class:`Desired` per shard from ``(shard, [(node, role), ...])`` rows of a map.

    ``leaving`` still serves reads, so it counts as ``replica``; sources are the
    shard's other serving replicas, its primary first.
    """
    out: dict[str, Desired] = {}
    for shard, rows in replicas:
        roles = list(rows)
        mine = next((r for n, r in roles if n == node), None)
        if mine is None:
            continue
        others = sorted(
            (n for n, r in roles if n != node and r in ("primary", "replica", "leaving")),
            key=lambda n: (dict(roles)[n] != "primary", n),
        )
        role: Wanted = "joining" if mine == "joining" else "primary" if mine == "primary" else "replica"
        out[shard] = Desired(role, tuple(others))
    return out


__all__ = ["KINDS", "MOVES", "STATES", "Desired", "Participant", "Transition", "desired_from_map"]
