"""The sharding service: shard map, placement, rebalancing and persistence.

The sans-I/O parts are :mod:`.placement` (the planner), :mod:`.migration`
(the move state machine) and :mod:`.core` (the operations the shell calls);
:mod:`.store` keeps the map in the control plane's store. The asyncio shell lives in
``service.py`` / ``__main__.py``.
"""

from services.sharding.config import ShardingConfig
from services.sharding.core import MergeResult, Result, ShardingCore
from services.sharding.placement import Move, NodeSpec, Plan, ShardSpec, Target, plan
from services.sharding.store import Committed, MapStore

__all__ = [
    "Committed",
    "MapStore",
    "MergeResult",
    "Move",
    "NodeSpec",
    "Plan",
    "Result",
    "ShardSpec",
    "ShardingConfig",
    "ShardingCore",
    "Target",
    "plan",
]
