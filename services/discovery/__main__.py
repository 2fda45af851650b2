"""``python -m services.discovery``: the discovery process."""

from __future__ import annotations

import sys

from phantom_bus.service import serve
from services.discovery.service import SETTINGS, Discovery


def main(argv: list[str] | None = None) -> int:
    """Run the discovery process until SIGTERM."""
    return serve("discovery", "Phantom node discovery", SETTINGS, Discovery, argv)


if __name__ == "__main__":
    sys.exit(main())
