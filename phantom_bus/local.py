"""The I/O around a :class:`~phantom_bus.routing.local.LocalRouter` (asyncio).

:class:`RoutingFeed` keeps a client's local router current:

* the shard map through one :class:`~phantom_bus.follower.AsyncMapFollower`
  (``shardmap.changed`` as a hint or the pushed map itself, sharding's
  ``shardmap.current`` as proof that the map is current, a poll about once a
  second only when those stop, epochs never backwards);
* node health from the same events the balancer follows (``member.*``,
  ``node.*``, ``cluster.node_*``) on its own SUB socket, and from the
  balancer's node table, loaded at start and returned by every ``report``
  (so a lost event is repaired within one report interval);
* every ``report_s`` seconds the client's per-node and per-shard counts and a
  latency sample go to the balancer (``report``), so its statistics and
  ``phantom-top`` still see the traffic.

Nothing here is on a select's path: selects read the router's memory. When
the broker or the whole control plane is down these loops fail and retry
with bounded waits, and the router keeps the last map (static stability).

:class:`Client` runs a feed in a background thread with its own asyncio loop
and its own ZeroMQ context (:class:`FeedThread`); :class:`AsyncClient` runs it
as tasks in the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import zmq
import zmq.asyncio
from loguru import logger

from phantom_bus import protocol
from phantom_bus import security as secmod
from phantom_bus.errors import PhantomError
from phantom_bus.events import Deduplicator
from phantom_bus.follower import CURRENT, AsyncMapFollower, Regression
from phantom_bus.routing.inputs import PREFIXES
from phantom_bus.routing.local import LocalRouter
from phantom_bus.wire import LoopSocket

#: Seconds between reports to the balancer (and node-table refreshes).
REPORT_S = 2.0
_TICK_S = 1.0


class RoutingFeed:
    """Follows the map and node health for ``router``; reports its traffic.

    ``client`` is an :class:`~phantom_bus.client.AsyncClient` used only by the
    feed (its requests are short and retried by the loops, not by callers).
    """

    def __init__(
        self,
        router: LocalRouter,
        client: Any,
        *,
        events: str,
        security: secmod.Security,
        ctx: zmq.asyncio.Context,
        name: str,
        report_s: float = REPORT_S,
    ) -> None:
        self.router = router
        self.client = client
        self.events = events
        self.security = security
        self.ctx = ctx
        self.name = name
        self.report_s = report_s
        self.follower = AsyncMapFollower(client, name=name, on_change=router.set_map,
                                         on_regress=self._regressed, change_level="DEBUG")
        self._core = self.follower.core
        self._max_body = protocol.DEFAULT_MAX_BODY
        self.ready = asyncio.Event()
        # With several brokers every event arrives once per broker: deliver it once.
        self.dedupe = Deduplicator()
        self.health_loaded = False
        self.counters = {"events": 0, "reports": 0, "report_errors": 0}

    def _regressed(self, regression: Regression) -> None:
        # Logged loudly by the follower; counted there and shown by status().
        self.counters["regressions_seen"] = self.follower.core.counters["regressions"]

    def stale(self, now: float, after: float) -> bool:
        """True after ``after`` seconds without a successful map read (every select asks)."""
        at = self._core.refreshed_at
        return at is None or now - at > after

    def status(self, now: float) -> dict[str, Any]:
        """The follower's status and the feed's counters."""
        return {"map": self.follower.core.status(now), **self.counters,
                "health_loaded": self.health_loaded}

    async def run(self) -> None:
        """Run until cancelled."""
        # A plain socket read from the loop's reader callback (LoopSocket.serve):
        # an event costs no future and no task switch, which is what a map change
        # reaching many clients in one process is made of.
        raw: zmq.Socket[Any] = zmq.Context.shadow(self.ctx.underlying).socket(zmq.SUB)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.RCVHWM, 10000)
        for prefix in ("shardmap.changed", CURRENT, *PREFIXES):
            raw.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.security.connect(raw, self.events)
        sub = LoopSocket(raw, recheck=1.0)
        self._max_body = getattr(self.client, "max_body", protocol.DEFAULT_MAX_BODY)
        sub.serve(self._on_frames)
        tasks = [asyncio.ensure_future(c) for c in
                 (self.follower.run(), self._refused_loop(raw), self._report_loop(), self._ready_loop())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sub.close()

    async def _ready_loop(self) -> None:
        while self.router.map is None or not self.health_loaded:
            await asyncio.sleep(0.01)
        self.ready.set()

    async def _refused_loop(self, sock: zmq.Socket[Any]) -> None:
        # A subscription refused at the handshake (a key authorized late) tries again.
        while True:
            await asyncio.sleep(1.0)
            self.security.retry_refused(sock)

    def _on_frames(self, frames: list[bytes]) -> None:
        """One event, straight from the loop's reader callback (must not raise)."""
        try:
            event = protocol.decode_event(frames, max_size=self._max_body)
        except PhantomError:
            return
        if not self.dedupe.accept(event):
            return  # the same event from another broker
        self.counters["events"] += 1
        try:
            kind = event["kind"]
            if kind == "shardmap.changed":
                self.follower.hint(event)
            elif kind == CURRENT:
                self.follower.current(event)
            else:
                self.router.on_event(event, time.monotonic())
        except Exception:  # a bug here must not stop the feed from reading
            logger.exception("{}: an event could not be handled", self.name)

    async def _report_loop(self) -> None:
        next_tick = 0.0
        while True:
            now = time.monotonic()
            try:
                if not self.health_loaded:
                    nodes = await self.client.request("balancer", "routing")
                else:
                    args = self.router.report(now)
                    nodes = await self.client.request("balancer", "report", client=self.name,
                                                      **args)
                    self.router.commit()
                    self.counters["reports"] += 1
                self.router.on_routing_table(nodes.get("nodes") if isinstance(nodes, dict) else None,
                                             time.monotonic())
            except PhantomError as exc:
                self.counters["report_errors"] += 1
                logger.debug("{}: balancer not reached: {}", self.name, exc)
            # Ready without the table if the balancer is down: selects then run on
            # the map alone (unknown nodes are doubtful: served in panic mode).
            self.health_loaded = True
            if now >= next_tick:
                self.router.tick(now)
                next_tick = now + _TICK_S
            await asyncio.sleep(self.report_s)


