"""``python -m services.sharding``: the sharding process."""

from __future__ import annotations

import argparse
import sys

from phantom_bus import config as cfgmod
from phantom_bus import log
from phantom_bus.service import SERVICE_SETTINGS, run_forever
from services.sharding.service import SETTINGS, ShardingService
from services.sharding.store import StoreError


def main(argv: list[str] | None = None) -> int:
    names = tuple(dict.fromkeys((*SERVICE_SETTINGS, *SETTINGS)))
    parser = argparse.ArgumentParser(prog="phantom-sharding", description="Phantom sharding service")
    cfgmod.add_flags(parser, names)
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.from_args(args, names)
        log.setup("sharding", json=cfg.log_json, level=cfg.log_level)
        sharding = ShardingService(cfg)
    except (cfgmod.ConfigError, ValueError) as exc:
        print(f"phantom-sharding: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"phantom-sharding: the shard map under {args.data or 'var'} is unusable: {exc}", file=sys.stderr)
        return 1
    return run_forever(sharding.service, *sharding.loops())


if __name__ == "__main__":
    sys.exit(main())
