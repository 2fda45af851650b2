"""The manager's registry in the store: round trips, fenced CAS writes, the committed copy for rollback."""

from __future__ import annotations

from typing import Any

import pytest

from phantom_bus.store import CasFailed, Fence, Fenced, Put, Store, StoreError
from services.manager.config import ManagerConfig
from services.manager.core import ManagerCore
from services.manager.registry import ACTIVE, DRAINING, NodeRecord, Registry, Tombstone, TombstoneDropped
from services.manager.store import NODES, RegistryStore


def record(node: str, inc: int = 1, lifecycle: str = "joining", member: str | None = None) -> NodeRecord:
    return NodeRecord(node, "127.0.0.1:7001", "z1", 1.5, inc, lifecycle, member, None if member is None else 2.0,
                      1.0, 2.0, "because", True, "beacon")


def test_records_and_tombstones_round_trip_in_order(store_run: Any) -> None:
    async def body(store: Store) -> None:
        regs = RegistryStore(store)
        await regs.apply([record("b", member="dead"), record("a", lifecycle=ACTIVE)], None)
        await regs.apply([record("c"), Tombstone("c", 4, 9.0, "removed")], None)
        await regs.apply([record("d"), Tombstone("d", 1, 10.0, "removed"), TombstoneDropped("d")], None)
        await regs.apply([Tombstone("e", 2, 11.0, "gone")], None)
        records, tombs, _ = await RegistryStore(store).load()
        assert [r.id for r in records] == ["a", "b"] and records[1].member == "dead"
        assert [(t.id, t.incarnation) for t in tombs] == [("c", 4), ("e", 2)]
        assert [r.id for r in regs.committed().records()] == ["a", "b"]

    store_run(body)


def test_a_write_from_a_stale_read_or_a_deposed_leader_changes_nothing(store_run: Any) -> None:
    async def body(store: Store) -> None:
        term = await store.txn([], [Put("leaders/manager", b"m1")])
        fence = Fence("leaders/manager", term)
        one, two = RegistryStore(store), RegistryStore(store)
        await one.apply([record("a")], fence)
        await two.load()
        await two.apply([record("a", lifecycle=ACTIVE)], fence)
        with pytest.raises(CasFailed):  # `one` has not read what `two` wrote
            await one.apply([record("a", lifecycle=DRAINING)], fence)
        await store.put("leaders/manager", b"m2")
        with pytest.raises(Fenced):
            await two.apply([record("b")], fence)
        records, _, _ = await RegistryStore(store).load()
        assert [(r.id, r.lifecycle) for r in records] == [("a", ACTIVE)]

    store_run(body)


def test_an_unreadable_record_is_a_store_error(store_run: Any) -> None:
    async def body(store: Store) -> None:
        await store.put(NODES + "zombie", b"\xc1")
        with pytest.raises(StoreError, match="zombie"):
            await RegistryStore(store).load()

    store_run(body)


def test_the_core_resumes_from_the_store_with_the_same_registry(store_run: Any) -> None:
    async def body(store: Store) -> None:
        regs = RegistryStore(store)
        core = ManagerCore(ManagerConfig(rereplication_delay=60.0))
        for n in ("a", "b", "c"):
            for d in (
                core.on_event({"kind": "node.discovered", "node": n, "address": f"10.0.0.1:{7000 + ord(n)}",
                               "zone": "z", "weight": 1.0, "incarnation": 2, "source": "beacon"}, 1.0),
                core.on_event({"kind": "member.alive", "node": n, "incarnation": 2}, 2.0),
            ):
                await regs.apply(d.changes, None)
        await regs.apply(core.drain("b", now=3.0).changes, None)
        await regs.apply(core.remove("c", [], now=4.0).changes, None)
        await regs.apply(core.on_event({"kind": "member.dead", "node": "a", "incarnation": 2}, 5.0).changes, None)
        records, tombs, _ = await RegistryStore(store).load()
        again = ManagerCore(ManagerConfig(rereplication_delay=60.0), Registry.restore(records, tombs))
        assert again.nodes() == core.nodes()
        assert [r.lifecycle for r in again.nodes()] == [ACTIVE, DRAINING]
        assert again.registry.tombstone("c") is not None
        assert ("sharding", "node_dead") in [(a.service, a.op) for a in again.reconcile(6.0) if a.node == "a"]

    store_run(body)
