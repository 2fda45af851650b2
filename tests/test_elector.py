"""Electors on real stores (SQLite file shared by two handles, a throwaway etcd): one leads, fenced."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from phantom_bus.leader import Elector, read_leader
from phantom_bus.store import Fenced, Store, open_store
from phantom_bus.store.sqlite import SqliteStore

TTL = 2.0


class Frozen:
    """A store wrapper that can stop answering, like a process stopped with SIGSTOP."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.open = asyncio.Event()
        self.open.set()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if name in ("name", "watch", "close") or not callable(target):
            return target

        async def gated(*args: Any, **kwargs: Any) -> Any:
            await self.open.wait()
            return await target(*args, **kwargs)

        return gated


def stores(kind: str, tmp: Path, request: pytest.FixtureRequest) -> tuple[Store, Store]:
    prefix = f"/elect-{time.time_ns()}/"
    if kind == "sqlite":
        path = tmp / "store.sqlite3"
        return SqliteStore(path, prefix=prefix), SqliteStore(path, prefix=prefix)
    etcd = request.getfixturevalue("etcd")
    return (
        open_store(etcd.url, data_dir=str(tmp), prefix=prefix),
        open_store(etcd.url, data_dir=str(tmp), prefix=prefix),
    )


@contextlib.asynccontextmanager
async def running(*electors: Elector) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(e.run()) for e in electors]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first_leader(electors: list[Elector], timeout: float) -> Elector:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leading = [e for e in electors if e.is_leader]
        assert len(leading) <= 1, "two electors lead at once"
        if leading:
            return leading[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no leader within {timeout:g} s")


@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
def test_one_leads_and_the_other_takes_over_when_it_is_cancelled(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    a_store, b_store = stores(kind, tmp_path, request)

    async def main() -> None:
        a = Elector(a_store, "sharding", "a", TTL)
        b = Elector(b_store, "sharding", "b", TTL)
        try:
            async with running(a, b) as tasks:
                leader = await first_leader([a, b], 10)
                other = b if leader is a else a
                term = leader.term
                assert term is not None
                holder = await read_leader(a_store, "sharding")
                assert holder is not None and (holder.instance, holder.term) == (leader.instance, term)
                await asyncio.sleep(TTL)  # several renewals: still the same leader
                assert leader.is_leader and leader.term == term and not other.is_leader
                assert other.leader() is not None and other.leader().instance == leader.instance  # type: ignore[union-attr]
                tasks[[a, b].index(leader)].cancel()
                start = time.monotonic()
                successor = await first_leader([other], TTL + 3)
                assert time.monotonic() - start < TTL + 3
                assert successor.term is not None and successor.term > term
                assert not leader.is_leader
        finally:
            await a_store.close()
            await b_store.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
def test_a_paused_leaders_fenced_write_is_refused(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    a_store, b_store = stores(kind, tmp_path, request)

    async def main() -> None:
        frozen = Frozen(a_store)
        a = Elector(frozen, "manager", "a", TTL)  # type: ignore[arg-type]
        try:
            async with running(a):
                await first_leader([a], 10)
                fence = a.fence
                assert fence is not None
                await a_store.put("registry/x", b"by a", fence=fence)
                frozen.open.clear()  # a stops: no renewals get through
                b = Elector(b_store, "manager", "b", TTL)
                async with running(b):
                    await first_leader([b], TTL + 5)
                    assert not a.is_leader  # a's own clock ended its belief before b could win
                    frozen.open.set()  # a wakes up and tries the write it had in mind
                    with pytest.raises(Fenced):
                        await a_store.put("registry/x", b"stale, by a", fence=fence)
                    assert b.fence is not None
                    await b_store.put("registry/x", b"by b", fence=b.fence)
                    await asyncio.sleep(TTL / 2)
                    assert b.is_leader and not a.is_leader and a.deposed.is_set()
                entry = await a_store.get("registry/x")
                assert entry is not None and entry.value == b"by b"
        finally:
            await a_store.close()
            await b_store.close()

    asyncio.run(main())
