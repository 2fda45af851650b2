"""Telling a user why a connection to the broker does not work."""

from __future__ import annotations

import os
import time
from typing import Any

import zmq

from phantom_bus.errors import BrokerUnreachable, PhantomError, Refused
from phantom_bus.security.names import SecurityError
from phantom_bus.security.process import Security, probe_ids

_PROBE_EVENTS = (
    zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)  # fmt: skip


def diagnose(
    endpoint: str, security: Security, ctx: zmq.Context[Any] | None = None, timeout: float = 1.0
) -> PhantomError | None:
    """Why the broker at ``endpoint`` does not answer us, if the handshake says:
    :class:`Refused` for a key it does not accept, :class:`BrokerUnreachable`
    with a hint for a security mismatch; None if the handshake succeeds or
    nothing answers at all. Blocks for up to ``timeout`` seconds (failure path only)."""
    from zmq.utils.monitor import recv_monitor_message

    base: zmq.Context[Any] = zmq.Context.shadow(ctx.underlying) if ctx is not None else zmq.Context.instance()
    sock = base.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        security.client(sock)
    except SecurityError as exc:
        sock.close(0)
        return BrokerUnreachable(str(exc))
    # A unique address: pyzmq's default is named after the socket's FD, which a
    # closed probe may still hold in libzmq while the next one reuses the number.
    monitor = sock.get_monitor_socket(_PROBE_EVENTS, f"inproc://phantom.probe.{os.getpid()}.{next(probe_ids)}")
    connected = False
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                connected = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED or (event == zmq.EVENT_CONNECT_RETRIED and not connected):
                return None  # the handshake works, or nothing listens there: no more to say
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return Refused(
                    f"the broker at {endpoint} refused our key {security.me}: it is not among its authorized "
                    "keys (or its role may not connect there)",
                    endpoint=endpoint,
                )
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                # The peer closes at once on a mechanism mismatch, so which of the
                # two failures we see is a race; both mean the same here.
                if not security.enabled:
                    hint = (
                        "it requires CURVE security and we found no keys: set PHANTOM_CURVE_DIR (and "
                        "PHANTOM_CURVE_KEY), or PHANTOM_DATA to the cluster's data directory (its keys/)"
                    )
                    return BrokerUnreachable(f"the broker at {endpoint} failed the handshake: {hint}")
                hint = "it runs without security, or authorized/broker/broker.pub is not its current public key"
                return BrokerUnreachable(f"the broker at {endpoint} failed the handshake: {hint}")
        return None
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
