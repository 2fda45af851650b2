"""Simulated shells: each is a thin copy of what ``services/<name>/service.py`` does
with its core's results, with the sockets replaced by the simulated bus and the
clocks by virtual ones. The cores are the real ones, unchanged, and so is the
store code of the services (:class:`services.sharding.store.MapStore`,
:class:`services.manager.store.RegistryStore`, driven through
:mod:`phantom_sim.store`) and the map follower's core
(:class:`phantom_bus.follower.MapFollower`).

Sharding, the manager and membership run as two instances each: one leads
(a lease in the store), the other follows warm and answers ``not_leader`` to
what only the leader may do. Where a real shell and its copy here differ,
``docs/simulation.md`` says so.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

from phantom_bus import protocol
from phantom_bus.errors import (
    CasFailed,
    Fenced,
    NoLiveReplica,
    PhantomError,
    ServiceUnavailable,
    StoreError,
)
from phantom_bus.follower import CURRENT, MapFollower
from phantom_bus.routing import inputs
from phantom_bus.routing.balancer import Balancer, Candidate
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.shardmap import ShardMap
from phantom_bus.store import Compacted
from services.agent.incarnation import refutation
from services.discovery.beacon import Beacon, encode_beacon
from services.discovery.core import DiscoveryConfig, DiscoveryTable
from services.manager.config import ManagerConfig
from services.manager.core import Action, Decision, ManagerCore, MembershipTerm
from services.manager.health import shards_from_map
from services.manager.registry import Registry
from services.manager.store import PREFIX as REGISTRY_PREFIX
from services.manager.store import RegistryStore
from services.membership.config import MembershipConfig
from services.membership.core import Membership
from services.membership.service import wire_change, wire_members
from services.sharding.config import ShardingConfig
from services.sharding.core import CHANGED, Result, ShardingCore
from services.sharding.service import _with_map, map_reply, resume
from services.sharding.store import PREFIX as MAP_PREFIX
from services.sharding.store import Committed, MapStore

from . import buggify
from .store import Leadership, SimStore, drive
from .world import Call, Lock, Proc, Sleep, Wait, World

Loop = Generator[Any, Any, Any]


class Params:
    """The settings of one simulated cluster (real defaults where the cost allows)."""

    timeout = 2.5  # setting ``timeout``
    beacon_interval = 1.0
    beacon_expiry = 5.0
    heartbeat_interval = 0.5  # real default 0.25 s: halves the simulated traffic; thresholds scale with it
    membership_tick = 0.2  # real 0.1 s: the same fraction of the heartbeat interval
    copy_time = 0.5
    dead_delay = 5.0  # real default 60 s: shortened so a history sees re-replication
    shards = 8
    rf = 3
    slots = 256  # real default 16384: the slot table is rebuilt for every map a consumer reads
    leave_grace = 2.0
    move_timeout = 10.0
    retry_backoff = 2.0
    leader_ttl = 4.0  # setting ``leader_ttl``
    membership_sync = 5.0  # membership._SYNC_PERIOD
    balancer_snapshot = 5.0  # balancer._SNAPSHOT is 2 s: fewer snapshot reads, for speed
    follower_poll = 1.0  # phantom_bus.follower.DEFAULT_POLL_S (balancer, manager)
    #: Seconds between sharding's ``shardmap.current`` (services/sharding/service.py,
    #: every second). None by default: the followers then keep current by their polls
    #: alone, the harder case, where a stale map lasts longest and the races the
    #: invariants look for are likeliest (with it on, a broken confirmation round is
    #: caught ten times less often). A history may turn it on (tests/test_sim.py does).
    current_every: float | None = None
    agent_poll = 2.0  # real 1 s: agents and the client poll half as often, for speed
    manager_reconcile = 30.0  # manager._RECONCILE
    manager_level = 1.0  # manager._LEVEL
    instances = 2  # of sharding, the manager and membership

    def sharding(self) -> ShardingConfig:
        return ShardingConfig(dead_delay=self.dead_delay, default_shards=self.shards, default_rf=self.rf,
                              leave_grace=self.leave_grace, move_timeout=self.move_timeout,
                              retry_backoff=self.retry_backoff, hash_slots=self.slots)


def _params(proc: Proc) -> Params:
    return proc.world.params  # type: ignore[attr-defined]


# The same map reaches every consumer many times, and the invariants fingerprint each
# one: pack each map once, decode each committed blob once (with the real pack, unpack,
# protocol.unpack and ShardMap.from_wire) and hand out the result. Maps are frozen and
# nobody mutates a wire document, so this changes nothing but the cost (see memo()).
_LIMIT = 1024
_PACKED: dict[int, tuple[ShardMap, bytes]] = {}
_UNPACKED: dict[int, tuple[bytes, ShardMap]] = {}
_DOCS: dict[int, tuple[bytes, Any]] = {}
_MAPS: dict[int, tuple[Any, ShardMap]] = {}


def _put(cache: dict[int, tuple[Any, Any]], key: Any, value: Any) -> None:
    if len(cache) > _LIMIT:
        cache.clear()
    cache[id(key)] = (key, value)


def _hit(cache: dict[int, tuple[Any, Any]], key: Any) -> Any:
    """What ``cache`` holds for this very object (not one that reused its id), or None."""
    hit = cache.get(id(key))
    return hit[1] if hit is not None and hit[0] is key else None


def _doc(blob: bytes) -> Any:
    """The wire document of a packed map (what a client decodes from the ``map`` reply)."""
    doc = _hit(_DOCS, blob)
    if doc is None:
        doc = protocol.unpack(blob, max_size=len(blob) + 1)
        _put(_DOCS, blob, doc)
        known = _hit(_UNPACKED, blob)
        if known is not None:
            _put(_MAPS, doc, known)
    return doc


@contextlib.contextmanager
def memo() -> Iterator[None]:
    """Memoise ShardMap.pack, unpack and from_wire by identity for the length of a run."""
    pack, unpack, from_wire = (ShardMap.__dict__[n] for n in ("pack", "unpack", "from_wire"))

    def memo_pack(self: ShardMap) -> bytes:
        blob: bytes | None = _hit(_PACKED, self)
        if blob is None:
            blob = pack(self)
            _put(_PACKED, self, blob)
            _put(_UNPACKED, blob, self)
        return blob

    def decoder(decode: Any, cache: dict[int, tuple[Any, Any]]) -> Any:
        def memo_decode(cls: type[ShardMap], source: Any) -> ShardMap:
            m: ShardMap | None = _hit(cache, source)
            if m is None:
                m = decode.__func__(cls, source)
                _put(cache, source, m)
            return m

        return classmethod(memo_decode)

    ShardMap.pack = memo_pack  # type: ignore[method-assign]
    ShardMap.unpack = decoder(unpack, _UNPACKED)  # type: ignore[method-assign]
    ShardMap.from_wire = decoder(from_wire, _MAPS)  # type: ignore[method-assign]
    try:
        yield
    finally:
        ShardMap.pack, ShardMap.unpack, ShardMap.from_wire = pack, unpack, from_wire  # type: ignore[method-assign]
        for cache in (_PACKED, _UNPACKED, _DOCS, _MAPS):
            cache.clear()


class Checker:
    """What the shells report to the invariants (see :mod:`phantom_sim.invariants`)."""

    def committed(self, writer: str, shard_map: ShardMap, reason: str) -> None: ...
    def accepted(self, consumer: str, shard_map: ShardMap) -> None: ...
    def restored(self, proc: Proc, shard_map: ShardMap) -> None: ...
    def member_event(self, kind: str, data: dict[str, Any]) -> None: ...
    def selected(self, sel: dict[str, Any]) -> None: ...
    def copied(self, shard: str, node: str) -> None: ...
    def node_state(self, consumer: str, node: str, version: tuple[int, int] | None) -> None: ...
    def verdict(self, consumer: str, node: str, term: int, fields: dict[str, Any], held: Any, taken: bool) -> None: ...


def _checker(proc: Proc) -> Any:
    return proc.world.checker  # type: ignore[attr-defined]


# --- the map follower ------------------------------------------------------------------


class Follower:
    """``phantom_bus.follower.AsyncMapFollower``: the real MapFollower core, its shell here.

    Every newer map it takes is reported to the invariants as accepted by ``name``.
    """

    def __init__(self, proc: Proc, name: str, poll_s: float, verify_s: float = 15.0,
                 on_change: Callable[[ShardMap], None] | None = None) -> None:
        self.proc = proc
        self.name = name
        self.core = MapFollower(poll_s=poll_s, verify_s=verify_s)
        self.wake = proc.flag()
        self.changed = proc.flag()
        self.on_change = on_change
        self.task = proc.spawn(self.run(), f"{proc.name}.follower")

    @property
    def map(self) -> ShardMap | None:
        return self.core.map

    def _took(self, fresh: ShardMap) -> None:
        _checker(self.proc).accepted(self.name, fresh)
        self.changed.set()
        if self.on_change is not None:
            self.on_change(fresh)

    def hint(self, event: Mapping[str, Any]) -> None:
        pushed = event.get("map")
        if isinstance(pushed, bytes):
            term = event.get("term")
            try:
                outcome = self.core.on_pushed(_doc(pushed), term if isinstance(term, int) else None,
                                              self.proc.monotonic())
            except PhantomError:
                outcome = None
            if outcome is not None and outcome.changed is not None:
                self._took(outcome.changed)
                self.wake.set()
                return
        if self.core.hint(event):
            self.wake.set()

    def current(self, event: Mapping[str, Any]) -> None:
        if self.core.on_current(event, self.proc.monotonic()):
            self.wake.set()

    def poke(self) -> None:
        self.core.poke()
        self.wake.set()

    def read_once(self) -> Loop:
        proc = self.proc
        args = self.core.next_read(proc.monotonic())
        if args is None:
            return
        full = "since_epoch" not in args
        try:
            doc = yield Call("sharding", "map", args, _params(proc).timeout)
            outcome = self.core.on_reply(doc, proc.monotonic(), full=full)
        except PhantomError:
            self.core.on_error(proc.monotonic(), full=full)
            return
        if outcome.changed is not None:
            self._took(outcome.changed)

    def refresh(self) -> Loop:
        self.core.poke()
        yield from self.read_once()

    def run(self) -> Loop:
        proc, core = self.proc, self.core
        while True:
            yield from self.read_once()
            now = proc.monotonic()
            wait = max(0.0, min(core.wake_at(now) - now, core.poll_s))
            self.wake.clear()
            if core.wake_at(proc.monotonic()) <= proc.monotonic():
                continue
            yield Wait(self.wake, wait)


# --- discovery ------------------------------------------------------------------------


class DiscoveryProc(Proc):
    """services/discovery/service.py"""

    service = "discovery"

    def boot(self) -> None:
        p = _params(self)
        cfg = DiscoveryConfig(beacon_interval=p.beacon_interval, expiry=p.beacon_expiry, forget_after=600.0)
        cfg.validate()
        self.table = DiscoveryTable(cfg)
        self.ops = {"nodes": lambda: self.table.nodes(self.monotonic()),
                    "register": self.op_register, "remove": self.op_remove}
        self.spawn(self.tick_loop(), "discovery.tick")

    def _publish(self, events: list[Any]) -> None:
        for event in events:
            self.publish(event.kind, event.data)

    def op_register(self, node: str, address: str, zone: str = "default", weight: float = 1.0) -> Any:
        now = self.monotonic()
        self._publish(self.table.register(node, address, zone, weight, now))
        return self.table.node(node, now)

    def op_remove(self, node: str) -> Any:
        self._publish(self.table.remove(node, self.monotonic()))
        return {"removed": node}

    def beacon(self, payload: bytes) -> None:
        self._publish(self.table.receive(payload, self.monotonic()))

    def tick_loop(self) -> Loop:
        period = self.world.params.beacon_interval / 4  # type: ignore[attr-defined]
        while True:
            yield Sleep(period)
            self._publish(self.table.tick(self.monotonic()))


# --- membership -------------------------------------------------------------------------


class MembershipProc(Proc):
    """services/membership/service.py: every instance detects, only the leader's verdicts count."""

    service = "membership"

    def boot(self) -> None:
        p = _params(self)
        self.core = Membership(MembershipConfig(heartbeat_interval=p.heartbeat_interval,
                                                tick_interval=p.membership_tick))
        self.leadership = Leadership(self, "membership", p.leader_ttl)
        self.withheld = 0
        self.ops = {"members": self.op_members, "verdicts": self.op_verdicts,
                    "admit": self.op_admit, "forget": self.op_forget}
        self.subs = [("node.", self.on_node_event)]
        self.spawn(self.tick_loop(), "membership.tick")
        self.spawn(self.sync_loop(), "membership.sync")

    def _publish(self, events: list[Any]) -> None:
        if not events:
            return
        if not self.leadership.is_leader:
            self.withheld += len(events)  # a follower's detector stays warm; only the leader's verdicts count
            return
        term = self.leadership.term
        for event in events:
            if event.kind != "member.load":
                self.world.log(self, f"{event.kind} {event.data.get('node')} ({event.data.get('reason')})")
                _checker(self).member_event(event.kind, event.data)
            data = {**event.data, "term": term}
            if isinstance(data.get("change"), int):
                data["change"] = self._wire_change(term, data["change"])
            self.publish(event.kind, data)

    def _wire_change(self, term: int, change: int) -> int:
        return change if buggify.on("per_instance_change") else wire_change(term, change)

    def _rows(self, term: int) -> list[dict[str, Any]]:
        rows = self.core.members(self.monotonic())
        return rows if buggify.on("per_instance_change") else wire_members(rows, term)

    def op_members(self) -> Any:
        return self._rows(self.leadership.term if self.leadership.is_leader else 0)

    def op_verdicts(self) -> Any:
        if not self.leadership.is_leader:
            raise self.leadership.not_leader()
        term = self.leadership.term
        return {"term": term, "instance": self.name, "members": self._rows(term)}

    def op_admit(self, node: str, interval: float | None = None, incarnation: int | None = None) -> Any:
        return {"node": node, "new": self.core.admit(node, self.monotonic(), interval, incarnation)}

    def op_forget(self, node: str) -> Any:
        self._publish(self.core.forget(node, self.monotonic()))
        return {"node": node, "forgotten": True}

    def _admit_from(self, doc: dict[str, Any]) -> None:
        with contextlib.suppress(PhantomError):
            self.core.admit_discovered(doc, self.monotonic())

    def on_node_event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind in ("node.discovered", "node.updated"):
            self._admit_from(event)
        elif kind == "node.removed" and isinstance(event.get("node"), str):
            self._publish(self.core.forget(event["node"], self.monotonic()))

    def sync_loop(self) -> Loop:
        p = _params(self)
        while True:
            try:
                for doc in (yield Call("discovery", "nodes", {}, p.timeout)):
                    if doc.get("state") != "left":
                        self._admit_from(doc)
            except PhantomError:
                pass
            yield Sleep(p.membership_sync)

    def heartbeat(self, agent: AgentProc, msg: dict[str, Any]) -> None:
        now = self.monotonic()
        try:
            result = self.core.heartbeat(msg["node"], msg["incarnation"], msg["seq"], msg["load"], now,
                                         wall_ms=int(self.wall() * 1000))
        except PhantomError as err:
            ack: dict[str, Any] = {"ok": False, "error": err.to_wire()}
            self.world.send(self, agent, "hbrep", agent.on_ack, ack)
            return
        ack = result.to_wire()
        ack["ok"] = result.ok
        refusal = result.error()
        if refusal is not None:
            ack["error"] = refusal.to_wire()
        # An ack the agent would act on (only those: the others change nothing when they arrive,
        # as the agent's incarnation only grows).
        if refutation(msg["incarnation"], ack) is not None:
            self.world.send(self, agent, "hbrep", agent.on_ack, ack)
        if result.events:
            self._publish(list(result.events))

    def tick_loop(self) -> Loop:
        cfg = self.core.config
        period, digest_period = cfg.tick_interval, cfg.load_digest_interval
        due = self.monotonic() + period
        next_digest = self.monotonic() + digest_period
        while True:
            yield Sleep(max(0.0, due - self.monotonic()))
            woke = self.monotonic()
            lag = max(0.0, woke - due)
            if buggify.on("ignore_observer_lag"):
                lag = 0.0
            self._publish(self.core.tick(woke, observer_lag=lag))
            if woke >= next_digest:
                self._publish(self.core.load_events(woke))
                next_digest = woke + digest_period
            due = woke + period


