"""The Phantom wire protocol: frames, bodies, versions and their validation.

Three conversations share the bus (``docs/protocol.md`` is the reference):

* client <-> broker frontend (ROUTER)::

      [PHC1, service, request-id, body]          # body = {"op": str, "args": map}
      [PHC1, service, request-id, reply]         # reply = {"ok": true, "result": any}
                                                 #      or {"ok": false, "error": {...}}

  A REQ client's empty delimiter frame precedes these; a DEALER client may
  send one or not, and the reply mirrors what it sent.

* worker (DEALER) <-> broker backend (ROUTER)::

      [PHW1, READY, service, meta]   [PHW1, HB]   [PHW1, BYE]
      [PHW1, REQ, route, request-id, body]      broker -> worker
      [PHW1, REP, route, request-id, reply]     worker -> broker

* events: publishers (PUB) -> broker XSUB, broker XPUB -> subscribers (SUB)::

      [topic, PHE1, body]                        # body = {"kind": topic, "ts": float, "service": str, ...}

The broker only ever reads envelope frames; bodies are decoded by the
service that owns them (and by the broker for its own ``broker`` service).
Decoding functions never raise anything but :class:`BadRequest` and its
subclasses, so a receive loop can answer every bad message with an error reply.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from phantom_bus.errors import BadRequest, PhantomError, TooLarge, UnsupportedVersion

PROTOCOL_VERSION = 1

CLIENT = b"PHC1"
WORKER = b"PHW1"
EVENT = b"PHE1"
BEACON = b"PHB1"
HEARTBEAT_HEADER = b"PHH1"

_CLIENT_FAMILY = CLIENT[:3]
_WORKER_FAMILY = WORKER[:3]
_EVENT_FAMILY = EVENT[:3]

# Worker commands (frame 1 of a backend message).
READY = b"READY"
HEARTBEAT = b"HB"
REQUEST = b"REQ"
REPLY = b"REP"
DISCONNECT = b"BYE"

#: Name under which the broker answers requests itself (``services``, ``ping``).
BROKER_SERVICE = "broker"

MAX_SERVICE_NAME = 64
MAX_REQUEST_ID = 64
#: Largest body accepted by default; big enough for a 4,096-shard map, small
#: enough that one bad client cannot make a process allocate without bound.
DEFAULT_MAX_BODY = 4 * 1024 * 1024


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack (bin type for bytes, str for text)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, *, max_size: int = DEFAULT_MAX_BODY) -> Any:
    """Decode one msgpack object, refusing oversize or malformed input with BadRequest."""
    if len(data) > max_size:
        raise TooLarge(f"message body is {len(data)} bytes, the limit is {max_size}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise BadRequest(f"body is not a single valid msgpack object: {exc}") from None
    except Exception as exc:  # msgpack raises a handful of odd types on garbage
        raise BadRequest(f"body is not valid msgpack: {type(exc).__name__}: {exc}") from None


def check_header(frame: bytes, expected: bytes) -> None:
    """Raise UnsupportedVersion or BadRequest unless ``frame`` is the ``expected`` header."""
    if frame == expected:
        return
    if frame[:3] == expected[:3]:
        raise UnsupportedVersion(
            f"protocol header {frame!r} is not supported; this peer speaks {expected!r}",
            supported=[PROTOCOL_VERSION],
        )
    raise BadRequest(f"expected protocol header {expected!r}, got {frame[:16]!r}")


def decode_service(frame: bytes) -> str:
    """Validate and decode a service name frame."""
    if not frame or len(frame) > MAX_SERVICE_NAME:
        raise BadRequest(f"service name must be 1..{MAX_SERVICE_NAME} bytes")
    try:
        return frame.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("service name must be ASCII") from None


def check_request_id(frame: bytes) -> None:
    """Refuse request ids longer than :data:`MAX_REQUEST_ID` bytes."""
    if len(frame) > MAX_REQUEST_ID:
        raise BadRequest(f"request id is {len(frame)} bytes, the limit is {MAX_REQUEST_ID}")


# --- request and reply bodies -------------------------------------------------


def encode_request(op: str, args: dict[str, Any] | None = None) -> bytes:
    """The body of a request for operation ``op`` with keyword ``args``."""
    return pack({"op": op, "args": args or {}})


def decode_request(body: bytes, *, max_size: int = DEFAULT_MAX_BODY) -> tuple[str, dict[str, Any]]:
    """Decode a request body into ``(op, args)``, or raise BadRequest saying what is wrong."""
    doc = unpack(body, max_size=max_size)
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a map, got {type(doc).__name__}")
    op = doc.get("op")
    if not isinstance(op, str) or not op:
        raise BadRequest("request body needs 'op', a non-empty string")
    args = doc.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise BadRequest("request 'args' must be a map with string keys")
    return op, args


class Encoded(bytes):
    """A result that is already msgpack-encoded (a cached large reply, such as the
    shard map of one epoch): :func:`encode_result` splices it in unchanged."""


# {"ok": true, "result": <value>} without the value: a fixmap of two entries.
_RESULT_HEAD = b"\x82" + pack("ok") + pack(True) + pack("result")


def encode_result(result: Any) -> bytes:
    """A successful reply body."""
    if isinstance(result, Encoded):
        return _RESULT_HEAD + result
    return pack({"ok": True, "result": result})


def encode_error(err: PhantomError) -> bytes:
    """An error reply body for ``err``."""
    doc: dict[str, Any] = {"ok": False, "error": err.to_wire()}
    if err.retry:
        doc["error"]["retry"] = True
    return pack(doc)


def decode_reply(body: bytes, *, max_size: int = DEFAULT_MAX_BODY) -> tuple[bool, Any]:
    """Decode a reply body into ``(ok, result-or-error-map)``."""
    doc = unpack(body, max_size=max_size)
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise BadRequest("reply body must be a map with a boolean 'ok'")
    if doc["ok"]:
        return True, doc.get("result")
    return False, doc.get("error")


# --- routes --------------------------------------------------------------------
# The broker hands a worker an opaque route frame and gets it back with the
# reply, so it can answer the right client without keeping per-request state
# or decoding the body. Byte 0 is a set of flags: 0x01 the client sent an empty
# delimiter frame (REQ does, DEALER may); 0x02 (security on) the route carries
# the caller's authenticated User-Id, as one length byte and the id. The rest
# is the client's ROUTER identity.

_ROUTE_DELIM = b"\x01"
_ROUTE_BARE = b"\x00"
_ROUTE_CALLER = 0x02


def make_route(identity: bytes, delimited: bool, caller: bytes = b"") -> bytes:
    """Pack a client identity, its delimiter flag and (security on) its User-Id into one route frame."""
    if caller:
        return bytes((_ROUTE_CALLER | delimited, len(caller))) + caller + identity
    return (_ROUTE_DELIM if delimited else _ROUTE_BARE) + identity


def split_route(route: bytes) -> tuple[bytes, bool]:
    """Inverse of :func:`make_route` (without the caller); raises BadRequest on a malformed route."""
    flag = route[:1]
    if len(route) >= 2 and flag in (_ROUTE_DELIM, _ROUTE_BARE):
        return route[1:], flag == _ROUTE_DELIM
    identity, delimited, _ = _split_caller_route(route)
    return identity, delimited


def route_caller(route: bytes) -> bytes:
    """The caller's User-Id carried in ``route``, or b"" if it carries none."""
    if route[:1] in (_ROUTE_DELIM, _ROUTE_BARE):
        return b""
    return _split_caller_route(route)[2]


