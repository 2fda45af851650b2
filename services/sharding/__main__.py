"""``python -m services.sharding``: the sharding process."""

from __future__ import annotations

import sys

from phantom_bus.service import serve
from services.sharding.service import SETTINGS, ShardingService


def main(argv: list[str] | None = None) -> int:
    """Run the sharding process until SIGTERM."""
    return serve("sharding", "Phantom sharding service", SETTINGS, ShardingService, argv)


if __name__ == "__main__":
    sys.exit(main())
