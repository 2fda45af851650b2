"""Bus security: keys and their layout, who speaks for a node, the fail-closed ZAP handler,
and real processes with security on (refusals, impostors, key rotation) and off."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from phantom_bus import config, protocol
from phantom_bus import security as secmod
from phantom_bus.client import Client
from phantom_bus.errors import BrokerUnreachable, PhantomError, Refused
from phantom_bus.security import Principal, Security
from services.discovery.beacon import Beacon, encode_beacon, new_instance_id
from tests.conftest import ROOT, Bus, free_port, phantom, wait_until

# --- keys and their layout (no sockets) -----------------------------------------------------


def test_keygen_makes_a_secret_pair_per_identity_and_authorizes_its_public_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    report = secmod.keygen(keys, agents=["node-1", "node-2"])
    made = {p.ref for p, what in report if what == "created"}
    assert made == {
        "broker/broker", "service/discovery", "service/membership", "service/sharding", "service/balancer",
        "service/manager", "agent/node-1", "agent/node-2", "operator/admin", "client/app",
    }  # fmt: skip
    secret = keys / "agent" / "node-1.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / "agent").stat().st_mode) & 0o077 == 0
    public, private = secmod.read_key_file(secret)
    assert private is not None and len(private) == 40
    authorized, none = secmod.read_key_file(keys / "authorized" / "agent" / "node-1.pub")
    assert authorized == public and none is None
    # The standard ZeroMQ certificate format: pyzmq's own reader agrees.
    import zmq.auth

    assert zmq.auth.load_certificate(secret) == (public, private)


def test_keygen_is_idempotent_and_replaces_secrets_only_with_force(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secmod.keygen(keys, agents=["node-1"])
    before = secmod.read_key_file(keys / "agent" / "node-1.key")
    again = dict((p.ref, what) for p, what in secmod.keygen(keys, agents=["node-1", "node-2"]))
    assert again["agent/node-1"] == "kept" and again["agent/node-2"] == "created"
    assert secmod.read_key_file(keys / "agent" / "node-1.key") == before
    forced = dict((p.ref, what) for p, what in secmod.keygen(keys, agents=["node-1"], force=True))
    assert forced["agent/node-1"] == "replaced"
    after = secmod.read_key_file(keys / "agent" / "node-1.key")
    assert after != before
    assert secmod.read_key_file(keys / "authorized" / "agent" / "node-1.pub")[0] == after[0]


def test_keygen_refuses_names_that_could_escape_the_directory(tmp_path: Path) -> None:
    for bad in ("../evil", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            secmod.keygen(tmp_path / "keys", agents=[bad])


def test_key_store_takes_identity_from_the_path_and_leaves_out_what_it_cannot_trust(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secmod.keygen(keys, agents=["node-1", "node-2"])
    authorized = keys / "authorized"
    (authorized / "agent" / "garbage.pub").write_text("not a key\n")
    (authorized / "agent" / ".node-3.pub.tmp").write_text("half written")
    # One key filed under two identities: which one is it? Neither.
    shutil.copy(authorized / "agent" / "node-2.pub", authorized / "operator" / "sneaky.pub")
    store = secmod.KeyStore.load(authorized)
    assert "agent:node-1" in store.users
    assert "agent:node-2" not in store.users and "operator:sneaky" not in store.users
    assert "agent:garbage" not in store.users
    assert len(store.problems) == 2
    node1 = secmod.read_key_file(keys / "agent" / "node-1.key")[0]
    assert store.lookup(node1) == Principal("agent", "node-1")
    assert store.lookup(zmq.utils.z85.decode(node1)) == Principal("agent", "node-1")


def test_security_off_is_a_no_op_and_on_needs_its_key(tmp_path: Path) -> None:
    off = Security.from_config({"security": "off", "curve_dir": ""}, "client/app")
    assert not off.enabled and off.knows(None) and "security off (security = off)" in off.describe()
    with pytest.raises(secmod.SecurityError, match="not a directory"):
        Security.from_config({"security": "on", "curve_dir": str(tmp_path / "missing")}, "client/app")
    keys = tmp_path / "keys"
    secmod.keygen(keys)
    with pytest.raises(secmod.SecurityError, match=r"agent/node-9\.key"):
        Security.load(keys, "agent/node-9")
    by_path = Security.load(keys, str(keys / "operator" / "admin.key"))
    assert by_path.me == Principal("operator", "admin")
    with pytest.raises(secmod.SecurityError, match="bad curve_key"):
        Security.load(keys, "wizard/merlin")


def _cfg(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"security": "on", "curve_dir": "", "curve_key": "", "data": str(tmp_path / "var"), **values}


def test_security_is_on_by_default_and_a_server_without_keys_refuses_to_start(tmp_path: Path) -> None:
    assert config.load(env={}, names=("security",)).security == "on"
    assert config.load(env={"PHANTOM_SECURITY": "OFF"}, names=("security",)).security == "off"
    with pytest.raises(config.ConfigError, match="'security'"):
        config.load(env={"PHANTOM_SECURITY": "maybe"}, names=("security",))
    for key in ("broker/broker", "service/sharding", "agent/node-1"):
        with pytest.raises(secmod.SecurityError, match="PHANTOM_SECURITY=off"):
            Security.from_config(_cfg(tmp_path), key)
    # A client finds none and goes without (the broker tells it if CURVE is wanted).
    client = Security.from_config(_cfg(tmp_path), "client/app")
    assert not client.enabled and "no keys found" in client.describe()


def test_keys_under_the_data_directory_are_found_and_off_needs_saying_so(tmp_path: Path) -> None:
    keys = tmp_path / "var" / "keys"
    secmod.keygen(keys, agents=["node-1"])
    for key in ("broker/broker", "service/sharding", "agent/node-1", "operator/admin", "client/app"):
        found = Security.from_config(_cfg(tmp_path), key)
        assert found.enabled and found.directory == keys and str(found.me) == key.replace("/", ":")
        assert "security on" in found.describe()
    off = Security.from_config(_cfg(tmp_path, security="off"), "broker/broker")
    assert not off.enabled and "security = off" in off.describe()
    other = tmp_path / "elsewhere"
    secmod.keygen(other)
    assert Security.from_config(_cfg(tmp_path, curve_dir=str(other)), "service/manager").directory == other


def test_a_new_agent_enrols_itself_only_in_the_data_directorys_keys(tmp_path: Path) -> None:
    keys = tmp_path / "var" / "keys"
    secmod.keygen(keys)
    agent = Security.from_config(_cfg(tmp_path), "agent/node-4")
    assert agent.enabled and str(agent.me) == "agent:node-4"
    assert (keys / "agent" / "node-4.key").stat().st_mode & 0o777 == 0o600
    assert secmod.KeyStore.load(keys / "authorized").lookup(agent.keys.public) == Principal("agent", "node-4")
    # The production layout (an explicit curve_dir) makes nothing.
    with pytest.raises(secmod.SecurityError, match=r"node-5\.key"):
        Security.from_config(_cfg(tmp_path, curve_dir=str(keys)), "agent/node-5")
    assert not (keys / "agent" / "node-5.key").exists()


def test_curve_dir_comes_from_the_environment_or_the_security_section(tmp_path: Path) -> None:
    assert config.load(env={"PHANTOM_CURVE_DIR": "/k"}, names=("curve_dir",)).curve_dir == "/k"
    path = tmp_path / "phantom.toml"
    path.write_text('[security]\ncurve_dir = "/etc/phantom/keys"\ncurve_key = "agent/node-1"\n')
    cfg = config.load(env={"PHANTOM_CONFIG": str(path)}, names=("curve_dir", "curve_key"))
    assert (cfg.curve_dir, cfg.curve_key) == ("/etc/phantom/keys", "agent/node-1")
    path.write_text('curve_dir = "/a"\n[security]\ncurve_dir = "/b"\n')
    with pytest.raises(config.ConfigError, match="keep one"):
        config.load(env={"PHANTOM_CONFIG": str(path)}, names=("curve_dir",))


def test_keys_reload_when_the_authorized_directory_changes(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secmod.keygen(keys)
    sec = Security.load(keys, "broker/broker")
    assert not sec.knows("client:app2")
    assert not sec.reload(force=False)  # nothing changed
    secmod.keygen(keys, clients=["app2"])
    assert sec.reload(force=False) and sec.knows("client:app2")
    (keys / "authorized" / "client" / "app2.pub").unlink()
    assert sec.reload(force=False) and not sec.knows("client:app2")


# --- who may do what ---------------------------------------------------------------------------


def test_only_a_nodes_own_agent_key_speaks_for_it() -> None:
    assert secmod.speaks_for("agent:node-1", "node-1")
    assert not secmod.speaks_for("agent:node-1", "node-2")
    assert not secmod.speaks_for("operator:node-1", "node-1")
    assert not secmod.speaks_for(None, "node-1")


def test_route_carries_the_caller_and_stays_as_before_without_one() -> None:
    identity = b"\x00\x8bEg\x01"
    assert protocol.make_route(identity, True) == b"\x01" + identity
    route = protocol.make_route(identity, True, b"client:app")
    assert protocol.split_route(route) == (identity, True)
    assert protocol.route_caller(route) == b"client:app"
    assert protocol.route_caller(protocol.make_route(identity, False)) == b""
    with pytest.raises(PhantomError):
        protocol.split_route(b"\x02\x40short")


# --- the ZAP handler ----------------------------------------------------------------------------------


def _zap(domain: str, key: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"7", domain.encode(), b"127.0.0.1", b"", mechanism, zmq.utils.z85.decode(key)]


def test_zap_handler_admits_authorized_keys_by_domain_and_refuses_everything_else(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secmod.keygen(keys, agents=["node-1"])
    sec = Security.load(keys, "broker/broker")
    handler = secmod.ZapHandler(zmq.Context.instance(), sec)
    agent = secmod.read_key_file(keys / "agent" / "node-1.key")[0]
    client = secmod.read_key_file(keys / "client" / "app.key")[0]
    stranger = zmq.curve_keypair()[0]
    ok = handler.answer(_zap(secmod.DOMAIN_HEARTBEAT, agent))
    assert ok[2] == b"200" and ok[4] == b"agent:node-1"
    assert handler.answer(_zap(secmod.DOMAIN_FRONTEND, client))[4] == b"client:app"
    refusals = [
        _zap(secmod.DOMAIN_FRONTEND, stranger),
        _zap(secmod.DOMAIN_HEARTBEAT, client),  # a client may not heartbeat
        _zap(secmod.DOMAIN_BACKEND, client),  # nor serve requests
        _zap(secmod.DOMAIN_EVENTS_IN, agent),  # nor may an agent publish events
        _zap("some.other.domain", client),
        _zap(secmod.DOMAIN_FRONTEND, client, mechanism=b"NULL")[:6],
        [b"1.0", b"7"],
    ]
    for request in refusals:
        reply = handler.answer(request)
        assert reply[2] == b"400" and reply[4] == b"", request
    assert handler.counters == {"allowed": 2, "denied": len(refusals)}


def _curve_pair(server_sec: Security | None, keys: Path, enforce_only: bool = False) -> tuple[Any, Any, Any]:
    """A CURVE ROUTER server (domain frontend) and a DEALER client with the client/app key."""
    ctx: zmq.Context[Any] = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    broker = Security.load(keys, "broker/broker")
    assert broker.keys is not None
    if enforce_only:  # the same options as Security.server, but nobody answers ZAP
        server.setsockopt(zmq.CURVE_SERVER, 1)
        server.setsockopt(zmq.CURVE_SECRETKEY, broker.keys.secret)
        server.setsockopt(zmq.ZAP_DOMAIN, secmod.DOMAIN_FRONTEND.encode())
        server.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    else:
        assert server_sec is not None
        server_sec.server(server, secmod.DOMAIN_FRONTEND)
    port = free_port()
    server.bind(f"tcp://127.0.0.1:{port}")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    Security.load(keys, "client/app").client(client)
    client.connect(f"tcp://127.0.0.1:{port}")
    return ctx, server, client


def test_a_curve_server_without_a_zap_handler_refuses_everyone(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secmod.keygen(keys)
    ctx, server, client = _curve_pair(None, keys, enforce_only=True)
    try:
        client.send(b"hello")
        assert not server.poll(1000), "libzmq let a client in with no ZAP handler answering"
    finally:
        server.close(0)
        client.close(0)
        ctx.term()


def test_the_zap_handler_stamps_the_user_id_and_a_stopped_handler_refuses(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secmod.keygen(keys)
    sec = Security.load(keys, "broker/broker")
    ctx, server, client = _curve_pair(sec, keys)
    try:
        client.send(b"hello")
        assert server.poll(3000)
        from phantom_bus.wire import recv_frames_as

        frames, user = recv_frames_as(server)
        assert frames[1:] == [b"hello"] and user == "client:app"
        sec.close()  # the handler is gone: a new connection must be refused, not waved through
        late = ctx.socket(zmq.DEALER)
        late.setsockopt(zmq.LINGER, 0)
        Security.load(keys, "client/app").client(late)
        late.connect(server.getsockopt_string(zmq.LAST_ENDPOINT))
        late.send(b"after")
        assert not server.poll(1000)
        late.close(0)
    finally:
        sec.close()
        server.close(0)
        client.close(0)
        ctx.term()


# --- real processes, security on -------------------------------------------------------------------------

def secure(bus: Bus, agents: int = 0, **extra: Any) -> Path:
    """Keys for ``bus`` (services, echo, agents node-1..n) and security on for its processes."""
    keys = bus.tmp / "keys"
    services = (*secmod.DEFAULT_SERVICES, "echo")
    secmod.keygen(keys, agents=[f"node-{n}" for n in range(1, agents + 1)], services=services, **extra)
    bus.env["PHANTOM_CURVE_DIR"] = str(keys)
    bus.env["PHANTOM_SECURITY"] = "on"
    return keys


def as_(keys: Path, key: str, bus: Bus, **kw: Any) -> Client:
    kw.setdefault("timeout", 1.0)
    kw.setdefault("retries", 1)
    return Client(bus.endpoint, security=Security.load(keys, key), **kw)


def broker_stats(keys: Path, bus: Bus) -> dict[str, Any]:
    with as_(keys, "operator/admin", bus) as c:
        result: dict[str, Any] = c.request("broker", "stats")
        return result


def wait_echo(keys: Path, bus: Bus, name: str = "echo") -> None:
    def up() -> bool:
        try:
            with as_(keys, "operator/admin", bus, timeout=0.5) as c:
                return bool(c.services().get(name, {}).get("workers"))
        except PhantomError:
            return False

    wait_until(up, timeout=15)


@pytest.fixture
def secured_echo(bus: Bus) -> Iterator[tuple[Bus, Path]]:
    keys = secure(bus)
    bus.broker()
    bus.start("services.echo", "--name", "echo", "--subscribe", "test.", name="echo")
    wait_echo(keys, bus)
    yield bus, keys


@pytest.mark.processes
def test_a_client_without_keys_is_refused_at_the_handshake_and_told_why(secured_echo: tuple[Bus, Path]) -> None:
    bus, keys = secured_echo
    before = broker_stats(keys, bus)["requests"]
    nokeys = Client(bus.endpoint, timeout=0.5, retries=1, security=Security())
    with nokeys as c, pytest.raises(BrokerUnreachable) as info:
        c.request("echo", "echo", text="hi")
    assert "requires CURVE" in str(info.value)
    assert broker_stats(keys, bus)["requests"] == before + 1  # only this stats call got through
    # The CLI without keys says so too, and exits 69.
    env = {k: v for k, v in bus.env.items() if k != "PHANTOM_CURVE_DIR"}
    result = phantom(env, "status")
    assert result.returncode == 69 and "PHANTOM_CURVE_DIR" in result.stderr


@pytest.mark.processes
def test_an_unknown_key_is_refused_and_nothing_it_sends_reaches_a_service(
    secured_echo: tuple[Bus, Path], tmp_path: Path
) -> None:
    bus, keys = secured_echo
    # A well-formed key pair from another key directory, with the right broker key.
    other = tmp_path / "other"
    secmod.keygen(other, services=(), operators=(), clients=["app"])
    shutil.copy(keys / "authorized" / "broker" / "broker.pub", other / "authorized" / "broker" / "broker.pub")
    before = broker_stats(keys, bus)
    with as_(other, "client/app", bus) as c, pytest.raises(Refused) as info:
        c.request("echo", "publish", kind="test.intruder")
    assert "refused our key client:app: it is not among its authorized keys" in str(info.value)
    after = broker_stats(keys, bus)
    assert after["requests"] == before["requests"] + 1  # the stats call itself
    assert after["security"]["denied"] > before["security"]["denied"]
    with as_(keys, "operator/admin", bus) as c:
        assert c.request("echo", "events") == []


@pytest.mark.processes
def test_a_key_of_the_wrong_role_gets_a_clear_refusal_before_the_handler_runs(secured_echo: tuple[Bus, Path]) -> None:
    bus, keys = secured_echo
    with as_(keys, "operator/admin", bus) as op:

        def published(kind: str) -> list[str]:
            op.request("echo", "publish", kind=kind)  # PUB/SUB joins take a moment: until it arrives
            return [e["kind"] for e in op.request("echo", "events") if e["kind"] == kind]

        wait_until(lambda: published("test.warm-up"), timeout=10, interval=0.2)
        with as_(keys, "client/app", bus) as c:
            assert c.request("echo", "ping")["service"] == "echo"  # reads are fine
            with pytest.raises(Refused) as info:
                c.request("echo", "publish", kind="test.by-client")
        assert "role client" in info.value.message and info.value.details["caller"] == "client:app"
        wait_until(lambda: published("test.by-operator"), timeout=10, interval=0.2)
        kinds = [e["kind"] for e in op.request("echo", "events")]
    # Events from one publisher arrive in order: had the refused publish run, it would be here.
    assert "test.by-client" not in kinds and kinds.index("test.by-operator") > kinds.index("test.warm-up")


@pytest.mark.processes
def test_a_service_key_registers_only_under_its_own_name(secured_echo: tuple[Bus, Path]) -> None:
    bus, keys = secured_echo
    impostor = bus.start("services.echo", "--name", "balancer", name="impostor", PHANTOM_CURVE_KEY="service/echo")
    wait_until(lambda: "refused a worker registration" in bus.log(bus.procs[0]), timeout=10)
    with as_(keys, "operator/admin", bus) as c:
        assert "balancer" not in c.services() or not c.services()["balancer"]["workers"]
    assert impostor.poll() is None  # it keeps trying; it is simply never given work


@pytest.mark.processes
def test_keys_added_and_removed_take_effect_without_a_restart(secured_echo: tuple[Bus, Path]) -> None:
    bus, keys = secured_echo
    broker = bus.procs[0]
    secmod.keygen(keys, services=(), operators=(), clients=["app2"])  # a new application server

    def answers() -> bool:
        try:
            with as_(keys, "client/app2", bus, timeout=0.5) as c:
                return bool(c.request("echo", "ping"))
        except PhantomError:
            return False

    wait_until(answers, timeout=10)
    assert "added client:app2" in bus.log(broker)
    # Revocation: an open connection is refused from the next request on, a new one at the handshake.
    with as_(keys, "client/app2", bus) as kept:
        kept.request("echo", "ping")
        (keys / "authorized" / "client" / "app2.pub").unlink()
        os.kill(broker.pid, signal.SIGHUP)  # at once, rather than within a second
        wait_until(lambda: "removed client:app2" in bus.log(broker), timeout=5)
        with pytest.raises(Refused, match="no longer authorized"):
            kept.request("echo", "ping")
    with as_(keys, "client/app2", bus) as fresh, pytest.raises(Refused, match="refused our key"):
        fresh.request("echo", "ping")


@pytest.mark.processes
def test_an_agent_started_before_its_key_is_authorized_joins_once_it_is(bus: Bus) -> None:
    keys = secure(bus, agents=1)
    public = keys / "authorized" / "agent" / "node-1.pub"
    hidden = bus.tmp / "node-1.pub"
    public.rename(hidden)  # the operator has not copied it to the servers yet
    bus.broker()
    discovery = bus.start("services.discovery")
    bus.start("services.membership")
    agent = bus.agent(1)
    wait_until(lambda: "refused a connection to phantom.beacon" in bus.log(discovery), timeout=15)
    hidden.rename(public)  # now it is: no process is restarted
    wait_until(lambda: "added agent:node-1" in bus.log(discovery), timeout=5)

    def alive() -> bool:
        try:
            with as_(keys, "operator/admin", bus) as c:
                return bool(c.request("membership", "member", node="node-1")["state"] == "alive")
        except PhantomError:
            return False

    wait_until(alive, timeout=20)
    # Its requests through the broker (refused at first) get answers too.
    wait_until(lambda: 'no live worker for service "sharding"' in bus.log(agent), timeout=15)
    assert agent.poll() is None


# --- the whole cluster, security on --------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bus, Path]]:
    bus = Bus(tmp_path_factory.mktemp("secured"))
    try:
        # The default set-up, as `make up` makes it: keys under the data directory, made
        # by `make keys`, and nothing else said (no curve_dir, no security setting).
        del bus.env["PHANTOM_SECURITY"]
        made = subprocess.run(
            ["make", "--no-print-directory", "keys", "VENV=" + str(Path(sys.executable).parent.parent)],
            cwd=ROOT, env=bus.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        keys = Path(bus.env["PHANTOM_DATA"]) / "keys"
        assert "made CURVE keys" in made.stdout and (keys / "agent" / "node-3.key").is_file()
        bus.env["PHANTOM_COPY_TIME"] = "0.1"
        bus.broker()
        for name in secmod.DEFAULT_SERVICES:
            bus.start(f"services.{name}")
        for n in (1, 2, 3):
            bus.agent(n)

        def green() -> bool:
            try:
                with as_(keys, "operator/admin", bus, timeout=2.0) as c:
                    return c.status().get("health") == "green"
            except PhantomError:
                return False

        wait_until(green, timeout=60, interval=0.2)
        yield bus, keys
    finally:
        bus.close()



@pytest.mark.processes
def test_secured_cluster_goes_green_and_selects_for_clients(secured_cluster: tuple[Bus, Path]) -> None:
    bus, keys = secured_cluster
    with as_(keys, "client/app", bus) as c:
        sel = c.select("user:42")
        c.release(sel, latency_ms=1.0)
        assert c.select("user:42", write=True).role == "primary"
    result = phantom(bus, "status", "--json")  # the CLI defaults to operator/admin
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["health"] == "green" and {n["id"] for n in doc["nodes"]} == {"node-1", "node-2", "node-3"}
    assert "security on" in bus.log(bus.procs[0])


@pytest.mark.processes
def test_a_client_key_cannot_drain_a_node(secured_cluster: tuple[Bus, Path]) -> None:
    bus, _ = secured_cluster
    result = phantom(bus, "drain", "node-1", PHANTOM_CURVE_KEY="client/app")
    assert result.returncode == 1 and "refused" in result.stderr and "operator" in result.stderr
    nodes = json.loads(phantom(bus, "nodes", "--json").stdout)
    assert {n["id"]: n["lifecycle"] for n in nodes}["node-1"] == "active"


@pytest.mark.processes
def test_an_agent_key_cannot_heartbeat_beacon_or_confirm_as_another_node(secured_cluster: tuple[Bus, Path]) -> None:
    bus, keys = secured_cluster
    node1 = Security.load(keys, "agent/node-1")
    ctx = zmq.Context.instance()
    hb = ctx.socket(zmq.DEALER)
    hb.setsockopt(zmq.LINGER, 0)
    node1.client(hb, secmod.MEMBERSHIP)
    hb.connect(bus.env["PHANTOM_HEARTBEAT"])
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    node1.client(pub, secmod.DISCOVERY)
    pub.connect(bus.env["PHANTOM_BEACON"])
    try:
        body = {"op": "hb", "node": "node-2", "incarnation": 2**62, "seq": 1}
        hb.send_multipart([protocol.HEARTBEAT_HEADER, protocol.pack(body)])
        assert hb.poll(5000)
        _header, ack = hb.recv_multipart()
        reply = protocol.unpack(ack)
        assert reply["ok"] is False and reply["error"]["code"] == "refused"
        beacon = Beacon("node-9", 1, new_instance_id(), "127.0.0.1:7999")
        deadline = time.monotonic() + 5
        with as_(keys, "operator/admin", bus) as c:
            while time.monotonic() < deadline:  # PUB/SUB: the first beacons may precede the subscription
                pub.send_multipart([protocol.BEACON, encode_beacon(beacon)])
                if c.request("discovery", "stats")["dropped"].get("unauthorised"):
                    break
                time.sleep(0.1)
            assert c.request("discovery", "stats")["dropped"]["unauthorised"] >= 1
            assert "node-9" not in {n["id"] for n in c.request("discovery", "nodes")}
            assert c.request("membership", "stats")["refused"] >= 1
            member = c.request("membership", "member", node="node-2")
            assert member["incarnation"] < 2**62  # the forged heartbeat changed nothing
        with as_(keys, "agent/node-1", bus) as agent, pytest.raises(Refused, match="only for node 'node-1'"):
            agent.request("sharding", "confirm", shard="default/0", node="node-2")
    finally:
        hb.close(0)
        pub.close(0)


@pytest.mark.processes
def test_the_default_setup_refuses_rogue_beacons_heartbeats_events_and_workers(
    secured_cluster: tuple[Bus, Path],
) -> None:
    """What any local process could do to a `make up` cluster before security was on by default:
    move node-2 to its address, kill node-3 with one heartbeat, fail node-1 over with one forged
    member.dead, answer selects as a second balancer. With no key, or a key of the wrong role, none
    of it gets through."""
    bus, keys = secured_cluster
    with as_(keys, "operator/admin", bus) as op:
        nodes_before = {n["id"]: n["address"] for n in op.request("discovery", "nodes")}
        incarnations = {m["id"]: m["incarnation"] for m in op.request("membership", "members")}
        balancers = op.services()["balancer"]["workers"]
    impostors = [
        bus.start("services.echo", "--name", "balancer", name="fake-balancer-client", PHANTOM_CURVE_KEY="client/app"),
        bus.start("services.echo", "--name", "balancer", name="fake-balancer-nokey", PHANTOM_SECURITY="off"),
    ]
    ctx = zmq.Context.instance()
    socks: list[Any] = []
    rogues = {"no key": Security(), "client key": Security.load(keys, "client/app")}
    # Numbers an unsecured cluster would take: a little ahead of the real ones.
    beacon = Beacon("node-2", incarnations["node-2"] + 10**6, new_instance_id(), "127.0.0.1:6666", zone="z3")
    heartbeat = {"op": "hb", "node": "node-3", "incarnation": incarnations["node-3"] + 10**6, "seq": 1, "load": None}
    forged = {"node": "node-1", "incarnation": incarnations["node-1"], "reason": "phi", "previous": "suspect"}
    dead = protocol.encode_event("member.dead", forged, source="membership", ts=time.time())
    try:
        for sec in rogues.values():
            for kind, endpoint, server in (
                (zmq.PUB, "PHANTOM_BEACON", secmod.DISCOVERY),
                (zmq.DEALER, "PHANTOM_HEARTBEAT", secmod.MEMBERSHIP),
                (zmq.PUB, "PHANTOM_EVENTS_IN", secmod.BROKER),
            ):
                sock = ctx.socket(kind)
                sock.setsockopt(zmq.LINGER, 0)
                sec.client(sock, server)
                sock.connect(bus.env[endpoint])
                socks.append(sock)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # PUB/SUB: keep sending, as an attacker would
            for i in range(0, len(socks), 3):
                socks[i].send_multipart([protocol.BEACON, encode_beacon(beacon)])
                with contextlib.suppress(zmq.Again):
                    socks[i + 1].send_multipart([protocol.HEARTBEAT_HEADER, protocol.pack(heartbeat)], zmq.NOBLOCK)
                socks[i + 2].send_multipart(dead)
            time.sleep(0.1)
        assert not any(sock.poll(0) for sock in socks[1::3])  # membership never answered a rogue heartbeat
        with as_(keys, "operator/admin", bus) as op:
            assert {n["id"]: n["address"] for n in op.request("discovery", "nodes")} == nodes_before
            members = {m["id"]: m for m in op.request("membership", "members")}
            assert {n: m["incarnation"] for n, m in members.items()} == incarnations
            assert {m["state"] for m in members.values()} == {"alive"}
            assert op.services()["balancer"]["workers"] == balancers
            status = op.status()
            assert status["health"] == "green"
            assert {n["id"]: n["lifecycle"] for n in status["nodes"]}["node-1"] == "active"
        log = bus.log(bus.procs[0])
        assert "refused" in log  # the broker says who it turned away
        assert all(proc.poll() is None or proc.returncode != 0 for proc in impostors)
    finally:
        for sock in socks:
            sock.close(0)
        for proc in impostors:
            bus.kill(proc, signal.SIGTERM)


# --- security off ------------------------------------------------------------------------------------------


@pytest.mark.processes
def test_security_off_says_so_once_at_start_and_needs_no_keys(bus: Bus) -> None:
    broker = bus.broker()
    echo = bus.echo()
    bus.wait_workers("echo")
    assert bus.request("echo", "echo", text="plain")["text"] == "plain"
    for proc in (broker, echo):
        assert bus.log(proc).count("security off") == 1
    assert bus.request("broker", "stats")["security"] == {"enabled": False}
