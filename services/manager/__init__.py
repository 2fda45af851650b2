"""The manager: the node registry and its lifecycle, orchestration and cluster health.

Sans-I/O parts: :mod:`.registry` (records and the lifecycle state machine),
:mod:`.core` (events and commands in, actions and ``cluster.*`` events out),
:mod:`.health` (health and the status document). :mod:`.store` keeps the
registry in the control plane's store. The asyncio shell lives in ``service.py`` / ``__main__.py``.
"""

from services.manager.config import ManagerConfig
from services.manager.core import Action, Decision, ManagerCore
from services.manager.health import (
    Health,
    HealthTracker,
    ShardInfo,
    assess,
    shards_from_map,
    sole_replicas,
    status_document,
)
from services.manager.registry import (
    ACTIVE,
    DECOMMISSIONED,
    DRAINING,
    FAILED,
    JOINING,
    LEFT,
    LIFECYCLES,
    TRANSITIONS,
    NodeRecord,
    Registry,
    Tombstone,
    TombstoneDropped,
)
from services.manager.store import RegistryStore

__all__ = [
    "ACTIVE",
    "DECOMMISSIONED",
    "DRAINING",
    "FAILED",
    "JOINING",
    "LEFT",
    "LIFECYCLES",
    "TRANSITIONS",
    "Action",
    "Decision",
    "Health",
    "HealthTracker",
    "ManagerConfig",
    "ManagerCore",
    "NodeRecord",
    "Registry",
    "RegistryStore",
    "ShardInfo",
    "Tombstone",
    "TombstoneDropped",
    "assess",
    "shards_from_map",
    "sole_replicas",
    "status_document",
]
