"""``python -m services.balancer``: the balancer process."""

from __future__ import annotations

import argparse
import sys

from phantom_bus import config as cfgmod
from phantom_bus import log
from phantom_bus.service import SERVICE_SETTINGS, run_forever
from services.balancer.service import SETTINGS, BalancerService


def main(argv: list[str] | None = None) -> int:
    names = tuple(dict.fromkeys((*SERVICE_SETTINGS, *SETTINGS)))
    parser = argparse.ArgumentParser(prog="phantom-balancer", description="Phantom load balancer")
    cfgmod.add_flags(parser, names)
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.from_args(args, names)
        balancer = BalancerService(cfg)
    except (cfgmod.ConfigError, ValueError) as exc:
        print(f"phantom-balancer: {exc}", file=sys.stderr)
        return 2
    log.setup("balancer", json=cfg.log_json, level=cfg.log_level)
    return run_forever(balancer.service, *balancer.loops())


if __name__ == "__main__":
    sys.exit(main())
