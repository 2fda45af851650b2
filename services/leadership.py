"""One service instance's view of who leads it, for the shells that need a leader.

Sharding, the manager and membership's verdicts need exactly one decision
maker. Each instance runs a :class:`phantom_bus.leader.Elector` over the
store; this module is the thin layer the shells share on top of it: waiting
for leadership to start or end, the fence every write carries, and the
retryable :class:`~phantom_bus.errors.NotLeader` error a follower answers to
an operation only the leader may perform.

Followers do not forward: a ``not_leader`` reply is retryable, and the
broker hands a retried request to the next worker of the service in turn, so
a client's normal bounded retries reach the leader. The reply names the
leader (``details.leader``, ``details.term``) for operators and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from loguru import logger

from phantom_bus.config import Config
from phantom_bus.errors import NotLeader
from phantom_bus.leader import Elector, default_instance
from phantom_bus.store import Fence, Store

# Seconds between looks at the elector's state when waiting for a change. The
# elector itself renews every ttl/3; 50 ms keeps takeover latency well under that.
_POLL = 0.05


class Leadership:
    """Who leads ``service``: this instance or another (see the module docstring)."""

    def __init__(self, store: Store, service: str, cfg: Config) -> None:
        self.service = service
        self.instance = str(cfg.instance or "") or default_instance()
        self.elector = Elector(store, service=service, instance=self.instance, ttl=float(cfg.leader_ttl))

    @property
    def is_leader(self) -> bool:
        """True while this instance holds the lease."""
        return bool(self.elector.is_leader)

    @property
    def term(self) -> int:
        """This instance's term while it leads (the fencing token); else the last term seen."""
        term = self.elector.term
        if term is not None:
            return int(term)
        _, term = self.leader()
        return term or 0

    @property
    def fence(self) -> Fence:
        """The fence to pass with every write; :class:`NotLeader` when not leading."""
        fence = self.elector.fence if self.elector.is_leader else None
        if fence is None:
            raise self.not_leader()
        return fence

    def leader(self) -> tuple[str | None, int | None]:
        """(instance, term) of the leader as last seen; (None, None) while nobody leads."""
        seen = self.elector.leader()
        if seen is None:
            return None, None
        return str(seen.instance), int(seen.term)

    def describe(self) -> dict[str, Any]:
        """``{"instance", "term", "leader": bool}`` of the current leader, for health and status."""
        instance, term = self.leader()
        return {"instance": instance, "term": term, "leader": self.is_leader, "self": self.instance}

    def not_leader(self) -> NotLeader:
        """The error a follower answers to a leader-only operation."""
        instance, term = self.leader()
        where = f"instance {instance} (term {term}) leads" if instance else "no instance leads right now"
        return NotLeader(
            f"{self.service} instance {self.instance} is a follower: {where}; retry",
            leader=instance,
            term=term,
        )

    async def run(self) -> None:
        """Campaign for as long as the process lives."""
        await self.elector.run()

    async def wait_leading(self) -> None:
        """Return once this instance leads."""
        while not self.elector.is_leader:
            await asyncio.sleep(_POLL)

    async def wait_following(self) -> None:
        """Return once this instance no longer leads."""
        while self.elector.is_leader:
            await asyncio.sleep(_POLL)

    async def while_leading(self, name: str, body: Any) -> None:
        """Run ``body()`` (a coroutine function) each time this instance is elected,
        cancelling it when it is deposed. Never returns."""
        while True:
            await self.wait_leading()
            logger.info("{} instance {} leads, term {}", self.service, self.instance, self.term)
            task = asyncio.ensure_future(body())
            watcher = asyncio.ensure_future(self.wait_following())
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done and not task.cancelled() and task.exception() is not None:
                watcher.cancel()
                raise task.exception()
            for t in (task, watcher):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if watcher in done:
                logger.warning("{} instance {} no longer leads ({})", self.service, self.instance, name)
            else:
                await self.wait_following()
