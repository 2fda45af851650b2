"""Conformance: service operations, argument checks and leases.

Runs a broker with sharding and balancer, and checks the rules of
docs/protocol.md sections 1 and 6 with raw pyzmq and msgpack only.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.conftest import Peer, packb

SERVICES = ("sharding", "balancer")
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_ops(service: str) -> set[str]:
    """The operations docs/protocol.md lists for ``service`` in its reference tables."""
    text = DOC.read_text()
    section = text.split(f"#### `{service}`", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))


@pytest.mark.parametrize("service", SERVICES)
def test_ping_lists_exactly_the_documented_operations(peer: Peer, service: str) -> None:
    result = peer.result(service, "ping")
    assert result["service"] == service and isinstance(result["pid"], int)
    assert set(result["ops"]) == documented_ops(service)


def test_an_unknown_operation_lists_the_known_ones(peer: Peer) -> None:
    err = peer.error("sharding", "lookups", {"key": "k"})
    assert err["code"] == "unknown_operation" and err["details"]["op"] == "lookups"
    assert "lookup" in err["details"]["ops"] and "retry" not in err


def test_a_wrongly_typed_argument_names_its_msgpack_types(peer: Peer) -> None:
    err = peer.error("sharding", "lookup", {"key": "k", "keyspace": 5})
    assert err["code"] == "bad_request"
    assert err["details"] == {"arg": "keyspace", "expected": ["str"], "type": "int"}
    err = peer.error("balancer", "release", {"lease": "x", "latency_ms": "fast"})
    assert (err["details"]["arg"], err["details"]["type"]) == ("latency_ms", "str")
    assert "float or int" in err["message"]


def test_bool_is_not_accepted_for_an_int(peer: Peer) -> None:
    err = peer.error("sharding", "map", {"since_epoch": True})
    assert (err["code"], err["details"]["type"]) == ("bad_request", "bool")


def test_missing_and_unknown_arguments_are_named(peer: Peer) -> None:
    assert peer.error("sharding", "lookup", {})["details"]["arg"] == "key"
    err = peer.error("sharding", "lookup", {"key": "k", "keysapce": "default"})
    assert (err["code"], err["details"]["arg"]) == ("bad_request", "keysapce")


def test_nil_for_an_optional_argument_means_its_default(peer: Peer) -> None:
    route = peer.result("sharding", "lookup", {"key": "user:42", "keyspace": None})
    assert route["keyspace"] == "default" and isinstance(route["epoch"], int)
    assert peer.result("sharding", "lookup", {"key": b"user:42"})["shard"] == route["shard"]


def test_an_unknown_keyspace_is_no_such_keyspace(peer: Peer) -> None:
    err = peer.error("sharding", "lookup", {"key": "k", "keyspace": "nope"})
    assert err["code"] == "no_such_keyspace" and "retry" not in err


def test_garbage_to_a_service_is_bad_request_saying_why(peer: Peer) -> None:
    err = peer.error("balancer", "", body=b"\x93\x01")
    assert err["code"] == "bad_request" and "ends in the middle" in err["message"]


def test_release_of_an_unknown_lease_is_done(peer: Peer) -> None:
    for _ in range(2):
        assert peer.result("balancer", "release", {"lease": "never-issued"}) == {
            "released": "never-issued",
            "status": "unknown",
        }


def _select(peer: Peer) -> dict[str, Any]:
    """A select once the balancer knows a live node holding the key."""
    deadline = time.monotonic() + 20
    while True:
        reply = peer.call("balancer", "select", {"key": "user:42"})
        if reply["ok"] or time.monotonic() > deadline:
            assert reply["ok"], reply
            result: dict[str, Any] = reply["result"]
            return result
        assert reply["error"]["code"] == "no_live_replica" and reply["error"]["retry"] is True
        time.sleep(0.2)


def test_select_returns_a_lease_and_a_resent_release_is_answered_released(peer: Peer) -> None:
    peer.result("sharding", "add_node", {"node": "node-1"})
    peer.result("balancer", "node_update", {"node": "node-1", "state": "alive", "lifecycle": "active",
                                            "address": "127.0.0.1:7001"})  # fmt: skip
    sel = _select(peer)
    assert sel["node"] == "node-1" and sel["address"] == "127.0.0.1:7001"
    assert isinstance(sel["lease"], str) and isinstance(sel["strategy"], str) and sel["panic"] in (True, False)
    first = peer.result("balancer", "release", {"lease": sel["lease"], "latency_ms": 2.5})
    again = peer.result("balancer", "release", {"lease": sel["lease"], "latency_ms": 2.5})
    assert (first["status"], again["status"]) == ("released", "already_released")
    stats = peer.result("balancer", "stats")
    assert stats["releases"]["already_released"] >= 1


def test_select_without_lease_returns_nil_lease(peer: Peer) -> None:
    _select(peer)
    sel = peer.result("balancer", "select", {"key": "user:42", "lease": False})
    assert sel["lease"] is None


def test_the_request_body_is_a_msgpack_map_with_str_keys(peer: Peer) -> None:
    err = peer.error("sharding", "", body=packb({"op": "lookup", "args": {1: "k"}}))
    assert (err["code"], err["details"]["field"], err["details"]["type"]) == ("bad_request", "args", "int")
