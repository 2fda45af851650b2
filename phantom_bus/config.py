"""Settings: every default in one table, and the rule that picks a value.

The table holds the bus's own settings (below: where things are, the store and
leader lease, security, logging, client requests, the broker and its workers)
and those of every installed service, each declared in its own package
(``services/<name>/settings.py``) and offered through the ``phantom.settings``
entry-point group of its distribution (``pyproject.toml``); they are read once,
when the table is first used.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
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


def positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    number = float(value)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError("expected a positive finite number")
    return number


def nonnegative_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("expected a finite number >= 0")
    return number


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected a whole number")
    number = int(value)
    if number <= 0:
        raise ValueError("expected a positive whole number")
    return number


def parse_bool(value: Any) -> bool:
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


def parse_path(value: Any) -> str:
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


def optional_text(value: Any) -> str:
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
        optional_text,
        "host",
        "If set (e.g. 0.0.0.0), sockets bind this host instead of the endpoint's; "
        "for hosts behind NAT or in containers where advertised and bound addresses differ.",
    ),
    Setting(
        "data",
        "var",
        parse_path,
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
        positive_float,
        "s",
        "Lease of a service's leader: a dead leader is replaced within about ttl + 0.5 s; it is renewed "
        "every ttl/3 and the leader steps down after 3/4 ttl without a renewal. 4 s rides out an etcd "
        "leader election (about 1 s) and a lost renewal; below 2 s etcd raises it to its minimum.",
    ),
    Setting(
        "instance",
        "",
        optional_text,
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
        optional_text,
        "directory",
        "Key directory made by `phantom keygen` (`[security] curve_dir` in phantom.toml): every "
        "socket is CURVE-encrypted and only keys under DIR/authorized may connect, fail closed. "
        "Empty: DATA/keys if it exists (a checkout's var/keys for clients run elsewhere).",
    ),
    Setting(
        "curve_key",
        "",
        optional_text,
        "role/name",
        "This process's own key: ROLE/NAME under curve_dir, or the path of a .key file. Empty: the "
        "program's own (broker/broker, service/NAME, agent/NODE_ID, operator/admin for the CLI, "
        "client/app for library clients).",
    ),
    # --- logging ----------------------------------------------------------------
    Setting(
        "log_json",
        False,
        parse_bool,
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
        positive_float,
        "s",
        "Per-attempt reply timeout of a client request: several heartbeat intervals, so a "
        "broker restart (about 1 s) is survived by the next retry.",
    ),
    Setting(
        "map_stale_after",
        10.0,
        positive_float,
        "s",
        "A locally routing client marks its selections stale (sel.stale) after this long "
        "without a successful map read. It keeps routing on the last map regardless (static "
        "stability); ten one-second polls missed is a control-plane outage, not a hiccup.",
    ),
    Setting(
        "retries",
        3,
        positive_int,
        "attempts",
        "Attempts per client request (Lazy Pirate); with the timeout the worst case is 7.5 s. Within "
        "that budget, retryable answers (no worker yet, not the leader, overloaded) are retried with "
        "back-off, so a leader takeover (about leader_ttl) is ridden out.",
    ),
    # --- selection leases: the balancer's and a locally routing client's -----------
    Setting(
        "lease_timeout",
        30.0,
        positive_float,
        "s",
        "A select's lease never released ends after this long (counted as expired, not as a node "
        "failure). Well above a client's worst case (3 attempts x 2.5 s) so live requests keep "
        "their lease; short enough that a crashed client stops skewing in-flight counts quickly.",
    ),
    # --- broker and workers -------------------------------------------------------
    Setting(
        "worker_heartbeat",
        0.5,
        positive_float,
        "s",
        "Broker <-> worker heartbeat interval: a dead worker is dropped within "
        "liveness x interval = 1.5 s, at 2 tiny messages per second per worker.",
    ),
    Setting(
        "worker_liveness",
        3,
        positive_int,
        "intervals",
        "Missed heartbeats before a worker (or the broker, seen from a worker) counts as gone; "
        "3 tolerates one lost or late heartbeat twice over.",
    ),
    Setting(
        "worker_concurrency",
        64,
        positive_int,
        "requests",
        "Requests the broker hands one worker before queueing: bounds a slow worker's backlog.",
    ),
    Setting(
        "broker_queue",
        10000,
        positive_int,
        "requests",
        "Requests queued per service while every worker is at its concurrency; beyond it "
        "clients get an 'overloaded' error at once instead of a timeout.",
    ),
    # --- messages -------------------------------------------------------------------
    Setting(
        "max_message",
        4 * 1024 * 1024,
        positive_int,
        "bytes",
        "Largest accepted message body (4 MiB holds a 4,096-shard map); larger ones are refused.",
    ),
]

#: The entry-point group through which an installed service offers its settings: each
#: entry names a sequence of :class:`Setting` (``services.membership.settings:SETTINGS``).
ENTRY_POINTS = "phantom.settings"


class _Table(Mapping[str, Setting]):
    """Every setting by name: the bus's own (above), then those of every installed
    service, read from the :data:`ENTRY_POINTS` group once, on first use (in the
    order of the entries' names), so the bus never imports a service by name."""

    def __init__(self, own: Iterable[Setting]) -> None:
        self._settings = {s.name: s for s in own}
        self._loaded = False

    def _table(self) -> dict[str, Setting]:
        if not self._loaded:
            from importlib.metadata import entry_points

            self._loaded = True  # set first: a settings module that reads the table does not recurse
            try:
                for entry in sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name):
                    self.add(*entry.load())
            except BaseException:
                self._loaded = False  # said once to whoever asked; the next use tries again
                raise
        return self._settings

    def add(self, *settings: Setting) -> None:
        """Add settings; a name taken by a different setting is a ValueError."""
        table = self._table()
        for setting in settings:
            if table.get(setting.name, setting) != setting:
                raise ValueError(f"setting {setting.name!r} registered twice")
        table.update((s.name, s) for s in settings)

    def __getitem__(self, name: str) -> Setting:
        # A name already known (every bus setting) needs no loading: the bus's own
        # modules read their defaults at import, before any service could be.
        known = self._settings.get(name)
        if known is not None:
            return known
        try:
            return self._table()[name]
        except KeyError:
            raise KeyError(
                f"no setting {name!r}: a service's settings come from the {ENTRY_POINTS!r} entry points "
                "of its installed package (after a change to pyproject.toml, run `pip install -e .`)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


#: Every setting by name: the bus's and every installed service's.
SETTINGS = _Table(_SETTINGS)


def defaults(settings: Iterable[Setting]) -> dict[str, Any]:
    """The default of each of ``settings`` by name: a service's cores take their
    defaults from its own settings this way, so every default lives in one table."""
    return {s.name: s.default for s in settings}


def default(name: str) -> Any:
    """The default of setting ``name`` (the bus's or an installed service's)."""
    return SETTINGS[name].default


def register(*settings: Setting) -> None:
    """Add settings from code (embedding code, tests); an installed service offers
    its own through the :data:`ENTRY_POINTS` group instead."""
    SETTINGS.add(*settings)


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
        if setting.parse is parse_bool:
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
