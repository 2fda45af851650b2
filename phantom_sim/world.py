"""Virtual time, simulated processes and the simulated bus (one thread, one seed).

Everything that happens in a history is an entry in one heap ordered by
(virtual time, sequence number). The sequence number is drawn when the entry
is scheduled, so two runs of one seed pop the same entries in the same order.
Every random choice comes from :attr:`World.rng`.

Processes run *tasks*: generators that yield :class:`Sleep`, :class:`Call` and
:class:`Wait` to the world, which stands in for the asyncio loop of a real
shell. A crash bumps the process's generation: every entry scheduled for the
old generation (timers, deliveries, replies) is dropped when it comes up. A
pause holds every entry for the process until it wakes; they then run in their
original order, so a paused observer sees its timer fire late and its backlog
arrive in a burst, as after a SIGSTOP.

The bus keeps what ZeroMQ keeps: per connection (sender, kind, receiver) FIFO
order; across connections any order. PUB/SUB messages may be lost; a request
gets a reply or, after its timeout, :class:`~phantom_bus.errors.Timeout`.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from phantom_bus.errors import InternalError, NotLeader, PhantomError, ServiceUnavailable, Timeout

#: Wall-clock seconds at virtual time 0 (2025-11-24): agents number incarnations in
#: wall-clock milliseconds, and membership bounds them against its own wall clock.
WALL_EPOCH = 1_764_000_000.0


class DiskFailed(OSError):
    """A write to a simulated disk failed (full, read-only); nothing was written."""


@dataclass(slots=True)
class Sleep:
    """Resume the task after ``dt`` seconds of virtual time."""

    dt: float


@dataclass(slots=True)
class Call:
    """Send a request to ``service``; resume with the reply or raise its error."""

    service: str
    op: str
    args: dict[str, Any]
    timeout: float
    direct: bool = False  # straight to the service's process (a store), not through the broker


@dataclass(slots=True)
class Wait:
    """Resume when ``flag`` is set or after ``timeout`` seconds (like asyncio.wait_for on an Event)."""

    flag: Flag
    timeout: float


class Flag:
    """An asyncio.Event of one process: set wakes its waiters."""

    __slots__ = ("is_set", "proc", "waiters")

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.is_set = False
        self.waiters: list[tuple[Task, int]] = []

    def set(self) -> None:
        self.is_set = True
        waiters, self.waiters = self.waiters, []
        for task, token in waiters:
            self.proc.world.soon(self.proc, task.wake, token, True)

    def clear(self) -> None:
        self.is_set = False


TaskBody = Generator[Any, Any, Any]


class Lock:
    """An asyncio.Lock of one process: ``yield from lock.acquire()`` ... ``lock.release()``."""

    __slots__ = ("flag", "held")

    def __init__(self, proc: Proc) -> None:
        self.held = False
        self.flag = Flag(proc)

    def acquire(self) -> Generator[Any, Any, None]:
        while self.held:
            self.flag.clear()
            yield Wait(self.flag, 3600.0)
        self.held = True

    def release(self) -> None:
        self.held = False
        self.flag.set()


class Deferred:
    """A reply given later: an operation returns one, and :meth:`resolve` answers the request."""

    __slots__ = ("reply",)

    def __init__(self) -> None:
        self.reply: Callable[[Any, PhantomError | None], None] | None = None

    def resolve(self, value: Any, err: PhantomError | None = None) -> None:
        reply, self.reply = self.reply, None
        if reply is not None:
            reply(value, err)


class Task:
    """One running generator of one process generation."""

    __slots__ = ("body", "cancelled", "done", "gen", "name", "on_done", "proc", "token")

    def __init__(self, proc: Proc, body: TaskBody, name: str,
                 on_done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        self.proc = proc
        self.body = body
        self.name = name
        self.gen = proc.gen
        self.token = 0  # bumped at every suspension; stale wake-ups carry an old token
        self.cancelled = False
        self.done = False
        # Set for a task that serves a request: it receives the result or the error
        # instead of an error ending the process.
        self.on_done = on_done

    def cancel(self) -> None:
        """Stop the task at its next wake-up (asyncio's Task.cancel, minus the CancelledError)."""
        if not self.done:
            self.cancelled = True
            self.done = True
            self.body.close()

    def wake(self, token: int, value: Any = None, exc: BaseException | None = None) -> None:
        if token != self.token or self.gen != self.proc.gen or self.cancelled:
            return
        self.token += 1
        world = self.proc.world
        if world.debug is not None and exc is not None:
            world.log(self.proc, f"{self.name}: {type(exc).__name__}: {exc}")
        try:
            cmd = self.body.throw(exc) if exc is not None else self.body.send(value)
        except StopIteration as stop:
            self.done = True
            if self.on_done is not None:
                self.on_done(stop.value, None)
            return
        except Exception as err:
            self.done = True
            if self.on_done is not None:
                self.on_done(None, err)
                return
            # A loop that fails ends the process; supervisord starts it again.
            world.note_crash(self.proc, f"{self.name}: {type(err).__name__}: {err}")
            self.proc.crash(restart=True)
            return
        token = self.token
        kind = type(cmd)
        if kind is Sleep:
            world.seq += 1
            heapq.heappush(world.heap, (world.now + (cmd.dt if cmd.dt > 0.0 else 0.0), world.seq, self.proc,
                                        self.proc.gen, self.wake, (token,)))
        elif kind is Call:
            world.request(self.proc, cmd.service, cmd.op, cmd.args, cmd.timeout, self, token, cmd.direct)
        elif kind is Wait:
            if cmd.flag.is_set:
                world.soon(self.proc, self.wake, token, True)
            else:
                cmd.flag.waiters.append((self, token))
                world.after(self.proc, cmd.timeout, self.wake, token, False)
        else:
            raise TypeError(f"task {self.name} yielded {cmd!r}")


class Proc:
    """A simulated process: soft state is rebuilt by :meth:`boot`, durable state lives in :attr:`disk`."""

    service = ""  # the name it serves requests under ("" = none)

    def __init__(self, world: World, name: str, host: str) -> None:
        self.world = world
        self.name = name
        self.host = host
        self.gen = 0
        self.up = False
        self.paused_until = 0.0
        self.stall_next = 0.0  # see _stall
        self.disk: dict[str, Any] = {}
        self.disk_fail_until = -1.0
        self.ops: dict[str, Callable[..., Any]] = {}
        self.subs: list[tuple[str, Callable[[dict[str, Any]], Any]]] = []

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        self.gen += 1
        self.up = True
        self.ops = {}
        self.subs = []
        try:
            self.boot()
        except Exception as err:  # a process that cannot start exits; supervisord starts it again
            self.world.note_crash(self, f"boot: {type(err).__name__}: {err}")
            self.crash(restart=True)

    def boot(self) -> None:
        """Build soft state from :attr:`disk` and spawn the loops."""

    def crash(self, restart: bool, delay: float | None = None) -> None:
        if not self.up:
            return
        self.world.log(self, "crashes" + (", restarts" if restart else " for good"))
        self.up = False
        self.gen += 1
        self.paused_until = 0.0
        if restart:
            w = self.world
            d = delay if delay is not None else w.restart_delay
            w.at(w.now + d, None, self._restart)

    def _restart(self) -> None:
        self.world.log(self, "restarts")
        if not self.up:
            self.start()

    def spawn(self, body: TaskBody, name: str,
              on_done: Callable[[Any, BaseException | None], None] | None = None) -> Task:
        task = Task(self, body, name, on_done)
        self.world.soon(self, task.wake, task.token)
        return task

    def flag(self) -> Flag:
        return Flag(self)

    def _stall(self) -> None:
        """The ``leader_stall`` fault point: the whole process stops here, once, if asked to."""
        d = self.stall_next
        if d:
            self.stall_next = 0.0
            self.paused_until = max(self.paused_until, self.world.now + d)

    # -- clocks ------------------------------------------------------------------

    def monotonic(self) -> float:
        return self.world.now

    def wall(self) -> float:
        return WALL_EPOCH + self.world.now + self.world.wall_offset.get(self.host, 0.0)

    # -- disk --------------------------------------------------------------------

    def write(self, key: str, value: Any) -> None:
        """Durable write; raises :class:`DiskFailed` during a disk fault."""
        if self.world.now < self.disk_fail_until:
            raise DiskFailed(28, "database or disk is full")
        self.disk[key] = value

    # -- bus ---------------------------------------------------------------------

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        self.world.publish(self, kind, data)

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        fn = self.ops.get(op)
        if fn is None:
            raise PhantomError(f"unknown operation {op}")
        return fn(**args)


@dataclass
class Stats:
    """Counters of one history."""

    steps: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)
    sent: int = 0
    lost: int = 0

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1


