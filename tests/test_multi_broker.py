"""Several brokers and several instances of a service: endpoint lists, events
delivered once and in order, balancer leases across instances, and real
processes on three brokers (one of them killed under select load)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phantom_bus import config, protocol
from phantom_bus.client import AsyncClient, Client
from phantom_bus.config import ConfigError
from phantom_bus.errors import PhantomError
from phantom_bus.events import Deduplicator
from phantom_bus.shardmap import Keyspace, Replica, Shard, ShardMap
from services.balancer.service import RELEASE_FORWARD, BalancerService
from tests.conftest import Bus, free_port, wait_until
from tests.procs import BrokeredLoad

# --- endpoint lists ----------------------------------------------------------------------


def test_endpoint_settings_take_a_comma_separated_list_or_a_toml_array() -> None:
    cfg = config.load(env={"PHANTOM_BROKER": " tcp://10.0.0.1:5555 , tcp://10.0.0.2:5555"}, names=["broker"])
    assert cfg.broker == "tcp://10.0.0.1:5555,tcp://10.0.0.2:5555"
    assert cfg.endpoints("broker") == ["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"]
    assert config.parse_endpoints(["tcp://a:1", "ipc:///tmp/x"]) == "tcp://a:1,ipc:///tmp/x"
    # A single endpoint reads exactly as before.
    assert config.load(env={}, names=["backend"]).backend == "tcp://127.0.0.1:5556"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("tcp://a:1,,tcp://b:2", "entry 2 of the list is empty"),
        ("tcp://a:1,tcp://a:1", "tcp://a:1 is listed twice"),
        ("tcp://a:1,b:2", "entry 2 ('b:2')"),
        ("tcp://a:1,tcp://b:99999", "port in 1..65535"),
        ("", "entry 1 of the list is empty"),
    ],
)
def test_a_bad_entry_in_an_endpoint_list_is_refused_naming_it(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(env={"PHANTOM_EVENTS_OUT": value}, names=["events_out"])
    assert "events_out" in str(err.value) and says in str(err.value)


def test_a_process_that_binds_refuses_a_list() -> None:
    cfg = config.load(env={"PHANTOM_HEARTBEAT": "tcp://127.0.0.1:1,tcp://127.0.0.1:2"}, names=["heartbeat"])
    with pytest.raises(ConfigError, match=r"lists 2 endpoints.*takes its own one endpoint"):
        cfg.bind("heartbeat")
    assert config.load(env={}, names=["heartbeat", "bind_host"]).bind("heartbeat") == "tcp://127.0.0.1:5561"


def test_discovery_and_membership_refuse_a_list_to_bind_at_start() -> None:
    from services.discovery.service import Discovery
    from services.membership.service import MembershipService

    env = {"PHANTOM_BEACON": "tcp://127.0.0.1:1,tcp://127.0.0.1:2", "PHANTOM_HEARTBEAT": "tcp://127.0.0.1:3,tcp://127.0.0.1:4"}
    cfg = config.load(env=env)
    with pytest.raises(ConfigError, match="'beacon' lists 2 endpoints"):
        Discovery(cfg)
    with pytest.raises(ConfigError, match="'heartbeat' lists 2 endpoints"):
        MembershipService(cfg)


def test_a_client_refuses_a_malformed_broker_list_at_once() -> None:
    with pytest.raises(ValueError, match="bad broker endpoint"):
        Client("tcp://127.0.0.1:1,nonsense", routing="broker")


# --- events: once and in per-origin order ----------------------------------------------------


def event(origin: str, seq: int, kind: str = "x.y") -> dict[str, Any]:
    frames = protocol.encode_event(kind, {"n": seq}, source="svc", ts=time.time(), origin=origin, seq=seq)
    return protocol.decode_event(frames)


def test_the_envelope_carries_origin_and_sequence_that_no_field_can_mask() -> None:
    frames = protocol.encode_event("x.y", {"origin": "forged", "seq": 0}, source="svc", ts=time.time(),
                                   origin="o1", seq=7)
    doc = protocol.decode_event(frames)
    assert (doc["origin"], doc["seq"], doc["service"]) == ("o1", 7, "svc")


def test_copies_from_three_brokers_are_delivered_once_in_order() -> None:
    dedupe = Deduplicator()
    delivered = []
    for seq in range(1, 6):
        for _broker in range(3):
            ev = event("o1", seq)
            if dedupe.accept(ev):
                delivered.append(ev["seq"])
    assert delivered == [1, 2, 3, 4, 5]
    assert dedupe.counters["duplicates"] == 10 and dedupe.counters["gaps"] == 0


def test_a_late_copy_after_a_newer_event_is_dropped_and_the_gap_counted() -> None:
    dedupe = Deduplicator()
    assert dedupe.accept(event("o1", 1))
    assert dedupe.accept(event("o1", 3))  # broker A lost 2; broker B's 2 arrives after
    assert not dedupe.accept(event("o1", 2))
    assert dedupe.counters["gaps"] == 1
    # Origins are independent; an event without origin/seq (an older publisher) always passes.
    assert dedupe.accept(event("o2", 1))
    assert dedupe.accept({"kind": "x.y"}) and dedupe.accept({"kind": "x.y"})
    assert dedupe.counters["unnumbered"] == 2


def test_the_least_recently_heard_origin_is_forgotten_beyond_the_bound() -> None:
    dedupe = Deduplicator(max_origins=2)
    for origin in ("a", "b"):
        assert dedupe.accept(event(origin, 1))
    assert not dedupe.accept(event("a", 1))  # touches a: b is now the oldest
    assert dedupe.accept(event("c", 1))
    assert dedupe.origins() == 2
    assert not dedupe.accept(event("a", 1))  # a is still remembered
    assert dedupe.accept(event("b", 1))  # b was forgotten: a new stream to us


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_interleaving_of_lossy_broker_streams_delivers_each_event_at_most_once_in_order(data: Any) -> None:
    origins = ["o1", "o2"]
    streams = []
    for _ in range(data.draw(st.integers(1, 3), label="brokers")):
        for origin in origins:
            kept = data.draw(st.lists(st.booleans(), min_size=20, max_size=20), label="kept")
            streams.append([event(origin, seq) for seq, keep in enumerate(kept, 1) if keep])
    dedupe = Deduplicator()
    delivered: dict[str, list[int]] = {o: [] for o in origins}
    rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    while any(streams):
        stream = rng.choice([s for s in streams if s])
        ev = stream.pop(0)  # each broker relays one publisher's events in order
        if dedupe.accept(ev):
            delivered[ev["origin"]].append(ev["seq"])
    for seqs in delivered.values():
        assert seqs == sorted(set(seqs))


# --- balancer leases across instances -----------------------------------------------------------


def balancer(seed: int) -> BalancerService:
    svc = BalancerService(config.load(env={"PHANTOM_SECURITY": "off"}, names=[*config.SETTINGS]), seed=seed)
    for node in ("n0", "n1", "n2"):
        svc.core.node_update(node, state="alive", lifecycle="active", address=f"10.0.0.1:{node[-1]}",
                             now=time.monotonic())
    shards = tuple(
        Shard(f"h/{i}", (Replica(f"n{i % 3}", "primary"), Replica(f"n{(i + 1) % 3}", "replica")),
              slots=((i * 8, (i + 1) * 8),))
        for i in range(8)
    )
    svc.map = ShardMap(1, (Keyspace("default", "hash", 2, shards, 64),))
    return svc


def in_flight(svc: BalancerService) -> int:
    return int(svc.core.stats(time.monotonic())["totals"]["in_flight"])


def test_a_restart_given_the_same_seed_issues_lease_ids_of_its_own() -> None:
    before, after = balancer(5), balancer(5)
    assert before.op_select("user:1")["lease"] != after.op_select("user:1")["lease"]


def test_a_release_that_reaches_another_balancer_instance_ends_the_lease_where_it_was_issued() -> None:
    a, b = balancer(1), balancer(2)
    bus: list[tuple[str, dict[str, Any]]] = []

    async def publish(kind: str, data: dict[str, Any] | None = None) -> None:
        bus.append((kind, data or {}))

    a.service.publish = b.service.publish = publish  # type: ignore[method-assign]

    async def scenario() -> None:
        own = b.op_select("user:1")  # b has issued a lease too: it knows its own prefix
        sel = a.op_select("user:7")
        assert in_flight(a) == 1 and in_flight(b) == 1
        answer = await b.op_release(sel["lease"], latency_ms=3.0, ok=True)
        assert answer == {"released": sel["lease"], "status": "unknown"}
        assert in_flight(b) == 1  # b's own lease is untouched
        ((kind, data),) = bus
        assert kind == RELEASE_FORWARD
        forwarded = {**data, "kind": kind}
        await b.on_release_forwarded(forwarded)  # every instance hears it; only the issuer acts
        await a.on_release_forwarded(forwarded)
        assert in_flight(a) == 0 and in_flight(b) == 1
        node = a.core.stats(time.monotonic())["nodes"][sel["node"]]
        assert node["successes"] == 1 and node["latency_ms"]["samples"] == 1
        # A repeat changes nothing; b's own lease still releases locally.
        await a.on_release_forwarded(forwarded)
        assert a.core.stats(time.monotonic())["nodes"][sel["node"]]["successes"] == 1
        assert (await b.op_release(own["lease"]))["status"] == "released"
        assert len(bus) == 1

    asyncio.run(scenario())


def test_releases_of_a_lost_instances_leases_end_nowhere_and_harm_nothing() -> None:
    survivor = balancer(4)
    orphan = balancer(3).op_select("user:9")["lease"]  # that instance is gone with its leases
    published: list[str] = []

    async def publish(kind: str, data: dict[str, Any] | None = None) -> None:
        published.append(kind)

    survivor.service.publish = publish  # type: ignore[method-assign]

    async def scenario() -> None:
        mine = survivor.op_select("user:9")
        answer = await survivor.op_release(orphan, latency_ms=1.0)
        assert answer["status"] == "unknown" and published == [RELEASE_FORWARD]
        await survivor.on_release_forwarded({"kind": RELEASE_FORWARD, "lease": orphan, "latency_ms": 1.0})
        assert in_flight(survivor) == 1  # its own lease, exact
        assert (await survivor.op_release(mine["lease"]))["status"] == "released"
        assert in_flight(survivor) == 0

    asyncio.run(scenario())


# --- real processes on three brokers --------------------------------------------------------------

BROKERS = ("b1", "b2", "b3")
TTL = 2.0


class Cluster:
    """Three brokers; every service registered with all of them (two instances of
    discovery, membership and balancer), three agents beaconing and heartbeating
    both of each."""

    def __init__(self, tmp: Path) -> None:
        self.bus = bus = Bus(tmp)
        self.ports = {b: {k: free_port() for k in ("broker", "backend", "events_in", "events_out")} for b in BROKERS}
        for key in ("broker", "backend", "events_in", "events_out"):
            bus.env[f"PHANTOM_{key.upper()}"] = ",".join(self.endpoint(b, key) for b in BROKERS)
        self.heartbeats = {"m1": bus.env["PHANTOM_HEARTBEAT"], "m2": f"tcp://127.0.0.1:{free_port()}"}
        self.beacons = {"d1": bus.env["PHANTOM_BEACON"], "d2": f"tcp://127.0.0.1:{free_port()}"}
        bus.env.update({"PHANTOM_COPY_TIME": "0.1", "PHANTOM_LEADER_TTL": str(TTL),
                        "PHANTOM_DEAD_DELAY": "600"})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def endpoint(self, broker: str, key: str = "broker") -> str:
        return f"tcp://127.0.0.1:{self.ports[broker][key]}"

    def start(self) -> None:
        bus = self.bus
        for b in BROKERS:
            own = {f"PHANTOM_{k.upper()}": self.endpoint(b, k) for k in self.ports[b]}
            self.procs[b] = bus.start("phantom_bus.broker", name=b, PHANTOM_INSTANCE=b, **own)
        for name in ("sharding", "manager"):
            self.procs[name] = bus.start(f"services.{name}", PHANTOM_INSTANCE=name)
        for d, endpoint in self.beacons.items():
            self.procs[d] = bus.start("services.discovery", name=d, PHANTOM_INSTANCE=d, PHANTOM_BEACON=endpoint)
        for m, endpoint in self.heartbeats.items():
            self.procs[m] = bus.start("services.membership", name=m, PHANTOM_INSTANCE=m, PHANTOM_HEARTBEAT=endpoint)
        for i in (1, 2):
            self.procs[f"bal{i}"] = bus.start("services.balancer", name=f"bal{i}", PHANTOM_INSTANCE=f"bal{i}")
        self.procs["echo"] = bus.start("services.echo", "--name", "echo", name="echo")
        self.procs["listener"] = bus.start("services.echo", "--name", "listener", "--subscribe", "test.",
                                           name="listener")
        heartbeat, beacon = ",".join(self.heartbeats.values()), ",".join(self.beacons.values())
        for n in (1, 2, 3):
            self.procs[f"node-{n}"] = bus.agent(n, "--heartbeat", heartbeat, "--beacon", beacon)
        wait_until(lambda: self.status().get("health") == "green", timeout=120, interval=0.3)

    def status(self) -> dict[str, Any]:
        try:
            with self.bus.client(timeout=2.0, retries=1) as c:
                return c.status()
        except PhantomError:
            return {}


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("three"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.bus.close()


def by_instance(c: Client, service: str, op: str, want: int, **args: Any) -> dict[str, Any]:
    """Ask ``service`` until ``want`` different instances answered (the broker takes turns)."""
    seen: dict[str, Any] = {}
    for _ in range(40):
        doc = c.request(service, op, **args)
        seen[doc["instance"]] = doc
        if len(seen) == want:
            break
    return seen


pytestmark_processes = pytest.mark.processes


@pytestmark_processes
def test_every_service_registers_with_every_broker_under_its_instance_name(three: Cluster) -> None:
    for b in BROKERS:
        with Client(three.endpoint(b), timeout=2.0, routing="broker") as c:
            services = c.services()
        instances = {name: sorted(i["instance"] for i in doc["instances"]) for name, doc in services.items()}
        assert instances["balancer"] == ["bal1", "bal2"] and instances["membership"] == ["m1", "m2"]
        assert instances["discovery"] == ["d1", "d2"]
        assert {"sharding", "manager", "echo", "listener"} <= set(instances)
    with three.bus.client() as c:
        pings = c.brokers()
    assert [p and p["instance"] for p in pings.values()] == list(BROKERS)


@pytestmark_processes
def test_a_client_whose_broker_list_has_a_dead_entry_starts_and_works(three: Cluster) -> None:
    listed = ",".join([f"tcp://127.0.0.1:{free_port()}", three.bus.env["PHANTOM_BROKER"]])
    events = ",".join([f"tcp://127.0.0.1:{free_port()}", three.bus.env["PHANTOM_EVENTS_OUT"]])
    started = time.monotonic()
    with Client(listed, timeout=2.0, routing="broker") as c:
        sel = c.select("user:1", write=True)
        assert sel.role == "primary"
        c.release(sel, latency_ms=1.0)
    with Client(listed, timeout=2.0, events=events) as c:  # local routing: the map read and events
        assert c.select("user:2").source == "local" and c.map_epoch is not None
    assert time.monotonic() - started < 10.0  # never a whole call budget lost to the dead entry

    async def asynchronous() -> str:
        async with AsyncClient(listed, timeout=2.0, routing="broker") as ac:
            return (await ac.select("user:3")).node

    assert asyncio.run(asynchronous()).startswith("node-")


@pytestmark_processes
def test_every_discovery_instance_watches_every_agent(three: Cluster) -> None:
    with three.bus.client() as c:
        stats = by_instance(c, "discovery", "stats", 2)
    assert {name: doc["alive"] for name, doc in stats.items()} == {"d1": 3, "d2": 3}


@pytestmark_processes
def test_events_published_to_three_brokers_are_delivered_once_in_order(three: Cluster) -> None:
    with three.bus.client() as c:
        for i in range(30):
            c.request("echo", "publish", kind="test.once", data={"i": i})

        def received() -> list[int]:
            return [e["i"] for e in c.request("listener", "events") if e["kind"] == "test.once"]

        wait_until(lambda: len(received()) >= 30, timeout=15)
        time.sleep(0.5)  # any late copy would have arrived by now
        got = received()
    assert got == list(range(30))


def member_events(three: Cluster, halt: threading.Event, out: list[dict[str, Any]]) -> None:
    import zmq

    from phantom_bus import security

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"member.")
    security.current().connect(sock, three.bus.env["PHANTOM_EVENTS_OUT"])
    dedupe = Deduplicator()
    try:
        while not halt.is_set():
            if sock.poll(100):
                ev = protocol.decode_event(sock.recv_multipart())
                if ev["kind"] != "member.load" and dedupe.accept(ev):
                    out.append(ev)
    finally:
        sock.close(0)


@pytestmark_processes
def test_a_membership_follower_takes_over_warm_and_suspects_nobody(three: Cluster) -> None:
    def verdicts() -> dict[str, Any] | None:
        return three.bus.answer("membership", "verdicts")

    before = wait_until(verdicts, timeout=20)
    # (The follower cannot be asked through the brokers: they hand a led service's
    # requests to its leader. Its warm detector shows in what follows: a cold one would
    # suspect every agent within about 1.3 s of taking over.)
    halt, seen = threading.Event(), []
    watcher = threading.Thread(target=member_events, args=(three, halt, seen), daemon=True)
    watcher.start()
    try:
        time.sleep(0.3)
        three.bus.kill(three.procs[before["instance"]], signal.SIGKILL)
        after = wait_until(lambda: (v := verdicts()) and v["instance"] != before["instance"] and v, timeout=20)
        time.sleep(3.0)  # a cold detector would suspect within about 1.3 s of taking over
    finally:
        halt.set()
        watcher.join(5)
    assert after["term"] > before["term"]
    assert {m["id"]: m["state"] for m in after["members"]} == {f"node-{n}": "alive" for n in (1, 2, 3)}
    assert [e for e in seen if e["kind"] in ("member.suspect", "member.dead")] == []


class AsyncLoad(BrokeredLoad):
    """The same from many tasks sharing one AsyncClient."""

    def run(self) -> None:
        async def worker(c: AsyncClient, n: int) -> None:
            i = 0
            while not self.halt.is_set():
                i += 1
                try:
                    started = time.monotonic()
                    sel = await c.select(f"user:{n}:{i % 50}")
                    self.slow += time.monotonic() - started >= self.attempt_timeout
                    await c.release(sel, latency_ms=1.0)
                    self.ok += 1
                except Exception as exc:  # every failure is the finding
                    self.errors.append(repr(exc))
                await asyncio.sleep(0.005)

        async def main() -> None:
            async with AsyncClient(self.endpoint, timeout=self.attempt_timeout, retries=3, routing="broker") as c:
                await asyncio.gather(*(worker(c, n) for n in range(8)))
                self.brokers[c.preferred] += 1

        asyncio.run(main())


@pytestmark_processes
def test_killing_one_of_three_brokers_under_select_load_fails_no_operation(three: Cluster) -> None:
    loads = [BrokeredLoad(three.bus.env["PHANTOM_BROKER"]) for _ in range(3)]
    loads.append(AsyncLoad(three.bus.env["PHANTOM_BROKER"]))
    for load in loads:
        load.start()
    try:
        wait_until(lambda: all(load.ok >= 50 for load in loads), timeout=30)
        # Every client prefers the first broker until it fails: kill that one.
        three.bus.kill(three.procs["b1"], signal.SIGKILL)
        counts = [load.ok for load in loads]
        wait_until(lambda: all(load.ok >= n + 100 for load, n in zip(loads, counts, strict=True)), timeout=30)
        # Then freeze the next one (a hung host): its connections stop answering pings.
        three.bus.kill(three.procs["b2"], signal.SIGSTOP)
        counts = [load.ok for load in loads]
        wait_until(lambda: all(load.ok >= n + 100 for load, n in zip(loads, counts, strict=True)), timeout=30)
    finally:
        for load in loads:
            load.halt.set()
        for load in loads:
            load.join(20)
    assert [load.errors for load in loads] == [[]] * len(loads)
    assert all(load.brokers[2] > 0 for load in loads)
    # Releases that reached the other balancer instance were passed on: the leases end
    # where they were issued. Only a select whose reply was lost (retried elsewhere, so
    # its first lease is never released) may stay open, until it expires: at most one per
    # caller (3 threads, 8 tasks) for each of the two brokers lost, plus one for each
    # select slow enough to have given up on an attempt. b2 stays frozen until the end
    # (the fixture thaws it and stops everything), so what it still queues opens no lease.
    with three.bus.client() as c:
        stats = by_instance(c, "balancer", "stats", 2)
    assert set(stats) == {"bal1", "bal2"}
    left_open = sum(int(doc["totals"]["in_flight"]) for doc in stats.values())
    slow = sum(load.slow for load in loads)
    assert left_open <= 2 * (3 + 8) + slow, ({name: doc["totals"] for name, doc in stats.items()}, slow)
    assert sum(doc["forwarding"]["forwarded_ended"] for doc in stats.values()) > 0
    print(f"longest gap between selects {max(load.longest_gap for load in loads):.3f} s; "
          f"leases left open {left_open} ({slow} slow selects); forwarded releases ended "
          f"{sum(doc['forwarding']['forwarded_ended'] for doc in stats.values())}")


@pytestmark_processes
def test_with_security_on_two_brokers_serve_register_and_relay_events_once(bus: Bus) -> None:
    from phantom_bus import security as secmod
    from phantom_bus.security import Security

    keys = bus.tmp / "keys"
    secmod.keygen(keys, services=(*secmod.DEFAULT_SERVICES, "echo", "listener"))
    bus.env.update({"PHANTOM_CURVE_DIR": str(keys), "PHANTOM_SECURITY": "on"})
    ports = [{k: free_port() for k in ("broker", "backend", "events_in", "events_out")} for _ in range(2)]
    for key in ("broker", "backend", "events_in", "events_out"):
        bus.env[f"PHANTOM_{key.upper()}"] = ",".join(f"tcp://127.0.0.1:{p[key]}" for p in ports)
    brokers = [
        bus.start("phantom_bus.broker", name=f"b{i}", PHANTOM_INSTANCE=f"b{i}",
                  **{f"PHANTOM_{k.upper()}": f"tcp://127.0.0.1:{v}" for k, v in p.items()})
        for i, p in enumerate(ports, 1)
    ]
    bus.start("services.echo", "--name", "echo", name="echo")
    bus.start("services.echo", "--name", "listener", "--subscribe", "test.", name="listener")
    admin = Security.load(keys, "operator/admin")
    for p in ports:  # each broker has both workers
        with Client(f"tcp://127.0.0.1:{p['broker']}", timeout=1.0, retries=1, security=admin,
                    routing="broker") as one:
            wait_until(lambda c=one: {"echo", "listener"} <= set(_services(c)), timeout=20)
    with Client(bus.endpoint, timeout=2.0, retries=3, security=admin, routing="broker") as c:

        def received(kind: str) -> list[dict[str, Any]]:
            return [e for e in c.request("listener", "events") if e["kind"] == kind]

        # PUB/SUB drops what is published before a subscription has travelled back to the
        # publisher (two CURVE hops per broker here). Both brokers' paths start together: once
        # a probe gets through one, give the other as long again before counting.
        started = time.monotonic()
        while not received("test.probe"):
            assert time.monotonic() - started < 30, "no event reached the listener within 30 s"
            c.request("echo", "publish", kind="test.probe", data={})
            time.sleep(0.2)
        time.sleep(max(1.0, time.monotonic() - started))
        for i in range(10):
            c.request("echo", "publish", kind="test.secure", data={"i": i})
        wait_until(lambda: len(received("test.secure")) >= 10, timeout=15)
        time.sleep(0.3)
        assert [e["i"] for e in received("test.secure")] == list(range(10))
        bus.kill(brokers[c.preferred], signal.SIGKILL)
        assert c.request("echo", "echo", after="kill") == {"after": "kill"}


def _services(c: Client) -> dict[str, Any]:
    try:
        return c.services()
    except PhantomError:
        return {}