# --- sharding ---------------------------------------------------------------------------


class ShardingProc(Proc):
    """services/sharding/service.py: the leader commits every epoch with a fenced CAS
    (the real MapStore), then publishes it with its term and the map pushed in; a
    failed commit rolls the core back; followers follow the store."""

    service = "sharding"

    def boot(self) -> None:
        p = _params(self)
        self.config = p.sharding()
        self.maps = MapStore(SimStore())  # type: ignore[arg-type]
        self.leadership = Leadership(self, "sharding", p.leader_ttl)
        self.leadership.while_leading(self._lead)
        self.core: ShardingCore | None = None
        self.committed: Committed | None = None
        self.store_ok = True
        self._reader_core: tuple[int, ShardingCore] | None = None
        self._write = Lock(self)
        self._announced: tuple[int, int] | None = None  # what shardmap.current says
        self.ops = {
            "map": self.op_map,
            "nodes": lambda: self._reader().nodes(),
            "sole_replicas": lambda node: self._reader().sole_replicas(node),
            "add_node": lambda node, zone="default", weight=1.0: self._commit(
                lambda c: c.add_node(node, zone, weight, now=self.monotonic())),
            "drain_node": lambda node: self._commit(lambda c: c.drain_node(node, now=self.monotonic())),
            "remove_node": lambda node: self._commit(lambda c: c.remove_node(node, now=self.monotonic())),
            "node_dead": lambda node: self._commit(lambda c: c.node_dead(node, self.monotonic())),
            "node_alive": lambda node: self._commit(lambda c: c.node_alive(node, self.monotonic())),
            # The simulated agent names the epoch of the map that asked for the copy.
            "confirm": lambda shard, node, epoch=None: self._commit(lambda c: c.confirm(
                shard, node, self.monotonic(), None if buggify.on("confirm_any_round") else epoch)),
        }
        self.spawn(self.follow_loop(), "sharding.follow")
        self.spawn(self.tick_loop(), "sharding.tick")

    @property
    def leading(self) -> bool:
        return self.core is not None and self.leadership.is_leader

    def _adopt(self, committed: Committed) -> bool:
        old = self.committed
        if old is not None and committed.epoch < old.epoch:
            return False
        self.committed = committed
        return True

    def _resume(self, committed: Committed) -> ShardingCore:
        return resume(committed, self.config, self.monotonic(), self.wall())

    def _reader(self) -> ShardingCore:
        if self.core is not None:
            return self.core
        committed = self.committed
        if committed is None:
            raise ServiceUnavailable("sharding has not read the shard map from the store yet; retry")
        cached = self._reader_core
        if cached is None or cached[0] != committed.revision:
            cached = self._reader_core = (committed.revision, self._resume(committed))
        return cached[1]

    # -- leading -------------------------------------------------------------------------

    def _lead(self) -> Loop:
        delay = 0.1
        while True:
            yield from self._write.acquire()
            try:
                yield from self._take_over()
                break
            except (StoreError, CasFailed) as exc:
                if isinstance(exc, Fenced):
                    return
                self.store_ok = False
            finally:
                self._write.release()
            yield Sleep(delay)
            delay = min(delay * 2, 2.0)
        while True:  # lead until deposed, saying which epoch is served
            every = _params(self).current_every
            if every is None:
                yield Sleep(3600.0)
                continue
            yield Sleep(every)
            if self.core is not None and self._announced is not None:
                epoch, term = self._announced
                if term == self.leadership.term:
                    self.publish(CURRENT, {"epoch": epoch, "term": term})

    def _take_over(self) -> Loop:
        term = self.leadership.term
        fence = self.leadership.fence
        committed = yield from drive(self, self.maps.load())
        if committed is None:
            core = ShardingCore(self.config)
            shard_map, state = core.snapshot(self.monotonic())
            prepared = MapStore.prepare(shard_map, state, previous=None, term=term, wall=self.wall())
            committed = yield from drive(self, self.maps.commit(prepared, fence), "new")
        else:
            _checker(self).restored(self, committed.map)
            core = self._resume(committed)
        self.store_ok = True
        self._adopt(committed)
        self.core = core
        self.world.log(self, f"leads sharding, term {term}, epoch {committed.epoch}")
        self.publish(CHANGED, _with_map({"epoch": committed.epoch, "term": term, "reason": "leader.elected"},
                                        committed.blob))
        self._announced = (committed.epoch, term)

    def _commit(self, call: Callable[[ShardingCore], Result[Any]]) -> Loop:
        yield from self._write.acquire()
        try:
            return (yield from self._commit_locked(call))
        finally:
            self._write.release()

    def _commit_locked(self, call: Callable[[ShardingCore], Result[Any]]) -> Loop:
        core = self.core
        if core is None or not self.leadership.is_leader:
            raise self.leadership.not_leader()
        term = self.leadership.term
        fence = self.leadership.fence
        result = call(core)
        if not result.events:
            return result.value
        self._stall()
        yield Sleep(0.02)  # planning and encoding, in a worker thread in the real shell
        shard_map, state = core.snapshot(self.monotonic())
        prepared = MapStore.prepare(shard_map, state, previous=self.committed, term=term, wall=self.wall())
        reason = str(result.events[-1].data.get("reason"))
        try:
            committed = yield from drive(self, self.maps.commit(prepared, fence), reason)
        except Fenced:
            self.core = None
            raise self.leadership.not_leader() from None
        except CasFailed as exc:
            yield from self._rollback(reload=True)
            raise StoreError(f"the shard map changed in the store meanwhile; re-read it, retry: {exc}") from None
        except StoreError as exc:
            self.store_ok = False
            yield from self._rollback(reload=False)
            raise StoreError(f"epoch {shard_map.epoch} could not be committed and was rolled back; retry: {exc}") \
                from None
        self.store_ok = True
        self._adopt(committed)
        self.world.log(self, f"commit epoch {shard_map.epoch} ({reason}) down={sorted(shard_map.down)}")
        for event in result.events:
            data = {**event.data, "term": term}
            if event.kind == CHANGED:
                data = _with_map(data, committed.blob)
            self.publish(event.kind, data)
        self._announced = (committed.epoch, term)
        return result.value

    def _rollback(self, *, reload: bool) -> Loop:
        committed = self.committed
        if reload:
            try:
                fresh = yield from drive(self, self.maps.load())
            except StoreError:
                fresh = None
            if fresh is not None and self._adopt(fresh):
                committed = fresh
        if committed is None:
            self.core = None
            return
        self.core = self._resume(committed)

    def _probe(self) -> Loop:
        yield from self._write.acquire()
        try:
            core, committed = self.core, self.committed
            if core is None or committed is None or not self.leadership.is_leader:
                return
            shard_map, state = core.snapshot(self.monotonic())
            if shard_map.epoch != committed.epoch:
                return
            prepared = MapStore.prepare(shard_map, state, previous=committed, term=self.leadership.term,
                                        wall=self.wall())
            try:
                fresh = yield from drive(self, self.maps.commit(prepared, self.leadership.fence), "probe")
            except StoreError:
                return
            except CasFailed:
                return
            self.store_ok = True
            self._adopt(fresh)
        finally:
            self._write.release()

    # -- following -----------------------------------------------------------------------

    def follow_loop(self) -> Loop:
        delay = 0.1
        while True:
            if self.leading:
                yield from self.leadership.wait_following()
                continue
            try:
                committed = yield from drive(self, self.maps.load())
                start = 1
                if committed is not None:
                    start = committed.revision + 1
                    if (self.committed is None or committed.revision > self.committed.revision) \
                            and self._adopt(committed):
                        self._reader_core = None
                yield Call("store", "watch", {"prefix": MAP_PREFIX, "start": start}, 5.0, direct=True)
                delay = 0.1
            except Compacted:
                continue
            except PhantomError:
                yield Sleep(delay)
                delay = min(delay * 2, 2.0)

    def tick_loop(self) -> Loop:
        while True:
            yield Sleep(0.5)
            if not self.leading:
                continue
            if not self.store_ok:
                yield from self._probe()
            with contextlib.suppress(PhantomError):
                yield from self._commit(lambda c: c.tick(self.monotonic()))

    # -- reads -----------------------------------------------------------------------------

    def op_map(self, since_epoch: int | None = None) -> Any:
        blob = map_reply(self.committed, since_epoch, self.leading, self.leadership.not_leader)
        return None if blob is None else _doc(blob)


