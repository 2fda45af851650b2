"""The agent's participant shell: feeds the participant core and carries out its transitions.

Three inputs, all level-triggered: every shard map the agent reads
(:meth:`Participation.observe`), the replies to the lease renewals it sends
every ``primary_lease / 4`` seconds, and a 100 ms tick that notices a lease
running out. Transitions run through the configured adapter
(services/agent/adapters.py), one at a time per shard; a completed ``join`` is
confirmed to sharding (retried until sharding takes or refuses it). Every
transition is logged with its shard and epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from loguru import logger

from phantom_bus.client import AsyncClient
from phantom_bus.config import Config
from phantom_bus.errors import PhantomError
from phantom_bus.shardmap import ShardMap
from services.agent.adapters import Database, load_database, wall_clock
from services.agent.participant import Participant, Transition, desired_from_map

# Seconds between ticks of the participation core (renewals every primary_lease/4,
# copies of copy_time): a tenth of a second is well inside both, so not a setting.
_TICK = 0.1
# Transitions run at once (fences never wait): enough to copy a few shards in
# parallel; each exec callback is a fork, and dozens at once stall the agent's loop.
_PARALLEL = 4


class Participation:
    """One node's participant: the core, its adapter and the tasks running transitions."""

    def __init__(self, cfg: Config, node: str, incarnation: Callable[[], int], db: Database | None = None) -> None:
        self.cfg = cfg
        self.node = node
        self.incarnation = incarnation
        self.db = db if db is not None else load_database(cfg, node)
        self.lease = float(cfg.primary_lease)
        self.core = Participant(self.lease)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._confirming: dict[str, asyncio.Task[None]] = {}
        self._client: AsyncClient | None = None
        self._seq = 0
        # Called after a copy was confirmed (the agent re-reads the map sooner).
        self.on_confirmed: Callable[[], None] | None = None
        self._slots = asyncio.Semaphore(_PARALLEL)
        # Set when the database let go of a primary, or the map made this node
        # primary of a shard it holds no lease for: renew at once, so that a
        # hand-off waits one round trip rather than a renewal interval.
        self._renew_now = asyncio.Event()

    # -- inputs --------------------------------------------------------------------------

    def observe(self, shard_map: ShardMap) -> None:
        """The agent read ``shard_map``: move toward what it says of this node."""
        rows = ((shard.id, [(r.node, r.role) for r in shard.replicas]) for _, shard in shard_map.shards())
        wanted = desired_from_map(self.node, rows)
        before = self.core.refused
        now = time.monotonic()
        self._start(self.core.desire(shard_map.epoch, wanted, now))
        if self.core.refused > before:
            logger.warning("shard map epoch {} is older than {}: not applied", shard_map.epoch, self.core.map_epoch)
        elif self.core.awaiting_lease(now):
            self._renew_now.set()

    def _start(self, transitions: list[Transition]) -> None:
        for t in transitions:
            self._running[t.shard] = asyncio.ensure_future(self._run(t))
        self._confirm_ready()

    async def _run(self, t: Transition) -> None:
        lease_until = wall_clock(t.lease_until) if t.lease_until is not None else 0.0
        log = logger.bind(shard=t.shard, epoch=t.epoch)
        log.info("{} {}: {} -> {} at epoch {}{}", t.kind, t.shard, t.before, t.after, t.epoch,
                 f" from {','.join(t.sources)}" if t.sources else "")  # fmt: skip
        ok = True
        try:
            if t.kind == "fence":
                await self.db.run(t, lease_until)
            else:
                async with self._slots:  # bounded: a burst of transitions must not stall the agent
                    if t.kind == "primary":
                        # The wait for a slot (or a lagging loop) may have outlasted the lease:
                        # never start writes on a lapsed one.
                        if not self.core.leased(t.shard, time.monotonic()):
                            raise RuntimeError("the lease ran out before the database could be told")
                        lease_until = wall_clock(self.core.lease_until())
                    await self.db.run(t, lease_until)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database's failure must not take down the agent
            ok = False
            (log.error if t.kind == "fence" else log.warning)("{} of {} failed: {}", t.kind, t.shard, exc)
        self._running.pop(t.shard, None)
        if ok and t.before in ("primary", "fenced") and t.kind in ("demote", "fence", "drop"):
            self._renew_now.set()
        self._start(self.core.done(t, ok, time.monotonic()))

    # -- confirming copies -----------------------------------------------------------------

    def _confirm_ready(self) -> None:
        if self._client is None:
            return
        for shard in self.core.ready():
            task = self._confirming.get(shard)
            if task is None or task.done():
                self._confirming[shard] = asyncio.ensure_future(self._confirm(self._client, shard))

    async def _confirm(self, client: AsyncClient, shard: str) -> None:
        while shard in self.core.ready():
            # The epoch the copy was asked for: sharding refuses a copy made for an
            # assignment it has cancelled since, and this node then copies again.
            epoch = self.core.copy_epoch(shard)
            try:
                await client.request("sharding", "confirm", shard=shard, node=self.node, epoch=epoch)
                logger.bind(shard=shard, epoch=epoch).info("replica of {} is ready: confirmed", shard)
                if self.on_confirmed is not None:
                    self.on_confirmed()
                return
            except PhantomError as exc:
                if not exc.retry:
                    logger.bind(shard=shard, epoch=epoch).info("confirm of {} not taken: {}", shard, exc)
                    since = exc.details.get("since")
                    if type(since) is int:
                        self._start(self.core.copy_refused(shard, epoch, since, time.monotonic()))
                    return
                await asyncio.sleep(1.0)

    # -- the lease -------------------------------------------------------------------------

    async def renew_once(self, client: AsyncClient) -> None:
        """One renewal: send what this node holds, take the reply's primaries as leased."""
        self._seq += 1
        sent = time.monotonic()
        holding = self.core.renewal(sent)
        try:
            reply = await client.request(
                "sharding", "renew", node=self.node, incarnation=self.incarnation(), seq=self._seq, holding=holding
            )
        except PhantomError as exc:
            logger.debug("lease not renewed: {}", exc)
            return
        if not isinstance(reply, dict) or not reply.get("fresh", True):
            return
        primaries = [str(s) for s in reply.get("primaries", [])]
        self._start(self.core.granted(int(reply.get("epoch", 0)), primaries, sent, time.monotonic()))
        held = [s for s in primaries if s in self.core.holding()]
        until = wall_clock(self.core.lease_until())
        logger.debug("lease renewed at {:.3f} until {:.3f}: {}", wall_clock(sent), until, " ".join(held) or "-")
        self.db.renewed(until, held)

    async def run(self) -> None:
        """Renew the lease, tick, and confirm copies until cancelled."""
        interval = self.lease / 4
        # Two tries within half a lease: a renewal that lands on a sharding follower
        # is refused (not_leader) and the client tries again, while the lease still
        # counts from the first send.
        timeout = min(float(self.cfg.timeout), interval)
        async with AsyncClient(self.cfg.broker, timeout=timeout, retries=2, routing="broker") as client:
            self._client = client

            async def ticker() -> None:
                while True:
                    await asyncio.sleep(_TICK)
                    self._start(self.core.tick(time.monotonic()))

            tick = asyncio.ensure_future(ticker())
            try:
                while True:
                    started = time.monotonic()
                    self._renew_now.clear()  # what happens during this renewal triggers the next one
                    await self.renew_once(client)
                    with contextlib.suppress(TimeoutError):
                        left = max(0.0, interval - (time.monotonic() - started))
                        await asyncio.wait_for(self._renew_now.wait(), left)
            finally:
                tick.cancel()
                self._client = None
                for task in [*self._running.values(), *self._confirming.values()]:
                    task.cancel()


__all__ = ["Participation"]