class World:
    """The heap, the clocks, the network and the processes of one history."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.wall_offset: dict[str, float] = {}
        self.heap: list[tuple[float, int, Proc | None, int, Callable[..., Any], tuple[Any, ...]]] = []
        self.seq = 0
        self.procs: dict[str, Proc] = {}
        self.procs_by_host: dict[str, Proc] = {}
        self.services: dict[str, list[Proc]] = {}
        self.isolated: set[str] = set()
        self.conn_last: dict[tuple[str, str, str], float] = {}
        self.stats = Stats()
        self.restart_delay = 1.0
        self.broker_host = "h-broker"
        self.pubsub_loss = 0.0
        self.delay_scale = 1.0
        self.on_step: Callable[[], None] | None = None
        self.debug: list[str] | None = None  # a log of what the shells did, when asked for

    def log(self, proc: Proc, msg: str) -> None:
        if self.debug is not None:
            self.debug.append(f"{self.now:9.3f} {proc.name:<10} {msg}")

    # -- scheduling --------------------------------------------------------------

    def at(self, t: float, proc: Proc | None, fn: Callable[..., Any], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, proc, proc.gen if proc is not None else 0, fn, args))

    def after(self, proc: Proc | None, dt: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + dt, proc, fn, *args)

    def soon(self, proc: Proc | None, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now, proc, fn, *args)

    def run_until(self, t_end: float, max_steps: int | None = None) -> None:
        heap = self.heap
        pop, push = heapq.heappop, heapq.heappush
        stats = self.stats
        on_step = self.on_step
        limit = max_steps if max_steps is not None else -1
        while heap and heap[0][0] <= t_end:
            if stats.steps == limit:
                return
            t, seq, proc, gen, fn, args = pop(heap)
            if proc is not None:
                if proc.gen != gen or not proc.up:
                    continue
                if proc.paused_until > t:
                    # Held until the process wakes; the original sequence keeps the order.
                    push(heap, (proc.paused_until, seq, proc, gen, fn, args))
                    continue
            if t > self.now:
                self.now = t
            fn(*args)
            stats.steps += 1
            if on_step is not None:
                on_step()
        self.now = max(self.now, t_end)

    def note_crash(self, proc: Proc, why: str) -> None:
        self.stats.crashes.append(f"{self.now:.3f} {proc.name}: {why}")

    # -- processes -----------------------------------------------------------------

    def add(self, proc: Proc) -> Proc:
        self.procs[proc.name] = proc
        self.procs_by_host[proc.host] = proc
        if proc.service:
            self.services.setdefault(proc.service, []).append(proc)
        return proc

    def connected(self, a: str, b: str) -> bool:
        return a == b or (a not in self.isolated and b not in self.isolated)

    # -- network -------------------------------------------------------------------

    def _delay(self, rng: random.Random) -> float:
        r = rng.random()
        d = 0.0002 + rng.random() * 0.002
        if r < 0.02:
            d += rng.random() * 0.2  # a slow packet (retransmission)
        return d * self.delay_scale

    def send(self, src: Proc, dst: Proc, kind: str, fn: Callable[..., Any], *args: Any,
             lossy: bool = False, via_broker: bool = False) -> bool:
        """Deliver ``fn(*args)`` in ``dst`` after a link delay, FIFO per (src, kind, dst)."""
        stats = self.stats
        stats.sent += 1
        rng = self.rng
        if (self.isolated and not self._reachable(src.host, dst.host, via_broker)) \
                or (lossy and self.pubsub_loss and rng.random() < self.pubsub_loss):
            stats.lost += 1
            return False
        r = rng.random()
        d = 0.0002 + rng.random() * 0.002
        if r < 0.02:
            d += rng.random() * 0.2  # a slow packet (retransmission)
        t = self.now + d * self.delay_scale
        key = (src.name, kind, dst.name)
        last = self.conn_last.get(key, 0.0)
        if last > t:
            t = last
        self.conn_last[key] = t
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, dst, dst.gen, self._arrive, (src.host, dst, via_broker, fn, args)))
        return True

    def _reachable(self, a: str, b: str, via_broker: bool) -> bool:
        if via_broker:
            return self.connected(a, self.broker_host) and self.connected(self.broker_host, b)
        return self.connected(a, b)

    def _arrive(self, src_host: str, dst: Proc, via_broker: bool, fn: Callable[..., Any],
                args: tuple[Any, ...]) -> None:
        if self.isolated and not self._reachable(src_host, dst.host, via_broker):
            self.stats.lost += 1
            return
        fn(*args)

    def publish(self, src: Proc, kind: str, data: dict[str, Any]) -> None:
        """PUB -> broker XSUB/XPUB -> every subscriber whose prefix matches (lossy)."""
        event = {"kind": kind, **data}
        for proc in self.procs.values():
            if not proc.up or proc is src or not proc.subs:
                continue
            for prefix, callback in proc.subs:
                if kind.startswith(prefix):
                    self.send(src, proc, "events", self._deliver_event, proc, callback, event,
                              lossy=True, via_broker=True)

    def _deliver_event(self, proc: Proc, callback: Callable[[dict[str, Any]], Any], event: dict[str, Any]) -> None:
        try:
            callback(dict(event))
        except Exception as err:  # the real shell logs a failing event callback and goes on
            self.stats.crashes.append(f"{self.now:.3f} {proc.name}: event callback {event['kind']}: {err!r}")

    def request(self, client: Proc, service: str, op: str, args: dict[str, Any], timeout: float,
                task: Task, token: int, direct: bool = False) -> None:
        """One call of AsyncClient.request within its timeout: reply, error, or Timeout.

        A ``not_leader`` answer is handed on to the next live worker of the service
        in turn, as the broker does with a client's retry, until one answers
        otherwise or every worker was asked once.
        """
        state = {"done": False}
        workers = [p for p in self.services.get(service, ()) if p.up]

        def reply(value: Any, err: PhantomError | None) -> None:
            if state["done"]:
                return  # a late reply to an attempt that timed out is dropped
            if isinstance(err, NotLeader) and tried[0] < len(workers):
                attempt()
                return
            state["done"] = True
            task.wake(token, value, err)

        def expire() -> None:
            if not state["done"]:
                state["done"] = True
                task.wake(token, None, Timeout(f"{service}.{op}: no reply within {timeout:g} s", service=service))

        tried = [0]
        first = 0 if len(workers) <= 1 else self.rng.randrange(len(workers))

        def attempt() -> None:
            target = workers[(first + tried[0]) % len(workers)]
            tried[0] += 1
            self.send(client, target, "req", self._serve, client, target, op, dict(args), reply, direct,
                      via_broker=not direct)

        self.after(client, timeout, expire)
        if not workers:
            if not direct:  # the broker says so at once; a direct connection just times out
                self.send(client, client, "broker", reply, None,
                          ServiceUnavailable(f"no {service} worker", service=service), via_broker=True)
            return
        attempt()

    def _serve(self, client: Proc, target: Proc, op: str, args: dict[str, Any],
               reply: Callable[[Any, PhantomError | None], None], direct: bool = False) -> None:
        def answer(value: Any, exc: BaseException | None) -> None:
            err: PhantomError | None = None
            if isinstance(exc, PhantomError):
                value, err = None, exc
            elif exc is not None:  # the dispatcher answers anything else as internal
                value, err = None, InternalError(f"{target.service}.{op} failed: {type(exc).__name__}: {exc}")
            self.send(target, client, "rep", reply, value, err, via_broker=not direct)

        try:
            value = target.handle(op, args)
        except Exception as exc:
            answer(None, exc)
            return
        if isinstance(value, Generator):  # an async operation: its task answers when it ends
            target.spawn(value, f"{target.name}.{op}", on_done=answer)
        elif isinstance(value, Deferred):
            value.reply = lambda v, e: answer(v, e)
        else:
            answer(value, None)