def _split_caller_route(route: bytes) -> tuple[bytes, bool, bytes]:
    if len(route) < 3 or route[0] & ~0x03 or not route[0] & _ROUTE_CALLER:
        raise BadRequest("malformed route frame")
    end = 2 + route[1]
    if len(route) <= end:
        raise BadRequest("malformed route frame")
    return route[end:], bool(route[0] & 0x01), route[2:end]


# --- events --------------------------------------------------------------------


def encode_event(kind: str, data: dict[str, Any], *, source: str, ts: float | None = None) -> list[bytes]:
    """The frames of one event: ``[topic, PHE1, body]``."""
    # The envelope keys come last so that an event's own fields can never mask them.
    body = {**data, "kind": kind, "ts": time.time() if ts is None else ts, "service": source}
    return [kind.encode(), EVENT, pack(body)]


def decode_event(frames: list[bytes], *, max_size: int = DEFAULT_MAX_BODY) -> dict[str, Any]:
    """Decode event frames into the body map (which carries ``kind``)."""
    if len(frames) != 3:
        raise BadRequest(f"an event has 3 frames, got {len(frames)}")
    check_header(frames[1], EVENT)
    doc = unpack(frames[2], max_size=max_size)
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        raise BadRequest("event body must be a map with a string 'kind'")
    if doc["kind"].encode() != frames[0]:
        raise BadRequest("event topic frame and body 'kind' differ")
    return doc
