"""Moving replicas between nodes: single transfers, make_room() and chains of transfers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.sharding.placement.planner import _Planner

# Intermediate nodes tried per stuck replica when no direct transfer exists;
# bounds the planner's worst case on pathological zone layouts.
_CHAIN_WIDTH = 64
# Nodes make_room() expands per stuck replica; bounds its cost on large clusters.
_AUGMENT_WIDTH = 64


def candidates(pl: _Planner, giver: int) -> list[int]:
    """Shards node ``giver`` could give up, cheapest first: new copies, replicas, primaries."""
    return sorted(
        pl.node_shards[giver],
        key=lambda s: (0 if giver in pl.new[s] else (2 if pl.old_primary[s] == giver else 1), s),
    )


def transfer(pl: _Planner, shard: int, giver: int, taker: int) -> None:
    # When the giver's replica is itself a new copy in this plan, this retargets the
    # copy and costs no extra move; candidates() offers those first.
    pl.remove(shard, giver)
    pl.add(shard, taker)


def make_room(pl: _Planner, shard: int) -> int:
    """A node for shard ``shard`` after shifting copies this plan makes anyway, or -1.

    When every node with a deficit already holds ``shard``, a new copy placed
    on some node ``m`` that ``shard`` could use may move on to a node with a
    deficit, freeing ``m`` (breadth first, so the chain is the shortest).
    Only copies made by this plan move, so this costs no extra copy.
    """
    parent: dict[int, tuple[int, int]] = {}
    queue: list[int] = []
    for m in pl.act:
        if pl.valid(shard, m):
            parent[m] = (shard, -1)
            queue.append(m)
    head = 0
    while head < len(queue) and head < _AUGMENT_WIDTH:
        m = queue[head]
        head += 1
        for t in sorted(t for t in pl.node_shards[m] if m in pl.new[t]):
            if t == shard:
                continue
            for v in pl.act:
                if v in parent or not pl.valid(t, v, m):
                    continue
                parent[v] = (t, m)
                if pl.count[v] < pl.quota[v]:
                    node = v
                    while True:
                        moving, source = parent[node]
                        if source < 0:
                            return node
                        transfer(pl, moving, source, node)
                        node = source
                queue.append(v)
    return -1


def chain(pl: _Planner, giver: int, fresh_only: bool = False) -> bool:
    """Two-hop transfer giver -> m -> u when no node under quota can take any of the giver's shards.

    With ``fresh_only`` both hops retarget copies this plan makes anyway.
    """
    mids = sorted((i for i in pl.act if i != giver), key=lambda i: (pl.count[i] - pl.quota[i], i))
    for s in candidates(pl, giver):
        if fresh_only and giver not in pl.new[s]:
            break  # candidates() lists the fresh ones first
        tried = 0
        for m in mids:
            if not pl.valid(s, m, giver):
                continue
            tried += 1
            for t in candidates(pl, m):
                if fresh_only and m not in pl.new[t]:
                    break
                if t == s:
                    continue
                u = pl.pick(t, leaving=m)
                if u >= 0:
                    transfer(pl, t, m, u)
                    transfer(pl, s, giver, m)
                    return True
            if tried >= _CHAIN_WIDTH:
                break
    return False
