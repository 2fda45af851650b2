"""Three control-plane hosts on one etcd: losing or freezing a whole host stops nothing.

One cluster for the module (hosts h1, h2, h3, each with its own broker and one
instance of every service, three agents, a short leader lease). The first
test SIGKILLs every process of the host that leads sharding under select
load; the second freezes (SIGSTOP) every process of the host that leads
sharding then, for longer than the lease, while a fourth node joins, and
thaws it. Takeover figures are measured by bench/ha_failover.py; the bounds
here are generous on purpose.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.ha_hosts import Hosts, Traffic, wait_for

# Three hosts of six processes each start slowly on a loaded 2-core machine (about a minute
# to green when idle): the whole module needs more than the default per-test timeout.
pytestmark = [pytest.mark.processes, pytest.mark.timeout(420)]

TTL = 2.0
#: "Another instance leads within the lease + 1 s", with room for a loaded 2-core machine.
TAKEOVER_BOUND = 4 * (TTL + 1.0)


@pytest.fixture(scope="module")
def ha(etcd: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    hosts = Hosts(tmp_path_factory.mktemp("ha"), etcd.url, ttl=TTL, copy_time="0.1", dead_delay="600")
    try:
        for h in hosts.hosts:
            hosts.start_host(h)
        for n in (1, 2, 3):
            hosts.start_agent(n)
        hosts.wait_green(timeout=180)
        yield hosts
    finally:
        hosts.close()


def primaries_per_shard(shard_map: dict[str, Any]) -> Counter[int]:
    return Counter(
        sum(1 for r in sh["replicas"] if r["role"] == "primary") for ks in shard_map["keyspaces"] for sh in ks["shards"]
    )


def traffic(ha: Hosts) -> Traffic:
    return Traffic(ha.brokers, ha.env["PHANTOM_EVENTS_OUT"], routing="broker", writes=True)


def test_killing_every_process_of_the_sharding_leaders_host_under_load_fails_nothing(ha: Hosts) -> None:
    before = ha.leaders()
    assert before["sharding"] is not None, before
    victim = before["sharding"][0]
    everywhere = list(ha.hosts)

    def complete() -> dict[str, Any] | None:
        control = ha.status().get("control") or {}
        ok = all(control.get("instances", {}).get(s) == everywhere for s in ("broker", "sharding", "balancer"))
        return control if ok else None

    control = wait_for(complete, 30, what="every instance listed")
    assert control["store"] == "etcd" and control["leaders"]["sharding"]["instance"] == victim
    with traffic(ha) as load:
        killed_at = time.monotonic()
        ha.signal_host(victim, signal.SIGKILL)
        for service, seen in before.items():
            if seen is not None and seen[0] == victim:
                new = ha.wait_new_leader(service, seen, timeout=TAKEOVER_BOUND + 10)
                took = time.monotonic() - killed_at
                assert new[0] != victim and took < TAKEOVER_BOUND, (service, new, took)
        load.wait_ops(100, timeout=60)
        assert load.errors == [], load.errors[:5]
    assert load.regressions == [], load.regressions[:5]
    after = ha.wait_green(timeout=120)
    # The status names who leads now and which instances are left (the dead host's
    # workers leave the brokers' tables once their heartbeats stop).
    assert after["control"]["leaders"]["sharding"]["instance"] != victim
    survivors = [h for h in ha.hosts if h != victim]
    wait_for(lambda: ha.status().get("control", {}).get("instances", {}).get("broker") == survivors, 30,
             what="the brokers that answer")  # fmt: skip
    wait_for(lambda: ha.status().get("control", {}).get("instances", {}).get("sharding") == survivors, 30,
             what="the sharding instances left")  # fmt: skip


def test_freezing_the_sharding_leaders_host_past_its_lease_while_a_node_joins(ha: Hosts) -> None:
    seen = ha.leader("sharding")
    assert seen is not None
    frozen = seen[0]
    assert len(ha.alive_hosts()) >= 2, ha.alive_hosts()
    with traffic(ha) as load:
        stopped_at = time.monotonic()
        ha.signal_host(frozen, signal.SIGSTOP)
        try:
            ha.start_agent(4, "z1")
            new = ha.wait_new_leader("sharding", seen, timeout=TAKEOVER_BOUND + 10)
            assert new[0] != frozen and time.monotonic() - stopped_at < TAKEOVER_BOUND, new

            def placed() -> bool:
                doc = ha.status()
                return any(n.get("id") == "node-4" and (n.get("replicas") or 0) > 0 for n in doc.get("nodes", []))

            wait_for(placed, timeout=90, interval=0.3, what="node-4 placed while the old leader is frozen")
            assert time.monotonic() - stopped_at > TTL  # frozen for longer than its lease
            load.wait_ops(50, timeout=60)
        finally:
            ha.signal_host(frozen, signal.SIGCONT)
        # The woken instance finds it no longer leads and changes nothing.
        wait_for(lambda: f"sharding instance {frozen} no longer leads" in ha.log(frozen, "sharding"), 30,
                 what="the thawed sharding instance stepping down")  # fmt: skip
        time.sleep(TTL)
        assert ha.leader("sharding") == new
        load.wait_ops(50, timeout=60)
        assert load.errors == [], load.errors[:5]
    assert load.regressions == [], load.regressions[:5]
    ha.wait_green(timeout=150)
    with ha.client(timeout=2.0, retries=3) as c:
        shard_map = c.request("sharding", "map")
    assert primaries_per_shard(shard_map) == Counter({1: 64}), primaries_per_shard(shard_map)
