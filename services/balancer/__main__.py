"""``python -m services.balancer``: the balancer process."""

from __future__ import annotations

import sys

from phantom_bus.service import serve
from services.balancer.service import SETTINGS, BalancerService


def main(argv: list[str] | None = None) -> int:
    """Run the balancer process until SIGTERM."""
    return serve("balancer", "Phantom load balancer", SETTINGS, BalancerService, argv)


if __name__ == "__main__":
    sys.exit(main())
