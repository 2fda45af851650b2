"""Bus security: CURVE keys per role, a fail-closed ZAP handler, and who may do what.

On by default (setting ``security``, ``PHANTOM_SECURITY``: ``on`` or ``off``).
The keys live in ``curve_dir`` (``PHANTOM_CURVE_DIR``), else in ``DATA/keys``,
a directory made by ``phantom keygen`` (``make up`` makes ``var/keys`` on its
first start)::

    DIR/<role>/<name>.key              a key pair (public + secret), mode 0600: one per process identity
    DIR/authorized/<role>/<name>.pub   the public keys allowed to connect, by role and name

``role`` is one of :data:`ROLES`; an agent's ``name`` is its node id, a
service's its service name. The path of an authorized key *is* its identity:
the ZAP handler answers a successful handshake with the User-Id
``"<role>:<name>"``, which libzmq then stamps on every message of that
connection, so a receiver knows who sent each message without trusting
anything in it.

Three checks, from coarse to fine:

1. *Connection* (:class:`ZapHandler`): every socket that binds is a CURVE
   server with a ZAP domain naming what it is for (:data:`DOMAIN_ROLES`);
   only authorized keys of the roles that domain admits get through.
   ``ZAP_ENFORCE_DOMAIN`` is set, so if no handler answers, libzmq refuses the
   peer instead of accepting anyone who knows the server key.
2. *Message*: membership takes heartbeats and discovery beacons only from the
   agent key of the node they name (:func:`speaks_for`); the broker takes a
   worker's registration only for the service its key is named after.
3. *Operation*: the broker hands each request's User-Id to the worker, and the
   service base checks it against the rule the service declared for that
   operation (``allow=`` of :meth:`phantom_bus.service.Service.operation`,
   :data:`DEFAULT_RULE` if none; :func:`authorise`) before any handler runs.

Keys are re-read within :data:`RESCAN` seconds of a change under
``authorized/`` (or at once on SIGHUP), so adding or revoking a node needs no
restart.

Where the keys are found (:func:`resolve_directory`): ``curve_dir`` if set;
else ``DATA/keys`` if it exists; else, for a client (CLI, phantom-top, a
library ``Client``) while ``data`` is left at its default, the ``var/keys``
of the checkout this package runs from, so tools run from anywhere on the
host of a ``make up`` cluster find its keys. A broker, service or agent that
finds no keys refuses to start (security off takes ``security = off``); a
client that finds none connects without and is told if the broker wants
CURVE. In a directory found as ``DATA/keys`` (one host, one user), a service
or agent whose own key is missing makes it and authorizes it, as
``phantom keygen`` would: ``python -m services.agent --node-id node-4`` joins a
``make up`` cluster with nothing else to do. With an explicit ``curve_dir``
(the production layout, keys copied between hosts) nothing is made.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from loguru import logger
from zmq.utils import z85

from phantom_bus import ids
from phantom_bus.config import ConfigError
from phantom_bus.errors import BrokerUnreachable, PhantomError, Refused

ROLES = ("broker", "service", "agent", "operator", "client")
AUTHORIZED = "authorized"

#: Seconds between checks of the authorized directory for changes. Not a setting: a
#: check is a stat of a few directories, and SIGHUP re-reads at once when a second is too long.
RESCAN = 1.0

#: The services ``phantom keygen`` makes keys for unless told otherwise: the programs
#: of supervisor.conf, listed because keys are made on hosts that may run none of them.
DEFAULT_SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
DEFAULT_OPERATORS = ("admin",)
DEFAULT_CLIENTS = ("app",)

#: Whose public key a connecting socket expects at each endpoint.
BROKER = "broker/broker"
DISCOVERY = "service/discovery"
MEMBERSHIP = "service/membership"

# ZAP domains: one per kind of server socket, and the roles each admits.
DOMAIN_FRONTEND = "phantom.frontend"
DOMAIN_BACKEND = "phantom.backend"
DOMAIN_EVENTS_IN = "phantom.events_in"
DOMAIN_EVENTS_OUT = "phantom.events_out"
DOMAIN_BEACON = "phantom.beacon"
DOMAIN_HEARTBEAT = "phantom.heartbeat"

_CALLERS = frozenset({"client", "operator", "service", "agent"})
DOMAIN_ROLES: Mapping[str, frozenset[str]] = {
    DOMAIN_FRONTEND: _CALLERS,
    DOMAIN_BACKEND: frozenset({"service"}),  # only services may serve requests
    DOMAIN_EVENTS_IN: frozenset({"service"}),  # only services may publish events
    DOMAIN_EVENTS_OUT: _CALLERS,
    DOMAIN_BEACON: frozenset({"agent"}),
    DOMAIN_HEARTBEAT: frozenset({"agent"}),
}

# Handshake failures after which libzmq does not reconnect by itself.
_REFUSALS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_probes = itertools.count(1)
_KEY_LINE = re.compile(r'^\s*(public-key|secret-key)\s*=\s*"([^"]*)"\s*$')
_ZAP_VERSION = b"1.0"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class SecurityError(ConfigError):
    """Security is on but cannot be used as configured (missing or bad key, no handler)."""


# --- identities and keys ----------------------------------------------------------


def check_name(name: str, what: str = "key name") -> str:
    """A key name: the node-id rule (:mod:`phantom_bus.ids`: 1..128 chars of
    ``[A-Za-z0-9._:-]`` starting with a letter or digit), since an agent's key is named
    after its node; raises ValueError otherwise."""
    if not ids.is_node_id(name):
        raise ValueError(f"bad {what} {name!r}: 1..128 of A-Z a-z 0-9 . _ : -, starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a key belongs to: a role and a name (``agent``, ``node-1``)."""

    role: str
    name: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: one of {', '.join(ROLES)}")
        check_name(self.name)

    @property
    def user_id(self) -> str:
        """The ZAP User-Id of this principal, ``role:name``."""
        return f"{self.role}:{self.name}"

    @property
    def ref(self) -> str:
        """``role/name``, as in ``PHANTOM_CURVE_KEY`` and the key directory."""
        return f"{self.role}/{self.name}"

    @classmethod
    def parse_ref(cls, ref: str) -> Principal:
        """``role/name`` -> Principal; ValueError if malformed."""
        role, sep, name = ref.partition("/")
        if not sep:
            raise ValueError(f"expected ROLE/NAME, got {ref!r}")
        return cls(role, name)

    def __str__(self) -> str:
        return self.user_id


