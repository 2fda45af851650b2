"""Logging set-up: one loguru sink per process, text or flat JSON lines.

Every process calls :func:`setup` once at start. Fields bound with
``logger.bind(node=..., shard=..., epoch=...)`` appear after the message in
text output, and as top-level keys in JSON output.

JSON lines (``PHANTOM_LOG_JSON=1``) are flat, one object a line, always with
``ts`` (ISO 8601 UTC), ``level``, ``service``, ``event``, ``msg``, ``node``,
``shard`` and ``epoch`` (``null`` when not known), then any other bound field.
``event`` is the event kind when the line reports one (a message that starts
with ``kind.name:``, as every event line does, or a bound ``event`` field),
else ``null``. An exception adds ``exception`` (its text).
"""

from __future__ import annotations

import json as jsonlib
import re
import sys
from datetime import UTC
from typing import Any

from loguru import logger

_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[process]}</cyan> {message}{extra[_fields]}"
)
#: The keys every JSON line has, in this order.
JSON_KEYS = ("ts", "level", "service", "event", "msg", "node", "shard", "epoch")
# "member.dead: ..." or "cluster.health (...)": an event kind at the start of a message.
_EVENT_KIND = re.compile(r"^([a-z_]+\.[a-z_.]+)(?=[:\s(]|$)")
_INTERNAL = ("process", "_fields")


def _fields(record: Any) -> None:
    extra = record["extra"]
    shown = {k: v for k, v in extra.items() if k not in _INTERNAL}
    extra["_fields"] = "".join(f" {k}={v}" for k, v in shown.items()) if shown else ""


def json_line(record: Any) -> str:
    """One flat JSON object for a loguru ``record`` (see the module docstring)."""
    extra = {k: v for k, v in record["extra"].items() if k not in _INTERNAL}
    message = record["message"]
    event = extra.pop("event", None)
    if event is None:
        match = _EVENT_KIND.match(message)
        event = match.group(1) if match else None
    doc: dict[str, Any] = {
        "ts": record["time"].astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record["level"].name,
        "service": record["extra"].get("process"),
        "event": event,
        "msg": message,
        "node": extra.pop("node", None),
        "shard": extra.pop("shard", None),
        "epoch": extra.pop("epoch", None),
    }
    for key, value in extra.items():
        doc.setdefault(key, value)
    if record["exception"] is not None:
        exc = record["exception"]
        doc["exception"] = f"{exc.type.__name__ if exc.type else 'Exception'}: {exc.value}"
    return jsonlib.dumps(doc, default=str)


def _json_sink(message: Any) -> None:
    sys.stderr.write(json_line(message.record) + "\n")
    sys.stderr.flush()


def setup(process: str, *, json: bool = False, level: str = "INFO", **fields: Any) -> None:
    """Route this process's logs to stderr (supervisord files them per process).

    ``process`` and any ``fields`` (e.g. ``node="node-1"``) are bound to every line.
    """
    logger.remove()
    logger.enable("phantom_bus")  # quiet as a library (see phantom_bus/__init__.py), not as a process
    logger.configure(extra={"process": process, **fields}, patcher=_fields)
    if json:
        logger.add(_json_sink, level=level, format="{message}", backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=level,
            format=_TEXT_FORMAT,
            colorize=sys.stderr.isatty(),
            backtrace=False,
            diagnose=False,
        )
