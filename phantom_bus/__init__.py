"""Phantom bus: the wire protocol, broker, service base, client, config and shard map.

The public client API::

    from phantom_bus import Client, AsyncClient, PhantomError
"""

from phantom_bus.client import AsyncClient, Client, Selection
from phantom_bus.errors import (
    BadRequest,
    BrokerUnreachable,
    NoLiveReplica,
    NoSuchKeyspace,
    PhantomError,
    ServiceUnavailable,
    Timeout,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "BrokerUnreachable",
    "Client",
    "NoLiveReplica",
    "NoSuchKeyspace",
    "PhantomError",
    "Selection",
    "ServiceUnavailable",
    "Timeout",
]