class FeedThread:
    """A :class:`RoutingFeed` in a daemon thread with its own loop and ZeroMQ context.

    ``make_client(ctx)`` builds the feed's AsyncClient inside that thread.
    :meth:`close` stops it within a bounded time.
    """

    def __init__(self, router: LocalRouter, make_client: Any, *, events: str,
                 security: secmod.Security, name: str, report_s: float = REPORT_S) -> None:
        self.router = router
        self._make_client = make_client
        self._events = events
        self._security = security
        self._name = name
        self._report_s = report_s
        self.ready = threading.Event()
        self._closing = threading.Event()
        self.feed: RoutingFeed | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, name=f"phantom-routing-{name}",
                                        daemon=True)
        self._thread.start()

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        ctx = zmq.asyncio.Context()
        try:
            loop.run_until_complete(self._amain(ctx))
        except Exception:
            logger.exception("{}: routing thread failed", self._name)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            ctx.destroy(linger=0)

    async def _amain(self, ctx: zmq.asyncio.Context) -> None:
        client = self._make_client(ctx)
        feed = self.feed = RoutingFeed(self.router, client, events=self._events,
                                       security=self._security, ctx=ctx, name=self._name,
                                       report_s=self._report_s)
        self._task = asyncio.ensure_future(feed.run())
        if self._closing.is_set():
            self._task.cancel()
        waiter = asyncio.ensure_future(feed.ready.wait())
        waiter.add_done_callback(lambda _: self.ready.set())
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        finally:
            waiter.cancel()
            await client.close()

    def stale(self, now: float, after: float) -> bool:
        """See :meth:`RoutingFeed.stale` (True until the feed has started)."""
        feed = self.feed
        if feed is None:
            return True
        at = feed._core.refreshed_at
        return at is None or now - at > after

    def close(self, timeout: float = 2.0) -> None:
        """Stop the feed and join the thread (at most ``timeout`` seconds)."""
        self._closing.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout)
