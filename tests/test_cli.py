"""The `phantom` command: output and exit codes as the operator's guide documents them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Bus, free_port, phantom

pytestmark = pytest.mark.processes


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


# --- without a cluster: the command functions against a scripted client -------------------


class ScriptedClient:
    """Answers like a cluster would, from fixed documents."""

    def __init__(self, nodes: list[dict[str, object]], services: dict[str, object] | None = None) -> None:
        self.nodes = nodes
        self._services = services if services is not None else {"manager": {"workers": 1}}
        self.sent: list[tuple[str, str, dict[str, object]]] = []

    def services(self) -> dict[str, object]:
        return self._services

    def status(self) -> dict[str, object]:
        return {"health": "green", "nodes": self.nodes, "moves_in_flight": 0}

    def request(self, service: str, op: str, **args: object) -> object:
        self.sent.append((service, op, args))
        return {"removed": args.get("node")} if op == "remove" else {"node": args.get("node")}


def run_cmd(
    fn: object, client: ScriptedClient, capsys: pytest.CaptureFixture[str], **args: object
) -> tuple[int, str, str]:
    import argparse

    ns = argparse.Namespace(json=False, **args)
    code = fn(client, ns)  # type: ignore[operator]
    out = capsys.readouterr()
    return code, out.out, out.err


def test_remove_says_why_when_the_node_is_still_listed_alive(capsys: pytest.CaptureFixture[str]) -> None:
    from phantom_bus import cli

    client = ScriptedClient([{"id": "node-4", "state": "alive", "lifecycle": None}])
    cli_still = cli._still_alive
    cli._still_alive = lambda c, n: cli_still(c, n, settle=0.0)  # type: ignore[assignment]
    try:
        code, out, err = run_cmd(cli.cmd_remove, client, capsys, node="node-4")
    finally:
        cli._still_alive = cli_still  # type: ignore[assignment]
    assert code == 1 and "removed node-4" not in out
    assert "still listed alive" in err and "cluster.node_ignored" in err and "Stop the agent" in err


def test_drain_without_a_manager_uses_shardings_drain_node(capsys: pytest.CaptureFixture[str]) -> None:
    from phantom_bus import cli

    client = ScriptedClient([], services={"sharding": {"workers": 1}})
    code, out, _ = run_cmd(cli.cmd_drain, client, capsys, node="node-1", wait=False, wait_timeout=None)
    assert code == 0 and client.sent == [("sharding", "drain_node", {"node": "node-1"})]
    assert "the manager is not running" in out


def test_drain_wait_reports_progress_on_stderr_until_decommissioned(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from phantom_bus import cli

    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    steps = iter([("draining", 5), ("draining", 2), ("decommissioned", 0)])

    class Draining(ScriptedClient):
        def status(self) -> dict[str, object]:
            lifecycle, replicas = next(steps)
            return {"health": "green", "moves_in_flight": 1,
                    "nodes": [{"id": "node-1", "lifecycle": lifecycle, "replicas": replicas}]}

    code, out, err = run_cmd(cli.cmd_drain, Draining([]), capsys, node="node-1", wait=True, wait_timeout=None)
    assert code == 0 and "node-1 is decommissioned" in out
    assert err.splitlines() == [
        "phantom: node-1 draining: 5 replica(s) left, 1 move(s) in flight, health green",
        "phantom: node-1 draining: 2 replica(s) left, 1 move(s) in flight, health green",
    ]


def test_status_exits_3_only_for_yellow_or_red(capsys: pytest.CaptureFixture[str]) -> None:
    from phantom_bus import cli

    class Coloured(ScriptedClient):
        health = "green"

        def status(self) -> dict[str, object]:
            return {"health": self.health, "nodes": [], "shards": {"moving": 2}, "moves_in_flight": 2}

    for health, code in (("green", 0), ("yellow", 3), ("red", 3), ("purple", 1)):
        client = Coloured([])
        client.health = health
        got, out, _ = run_cmd(cli.cmd_status, client, capsys)
        assert got == code, health
        assert health != "green" or "2 moving (2 moves in flight)" in out


def test_natural_order_puts_2_before_10() -> None:
    from phantom_bus.cli import natural_key

    assert sorted(["default/10", "default/2", "default/1", "a/0"], key=natural_key) == [
        "a/0", "default/1", "default/2", "default/10"]


@pytest.mark.parametrize(("pattern", "kind", "shown"), [
    ("*", "shardmap.changed", True),
    ("*", "shardmap.current", False),      # once a second: shown only when asked for
    ("*", "member.load", False),
    ("shardmap.*", "shardmap.current", False),
    ("shardmap.current", "shardmap.current", True),
    ("member.load", "member.load", True),
    ("member.*", "member.alive", True),
])
def test_events_hides_the_chatty_kinds_unless_the_pattern_names_them(pattern: str, kind: str, shown: bool) -> None:
    from phantom_bus.cli import _chatty_shown, _wanted

    assert _wanted({"kind": kind}, pattern, _chatty_shown(pattern)) is shown
