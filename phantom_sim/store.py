"""The control plane's store and leader election, in the simulation.

* :class:`StoreProc` is the store process: the real
  :class:`~phantom_bus.store.memory.MemoryStore` (the reference semantics of
  both backends: one revision counter, compare-and-swap transactions with a
  fence, leases expiring on the *store's* clock, a bounded change history
  with compaction) on virtual time, reached by direct requests as etcd or a
  shared SQLite file is. A disk fault makes its writes fail with the backend's
  own message and write nothing. It reports to the invariants every fenced
  write that lands (``deposed_leader_write_lands``) and every shard map
  committed in it.
* :class:`SimStore` is the :class:`~phantom_bus.store.Store` interface over
  the simulated bus, so the real store code of the services
  (:class:`services.sharding.store.MapStore`,
  :class:`services.manager.store.RegistryStore`) runs unchanged: their
  coroutines are driven by :func:`drive`, each store call becoming one
  simulated request.
* :class:`Leadership` is :class:`services.leadership.Leadership` over
  :class:`phantom_bus.leader.Elector`'s loop, running the real
  :class:`~phantom_bus.leader.LeaderCore`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any

from phantom_bus.errors import NotLeader, PhantomError, Timeout
from phantom_bus.leader import Campaign, Check, Elected, LeaderCore, Release, decode_holder, encode_record, leader_key
from phantom_bus.shardmap import ShardMap
from phantom_bus.store import Compacted, Compare, Fence, LeaseExpired, Op, Put, StoreError
from phantom_bus.store.memory import MemoryStore

from .world import Call, Deferred, Proc, Sleep, Task, Wait, World

Loop = Generator[Any, Any, Any]

#: The store client's timeout per call (seconds): the real stores' default.
STORE_TIMEOUT = 5.0
#: Changes the store keeps before compacting (the real memory store: 10,000; etcd
#: compacts by time): small, so that followers do fall behind it.
HISTORY = 64
#: Longest a watch request waits for a change before answering "nothing yet" (seconds).
WATCH_WAIT = 2.0
_MAP_KEY = "shardmap/map"


class _SimMemoryStore(MemoryStore):
    """MemoryStore that tells the simulated watchers when it commits."""

    def __init__(self, on_commit: Callable[[], None], **kw: Any) -> None:
        super().__init__(**kw)
        self._on_commit = on_commit

    def _commit(self, changes: list[Any]) -> None:
        super()._commit(changes)
        self._on_commit()


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a MemoryStore coroutine that never suspends (every method but watch)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a store call suspended in the simulation")


class StoreProc(Proc):
    """The store. It keeps what it acknowledged (its process never crashes; its host can
    be cut off and it can pause, and its disk can fail)."""

    service = "store"

    def __init__(self, world: World, name: str, host: str) -> None:
        super().__init__(world, name, host)
        self.store = _SimMemoryStore(self._woken, clock=lambda: world.now, history=HISTORY)
        self.watchers: list[tuple[str, int, Deferred]] = []

    def boot(self) -> None:
        self.ops = {"call": self.op_call, "watch": self.op_watch}

    def op_call(self, method: str, args: dict[str, Any], writer: str = "", note: str = "") -> Any:
        if method == "txn":
            if self.world.now < self.disk_fail_until:
                raise StoreError("sqlite: database or disk is full")
            fence: Fence | None = args.get("fence")
            current = None
            if fence is not None:
                record = self.store._kv.get(fence.key)
                current = None if record is None else record.mod_revision
            rev = _run(self.store.txn(args["compares"], args["ops"], fence))
            checker = self.world.checker  # type: ignore[attr-defined]
            if fence is not None:
                checker.fenced_write(writer, fence.revision, current, True)
            for op in args["ops"]:
                if isinstance(op, Put) and op.key == _MAP_KEY:
                    checker.committed(writer, ShardMap.unpack(op.value), note)
            return rev
        return _run(getattr(self.store, method)(**args))

    def op_watch(self, prefix: str, start: int) -> Any:
        """The changes under ``prefix`` from revision ``start`` (waits for one, up to WATCH_WAIT)."""
        found = self._changes(prefix, start)
        if found:
            return found
        deferred = Deferred()
        self.watchers.append((prefix, start, deferred))
        self.world.after(self, WATCH_WAIT, deferred.resolve, [])
        return deferred

    def _changes(self, prefix: str, start: int) -> list[Any]:
        store = self.store
        if start <= store._compacted:
            raise Compacted(f"revision {start} is compacted (history starts after {store._compacted})",
                            revision=start, compacted=store._compacted)
        return [c for c in store._changes if c.revision >= start and c.key.startswith(prefix)]

    def _woken(self) -> None:
        if not self.watchers:
            return
        keep = []
        for prefix, start, deferred in self.watchers:
            if deferred.reply is None:
                continue
            try:
                found = self._changes(prefix, start)
            except Compacted as exc:
                deferred.resolve(None, exc)
                continue
            if found:
                deferred.resolve(found)
            else:
                keep.append((prefix, start, deferred))
        self.watchers = keep


class _Op:
    """One store call, awaited inside a real store coroutine and carried out by :func:`drive`."""

    __slots__ = ("args", "method")

    def __init__(self, method: str, args: dict[str, Any]) -> None:
        self.method = method
        self.args = args

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self)


class SimStore:
    """The :class:`~phantom_bus.store.Store` interface for code driven by :func:`drive`."""

    name = "sim"

    async def get(self, key: str) -> Any:
        return await _Op("get", {"key": key})

    async def range(self, prefix: str) -> Any:
        return await _Op("range", {"prefix": prefix})

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op], fence: Fence | None = None) -> Any:
        return await _Op("txn", {"compares": list(compares), "ops": list(ops), "fence": fence})


def store_call(method: str, writer: str = "", note: str = "", **args: Any) -> Call:
    """A store call as a simulated request."""
    return Call("store", "call", {"method": method, "args": args, "writer": writer, "note": note}, STORE_TIMEOUT,
                direct=True)


def drive(proc: Proc, coro: Coroutine[Any, Any, Any], note: str = "") -> Loop:
    """``yield from drive(proc, coro)``: run a store coroutine, its calls as requests of ``proc``."""
    value: Any = None
    exc: BaseException | None = None
    while True:
        try:
            op = coro.throw(exc) if exc is not None else coro.send(value)
        except StopIteration as stop:
            return stop.value
        value, exc = None, None
        try:
            value = yield store_call(op.method, proc.name, note, **op.args)
        except Timeout as err:  # the store clients raise their timeouts as StoreError
            exc = StoreError(f"store: {err}")
        except PhantomError as err:
            exc = err


class Leadership:
    """``services.leadership.Leadership`` + ``phantom_bus.leader.Elector`` of one process.

    ``while_leading(body)`` runs ``body()`` (a task body) each time this instance
    is elected and cancels it when it is deposed, as the real shells do.
    """

    def __init__(self, proc: Proc, service: str, ttl: float) -> None:
        self.proc = proc
        self.service = service
        self.core = LeaderCore(proc.name, ttl)
        self.key = leader_key(service)
        self.body: Callable[[], Loop] | None = None
        self.task: Task | None = None
        self.changed = proc.flag()  # set at every election and deposition
        proc.spawn(self.elector(), f"{proc.name}.elector")

    @property
    def is_leader(self) -> bool:
        return self.core.is_leader(self.proc.monotonic())

    @property
    def term(self) -> int:
        if self.is_leader and self.core.term is not None:
            return self.core.term
        return self.core.holder.term if self.core.holder is not None else 0

    @property
    def fence(self) -> Fence:
        if not self.is_leader or self.core.term is None:
            raise self.not_leader()
        return Fence(self.key, self.core.term)

    def not_leader(self) -> NotLeader:
        holder = self.core.holder
        return NotLeader(f"{self.service} instance {self.proc.name} is a follower; retry",
                         leader=None if holder is None else holder.instance,
                         term=None if holder is None else holder.term)

    def wait_following(self) -> Loop:
        """Return once this instance no longer leads (Leadership.wait_following, without its 50 ms poll)."""
        while self.is_leader:
            self.changed.clear()
            yield Wait(self.changed, max(0.01, self.core.valid_until - self.proc.monotonic()))

    def while_leading(self, body: Callable[[], Loop]) -> None:
        self.body = body

    def _events(self) -> None:
        for event in self.core.drain():
            self.changed.set()
            self.proc.world.log(self.proc, f"{type(event).__name__} term {event.term}")
            if self.task is not None:
                self.task.cancel()
                self.task = None
            if isinstance(event, Elected) and self.body is not None:
                self.task = self.proc.spawn(self.body(), f"{self.proc.name}.lead")

    def elector(self) -> Loop:
        """Elector.run / _do / _campaign / _renew, with the store calls as simulated requests."""
        core, proc, key = self.core, self.proc, self.key
        while True:
            step = core.next(proc.monotonic())
            self._events()
            if isinstance(step, float):
                yield Sleep(max(0.0, step - proc.monotonic()))
                continue
            sent = proc.monotonic()
            if isinstance(step, Release):
                with contextlib.suppress(PhantomError):
                    yield store_call("revoke", lease=step.lease)
                core.released()
            elif isinstance(step, Check):
                try:
                    entry = yield store_call("get", key=key)
                except PhantomError as exc:
                    core.failed(sent, str(exc))
                    continue
                core.checked(sent, None if entry is None else decode_holder(entry))
            elif isinstance(step, Campaign):
                lease = None
                try:
                    lease = yield store_call("grant", ttl=core.ttl)
                    term = yield store_call("txn", compares=[Compare.absent(key)],
                                            ops=[Put(key, encode_record(proc.name, proc.wall()), lease)])
                except PhantomError as exc:
                    entry = None
                    if lease is not None:
                        with contextlib.suppress(PhantomError):
                            entry = yield store_call("get", key=key)
                        core.lost(sent, None if entry is None else decode_holder(entry), lease)
                    else:
                        core.failed(sent, str(exc))
                    continue
                core.won(sent, proc.monotonic(), term, lease)
            else:
                try:
                    yield store_call("keepalive", lease=step.lease)
                    entry = yield store_call("get", key=key)
                except LeaseExpired as exc:
                    core.renew_failed(sent, proc.monotonic(), True, f"lease lost: {exc}")
                    continue
                except PhantomError as exc:
                    core.renew_failed(sent, proc.monotonic(), False, str(exc))
                    continue
                if entry is None or entry.mod_revision != step.term:
                    core.renew_failed(sent, proc.monotonic(), True, "leader record gone or rewritten")
                    continue
                core.renewed(sent, proc.monotonic())
            self._events()

