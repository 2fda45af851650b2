"""Settings: every default in one table, and the rule that picks a value.

Precedence, highest first: command-line flag > ``PHANTOM_<NAME>`` environment
variable > ``phantom.toml`` (path from ``PHANTOM_CONFIG``, else ``./phantom.toml``
if it exists) > the default below. A value that does not parse is refused at
start with a :class:`ConfigError` that names the setting and where it came from.

``python -m phantom_bus.config`` prints the table as Markdown; the docs embed
that output and a test keeps the two equal.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


# --- parsers: take a str (env, flag) or a TOML value, return the typed value ----


def _endpoint(value: Any) -> str:
    text = str(value).strip()
    if "://" not in text:
        raise ValueError("expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555")
    scheme, _, rest = text.partition("://")
    if scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ValueError("expected tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected tcp://HOST:PORT with a port in 1..65535")
    return text


def _optional_endpoint(value: Any) -> str:
    return "" if value in ("", None) else _endpoint(value)


def split_endpoints(value: str) -> list[str]:
    """The endpoints of an endpoint-list setting's value, in order (``"a,b"`` -> ``["a", "b"]``)."""
    return [part.strip() for part in str(value).split(",") if part.strip()]


def parse_endpoints(value: Any) -> str:
    """One endpoint or several, comma-separated (a TOML array also works); the
    value stays a comma-joined string, so a single endpoint reads as before."""
    parts = [str(p) for p in value] if isinstance(value, list | tuple) else str(value).split(",")
    seen: list[str] = []
    for n, part in enumerate(parts, 1):
        text = part.strip()
        if not text:
            raise ValueError(f"entry {n} of the list is empty (expected tcp://HOST:PORT[,tcp://HOST:PORT...])")
        try:
            endpoint = _endpoint(text)
        except ValueError as exc:
            raise ValueError(f"entry {n} ({text!r}): {exc}") from None
        if endpoint in seen:
            raise ValueError(f"{endpoint} is listed twice")
        seen.append(endpoint)
    if not seen:
        raise ValueError("expected at least one endpoint")
    return ",".join(seen)


def _positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    number = float(value)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError("expected a positive finite number")
    return number


def _nonnegative_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("expected a finite number >= 0")
    return number


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected a whole number")
    number = int(value)
    if number <= 0:
        raise ValueError("expected a positive whole number")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false (1/0, yes/no, on/off)")


def _level(value: Any) -> str:
    text = str(value).strip().upper()
    if text not in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected a log level: DEBUG, INFO, WARNING, ERROR")
    return text


