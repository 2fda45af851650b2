"""The status document when the manager answers, and when it does not (phantom_bus.status)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from phantom_bus import status
from phantom_bus.errors import BrokerUnreachable, PhantomError, Refused, ServiceUnavailable, Timeout

UP = {"workers": 1, "instances": [{"pid": 1}]}


class FakeClient:
    """services() and request() from canned answers; an exception instance is raised."""

    def __init__(self, services: dict[str, Any], answers: dict[tuple[str, str], Any]) -> None:
        self._services = services
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    def services(self) -> dict[str, Any]:
        return self._services

    def request(self, service: str, op: str, /, **args: Any) -> Any:
        self.asked.append((service, op))
        answer = self.answers[service, op]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeAsyncClient(FakeClient):
    async def services(self) -> dict[str, Any]:  # type: ignore[override]
        return self._services

    async def request(self, service: str, op: str, /, **args: Any) -> Any:  # type: ignore[override]
        return FakeClient.request(self, service, op, **args)


NODES = [{"id": "node-1", "state": "alive", "address": "127.0.0.1:7001", "zone": "z1", "incarnation": 5}]
MEMBERS = [{"id": "node-1", "state": "alive", "incarnation": 5, "load": {"cpu": 3.0}, "load_stale": False}]
EVERYTHING = {name: UP for name in ("discovery", "membership", "sharding", "balancer", "manager")}


@pytest.mark.parametrize(
    "failure", [Timeout("manager.status timed out after 3 attempts"), ServiceUnavailable("worker lost")]
)
def test_a_manager_that_does_not_answer_is_not_a_red_cluster(failure: PhantomError) -> None:
    client = FakeClient(
        EVERYTHING,
        {("manager", "status"): failure, ("discovery", "nodes"): NODES, ("membership", "members"): MEMBERS},
    )
    doc = status.collect(client)
    assert doc["health"] == "unknown" and doc["manager"] == "not answering" and status.not_answering(doc)
    assert doc["reason"].startswith("manager not answering") and failure.code in doc["reason"]
    assert [r["code"] for r in doc["reasons"]] == ["manager_not_answering"]
    assert doc["nodes"][0]["id"] == "node-1" and doc["nodes"][0]["state"] == "alive" and doc["nodes"][0]["cpu"] == 3.0
    assert doc["services"]["manager"] == "up" and doc["services"]["broker"] == "up"
    assert doc["shards"] == {"total": None, "under_replicated": None, "unavailable": None}


def test_a_manager_not_registered_is_not_answering_too_and_down_services_are_not_asked() -> None:
    client = FakeClient({"discovery": UP}, {("discovery", "nodes"): NODES})
    doc = status.collect(client)
    assert doc["health"] == "unknown" and "not registered" in doc["reason"]
    assert doc["services"] == {
        "broker": "up", "discovery": "up", "membership": "down", "sharding": "down", "balancer": "down",
        "manager": "down",
    }  # fmt: skip
    assert client.asked == [("discovery", "nodes")]


def test_the_managers_answer_is_passed_on_marked_as_such() -> None:
    answer = {"health": "yellow", "reason": "1 shard under-replicated", "nodes": [], "reasons": []}
    doc = status.collect(FakeClient(EVERYTHING, {("manager", "status"): answer}))
    assert doc["health"] == "yellow" and doc["manager"] == "answering" and not status.not_answering(doc)
    older = status.collect(FakeClient(EVERYTHING, {("manager", "status"): {"health": "green"}}))
    assert older["reasons"] == []  # a manager without control-plane reasons


@pytest.mark.parametrize("failure", [BrokerUnreachable("no broker"), Refused("role client may not")])
def test_faults_of_the_caller_or_the_broker_are_raised_not_hidden(failure: PhantomError) -> None:
    with pytest.raises(type(failure)):
        status.collect(FakeClient(EVERYTHING, {("manager", "status"): failure}))


def test_the_async_path_builds_the_same_document() -> None:
    answers = {
        ("manager", "status"): Timeout("slow"),
        ("discovery", "nodes"): NODES,
        ("membership", "members"): ServiceUnavailable("restarting"),
    }
    doc = asyncio.run(status.collect_async(FakeAsyncClient(EVERYTHING, answers)))
    assert doc == status.collect(FakeClient(EVERYTHING, answers))
    assert doc["nodes"][0]["state"] == "alive"  # from discovery when membership does not answer
