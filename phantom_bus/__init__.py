"""Phantom bus: the wire protocol, broker, service base, client, config and shard map.

The public client API::

    from phantom_bus import Client, AsyncClient, PhantomError
"""

from typing import TYPE_CHECKING, Any

from loguru import logger

from phantom_bus.errors import (
    BadRequest,
    BrokerUnreachable,
    NoLiveReplica,
    NoSuchKeyspace,
    PhantomError,
    ServiceUnavailable,
    Timeout,
    UnknownService,
)

# A library stays quiet in its host application: phantom_bus logs nothing until a
# process sets up logging (every Phantom process does, through phantom_bus.log) or
# the application opts in with ``logger.enable("phantom_bus")``.
logger.disable("phantom_bus")

if TYPE_CHECKING:
    from phantom_bus.client import AsyncClient, Client, Selection


def __getattr__(name: str) -> Any:
    # The client is imported on first use, so `python -m phantom_bus.<module>`
    # does not import half the package before running its module.
    if name in ("AsyncClient", "Client", "Selection"):
        from phantom_bus import client

        return getattr(client, name)
    raise AttributeError(f"module 'phantom_bus' has no attribute {name!r}")


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
    "UnknownService",
]
