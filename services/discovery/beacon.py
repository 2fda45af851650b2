"""The beacon: what an agent announces about itself, and how it is checked.

A beacon is one msgpack map on the agent's PUB socket. Discovery treats every
beacon as a hint from an unauthenticated sender, so :func:`parse_beacon`
checks each field and raises :class:`BadRequest` naming the first bad one.
Fields this version does not know are ignored, so a newer agent can add
fields without breaking an older discovery.

Wire fields (protocol version 1):

============  =========  ==========================================================
field         type       meaning
============  =========  ==========================================================
v             int        beacon protocol version, must be 1
node          str        node id, 1..128 chars of ``[A-Za-z0-9._:-]``
incarnation   int        >= 0; grows on every restart of the agent
instance      str        random token per agent process, 1..64 chars, same charset
address       str        advertised database address ``host:port`` (port 1..65535)
zone          str        failure zone, 1..64 chars, same charset as node
weight        float|int  relative capacity, finite and > 0
version       str        agent software version, 0..64 chars
started       float|int  agent process start, unix seconds, finite and >= 0
leaving       bool       true on the beacon sent by a graceful stop
hb            map|nil    optional heartbeat hints, <= 16 keys of <= 32 chars,
                         scalar values (str <= 256 chars, int, float, bool, nil);
                         known keys: ``endpoint`` (str), ``interval`` (seconds)
============  =========  ==========================================================
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from phantom_bus import ids
from phantom_bus.errors import BadRequest, TooLarge, UnsupportedVersion
from phantom_bus.protocol import wire_type

BEACON_VERSION = 1
"""The only beacon protocol version this code speaks."""

MAX_BEACON_BYTES = 4096
"""Largest encoded beacon accepted, in bytes.

A real beacon is about 250 bytes; 4 KiB leaves room for future fields and
heartbeat hints while capping what one garbage datagram can make discovery
allocate. The shell checks the size before decoding anything.
"""

DEFAULT_ZONE = "default"
"""Zone of a node that was not given one."""

MAX_ID_CHARS = 128
MAX_ZONE_CHARS = 64
MAX_INSTANCE_CHARS = 64
MAX_VERSION_CHARS = 64
MAX_HOST_CHARS = 253  # longest DNS name
MAX_HINTS = 16
MAX_HINT_KEY_CHARS = 32
MAX_HINT_VALUE_CHARS = 256
MAX_INCARNATION = 2**63 - 1  # an int64 on the wire, so other languages can hold it

_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")
_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
_IPV6_RE = re.compile(r"\[[0-9A-Fa-f:.%A-Za-z]+\]")


@dataclass(frozen=True, slots=True)
class Beacon:
    """One validated beacon. Build it on the agent side, get it from :func:`parse_beacon`."""

    node: str
    incarnation: int
    instance: str
    address: str
    zone: str = DEFAULT_ZONE
    weight: float = 1.0
    version: str = ""
    started: float = 0.0
    leaving: bool = False
    hb: Mapping[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The beacon as the msgpack map an agent publishes."""
        doc: dict[str, Any] = {
            "v": BEACON_VERSION,
            "node": self.node,
            "incarnation": self.incarnation,
            "instance": self.instance,
            "address": self.address,
            "zone": self.zone,
            "weight": self.weight,
            "version": self.version,
            "started": self.started,
            "leaving": self.leaving,
        }
        if self.hb is not None:
            doc["hb"] = dict(self.hb)
        return doc

    def leave(self) -> Beacon:
        """The same beacon marked as the last one of a graceful stop."""
        return replace(self, leaving=True)


def new_instance_id() -> str:
    """A fresh random instance token for an agent process (16 hex chars)."""
    # 64 random bits: two agents colliding by chance is not a realistic event,
    # and the token stays short on a beacon sent 5,000 times a second.
    return secrets.token_hex(8)


def encode_beacon(beacon: Beacon) -> bytes:
    """Encode ``beacon`` for the wire; :class:`TooLarge` if over :data:`MAX_BEACON_BYTES`."""
    payload: bytes = msgpack.packb(beacon.to_wire(), use_bin_type=True)
    if len(payload) > MAX_BEACON_BYTES:
        raise TooLarge(
            f"beacon is {len(payload)} bytes, the limit is {MAX_BEACON_BYTES}",
            size=len(payload),
            limit=MAX_BEACON_BYTES,
        )
    return payload


def decode_beacon(payload: bytes) -> Beacon:
    """Check the size of ``payload``, decode it and validate it.

    Raises :class:`TooLarge` for an oversize payload, :class:`UnsupportedVersion`
    for another protocol version and :class:`BadRequest` for anything else wrong.
    """
    if len(payload) > MAX_BEACON_BYTES:
        raise TooLarge(
            f"beacon is {len(payload)} bytes, the limit is {MAX_BEACON_BYTES}",
            size=len(payload),
            limit=MAX_BEACON_BYTES,
        )
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # UnicodeDecodeError, ExtraData, FormatError and StackError are all
        # ValueErrors; a non-string map key is a TypeError or ValueError.
        raise BadRequest(f"beacon is not valid msgpack: {exc}", field="payload") from exc
    return parse_beacon(obj)