# --- balancer ---------------------------------------------------------------------------


class BalancerProc(Proc):
    """services/balancer/service.py: the map through the shared follower; node health from
    membership's versioned verdicts (phantom_bus.routing.inputs), events and snapshots."""

    service = "balancer"

    def boot(self) -> None:
        p = _params(self)
        self.core = Balancer(BalancerConfig(), random.Random(self.world.rng.getrandbits(32)))
        self.verdict_term = 0
        self.life = f"{self.name} (life {self.gen})"  # a restarted consumer starts over
        self.follower = Follower(self, self.name, p.follower_poll)
        self.ops = {"select": self.op_select, "node_update": self.op_node_update}
        self.subs = [("shardmap.changed", self.follower.hint), (CURRENT, self.follower.current),
                     ("member.", self._on_event), ("node.", self._on_event), ("cluster.node_", self._on_event)]
        self.spawn(self.sync_loop(), "balancer.sync")
        self.spawn(self.tick_loop(), "balancer.tick")

    def op_select(self, key: str, write: bool = False, keyspace: str | None = None) -> Any:
        m = self.follower.map
        if m is None:
            raise NoLiveReplica("the balancer has no shard map yet (is sharding running?)")
        shard = m.lookup(keyspace or "default", key)
        candidates = [Candidate(r.node, r.role) for r in shard.replicas]
        sel = self.core.select(shard.id, candidates, write=write, lease=False, now=self.monotonic())
        return {"key": key, "shard": shard.id, "node": sel.node, "epoch": m.epoch, "role": sel.role}

    def op_node_update(self, node: str, **fields: Any) -> Any:
        self.core.node_update(node, now=self.monotonic(), **fields)
        return {"node": node}

    def _apply(self, updates: list[inputs.Update]) -> None:
        now = self.monotonic()
        for node, fields in updates:
            if fields.get("load") is not None:
                fields = {k: v for k, v in fields.items() if k != "load"}  # no loads (docs/simulation.md)
                if not fields:
                    continue
            with contextlib.suppress(PhantomError):
                self.core.node_update(node, now=now, **fields)
                if "state" in fields:
                    _checker(self).node_state(self.life, node, self.core._nodes[node].version)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("kind"))
        if kind == "member.load":
            return  # the simulated agents send no load
        updates = inputs.from_event(event)
        term = event.get("term")
        if kind.startswith("member.") and isinstance(term, int) and term >= self.verdict_term:
            # A verdict of the newest membership leader: report whether it was taken.
            self.verdict_term = term
            for node, fields in updates:
                with contextlib.suppress(PhantomError):
                    ns = self.core._nodes.get(node)
                    held = None if ns is None else (ns.state, ns.version)
                    taken = self.core.node_update(node, now=self.monotonic(), **fields)
                    _checker(self).node_state(self.life, node, self.core._nodes[node].version)
                    _checker(self).verdict(self.name, node, term, fields, held, taken)
            return
        self._apply(updates)

    def sync_loop(self) -> Loop:
        p = _params(self)
        while True:
            with contextlib.suppress(PhantomError):
                self._apply(inputs.from_discovery((yield Call("discovery", "nodes", {}, p.timeout))))
            with contextlib.suppress(PhantomError):
                self._apply(inputs.from_members((yield Call("membership", "members", {}, p.timeout))))
            yield Sleep(p.balancer_snapshot)

    def tick_loop(self) -> Loop:
        while True:
            yield Sleep(0.5)
            for event in self.core.tick(self.monotonic()):
                self.publish(event.kind, event.data)


