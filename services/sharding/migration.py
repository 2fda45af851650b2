"""The migration engine: carries a placement out safely, one small step at a time (sans-I/O).

The engine owns the replica roles of every shard and a target per shard (from
the planner). Each call to :meth:`Migrations.step` moves every unsettled
shard one safe step toward its target; :meth:`Migrations.confirm` records that
a joining replica is ready. The caller (the sharding core) turns every batch
of :class:`Change` values into one new map epoch.

A move of shard ``s`` from node A to node B goes:

1. B is added as ``joining`` (if the in-flight caps allow; else it waits).
2. B's agent calls ``confirm(s, B)``: B becomes ``replica``.
3. On a primary hand-off the primary steps down to ``replica`` in one step
   and B is promoted in a later step, so no epoch ever has two primaries and
   every epoch after the step-down knows A is not primary.
4. A becomes ``leaving`` (no new reads) and is dropped ``leave_grace``
   seconds later, so clients with the previous map finish their reads.

Safety rules, checked at every step:

* A live replica (``primary``/``replica`` on a node not down) is only made
  ``leaving`` if the shard keeps at least ``min(rf, floor)`` live replicas,
  where ``floor`` is the most live replicas the shard has had, lowered only
  when a node dies or is removed. So a move never leaves fewer live replicas
  than before it, and a drain with nowhere to go waits instead of shrinking.
* A replica on a dead node is dropped only once every live target is ready.
* A shard gets a new primary only when it has none: at once when its primary
  died (a ``replica`` on a live node, the planned primary first, then the
  node with the fewest primaries, then by node id, so a dead node's primaries
  spread over the survivors; a ``leaving`` one only if no ``replica`` is
  left), or in the step after
  a planned step-down.
* A shard that once had data and has no live replica is not copied to
  (there is nothing to copy from); it waits for a holder to come back.

Timeouts: a joining replica not confirmed within ``move_timeout`` is
removed and retried on the same node after ``retry_backoff`` (doubling per
failure). After ``move_retries`` failures the pair is reported as stuck; the
core then avoids that node for that shard and plans another target.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from phantom_bus.errors import BadRequest, Conflict, NotFound
from phantom_bus.shardmap import ROLES, SERVING, Role
from services.sharding.config import ShardingConfig
from services.sharding.leases import PrimaryLeases


@dataclass(frozen=True, slots=True)
class Change:
    """One role change of one replica: ``before``/``after`` None mean absent."""

    shard: str
    node: str
    before: Role | None
    after: Role | None


@dataclass(frozen=True, slots=True)
class Step:
    """What a step did: the role changes and the copies that failed too often."""

    changes: tuple[Change, ...] = ()
    stuck: tuple[tuple[str, str], ...] = ()


class _Shard:
    __slots__ = (
        "deposed",
        "failures",
        "floor",
        "joining",
        "leaving",
        "not_before",
        "order",
        "rf",
        "roles",
        "seeded",
        "stepdown",
        "target",
        "target_primary",
        "target_set",
    )

    def __init__(self, order: int, rf: int) -> None:
        self.order = order
        self.rf = rf
        self.roles: dict[str, Role] = {}
        self.target: tuple[str, ...] = ()
        self.target_set: frozenset[str] = frozenset()
        self.target_primary: str | None = None
        self.joining: dict[str, float] = {}
        self.leaving: dict[str, float] = {}
        self.stepdown: int | None = None  # round of a planned step-down awaiting promotion
        # The primary it lost (died or stepped down), until another is promoted:
        # promotion waits until that node has let go or its lease has surely ended.
        # "" after a restore: whoever it was, the lease rule counts from the restart.
        self.deposed: str | None = None
        self.floor = 0
        self.failures: dict[str, int] = {}
        self.not_before: dict[str, float] = {}
        self.seeded = False


@dataclass
class _Round:
    now: float
    changes: list[Change] = field(default_factory=list)
    stuck: list[tuple[str, str]] = field(default_factory=list)
    total: int = 0
    per_node: dict[str, int] = field(default_factory=dict)
    # Primaries per node, counted on first need: a failover picks the least loaded.
    primaries: dict[str, int] | None = None


class Migrations:
    """Replica roles and in-flight moves of every shard; see the module docstring."""

    def __init__(self, config: ShardingConfig | None = None) -> None:
        self.config = config or ShardingConfig()
        self._lock = threading.RLock()
        self._shards: dict[str, _Shard] = {}
        self._busy: set[str] = set()
        self._down: set[str] = set()
        self._evacuating: set[str] = set()
        self._round = 0
        self._order = 0
        # The lease rule (services/sharding/leases.py); None: promote at once.
        self.leases: PrimaryLeases | None = None

    # -- shards ----------------------------------------------------------------

    def add_shard(
        self, shard_id: str, rf: int, roles: Mapping[str, Role] | None = None, seeded: bool | None = None
    ) -> None:
        """Register a shard with its current roles (a new key space has none)."""
        with self._lock:
            if shard_id in self._shards:
                raise Conflict(f"shard {shard_id} already exists")
            st = _Shard(self._order, rf)
            self._order += 1
            for node, role in (roles or {}).items():
                if role not in ROLES:
                    raise BadRequest(f"shard {shard_id}: unknown role {role!r}")
                st.roles[node] = role
            st.target = tuple(n for n, r in st.roles.items() if r != "leaving")
            st.target_set = frozenset(st.target)
            st.target_primary = next((n for n, r in st.roles.items() if r == "primary"), None)
            live = self._live(st)
            st.seeded = bool(live) if seeded is None else seeded
            st.floor = min(rf, live)
            self._shards[shard_id] = st
            self._busy.add(shard_id)

    def clone_shard(self, source: str, shard_id: str) -> None:
        """Register ``shard_id`` as a copy of ``source`` (both halves of a split)."""
        with self._lock:
            src = self._get(source)
            self.add_shard(shard_id, src.rf, src.roles, src.seeded)
            st = self._shards[shard_id]
            st.target, st.target_set = src.target, src.target_set
            st.target_primary = src.target_primary
            st.floor = src.floor

    def remove_shard(self, shard_id: str) -> None:
        """Forget a shard (the upper half of a merge)."""
        with self._lock:
            self._get(shard_id)
            del self._shards[shard_id]
            self._busy.discard(shard_id)

    def _get(self, shard_id: str) -> _Shard:
        st = self._shards.get(shard_id)
        if st is None:
            raise NotFound(f"no shard {shard_id!r}", shard=str(shard_id))
        return st

    def roles(self, shard_id: str) -> dict[str, Role]:
        """Current roles of a shard's replicas, in listing order."""
        with self._lock:
            return dict(self._get(shard_id).roles)

    def holders(self, shard_id: str) -> tuple[str, ...]:
        """Nodes holding or receiving the shard (every role but ``leaving``)."""
        with self._lock:
            return tuple(n for n, r in self._get(shard_id).roles.items() if r != "leaving")

    def primary(self, shard_id: str) -> str | None:
        """The shard's primary node, or None."""
        with self._lock:
            return _primary(self._get(shard_id))

    def target(self, shard_id: str) -> tuple[tuple[str, ...], str | None]:
        """The shard's target nodes and primary."""
        with self._lock:
            st = self._get(shard_id)
            return st.target, st.target_primary

    def rf(self, shard_id: str) -> int:
        """The shard's replication factor."""
        with self._lock:
            return self._get(shard_id).rf

    def busy(self, shard_id: str) -> bool:
        """Whether the shard is not yet at its target (or has a move in progress)."""
        with self._lock:
            self._get(shard_id)
            return shard_id in self._busy

    def handing_off(self, shard_id: str) -> bool:
        """Whether the shard's primary stepped down for a hand-off not yet completed."""
        with self._lock:
            return self._get(shard_id).stepdown is not None

    def live(self, shard_id: str) -> int:
        """Live replicas of a shard: primary or replica on a node that is not down."""
        with self._lock:
            return self._live(self._get(shard_id))

    def _live(self, st: _Shard) -> int:
        return sum(1 for n, r in st.roles.items() if r in SERVING and n not in self._down)

    def is_down(self, node: str) -> bool:
        """Whether ``node`` is marked down."""
        with self._lock:
            return node in self._down

    def down_nodes(self) -> frozenset[str]:
        """Every node marked down."""
        with self._lock:
            return frozenset(self._down)

    def shard_ids(self) -> list[str]:
        """Every shard id, in registration order."""
        with self._lock:
            return list(self._shards)

    # -- inputs ----------------------------------------------------------------

    def set_target(self, shard_id: str, nodes: Iterable[str], primary: str | None) -> None:
        """Where the shard should end up (from the planner)."""
        with self._lock:
            st = self._get(shard_id)
            target = tuple(nodes)
            if primary is not None and primary not in target:
                raise BadRequest(f"shard {shard_id}: target primary {primary} is not a target node")
            if target != st.target or primary != st.target_primary:
                st.target = target
                st.target_set = frozenset(target)
                st.target_primary = primary
                for n in [n for n in st.failures if n not in st.target_set]:
                    st.failures.pop(n, None)
                    st.not_before.pop(n, None)
                self._busy.add(shard_id)

    def set_evacuating(self, nodes: Iterable[str]) -> None:
        """Nodes being emptied (draining, dead past the delay): their moves go first."""
        with self._lock:
            self._evacuating = set(nodes)

    def node_down(self, node: str) -> list[Change]:
        """Mark ``node`` dead: demote its primaries, cancel its joining and leaving replicas.

        A new primary is chosen by the next :meth:`step` (call it in the same
        epoch so that the shard is never published without one).
        """
        with self._lock:
            if node in self._down:
                return []
            self._down.add(node)
            changes: list[Change] = []
            for sid, st in self._shards.items():
                role = st.roles.get(node)
                if role is None:
                    continue
                if role == "primary":
                    self._set(sid, st, node, "replica", changes)
                    st.stepdown = None
                    self._depose(sid, st, node)
                elif role in ("joining", "leaving"):
                    self._set(sid, st, node, None, changes)
                st.floor = min(st.floor, self._live(st))
                self._busy.add(sid)
            return changes

    def node_up(self, node: str) -> None:
        """Mark ``node`` alive again; its replicas serve again from the next epoch."""
        with self._lock:
            if node not in self._down:
                return
            self._down.discard(node)
            for sid, st in self._shards.items():
                if node in st.roles:
                    self._busy.add(sid)

    def drop_node(self, node: str) -> list[Change]:
        """Remove every replica of ``node`` now (the node is being removed for good)."""
        with self._lock:
            changes: list[Change] = []
            for sid, st in self._shards.items():
                if node in st.roles:
                    self._set(sid, st, node, None, changes)
                    st.floor = min(st.floor, self._live(st))
                    self._busy.add(sid)
            self._down.discard(node)
            self._evacuating.discard(node)
            return changes

    def confirm(self, shard_id: str, node: str, now: float) -> list[Change]:
        """``node`` has a complete copy of ``shard_id``: joining becomes replica.

        A repeated confirmation of a replica that is already live is accepted
        and changes nothing; :class:`Conflict` if ``node`` is not joining.
        """
        with self._lock:
            st = self._get(shard_id)
            role = st.roles.get(node)
            if role in SERVING:
                return []
            if role != "joining":
                raise Conflict(f"node {node} is not joining shard {shard_id} (role: {role})", shard=shard_id, node=node)
            changes: list[Change] = []
            self._set(shard_id, st, node, "replica", changes)
            st.failures.pop(node, None)
            st.not_before.pop(node, None)
            st.floor = max(st.floor, min(st.rf, self._live(st)))
            self._busy.add(shard_id)
            return changes

    # -- the step --------------------------------------------------------------

    def step(self, now: float) -> Step:
        """Advance every unsettled shard one safe step; returns what changed."""
        with self._lock:
            self._round += 1
            ctx = _Round(now)
            for sid in self._busy:
                st = self._shards[sid]
                for j, src in self._pairs(st):
                    ctx.total += 1
                    ctx.per_node[j] = ctx.per_node.get(j, 0) + 1
                    if src is not None:
                        ctx.per_node[src] = ctx.per_node.get(src, 0) + 1
            for sid in sorted(self._busy, key=self._priority):
                self._reconcile(sid, self._shards[sid], ctx)
            return Step(tuple(ctx.changes), tuple(ctx.stuck))

    def _priority(self, sid: str) -> tuple[int, int]:
        # Restore redundancy first, then empty nodes that are going away, then balance.
        st = self._shards[sid]
        if self._live(st) < min(st.rf, len(st.target)):
            return (0, st.order)
        if any(n in self._evacuating or n in self._down for n in st.roles):
            return (1, st.order)
        return (2, st.order)

    def _outgoing(self, st: _Shard) -> list[str]:
        return [n for n, r in st.roles.items() if r in SERVING and n not in st.target_set and n not in self._down]

    def _pairs(self, st: _Shard) -> list[tuple[str, str | None]]:
        """Joining replicas paired with the live replicas they replace (for the per-node cap)."""
        out = self._outgoing(st)
        joins = sorted(st.joining, key=lambda n: (st.joining[n], n))
        return [(j, out[k] if k < len(out) else None) for k, j in enumerate(joins)]

    def _set(self, sid: str, st: _Shard, node: str, role: Role | None, changes: list[Change]) -> None:
        before = st.roles.get(node)
        if before == role:
            return
        if role is None:
            del st.roles[node]
        else:
            st.roles[node] = role
        if role != "joining":
            st.joining.pop(node, None)
        if role != "leaving":
            st.leaving.pop(node, None)
        changes.append(Change(sid, node, before, role))

    def _reconcile(self, sid: str, st: _Shard, ctx: _Round) -> None:
        cfg = self.config
        now = ctx.now
        down = self._down
        changes = ctx.changes
        for n, since in list(st.leaving.items()):
            if n in down or now >= since + cfg.leave_grace:
                self._set(sid, st, n, None, changes)
        for n, since in list(st.joining.items()):
            if n not in st.target_set or n in down:
                self._set(sid, st, n, None, changes)
            elif now >= since + cfg.move_timeout:
                self._set(sid, st, n, None, changes)
                failures = st.failures.get(n, 0) + 1
                st.failures[n] = failures
                st.not_before[n] = now + cfg.retry_backoff * 2 ** (failures - 1)
                if failures >= cfg.move_retries:
                    ctx.stuck.append((sid, n))
        self._add_replicas(sid, st, ctx)
        self._elect(sid, st, ctx)
        if _primary(st) is not None:
            self._remove_replicas(sid, st, now, changes)
        st.floor = max(st.floor, min(st.rf, self._live(st)))
        if (
            not st.joining
            and not st.leaving
            and st.stepdown is None
            and st.deposed is None
            and set(st.roles) == st.target_set
            and (st.target_primary is None or st.roles.get(st.target_primary) == "primary")
        ):
            self._busy.discard(sid)

    def _add_replicas(self, sid: str, st: _Shard, ctx: _Round) -> None:
        cfg = self.config
        down = self._down
        missing = [n for n in st.target if n not in st.roles and n not in down]
        if not missing:
            return
        if not st.seeded:
            # Nothing was ever written: there is no data to copy, place directly.
            for n in missing:
                self._set(sid, st, n, "replica", ctx.changes)
            st.seeded = self._live(st) > 0
            return
        if self._live(st) == 0:
            return
        out = self._outgoing(st)
        paired = len(st.joining)
        for n in missing:
            if ctx.now < st.not_before.get(n, -math.inf):
                continue
            if ctx.total >= cfg.max_moves_in_flight:
                return
            src = out[paired] if paired < len(out) else None
            cap = cfg.max_moves_per_node
            if ctx.per_node.get(n, 0) >= cap or (src is not None and ctx.per_node.get(src, 0) >= cap):
                continue
            self._set(sid, st, n, "joining", ctx.changes)
            st.joining[n] = ctx.now
            paired += 1
            ctx.total += 1
            ctx.per_node[n] = ctx.per_node.get(n, 0) + 1
            if src is not None:
                ctx.per_node[src] = ctx.per_node.get(src, 0) + 1

    def _depose(self, sid: str, st: _Shard, node: str) -> None:
        st.deposed = node
        if self.leases is not None:
            self.leases.depose(sid, node)

    def _elect(self, sid: str, st: _Shard, ctx: _Round) -> None:
        changes = ctx.changes
        now = ctx.now
        down = self._down
        p = _primary(st)
        tp = st.target_primary
        if p is None:
            if st.stepdown == self._round:
                return  # stepped down in this very epoch: promote in the next one
            best = self._candidate(st, ctx)
            if best is None:
                st.stepdown = None
                return
            old = st.deposed
            if old not in (None, best) and self.leases is not None and not self.leases.may_promote(sid, old or "", now):
                return  # the old primary may still hold its lease: writes wait
            self._set(sid, st, best, "primary", changes)
            counts = self._primary_counts(ctx)
            counts[best] = counts.get(best, 0) + 1
            st.stepdown = None
            st.deposed = None
            if old is not None and self.leases is not None:
                self.leases.promoted(sid, old)
        elif tp is not None and p != tp and tp not in down and st.roles.get(tp) == "replica":
            self._set(sid, st, p, "replica", changes)
            st.stepdown = self._round
            self._depose(sid, st, p)

    def _candidate(self, st: _Shard, ctx: _Round) -> str | None:
        """The replica to promote: planned primary, else a full replica, else a leaving one.

        Among equals the node with the fewest primaries wins (then by id), so
        the primaries of a dead node are spread over the survivors instead of
        all landing on the lowest id.
        """
        down = self._down
        tp = st.target_primary
        if tp is not None and tp not in down and st.roles.get(tp) == "replica":
            return tp
        for role in ("replica", "leaving"):
            found = [n for n, r in st.roles.items() if r == role and n not in down]
            if found:
                in_target = [n for n in found if n in st.target_set]
                counts = self._primary_counts(ctx)
                return min(in_target or found, key=lambda n: (counts.get(n, 0), n))
        return None

    def _primary_counts(self, ctx: _Round) -> dict[str, int]:
        if ctx.primaries is None:
            counts: dict[str, int] = {}
            for st in self._shards.values():
                p = _primary(st)
                if p is not None:
                    counts[p] = counts.get(p, 0) + 1
            ctx.primaries = counts
        return ctx.primaries

    def _remove_replicas(self, sid: str, st: _Shard, now: float, changes: list[Change]) -> None:
        down = self._down
        for n, role in list(st.roles.items()):
            if role != "replica" or n in st.target_set:
                continue
            if n in down:
                ready = all(st.roles.get(t) in SERVING for t in st.target if t not in down)
                if ready:
                    self._set(sid, st, n, None, changes)
            elif self._live(st) - 1 >= min(st.rf, st.floor):
                self._set(sid, st, n, "leaving", changes)
                st.leaving[n] = now

    # -- reporting -------------------------------------------------------------

    def in_flight(self) -> int:
        """Copies in flight (joining replicas) in the whole cluster."""
        with self._lock:
            return sum(len(st.joining) for st in self._shards.values())

    def pending(self, now: float) -> list[dict[str, Any]]:
        """Every unfinished move: ``copying`` (joining), ``queued`` or ``backoff``."""
        with self._lock:
            out: list[dict[str, Any]] = []
            for sid in sorted(self._busy, key=self._priority):
                st = self._shards[sid]
                for n in st.target:
                    if n in st.joining:
                        out.append({"shard": sid, "node": n, "state": "copying", "age": now - st.joining[n]})
                    elif n not in st.roles and n not in self._down:
                        late = st.not_before.get(n, -math.inf) > now
                        out.append(
                            {
                                "shard": sid,
                                "node": n,
                                "state": "backoff" if late else "queued",
                                "failures": st.failures.get(n, 0),
                            }
                        )
            return out

    # -- persistence -------------------------------------------------------------

    def to_state(self, now: float) -> dict[str, Any]:
        """Timers and targets as plain data; times are stored relative to ``now``.

        Roles are not included: the shard map carries them.
        """
        with self._lock:
            shards = []
            for sid, st in self._shards.items():
                shards.append(
                    {
                        "id": sid,
                        "rf": st.rf,
                        "target": list(st.target),
                        "target_primary": st.target_primary,
                        "joining": {n: now - t for n, t in st.joining.items()},
                        "leaving": {n: now - t for n, t in st.leaving.items()},
                        "stepdown": st.stepdown is not None,
                        "deposed": st.deposed,
                        "floor": st.floor,
                        "failures": dict(st.failures),
                        "backoff": {n: t - now for n, t in st.not_before.items()},
                        "seeded": st.seeded,
                    }
                )
            return {"shards": shards, "down": sorted(self._down), "evacuating": sorted(self._evacuating)}

    def load_state(self, roles: Mapping[str, Mapping[str, Role]], state: Mapping[str, Any], now: float) -> None:
        """Rebuild from the map's ``roles`` per shard and :meth:`to_state` output.

        Stored ages are rebased on ``now`` (the restarted process's clock).
        Raises :class:`BadRequest` if the state does not match the roles.
        """
        with self._lock:
            try:
                self._shards.clear()
                self._busy.clear()
                self._order = 0
                self._down = {str(n) for n in state.get("down", [])}
                self._evacuating = {str(n) for n in state.get("evacuating", [])}
                seen = set()
                for doc in state["shards"]:
                    sid = doc["id"]
                    if sid not in roles:
                        raise BadRequest(
                            f"stored migration state names shard {sid}, which the stored map does not have"
                        )
                    seen.add(sid)
                    self.add_shard(sid, int(doc["rf"]), roles[sid], bool(doc["seeded"]))
                    st = self._shards[sid]
                    st.target = tuple(str(n) for n in doc["target"])
                    st.target_set = frozenset(st.target)
                    tp = doc["target_primary"]
                    st.target_primary = None if tp is None else str(tp)
                    st.joining = {
                        str(n): now - float(a) for n, a in doc["joining"].items() if st.roles.get(n) == "joining"
                    }
                    st.leaving = {
                        str(n): now - float(a) for n, a in doc["leaving"].items() if st.roles.get(n) == "leaving"
                    }
                    # Any replica the map shows joining/leaving needs a timer.
                    for n, r in st.roles.items():
                        if r == "joining":
                            st.joining.setdefault(n, now)
                        elif r == "leaving":
                            st.leaving.setdefault(n, now)
                    st.stepdown = -1 if doc["stepdown"] and _primary(st) is None else None
                    if _primary(st) is None and st.seeded:
                        # Whoever held it may hold a lease the previous process granted
                        # ("": not recorded, so no renewal can say it let go).
                        st.deposed = str(doc.get("deposed") or "")
                        if st.deposed and self.leases is not None:
                            self.leases.depose_restored(sid, st.deposed)
                    st.floor = int(doc["floor"])
                    st.failures = {str(n): int(k) for n, k in doc["failures"].items()}
                    st.not_before = {str(n): now + float(t) for n, t in doc["backoff"].items()}
                missing = set(roles) - seen
                if missing:
                    raise BadRequest(f"stored migration state lacks shards {sorted(missing)[:5]}")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise BadRequest(f"stored migration state is malformed: {exc!r}") from exc


def _primary(st: _Shard) -> str | None:
    for n, r in st.roles.items():
        if r == "primary":
            return n
    return None
