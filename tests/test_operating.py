"""Operating a running cluster: the CLI's messages and exit codes, `phantom events`,
`drain --wait`, key space commands and /metrics, against one real cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, Bus, command, free_port, phantom, wait_until
from tests.test_cluster import settled, status

pytestmark = pytest.mark.processes

SERVICES = ("discovery", "membership", "sharding", "balancer", "manager")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bus, str]]:
    bus = Bus(tmp_path_factory.mktemp("operating"))
    metrics = f"127.0.0.1:{free_port()}"
    try:
        bus.env["PHANTOM_COPY_TIME"] = "0.1"
        bus.procs_by_name = {}  # type: ignore[attr-defined]
        bus.broker()
        for name in SERVICES:
            env = {"PHANTOM_METRICS": metrics} if name == "manager" else {}
            bus.procs_by_name[name] = bus.start(f"services.{name}", **env)  # type: ignore[attr-defined]
        for n in (1, 2, 3):
            bus.agent(n)
        wait_until(lambda: settled(status(bus)), timeout=60, interval=0.2)
        yield bus, metrics
    finally:
        bus.close()





def scrape(address: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# --- messages and exit codes -----------------------------------------------------------------


def test_version_and_json_errors_and_empty_key(cluster: tuple[Bus, str]) -> None:
    bus, _ = cluster
    version = phantom(bus, "--version")
    assert version.returncode == 0 and re.match(r"phantom \S+ \(wire protocol \d+\)", version.stdout)
    # Broker unreachable: exit 69, one line on stderr, and the JSON error document on stdout.
    away = phantom(bus, "nodes", "--json", PHANTOM_BROKER=f"tcp://127.0.0.1:{free_port()}")
    assert away.returncode == 69 and len(away.stderr.strip().splitlines()) == 1
    assert json.loads(away.stdout)["error"]["exit"] == 69
    usage = phantom(bus, "select", "--json")  # KEY missing
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"]["code"] == "usage"
    empty = phantom(bus, "select", "")
    assert empty.returncode == 2 and "KEY must not be empty" in empty.stderr
    unknown = phantom(bus, "drain", "no-such-node", "--json")
    assert unknown.returncode == 1 and json.loads(unknown.stdout)["error"]["code"] == "not_found"


def test_output_into_a_closed_pipe_has_no_traceback(cluster: tuple[Bus, str]) -> None:
    bus, _ = cluster
    result = command(bus, ["sh", "-c", f"{sys.executable} -m phantom_bus.cli shards | head -2"], timeout=60)
    assert len(result.stdout.splitlines()) == 2
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_shards_sort_naturally_and_green_status_exits_0(cluster: tuple[Bus, str]) -> None:
    bus, _ = cluster
    rows = json.loads(phantom(bus, "shards", "--json").stdout)
    ids = [r["shard"] for r in rows if r["keyspace"] == "default"]
    assert ids.index("default/2") < ids.index("default/10")
    assert phantom(bus, "status").returncode == 0


def test_keyspace_split_merge_and_moves_commands(cluster: tuple[Bus, str]) -> None:
    bus, _ = cluster
    made = phantom(bus, "create-keyspace", "users", "--kind", "range", "--split-points", "m", "--rf", "2")
    assert made.returncode == 0, made.stderr
    assert "created range key space users with 2 shard(s)" in made.stdout
    listed = json.loads(phantom(bus, "keyspaces", "--json").stdout)
    assert {"name": "users", "kind": "range", "shards": 2, "rf": 2, "slots": None} in listed
    users = [r["shard"] for r in json.loads(phantom(bus, "shards", "--json").stdout) if r["keyspace"] == "users"]
    split = phantom(bus, "split", users[1], "--at-key", "t", "--json")
    assert split.returncode == 0, split.stderr
    low, high = json.loads(split.stdout)["shards"]
    # A merge is refused while a shard is still settling after the split: retried like a user would.
    merged = wait_until(lambda: (r := phantom(bus, "merge", low, high)).returncode == 0 and r, timeout=30,
                        interval=0.5)
    assert merged.stdout.startswith(("merged", "merging"))
    moves = phantom(bus, "moves", "--json")
    assert moves.returncode == 0 and isinstance(json.loads(moves.stdout), list)
    bad = phantom(bus, "create-keyspace", "x", "--kind", "hash", "--split-points", "a")
    assert bad.returncode == 2 and "--split-points is for --kind range" in bad.stderr


# --- a join, a drain, a kill: events, metrics, lifecycle -----------------------------------------


def test_join_drain_and_kill_show_in_events_and_metrics(cluster: tuple[Bus, str]) -> None:
    bus, metrics = cluster
    before = scrape(metrics)
    assert before["phantom_cluster_health"] == 0
    assert before['phantom_nodes{state="alive"}'] == 3
    assert before["phantom_shardmap_epoch"] >= 1
    assert before['phantom_shards{state="unavailable"}'] == 0
    # The recent list goes back far enough that a CLI slow to start on a loaded machine
    # still shows node-4's first events: from the list or from the stream, each once.
    follow = subprocess.Popen(
        [sys.executable, "-m", "phantom_bus.cli", "events", "--follow", "--json", "--type", "cluster.node_*",
         "--limit", "1000"],
        cwd=ROOT, env=bus.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    follow_all = subprocess.Popen(
        [sys.executable, "-m", "phantom_bus.cli", "events", "--follow", "--json", "--type", "member.*"],
        cwd=ROOT, env=bus.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)  # let the subscriptions reach the publishers
        agent = bus.agent(4)
        wait_until(lambda: scrape(metrics).get('phantom_nodes{state="alive"}') == 4, timeout=30, interval=0.3)
        kinds: list[str] = []
        assert follow_all.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "member.alive" not in kinds:
            line = follow_all.stdout.readline()
            event = json.loads(line)  # every line is one JSON object
            if event.get("node") == "node-4":
                kinds.append(event["kind"])
        assert "member.alive" in kinds

        drained = phantom(bus, "drain", "node-4", "--wait", "--wait-timeout", "90")
        assert drained.returncode == 0, drained.stderr
        assert "node-4 is decommissioned" in drained.stdout
        assert "node-4 draining" in drained.stderr or "node-4 decommissioned" in drained.stdout

        bus.kill(agent)
        wait_until(lambda: scrape(metrics).get('phantom_nodes{state="alive"}') == 3, timeout=30, interval=0.3)
        after = scrape(metrics)
        assert after['phantom_nodes{state="suspect"}'] + after['phantom_nodes{state="dead"}'] == 1
        assert after["phantom_shardmap_epoch"] > before["phantom_shardmap_epoch"]
        assert after['phantom_node_lifecycle{lifecycle="decommissioned"}'] == 1
        assert after.get("phantom_select_seconds_count", -1) >= 0
    finally:
        for proc in (follow, follow_all):
            proc.terminate()
            proc.wait(10)
    assert follow.stdout is not None
    joined = [e for line in follow.stdout.read().splitlines() if (e := json.loads(line)).get("node") == "node-4"]
    assert [e["kind"] for e in joined][:1] == ["cluster.node_registered"]
    assert {"cluster.node_active", "cluster.node_draining", "cluster.node_decommissioned"} <= {
        e["kind"] for e in joined}
    recent = phantom(bus, "events", "--type", "cluster.node_decommissioned")
    assert recent.returncode == 0 and "node-4" in recent.stdout


def test_remove_of_a_node_whose_agent_still_runs_says_so(cluster: tuple[Bus, str]) -> None:
    bus, _ = cluster
    agent = bus.agent(5)
    wait_until(lambda: any(n["id"] == "node-5" and n["lifecycle"] == "active" for n in status(bus)["nodes"]),
               timeout=30, interval=0.3)
    removed = phantom(bus, "remove", "node-5")
    still = any(n["id"] == "node-5" and n["state"] == "alive" for n in status(bus)["nodes"])
    if still:
        assert removed.returncode == 1 and "cluster.node_ignored" in removed.stderr
        assert "removed node-5" not in removed.stdout
    else:
        assert removed.returncode == 0 and removed.stdout.strip() == "removed node-5"
    bus.kill(agent)


def test_without_the_manager_drain_uses_shardings_operation(cluster: tuple[Bus, str]) -> None:
    bus, _ = cluster
    bus.kill(bus.procs_by_name["manager"])  # type: ignore[attr-defined]
    bus.wait_workers("manager", 0)
    result = phantom(bus, "drain", "node-3")
    assert result.returncode == 0, result.stderr
    assert "the manager is not running" in result.stdout
    rows = bus.request("sharding", "nodes")
    assert next(r for r in rows if r["node"] == "node-3")["state"] == "draining"
    waited = phantom(bus, "drain", "node-3", "--wait")
    assert waited.returncode == 1 and "needs the manager" in waited.stderr
