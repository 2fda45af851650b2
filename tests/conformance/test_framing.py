"""Conformance: client frames, malformed requests and the broker's own service.

One test per rule of docs/protocol.md section 1, spoken with raw pyzmq and
msgpack only, so another implementation can run the same cases.
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgpack
import pytest
import zmq

from tests.conformance.conftest import GRACE, Peer, packb

SERVICES: tuple[str, ...] = ()
PING = packb({"op": "ping"})


def reply_of(frames: list[bytes]) -> dict[str, Any]:
    doc: dict[str, Any] = msgpack.unpackb(frames[-1], raw=False)
    return doc


def assert_language_neutral(message: str) -> None:
    assert not re.search(r"\bb'|b\"|NoneType|<class|\bdict\b|\blist\b|\btuple\b", message), message


def test_reply_echoes_service_and_request_id(peer: Peer) -> None:
    reply = peer.exchange([b"PHC1", b"broker", b"id-1", PING])
    assert reply[:3] == [b"PHC1", b"broker", b"id-1"] and len(reply) == 4
    body = reply_of(reply)
    assert body["ok"] is True and body["result"]["pong"] is True


def test_req_socket_and_dealer_with_delimiter_get_the_delimiter_back(peer: Peer) -> None:
    assert peer.exchange([b"PHC1", b"broker", b"r", PING], kind=zmq.REQ)[0] == b"PHC1"  # REQ strips it
    reply = peer.exchange([b"", b"PHC1", b"broker", b"d", PING])
    assert reply[:4] == [b"", b"PHC1", b"broker", b"d"]


def test_args_may_be_omitted_or_nil(peer: Peer) -> None:
    for body in (packb({"op": "ping"}), packb({"op": "ping", "args": None}), packb({"op": "ping", "args": {}})):
        assert reply_of(peer.exchange([b"PHC1", b"broker", b"", body]))["ok"] is True


def test_another_version_is_unsupported_and_answered_under_the_clients_header(peer: Peer) -> None:
    reply = peer.exchange([b"PHC2", b"broker", b"v2", PING])
    assert reply[:3] == [b"PHC2", b"broker", b"v2"]
    err = reply_of(reply)["error"]
    assert err["code"] == "unsupported_version" and err["details"]["supported"] == [1]
    assert_language_neutral(err["message"])


def test_a_foreign_header_is_bad_request(peer: Peer) -> None:
    reply = peer.exchange([b"XYZ1", b"broker", b"x", PING])
    assert reply[:3] == [b"PHC1", b"broker", b"x"]
    err = reply_of(reply)["error"]
    assert (err["code"], err["details"]["field"]) == ("bad_request", "header")
    assert "XYZ1" in err["message"]
    assert_language_neutral(err["message"])


def test_missing_frames_are_empty_in_the_reply(peer: Peer) -> None:
    reply = peer.exchange([b"PHC1", b"broker"])
    assert reply[:3] == [b"PHC1", b"broker", b""] and len(reply) == 4
    err = reply_of(reply)["error"]
    assert (err["code"], err["details"]["field"]) == ("bad_request", "frames")


def test_an_over_long_request_id_is_refused_and_echoed_whole(peer: Peer) -> None:
    reqid = bytes(range(65))
    reply = peer.exchange([b"PHC1", b"broker", reqid, PING])
    assert reply[:3] == [b"PHC1", b"broker", reqid]
    err = reply_of(reply)["error"]
    assert (err["code"], err["details"]["field"]) == ("bad_request", "request_id")


def test_an_over_long_service_name_is_refused_and_echoed_whole(peer: Peer) -> None:
    name = b"s" * 65
    reply = peer.exchange([b"PHC1", name, b"n", PING])
    assert reply[:3] == [b"PHC1", name, b"n"]
    err = reply_of(reply)["error"]
    assert (err["code"], err["details"]["field"]) == ("bad_request", "service")


def test_a_body_over_the_limit_is_too_large(peer: Peer) -> None:
    err = reply_of(peer.exchange([b"PHC1", b"broker", b"big", b"\x00" * 70000]))["error"]
    assert err["code"] == "too_large" and err["details"]["size"] == 70000


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\x82\xa2op", "ends in the middle"),
        (packb({"op": "ping"}) + b"\x01", "extra byte"),
        (b"\xc1", "reserved"),
        (b"", "empty"),
    ],
)
def test_garbage_msgpack_is_bad_request_saying_why(peer: Peer, body: bytes, words: str) -> None:
    err = peer.error("broker", "", body=body)
    assert err["code"] == "bad_request" and words in err["message"]
    assert_language_neutral(err["message"])


def test_a_body_that_is_not_a_map_names_its_msgpack_type(peer: Peer) -> None:
    err = peer.error("broker", "", body=packb(["ping"]))
    assert (err["code"], err["details"]["field"], err["details"]["type"]) == ("bad_request", "body", "array")
    err = peer.error("broker", "", body=packb({"op": None}))
    assert (err["details"]["field"], err["details"]["type"]) == ("op", "nil")
    assert_language_neutral(err["message"])


def test_broker_has_ping_services_and_stats(peer: Peer) -> None:
    assert isinstance(peer.result("broker", "services"), dict)
    stats = peer.result("broker", "stats")
    assert isinstance(stats["requests"], int) and isinstance(stats["uptime"], float)


def test_an_unknown_broker_operation_lists_the_known_ones(peer: Peer) -> None:
    err = peer.error("broker", "pong")
    assert err["code"] == "unknown_operation" and err["details"]["ops"] == ["ping", "services", "events", "stats"]
    assert "retry" not in err


def test_broker_operations_take_no_arguments(peer: Peer) -> None:
    assert peer.error("broker", "ping", {"x": 1})["code"] == "bad_request"


def test_a_standard_service_without_worker_is_unavailable_and_retryable(peer: Peer) -> None:
    err = peer.error("sharding", "ping")
    assert err["code"] == "service_unavailable" and err["retry"] is True
    assert err["details"]["reason"] == "no_worker"


def test_a_name_no_worker_ever_registered_becomes_unknown_and_not_retryable(peer: Peer) -> None:
    # The grace runs from the broker's own start, a little after the process was
    # launched: ask until it is over (generously bounded).
    deadline = peer.started + GRACE + 15
    while (err := peer.error("sharing", "ping"))["code"] == "service_unavailable" and time.monotonic() < deadline:
        assert err["retry"] is True
        time.sleep(0.2)
    assert err["code"] == "unknown_service" and "retry" not in err
    assert err["details"]["service"] == "sharing"
