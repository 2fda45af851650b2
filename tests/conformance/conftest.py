"""A tiny harness for the conformance suite: raw pyzmq + msgpack, nothing of phantom_bus.

Each test module asks for the services it needs with a module-level
``SERVICES`` tuple; the ``peer`` fixture starts a broker and those services as
subprocesses (``python -m ...``) on free ports, once per module, and stops
them afterwards whatever happens.

To run the same cases against another implementation, start it yourself and
set ``CONFORMANCE_BROKER=tcp://host:port``: nothing is started then, and the
cases talk to that endpoint. Its worker heartbeat should be 0.1 s (or the
``unknown_service`` case waits longer; see ``GRACE``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from tests.procs import ENDPOINTS, free_port, phantom_env, spawn, stop

HEARTBEAT = 0.1
#: How long after the broker starts an unregistered name becomes unknown:
#: 5 liveness periods of 3 heartbeats (docs/protocol.md, *Unknown or unavailable service*).
GRACE = 5 * 3 * HEARTBEAT
TIMEOUT_MS = 5000
#: An operation that only a service's leader answers: the service is ready when it does.
READY = {"sharding": "map", "manager": "status", "membership": "verdicts"}



class Peer:
    """An endpoint speaking the client protocol, and raw ways to talk to it."""

    def __init__(self, endpoint: str, started: float) -> None:
        self.endpoint = endpoint
        self.started = started
        self.ctx = zmq.Context()

    def socket(self, kind: int = zmq.DEALER) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        sock.connect(self.endpoint)
        return sock

    def exchange(self, frames: list[bytes], *, kind: int = zmq.DEALER) -> list[bytes]:
        """Send ``frames`` as one message and return the reply's frames."""
        with contextlib.closing(self.socket(kind)) as sock:
            sock.send_multipart(frames)
            return sock.recv_multipart()

    def call(self, service: str, op: str, args: Any = None, *, body: bytes | None = None) -> dict[str, Any]:
        """One request over a DEALER without delimiter; the decoded reply body."""
        reqid = uuid.uuid4().bytes
        if body is None:
            doc: dict[str, Any] = {"op": op} if args is None else {"op": op, "args": args}
            body = msgpack.packb(doc, use_bin_type=True)
        reply = self.exchange([b"PHC1", service.encode(), reqid, body])
        assert reply[:3] == [b"PHC1", service.encode(), reqid]
        decoded: dict[str, Any] = msgpack.unpackb(reply[3], raw=False)
        return decoded

    def result(self, service: str, op: str, args: Any = None) -> Any:
        reply = self.call(service, op, args)
        assert reply["ok"] is True, reply
        return reply["result"]

    def error(self, service: str, op: str, args: Any = None, *, body: bytes | None = None) -> dict[str, Any]:
        reply = self.call(service, op, args, body=body)
        assert reply["ok"] is False, reply
        err: dict[str, Any] = reply["error"]
        return err

    def wait_for(self, service: str, timeout: float = 20.0) -> None:
        """Until ``service`` answers ``ping`` and, for a service with a leader, serves
        (a new instance answers the retryable ``not_leader`` until it leads)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        probe = READY.get(service, "ping")
        while time.monotonic() < deadline:
            last = self.call(service, probe)
            if last["ok"]:
                return
            time.sleep(0.1)
        raise AssertionError(f"{service} did not come up: {last}")


@pytest.fixture(scope="module")
def peer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    services: tuple[str, ...] = getattr(request.module, "SERVICES", ())
    external = os.environ.get("CONFORMANCE_BROKER")
    if external:
        p = Peer(external, time.monotonic() - 3600)
        for name in services:
            p.wait_for(name)
        yield p
        p.ctx.destroy(0)
        return
    tmp = tmp_path_factory.mktemp("conformance")
    ports = {name: f"tcp://127.0.0.1:{free_port()}" for name in ENDPOINTS}
    env = phantom_env(ports, tmp / "var", "INFO")  # security off: the plain protocol; CURVE is the transport's concern
    env.update(PHANTOM_WORKER_HEARTBEAT=str(HEARTBEAT), PHANTOM_MAX_MESSAGE="65536")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for module in ("phantom_bus.broker", *(f"services.{s}" for s in services)):
            procs.append(spawn([sys.executable, "-m", module], env, tmp / f"{module}.log"))
            if module == "phantom_bus.broker":
                started = time.monotonic()
        p = Peer(env["PHANTOM_BROKER"], started)
        p.wait_for("broker")
        for name in services:
            p.wait_for(name)
        yield p
        p.ctx.destroy(0)
    finally:
        stop(procs)


def packb(obj: Any) -> bytes:
    """msgpack with str as str and bytes as bin, as the protocol says."""
    return msgpack.packb(obj, use_bin_type=True)
