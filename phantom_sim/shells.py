"""Simulated shells: each is a copy of what ``services/<name>/service.py`` did with its
core's results before the shells moved onto the shared store (one instance per
service, local stores), with the sockets replaced by the simulated bus and the
clocks by virtual ones. The cores are the real ones, unchanged.

Where a real shell and this copy differ, ``docs/simulation.md`` says so.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Generator
from typing import Any

from phantom_bus.errors import Conflict, NotFound, PhantomError
from phantom_bus.events import Event
from phantom_bus.routing.balancer import Balancer, Candidate
from phantom_bus.routing.config import BalancerConfig
from phantom_bus.shardmap import ShardMap
from services.agent.incarnation import refutation
from services.discovery.beacon import Beacon, encode_beacon
from services.discovery.core import DiscoveryConfig, DiscoveryTable
from services.manager.config import ManagerConfig
from services.manager.core import Action, Decision, ManagerCore
from services.manager.health import shards_from_map
from services.membership.config import MembershipConfig
from services.membership.core import Membership
from services.sharding.config import ShardingConfig
from services.sharding.core import CHANGED, Result, ShardingCore

from . import buggify
from .disk import SimMapStore, SimRegistryStore
from .world import Call, Proc, Sleep, Wait, World

Loop = Generator[Any, Any, None]


class Params:
    """The settings of one simulated cluster (real defaults where the cost allows)."""

    timeout = 2.5  # setting ``timeout``
    beacon_interval = 1.0
    beacon_expiry = 5.0
    heartbeat_interval = 0.5  # real default 0.25 s: halves the simulated traffic; thresholds scale with it
    copy_time = 0.5
    dead_delay = 5.0  # real default 60 s: shortened so a history sees re-replication
    shards = 8
    rf = 3
    slots = 256  # real default 16384: the slot table is rebuilt for every map a consumer reads
    leave_grace = 2.0
    move_timeout = 10.0
    retry_backoff = 2.0
    membership_sync = 5.0  # membership._SYNC_PERIOD
    balancer_refresh = 5.0  # balancer._MAP_REFRESH
    manager_reconcile = 30.0  # manager._RECONCILE

    def sharding(self) -> ShardingConfig:
        return ShardingConfig(dead_delay=self.dead_delay, default_shards=self.shards, default_rf=self.rf,
                              leave_grace=self.leave_grace, move_timeout=self.move_timeout,
                              retry_backoff=self.retry_backoff, hash_slots=self.slots)


# The same map goes to every consumer many times: encode and decode each map object
# once (with the real to_wire/from_wire) and hand out the result. Consumers never
# mutate either, so this changes nothing but the cost.
_WIRE: dict[int, tuple[ShardMap, dict[str, Any]]] = {}
_DECODED: dict[int, tuple[dict[str, Any], ShardMap]] = {}


def _wire(m: ShardMap) -> dict[str, Any]:
    hit = _WIRE.get(id(m))
    if hit is None or hit[0] is not m:
        if len(_WIRE) > 256:
            _WIRE.clear()
        hit = _WIRE[id(m)] = (m, m.to_wire())
    return hit[1]


def _from_wire(doc: Any) -> ShardMap:
    hit = _DECODED.get(id(doc))
    if hit is None or hit[0] is not doc:
        if len(_DECODED) > 256:
            _DECODED.clear()
        hit = _DECODED[id(doc)] = (doc, ShardMap.from_wire(doc))
    return hit[1]


class Checker:
    """What the shells report to the invariants (see :mod:`phantom_sim.invariants`)."""

    def committed(self, proc: Proc, shard_map: ShardMap, reason: str) -> None: ...
    def accepted(self, consumer: str, shard_map: ShardMap) -> None: ...
    def restored(self, proc: Proc, shard_map: ShardMap) -> None: ...
    def member_event(self, kind: str, data: dict[str, Any]) -> None: ...
    def selected(self, sel: dict[str, Any]) -> None: ...
    def copied(self, shard: str, node: str) -> None: ...


# --- discovery ------------------------------------------------------------------------


class DiscoveryProc(Proc):
    """services/discovery/service.py"""

    service = "discovery"

    def boot(self) -> None:
        p: Params = self.world.params  # type: ignore[attr-defined]
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
    """services/membership/service.py"""

    service = "membership"

    def boot(self) -> None:
        p: Params = self.world.params  # type: ignore[attr-defined]
        self.core = Membership(MembershipConfig(heartbeat_interval=p.heartbeat_interval))
        self.ops = {"members": lambda: self.core.members(self.monotonic()),
                    "admit": self.op_admit, "forget": self.op_forget}
        self.subs = [("node.", self.on_node_event)]
        self.spawn(self.tick_loop(), "membership.tick")
        self.spawn(self.sync_loop(), "membership.sync")

    def _publish(self, events: list[Any]) -> None:
        for event in events:
            if event.kind.startswith("member.") and event.kind != "member.load":
                self.world.log(self, f"{event.kind} {event.data.get('node')} ({event.data.get('reason')})")
                self.world.checker.member_event(event.kind, event.data)  # type: ignore[attr-defined]
            self.publish(event.kind, event.data)

    def op_admit(self, node: str, interval: float | None = None) -> Any:
        return {"node": node, "new": self.core.admit(node, self.monotonic(), interval)}

    def op_forget(self, node: str) -> Any:
        self._publish(self.core.forget(node, self.monotonic()))
        return {"node": node, "forgotten": True}

    def _admit_from(self, doc: dict[str, Any]) -> None:
        hints = doc.get("hb")
        interval = hints.get("interval") if isinstance(hints, dict) else None
        if not isinstance(interval, int | float) or isinstance(interval, bool):
            interval = None
        with contextlib.suppress(PhantomError, KeyError):
            self.core.admit(str(doc["id"] if "id" in doc else doc["node"]), self.monotonic(), interval)

    def on_node_event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind in ("node.discovered", "node.updated"):
            self._admit_from(event)
        elif kind == "node.removed" and isinstance(event.get("node"), str):
            self._publish(self.core.forget(event["node"], self.monotonic()))

    def sync_loop(self) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
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
    """services/sharding/service.py"""

    service = "sharding"

    def boot(self) -> None:
        p: Params = self.world.params  # type: ignore[attr-defined]
        self.config = p.sharding()
        self.store = SimMapStore(self)
        loaded = self.store.load()
        now = self.monotonic()
        if loaded is None:
            self.core = ShardingCore(self.config)
            self.published, state = self.core.snapshot(now)
            self.store.save(self.published, state)
            self.world.checker.committed(self, self.published, "new")  # type: ignore[attr-defined]
        else:
            self.published = loaded[0]
            self.core = ShardingCore.restore(loaded[0], loaded[1], now, self.config)
            self.world.checker.restored(self, self.published)  # type: ignore[attr-defined]
        core = self.core
        self.ops = {
            "map": self.op_map,
            "sole_replicas": core.sole_replicas,
            "add_node": lambda node, zone="default", weight=1.0: self._commit(
                lambda: core.add_node(node, zone, weight, self.monotonic())),
            "drain_node": lambda node: self._commit(lambda: core.drain_node(node, self.monotonic())),
            "remove_node": lambda node: self._commit(lambda: core.remove_node(node, self.monotonic())),
            "node_dead": lambda node: self._commit(lambda: core.node_dead(node, self.monotonic())),
            "node_alive": lambda node: self._commit(lambda: core.node_alive(node, self.monotonic())),
            "confirm": lambda shard, node, epoch=None: self._commit(lambda: core.confirm(
                shard, node, self.monotonic(), None if buggify.on("confirm_any_round") else epoch)),
        }
        self.spawn(self.tick_loop(), "sharding.tick")

    def _commit(self, call: Callable[[], Result[Any]]) -> Any:
        result = call()
        events = list(result.events)
        if not events and self.core.epoch != self.published.epoch and not buggify.on("no_resave"):
            events = [Event(CHANGED, {"epoch": self.core.epoch, "reason": "saved after a failed save"})]
        if events:
            shard_map, state = self.core.snapshot(self.monotonic())
            self.store.save(shard_map, state)
            self.published = shard_map
            reason = str(events[-1].data.get("reason"))
            self.world.log(self, f"commit epoch {shard_map.epoch} ({reason}) down={sorted(shard_map.down)}")
            self.world.checker.committed(self, shard_map, reason)  # type: ignore[attr-defined]
            for event in events:
                self.publish(event.kind, event.data)
        return result.value

    def op_map(self, since_epoch: int | None = None) -> Any:
        shard_map = self.published
        return None if since_epoch is not None and shard_map.epoch <= since_epoch else _wire(shard_map)

    def tick_loop(self) -> Loop:
        while True:
            yield Sleep(0.5)
            self._commit(lambda: self.core.tick(self.monotonic()))


# --- balancer ---------------------------------------------------------------------------

_LIFECYCLE_EVENTS = {
    "cluster.node_registered": "joining",
    "cluster.node_active": "active",
    "cluster.node_draining": "draining",
    "cluster.node_decommissioned": "decommissioned",
}


class BalancerProc(Proc):
    """services/balancer/service.py"""

    service = "balancer"

    def boot(self) -> None:
        self.core = Balancer(BalancerConfig(), random.Random(self.world.rng.getrandbits(32)))
        self.map: ShardMap | None = None
        self._map_stale = self.flag()
        self.ops = {"select": self.op_select, "node_update": self.op_node_update}
        self.subs = [("shardmap.changed", self.on_map_changed), ("member.", self.on_member),
                     ("node.", self.on_node), ("cluster.node_", self.on_lifecycle)]
        self.spawn(self.sync_loop(), "balancer.sync")
        self.spawn(self.tick_loop(), "balancer.tick")

    def op_select(self, key: str, write: bool = False, keyspace: str | None = None) -> Any:
        from phantom_bus.errors import NoLiveReplica

        if self.map is None:
            raise NoLiveReplica("the balancer has no shard map yet (is sharding running?)")
        name = keyspace or "default"
        shard = self.map.lookup(name, key)
        candidates = [Candidate(r.node, r.role) for r in shard.replicas]
        sel = self.core.select(shard.id, candidates, write=write, lease=False, now=self.monotonic())
        return {"key": key, "shard": shard.id, "node": sel.node, "epoch": self.map.epoch, "role": sel.role}

    def op_node_update(self, node: str, state: str | None = None, lifecycle: str | None = None,
                       address: str | None = None, weight: float | None = None) -> Any:
        self.core.node_update(node, state=state, lifecycle=lifecycle, address=address, weight=weight,
                              now=self.monotonic())
        return {"node": node}

    def on_map_changed(self, event: dict[str, Any]) -> None:
        epoch = event.get("epoch")
        if self.map is None or not isinstance(epoch, int) or epoch > self.map.epoch:
            self._map_stale.set()

    def _update(self, node: Any, **fields: Any) -> None:
        if not isinstance(node, str):
            return
        with contextlib.suppress(PhantomError):
            self.core.node_update(node, now=self.monotonic(), **{k: v for k, v in fields.items() if v is not None})

    def on_member(self, event: dict[str, Any]) -> None:
        kind = event.get("kind", "")
        if kind == "member.load":
            return  # the simulated agents send no load (docs/simulation.md)
        if kind.startswith("member."):
            self._update(event.get("node"), state=kind.split(".", 1)[1])

    def on_node(self, event: dict[str, Any]) -> None:
        if event.get("kind") in ("node.discovered", "node.updated"):
            weight = event.get("weight")
            self._update(event.get("node"), address=event.get("address"),
                         weight=weight if isinstance(weight, int | float) and weight > 0 else None)

    def on_lifecycle(self, event: dict[str, Any]) -> None:
        lifecycle = _LIFECYCLE_EVENTS.get(str(event.get("kind")))
        if lifecycle is not None:
            self._update(event.get("node"), lifecycle=lifecycle)

    def sync_loop(self) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
        while True:
            try:
                for doc in (yield Call("discovery", "nodes", {}, p.timeout)):
                    self._update(doc.get("id"), address=doc.get("address"))
            except PhantomError:
                pass
            try:
                for m in (yield Call("membership", "members", {}, p.timeout)):
                    self._update(m.get("id"), state=m.get("state"))
            except PhantomError:
                pass
            try:
                since = None if self.map is None else self.map.epoch
                doc = yield Call("sharding", "map", {"since_epoch": since}, p.timeout)
                if doc is not None:
                    fresh = _from_wire(doc)
                    if self.map is None or fresh.epoch > self.map.epoch:
                        self.map = fresh
                        self.world.checker.accepted(self.name, fresh)  # type: ignore[attr-defined]
            except PhantomError:
                pass
            self._map_stale.clear()
            yield Wait(self._map_stale, p.balancer_refresh if self.map is not None else 0.2)

    def tick_loop(self) -> Loop:
        while True:
            yield Sleep(0.5)
            for event in self.core.tick(self.monotonic()):
                self.publish(event.kind, event.data)


# --- manager ----------------------------------------------------------------------------

_BACKOFF_MAX = 5.0


def _already_done(action: Action, err: PhantomError) -> bool:
    if isinstance(err, NotFound) and action.op in ("forget", "remove", "remove_node", "forget_node"):
        return True
    return isinstance(err, Conflict) and action.service == "discovery" and action.op == "register"


class ManagerProc(Proc):
    """services/manager/service.py"""

    service = "manager"

    def boot(self) -> None:
        p: Params = self.world.params  # type: ignore[attr-defined]
        self.store = SimRegistryStore(self)
        self.core = ManagerCore(ManagerConfig(auto_join=True, rereplication_delay=p.dead_delay),
                                self.store.registry(), persist=self.store.apply)
        self._queues: dict[str, list[Action]] = {}
        self._ready: dict[str, Any] = {}
        self._map: ShardMap | None = None
        self._map_stale = self.flag()
        self.ops = {"drain": self.op_drain}
        self.subs = [("node.", self.on_event), ("member.", self.on_event), ("shardmap.changed", self.on_map_changed)]
        self.spawn(self.startup(), "manager.startup")
        self.spawn(self.map_loop(), "manager.map")
        self.spawn(self.tick_loop(), "manager.tick")

    def _apply(self, decision: Decision) -> Any:
        for a in decision.actions:
            self.world.log(self, f"action {a.service}.{a.op} {dict(a.args)}")
        for event in decision.events:
            self.publish(event.kind, event.data)
        for action in decision.actions:
            self._enqueue(action)
        return decision.value

    def _enqueue(self, action: Action) -> None:
        queue = self._queues.get(action.service)
        if queue is None:
            queue = self._queues[action.service] = []
            self._ready[action.service] = self.flag()
            self.spawn(self._run_queue(action.service, queue), f"manager.queue.{action.service}")
        queue.append(action)
        self._ready[action.service].set()

    def _run_queue(self, service: str, queue: list[Action]) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
        ready = self._ready[service]
        while True:
            while not queue:
                ready.clear()
                yield Wait(ready, 3600.0)
            action = queue.pop(0)
            delay = 0.1
            while True:
                try:
                    yield Call(action.service, action.op, dict(action.args), p.timeout)
                    break
                except PhantomError as err:
                    if _already_done(action, err) or not err.retry:
                        break
                    yield Sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
            if action.service == "sharding" and action.op == "drain_node":
                self._map_stale.set()

    def op_drain(self, node: str) -> Any:
        return self._apply(self.core.drain(node, now=self.wall()))

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "member.load":
            return
        self._apply(self.core.on_event(event, self.wall()))

    def on_map_changed(self, event: dict[str, Any]) -> None:
        self._map_stale.set()

    def map_loop(self) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
        while True:
            try:
                since = None if self._map is None else self._map.epoch
                doc = yield Call("sharding", "map", {"since_epoch": since}, p.timeout)
                if doc is not None:
                    self._map = _from_wire(doc)
                    self.world.checker.accepted(self.name, self._map)  # type: ignore[attr-defined]
                if self._map is not None:
                    m = self._map
                    self._apply(self.core.observe_shards(shards_from_map(m), now=self.wall(), down=m.down,
                                                         epoch=m.epoch))
            except PhantomError:
                pass
            self._map_stale.clear()
            yield Wait(self._map_stale, 2.0)

    def tick_loop(self) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
        next_reconcile = self.monotonic() + p.manager_reconcile
        while True:
            yield Sleep(1.0)
            self._apply(self.core.tick(self.wall()))
            if self.monotonic() >= next_reconcile:
                next_reconcile = self.monotonic() + p.manager_reconcile
                yield from self._resync(removals=False)

    def _resync(self, *, removals: bool) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
        try:
            nodes = yield Call("discovery", "nodes", {}, p.timeout)
            self._apply(self.core.sync_discovery(nodes, self.wall()))
        except PhantomError:
            pass
        try:
            members = yield Call("membership", "members", {}, p.timeout)
            self._apply(self.core.sync_members(members, self.wall()))
        except PhantomError:
            pass
        self.world.log(self, "reconcile")
        for action in self.core.reconcile(self.wall(), removals=removals):
            self._enqueue(action)

    def startup(self) -> Loop:
        yield Sleep(0.5)
        yield from self._resync(removals=True)


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
        self._changed = self.flag()
        self.copying: dict[str, Any] = {}
        self.subs = [("shardmap.changed", lambda event: self._changed.set())]
        self.spawn(self.beacon_loop(), "agent.beacon")
        self.spawn(self.heartbeat_loop(), "agent.heartbeat")
        self.spawn(self.assignment_loop(), "agent.assignment")

    def _beacon(self) -> None:
        p: Params = self.world.params  # type: ignore[attr-defined]
        beacon = Beacon(node=self.node, incarnation=self.incarnation, instance=self.instance, address=self.address,
                        zone=self.zone, weight=1.0, version="sim", started=self.started,
                        hb={"endpoint": "sim", "interval": p.heartbeat_interval})
        disc = self.world.services["discovery"][0]
        self.world.send(self, disc, "beacon", disc.beacon, encode_beacon(beacon), lossy=True)  # type: ignore[attr-defined]

    def beacon_loop(self) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
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
        p: Params = self.world.params  # type: ignore[attr-defined]
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
        p: Params = self.world.params  # type: ignore[attr-defined]
        try:
            yield Sleep(p.copy_time)
            self.world.checker.copied(shard, self.node)  # type: ignore[attr-defined]
            while True:
                try:
                    yield Call("sharding", "confirm", {"shard": shard, "node": self.node, "epoch": epoch}, p.timeout)
                    self._changed.set()
                    return
                except PhantomError as exc:
                    if not exc.retry:
                        return
                    yield Sleep(1.0)
        finally:
            done[0] = True

    def assignment_loop(self) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
        while True:
            try:
                shard_map = _from_wire((yield Call("sharding", "map", {}, p.timeout)))
                self.world.checker.accepted(self.name, shard_map)  # type: ignore[attr-defined]
                self.assignments = {shard.id: role for _, shard in shard_map.shards()
                                    if (role := shard.role_of(self.node)) is not None}
                joining = {s for s, role in self.assignments.items() if role == "joining"}
                for shard in sorted(joining - self.copying.keys()):
                    done = [False]
                    self.copying[shard] = done
                    self.spawn(self._copy(shard, shard_map.epoch, done), f"agent.copy.{shard}")
                for shard in [s for s, done in self.copying.items() if done[0] and s not in joining]:
                    del self.copying[shard]
            except PhantomError:
                pass
            self._changed.clear()
            yield Wait(self._changed, 5.0)


# --- a client that writes -------------------------------------------------------------


class ClientProc(Proc):
    """A client of the balancer: ``select(key, write=True)`` now and then; checks where writes go."""

    def boot(self) -> None:
        self.spawn(self.loop(), "client")

    def loop(self) -> Loop:
        p: Params = self.world.params  # type: ignore[attr-defined]
        n = 0
        while True:
            yield Sleep(0.5)
            n += 1
            try:
                sel = yield Call("balancer", "select", {"key": f"user:{n % 50}", "write": True}, p.timeout)
                self.world.checker.selected(sel)  # type: ignore[attr-defined]
            except PhantomError:
                pass
