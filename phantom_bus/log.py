"""Logging set-up: one loguru sink per process, text or JSON lines.

Every process calls :func:`setup` once at start. Fields bound with
``logger.bind(node=..., shard=..., epoch=...)`` appear in JSON output under
``record.extra`` and in text output after the message.
"""

from __future__ import annotations

import sys
from typing import Any

from loguru import logger

_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[process]}</cyan> {message}{extra[_fields]}"
)


def _fields(record: Any) -> None:
    extra = record["extra"]
    shown = {k: v for k, v in extra.items() if k not in ("process", "_fields")}
    extra["_fields"] = "".join(f" {k}={v}" for k, v in shown.items()) if shown else ""


def setup(process: str, *, json: bool = False, level: str = "INFO", **fields: Any) -> None:
    """Route this process's logs to stderr (supervisord files them per process).

    ``process`` and any ``fields`` (e.g. ``node="node-1"``) are bound to every line.
    """
    logger.remove()
    logger.configure(extra={"process": process, **fields}, patcher=_fields)
    if json:
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=level,
            format=_TEXT_FORMAT,
            colorize=sys.stderr.isatty(),
            backtrace=False,
            diagnose=False,
        )
