"""The manager shell's action queues: a failover is retried until it is done or moot; the rest is bounded.

In-process: a real ManagerService over the memory store, leading through its
own elector, with the bus client replaced by a recorder that fails on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from phantom_bus import config, protocol
from phantom_bus.errors import InternalError, Overloaded, PhantomError, Refused, StoreError
from phantom_bus.follower import CURRENT
from phantom_bus.service import SERVICE_SETTINGS
from phantom_bus.shardmap import Keyspace, Replica, Shard, ShardMap
from phantom_bus.store.memory import MemoryStore
from services.manager import service as manager_service
from services.manager.core import Action
from services.manager.service import SETTINGS, ManagerService


class Recorder:
    """Answers requests; ``failures[(service, op)]`` errors are raised first, one per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.failures: dict[tuple[str, str], list[PhantomError]] = {}

    async def request(self, service: str, op: str, /, **args: Any) -> Any:
        self.calls.append((service, op, args))
        pending = self.failures.get((service, op))
        if pending:
            raise pending.pop(0)
        if (service, op) == ("sharding", "nodes"):
            return []
        if (service, op) == ("membership", "verdicts"):
            raise PhantomError("not in this test")
        return {}

    def count(self, service: str, op: str) -> int:
        return sum(1 for s, o, _ in self.calls if (s, o) == (service, op))


def make(tmp_path: Path) -> tuple[ManagerService, Recorder]:
    env = {"PHANTOM_DATA": str(tmp_path), "PHANTOM_INSTANCE": "m1", "PHANTOM_LEADER_TTL": "1.0",
           "PHANTOM_EVENTS_IN": "tcp://127.0.0.1:9", "PHANTOM_DEAD_DELAY": "600"}
    svc = ManagerService(config.load(env=env, names=(*SERVICE_SETTINGS, *SETTINGS)), store=MemoryStore())
    rec = Recorder()
    svc.client = rec  # type: ignore[assignment]
    return svc, rec


