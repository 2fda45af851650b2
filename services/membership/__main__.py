"""``python -m services.membership``: the membership process."""

from __future__ import annotations

import sys

from phantom_bus.service import serve
from services.membership.service import SETTINGS, MembershipService


def main(argv: list[str] | None = None) -> int:
    """Run the membership process until SIGTERM."""
    return serve("membership", "Phantom membership and failure detection", SETTINGS, MembershipService, argv)


if __name__ == "__main__":
    sys.exit(main())
