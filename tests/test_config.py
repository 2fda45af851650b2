"""Settings: precedence, validation naming the setting, and the docs table."""

from __future__ import annotations

from pathlib import Path

import pytest

from phantom_bus import config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_apply_when_nothing_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config.load(env={})
    assert cfg.broker == "tcp://127.0.0.1:5555"
    assert cfg.data == "var"
    assert cfg.source("broker") == "default"


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "phantom.toml").write_text('timeout = 4.0\nretries = 5\ndata = "from-file"\n')
    env = {"PHANTOM_TIMEOUT": "3.0", "PHANTOM_RETRIES": "4"}
    cfg = config.load({"timeout": "2.0"}, env=env)
    assert (cfg.timeout, cfg.retries, cfg.data) == (2.0, 4, "from-file")
    assert cfg.source("timeout") == "flag --timeout"
    assert cfg.source("retries") == "environment PHANTOM_RETRIES"
    assert cfg.source("data").endswith("key data")


def test_config_path_from_env_and_sections_flatten(tmp_path: Path) -> None:
    path = tmp_path / "custom.toml"
    path.write_text('[log]\njson = true\nlevel = "debug"\n')
    cfg = config.load(env={"PHANTOM_CONFIG": str(path)})
    assert cfg.log_json is True
    assert cfg.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PHANTOM_BROKER": "localhost:5555"}, "broker"),
        ({"PHANTOM_BROKER": "tcp://127.0.0.1:99999"}, "broker"),
        ({"PHANTOM_TIMEOUT": "-1"}, "timeout"),
        ({"PHANTOM_TIMEOUT": "soon"}, "timeout"),
        ({"PHANTOM_RETRIES": "2.5"}, "retries"),
        ({"PHANTOM_LOG_JSON": "maybe"}, "log_json"),
        ({"PHANTOM_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(
    env: dict[str, str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError) as info:
        config.load(env=env)
    assert repr(named) in str(info.value)
    assert next(iter(env)) in str(info.value)


def test_unknown_file_keys_and_missing_config_file_are_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "phantom.toml").write_text("brokr = 'tcp://x:1'\n")
    with pytest.raises(config.ConfigError, match="brokr"):
        config.load(env={})
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(env={"PHANTOM_CONFIG": str(tmp_path / "nope.toml")})
    (tmp_path / "phantom.toml").write_text("this is [not toml\n")
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(env={})


def test_bind_host_rewrites_only_the_host() -> None:
    cfg = config.load(env={"PHANTOM_BIND_HOST": "0.0.0.0"}, names=("broker", "bind_host"))
    assert cfg.bind("broker") == "tcp://0.0.0.0:5555"
    assert cfg.broker == "tcp://127.0.0.1:5555"


def test_the_operator_guide_holds_the_current_settings_table() -> None:
    guide = (ROOT / "docs" / "DISTRIBUTED_CLUSTER_MANAGEMENT.md").read_text()
    assert config.markdown_table() in guide, "regenerate with: python -m phantom_bus.config"


SERVICE_SETTINGS = ("agent", "discovery", "manager", "membership", "sharding")


def test_every_service_offers_its_own_settings_to_the_table_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse
    import importlib
    import importlib.metadata

    entries = {e.name: e.value for e in importlib.metadata.entry_points(group=config.ENTRY_POINTS)}
    assert entries == {name: f"services.{name}.settings:SETTINGS" for name in SERVICE_SETTINGS}
    for name in SERVICE_SETTINGS:
        module = importlib.import_module(f"services.{name}.settings")
        assert module.SETTINGS, name
        for setting in module.SETTINGS:
            assert config.SETTINGS[setting.name] is setting  # one table: load, flags and docs see it
            assert module.DEFAULTS[setting.name] == setting.default == config.default(setting.name)
            assert f"| `{setting.name}` | `{setting.env}` |" in config.markdown_table()
    # A service's setting in phantom.toml is known (not "unknown"), and gets a flag.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "phantom.toml").write_text("phi_dead = 9.5\n[participant]\ntimeout = 30\n")
    cfg = config.load(env={})
    assert (cfg.phi_dead, cfg.source("phi_dead")) == (9.5, "phantom.toml key phi_dead")
    assert cfg.participant_timeout == 30.0
    parser = argparse.ArgumentParser()
    config.add_flags(parser, ["dead_delay", "auto_join"])
    args = parser.parse_args(["--dead-delay", "5", "--auto-join"])
    assert (args.dead_delay, args.auto_join) == ("5", True)


def test_the_bus_imports_no_service_and_keeps_only_its_own_settings() -> None:
    import ast

    for path in (ROOT / "phantom_bus").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] == "services"], path
    own = {s.name for s in config._SETTINGS}
    assert {"broker", "data", "store", "security", "timeout", "worker_heartbeat", "max_message"} <= own
    assert not own & {"heartbeat_interval", "dead_delay", "node_id", "auto_join"}


def test_a_setting_registered_twice_under_one_name_is_refused() -> None:
    same = config.SETTINGS["dead_delay"]
    config.register(same)  # the same setting again: fine
    with pytest.raises(ValueError, match="dead_delay"):
        config.register(config.Setting("dead_delay", 1.0, config.positive_float, "s", "another"))
