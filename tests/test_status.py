"""The status document when the manager answers, and when it does not (phantom_bus.status)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from phantom_bus import status
from phantom_bus.errors import BrokerUnreachable, PhantomError, Refused, ServiceUnavailable, Timeout

UP = {"workers": 1, "instances": [{"pid": 1}]}


class FakeClient:
    """services() and request() from canned answers; an exception instance is raised, and
    an operation without an answer is a service that cannot serve it."""

    def __init__(self, services: dict[str, Any], answers: dict[tuple[str, str], Any]) -> None:
        self._services = services
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    def services(self) -> dict[str, Any]:
        return self._services

    def request(self, service: str, op: str, /, **args: Any) -> Any:
        self.asked.append((service, op))
        answer = self.answers.get((service, op), ServiceUnavailable(f"no answer for {service}.{op}"))
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
    assert client.asked == [("discovery", "nodes"), ("broker", "ping")]


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


def worker(instance: str | None, pid: int = 1, host: str = "box") -> dict[str, Any]:
    return {"pid": pid, "host": host, **({"instance": instance} if instance else {})}


def test_control_instances_merge_the_tables_of_several_brokers_and_name_the_brokers() -> None:
    h1 = {"sharding": {"workers": 2, "instances": [worker("h1"), worker("h2")]},
          "echo": {"workers": 1, "instances": [worker(None, pid=42)]}}  # fmt: skip
    h3 = {"sharding": {"workers": 2, "instances": [worker("h3"), worker("h2")]}, "manager": {"instances": "junk"}}
    got = status.instances([h1, h3, "not a table"], brokers=["h3", "h1", ""])
    assert got["sharding"] == ["h1", "h2", "h3"]
    assert got["broker"] == ["h1", "h3"]
    assert got["echo"] == ["box:42"]  # a worker without an instance name: HOST:PID
    assert got["manager"] == [] and set(status.SERVICES) <= set(got)


def test_control_block_has_every_leading_service_and_drops_what_names_nobody() -> None:
    block = status.control_block(
        "etcd", {"sharding": {"instance": "h2", "term": 7, "leader": True}, "manager": {"instance": None}}, []
    )
    assert block["store"] == "etcd"
    assert block["leaders"] == {"sharding": {"instance": "h2", "term": 7}, "manager": None, "membership": None}
    assert block["instances"]["broker"] == []


def test_without_the_manager_control_says_who_leads_sharding_and_membership_by_their_own_word() -> None:
    services = {name: {"workers": 1, "instances": [worker("h1")]} for name in EVERYTHING}
    answers = {
        ("manager", "status"): Timeout("slow"),
        ("sharding", "health"): {"total": 64, "leader": {"instance": "h2", "term": 9, "leader": False, "self": "h1"}},
        ("membership", "verdicts"): {"term": 4, "instance": "h3", "members": []},
        ("broker", "ping"): {"pong": True, "instance": "h1"},
    }
    doc = status.collect(FakeClient(services, answers))
    control = doc["control"]
    assert control["instances"]["broker"] == ["h1"]  # the broker that answered
    assert control["store"] is None  # only the manager reads the store
    assert control["leaders"] == {
        "sharding": {"instance": "h2", "term": 9}, "membership": {"instance": "h3", "term": 4}, "manager": None,
    }  # fmt: skip
    assert control["instances"]["sharding"] == ["h1"]
    assert asyncio.run(status.collect_async(FakeAsyncClient(services, answers))) == doc


def test_control_text_names_the_leaders_and_the_instances_once_when_every_service_has_the_same() -> None:
    same = {"store": "etcd", "leaders": {"sharding": {"instance": "h2", "term": 7}, "manager": None},
            "instances": {"broker": ["h1", "h2", "h3"], "sharding": ["h1", "h2", "h3"]}}  # fmt: skip
    assert status.control_text({"control": same}) == [
        "control: store etcd; leaders sharding h2 (term 7), manager none",
        "instances: h1 h2 h3 (every service)",
    ]
    short = {**same, "instances": {"broker": ["h1", "h3"], "sharding": ["h1", "h2", "h3"]}}
    assert status.control_text({"control": short})[1] == "instances: broker h1 h3; sharding h1 h2 h3"
    assert status.control_text({"health": "green"}) == [] and status.control_text({"control": "junk"}) == []
