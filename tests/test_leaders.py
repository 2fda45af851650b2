"""Several instances of sharding and the manager as real processes: one leads, the other takes over.

Each test runs a whole cluster (broker, discovery, membership, balancer, two
sharding and two manager instances, three agents) with a short leader lease.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import pytest
import zmq

from phantom_bus.client import Client
from phantom_bus.errors import PhantomError
from tests.conftest import Bus, free_port, wait_until
from tests.test_cluster import status, wait_green
from tests.test_cluster_load import SelectLoad, start_agent

pytestmark = pytest.mark.processes

TTL = 2.0


def cluster(bus: Bus, **env: str) -> dict[str, subprocess.Popen[bytes]]:
    bus.env.update({"PHANTOM_COPY_TIME": "0.1", "PHANTOM_LEADER_TTL": str(TTL), "PHANTOM_DEAD_DELAY": "600", **env})
    procs = {"broker": bus.broker()}
    for name in ("discovery", "membership", "balancer"):
        procs[name] = bus.start(f"services.{name}")
    for name in ("sharding", "manager"):
        for i in (1, 2):
            procs[f"{name}{i}"] = bus.start(f"services.{name}", name=f"{name}{i}", PHANTOM_INSTANCE=f"{name}{i}")
    for n in (1, 2, 3):
        procs[f"node-{n}"] = bus.agent(n)
    wait_green(bus, timeout=90)
    return procs


def leader(bus: Bus, service: str) -> str | None:
    """The instance that says it leads ``service`` (asking a few times: the broker prefers the
    leader from its next heartbeat on)."""
    with bus.client(timeout=2.0, retries=1) as c:
        for _ in range(6):
            try:
                seen = c.request(service, "health")["leader"]
            except PhantomError:
                continue
            if seen.get("leader"):
                return str(seen["self"])
    return None


def primaries_per_shard(shard_map: dict[str, Any]) -> Counter[int]:
    return Counter(
        sum(1 for r in sh["replicas"] if r["role"] == "primary")
        for ks in shard_map["keyspaces"]
        for sh in ks["shards"]
    )


class EpochWatch(threading.Thread):
    """Reads the map over and over (from whichever instance answers) and records any epoch
    that is lower than one already seen."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(daemon=True)
        self.bus, self.halt = bus, threading.Event()
        self.highest, self.regressions = 0, []  # type: ignore[var-annotated]

    def run(self) -> None:
        with Client(self.bus.endpoint, timeout=1.0, retries=3) as c:
            while not self.halt.is_set():
                try:
                    epoch = int(c.request("sharding", "map")["epoch"])
                except PhantomError:
                    continue
                if epoch < self.highest:
                    self.regressions.append((self.highest, epoch))
                self.highest = max(self.highest, epoch)
                time.sleep(0.05)

    def __enter__(self) -> EpochWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(10)


