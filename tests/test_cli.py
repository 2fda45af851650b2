"""The `phantom` command: output and exit codes per DESIGN.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, Bus, free_port

pytestmark = pytest.mark.processes


def phantom(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phantom_bus.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreachable_broker_exits_69_with_one_line(bus: Bus) -> None:
    env = {**bus.env, "PHANTOM_BROKER": f"tcp://127.0.0.1:{free_port()}"}
    result = phantom(env, "status")
    assert result.returncode == 69
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not answer" in lines[0]


def test_usage_errors_exit_2(bus: Bus) -> None:
    assert phantom(bus.env, "frobnicate").returncode == 2
    assert phantom(bus.env, "register", "n1").returncode == 2  # --address missing
    bad = phantom({**bus.env, "PHANTOM_BROKER": "not-an-endpoint"}, "status")
    assert bad.returncode == 2 and "broker" in bad.stderr


def test_status_json_lists_services_and_exits_1_when_the_manager_does_not_answer(bus: Bus) -> None:
    bus.broker()
    bus.wait_workers("echo", 0)
    result = phantom(bus.env, "status", "--json")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["health"] == "unknown" and doc["manager"] == "not answering"
    assert result.stderr.strip().startswith("phantom: manager not answering")
    assert doc["services"]["broker"] == "up"
    assert {"health", "epoch", "nodes", "shards", "services"} <= set(doc)


def test_status_table_names_each_service(bus: Bus) -> None:
    bus.broker()
    bus.wait_workers("echo", 0)
    result = phantom(bus.env, "status")
    assert result.returncode == 1
    assert "health: unknown (manager not answering" in result.stdout
    for name in ("broker up", "manager down", "sharding down"):
        assert name in result.stdout


def test_operation_on_a_missing_service_exits_1_saying_why(bus: Bus) -> None:
    bus.broker()
    bus.wait_workers("echo", 0)
    result = phantom({**bus.env, "PHANTOM_TIMEOUT": "0.5"}, "shards")
    assert result.returncode == 1
    assert "service_unavailable" in result.stderr and "sharding" in result.stderr