async def until(predicate: Any, timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if value := predicate():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@contextlib.asynccontextmanager
async def leading(svc: ManagerService) -> Any:
    tasks = [asyncio.ensure_future(c) for c in (svc.leadership.run(), svc.follow_loop())]
    try:
        await until(lambda: svc.leadership.is_leader)
        yield
    finally:
        svc._stop_acting()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def active_then_dead(svc: ManagerService, node: str = "n1") -> None:
    for event in (
        {"kind": "node.discovered", "node": node, "address": "127.0.0.1:7001", "zone": "z1", "incarnation": 1},
        {"kind": "member.alive", "node": node, "incarnation": 1},
        {"kind": "member.dead", "node": node, "incarnation": 1},
    ):
        await svc.on_event(event)


def test_a_failover_is_retried_through_store_and_internal_errors_until_done(tmp_path: Path) -> None:
    svc, rec = make(tmp_path)

    async def scenario() -> None:
        async with leading(svc):
            rec.failures[("sharding", "node_dead")] = [
                StoreError("epoch 9 could not be committed and was rolled back; retry: database or disk is full"),
                InternalError("sharding.node_dead failed"),  # not retryable, yet a failover is never dropped
                StoreError("database or disk is full"),
            ]
            await active_then_dead(svc)
            await until(lambda: rec.count("sharding", "node_dead") == 4 and not svc._pending)
            assert svc.counters["dropped"] == 0
            # The registry change was committed to the store before any action went out.
            records, _, _ = await svc.registry_store.load()
            assert [(r.id, r.member) for r in records] == [("n1", "dead")]

    asyncio.run(scenario())


def test_a_failover_stops_being_retried_once_the_node_is_back(tmp_path: Path) -> None:
    svc, rec = make(tmp_path)

    async def scenario() -> None:
        async with leading(svc):
            rec.failures[("sharding", "node_dead")] = [StoreError("disk full")] * 1000
            await active_then_dead(svc)
            await until(lambda: rec.count("sharding", "node_dead") >= 2)
            await svc.on_event({"kind": "member.alive", "node": "n1", "incarnation": 2})
            await until(lambda: rec.count("sharding", "node_alive") == 1 and not svc._pending)
            tried = rec.count("sharding", "node_dead")
            await asyncio.sleep(0.5)
            assert rec.count("sharding", "node_dead") == tried

    asyncio.run(scenario())


def test_other_actions_give_up_on_a_refusal_and_a_full_queue_is_an_overload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, rec = make(tmp_path)
    monkeypatch.setattr(manager_service, "QUEUE_LIMIT", 2)

    async def scenario() -> None:
        async with leading(svc):
            rec.failures[("balancer", "node_update")] = [Refused("no")]
            svc._enqueue(Action("balancer", "node_update", {"node": "n1", "state": "alive"}, "test"))
            await until(lambda: svc.counters["dropped"] == 1)
            assert rec.count("balancer", "node_update") == 1
            rec.failures[("discovery", "remove")] = [StoreError("slow")] * 1000
            with pytest.raises(Overloaded, match="queue for discovery is full"):
                for i in range(10):
                    svc._enqueue(Action("discovery", "remove", {"node": f"n{i}"}, "test"))

    asyncio.run(scenario())


def test_a_verdict_from_an_older_membership_term_is_ignored(tmp_path: Path) -> None:
    svc, rec = make(tmp_path)

    async def scenario() -> None:
        async with leading(svc):
            for event in (
                {"kind": "node.discovered", "node": "n1", "address": "127.0.0.1:7001", "zone": "z1",
                 "incarnation": 1},
                {"kind": "member.alive", "node": "n1", "incarnation": 1, "term": 9},
                {"kind": "member.dead", "node": "n1", "incarnation": 1, "term": 5},  # a deposed membership
            ):
                await svc.on_event(event)
            assert svc.core.node("n1").member == "alive" and svc.counters["stale_verdicts"] == 1
            assert rec.count("sharding", "node_dead") == 0

    asyncio.run(scenario())


def test_the_map_loop_takes_shardings_current_epoch_instead_of_polling(tmp_path: Path) -> None:
    # The manager follows the map with the shared follower: an event that carries
    # the map is taken without a read, and sharding's shardmap.current (the epoch
    # held) stands for a poll. A follower polls about once a second without it.
    svc, rec = make(tmp_path)

    def one_shard(epoch: int, node: str) -> ShardMap:
        shard = Shard("h/0", (Replica(node, "primary"),), slots=((0, 16),))
        return ShardMap(epoch, (Keyspace("default", "hash", 1, (shard,), 16),))

    first, second = one_shard(3, "n1"), one_shard(4, "n2")
    answers: list[Any] = [first.to_wire()]

    async def request(service: str, op: str, /, **args: Any) -> Any:
        rec.calls.append((service, op, args))
        if (service, op) == ("sharding", "map"):
            return answers.pop(0) if answers else None
        return {}

    rec.request = request  # type: ignore[method-assign]

    async def scenario() -> None:
        loop_task = asyncio.ensure_future(svc.map_loop())
        try:
            await until(lambda: svc._map is not None and svc._map.epoch == 3)
            reads = rec.count("sharding", "map")
            for _ in range(12):  # 3.6 s of current events: no poll is due while they come
                svc.on_map_current({"kind": CURRENT, "epoch": 3, "term": 1})
                await asyncio.sleep(0.3)
            assert rec.count("sharding", "map") == reads
            svc.on_map_changed({"kind": "shardmap.changed", "epoch": 4, "term": 1,
                                "map": protocol.pack(second.to_wire())})
            await until(lambda: svc._map is not None and svc._map.epoch == 4)
            assert rec.count("sharding", "map") == reads
            # A newer epoch named by shardmap.current is a reason to read.
            answers.append(one_shard(5, "n3").to_wire())
            svc.on_map_current({"kind": CURRENT, "epoch": 5, "term": 1})
            await until(lambda: svc._map is not None and svc._map.epoch == 5)
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)

    asyncio.run(scenario())
