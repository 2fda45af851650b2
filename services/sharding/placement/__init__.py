"""The placement planner: which nodes should hold each shard, and the moves to get there.

Sans-I/O and pure: :func:`plan` takes the current holders of every shard and
the nodes (zone, weight, state) and returns the target assignment, the
primaries and the moves. Same input, same plan, on any machine.

What a plan guarantees, in order of precedence:

1. No node holds two replicas of a shard.
2. No zone holds two replicas of a shard while the nodes that hold or may
   hold replicas span at least RF zones; with fewer zones, replicas spread
   as evenly over the zones as their node counts allow.
3. Only ``active`` nodes with a positive weight receive replicas. ``draining``
   and ``dead`` nodes lose theirs. ``down`` nodes (dead, but still inside the
   re-replication delay) keep exactly what they hold and get nothing new.
4. Replicas per active node are within one of the ideal: weight-proportional
   water-filling where a zone never gets more than rule 2 lets it hold, a
   node never more than one replica per shard, and a shard that needs every
   slot it may use sits on all of them (those are floors).
5. Primaries per node likewise, among each shard's active replicas, whenever
   the replica placement allows it.
6. Fewest copies: every replica that may stay, stays; the rounding of the
   ideal gives the extra replica to the nodes that already hold more; a join
   copies only to the new node and a leave only away from the leaver
   whenever the counts alone require nothing else.

How: a greedy pass (keep, fill the largest deficits, then shed from nodes
over quota, cheapest remedy first, see :func:`.greedy.balance`), and, when
the cluster is small enough, an exact min-cost flow that replaces the greedy
answer if it copies less or balances where the greedy could not. The greedy
alone is exact on the regular layouts measured by bench/rebalance.py.

When fewer active nodes (or zones) than RF exist, a shard gets as many
replicas as fit and the plan reports the ``shortfall``; it never fails for
that. Nodes left off balance (layouts with no placement within one of the
ideal) are listed in ``Plan.unbalanced``. The engine in
:mod:`services.sharding.migration` carries a plan out.

Modules: :mod:`.specs` (nodes, shards and the plan result), :mod:`.planner`
(one run and its bookkeeping), :mod:`.quotas` (ideals and their rounding),
:mod:`.greedy` (keep, fill, balance), :mod:`.chains` (transfers, make_room and
chains), :mod:`.primaries` (the primary role) and :mod:`.exact` (the min-cost
flow solver).
"""

from services.sharding.placement.planner import plan
from services.sharding.placement.quotas import waterfill
from services.sharding.placement.specs import NODE_STATES, Move, NodeSpec, NodeState, Plan, ShardSpec, Target

__all__ = ["NODE_STATES", "Move", "NodeSpec", "NodeState", "Plan", "ShardSpec", "Target", "plan", "waterfill"]