def parse_beacon(obj: Any) -> Beacon:
    """Validate a decoded beacon map and return the :class:`Beacon`.

    Raises :class:`BadRequest` (``details["field"]`` names the culprit) or its
    subclass :class:`UnsupportedVersion`. Unknown extra fields are ignored.
    """
    if not isinstance(obj, dict):
        raise BadRequest(f"beacon must be a map, got {wire_type(obj)}", field="beacon")
    version = obj.get("v")
    if not _is_int(version):
        raise BadRequest("beacon field 'v' must be an integer protocol version", field="v")
    if version != BEACON_VERSION:
        raise UnsupportedVersion(
            f"beacon protocol version {version} is not supported (this side speaks "
            f"{BEACON_VERSION})",
            field="v",
            version=version,
        )
    return Beacon(
        node=check_node_id(_required(obj, "node"), "node"),
        incarnation=check_incarnation(_required(obj, "incarnation")),
        instance=_check_token(_required(obj, "instance"), "instance", MAX_INSTANCE_CHARS),
        address=check_address(_required(obj, "address"), "address"),
        zone=check_zone(_required(obj, "zone"), "zone"),
        weight=check_weight(_required(obj, "weight"), "weight"),
        version=_check_text(_required(obj, "version"), "version", MAX_VERSION_CHARS),
        started=_check_started(_required(obj, "started")),
        leaving=_check_bool(_required(obj, "leaving"), "leaving"),
        hb=_check_hints(obj.get("hb")),
    )


# Field checks. The public ones are shared with manual registration, so an
# operator's `phantom register` is held to the same rules as a beacon.


def check_node_id(value: Any, name: str = "node") -> str:
    """A node id by the one rule (:mod:`phantom_bus.ids`); :class:`BadRequest` otherwise."""
    try:
        return ids.check_node_id(value, name)
    except BadRequest as exc:
        raise BadRequest(exc.message, field=name) from None


def check_zone(value: Any, name: str = "zone") -> str:
    """A zone name: 1..64 chars of ``[A-Za-z0-9._:-]``; :class:`BadRequest` otherwise."""
    return _check_token(value, name, MAX_ZONE_CHARS)


def check_address(value: Any, name: str = "address") -> str:
    """A ``host:port`` address (IPv6 hosts in brackets); :class:`BadRequest` otherwise."""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a 'host:port' string", field=name)
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise BadRequest(f"{name} {value!r} is not 'host:port'", field=name)
    if len(host) > MAX_HOST_CHARS + 2:
        raise BadRequest(f"{name} host is longer than {MAX_HOST_CHARS} chars", field=name)
    if not (_HOST_RE.fullmatch(host) or _IPV6_RE.fullmatch(host)):
        raise BadRequest(
            f"{name} host {host!r} is not a host name, IPv4 or [IPv6] address", field=name
        )
    # int() would accept "+80", " 80" and "8_0"; only plain digits are a port.
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise BadRequest(f"{name} port {port!r} must be a number in 1..65535", field=name)
    return value


def check_weight(value: Any, name: str = "weight") -> float:
    """A finite positive number; :class:`BadRequest` otherwise."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise BadRequest(f"{name} must be a finite number > 0, got {value!r}", field=name)
    return float(value)


def check_incarnation(value: Any, name: str = "incarnation") -> int:
    """An integer in 0..2**63-1; :class:`BadRequest` otherwise."""
    if not _is_int(value) or not 0 <= value <= MAX_INCARNATION:
        raise BadRequest(f"{name} must be an integer in 0..2**63-1, got {value!r}", field=name)
    return int(value)


def _required(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise BadRequest(f"beacon field {name!r} is missing", field=name)
    return obj[name]


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True is not a valid version or incarnation.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_token(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        raise BadRequest(f"{name} must be a string of 1..{limit} chars", field=name)
    if not _ID_RE.fullmatch(value):
        raise BadRequest(
            f"{name} {value!r} may only contain letters, digits and '._:-'", field=name
        )
    return value


def _check_text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequest(f"{name} must be a string of at most {limit} chars", field=name)
    return value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false", field=name)
    return value


def _check_started(value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise BadRequest("started must be a unix time in seconds (>= 0)", field="started")
    return float(value)


def _check_hints(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_HINTS:
        raise BadRequest(f"hb must be a map of at most {MAX_HINTS} entries", field="hb")
    hints: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_HINT_KEY_CHARS:
            raise BadRequest(
                f"hb keys must be strings of 1..{MAX_HINT_KEY_CHARS} chars", field="hb"
            )
        if isinstance(item, str):
            if len(item) > MAX_HINT_VALUE_CHARS:
                raise BadRequest(f"hb.{key} is longer than {MAX_HINT_VALUE_CHARS} chars",
                                 field="hb")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise BadRequest(f"hb.{key} must be finite", field="hb")
        elif item is not None and not isinstance(item, int):  # int covers bool
            raise BadRequest(f"hb.{key} must be a string, number, bool or nil", field="hb")
        hints[key] = item
    return hints
