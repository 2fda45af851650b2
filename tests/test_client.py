"""Client and AsyncClient: timeouts, bounded retries, stale replies, errors that say why."""

from __future__ import annotations

import asyncio
import time

import pytest

from phantom_bus import AsyncClient, Client
from phantom_bus.client import Selection
from phantom_bus.errors import BadRequest, BrokerUnreachable, InternalError, ServiceUnavailable, Timeout
from tests.conftest import Bus, free_port

pytestmark = pytest.mark.processes


def test_no_broker_raises_broker_unreachable_after_bounded_retries() -> None:
    with Client(f"tcp://127.0.0.1:{free_port()}", timeout=0.2, retries=3) as c:
        start = time.monotonic()
        with pytest.raises(BrokerUnreachable):
            c.request("echo", "echo")
        elapsed = time.monotonic() - start
    assert 0.5 < elapsed < 3.0  # 3 x 0.2 s attempts plus a short ping, never a hang


def test_slow_service_is_a_timeout_not_an_unreachable_broker(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    with bus.client(timeout=0.3, retries=2) as c:
        with pytest.raises(Timeout) as info:
            c.request("echo", "sleep", seconds=2)
        assert not isinstance(info.value, BrokerUnreachable)
        # The abandoned attempts' late replies must not be taken for this answer.
        time.sleep(2.0)
        assert c.request("echo", "echo", n=42) == {"n": 42}


def test_handler_crash_is_an_internal_error_and_the_service_lives_on(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    with bus.client() as c:
        with pytest.raises(InternalError, match="asked to fail"):
            c.request("echo", "fail")
        assert c.request("echo", "echo", ok=True) == {"ok": True}


def test_missing_service_is_retried_then_reported(bus: Bus) -> None:
    bus.broker()
    bus.wait_workers("echo", 0)
    with bus.client(timeout=1.0, retries=3) as c:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            c.request("sharding", "map")
        # Retried with back-off for the call's budget (timeout x retries = 3 s), then reported.
        assert time.monotonic() - start < 3.0 + 1.0


def test_service_arriving_during_retries_is_used(bus: Bus) -> None:
    bus.broker()
    bus.wait_workers("echo", 0)
    with bus.client(timeout=2.0, retries=6) as c:
        bus.echo()
        assert c.request("echo", "echo", late=True) == {"late": True}


def test_status_without_manager_says_so_listing_services_and_is_no_red_verdict(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")
    with bus.client() as c:
        doc = c.status()
    assert doc["health"] == "unknown" and doc["manager"] == "not answering"
    assert doc["services"]["broker"] == "up"
    assert doc["services"]["manager"] == "down"
    assert set(doc["shards"]) == {"total", "under_replicated", "unavailable"}


def test_bad_keys_and_lease_free_release_are_refused_locally() -> None:
    c = Client(f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(BadRequest, match="str or bytes"):
        c.select(42)  # type: ignore[arg-type]
    sel = Selection("k", "default", "s1", "n1", "h:1", 3, "replica", lease=None)
    with pytest.raises(BadRequest, match="lease=False"):
        c.release(sel, 1.0)
    c.close()


def test_async_client_runs_many_requests_concurrently(bus: Bus) -> None:
    bus.broker()
    bus.echo()
    bus.wait_workers("echo")

    async def main() -> tuple[list, float]:
        async with AsyncClient(bus.endpoint, timeout=5.0) as c:
            start = time.monotonic()
            results = await asyncio.gather(
                *(c.request("echo", "sleep", seconds=0.3) for _ in range(10)),
                *(c.request("echo", "echo", i=i) for i in range(50)),
            )
            return results, time.monotonic() - start

    results, elapsed = asyncio.run(main())
    assert results[:10] == [0.3] * 10
    assert results[10:] == [{"i": i} for i in range(50)]
    assert elapsed < 2.0  # concurrent, not 10 x 0.3 s


def test_async_client_reports_unreachable_broker() -> None:
    async def main() -> None:
        async with AsyncClient(f"tcp://127.0.0.1:{free_port()}", timeout=0.2, retries=2) as c:
            await c.request("echo", "echo")

    with pytest.raises(BrokerUnreachable):
        asyncio.run(main())


def test_a_retry_budget_rides_out_retryable_answers_and_one_attempt_means_one() -> None:
    from phantom_bus.client import _Budget
    from phantom_bus.errors import BadRequest

    budget = _Budget(timeout=1.0, retries=3, now=0.0)
    retryable = ServiceUnavailable("no worker yet")
    pauses = []
    now = 0.0
    while (pause := budget.pause_after(retryable, now)) is not None:
        pauses.append(pause)
        now += pause + 0.01
    assert 2.9 <= now <= 3.1 and len(pauses) > 3      # more back-offs than attempts, within 3 s
    assert _Budget(1.0, 3, 0.0).pause_after(BadRequest("typo"), 0.0) is None
    assert _Budget(2.5, 1, 0.0).pause_after(retryable, 0.0) is None
    timeouts = _Budget(1.0, 3, 0.0)
    assert timeouts.after_timeout(1.0) and timeouts.after_timeout(2.0) and not timeouts.after_timeout(3.0)


def test_a_local_write_waits_for_the_next_map_only_when_it_can_come() -> None:
    from phantom_bus.client import Client, _Budget
    from phantom_bus.errors import NoLiveReplica

    err = NoLiveReplica("shard default/3 has no primary")
    fresh = _Budget(1.0, 3, 0.0)
    assert Client._transient(err, True, False, fresh, 0.0) == 0.1      # a hand-off: wait for the pushed map
    assert Client._transient(err, False, False, fresh, 0.0) is None    # a read never waits
    assert Client._transient(err, True, True, fresh, 0.0) is None      # stale map: no newer one is coming
    assert Client._transient(err, True, False, _Budget(1.0, 3, 0.0), 3.0) is None  # budget spent


def _answers(epochs: list[int], asked: list[tuple[str, str, dict[str, object]]]):  # type: ignore[no-untyped-def]
    """A stand-in for ``request``: balancer selects answered from ``epochs`` in turn."""
    it = iter(epochs)

    def request(service: str, op: str, /, **args: object) -> object:
        asked.append((service, op, args))
        if op == "release":
            return {"released": args["lease"], "status": "released"}
        e = next(it)
        return {"key": "k", "keyspace": "default", "shard": "default/0", "node": f"n{e}", "address": "a:1",
                "epoch": e, "role": "replica", "lease": f"L{e}"}  # fmt: skip

    return request


def test_a_brokered_select_never_returns_a_map_older_than_one_the_client_has_seen() -> None:
    asked: list[tuple[str, str, dict[str, object]]] = []
    c = Client("tcp://127.0.0.1:9", routing="broker", timeout=0.5, retries=2)
    c.request = _answers([10, 8, 9, 11, 11], asked)  # type: ignore[method-assign]
    assert c.select("k").epoch == 10
    # A lagging balancer (epoch 8, then 9) is asked again; its leases end without a latency.
    assert c.select("k").epoch == 11
    releases = [args for _, op, args in asked if op == "release"]
    assert releases == [{"lease": "L8", "ok": True}, {"lease": "L9", "ok": True}]
    assert c.select("k").epoch == 11 and c.epoch_seen == 11
    # Only older answers within the whole budget: a retryable error that says why, not a stale route.
    c.request = _answers([3] * 100, asked)  # type: ignore[method-assign]
    with pytest.raises(ServiceUnavailable, match="older than epoch 11"):
        c.select("k")


def test_the_async_client_keeps_the_same_epoch_guard() -> None:
    asked: list[tuple[str, str, dict[str, object]]] = []
    sync = _answers([5, 4, 6], asked)

    async def request(service: str, op: str, /, **args: object) -> object:
        return sync(service, op, **args)

    async def run() -> list[int]:
        c = AsyncClient("tcp://127.0.0.1:9", routing="broker", timeout=0.5, retries=2)
        c.request = request  # type: ignore[method-assign]
        return [(await c.select("k")).epoch, (await c.select("k")).epoch]

    assert asyncio.run(run()) == [5, 6]
