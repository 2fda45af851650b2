"""``python -m services.echo``: answers ``echo`` (returns its args) and ``sleep``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import deque
from typing import Any

from phantom_bus import config as cfgmod
from phantom_bus import log
from phantom_bus.config import ConfigError
from phantom_bus.errors import BadRequest
from phantom_bus.service import SERVICE_SETTINGS, Service, run_forever


def build(cfg: cfgmod.Config, name: str = "echo", subscribe: list[str] | None = None) -> Service:
    """The echo service: ``echo`` returns what it was given, ``whoami`` the pid,
    ``sleep`` answers after a delay, ``fail`` raises, ``publish`` emits an event,
    ``events`` lists the last events received for the ``subscribe`` prefixes."""
    svc = Service(name, cfg)
    received: deque[dict[str, Any]] = deque(maxlen=100)

    def broken_callback(event: dict[str, Any]) -> None:
        raise RuntimeError("a callback that fails must not stop the others")

    for prefix in subscribe or ():
        svc.subscribe(prefix, broken_callback)
        svc.subscribe(prefix, received.append)

    @svc.operation("events")
    def events() -> list[dict[str, Any]]:
        return list(received)

    @svc.operation("echo")
    def echo(**args: Any) -> dict[str, Any]:
        return args

    @svc.operation("whoami")
    def whoami() -> int:
        return os.getpid()

    @svc.operation("sleep")
    async def sleep(seconds: float) -> float:
        if not isinstance(seconds, int | float) or not 0 <= seconds <= 60:
            raise BadRequest("seconds must be a number in 0..60")
        await asyncio.sleep(seconds)
        return seconds

    @svc.operation("fail")
    def fail() -> None:
        raise RuntimeError("asked to fail")

    @svc.operation("publish")
    async def publish(kind: str, data: dict[str, Any] | None = None) -> bool:
        await svc.publish(kind, data or {})
        return True

    return svc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phantom-echo")
    parser.add_argument("--name", default="echo", help="service name to register as")
    parser.add_argument("--subscribe", action="append", help="event prefix to record (repeatable)")
    cfgmod.add_flags(parser, SERVICE_SETTINGS)
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.from_args(args, SERVICE_SETTINGS)
    except ConfigError as exc:
        print(f"phantom-echo: {exc}", file=sys.stderr)
        return 2
    log.setup(args.name, json=cfg.log_json, level=cfg.log_level)
    return run_forever(build(cfg, args.name, args.subscribe))


if __name__ == "__main__":
    sys.exit(main())
