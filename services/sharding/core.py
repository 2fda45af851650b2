"""The sharding service core: the shard map, its key spaces, nodes and moves (sans-I/O).

The shell calls one method per operation. Operations that may change the map
return a :class:`Result` with the value for the reply and the events to
publish; every change to the map bumps the epoch and yields exactly one
``shardmap.changed`` event ``{"epoch", "reason"}`` per call. Queries
(``health``, ``node_counts``, ``sole_replicas``, ...) return plain values.

Time is a parameter: every operation that changes nodes, key spaces or moves
(and ``pending_moves``, ``snapshot``, ``restore``) takes ``now``, the shell's
monotonic clock in seconds (the simulator's virtual time). The core never
reads a clock and keeps no "last time seen" to stand in for one.

Persistence: before publishing the events of a call, the shell commits
:meth:`ShardingCore.snapshot` to the store (see :mod:`services.sharding.store`);
after a restart, a leader change or a failed commit,
:meth:`ShardingCore.restore` resumes from the last committed snapshot.

All public methods are safe to call from several threads. Planning a large
cluster takes a noticeable fraction of a second (see bench/rebalance.py), so
an asyncio shell should run membership operations in a worker thread.

The map logic and the locks live here; :mod:`services.sharding.keyspaces`
(split, merge, load-based splits) and :mod:`services.sharding.snapshot`
(snapshot and restore) hold plain functions the public methods call under the
lock, over the records of :mod:`services.sharding.records`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, cast

from phantom_bus.errors import BadRequest, Conflict, NoSuchKeyspace, NotFound, Refused
from phantom_bus.events import Event
from phantom_bus.shardhealth import ShardInfo, assess, shards_from_map, sole_replicas
from phantom_bus.shardmap import (
    KINDS,
    MAX_SLOTS,
    Keyspace,
    Kind,
    Replica,
    Shard,
    ShardMap,
    ShardRoute,
    key_bytes,
)
from services.sharding.config import ShardingConfig
from services.sharding.keyspaces import adjacent, finish_merges, load_splits, new_id, parse_split_points, split_shard
from services.sharding.leases import PrimaryLeases
from services.sharding.migration import Migrations
from services.sharding.placement import NodeSpec, Plan, ShardSpec, plan
from services.sharding.records import _Node, _node_id, _number, _Space
from services.sharding.samples import KeySample
from services.sharding.snapshot import restore_into, snapshot_state

T = TypeVar("T")

CHANGED = "shardmap.changed"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_RF = 16


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """What an operation returns: the reply ``value`` and the ``events`` to publish."""

    value: T
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class MergeResult:
    """A merge: ``shard`` absorbs ``absorbed``; ``done`` False while replicas are colocated."""

    shard: str
    absorbed: str
    done: bool

    def to_wire(self) -> dict[str, Any]:
        """The merge as a reply map."""
        return {"shard": self.shard, "absorbed": self.absorbed, "done": self.done}


class ShardingCore:
    """The sharding state machine; see the module docstring for the calling conventions."""

    def __init__(self, config: ShardingConfig | None = None, *, default_keyspace: bool = True) -> None:
        self.config = config or ShardingConfig()
        self._lock = threading.RLock()
        self._nodes: dict[str, _Node] = {}
        self._spaces: dict[str, _Space] = {}
        self._space_of: dict[str, str] = {}  # shard id -> key space name
        self._engine = Migrations(self.config)
        self.leases = PrimaryLeases(self.config.primary_lease, self.config.lease_drift)
        self._engine.leases = self.leases
        self._map = ShardMap(0)
        self._samples: dict[str, KeySample] = {}
        self._hot: dict[str, float] = {}  # shard -> since when its load is above split_rate
        self._merges: dict[str, str] = {}  # absorbed shard -> the shard it merges into
        self._avoid: dict[tuple[str, str], float] = {}  # (shard, node) -> avoided until
        # (shard, node) -> the epoch whose map first showed this joining replica: a
        # confirmation names the epoch its copy was asked for, so one from an earlier
        # assignment (cancelled, then assigned again) cannot promote the new one.
        self._joined: dict[tuple[str, str], int] = {}
        self._plan: Plan | None = None
        if default_keyspace:
            cfg = self.config
            self.create_keyspace(
                cfg.default_keyspace,
                "hash",
                shards=cfg.default_shards,
                rf=cfg.default_rf,
                slots=cfg.hash_slots,
                # Before any input: there is no node to place on, so nothing in
                # this first step depends on time.
                now=0.0,
            )

    # -- plumbing ----------------------------------------------------------------

    def _time(self, now: float) -> float:
        return _number(now, "now")

    def _space(self, name: Any) -> _Space:
        space = self._spaces.get(name) if isinstance(name, str) else None
        if space is None:
            raise NoSuchKeyspace(
                f"no key space {name!r}; known: {', '.join(self._spaces) or 'none'}", keyspace=str(name)
            )
        return space

    def _shard_space(self, shard: Any) -> _Space:
        name = self._space_of.get(shard) if isinstance(shard, str) else None
        if name is None:
            raise NotFound(f"no shard {shard!r}", shard=str(shard))
        return self._spaces[name]

    def _node(self, node: Any) -> _Node:
        rec = self._nodes.get(node) if isinstance(node, str) else None
        if rec is None:
            raise NotFound(f"no node {node!r} is registered with sharding", node=str(node))
        return rec

    def _build_map(self, epoch: int) -> ShardMap:
        eng = self._engine
        spaces = []
        for sp in self._spaces.values():
            shards = []
            for sid in sp.order:
                roles = eng.roles(sid)
                moving = eng.busy(sid) or sid in self._merges or sid in self._merges.values()
                replicas = tuple(Replica(n, r) for n, r in roles.items())
                state: Literal["active", "moving"] = "moving" if moving else "active"
                if sp.kind == "hash":
                    shards.append(Shard(sid, replicas, state, slots=sp.slot_ranges[sid]))
                else:
                    start, end = sp.ranges[sid]
                    shards.append(Shard(sid, replicas, state, start=start, end=end))
            spaces.append(Keyspace(sp.name, sp.kind, sp.rf, tuple(shards), sp.slots))
        return ShardMap(epoch, tuple(spaces), eng.down_nodes())

    def _publish(self, reason: str, events: list[Event]) -> None:
        """Bump the epoch if the map changed, and say so."""
        new = self._build_map(self._map.epoch + 1)
        if new.keyspaces != self._map.keyspaces or new.down != self._map.down:
            self._map = new
            self._note_joining(new)
            events.append(Event(CHANGED, {"epoch": new.epoch, "reason": reason}))

    def _note_joining(self, shard_map: ShardMap) -> None:
        joined = self._joined
        now_joining = set()
        for _, sh in shard_map.shards():
            for r in sh.replicas:
                if r.role == "joining":
                    now_joining.add((sh.id, r.node))
                    joined.setdefault((sh.id, r.node), shard_map.epoch)
        for pair in [p for p in joined if p not in now_joining]:
            del joined[pair]

    def _replan(self) -> None:
        eng = self._engine
        specs = []
        for sp in self._spaces.values():
            for sid in sp.order:
                if sid in self._merges:
                    continue
                specs.append(ShardSpec(sid, sp.rf, eng.holders(sid), eng.primary(sid)))
        nodes = {n: NodeSpec(r.zone, r.weight, r.planner_state()) for n, r in self._nodes.items()}
        result = plan(specs, nodes, tuple(self._avoid))
        for sid, target in result.targets.items():
            eng.set_target(sid, target.nodes, target.primary)
        for absorbed, into in self._merges.items():
            members, primary = eng.target(into)
            eng.set_target(absorbed, members, primary)
        eng.set_evacuating(n for n, r in self._nodes.items() if r.planner_state() in ("draining", "dead"))
        self._plan = result

    def _advance(self, now: float) -> None:
        """One engine step, then whatever it unlocks (avoided targets, finished merges)."""
        step = self._engine.step(now)
        if step.stuck:
            for pair in step.stuck:
                self._avoid[pair] = now + self.config.avoid_ttl
            self._replan()  # the new targets start on the next step
        finish_merges(self)

    # -- lookups and the map -------------------------------------------------------

    def lookup(self, keyspace: str, key: str | bytes) -> Result[ShardRoute]:
        """The route of the shard that owns ``key`` (and sample the key for splits)."""
        shard_map = self._map
        route = shard_map.route(keyspace, key)
        if shard_map.keyspace(keyspace).kind == "range":
            with self._lock:
                self._sample(route.shard).add(key_bytes(key))
        return Result(route)

    def _sample(self, shard: str) -> KeySample:
        sample = self._samples.get(shard)
        if sample is None:
            sample = self._samples[shard] = KeySample(self.config.key_sample_size)
        return sample

    def report_keys(self, keyspace: str, keys: Iterable[str | bytes]) -> Result[int]:
        """Keys seen by someone else (an agent, a client) for split-point sampling."""
        with self._lock:
            sp = self._space(keyspace)
            if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
                raise BadRequest("keys must be a list of str or bytes")
            count = 0
            shard_map = self._map
            for key in keys:
                shard = shard_map.lookup(sp.name, key)
                if sp.kind == "range":
                    self._sample(shard.id).add(key_bytes(key))
                count += 1
            return Result(count)

    def map(self, since_epoch: int | None = None) -> Result[ShardMap | None]:
        """The whole map, or None when ``since_epoch`` is given and the map is not newer."""
        if since_epoch is not None and (type(since_epoch) is not int or since_epoch < 0):
            raise BadRequest(f"since_epoch must be a non-negative integer, got {since_epoch!r}")
        current = self._map
        if since_epoch is not None and current.epoch <= since_epoch:
            return Result(None)
        return Result(current)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._map.epoch

    # -- key spaces ----------------------------------------------------------------

    def create_keyspace(
        self,
        name: str,
        kind: str = "hash",
        shards: int | None = None,
        split_points: Iterable[str | bytes] | None = None,
        rf: int | None = None,
        slots: int | None = None,
        *,
        now: float,
    ) -> Result[Keyspace]:
        """Create a key space and place its shards.

        Hash: ``shards`` (default ``default_shards``) over ``slots`` (default
        ``hash_slots``) slots, contiguous equal slot ranges. Range: either
        ``split_points`` (sorted, distinct, non-empty keys) or ``shards``
        ranges cut evenly over the first two key bytes (default one shard).
        """
        with self._lock:
            t = self._time(now)
            cfg = self.config
            if not isinstance(name, str) or not _NAME.match(name):
                raise BadRequest(f"key space name must be 1-64 of A-Z a-z 0-9 _ . -, got {name!r}")
            if name in self._spaces:
                raise Conflict(f"key space {name} already exists", keyspace=name)
            if kind not in KINDS:
                raise BadRequest(f"key space kind must be hash or range, got {kind!r}")
            rf = cfg.default_rf if rf is None else rf
            if type(rf) is not int or not 1 <= rf <= _MAX_RF:
                raise BadRequest(f"rf must be an integer 1..{_MAX_RF}, got {rf!r}")
            if shards is not None and (type(shards) is not int or shards < 1):
                raise BadRequest(f"shards must be a positive integer, got {shards!r}")
            if shards is not None and shards > cfg.max_shards_per_keyspace:
                raise BadRequest(f"shards must be at most {cfg.max_shards_per_keyspace}")
            sp = _Space(name, cast(Kind, kind), rf, 0)
            if kind == "hash":
                if split_points is not None:
                    raise BadRequest("split_points are for range key spaces; give shards and slots")
                n = cfg.default_shards if shards is None else shards
                sp.slots = cfg.hash_slots if slots is None else slots
                if type(sp.slots) is not int or not 1 <= sp.slots <= MAX_SLOTS:
                    raise BadRequest(f"slots must be an integer 1..{MAX_SLOTS}, got {slots!r}")
                if n > sp.slots:
                    raise BadRequest(f"{n} shards do not fit in {sp.slots} slots")
                for i in range(n):
                    sid = new_id(sp)
                    sp.order.append(sid)
                    sp.slot_ranges[sid] = ((i * sp.slots // n, (i + 1) * sp.slots // n),)
            else:
                if slots not in (None, 0):
                    raise BadRequest("range key spaces have no slots")
                points = parse_split_points(split_points, shards)
                bounds: list[bytes | None] = [b"", *points, None]
                for i in range(len(bounds) - 1):
                    sid = new_id(sp)
                    sp.order.append(sid)
                    sp.ranges[sid] = (cast(bytes, bounds[i]), bounds[i + 1])
            self._spaces[name] = sp
            for sid in sp.order:
                self._space_of[sid] = name
                self._engine.add_shard(sid, rf)
            events: list[Event] = []
            self._replan()
            self._advance(t)
            self._publish("keyspace.created", events)
            return Result(self._map.keyspace(name), tuple(events))

    def split(
        self, keyspace: str, shard: str, at: str | bytes | int | None = None, *, now: float
    ) -> Result[tuple[Shard, Shard]]:
        """Split a shard in two; the lower half keeps the id, the upper gets a new one.

        Range: at key ``at`` or, if None, the median of the keys sampled from
        lookups and reports. Hash: at slot ``at`` or, if None, the middle of
        its slots. Both halves keep the replicas. :class:`Refused` while the
        shard is moving or merging.
        """
        with self._lock:
            t = self._time(now)
            sp = self._space(keyspace)
            if not isinstance(shard, str) or self._space_of.get(shard) != sp.name:
                raise NotFound(f"key space {sp.name} has no shard {shard!r}", shard=str(shard))
            upper = split_shard(self, sp, shard, at)
            events: list[Event] = []
            self._replan()
            self._advance(t)
            self._publish("shard.split", events)
            return Result((self._map.shard(shard), self._map.shard(upper)), tuple(events))

    def merge(self, keyspace: str, shard_a: str, shard_b: str, *, now: float) -> Result[MergeResult]:
        """Merge two adjacent shards; the lower one keeps its id.

        If their replicas are on the same nodes the merge is immediate.
        Otherwise the upper shard's replicas are first moved next to the lower
        one's (``done`` False) and the merge completes on a later step.
        """
        with self._lock:
            t = self._time(now)
            sp = self._space(keyspace)
            for s in (shard_a, shard_b):
                if not isinstance(s, str) or self._space_of.get(s) != sp.name:
                    raise NotFound(f"key space {sp.name} has no shard {s!r}", shard=str(s))
            if shard_a == shard_b:
                raise BadRequest("cannot merge a shard with itself")
            low, high = sorted((shard_a, shard_b), key=sp.order.index)
            if not adjacent(sp, low, high):
                raise BadRequest(f"shards {low} and {high} are not adjacent; only neighbours merge")
            involved = set(self._merges) | set(self._merges.values())
            if low in involved or high in involved:
                raise Conflict(f"shard {low if low in involved else high} is already merging")
            eng = self._engine
            if eng.busy(low) or eng.busy(high):
                raise Refused("both shards must be settled (not moving) to merge; retry later")
            events: list[Event] = []
            self._merges[high] = low
            finish_merges(self)
            done = high not in self._space_of
            if not done:
                self._replan()
                self._advance(t)
                done = high not in self._space_of
            self._publish("shard.merged" if done else "shard.merging", events)
            return Result(MergeResult(low, high, done), tuple(events))

    # -- nodes ---------------------------------------------------------------------

    def add_node(self, node: str, zone: str = "", weight: float = 1.0, *, now: float) -> Result[dict[str, Any]]:
        """Register a node, or update its zone and weight; a draining node becomes active."""
        with self._lock:
            t = self._time(now)
            _node_id(node)
            if not isinstance(zone, str) or len(zone) > 64:
                raise BadRequest(f"zone must be a string of at most 64 characters, got {zone!r}")
            w = _number(weight, "weight")
            if w < 0 or w > 1e6:
                raise BadRequest(f"weight must be between 0 and 1e6, got {weight!r}")
            rec = self._nodes.get(node)
            events: list[Event] = []
            if rec is not None and (rec.zone, rec.weight, rec.state) == (zone, w, "active"):
                return Result(self._view(node))
            if rec is None:
                self._nodes[node] = _Node(zone, w)
            else:
                rec.zone, rec.weight, rec.state = zone, w, "active"
            self._replan()
            self._advance(t)
            self._publish("node.added", events)
            return Result(self._view(node), tuple(events))

    def drain_node(self, node: str, *, now: float) -> Result[dict[str, Any]]:
        """Move every replica off ``node`` (safely, over time) and give it no new ones."""
        with self._lock:
            t = self._time(now)
            rec = self._node(node)
            events: list[Event] = []
            if rec.state != "draining":
                rec.state = "draining"
                self._replan()
                self._advance(t)
                self._publish("node.draining", events)
            return Result(self._view(node), tuple(events))

    def remove_node(self, node: str, *, now: float) -> Result[dict[str, Any]]:
        """Forget ``node`` now, dropping its replicas; :class:`Refused` if that loses data.

        Refused while the node holds the only live replica of any shard (drain
        it first). The dropped replicas are re-created elsewhere by later moves.
        """
        with self._lock:
            t = self._time(now)
            self._node(node)
            sole = self.sole_replicas(node)
            if sole:
                raise Refused(
                    f"node {node} holds the only live replica of {len(sole)} shard(s) "
                    f"({', '.join(sole[:5])}); drain it first",
                    node=node,
                    shards=sole[:20],
                )
            changes = self._engine.drop_node(node)
            del self._nodes[node]
            for pair in [p for p in self._avoid if p[1] == node]:
                del self._avoid[pair]
            events: list[Event] = []
            self._replan()
            self._advance(t)
            self._publish("node.removed", events)
            return Result({"node": node, "dropped": sum(1 for c in changes if c.after is None)}, tuple(events))

    def node_dead(self, node: str, now: float) -> Result[dict[str, Any]]:
        """``node`` is dead: its primaries move at once, its replicas after ``dead_delay``."""
        with self._lock:
            t = self._time(now)
            rec = self._node(node)
            events: list[Event] = []
            if rec.alive:
                rec.alive = False
                rec.dead_since = t
                rec.expired = self.config.dead_delay <= 0
                self._engine.node_down(node)
                # No replan inside the delay: the targets stay as they were, so a
                # death alone copies nothing; primaries move in the step below.
                if rec.expired:
                    self._replan()
                self._advance(t)
                self._publish("node.dead", events)
            return Result(self._view(node), tuple(events))

    def node_alive(self, node: str, now: float) -> Result[dict[str, Any]]:
        """``node`` is back: within the delay it keeps its replicas and nothing is copied."""
        with self._lock:
            t = self._time(now)
            rec = self._node(node)
            events: list[Event] = []
            if not rec.alive:
                rec.alive = True
                rec.dead_since = None
                rec.expired = False
                self._engine.node_up(node)
                for pair in [p for p in self._avoid if p[1] == node]:
                    del self._avoid[pair]
                self._replan()
                self._advance(t)
                self._publish("node.alive", events)
            return Result(self._view(node), tuple(events))

    def _view(self, node: str) -> dict[str, Any]:
        rec = self._nodes[node]
        return {
            "node": node,
            "zone": rec.zone,
            "weight": rec.weight,
            "state": rec.state,
            "alive": rec.alive,
            "dead_since": rec.dead_since,
            # Dead (or left) for dead_delay: its replicas are being re-created elsewhere.
            # The one re-replication timer of the cluster; the manager labels the node
            # ``failed`` from this flag.
            "expired": rec.expired,
        }

    # -- moves -----------------------------------------------------------------------

    def confirm(self, shard: str, node: str, now: float, epoch: int | None = None) -> Result[dict[str, Any]]:
        """``node``'s agent reports its copy of ``shard`` complete.

        ``epoch`` is the epoch of the map in which the agent saw the replica
        ``joining`` (its copy was made for that assignment). :class:`Conflict` if
        the current assignment began later: that copy was for one that has been
        cancelled since, and the agent must copy again.
        """
        with self._lock:
            t = self._time(now)
            self._shard_space(shard)
            self._node(node)
            if epoch is not None:
                if type(epoch) is not int or epoch < 0:
                    raise BadRequest(f"epoch must be a non-negative integer, got {epoch!r}")
                since = self._joined.get((shard, node))
                if since is not None and epoch < since:
                    raise Conflict(
                        f"the copy of {shard} on {node} was asked for at epoch {epoch}; that assignment was "
                        f"cancelled and the current one began at epoch {since}: copy again",
                        shard=shard,
                        node=node,
                        since=since,
                    )
            events: list[Event] = []
            self._engine.confirm(shard, node, t)
            self._advance(t)
            self._publish("move.confirmed", events)
            role = self._engine.roles(shard).get(node) if shard in self._space_of else None
            return Result({"shard": shard, "node": node, "role": role}, tuple(events))

    def renew(
        self, node: str, incarnation: int, seq: int, holding: Iterable[str], now: float
    ) -> Result[dict[str, Any]]:
        """``node``'s agent renews its primary lease; the reply lists what it is primary of now.

        ``holding``: the shards its database is primary of (or becoming so).
        A renewal that lets go of a deposed primary's shard unblocks that
        shard's promotion in this same call. A stale renewal (``(incarnation,
        seq)`` not newer than one seen) grants nothing.
        """
        with self._lock:
            t = self._time(now)
            _node_id(node)
            for name, v in (("incarnation", incarnation), ("seq", seq)):
                if type(v) is not int or v < 0:
                    raise BadRequest(f"{name} must be a non-negative integer, got {v!r}")
            if not isinstance(holding, list | tuple) or not all(isinstance(h, str) for h in holding):
                raise BadRequest("holding must be a list of shard ids")
            rec = self._nodes.get(node)
            fresh = self.leases.renew(node, incarnation, seq, holding, t)
            events: list[Event] = []
            if fresh:
                self._advance(t)
                self._publish("lease.released", events)
            eng = self._engine
            primaries = (
                sorted(s for s in self._space_of if eng.roles(s).get(node) == "primary")
                if fresh and rec is not None and rec.alive
                else []
            )
            return Result(
                {"epoch": self._map.epoch, "primaries": primaries, "lease": self.config.primary_lease, "fresh": fresh},
                tuple(events),
            )

    def tick(self, now: float) -> Result[None]:
        """Advance timers: dead-node delays, copy timeouts, leaving replicas, hand-offs."""
        with self._lock:
            t = self._time(now)
            replan = False
            for pair, until in list(self._avoid.items()):
                if until <= t:
                    del self._avoid[pair]
                    replan = True
            for rec in self._nodes.values():
                if (
                    not rec.alive
                    and not rec.expired
                    and rec.dead_since is not None
                    and t - rec.dead_since >= self.config.dead_delay
                ):
                    rec.expired = True
                    replan = True
            if replan:
                self._replan()
            events: list[Event] = []
            self._advance(t)
            self._publish("tick", events)
            return Result(None, tuple(events))

    def report_load(self, rates: Mapping[str, float], now: float) -> Result[dict[str, Any]]:
        """Requests per second per shard; splits range shards hot for ``split_window``.

        Unknown shard ids (a reporter one split behind) are ignored and listed
        in the reply rather than failing the whole report.
        """
        with self._lock:
            t = self._time(now)
            if not isinstance(rates, Mapping):
                raise BadRequest("rates must be a map of shard id to requests per second")
            split, ignored = load_splits(self, rates, t)
            events: list[Event] = []
            if split:
                self._replan()
                self._advance(t)
                self._publish("shard.split", events)
            return Result({"split": split, "ignored": ignored}, tuple(events))

    # -- queries -------------------------------------------------------------------

    def sole_replicas(self, node: str) -> list[str]:
        """Shards for which ``node`` holds the only live replica (removing it loses data).

        The same rule as the manager's, over sharding's own view of which nodes are down:
        a down node holding the last copy of a shard whose other holders are down too is
        listed as well, since that copy may come back.
        """
        with self._lock:
            shards, states, down = self._judged()
        return sole_replicas(shards, node, states, down)

    def node_counts(self) -> dict[str, dict[str, int]]:
        """Per node: serving ``replicas`` (primary + replica), ``primaries``, ``joining``, ``leaving``."""
        with self._lock:
            shards, states, down = self._judged()
            nodes = list(self._nodes)
        per_node = assess(shards, states, down).per_node
        out = {n: {"replicas": 0, "primaries": 0, "joining": 0, "leaving": 0} for n in nodes}
        out.update({n: dict(c) for n, c in per_node.items()})
        return out

    def health(self) -> dict[str, int]:
        """Shard counts of the current map: ``total``, ``under_replicated``, ``unavailable``,
        ``moving`` and ``degraded``, by the rules of :mod:`phantom_bus.shardhealth` (the
        manager's cluster colour uses the same rules over membership's verdicts; here a
        node is alive unless sharding has it down)."""
        with self._lock:
            shards, states, down = self._judged()
        return assess(shards, states, down).counts()

    def _judged(self) -> tuple[list[ShardInfo], dict[str, str], frozenset[str]]:
        """The current map as health sees it, with sharding's liveness view (lock held)."""
        down = self._engine.down_nodes()
        shards = shards_from_map(self._map)
        states = {n: ("dead" if n in down else "alive") for sh in shards for n, _ in sh.replicas}
        return shards, states, down

    def nodes(self) -> list[dict[str, Any]]:
        """Every registered node with its zone, weight, state and liveness."""
        with self._lock:
            return [self._view(n) for n in sorted(self._nodes)]

    def shard_rows(self, shard_map: ShardMap | None = None) -> list[dict[str, Any]]:
        """One row per shard of ``shard_map`` (default: the current map):
        ``keyspace, shard, range, replicas, primary, state``."""
        rows = []
        for ks, sh in (shard_map or self._map).shards():
            if ks.kind == "hash":
                span = ",".join(f"{a}-{b - 1}" for a, b in sh.slots)
                desc = f"slots {span}"
            else:
                end = "+inf" if sh.end is None else _show(sh.end)
                desc = f"[{_show(sh.start)}, {end})"
            rows.append(
                {
                    "keyspace": ks.name,
                    "shard": sh.id,
                    "range": desc,
                    "replicas": list(sh.nodes),
                    "primary": sh.primary,
                    "state": sh.state,
                }
            )
        return rows

    def pending_moves(self, now: float) -> list[dict[str, Any]]:
        """Unfinished moves: ``copying``, ``queued`` (waiting for a slot) or ``backoff``."""
        with self._lock:
            return self._engine.pending(_number(now, "now"))

    def shortfall(self) -> dict[str, int]:
        """Replicas per shard the last plan could not place (too few active nodes or zones)."""
        with self._lock:
            return dict(self._plan.shortfall) if self._plan else {}

    # -- persistence -----------------------------------------------------------------

    def snapshot(self, now: float) -> tuple[ShardMap, dict[str, Any]]:
        """The map and everything else needed to resume (msgpack-able; times relative to now)."""
        with self._lock:
            t = _number(now, "now")
            return self._map, snapshot_state(self, t)

    @classmethod
    def restore(
        cls, shard_map: ShardMap, state: Mapping[str, Any], now: float, config: ShardingConfig | None = None
    ) -> ShardingCore:
        """A core that resumes from :meth:`snapshot` output saved at any earlier time."""
        core = cls(config, default_keyspace=False)
        t = _number(now, "now")
        restore_into(core, shard_map, state, t)
        return core


def _show(b: bytes) -> str:
    return repr(b.decode("utf-8", "backslashreplace"))