def _security_mode(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    if text in ("on", "1", "true", "yes"):
        return "on"
    if text in ("off", "0", "false", "no"):
        return "off"
    raise ValueError("expected on or off")


def _path(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("expected a path")
    return text


def _optional_address(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    if text:
        from phantom_bus.metrics import parse_address

        parse_address(text)
    return text


def _optional_path(value: Any) -> str:
    return str(value).strip() if value not in (None,) else ""


def _store(value: Any) -> str:
    text = str(value).strip()
    if text == "sqlite" or (text.startswith("sqlite:") and len(text) > len("sqlite:")):
        return text
    if text.startswith("etcd://"):
        for part in text[len("etcd://") :].split(","):
            host, sep, port = part.strip().rstrip("/").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bad etcd endpoint {part!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
        return text
    raise ValueError("expected sqlite or etcd://HOST:PORT[,HOST:PORT...]")


def _store_prefix(value: Any) -> str:
    text = str(value).strip()
    if not (text.startswith("/") and text.endswith("/")) or "\x00" in text:
        raise ValueError("expected a key prefix that starts and ends with '/', such as /phantom/")
    return text


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its name, default, parser, unit and why the default is what it is."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    unit: str
    why: str

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return "PHANTOM_" + self.name.upper()

    @property
    def flag(self) -> str:
        """The command-line flag that sets it."""
        return "--" + self.name.replace("_", "-")


_SETTINGS: list[Setting] = [
    # --- where things are -----------------------------------------------------
    Setting(
        "broker",
        "tcp://127.0.0.1:5555",
        parse_endpoints,
        "endpoints",
        "Broker frontend(s) that clients, the CLI and phantom-top connect to. A comma-separated list "
        "names several brokers: a client fails over between them and keeps to the one that answered last. "
        "A broker binds only its own one.",
    ),
    Setting(
        "backend",
        "tcp://127.0.0.1:5556",
        parse_endpoints,
        "endpoints",
        "Broker backend(s) where services register and heartbeat; a service registers with every "
        "broker listed and serves requests from any, each connection kept alive on its own.",
    ),
    Setting(
        "events_in",
        "tcp://127.0.0.1:5557",
        parse_endpoints,
        "endpoints",
        "Broker XSUB socket(s) that event publishers connect to; an event is published to every one "
        "listed, numbered per publisher so that subscribers deliver it once.",
    ),
    Setting(
        "events_out",
        "tcp://127.0.0.1:5558",
        parse_endpoints,
        "endpoints",
        "Broker XPUB socket(s) that event subscribers connect to; a subscriber listens to every one "
        "listed and drops copies it has already delivered (same source and sequence).",
    ),
    Setting(
        "beacon",
        "tcp://127.0.0.1:5560",
        parse_endpoints,
        "endpoints",
        "Discovery's SUB socket for agent beacons (agents connect their PUB); agents beacon to every "
        "one listed, a discovery instance binds only its own one.",
    ),
    Setting(
        "heartbeat",
        "tcp://127.0.0.1:5561",
        parse_endpoints,
        "endpoints",
        "Membership's ROUTER socket for agent heartbeats; agents heartbeat every one listed (so every "
        "instance's detector stays warm), a membership instance binds only its own one.",
    ),
    Setting(
        "bind_host",
        "",
        _optional_path,
        "host",
        "If set (e.g. 0.0.0.0), sockets bind this host instead of the endpoint's; "
        "for hosts behind NAT or in containers where advertised and bound addresses differ.",
    ),
    Setting(
        "data",
        "var",
        _path,
        "directory",
        "State directory (SQLite files, agent incarnations, logs); relative to the working directory.",
    ),
    # --- the store and leaders ----------------------------------------------------
    Setting(
        "store",
        "sqlite",
        _store,
        "url",
        "Where durable control-plane state lives: sqlite (one file, DATA/store.sqlite3, shared by the "
        "processes of one host) or etcd://HOST:PORT[,HOST:PORT...] for a control plane on several hosts.",
    ),
    Setting(
        "store_prefix",
        "/phantom/",
        _store_prefix,
        "key prefix",
        "Every store key starts with it, so one etcd can serve several clusters (or tests) side by side.",
    ),
    Setting(
        "leader_ttl",
        4.0,
        _positive_float,
        "s",
        "Lease of a service's leader: a dead leader is replaced within about ttl + 0.5 s; it is renewed "
        "every ttl/3 and the leader steps down after 3/4 ttl without a renewal. 4 s rides out an etcd "
        "leader election (about 1 s) and a lost renewal; below 2 s etcd raises it to its minimum.",
    ),
    Setting(
        "instance",
        "",
        _optional_path,
        "name",
        "This process's name among the instances of its service (shown as leader and, for every "
        "service and broker, in the broker's services list; must be unique per service). Empty: HOST:PID.",
    ),
    # --- security -----------------------------------------------------------------
    Setting(
        "security",
        "on",
        _security_mode,
        "on|off",
        "on: CURVE with the keys in curve_dir, else in DATA/keys (which `make up` creates); a broker, "
        "service or agent without keys refuses to start, a client (CLI, phantom-top, library) that finds "
        "none connects without. off: no authentication or encryption even if keys exist, for a demo on "
        "one host only; every process says so in its log.",
    ),
    Setting(
        "curve_dir",
        "",
        _optional_path,
        "directory",
        "Key directory made by `phantom keygen` (`[security] curve_dir` in phantom.toml): every "
        "socket is CURVE-encrypted and only keys under DIR/authorized may connect, fail closed. "
        "Empty: DATA/keys if it exists (a checkout's var/keys for clients run elsewhere).",
    ),
    Setting(
        "curve_key",
        "",
        _optional_path,
        "role/name",
        "This process's own key: ROLE/NAME under curve_dir, or the path of a .key file. Empty: the "
        "program's own (broker/broker, service/NAME, agent/NODE_ID, operator/admin for the CLI, "
        "client/app for library clients).",
    ),
    # --- logging ----------------------------------------------------------------
    Setting(
        "log_json",
        False,
        _bool,
        "bool",
        "JSON lines for log shippers; plain text reads better on a terminal.",
    ),
    Setting(
        "log_level", "INFO", _level, "level", "INFO logs every decision once; DEBUG adds per-message detail."
    ),
    Setting(
        "metrics",
        "",
        _optional_address,
        "host:port",
        "Where this process serves its own Prometheus /metrics; empty: off, since each process needs "
        "its own port (supervisor.conf gives the manager, the cluster view, 127.0.0.1:9555).",
    ),
    # --- client -------------------------------------------------------------------
    Setting(
        "timeout",
        2.5,
        _positive_float,
        "s",
        "Per-attempt reply timeout of a client request: several heartbeat intervals, so a "
        "broker restart (about 1 s) is survived by the next retry.",
    ),
    Setting(
        "map_stale_after",
        10.0,
        _positive_float,
        "s",
        "A locally routing client marks its selections stale (sel.stale) after this long "
        "without a successful map read. It keeps routing on the last map regardless (static "
        "stability); ten one-second polls missed is a control-plane outage, not a hiccup.",
    ),
    Setting(
        "retries",
        3,
        _positive_int,
        "attempts",
        "Attempts per client request (Lazy Pirate); with the timeout the worst case is 7.5 s. Within "
        "that budget, retryable answers (no worker yet, not the leader, overloaded) are retried with "
        "back-off, so a leader takeover (about leader_ttl) is ridden out.",
    ),
    # --- broker and workers -------------------------------------------------------
    Setting(
        "worker_heartbeat",
        0.5,
        _positive_float,
        "s",
        "Broker <-> worker heartbeat interval: a dead worker is dropped within "
        "liveness x interval = 1.5 s, at 2 tiny messages per second per worker.",
    ),
    Setting(
        "worker_liveness",
        3,
        _positive_int,
        "intervals",
        "Missed heartbeats before a worker (or the broker, seen from a worker) counts as gone; "
        "3 tolerates one lost or late heartbeat twice over.",
    ),
    Setting(
        "worker_concurrency",
        64,
        _positive_int,
        "requests",
        "Requests the broker hands one worker before queueing: bounds a slow worker's backlog.",
    ),
    Setting(
        "broker_queue",
        10000,
        _positive_int,
        "requests",
        "Requests queued per service while every worker is at its concurrency; beyond it "
        "clients get an 'overloaded' error at once instead of a timeout.",
    ),
    # --- discovery and agents -------------------------------------------------------
    Setting(
        "beacon_interval",
        1.0,
        _positive_float,
        "s",
        "Seconds between an agent's beacons (agents and discovery must agree): a new node is seen "
        "within a second, and 5,000 nodes cost discovery a few percent of a core.",
    ),
    Setting(
        "beacon_expiry",
        5.0,
        _positive_float,
        "s",
        "Silence after which discovery reports node.lost; must exceed beacon_interval. Five "
        "intervals: PUB/SUB drops silently under load, so 4 beacons in a row must go missing "
        "before a false alarm. Discovery is a hint; membership decides liveness.",
    ),
    Setting(
        "discovery_forget",
        600.0,
        _positive_float,
        "s",
        "How long lost and left nodes stay listed (and keep their incarnation order) before "
        "they are forgotten: covers a reboot, bounds the table under churn.",
    ),
    Setting(
        "load_interval",
        1.0,
        _positive_float,
        "s",
        "Seconds between an agent's psutil samples: fine enough for balancing, and one "
        "sample costs about a millisecond of the host's CPU.",
    ),
    # --- membership: heartbeats and the phi-accrual failure detector --------------
    # The evidence for these values is in services/membership/config.py and
    # bench/failure_detection*.py.
    Setting(
        "heartbeat_interval",
        0.25,
        _positive_float,
        "s",
        "Seconds between an agent's heartbeats to membership; detection needs about 5 of them "
        "of silence, so 250 ms gives detection in about 1.3 s, under the 2 s goal.",
    ),
    Setting(
        "phi_window",
        200,
        _positive_int,
        "samples",
        "Inter-arrival gaps kept per node: 50 s at 4 Hz, so one late heartbeat barely moves the "
        "estimate and a changed network is learned within a minute.",
    ),
    Setting(
        "phi_min_std_dev",
        0.1,
        _positive_float,
        "s",
        "Floor on the gap's standard deviation: loopback jitter is a few ms, and without a floor "
        "phi explodes at the first 20 ms delay. 0.05 s triples false convictions under 1 s agent "
        "pauses; 0.2 s pushes worst detection to 1.94 s.",
    ),
    Setting(
        "acceptable_pause",
        0.5,
        _positive_float,
        "s",
        "Silence beyond the mean gap that counts as no evidence at all: two intervals cover an "
        "agent's GC or scheduler stall.",
    ),
    Setting(
        "phi_suspect",
        3.0,
        _positive_float,
        "phi",
        "Phi at which a node becomes suspect (about 1.06 s of silence at the defaults); suspicion "
        "is cheap and refutable.",
    ),
    Setting(
        "phi_dead",
        8.0,
        _positive_float,
        "phi",
        "Phi at which a suspect node is declared dead (about 1.31 s of silence at the defaults).",
    ),
    Setting(
        "suspicion_timeout",
        1.0,
        _positive_float,
        "s",
        "Longest a node may stay suspect before it is dead, whatever its history: bounds detection "
        "for nodes whose window learned long gaps.",
    ),
    Setting(
        "incarnation_lead",
        3600.0,
        _positive_float,
        "s",
        "How far ahead of membership's wall clock (or of the incarnation it holds, if higher) a "
        "heartbeat's incarnation may be; further is refused and counted (incarnation_ahead). "
        "Agents number incarnations in milliseconds of their clock, so only a clock more than an "
        "hour fast or a forged heartbeat exceeds it; one such heartbeat could otherwise push a "
        "node's incarnation to 2^63-1, past which its agent can never refute.",
    ),
    # --- manager and sharding -----------------------------------------------------------
    Setting(
        "auto_join",
        True,
        _bool,
        "bool",
        "A node that beacons and heartbeats gets replicas by itself; off: it waits for "
        "`phantom register NODE` (clusters where an unknown host must not receive data).",
    ),
    Setting(
        "dead_delay",
        60.0,
        _nonnegative_float,
        "s",
        "How long a dead node's replicas wait before they are re-created elsewhere (its primaries "
        "fail over at once): a restart or reboot within it costs no data movement.",
    ),
    Setting(
        "copy_time",
        0.5,
        _nonnegative_float,
        "s",
        "How long an agent takes to 'copy' a shard it is asked to hold before it confirms the "
        "replica: the agent stands in for the database here, so this simulates the copy.",
    ),
    # --- balancer -------------------------------------------------------------------
    Setting(
        "lease_timeout",
        30.0,
        _positive_float,
        "s",
        "A select's lease never released ends after this long (counted as expired, not as a node "
        "failure). Well above a client's worst case (3 attempts x 2.5 s) so live requests keep "
        "their lease; short enough that a crashed client stops skewing in-flight counts quickly.",
    ),
    # --- the database side: primary leases and the participant -------------------
    Setting(
        "primary_lease",
        2.0,
        _positive_float,
        "s",
        "How long a primary keeps taking writes after its agent's last successful lease renewal "
        "(renewed every quarter of it). Failure detection takes about 1.3 s, so a 2 s lease adds "
        "little to a failover, while a control-plane restart of under 1.5 s costs no writes.",
    ),
    Setting(
        "lease_drift",
        0.5,
        _nonnegative_float,
        "s",
        "Added to primary_lease before the control plane promotes another primary: covers clock-rate "
        "differences between hosts (well under 1 ms per second) and the time an agent takes to start "
        "its fence callback once its lease ran out.",
    ),
    Setting(
        "participant",
        "sim",
        _path,
        "name",
        "How the agent drives the database: sim (a simulated copy of copy_time seconds, the demo), "
        "exec (run participant_exec per transition) or module:Class (a Python class, see "
        "docs/integrating.md).",
    ),
    Setting(
        "participant_exec",
        "",
        _optional_path,
        "command",
        "The command run per transition with participant=exec (split like a shell would, no shell); "
        "its environment says what to do (docs/integrating.md).",
    ),
    Setting(
        "participant_timeout",
        600.0,
        _positive_float,
        "s",
        "Longest one transition may run before it is killed and counted as failed: a copy of a few "
        "GiB takes well under that; a hung callback must not hold a shard for ever.",
    ),
    Setting("node_id", "", _optional_path, "id", "The agent's node id (required for an agent)."),
    Setting("zone", "default", _path, "name", "The agent's failure zone (rack, availability zone)."),
    Setting(
        "address",
        "",
        _optional_path,
        "host:port",
        "The database address the agent advertises; may differ from any bound address "
        "(NAT, containers). Empty: 127.0.0.1 and a port derived from the node id.",
    ),
    Setting(
        "weight", 1.0, _positive_float, "ratio", "The node's relative capacity for placement and balancing."
    ),
    Setting(
        "max_message",
        4 * 1024 * 1024,
        _positive_int,
        "bytes",
        "Largest accepted message body (4 MiB holds a 4,096-shard map); larger ones are refused.",
    ),
]

SETTINGS: dict[str, Setting] = {s.name: s for s in _SETTINGS}


def default(name: str) -> Any:
    """The default of setting ``name``: cores take their defaults from here, so
    every default lives in this one table."""
    return SETTINGS[name].default


def register(*settings: Setting) -> None:
    """Add settings owned by a service (they join the same table and docs)."""
    for setting in settings:
        if setting.name in SETTINGS and SETTINGS[setting.name] != setting:
            raise ValueError(f"setting {setting.name!r} registered twice")
        SETTINGS[setting.name] = setting


class Config(Mapping[str, Any]):
    """Resolved settings: ``cfg.broker``, ``cfg["data"]``, and ``cfg.source("data")``."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str]) -> None:
        self._values = values
        self._sources = sources

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def source(self, name: str) -> str:
        """Where the value of ``name`` came from: flag, env, file or default."""
        return self._sources[name]

    def endpoints(self, name: str) -> list[str]:
        """The endpoints of endpoint-list setting ``name``, in the order given."""
        return split_endpoints(self._values[name])

    def bind(self, name: str) -> str:
        """The endpoint to bind for endpoint setting ``name`` (honours ``bind_host``).

        A process binds one endpoint: a list (the form that connecting processes
        take) is refused with a :class:`ConfigError` that says so."""
        listed = split_endpoints(self._values[name])
        if len(listed) != 1:
            raise ConfigError(
                f"setting {name!r} lists {len(listed)} endpoints ({self._values[name]}, from "
                f"{self._sources.get(name, 'default')}); a process that binds it takes its own one endpoint "
                "(the lists are for the processes that connect)"
            )
        endpoint = listed[0]
        host = self._values.get("bind_host") or ""
        if host and endpoint.startswith("tcp://"):
            port = endpoint.rpartition(":")[2]
            return f"tcp://{host}:{port}"
        return endpoint

    def replace(self, **values: Any) -> Config:
        """A copy with some values changed (tests and embedding code)."""
        merged = {**self._values, **values}
        return Config(merged, {**self._sources, **{k: "override" for k in values}})


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".replace("-", "_")
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "_"))
        else:
            flat[name] = value
    return flat


# Keys of phantom.toml sections whose flattened name is not the setting's own.
_FILE_ALIASES = {
    "security_curve_dir": "curve_dir",
    "security_curve_key": "curve_key",
    "security_mode": "security",
}


def _aliased(values: dict[str, Any], path: Path) -> dict[str, Any]:
    for alias, name in _FILE_ALIASES.items():
        if alias in values:
            if name in values:
                raise ConfigError(f"{path}: both {name} and [security] {name} are set; keep one")
            values[name] = values.pop(alias)
    return values


def _read_file(env: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    explicit = env.get("PHANTOM_CONFIG")
    path = Path(explicit) if explicit else Path("phantom.toml")
    if not path.exists():
        if explicit:
            raise ConfigError(f"PHANTOM_CONFIG names {path}, which does not exist")
        return {}, ""
    try:
        with path.open("rb") as fh:
            return _aliased(_flatten(tomllib.load(fh)), path), str(path)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    names: Iterable[str] | None = None,
) -> Config:
    """Resolve settings (all of them, or only ``names``) from flags, env, file and defaults.

    ``flags`` maps setting names to values given on the command line; ``None``
    values mean "not given". Raises :class:`ConfigError` naming the bad setting.
    """
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file_values, file_name = _read_file(env)
    unknown = sorted(set(file_values) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"{file_name}: unknown setting(s) {', '.join(unknown)}")
    wanted = list(SETTINGS) if names is None else list(names)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in wanted:
        setting = SETTINGS[name]
        if name in flags:
            raw, where = flags[name], f"flag {setting.flag}"
        elif setting.env in env:
            raw, where = env[setting.env], f"environment {setting.env}"
        elif name in file_values:
            raw, where = file_values[name], f"{file_name} key {name}"
        else:
            values[name], sources[name] = setting.default, "default"
            continue
        try:
            values[name] = setting.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad value {raw!r} for setting {name!r} ({where}): {exc}") from None
        sources[name] = where
    return Config(values, sources)


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add a ``--flag`` per setting (as a string, parsed later by :func:`load`)."""
    for name in names:
        setting = SETTINGS[name]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": f"{setting.why} [{setting.env}]"}
        if setting.parse is _bool:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        else:
            kwargs["metavar"] = setting.unit.upper().replace(" ", "_")
        parser.add_argument(setting.flag, **kwargs)


def from_args(args: argparse.Namespace, names: Iterable[str]) -> Config:
    """Resolve ``names`` with the flags parsed into ``args`` taking precedence."""
    names = list(names)
    return load({n: getattr(args, n, None) for n in names}, names=names)


def markdown_table() -> str:
    """The settings table as Markdown, for the operator's guide."""
    lines = ["| setting | env | flag | default | unit | why |", "|---|---|---|---|---|---|"]
    for s in SETTINGS.values():
        default = "(empty)" if s.default in ("", None) else f"`{s.default}`"
        lines.append(f"| `{s.name}` | `{s.env}` | `{s.flag}` | {default} | {s.unit} | {s.why} |")
    return "\n".join(lines)


BEGIN_MARK = "<!-- settings table: generated by `python -m phantom_bus.config --write FILE` -->"
END_MARK = "<!-- end of settings table -->"


def write_table(path: Path) -> None:
    """Replace the settings table between the markers in the Markdown file ``path``."""
    text = path.read_text()
    start, end = text.index(BEGIN_MARK) + len(BEGIN_MARK), text.index(END_MARK)
    path.write_text(text[:start] + "\n" + markdown_table() + "\n" + text[end:])


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write_table(Path(sys.argv[2]))
    else:
        print(markdown_table())
