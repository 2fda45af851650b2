"""The Phantom wire protocol: frames, bodies, versions and their validation.

Three conversations share the bus (``docs/protocol.md`` is the reference):

* client <-> broker frontend (ROUTER)::

      [PHC1, service, request-id, body]          # body = {"op": str, "args": map}
      [PHC1, service, request-id, reply]         # reply = {"ok": true, "result": any}
                                                 #      or {"ok": false, "error": {...}}

  A REQ client's empty delimiter frame precedes these; a DEALER client may
  send one or not, and the reply mirrors what it sent.

* worker (DEALER) <-> broker backend (ROUTER)::

      [PHW1, READY, service, meta]   [PHW1, HB]   [PHW1, HB, state]   [PHW1, BYE]
      [PHW1, REQ, route, request-id, body]      broker -> worker
      [PHW1, REP, route, request-id, reply]     worker -> broker

* events: publishers (PUB) -> broker XSUB, broker XPUB -> subscribers (SUB)::

      [topic, PHE1, body]   # body = {"kind": topic, "ts": float, "service": str, "origin": str, "seq": int, ...}

The broker only ever reads envelope frames; bodies are decoded by the
service that owns them (and by the broker for its own ``broker`` service).
Decoding functions never raise anything but :class:`BadRequest` and its
subclasses, so a receive loop can answer every bad message with an error reply.
"""

from __future__ import annotations

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


def wire_type(value: Any) -> str:
    """The msgpack type name of a decoded value: nil, bool, int, float, str, bin, array, map.

    Error replies name types this way (``details.type``), never by a language's
    own type names, so a client in any language can read them.
    """
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bin"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "map"
    return "ext"


def unpack(data: bytes, *, max_size: int = DEFAULT_MAX_BODY) -> Any:
    """Decode one msgpack object, refusing oversize or malformed input with BadRequest."""
    if len(data) > max_size:
        raise TooLarge(f"message body is {len(data)} bytes, the limit is {max_size}", size=len(data), limit=max_size)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a handful of types on garbage
        raise BadRequest(f"body is not valid msgpack: {_garbage_reason(data, exc)}") from None


def _garbage_reason(data: bytes, exc: Exception) -> str:
    """Why msgpack refused ``data``, in words that do not depend on this library."""
    if not data:
        return "it is empty"
    if isinstance(exc, msgpack.ExtraData):
        return f"{len(exc.extra)} extra byte(s) follow the first complete object (send exactly one object)"
    if isinstance(exc, msgpack.FormatError):
        return "it contains a byte that begins no msgpack type (0xc1 is reserved)"
    if isinstance(exc, msgpack.StackError):
        return "arrays or maps are nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"a str holds bytes that are not UTF-8 (at byte {exc.start} of that str); send binary data as bin"
    if isinstance(exc, TypeError):
        return "a map key is an array or a map (keys must be nil, bool, int, float, str or bin)"
    if isinstance(exc, ValueError) and ("incomplete" in str(exc) or "exceeds max" in str(exc)):
        return f"it ends in the middle of an object ({len(data)} bytes received; truncated?)"
    return "it cannot be decoded as one msgpack object"


def _show(frame: bytes) -> str:
    """A header frame as readable text: ASCII as is, anything else as hex."""
    head = frame[:16]
    if head and all(0x21 <= b < 0x7F for b in head):
        return f'"{head.decode("ascii")}"'
    return "0x" + head.hex() if head else "an empty frame"


def check_header(frame: bytes, expected: bytes) -> None:
    """Raise UnsupportedVersion or BadRequest unless ``frame`` is the ``expected`` header."""
    if frame == expected:
        return
    want = expected.decode("ascii")
    if len(frame) == len(expected) and frame[:3] == expected[:3]:
        raise UnsupportedVersion(
            f"protocol header {_show(frame)} is not supported; "
            f"this peer speaks \"{want}\" (version {PROTOCOL_VERSION})",
            supported=[PROTOCOL_VERSION],
        )
    raise BadRequest(f"expected the protocol header \"{want}\", got {_show(frame)}", field="header")


def decode_service(frame: bytes) -> str:
    """Validate and decode a service name frame."""
    if not frame or len(frame) > MAX_SERVICE_NAME:
        raise BadRequest(
            f"the service name is {len(frame)} bytes; it must be 1..{MAX_SERVICE_NAME} ASCII bytes",
            field="service",
        )
    try:
        return frame.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the service name must be ASCII", field="service") from None


def check_request_id(frame: bytes) -> None:
    """Refuse request ids longer than :data:`MAX_REQUEST_ID` bytes."""
    if len(frame) > MAX_REQUEST_ID:
        raise BadRequest(
            f"the request id is {len(frame)} bytes, the limit is {MAX_REQUEST_ID}", field="request_id"
        )


# --- request and reply bodies -------------------------------------------------


def encode_request(op: str, args: dict[str, Any] | None = None) -> bytes:
    """The body of a request for operation ``op`` with keyword ``args``."""
    return pack({"op": op, "args": args or {}})


def decode_request(body: bytes, *, max_size: int = DEFAULT_MAX_BODY) -> tuple[str, dict[str, Any]]:
    """Decode a request body into ``(op, args)``, or raise BadRequest saying what is wrong."""
    doc = unpack(body, max_size=max_size)
    if not isinstance(doc, dict):
        kind = wire_type(doc)
        raise BadRequest(f"the request body must be a map, got {kind}", field="body", type=kind)
    op = doc.get("op")
    if not isinstance(op, str) or not op:
        kind = wire_type(op)
        raise BadRequest(f"the request body needs 'op', a non-empty str (got {kind})", field="op", type=kind)
    args = doc.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        kind = wire_type(args)
        raise BadRequest(f"the request 'args' must be a map, got {kind}", field="args", type=kind)
    for key in args:
        if not isinstance(key, str):
            kind = wire_type(key)
            raise BadRequest(f"the request 'args' map must have str keys, got a {kind} key", field="args", type=kind)
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


def encode_event(
    kind: str,
    data: dict[str, Any],
    *,
    source: str,
    ts: float,
    origin: str | None = None,
    seq: int | None = None,
) -> list[bytes]:
    """The frames of one event: ``[topic, PHE1, body]``.

    ``ts`` is the event's wall-clock time (seconds since the epoch), which the
    publisher reads: encoding reads no clock.
    ``origin`` names the publishing process (unique per process run) and
    ``seq`` numbers its events 1, 2, 3...: an event published to several
    brokers reaches a subscriber once per broker, and the pair is what lets it
    deliver the event once and in order (:class:`phantom_bus.events.Deduplicator`)."""
    # The envelope keys come last so that an event's own fields can never mask them.
    body = {**data, "kind": kind, "ts": ts, "service": source}
    if origin is not None and seq is not None:
        body["origin"] = origin
        body["seq"] = seq
    return [kind.encode(), EVENT, pack(body)]


def event_summary(event: dict[str, Any]) -> dict[str, Any]:
    """An event for people and logs: a pushed shard map (``map``, bytes) is
    replaced by its size, so listings stay short and JSON-printable."""
    blob = event.get("map")
    if isinstance(blob, bytes):
        return {**{k: v for k, v in event.items() if k != "map"}, "map_bytes": len(blob)}
    return event


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
