"""Key files: ``phantom keygen``'s layout, reading and writing ZeroMQ certificates.

The key directory (``curve_dir``, else ``DATA/keys``; see :mod:`.locate`)::

    DIR/<role>/<name>.key              a key pair (public + secret), mode 0600: one per process identity
    DIR/authorized/<role>/<name>.pub   the public keys allowed to connect, by role and name
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
from loguru import logger
from zmq.utils import z85

from phantom_bus.security.names import Principal, SecurityError

AUTHORIZED = "authorized"

#: The services ``phantom keygen`` makes keys for unless told otherwise: the programs
#: of supervisor.conf, listed because keys are made on hosts that may run none of them.
DEFAULT_SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")
DEFAULT_OPERATORS = ("admin",)
DEFAULT_CLIENTS = ("app",)

_KEY_LINE = re.compile(r'^\s*(public-key|secret-key)\s*=\s*"([^"]*)"\s*$')


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


def enrol_key(directory: Path, principal: Principal) -> None:
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
