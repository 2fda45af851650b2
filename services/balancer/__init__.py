"""The balancer: which node serves a request for a key (core; the shell is ``service``).

The core is sans-I/O and lives in :mod:`phantom_bus.routing`, because local
clients run the very same selection: :class:`Balancer` takes candidates from
the shard map, membership and load updates, lease feedback and ``now``, and
returns selections and events. This package re-exports it and adds the
process around it (``service``).
"""

from phantom_bus import routing as _routing
from phantom_bus.routing import *  # noqa: F403  (the core's public names, re-exported as they are)

__all__ = list(_routing.__all__)