@functools.lru_cache(maxsize=4096)
def parse_user_id(user_id: str | bytes | None) -> Principal | None:
    """The principal of a ZAP User-Id (``role:name``), or None if it is not one of ours."""
    if user_id is None:
        return None
    text = user_id.decode("utf-8", "replace") if isinstance(user_id, bytes) else user_id
    role, sep, name = text.partition(":")
    if not sep:
        return None
    try:
        return Principal(role, name)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from libzmq's CSPRNG."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def _check_z85_key(text: str, path: Path) -> bytes:
    raw = text.encode("ascii", "replace")
    if len(raw) != 40:
        raise ValueError(f"{path}: a CURVE key is 40 Z85 characters, found {len(raw)}")
    try:
        z85.decode(raw)
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"{path}: not a Z85-encoded key") from None
    return raw


def read_key_file(path: Path) -> tuple[bytes, bytes | None]:
    """``(public, secret-or-None)`` from a ZeroMQ certificate file (``.key`` or ``.pub``).

    The format is ZeroMQ's ZPL certificate (as czmq and pyzmq write it), so
    keys can be made or read by other tools. Raises ValueError or OSError.
    """
    found: dict[str, bytes] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _KEY_LINE.match(line)
        if match:
            found[match.group(1)] = _check_z85_key(match.group(2), path)
    if "public-key" not in found:
        raise ValueError(f"{path}: no public-key line")
    return found["public-key"], found.get("secret-key")


