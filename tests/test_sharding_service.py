"""The sharding shell over the store: commit first, roll back on failure, lead alone.

In-process over the memory store (no sockets are opened: events go to a PUB
socket with nobody listening). The store is wrapped so that a test can make
its commits fail the way a full disk does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest

from phantom_bus import config
from phantom_bus.errors import NotLeader, StoreError
from phantom_bus.protocol import Encoded, unpack
from phantom_bus.service import SERVICE_SETTINGS
from phantom_bus.store import Compare, Fence, Op
from phantom_bus.store.memory import MemoryStore
from services.sharding.service import SETTINGS, ShardingService
from services.sharding.store import MapStore

T = TypeVar("T")


class FlakyStore(MemoryStore):
    """A memory store whose writes fail with a full disk's message while ``full`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.slow = 0.0

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op], fence: Fence | None = None) -> int:
        if self.slow:
            await asyncio.sleep(self.slow)
        if self.full and any(op.key.startswith("shardmap/") for op in ops):
            raise StoreError("database or disk is full")
        return await super().txn(compares, ops, fence)


def make(tmp_path: Path, store: MemoryStore, instance: str) -> ShardingService:
    # No test here takes over: a lease long enough that a loaded machine's stalls never
    # depose the leader in the middle of a scenario.
    env = {"PHANTOM_DATA": str(tmp_path), "PHANTOM_INSTANCE": instance, "PHANTOM_LEADER_TTL": "5.0",
           "PHANTOM_EVENTS_IN": "tcp://127.0.0.1:9"}
    cfg = config.load(env=env, names=(*SERVICE_SETTINGS, *SETTINGS))
    return ShardingService(cfg, store=store)


@contextlib.asynccontextmanager
async def running(svc: ShardingService) -> AsyncIterator[None]:
    """``svc``'s loops running until the block ends."""
    tasks = [asyncio.ensure_future(c) for c in svc.loops()]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def epoch_of(reply: Encoded | None) -> int:
    assert isinstance(reply, Encoded)
    return int(unpack(reply)["epoch"])


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_failed_commit_is_rolled_back_retryable_and_says_why(tmp_path: Path) -> None:
    store = FlakyStore()
    svc = make(tmp_path, store, "s1")

    async def scenario() -> None:
        async with running(svc):
            await until(lambda: svc.core is not None)
            await svc.op_add_node("n1", "z1")
            before = epoch_of(svc.op_map())
            store.full = True
            with pytest.raises(StoreError) as failed:
                await svc.op_add_node("n2", "z2")
            assert failed.value.retry and failed.value.code == "store_unavailable"
            assert "database or disk is full" in failed.value.message
            # Nothing ran ahead: the core and the served map are the committed ones.
            assert svc.core is not None and svc.core.epoch == before
            assert [n["node"] for n in svc.op_nodes()] == ["n1"]
            health = svc.op_health()["store"]
            assert health["ok"] is False and "disk is full" in health["error"]
            await asyncio.sleep(1.2)  # the tick loop keeps running (no crash) while the disk is full
            store.full = False
            await until(lambda: svc.op_health()["store"]["ok"])  # the probe sees the disk back
            await svc.op_add_node("n2", "z2")
            assert epoch_of(svc.op_map()) > before
            committed = await MapStore(store).load()
            assert committed is not None and {n["id"] for n in committed.state["nodes"]} == {"n1", "n2"}

    run(scenario())


def test_the_map_reply_is_the_committed_encoding_made_once_per_epoch(tmp_path: Path) -> None:
    store = FlakyStore()
    svc = make(tmp_path, store, "s1")

    async def scenario() -> None:
        async with running(svc):
            await until(lambda: svc.core is not None)
            first = svc.op_map()
            assert first is svc.op_map() or bytes(first or b"") == bytes(svc.op_map() or b"")
            assert svc.committed is not None and bytes(first or b"") == svc.committed.blob
            store.slow = 0.3  # a slow commit: the change is not served before it is durable
            adding = asyncio.ensure_future(svc.op_add_node("n1", "z1"))
            await asyncio.sleep(0.1)
            assert epoch_of(svc.op_map()) == epoch_of(first)
            await adding
            after = epoch_of(svc.op_map())
            assert after > epoch_of(first) and svc.op_map(since_epoch=after) is None

    run(scenario())


def test_only_one_of_two_instances_leads_and_the_follower_serves_the_committed_map(tmp_path: Path) -> None:
    store = FlakyStore()
    a, b = make(tmp_path, store, "s1"), make(tmp_path, store, "s2")

    async def scenario() -> None:
        async with running(a), running(b):
            await until(lambda: a.core is not None or b.core is not None)
            leader, follower = (a, b) if a.core is not None else (b, a)
            assert follower.core is None
            await leader.op_add_node("n1", "z1")
            epoch = epoch_of(leader.op_map())
            await until(lambda: follower.committed is not None and follower.committed.epoch == epoch)
            assert [n["node"] for n in follower.op_nodes()] == ["n1"]
            # A follower may lag: it answers a map only when it is newer than the reader's.
            assert epoch_of(follower.op_map(since_epoch=epoch - 1)) == epoch
            for lagging in (lambda: follower.op_map(), lambda: follower.op_map(since_epoch=epoch),
                            lambda: follower.op_lookup("k")):
                with pytest.raises(NotLeader):
                    lagging()
            with pytest.raises(NotLeader) as refused:
                await follower.op_add_node("n2", "z2")
            assert refused.value.retry and refused.value.details.get("leader") == leader.leadership.instance

    run(scenario())


def test_a_store_restored_to_an_older_epoch_never_takes_the_map_back(tmp_path: Path) -> None:
    store = FlakyStore()
    svc = make(tmp_path, store, "s1")

    async def scenario() -> None:
        async with running(svc):
            await until(lambda: svc.core is not None)
            old = await MapStore(store).load()
            assert old is not None
            await svc.op_add_node("n1", "z1")
            await svc.op_add_node("n2", "z2")
            newest = epoch_of(svc.op_map())
            # Someone restores an old snapshot of the store under the running leader.
            from phantom_bus.store import Put
            from services.sharding.store import EPOCH_KEY, MAP_KEY, STATE_KEY

            record = msgpack.packb({"epoch": old.epoch, "term": old.term, "wall": old.wall})
            await store.txn([], [Put(EPOCH_KEY, record), Put(MAP_KEY, old.blob),
                                 Put(STATE_KEY, msgpack.packb(old.state))])
            with pytest.raises(StoreError):
                await svc.op_add_node("n3", "z3")
            assert epoch_of(svc.op_map()) == newest  # still served: not the restored one
            await svc.op_add_node("n3", "z3")  # the retry commits on top of the restored store
            stored = await MapStore(store).load()
            assert stored is not None and stored.epoch > newest
            assert {n["id"] for n in stored.state["nodes"]} == {"n1", "n2", "n3"}

    run(scenario())
