"""``python -m services.discovery``: the discovery process."""

from __future__ import annotations

import argparse
import sys

from phantom_bus import config as cfgmod
from phantom_bus import log
from phantom_bus.service import SERVICE_SETTINGS, run_forever
from services.discovery.service import SETTINGS, Discovery


def main(argv: list[str] | None = None) -> int:
    names = tuple(dict.fromkeys((*SERVICE_SETTINGS, *SETTINGS)))
    parser = argparse.ArgumentParser(prog="phantom-discovery", description="Phantom node discovery")
    cfgmod.add_flags(parser, names)
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.from_args(args, names)
        discovery = Discovery(cfg)
    except (cfgmod.ConfigError, ValueError) as exc:
        print(f"phantom-discovery: {exc}", file=sys.stderr)
        return 2
    log.setup("discovery", json=cfg.log_json, level=cfg.log_level)
    return run_forever(discovery.service, discovery.beacon_loop(), discovery.tick_loop())


if __name__ == "__main__":
    sys.exit(main())