def _certificate(principal: Principal, keys: KeyPair, *, secret: bool) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    kind = "**Secret**" if secret else "Public"
    lines = [
        f"#   ****  Generated on {stamp} by phantom keygen  ****",
        f"#   ZeroMQ CURVE {kind} Certificate for {principal.ref}",
    ]
    if secret:
        lines.append("#   Keep this file on the host that runs this identity only (mode 0600).")
    lines += [
        "",
        "metadata",
        f'    role = "{principal.role}"',
        f'    name = "{principal.name}"',
        "curve",
        f'    public-key = "{keys.public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{keys.secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str, mode: int) -> None:
    # Write then rename: a directory watcher never sees half a key.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def secret_path(directory: Path, principal: Principal) -> Path:
    """Where the key pair of ``principal`` lives: ``DIR/<role>/<name>.key``."""
    return directory / principal.role / f"{principal.name}.key"


def public_path(directory: Path, principal: Principal) -> Path:
    """Where its authorized public key lives: ``DIR/authorized/<role>/<name>.pub``."""
    return directory / AUTHORIZED / principal.role / f"{principal.name}.pub"


def keygen(
    directory: Path,
    *,
    agents: Iterable[str] = (),
    services: Iterable[str] = DEFAULT_SERVICES,
    operators: Iterable[str] = DEFAULT_OPERATORS,
    clients: Iterable[str] = DEFAULT_CLIENTS,
    force: bool = False,
) -> list[tuple[Principal, str]]:
    """Make the key pairs of a cluster and authorize them; returns ``(principal, what)``
    with ``what`` one of ``created``, ``kept``, ``replaced``.

    Idempotent: an existing secret key is kept (and its public key authorized
    again) unless ``force``. Secret keys are written 0600 in 0700 directories.
    """
    principals = [Principal("broker", "broker")]
    principals += [Principal("service", n) for n in services]
    principals += [Principal("agent", n) for n in agents]
    principals += [Principal("operator", n) for n in operators]
    principals += [Principal("client", n) for n in clients]
    directory.mkdir(parents=True, exist_ok=True)
    report: list[tuple[Principal, str]] = []
    for principal in dict.fromkeys(principals):
        private = secret_path(directory, principal)
        private.parent.mkdir(mode=0o700, exist_ok=True)
        public = public_path(directory, principal)
        public.parent.mkdir(parents=True, exist_ok=True)
        keys: KeyPair | None = None
        if private.exists() and not force:
            pub, sec = read_key_file(private)
            if sec is None:
                raise ValueError(f"{private} holds no secret key; remove it or use --force")
            keys, what = KeyPair(pub, sec), "kept"
        else:
            what = "replaced" if private.exists() else "created"
            keys = KeyPair.generate()
            _write_atomically(private, _certificate(principal, keys, secret=True), 0o600)
        _write_atomically(public, _certificate(principal, keys, secret=False), 0o644)
        report.append((principal, what))
    return report


def load_keypair(path: Path) -> KeyPair:
    """The key pair in ``path``; :class:`SecurityError` saying what is wrong otherwise."""
    try:
        public, secret = read_key_file(path)
    except FileNotFoundError:
        raise SecurityError(f"security is on but there is no key file {path}; make it with `phantom keygen`") from None
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read the key file {path}: {exc}") from None
    if secret is None:
        raise SecurityError(f"{path} holds only a public key; this process needs its secret key")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("secret key {} is readable by others (mode {:o}); chmod 600 it", path, stat.S_IMODE(mode))
    return KeyPair(public, secret)


# --- the authorized keys ---------------------------------------------------------------


def _signature(authorized: Path) -> tuple[Any, ...]:
    """What changes whenever a key under ``authorized`` is added, removed or rewritten."""
    parts: list[Any] = []
    for role in ROLES:
        try:
            with os.scandir(authorized / role) as entries:
                for entry in entries:
                    if entry.name.endswith(".pub") and not entry.name.startswith("."):
                        st = entry.stat()
                        parts.append((role, entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return tuple(sorted(parts))


class KeyStore:
    """The authorized public keys: Z85 key -> :class:`Principal`, as read at one moment.

    A file that cannot be read, and a key filed under two identities, are left
    out (and listed in :attr:`problems`): when in doubt, nobody gets in.
    """

    def __init__(self, keys: Mapping[bytes, Principal] | None = None, problems: Iterable[str] = ()) -> None:
        self.keys: dict[bytes, Principal] = dict(keys or {})
        self.users: frozenset[str] = frozenset(p.user_id for p in self.keys.values())
        self.problems = list(problems)

    @classmethod
    def load(cls, authorized: Path) -> KeyStore:
        """Read every ``<role>/<name>.pub`` under ``authorized``."""
        keys: dict[bytes, Principal] = {}
        problems: list[str] = []
        ambiguous: set[bytes] = set()
        for role in ROLES:
            folder = authorized / role
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.suffix != ".pub":
                    continue
                try:
                    principal = Principal(role, path.stem)
                    public, _ = read_key_file(path)
                except (OSError, ValueError) as exc:
                    problems.append(f"{path}: {exc}")
                    continue
                if public in keys and keys[public] != principal:
                    problems.append(f"{path}: the same key is also filed as {keys[public].ref}; both refused")
                    ambiguous.add(public)
                keys[public] = principal
        for public in ambiguous:
            keys.pop(public, None)
        return cls(keys, problems)

    def lookup(self, public: bytes) -> Principal | None:
        """The principal of a binary (32-byte) or Z85 (40-byte) public key."""
        if len(public) == 32:
            public = z85.encode(public)
        return self.keys.get(public)

    def __len__(self) -> int:
        return len(self.keys)


# --- who may do what ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """The roles that may call an operation; for agents, ``own`` names the argument
    that must be their own node id (an agent confirms only its own replicas)."""

    roles: frozenset[str]
    own: str | None = None


#: Anyone with an authorized key (clients, operators, services, agents): reads.
READ = Rule(_CALLERS)
#: Clients, operators and services: selecting and releasing.
USE = Rule(frozenset({"client", "operator", "service"}))
#: Operators and services only: everything that changes the cluster. Services may
#: call everything: they call each other on the manager's behalf.
ADMIN = Rule(frozenset({"operator", "service"}))
#: The rule of an operation declared without one, and of an unknown operation:
#: operators and services only (fail closed for the rest).
DEFAULT_RULE = ADMIN


def authorise(
    caller: str | bytes | None, service: str, op: str, args: Mapping[str, Any], rule: Rule = DEFAULT_RULE
) -> Principal:
    """Check that ``caller`` (a ZAP User-Id) may call ``service.op`` with ``args`` under
    ``rule`` (the one the service declared for the operation); returns its principal or
    raises :class:`Refused` saying who may."""
    principal = parse_user_id(caller)
    if principal is None:
        raise Refused(
            f"{service}.{op} refused: the request carries no authenticated caller "
            "(is the broker running with security on?)",
            service=service,
            op=op,
        )
    if principal.role not in rule.roles:
        raise Refused(
            f"{service}.{op} refused: key {principal} has role {principal.role}; "
            f"this operation needs one of: {', '.join(sorted(rule.roles))}",
            service=service,
            op=op,
            caller=principal.user_id,
            allowed=sorted(rule.roles),
        )
    if rule.own is not None and principal.role == "agent" and args.get(rule.own) != principal.name:
        raise Refused(
            f"{service}.{op} refused: agent key {principal} may act only for node {principal.name!r}, "
            f"not {args.get(rule.own)!r}",
            service=service,
            op=op,
            caller=principal.user_id,
        )
    return principal


def speaks_for(user_id: str | bytes | None, node: str) -> bool:
    """True if the sender with ``user_id`` may beacon or heartbeat as ``node``: its
    agent key is filed under that node id."""
    principal = parse_user_id(user_id)
    return principal is not None and principal.role == "agent" and principal.name == node


# --- the ZAP handler ----------------------------------------------------------------------------


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


# --- one process's security ----------------------------------------------------------------------


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
                _enrol(root, me)
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
        mode = str(_setting(cfg, "security"))
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
            data = Path(str(_setting(cfg, "data")))
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
            address = f"inproc://phantom.watch.{os.getpid()}.{next(_probes)}"
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
        self._signature = _signature(authorized)
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
            signature = _signature(authorized)
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


# --- where the keys are -------------------------------------------------------------------------------

#: The directory under ``data`` where ``make up`` keeps the cluster's keys.
KEYS_DIR = "keys"


def _setting(cfg: Mapping[str, Any], name: str) -> Any:
    if name in cfg:
        return cfg[name]
    from phantom_bus import config as cfgmod

    return cfgmod.load(names=(name,))[name]


def checkout_keys() -> Path | None:
    """``var/keys`` of the source checkout this package runs from, if it is one and has keys."""
    root = Path(__file__).resolve().parent.parent
    keys = root / "var" / KEYS_DIR
    if (root / "supervisor.conf").is_file() and keys.is_dir():
        return keys
    return None


def resolve_directory(cfg: Mapping[str, Any], *, client: bool = False) -> tuple[Path, bool] | None:
    """The key directory and whether it was set explicitly (``curve_dir``), or None if
    there is none: ``DATA/keys`` if it exists, else (``client`` with ``data`` at its
    default) the checkout's ``var/keys``."""
    explicit = str(cfg.get("curve_dir") or "")
    if not explicit and "curve_dir" not in cfg:
        explicit = str(_setting(cfg, "curve_dir") or "")
    if explicit:
        return Path(explicit), True
    data = str(_setting(cfg, "data"))
    keys = Path(data) / KEYS_DIR
    if keys.is_dir():
        return keys, False
    if client:
        from phantom_bus import config as cfgmod

        if isinstance(cfg, cfgmod.Config) and "data" in cfg:
            source = cfg.source("data")
        elif "data" in cfg:
            source = "given"
        else:
            source = cfgmod.load(names=("data",)).source("data")
        if source == "default":
            found = checkout_keys()
            if found is not None:
                return found, False
    return None


def _enrol(directory: Path, principal: Principal) -> None:
    """Make and authorize ``principal``'s key pair in a keygen'd ``directory``."""
    if not public_path(directory, Principal("broker", "broker")).is_file():
        return  # not a key directory made by keygen: say so when the key is read
    keys = KeyPair.generate()
    private = secret_path(directory, principal)
    private.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    public = public_path(directory, principal)
    public.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(private, _certificate(principal, keys, secret=True), 0o600)
    _write_atomically(public, _certificate(principal, keys, secret=False), 0o644)
    logger.info("made and authorized the key {} in {}", principal.ref, directory)


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


# --- telling a user why a connection does not work ----------------------------------------------------

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
    monitor = sock.get_monitor_socket(_PROBE_EVENTS, f"inproc://phantom.probe.{os.getpid()}.{next(_probes)}")
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
