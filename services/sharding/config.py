"""Every tunable of the sharding core, in one place, with its unit and the reason for its default."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from phantom_bus.errors import BadRequest
from phantom_bus.shardmap import DEFAULT_SLOTS, MAX_SLOTS
from services.sharding.settings import DEFAULTS


@dataclass(frozen=True, slots=True)
class ShardingConfig:
    """Tunables of placement, migration, splitting and the default key space."""

    # Name of the hash key space a fresh core creates, so that clients can route
    # keys before an operator has created anything.
    default_keyspace: str = "default"
    # Shards of the default key space (count). 64 gives every node of a 3..20
    # node cluster at least 9 replicas at RF 3, so "within one of the ideal"
    # stays within ~10%, while the map stays a few KiB.
    default_shards: int = 64
    # Replication factor of the default key space (and of create_keyspace when
    # none is given). 3 survives the loss of one node or zone with a majority left.
    default_rf: int = 3
    # Slots of a hash key space (count). Fixed for its life; bounds how far it
    # can be split; a client's slot table costs 8 bytes per slot.
    hash_slots: int = DEFAULT_SLOTS
    # Seconds a dead node's replicas wait before they are re-created elsewhere.
    # A supervisord restart takes seconds and a VM reboot about a minute; one
    # minute (like Elasticsearch's delayed allocation) turns those into zero
    # data moves, at the cost of running one replica short meanwhile. Primaries
    # move at once, so availability does not wait for this delay.
    dead_delay: float = DEFAULTS["dead_delay"]
    # Seconds a primary holds its role after its agent's last renewal; the
    # agent fences its primaries when it cannot renew for this long, and a new
    # primary is promoted only after it (plus lease_drift). See leases.py.
    primary_lease: float = DEFAULTS["primary_lease"]
    # Seconds added to primary_lease before promoting elsewhere: clock-rate
    # differences between hosts and the time to start the fence callback.
    lease_drift: float = DEFAULTS["lease_drift"]
    # Seconds a joining replica may take to be confirmed before the copy is
    # cancelled. Copying a few GiB at 100 MB/s takes well under a minute; five
    # minutes leaves room for a busy node without letting a wedged copy hold
    # a per-node slot for ever.
    move_timeout: float = 300.0
    # Seconds to wait before retrying a cancelled copy on the same node; doubled
    # after each failure so a flapping node is not hammered.
    retry_backoff: float = 30.0
    # Failed copies of one shard to one node (count) after which that node is
    # avoided for that shard and the planner picks another; three tells a bad
    # node from a one-off hiccup.
    move_retries: int = 3
    # Seconds a (shard, node) pair stays avoided after move_retries failures;
    # ten minutes is long enough to stop churn, short enough to heal without
    # an operator.
    avoid_ttl: float = 600.0
    # Copies in flight in the whole cluster (count). Bounds the background
    # network and disk load of a rebalance; the rest wait in a queue.
    max_moves_in_flight: int = 64
    # Copies in flight per node, incoming or outgoing (count). Two keeps a
    # node's link busy while one copy finishes without starving its clients
    # (Elasticsearch's node_concurrent_recoveries has the same default).
    max_moves_per_node: int = 2
    # Seconds a leaving replica stays in the map before it is dropped, so that
    # clients still holding the previous map finish the reads they routed to it.
    leave_grace: float = 10.0
    # Seconds between the shell's calls to tick(). A primary hand-off demotes
    # in one tick and promotes in the next, so this bounds the write pause.
    tick_interval: float = 0.5
    # Keys kept per range shard to choose a split point (count). The bottom-k
    # sample's median is within about 3% of the true middle at 256.
    key_sample_size: int = 256
    # Fewest sampled keys (count) before a split point is chosen automatically;
    # below this the median is too noisy to be worth a split.
    min_split_sample: int = 16
    # Requests per second on one range shard above which it counts as hot.
    # CockroachDB's load-based splitting starts at 2,500 QPS per range.
    split_rate: float = 2500.0
    # Seconds a shard must stay hot before it is split, so a burst does not
    # split it; a minute of sustained load is a real hot spot.
    split_window: float = 60.0
    # Most shards a key space may have (count); load splits stop there. Keeps
    # the map small enough to fetch in one message.
    max_shards_per_keyspace: int = 4096

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "default_keyspace":
                if not isinstance(value, str) or not value:
                    raise BadRequest(f"sharding setting {f.name} must be a non-empty string")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"sharding setting {f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise BadRequest(f"sharding setting {f.name} must be finite and >= 0, got {value!r}")
        for name in (
            "default_shards",
            "default_rf",
            "hash_slots",
            "move_retries",
            "max_moves_in_flight",
            "max_moves_per_node",
            "key_sample_size",
            "min_split_sample",
            "max_shards_per_keyspace",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise BadRequest(f"sharding setting {name} must be an integer >= 1, got {value!r}")
        if self.hash_slots > MAX_SLOTS:
            raise BadRequest(f"sharding setting hash_slots must be at most {MAX_SLOTS}")
        if self.default_shards > self.hash_slots:
            raise BadRequest("sharding setting default_shards must not exceed hash_slots")
