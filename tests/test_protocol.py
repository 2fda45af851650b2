"""Wire protocol: round trips and every kind of bad input answered with BadRequest."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phantom_bus import protocol
from phantom_bus.errors import (
    BadRequest,
    NoLiveReplica,
    PhantomError,
    ServiceUnavailable,
    TooLarge,
    UnsupportedVersion,
    error_from_wire,
)

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(op=st.text(min_size=1, max_size=20), args=st.dictionaries(st.text(max_size=10), json_like, max_size=5))
def test_request_round_trips(op: str, args: dict) -> None:
    assert protocol.decode_request(protocol.encode_request(op, args)) == (op, args)


@given(result=json_like)
def test_result_round_trips(result: object) -> None:
    assert protocol.decode_reply(protocol.encode_result(result)) == (True, result)


def test_error_reply_round_trips_to_the_same_exception_type() -> None:
    ok, doc = protocol.decode_reply(protocol.encode_error(NoLiveReplica("shard 3 has none", shard="3")))
    assert ok is False
    err = error_from_wire(doc)
    assert isinstance(err, NoLiveReplica)
    assert err.message == "shard 3 has none"
    assert err.details == {"shard": "3"}
    assert doc["retry"] is True


def test_unknown_error_code_keeps_its_code() -> None:
    err = error_from_wire({"code": "from_the_future", "message": "new"})
    assert type(err) is PhantomError
    assert err.code == "from_the_future"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # a msgpack byte that is never valid
        b"\x92\x01",  # array announcing 2 items, holding 1
        msgpack.packb({"op": "x"}) + b"\x00",  # trailing data
        b"\xff" * 64,
        bytes(range(256)),
    ],
)
def test_garbage_body_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest):
        protocol.decode_request(body)


@pytest.mark.parametrize(
    "doc",
    [
        [1, 2],
        "op",
        5,
        {"args": {}},
        {"op": ""},
        {"op": 3},
        {"op": "x", "args": [1]},
        {"op": "x", "args": {1: 2}},
    ],
)
def test_wrong_shapes_are_bad_requests(doc: object) -> None:
    with pytest.raises(BadRequest):
        protocol.decode_request(protocol.pack(doc))


def test_oversize_body_is_refused_before_decoding() -> None:
    body = protocol.encode_request("x", {"blob": b"a" * 2048})
    with pytest.raises(TooLarge):
        protocol.decode_request(body, max_size=1024)


@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_only_ever_raises_bad_request(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        protocol.decode_request(data)
    with contextlib.suppress(BadRequest):
        protocol.decode_reply(data)


def test_headers_tell_unknown_versions_from_garbage() -> None:
    protocol.check_header(b"PHC1", protocol.CLIENT)
    with pytest.raises(UnsupportedVersion):
        protocol.check_header(b"PHC9", protocol.CLIENT)
    with pytest.raises(BadRequest) as info:
        protocol.check_header(b"HTTP/1.1", protocol.CLIENT)
    assert not isinstance(info.value, UnsupportedVersion)


def test_route_frames_round_trip_and_reject_garbage() -> None:
    for delimited in (True, False):
        assert protocol.split_route(protocol.make_route(b"\x00abc", delimited)) == (b"\x00abc", delimited)
    for bad in (b"", b"\x01", b"\x07abc"):
        with pytest.raises(BadRequest):
            protocol.split_route(bad)


def test_events_round_trip_and_check_topic() -> None:
    frames = protocol.encode_event("node.lost", {"node": "n1"}, source="discovery", ts=12.5)
    assert protocol.decode_event(frames) == {
        "kind": "node.lost",
        "ts": 12.5,
        "service": "discovery",
        "node": "n1",
    }
    # An event's own fields never mask the envelope.
    masked = protocol.decode_event(
        protocol.encode_event("node.x", {"kind": "evil", "service": "evil"}, source="d", ts=1.0)
    )
    assert (masked["kind"], masked["service"]) == ("node.x", "d")
    with pytest.raises(BadRequest):
        protocol.decode_event([b"node.left", *frames[1:]])
    with pytest.raises(BadRequest):
        protocol.decode_event(frames[:2])
    with pytest.raises(UnsupportedVersion):
        protocol.decode_event([frames[0], b"PHE2", frames[2]])


def test_service_names_are_checked() -> None:
    assert protocol.decode_service(b"membership") == "membership"
    for bad in (b"", b"x" * 65, "sérvice".encode()):
        with pytest.raises(BadRequest):
            protocol.decode_service(bad)


def test_retryable_errors_say_so() -> None:
    assert ServiceUnavailable("x").retry is True
    assert BadRequest("x").retry is False