# --- manager ----------------------------------------------------------------------------

_BACKOFF_MAX = 5.0


class ManagerProc(Proc):
    """services/manager/service.py: the leader decides, commits the registry changes (the
    real RegistryStore: one fenced CAS transaction), then publishes and acts; followers
    keep the committed registry warm."""

    service = "manager"

    def boot(self) -> None:
        p = _params(self)
        self.registry_store = RegistryStore(SimStore())  # type: ignore[arg-type]
        self.leadership = Leadership(self, "manager", p.leader_ttl)
        self.leadership.while_leading(self._lead)
        self.core = ManagerCore(ManagerConfig(auto_join=True, rereplication_delay=p.dead_delay))
        self._decide = Lock(self)
        self._queues: dict[str, list[Action]] = {}
        self._ready: dict[str, Any] = {}
        self._pending: set[tuple[str, str, str | None]] = set()
        self._workers: list[Any] = []
        self._loaded_revision = 0
        self._member_term = MembershipTerm()
        self._map: ShardMap | None = None
        self._map_stale = self.flag()
        self._inbox: list[dict[str, Any]] = []
        self._inbox_ready = self.flag()
        self.ops = {"drain": self.op_drain, "nodes": lambda: [r.to_dict() for r in self.core.nodes()]}
        self.subs = [("node.", self.on_event), ("member.", self.on_event),
                     ("shardmap.changed", self.on_map_changed)]
        self.follower: Follower | None = None
        self.spawn(self.follow_loop(), "manager.follow")
        self.spawn(self.event_loop(), "manager.events")

    # -- deciding: commit first, then act ---------------------------------------------------

    def _decide_and_apply(self, decide: Callable[[], Decision]) -> Loop:
        if not self.leadership.is_leader:
            raise self.leadership.not_leader()
        yield from self._decide.acquire()
        try:
            if not self.leadership.is_leader:
                raise self.leadership.not_leader()
            fence = self.leadership.fence
            decision = decide()
            if decision.changes:
                self._stall()
                yield Sleep(0.001)
                try:
                    yield from drive(self, self.registry_store.apply(decision.changes, fence))
                except Fenced:
                    self.core.reset_registry(self.registry_store.committed())
                    raise self.leadership.not_leader() from None
                except (StoreError, CasFailed) as exc:
                    self.core.reset_registry(self.registry_store.committed())
                    raise StoreError(f"the registry change was not committed and was rolled back; retry: {exc}") \
                        from None
        finally:
            self._decide.release()
        for a in decision.actions:
            self.world.log(self, f"action {a.service}.{a.op} {dict(a.args)}")
        for event in decision.events:
            self.publish(event.kind, event.data)
        for action in decision.actions:
            self._enqueue(action)
        return decision.value

    def _enqueue(self, action: Action) -> None:
        key = (action.service, action.op, action.node)
        if key in self._pending and action.failover:
            return
        queue = self._queues.get(action.service)
        if queue is None:
            queue = self._queues[action.service] = []
            self._ready[action.service] = self.flag()
            self._workers.append(self.spawn(self._run_queue(action.service, queue),
                                            f"manager.queue.{action.service}"))
        queue.append(action)
        self._pending.add(key)
        self._ready[action.service].set()

    def _superseded(self, action: Action) -> bool:
        down = self.core.is_down(action.node or "")
        return down is False if action.op == "node_dead" else down is True

    def _run_queue(self, service: str, queue: list[Action]) -> Loop:
        ready = self._ready[service]
        while True:
            while not queue:
                ready.clear()
                yield Wait(ready, 3600.0)
            action = queue.pop(0)
            try:
                yield from self._carry_out(action)
            finally:
                self._pending.discard((action.service, action.op, action.node))
            if action.service == "sharding" and action.op == "drain_node":
                self._map_stale.set()

    def _carry_out(self, action: Action) -> Loop:
        p = _params(self)
        failover = action.failover
        delay, attempt = 0.1, 0
        while self.leadership.is_leader:
            if failover and self._superseded(action):
                return
            try:
                yield Call(action.service, action.op, dict(action.args), p.timeout)
                return
            except PhantomError as err:
                if action.done_by(err):
                    return
                attempt += 1
                if action.gives_up(err, attempt):
                    return
                yield Sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def _stop_acting(self) -> None:
        for task in self._workers:
            task.cancel()
        self._workers.clear()
        self._queues.clear()
        self._ready.clear()
        self._pending.clear()

    # -- operations and events ----------------------------------------------------------------

    def op_drain(self, node: str) -> Loop:
        return self._decide_and_apply(lambda: self.core.drain(node, now=self.wall()))

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("kind") != "member.load" and self.leadership.is_leader:
            self._inbox.append(event)
            self._inbox_ready.set()

    def event_loop(self) -> Loop:
        """The subscription's one task: events are decided on in the order they came."""
        while True:
            while not self._inbox:
                self._inbox_ready.clear()
                yield Wait(self._inbox_ready, 3600.0)
            event = self._inbox.pop(0)
            kind = str(event.get("kind"))
            if not self.leadership.is_leader:
                continue
            if kind.startswith("member.") and not self._member_term.fresh(event.get("term")):
                continue
            with contextlib.suppress(PhantomError):
                yield from self._decide_and_apply(lambda e=event: self.core.on_event(e, self.wall()))  # type: ignore[misc]

    def on_map_changed(self, event: dict[str, Any]) -> None:
        if self.follower is not None:
            self.follower.hint(event)

    # -- the leader's loops ----------------------------------------------------------------

    def _lead(self) -> Loop:
        delay = 0.1
        while True:
            try:
                yield from self._reload()
                break
            except StoreError:
                yield Sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
        self._member_term = MembershipTerm()
        self.world.log(self, f"leads the manager, term {self.leadership.term}")
        p = _params(self)
        self.follower = Follower(self, self.name, p.follower_poll)
        loops = [self.spawn(body, f"manager.{name}") for name, body in (
            ("reconcile", self.reconcile_loop()), ("map", self.map_loop()), ("level", self.level_loop()))]
        try:
            while True:
                yield Sleep(3600.0)
        finally:
            for task in loops:
                task.cancel()
            if self.follower is not None:
                self.follower.task.cancel()
            self.follower = None
            self._stop_acting()

    def _reload(self) -> Loop:
        yield from self._decide.acquire()
        try:
            records, tombstones, revision = yield from drive(self, self.registry_store.load())
            self.core.reset_registry(Registry.restore(records, tombstones, self.core.config.max_tombstones))
            self._loaded_revision = revision
        finally:
            self._decide.release()

    def map_loop(self) -> Loop:
        follower = self.follower
        assert follower is not None
        while True:
            if self._map_stale.is_set:
                self._map_stale.clear()
                yield from follower.refresh()
            else:
                follower.changed.clear()
                yield Wait(follower.changed, 2.0)
                if self._map_stale.is_set:
                    continue
            self._map = m = follower.map
            if m is not None:
                with contextlib.suppress(PhantomError):
                    yield from self._decide_and_apply(lambda m=m: self.core.observe_shards(  # type: ignore[misc]
                        shards_from_map(m), now=self.wall(), down=m.down, epoch=m.epoch))

    def level_loop(self) -> Loop:
        p = _params(self)
        next_discovery = 0.0
        while True:
            try:
                doc = yield Call("membership", "verdicts", {}, p.timeout)
                if (isinstance(doc, dict) and isinstance(doc.get("members"), list)
                        and self._member_term.fresh(doc.get("term"))):
                    yield from self._decide_and_apply(lambda d=doc: self.core.sync_members(  # type: ignore[misc]
                        d["members"], self.wall()))
            except PhantomError:
                pass
            try:
                nodes = yield Call("sharding", "nodes", {}, p.timeout)
                expired = [n["node"] for n in nodes if isinstance(n, dict) and n.get("expired")]
                yield from self._decide_and_apply(lambda e=expired: self.core.tick(self.wall(), e))  # type: ignore[misc]
            except PhantomError:
                pass
            m = self._map
            if m is not None:
                for action in self.core.drift(m.down):
                    self._enqueue(action)
            if self.monotonic() >= next_discovery:
                next_discovery = self.monotonic() + 5.0
                try:
                    docs = yield Call("discovery", "nodes", {}, p.timeout)
                    yield from self._decide_and_apply(lambda d=docs: self.core.sync_discovery(  # type: ignore[misc]
                        d, self.wall()))
                except PhantomError:
                    pass
            yield Sleep(p.manager_level)

    def reconcile_loop(self) -> Loop:
        p = _params(self)
        yield Sleep(0.5)
        removals = True
        while True:
            self.world.log(self, "reconcile")
            for action in self.core.reconcile(self.wall(), removals=removals):
                self._enqueue(action)
            removals = False
            yield Sleep(p.manager_reconcile)

    def follow_loop(self) -> Loop:
        delay = 0.1
        while True:
            if self.leadership.is_leader:
                yield from self.leadership.wait_following()
                continue
            try:
                yield from self._reload()
                yield Call("store", "watch", {"prefix": REGISTRY_PREFIX, "start": self._loaded_revision + 1}, 5.0,
                           direct=True)
                delay = 0.1
            except Compacted:
                continue
            except PhantomError:
                yield Sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)