@pytest.fixture(params=["sqlite", "etcd"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    etcd = request.getfixturevalue("etcd")
    return {"PHANTOM_STORE": etcd.url, "PHANTOM_STORE_PREFIX": f"/leaders-{time.time_ns()}/"}


def test_leaders_fail_over_under_load_and_a_paused_leader_changes_nothing(
    bus: Bus, store_env: dict[str, str]
) -> None:
    procs = cluster(bus, **store_env)
    with SelectLoad(bus, writes=True) as load, EpochWatch(bus) as epochs:
        # SIGKILL the sharding leader, then the manager leader: the other instance takes over.
        for service in ("sharding", "manager"):
            first = wait_until(lambda s=service: leader(bus, s), timeout=20)
            reads = load.reads
            bus.kill(procs[first], signal.SIGKILL)
            second = wait_until(lambda s=service, f=first: (ld := leader(bus, s)) and ld != f and ld, timeout=30)
            assert second in procs and second != first
            wait_until(lambda r=reads: load.reads >= r + 50 or load.errors, timeout=30)
            assert load.errors == [], (service, load.errors[:5])
        # SIGSTOP the (only) sharding instance left for longer than its lease, and let a
        # node join meanwhile: a restarted instance leads and places it.
        paused = leader(bus, "sharding")
        assert paused is not None
        procs[paused].send_signal(signal.SIGSTOP)
        try:
            procs["sharding3"] = bus.start("services.sharding", name="sharding3", PHANTOM_INSTANCE="sharding3")
            procs["node-4"] = start_agent(bus, 4, "z1")
            wait_until(lambda: leader(bus, "sharding") == "sharding3", timeout=30)
            joined = wait_until(
                lambda: (s := status(bus)) and any(n["id"] == "node-4" and (n.get("replicas") or 0) > 0
                                                   for n in s.get("nodes", [])) and s,
                timeout=60,
            )
            assert joined
        finally:
            procs[paused].send_signal(signal.SIGCONT)
        # The woken instance does not lead again and wrote nothing: one leader, one primary per shard.
        wait_until(lambda: f"sharding instance {paused} no longer leads" in bus.log(procs[paused]), timeout=15)
        time.sleep(TTL)
        assert leader(bus, "sharding") == "sharding3"
        wait_green(bus, timeout=90)
        with bus.client(timeout=2.0, retries=3) as c:
            shard_map = c.request("sharding", "map")
        assert primaries_per_shard(shard_map) == Counter({1: 64}), primaries_per_shard(shard_map)
    assert load.errors == [], load.errors[:5]
    assert epochs.regressions == [], epochs.regressions[:5]
    assert epochs.highest >= shard_map["epoch"] - 5


class DropMemberDead(threading.Thread):
    """An event relay for one subscriber that loses every ``member.dead`` on the way."""

    def __init__(self, upstream: str) -> None:
        super().__init__(daemon=True)
        self.port = free_port()
        self.upstream, self.halt, self.dropped = upstream, threading.Event(), 0

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def run(self) -> None:
        ctx = zmq.Context.instance()
        sub, pub = ctx.socket(zmq.SUB), ctx.socket(zmq.XPUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVTIMEO, 100)
        sub.connect(self.upstream)
        pub.bind(self.endpoint)
        try:
            while not self.halt.is_set():
                while pub.poll(0):
                    pub.recv()  # subscriptions: everything is forwarded anyway
                try:
                    frames = sub.recv_multipart()
                except zmq.Again:
                    continue
                if frames[0].startswith(b"member.dead"):
                    self.dropped += 1
                    continue
                pub.send_multipart(frames)
        finally:
            sub.close(0)
            pub.close(0)


def test_a_lost_member_dead_still_fails_the_node_over_within_seconds(bus: Bus) -> None:
    relay = DropMemberDead(bus.env["PHANTOM_EVENTS_OUT"])
    relay.start()
    try:
        bus.env.update({"PHANTOM_COPY_TIME": "0.1", "PHANTOM_LEADER_TTL": str(TTL), "PHANTOM_DEAD_DELAY": "600"})
        procs = {"broker": bus.broker()}
        for name in ("discovery", "membership", "sharding", "balancer"):
            procs[name] = bus.start(f"services.{name}")
        procs["manager"] = bus.start("services.manager", PHANTOM_EVENTS_OUT=relay.endpoint)
        for n in (1, 2, 3):
            procs[f"node-{n}"] = bus.agent(n)
        wait_green(bus, timeout=90)
        bus.kill(procs["node-3"], signal.SIGKILL)
        with bus.client(timeout=1.0, retries=3) as c:
            def member_dead() -> bool:
                return any(m["id"] == "node-3" and m["state"] == "dead" for m in c.request("membership", "members"))

            wait_until(member_dead, timeout=30, interval=0.05)
            dead_at = time.monotonic()

            def failed_over() -> bool:
                m = c.request("sharding", "map")
                return "node-3" in m["down"] and all(
                    r["node"] != "node-3" or r["role"] != "primary"
                    for ks in m["keyspaces"] for sh in ks["shards"] for r in sh["replicas"]
                )

            wait_until(failed_over, timeout=30, interval=0.05)
            took = time.monotonic() - dead_at
        assert relay.dropped >= 1  # the manager never heard it
        assert took < 5.0, took
    finally:
        relay.halt.set()
        relay.join(5)


def test_a_second_membership_takes_over_the_verdicts_when_the_leader_dies(bus: Bus) -> None:
    bus.env["PHANTOM_LEADER_TTL"] = str(TTL)
    bus.broker()
    first = bus.start("services.membership", name="membership1", PHANTOM_INSTANCE="membership1")
    second = bus.start("services.membership", name="membership2", PHANTOM_INSTANCE="membership2",
                       PHANTOM_HEARTBEAT=f"tcp://127.0.0.1:{free_port()}")
    bus.wait_workers("membership", 2)

    def verdicts() -> dict[str, Any] | None:
        return bus.answer("membership", "verdicts")

    before = wait_until(verdicts, timeout=20)
    procs = {"membership1": first, "membership2": second}
    bus.kill(procs[before["instance"]], signal.SIGKILL)
    after = wait_until(lambda: (v := verdicts()) and v["instance"] != before["instance"] and v, timeout=20)
    assert after["term"] > before["term"]
