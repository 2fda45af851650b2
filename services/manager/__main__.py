"""``python -m services.manager``: the manager process."""

from __future__ import annotations

import sys

from phantom_bus.service import serve
from services.manager.service import SETTINGS, ManagerService


def main(argv: list[str] | None = None) -> int:
    """Run the manager process until SIGTERM."""
    return serve("manager", "Phantom cluster manager", SETTINGS, ManagerService, argv)


if __name__ == "__main__":
    sys.exit(main())