# --- agent ------------------------------------------------------------------------------


class AgentProc(Proc):
    """services/agent/agent.py (beacons, heartbeats, incarnation, copying joining replicas)."""

    def __init__(self, world: World, name: str, host: str, zone: str) -> None:
        super().__init__(world, name, host)
        self.node = name
        self.zone = zone
        self.address = f"10.0.0.{len(world.procs) + 1}:7000"
        self.assignments: dict[str, str] = {}

    def boot(self) -> None:
        # next_incarnation: max(stored + 1, wall clock in ms), written before use.
        stored = self.disk.get("incarnation")
        now_ms = int(self.wall() * 1000)
        value = now_ms if stored is None else max(stored + 1, now_ms)
        self.write("incarnation", value)
        self.incarnation = value
        self.instance = f"{self.world.rng.getrandbits(64):016x}"
        self.started = self.wall()
        self.assignments = {}
        self.copying: dict[str, Any] = {}
        # Whole-map reads are rarer for agents (one per agent adds up across a cluster).
        self.follower = Follower(self, self.name, _params(self).agent_poll, verify_s=60.0)
        self.subs = [("shardmap.changed", self.follower.hint), (CURRENT, self.follower.current)]
        self.spawn(self.beacon_loop(), "agent.beacon")
        self.spawn(self.heartbeat_loop(), "agent.heartbeat")
        self.spawn(self.assignment_loop(), "agent.assignment")

    def _beacon(self) -> None:
        p = _params(self)
        beacon = Beacon(node=self.node, incarnation=self.incarnation, instance=self.instance, address=self.address,
                        zone=self.zone, weight=1.0, version="sim", started=self.started,
                        hb={"endpoint": "sim", "interval": p.heartbeat_interval})
        disc = self.world.services["discovery"][0]
        self.world.send(self, disc, "beacon", disc.beacon, encode_beacon(beacon), lossy=True)  # type: ignore[attr-defined]

    def beacon_loop(self) -> Loop:
        p = _params(self)
        for pause in (0.05, 0.2):
            self._beacon()
            yield Sleep(pause)
        while True:
            self._beacon()
            yield Sleep(p.beacon_interval)

    def on_ack(self, ack: dict[str, Any]) -> None:
        target = refutation(self.incarnation, ack)
        if target is not None:
            self._bump(target)

    def _bump(self, incarnation: int) -> None:
        if incarnation <= self.incarnation:
            return
        # persist_incarnation: a failed write raises out of the heartbeat loop and ends the agent.
        try:
            stored = self.disk.get("incarnation")
            if stored is None or incarnation > stored:
                self.write("incarnation", incarnation)
        except OSError as err:
            self.world.note_crash(self, f"persist_incarnation: {err}")
            self.crash(restart=True)
            return
        self.incarnation = incarnation

    def heartbeat_loop(self) -> Loop:
        p = _params(self)
        seq = 0
        members = self.world.services["membership"]
        while True:
            seq += 1
            msg = {"op": "hb", "node": self.node, "incarnation": self.incarnation, "seq": seq, "load": None}
            for m in members:
                if m.up:  # IMMEDIATE: nothing is queued for a peer that is not connected
                    self.world.send(self, m, "hb", m.heartbeat, self, msg)  # type: ignore[attr-defined]
            yield Sleep(p.heartbeat_interval)

    def _copy(self, shard: str, epoch: int, done: list[bool]) -> Loop:
        p = _params(self)
        try:
            yield Sleep(p.copy_time)
            self.world.checker.copied(shard, self.node)  # type: ignore[attr-defined]
            while True:
                try:
                    yield Call("sharding", "confirm", {"shard": shard, "node": self.node, "epoch": epoch}, p.timeout)
                    self.follower.poke()
                    return
                except PhantomError as exc:
                    if not exc.retry:
                        return
                    yield Sleep(1.0)
        finally:
            done[0] = True

    def assignment_loop(self) -> Loop:
        while True:
            shard_map = self.follower.map
            if shard_map is not None:
                self.assignments = {shard.id: role for _, shard in shard_map.shards()
                                    if (role := shard.role_of(self.node)) is not None}
                joining = {s for s, role in self.assignments.items() if role == "joining"}
                for shard in sorted(joining - self.copying.keys()):
                    done = [False]
                    self.copying[shard] = done
                    self.spawn(self._copy(shard, shard_map.epoch, done), f"agent.copy.{shard}")
                for shard in [s for s, done in self.copying.items() if done[0] and s not in joining]:
                    del self.copying[shard]
            self.follower.changed.clear()
            yield Wait(self.follower.changed, 5.0)


