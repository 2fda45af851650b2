"""The ZAP handler: which keys may connect to which kind of server socket.

Every socket that binds is a CURVE server with a ZAP domain naming what it is
for (:data:`DOMAIN_ROLES`); only authorized keys of the roles that domain
admits get through. ``ZAP_ENFORCE_DOMAIN`` is set, so if no handler answers,
libzmq refuses the peer instead of accepting anyone who knows the server key.
Keys are re-read within :data:`RESCAN` seconds of a change under
``authorized/`` (or at once on SIGHUP), so adding or revoking a node needs no
restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import zmq
from loguru import logger
from zmq.utils import z85

from phantom_bus.security.names import SecurityError
from phantom_bus.security.policy import CALLERS

if TYPE_CHECKING:
    from phantom_bus.security.process import Security

#: Seconds between checks of the authorized directory for changes. Not a setting: a
#: check is a stat of a few directories, and SIGHUP re-reads at once when a second is too long.
RESCAN = 1.0

# ZAP domains: one per kind of server socket, and the roles each admits.
DOMAIN_FRONTEND = "phantom.frontend"
DOMAIN_BACKEND = "phantom.backend"
DOMAIN_EVENTS_IN = "phantom.events_in"
DOMAIN_EVENTS_OUT = "phantom.events_out"
DOMAIN_BEACON = "phantom.beacon"
DOMAIN_HEARTBEAT = "phantom.heartbeat"

DOMAIN_ROLES: Mapping[str, frozenset[str]] = {
    DOMAIN_FRONTEND: CALLERS,
    DOMAIN_BACKEND: frozenset({"service"}),  # only services may serve requests
    DOMAIN_EVENTS_IN: frozenset({"service"}),  # only services may publish events
    DOMAIN_EVENTS_OUT: CALLERS,
    DOMAIN_BEACON: frozenset({"agent"}),
    DOMAIN_HEARTBEAT: frozenset({"agent"}),
}


_ZAP_VERSION = b"1.0"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class ZapHandler:
    """Answers libzmq's ZAP requests (RFC 27) for one context, in its own thread.

    A handshake passes only if the client's key is authorized and its role is
    admitted by the server socket's domain; everything else (unknown key, a
    role the domain does not admit, another mechanism, an unknown domain, a
    malformed request) is a 400. (Not 300, "temporary": libzmq then neither
    tells the client nor, depending on timing, closes the connection before the
    handshake timeout; a refused client reconnects with
    :meth:`Security.retry_refused` instead.) The thread also rescans the
    authorized directory every :data:`RESCAN` seconds and on
    :meth:`Security.request_reload`.
    """

    def __init__(self, ctx: zmq.Context[Any], security: Security) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context.shadow(ctx.underlying)
        self._security = security
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._logged: dict[tuple[str, str, bytes], float] = {}
        self.counters = {"allowed": 0, "denied": 0}
        self._thread = threading.Thread(target=self._run, name="phantom-zap", daemon=True)

    def start(self) -> None:
        """Bind the ZAP endpoint and start answering; SecurityError if it cannot."""
        self._thread.start()
        self._ready.wait(5.0)
        if self._error is not None or not self._ready.is_set():
            raise SecurityError(f"cannot start the ZAP handler ({self._error or 'timed out'}); refusing to run")

    def stop(self) -> None:
        """Stop answering: from then on, libzmq refuses every new handshake."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    @property
    def alive(self) -> bool:
        """True while the handler thread runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            sock = self._ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(_ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        next_scan = time.monotonic() + RESCAN
        try:
            while not self._stop.is_set():
                if sock.poll(250):
                    request = sock.recv_multipart()
                    sock.send_multipart(self.answer(request))
                now = time.monotonic()
                if now >= next_scan or self._security.reload_requested:
                    self._security.reload(force=self._security.reload_requested)
                    next_scan = now + RESCAN
        except Exception:  # the handler must never die silently: refusing everyone is the fallback
            logger.exception("the ZAP handler failed; new connections will be refused")
        finally:
            sock.close(0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply frames for one request (public for tests)."""
        if len(request) < 6:
            reqid = request[1] if len(request) > 1 else b""
            return self._deny(reqid, "", b"", "malformed ZAP request")
        version, reqid, domain_b, _address, _identity, mechanism, *credentials = request
        domain = domain_b.decode("utf-8", "replace")
        if version != _ZAP_VERSION:
            return self._deny(reqid, domain, b"", f"ZAP version {version[:8]!r}")
        if mechanism != b"CURVE" or len(credentials) != 1:
            return self._deny(reqid, domain, b"", f"mechanism {mechanism[:16]!r}: only CURVE is accepted")
        key = credentials[0]
        roles = DOMAIN_ROLES.get(domain)
        if roles is None:
            return self._deny(reqid, domain, key, "unknown ZAP domain")
        principal = self._security.store.lookup(key)
        if principal is None:
            return self._deny(reqid, domain, key, "key not authorized")
        if principal.role not in roles:
            return self._deny(reqid, domain, key, f"role {principal.role} may not connect here")
        self.counters["allowed"] += 1
        return [_ZAP_VERSION, reqid, b"200", b"OK", principal.user_id.encode(), b""]

    def _deny(self, reqid: bytes, domain: str, key: bytes, why: str) -> list[bytes]:
        self.counters["denied"] += 1
        shown = z85.encode(key).decode() if len(key) == 32 else "-"
        # A refused peer reconnects every 100 ms: one line per peer and reason per minute.
        mark = (domain, why, key)
        now = time.monotonic()
        if now - self._logged.get(mark, -60.0) >= 60.0:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[mark] = now
            logger.warning("refused a connection to {}: {} (client key {})", domain or "?", why, shown)
        return [_ZAP_VERSION, reqid, b"400", why.encode()[:255], b"", b""]
