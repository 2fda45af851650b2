"""``python -m services.membership``: the membership process."""

from __future__ import annotations

import argparse
import sys

from phantom_bus import config as cfgmod
from phantom_bus import log
from phantom_bus.service import SERVICE_SETTINGS, run_forever
from services.membership.service import SETTINGS, MembershipService


def main(argv: list[str] | None = None) -> int:
    names = tuple(dict.fromkeys((*SERVICE_SETTINGS, *SETTINGS)))
    parser = argparse.ArgumentParser(prog="phantom-membership", description="Phantom membership and failure detection")
    cfgmod.add_flags(parser, names)
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.from_args(args, names)
        membership = MembershipService(cfg)
    except (cfgmod.ConfigError, ValueError) as exc:
        print(f"phantom-membership: {exc}", file=sys.stderr)
        return 2
    log.setup("membership", json=cfg.log_json, level=cfg.log_level)
    return run_forever(membership.service, *membership.loops())


if __name__ == "__main__":
    sys.exit(main())
