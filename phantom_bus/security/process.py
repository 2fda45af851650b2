"""One process's security: its key pair, its sockets, the ZAP handlers it runs.

:func:`setup` makes the process's :class:`Security` once from its settings;
clients made in the same process use it (:func:`current`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from phantom_bus.security.keys import (
    AUTHORIZED,
    KeyPair,
    enrol_key,
    load_keypair,
    public_path,
    read_key_file,
    secret_path,
)
from phantom_bus.security.keystore import KeyStore, directory_signature
from phantom_bus.security.locate import resolve_directory, setting
from phantom_bus.security.names import Principal, SecurityError
from phantom_bus.security.zap import DOMAIN_ROLES, ZapHandler

#: Whose public key a connecting socket expects at each endpoint.
BROKER = "broker/broker"
DISCOVERY = "service/discovery"
MEMBERSHIP = "service/membership"

# Handshake failures after which libzmq does not reconnect by itself.
_REFUSALS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
probe_ids = itertools.count(1)


class Security:
    """What one process needs on a secured bus: its key pair and the key directory.

    ``Security()`` is security off: every method is a no-op and :meth:`knows`
    is always true, so callers need no ``if``.
    """

    def __init__(self, directory: Path | None = None, me: Principal | None = None, keys: KeyPair | None = None) -> None:
        if (directory is None) != (keys is None) or (keys is not None and me is None):
            raise ValueError("security needs a directory, a principal and its key pair together")
        self.directory = directory
        self.me = me
        self.keys = keys
        self._store: KeyStore | None = None
        self._signature: tuple[Any, ...] | None = None
        self._lock = threading.Lock()
        self._handlers: dict[int, ZapHandler] = {}
        self._watched: dict[int, tuple[zmq.Socket[Any], zmq.Socket[Any], list[str], str]] = {}
        self._refusal_logged: dict[str, float] = {}
        self.reload_requested = False
        #: Why security is off, for :meth:`describe` ("" when on).
        self.off_reason = ""

    @property
    def enabled(self) -> bool:
        """True when the bus is secured (CURVE + ZAP)."""
        return self.keys is not None

    @classmethod
    def load(cls, directory: str | Path, key: str, *, enrol: bool = False) -> Security:
        """Security on, as the identity ``key`` (``role/name`` or the path of a .key file).

        ``enrol``: if this identity's key pair is missing and it is a service's
        or an agent's, make it and authorize it, as ``phantom keygen`` would."""
        root = Path(directory)
        if not root.is_dir():
            raise SecurityError(f"curve_dir {root} is not a directory; make it with `phantom keygen {root}`")
        if key.endswith(".key"):
            # A path, laid out as keygen does: .../<role>/<name>.key.
            path = Path(key)
            try:
                me = Principal(path.parent.name, path.stem)
            except ValueError as exc:
                raise SecurityError(f"key file {path} must sit in a directory named after its role: {exc}") from None
        else:
            try:
                me = Principal.parse_ref(key)
            except ValueError as exc:
                raise SecurityError(f"bad curve_key {key!r}: {exc}") from None
            path = secret_path(root, me)
            if enrol and me.role in ("service", "agent") and not path.exists():
                enrol_key(root, me)
        security = cls(root, me, load_keypair(path))
        if me.role != "broker":
            security.require(BROKER)  # everyone else connects to the broker: say so now, not at the first request
        return security

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], default_key: str) -> Security:
        """From the ``security``, ``curve_dir``, ``curve_key`` and ``data`` settings
        (any of them missing from ``cfg`` is read from the environment and files).

        ``default_key``'s role says whether this is a server (broker, service,
        agent: no keys is an error) or a client (no keys: off)."""
        mode = str(setting(cfg, "security"))
        if mode == "off":
            off = cls()
            off.off_reason = "security = off"
            return off
        key = str(cfg.get("curve_key") or "") or default_key
        role = Principal.parse_ref(default_key).role
        found = resolve_directory(cfg, client=role in ("client", "operator"))
        if found is None:
            if role in ("client", "operator"):
                off = cls()
                off.off_reason = "no keys found"
                return off
            data = Path(str(setting(cfg, "data")))
            raise SecurityError(
                f"security is on (the default) but there are no keys: curve_dir is not set and {data / 'keys'} "
                f"does not exist. Make them with `phantom keygen {data / 'keys'}` (make up does), point "
                "PHANTOM_CURVE_DIR at a key directory, or set PHANTOM_SECURITY=off for a demo on one host"
            )
        directory, explicit = found
        return cls.load(directory, key, enrol=not explicit)

    def describe(self) -> str:
        """One line for the start-up log."""
        if not self.enabled:
            if self.off_reason == "no keys found":
                return (
                    "security off (no keys found): no curve_dir and no DATA/keys; a broker that requires "
                    "CURVE will refuse this connection"
                )
            why = f" ({self.off_reason})" if self.off_reason else ""
            return (
                f"security off{why}: the bus is neither authenticated nor encrypted; anyone who can reach "
                "its ports can join. Only for a demo on one host (docs: 'Production')"
            )
        return f"security on: CURVE as {self.me} with keys in {self.directory}"

    # --- sockets ----------------------------------------------------------------------

    def public_key(self, who: str) -> bytes:
        """The authorized public key of ``who`` (``role/name``), e.g. the broker's."""
        assert self.directory is not None
        path = public_path(self.directory, Principal.parse_ref(who))
        try:
            return read_key_file(path)[0]
        except (OSError, ValueError) as exc:
            raise SecurityError(f"cannot read the public key of {who} ({path}): {exc}") from None

    def require(self, *servers: str) -> None:
        """Check that the public keys of ``servers`` (``role/name``) can be read; SecurityError if not."""
        if self.keys is not None:
            for server in servers:
                self.public_key(server)

    def client(self, sock: zmq.Socket[Any], server: str = BROKER) -> None:
        """Make ``sock`` (before it connects) a CURVE client of ``server`` (``role/name``)."""
        if self.keys is None:
            return
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.public_key(server))
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)

    def connect(self, sock: zmq.Socket[Any], endpoint: str, server: str = BROKER) -> None:
        """Connect ``sock`` to ``endpoint`` (one, or a comma-separated list: it connects
        to each) as a CURVE client of ``server``, watching its handshakes so that
        :meth:`retry_refused` can try again after a refusal."""
        endpoints = [e.strip() for e in endpoint.split(",") if e.strip()]
        self.client(sock, server)
        if self.keys is not None:
            self._sweep()
            address = f"inproc://phantom.watch.{os.getpid()}.{next(probe_ids)}"
            sock.monitor(address, _REFUSALS)
            monitor: zmq.Socket[Any] = zmq.Context.shadow(sock.context.underlying).socket(zmq.PAIR)
            monitor.setsockopt(zmq.LINGER, 0)
            monitor.connect(address)
            self._watched[id(sock)] = (sock, monitor, endpoints, server)
        for one in endpoints:
            sock.connect(one)

    def retry_refused(self, sock: zmq.Socket[Any]) -> bool:
        """Connect ``sock`` (made by :meth:`connect`) again if a server refused the
        handshake since the last call; True if it did. libzmq gives a refused
        connection up for good, so owners call this now and then, from the thread
        that uses the socket: a key authorized after the process started then gets
        in without a restart. With several endpoints, only the refusing ones are
        connected again."""
        watched = self._watched.get(id(sock))
        if watched is None or watched[0] is not sock:
            return False
        _, monitor, endpoints, server = watched
        refused: set[str] = set()
        while monitor.poll(0):  # every event it reports is a refusal
            frames = monitor.recv_multipart()
            where = frames[1].decode("utf-8", "replace") if len(frames) > 1 else ""
            refused.update([where] if where in endpoints else endpoints)
        if not refused:
            return False
        now = time.monotonic()
        for endpoint in sorted(refused):
            if now - self._refusal_logged.get(endpoint, -60.0) >= 60.0:
                self._refusal_logged[endpoint] = now
                logger.warning("{} at {} refused our key {}; trying again", server, endpoint, self.me)
            with contextlib.suppress(zmq.ZMQError):
                sock.disconnect(endpoint)
            sock.connect(endpoint)
        return True

    def _sweep(self) -> None:
        for key, (sock, monitor, _, _) in list(self._watched.items()):
            if sock.closed:
                monitor.close(0)
                del self._watched[key]

    def server(self, sock: zmq.Socket[Any], domain: str) -> None:
        """Make ``sock`` (before it binds) a CURVE server for ZAP ``domain``, with the
        handler of its context started; SecurityError if that cannot be done."""
        if self.keys is None:
            return
        if domain not in DOMAIN_ROLES:
            raise ValueError(f"unknown ZAP domain {domain!r}")
        self._handler(sock.context)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        # Without this, libzmq accepts any client that knows our public key when no
        # handler answers: fail closed instead.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def _handler(self, ctx: zmq.Context[Any]) -> ZapHandler:
        with self._lock:
            handler = self._handlers.get(ctx.underlying)
            if handler is None or not handler.alive:
                if self._store is None:
                    self._load_store()
                handler = ZapHandler(ctx, self)
                handler.start()
                self._handlers[ctx.underlying] = handler
            return handler

    def close(self) -> None:
        """Stop the ZAP handlers this object started and the handshake watches."""
        with self._lock:
            handlers, self._handlers = list(self._handlers.values()), {}
        for handler in handlers:
            handler.stop()
        for _, monitor, _, _ in self._watched.values():
            monitor.close(0)
        self._watched.clear()

    # --- the authorized keys ------------------------------------------------------------

    @property
    def store(self) -> KeyStore:
        """The authorized keys as last loaded (loaded on first use)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._load_store()
        assert self._store is not None
        return self._store

    def _load_store(self) -> None:
        assert self.directory is not None
        authorized = self.directory / AUTHORIZED
        if not authorized.is_dir():
            raise SecurityError(f"no authorized keys: {authorized} is not a directory; run `phantom keygen`")
        self._signature = directory_signature(authorized)
        self._store = KeyStore.load(authorized)
        for problem in self._store.problems:
            logger.warning("authorized key ignored: {}", problem)

    def knows(self, user_id: str | None) -> bool:
        """True if ``user_id`` is (still) authorized; always true with security off."""
        if self.keys is None:
            return True
        return user_id is not None and user_id in self.store.users

    def request_reload(self) -> None:
        """Ask the ZAP thread to re-read the keys now (safe from a signal handler)."""
        self.reload_requested = True

    def reload(self, *, force: bool = True) -> bool:
        """Re-read the authorized keys if they changed (or ``force``); True if reloaded.
        A directory that cannot be read keeps the keys loaded before."""
        if self.directory is None:
            return False
        self.reload_requested = False
        authorized = self.directory / AUTHORIZED
        try:
            signature = directory_signature(authorized)
            if not force and signature == self._signature:
                return False
            store = KeyStore.load(authorized)
        except OSError as exc:
            logger.error("cannot re-read the authorized keys in {}: {}; keeping the old ones", authorized, exc)
            return False
        old = self._store.users if self._store is not None else frozenset()
        self._store, self._signature = store, signature
        added, removed = sorted(store.users - old), sorted(old - store.users)
        logger.info(
            "authorized keys reloaded: {} keys{}{}",
            len(store),
            f", added {', '.join(added)}" if added else "",
            f", removed {', '.join(removed)}" if removed else "",
        )
        for problem in store.problems:
            logger.warning("authorized key ignored: {}", problem)
        return True

    def stats(self) -> dict[str, Any]:
        """Counters for ``stats`` operations: keys loaded, handshakes allowed and denied."""
        if not self.enabled:
            return {"enabled": False}
        allowed = sum(h.counters["allowed"] for h in self._handlers.values())
        denied = sum(h.counters["denied"] for h in self._handlers.values())
        keys = len(self._store) if self._store is not None else None
        return {"enabled": True, "as": str(self.me), "keys": keys, "allowed": allowed, "denied": denied}


# --- the process's identity --------------------------------------------------------------------------

_process: Security | None = None
_process_lock = threading.Lock()


def setup(cfg: Mapping[str, Any], default_key: str) -> Security:
    """The security of this process, made from ``cfg`` on the first call (as
    ``default_key`` unless ``curve_key`` says otherwise) and the same object after.
    Clients made in this process use it. SecurityError if keys are missing."""
    global _process
    with _process_lock:
        if _process is None:
            _process = Security.from_config(cfg, default_key)
        return _process


def current(cfg: Mapping[str, Any] | None = None) -> Security:
    """The process's security if :func:`setup` ran, else one made from ``cfg`` (or
    the environment) as a library client (``client/app`` unless ``curve_key``)."""
    if _process is not None:
        return _process
    if cfg is None:
        from phantom_bus import config as cfgmod

        cfg = cfgmod.load(names=("security", "curve_dir", "curve_key", "data"))
    return Security.from_config(cfg, "client/app")


def reset() -> None:
    """Forget the process's security (tests), stopping its ZAP handlers."""
    global _process
    with _process_lock:
        if _process is not None:
            _process.close()
        _process = None
