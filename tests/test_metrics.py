"""/metrics: the series reference in the docs, the manager's cluster view, the HTTP
endpoint; and the flat JSON log lines."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from loguru import logger
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from phantom_bus import log, metrics
from services.manager.health import ShardInfo, assess
from services.manager.registry import NodeRecord
from services.manager.service import cluster_metrics
from tests.conftest import ROOT, free_port


def test_metrics_reference_in_the_guide_is_the_generated_one() -> None:
    guide = (ROOT / "docs" / "DISTRIBUTED_CLUSTER_MANAGEMENT.md").read_text()
    assert metrics.reference() in guide, "regenerate with: python -m phantom_bus.metrics"


def record(node: str, member: str | None, lifecycle: str = "active") -> NodeRecord:
    return NodeRecord(node, "127.0.0.1:7001", "z1", 1.0, 1, lifecycle, member, None, 0.0, 0.0, "", True, "beacon")


def exposition(families: list[object]) -> str:
    registry = CollectorRegistry()

    class Fixed:
        def collect(self) -> list[object]:
            return families

    registry.register(Fixed())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_cluster_view_counts_nodes_shards_and_reexports_the_select_histogram() -> None:
    shards = [
        ShardInfo("d/0", 2, (("a", "primary"), ("b", "replica"))),
        ShardInfo("d/1", 2, (("a", "primary"), ("b", "replica"), ("c", "joining"))),
        ShardInfo("d/2", 2, (("b", "primary"), ("c", "replica"))),
    ]
    states = {"a": "alive", "b": "alive", "c": "dead"}
    health = assess(shards, states)
    timer = metrics.SelectTimer()
    for seconds in (0.0002, 0.0003, 0.02):
        timer.observe(seconds)
    snap = json.loads(json.dumps(timer.snapshot()))  # it travels in the stats reply
    text = exposition(cluster_metrics(health, [record("a", "alive"), record("b", "alive"),
                                               record("c", "dead", "failed")], 9, 1, snap))
    assert "phantom_cluster_health 1.0" in text  # d/2 lost its copy on c: yellow
    assert 'phantom_nodes{state="alive"} 2.0' in text and 'phantom_nodes{state="dead"} 1.0' in text
    assert 'phantom_node_lifecycle{lifecycle="failed"} 1.0' in text
    assert 'phantom_shards{state="ok"} 1.0' in text and 'phantom_shards{state="moving"} 1.0' in text
    assert 'phantom_shards{state="under_replicated"} 1.0' in text
    assert "phantom_shardmap_epoch 9.0" in text and "phantom_moves_in_flight 1.0" in text
    assert "phantom_select_seconds_count 3.0" in text
    assert 'phantom_select_seconds_bucket{le="0.0005"} 2.0' in text


def test_metrics_are_served_over_http_from_a_thread() -> None:
    address = f"127.0.0.1:{free_port()}"
    metrics.serve(address, "test", lambda: [])
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        body = reply.read().decode()
        assert reply.headers["Content-Type"].startswith("text/plain")
    assert 'phantom_up{service="test"} 1.0' in body and "process_cpu_seconds_total" in body


def test_bad_metrics_address_is_refused_naming_the_setting() -> None:
    from phantom_bus import config

    with pytest.raises(config.ConfigError, match="metrics"):
        config.load({"metrics": "nowhere"}, names=("metrics",))
    assert config.load({"metrics": ""}, names=("metrics",)).metrics == ""


def test_json_logs_are_flat_with_the_event_kind_as_a_field(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("manager", json=True)
    logger.bind(node="node-3", epoch=41).info("{}: {}", "member.dead", "phi 16.0 > 12.0")
    logger.bind(shard="default/7").warning("plain words")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert list(first)[:8] == list(log.JSON_KEYS)
    assert first["event"] == "member.dead" and first["node"] == "node-3" and first["epoch"] == 41
    assert first["service"] == "manager" and first["level"] == "INFO" and first["ts"].endswith("Z")
    assert second["event"] is None and second["shard"] == "default/7" and second["msg"] == "plain words"
    assert not any(isinstance(v, dict) for v in (*first.values(), *second.values()))
    log.setup("test")


def test_the_library_is_quiet_until_a_process_sets_up_logging() -> None:
    # A fresh interpreter: loguru's default sink writes DEBUG to stderr, which an
    # application embedding the client must not get unasked.
    # Lines are attributed to the module of the calling frame: run them as phantom_bus code.
    script = (
        "from loguru import logger\n"
        "from phantom_bus import log\n"
        "as_library = {'__name__': 'phantom_bus.follower', 'logger': logger}\n"
        "exec(\"logger.debug('library line before set-up')\", as_library)\n"
        "log.setup('app', level='DEBUG')\n"
        "exec(\"logger.debug('library line after set-up')\", as_library)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "before set-up" not in done.stderr
    assert "after set-up" in done.stderr


def test_grafana_dashboard_queries_only_series_that_exist() -> None:
    import re

    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    known = {s.name.removesuffix("_total") for s in metrics.SERIES}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        names = set(re.findall(r"phantom_[a-z_]+", expr))
        assert names, expr
        for name in names:
            assert re.sub(r"_(bucket|count|sum)$", "", name) in known, f"{expr}: {name} is not exported"
