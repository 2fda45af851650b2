"""`phantom status` with a real manager: paused (SIGSTOP), it is "manager not answering", never red."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from phantom_bus.errors import PhantomError
from tests.conftest import Bus, wait_until
from tests.conftest import phantom as cli

pytestmark = pytest.mark.processes


def phantom(bus: Bus, *args: str) -> subprocess.CompletedProcess[str]:
    # Short attempts: a paused manager must be reported quickly, not waited for.
    return cli(bus, *args, timeout=60, PHANTOM_TIMEOUT="0.5", PHANTOM_RETRIES="2")


def test_a_paused_manager_is_not_answering_and_the_cluster_is_not_called_red(bus: Bus) -> None:
    bus.broker()
    bus.start("services.discovery")
    bus.start("services.membership")
    manager = bus.start("services.manager")
    bus.agent(1)

    def answering() -> bool:
        try:
            with bus.client() as c:
                doc = c.status()
        except PhantomError:
            return False
        return doc.get("manager") == "answering" and any(n["state"] == "alive" for n in doc["nodes"])

    wait_until(answering, timeout=30, interval=0.2)
    before = json.loads(phantom(bus, "status", "--json").stdout)
    assert before["manager"] == "answering" and isinstance(before["reasons"], list)
    manager.send_signal(signal.SIGSTOP)
    try:
        result = phantom(bus, "status", "--json")
        doc = json.loads(result.stdout)
        assert result.returncode == 1, result.stderr
        assert doc["manager"] == "not answering" and doc["health"] == "unknown"
        assert "manager not answering" in result.stderr
        assert [r["code"] for r in doc["reasons"]] == ["manager_not_answering"]
        # What the others know is still shown: the node is alive.
        assert {n["id"]: n["state"] for n in doc["nodes"]}.get("node-1") == "alive"
    finally:
        manager.send_signal(signal.SIGCONT)
    wait_until(answering, timeout=30, interval=0.2)
