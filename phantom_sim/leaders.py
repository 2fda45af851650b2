"""Leader election and fenced writes through the store, in the simulation.

Wired only when the project has them: :mod:`phantom_bus.leader` (the sans-I/O
``LeaderCore``) and :mod:`phantom_bus.store` (``MemoryStore``, the reference
semantics, with an injected clock). Then a history also runs:

* ``store``: one process holding a ``MemoryStore`` on virtual time, reached by
  direct requests (not through the broker), as etcd or a shared SQLite file is;
* two ``writer`` instances of one service, each campaigning with a real
  ``LeaderCore`` driven by a copy of ``phantom_bus.leader.Elector``'s loop, and,
  while it leads, writing a fenced value every 0.3 s. Between its leadership
  check and its write it "computes" for 50 ms (the real shells plan in a worker
  thread there), so a pause or a slow link can put the write after its lease.

The store reports every fenced write that lands: it must carry the current
term (``deposed_leader_write_lands``). The writers are in the fault schedule
like every other process.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Generator
from typing import Any

from phantom_bus.errors import PhantomError

from .world import Call, Proc, Sleep, World

try:  # the store and the leader core land in phantom_bus separately from the simulator
    from phantom_bus.leader import Campaign, Check, LeaderCore, Release, decode_holder, encode_record, leader_key
    from phantom_bus.store import Compare, Fence, LeaseExpired, Put
    from phantom_bus.store.memory import MemoryStore
except ImportError:  # pragma: no cover - depends on what is merged
    AVAILABLE = False
else:
    AVAILABLE = True

Loop = Generator[Any, Any, None]
SERVICE = "writer"
TTL = 2.0


def _drive(coro: Any) -> Any:
    """Run a MemoryStore coroutine that never suspends (every method but watch)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a store call suspended in the simulation")


class StoreProc(Proc):
    """The store: a MemoryStore whose lease clock is virtual time. It never loses what it acknowledged."""

    service = "store"

    def __init__(self, world: World, name: str, host: str) -> None:
        super().__init__(world, name, host)
        self.store = MemoryStore(clock=lambda: world.now)

    def boot(self) -> None:
        self.ops = {"call": self.op_call}

    def op_call(self, method: str, args: dict[str, Any], writer: str = "") -> Any:
        if method == "txn" and args.get("fence") is not None:
            fence = args["fence"]
            rev = _drive(self.store.txn(args["compares"], args["ops"], fence))
            record = _drive(self.store.get(fence.key))
            current = None if record is None else record.mod_revision
            self.world.checker.fenced_write(writer, fence.revision, current, True)  # type: ignore[attr-defined]
            return rev
        return _drive(getattr(self.store, method)(**args))


def _store(method: str, writer: str = "", **args: Any) -> Call:
    return Call("store", "call", {"method": method, "args": args, "writer": writer}, 1.0, direct=True)


class WriterProc(Proc):
    """One instance of a led service: ``phantom_bus.leader.Elector`` plus fenced writes."""

    service = "writer-instances"  # not behind the broker: nobody requests it

    def boot(self) -> None:
        self.core = LeaderCore(self.name, TTL)
        self.key = leader_key(SERVICE)
        self.spawn(self.elector(), f"{self.name}.elector")
        self.spawn(self.work(), f"{self.name}.work")

    # Elector.run / _do / _campaign / _renew, with the store calls as simulated requests.
    def elector(self) -> Loop:
        core = self.core
        while True:
            step = core.next(self.monotonic())
            core.drain()
            if isinstance(step, float):
                yield Sleep(max(0.0, step - self.monotonic()))
                continue
            sent = self.monotonic()
            if isinstance(step, Release):
                with contextlib.suppress(PhantomError):
                    yield _store("revoke", lease=step.lease)
                core.released()
            elif isinstance(step, Check):
                try:
                    entry = yield _store("get", key=self.key)
                except PhantomError as exc:
                    core.failed(sent, str(exc))
                    continue
                core.checked(sent, None if entry is None else decode_holder(entry))
            elif isinstance(step, Campaign):
                lease = None
                try:
                    lease = yield _store("grant", ttl=core.ttl)
                    value = encode_record(self.name, self.wall())
                    term = yield _store("txn", compares=[Compare.absent(self.key)],
                                        ops=[Put(self.key, value, lease)])
                except PhantomError as exc:
                    entry = None
                    if lease is not None:
                        try:
                            entry = yield _store("get", key=self.key)
                        except PhantomError:
                            entry = None
                        core.lost(sent, None if entry is None else decode_holder(entry), lease)
                    else:
                        core.failed(sent, str(exc))
                    continue
                core.won(sent, self.monotonic(), term, lease)
            else:
                try:
                    yield _store("keepalive", lease=step.lease)
                    entry = yield _store("get", key=self.key)
                except LeaseExpired as exc:
                    core.renew_failed(sent, self.monotonic(), True, f"lease lost: {exc}")
                    continue
                except PhantomError as exc:
                    core.renew_failed(sent, self.monotonic(), False, str(exc))
                    continue
                if entry is None or entry.mod_revision != step.term:
                    core.renew_failed(sent, self.monotonic(), True, "leader record gone or rewritten")
                    continue
                core.renewed(sent, self.monotonic())

    def work(self) -> Loop:
        n = 0
        while True:
            yield Sleep(0.3)
            if not self.core.is_leader(self.monotonic()) or self.core.term is None:
                continue
            fence = Fence(self.key, self.core.term)
            yield Sleep(0.05)  # the decision is computed (in a worker thread, in the real shells)
            n += 1
            # Fenced (a newer leader) or unreachable: the elector finds out and steps down.
            with contextlib.suppress(PhantomError):
                yield _store("txn", writer=self.name, compares=[],
                             ops=[Put(f"{SERVICE}/state", f"{self.name}:{n}".encode())], fence=fence)


def add_leaders(world: World) -> list[Proc]:
    """The store and two writer instances, if the project has a store and leaders; else nothing.

    They draw their link delays from their own stream (``leaders-<seed>``), so
    the rest of a history is the same whether they run or not.
    """
    if not AVAILABLE:
        return []
    stream = random.Random(f"leaders-{world.seed}")
    procs: list[Proc] = [world.add(StoreProc(world, "store", "h-store"))]
    for name in ("writer-a", "writer-b"):
        procs.append(world.add(WriterProc(world, name, f"h-{name}")))
    for p in procs:
        p.stream = stream
    return procs


def plan_leader_faults(seed: int, start: float, end: float) -> list[tuple[float, str, float, float]]:
    """Faults of the writers and the store, from their own stream: (time, kind, u, v)."""
    r = random.Random(f"leader-faults-{seed}")
    out: list[tuple[float, str, float, float]] = []
    t = start
    while True:
        t += r.uniform(0.3, 2.0)
        if t >= end:
            return out
        out.append((t, r.choice(("pause", "pause", "crash", "partition")), r.random(), r.random()))