# --- a client that writes, and the operator -------------------------------------------


class ClientProc(Proc):
    """A smart client: follows the map (the shared follower; its epochs must never go back),
    asks the balancer for the primary of a key twice a second, and carries the operator's
    commands (``phantom drain``) to the manager's leader."""

    def boot(self) -> None:
        self.follower = Follower(self, self.name, _params(self).agent_poll)
        self.subs = [("shardmap.changed", self.follower.hint), (CURRENT, self.follower.current)]
        self.spawn(self.loop(), "client")

    def operator(self, op: str, node: str, done: Callable[[], None] | None = None) -> None:
        """An operator's command, retried while the answer is retryable; ``done`` runs
        once the manager took it (a refusal, e.g. a node not registered yet, is final)."""
        self.spawn(self._operator(op, node, done), f"operator.{op}")

    def _operator(self, op: str, node: str, done: Callable[[], None] | None) -> Loop:
        p = _params(self)
        for _ in range(20):
            try:
                yield Call("manager", op, {"node": node}, p.timeout)
            except PhantomError as exc:
                if not exc.retry:
                    return
            else:
                if done is not None:
                    done()
                return
            yield Sleep(1.0)

    def loop(self) -> Loop:
        p = _params(self)
        n = 0
        while True:
            yield Sleep(0.5)
            n += 1
            try:
                sel = yield Call("balancer", "select", {"key": f"user:{n % 50}", "write": True}, p.timeout)
                _checker(self).selected(sel)
            except PhantomError:
                pass
