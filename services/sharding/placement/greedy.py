"""The greedy pass: keep what may stay, fill the largest deficits, then balance."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from services.sharding.placement.chains import candidates, chain, make_room, transfer
from services.sharding.placement.quotas import _EPS, round_quotas

if TYPE_CHECKING:
    from services.sharding.placement.planner import _Planner

# Most (shards to fill x nodes under quota) for which fill() orders the shards
# by how constrained they are; beyond this the order is the input order.
_SORT_BUDGET = 200_000


def keep(pl: _Planner) -> None:
    """Keep every active holder that rules 1-2 and the shard's replica count allow."""
    S = len(pl.specs)
    N = len(pl.names)
    pl.members = [[] for _ in range(S)]
    pl.member_set = [set() for _ in range(S)]
    pl.new = [set() for _ in range(S)]
    pl.node_shards = [set() for _ in range(N)]
    pl.dropped = [[] for _ in range(S)]
    pl.count = list(pl.cur)
    pl.heap = []
    for s in range(S):
        cand = pl.cand[s]
        if not cand:
            continue
        op = pl.old_primary[s]

        def drop_first(i: int, op: int = op) -> tuple[float, bool, int]:
            return (pl.count[i] - pl.x[i], i != op, i)

        keep: list[int] = []
        by_zone: dict[int, list[int]] = {}
        for i in cand:
            by_zone.setdefault(pl.zone[i], []).append(i)
        for z, group in by_zone.items():
            room = max(0, pl.cap[s] - pl.zc[s].get(z, 0))
            if len(group) > room:
                group.sort(key=drop_first, reverse=True)
                for i in group[: len(group) - room]:
                    pl.count[i] -= 1
                group = group[len(group) - room :]
            keep.extend(group)
        if len(keep) > pl.r[s]:
            keep.sort(key=drop_first, reverse=True)
            for i in keep[: len(keep) - pl.r[s]]:
                pl.count[i] -= 1
            keep = keep[len(keep) - pl.r[s] :]
        kept = set(keep)
        for i in cand:  # preserve the holders' order
            if i in kept:
                pl.count[i] -= 1  # add() counts it again
                pl.add(s, i)
            else:
                pl.dropped[s].append(i)
    # Round after the forced drops, so that the ceilings go to the nodes
    # that keep the most and rounding itself forces no copy.
    pl.quota = round_quotas(pl, pl.x, pl.count, pl.total, [pl.node_cap] * N, pl.cap_z)
    pl.heap = []
    for i in pl.act:
        pl.push(i)
    swap_drops(pl)


def swap_drops(pl: _Planner) -> None:
    """Revisit which holder a shard dropped, so that nodes over quota drop instead.

    Each shard decided alone which of its holders to drop; a node left
    over quota can still hand its replica's drop to a dropped holder of the
    same shard, along a chain that ends at a node under quota. Every such
    chain saves one copy.
    """
    if not any(pl.dropped):
        return
    for o in [i for i in pl.act if pl.count[i] > pl.quota[i]]:
        while pl.count[o] > pl.quota[o]:
            parent: dict[int, tuple[int, int]] = {o: (-1, -1)}
            queue = [o]
            found = -1
            head = 0
            while head < len(queue) and found < 0:
                v = queue[head]
                head += 1
                for s in sorted(pl.node_shards[v]):
                    for d in pl.dropped[s]:
                        if d in parent or not pl.valid(s, d, v):
                            continue
                        parent[d] = (s, v)
                        if pl.count[d] < pl.quota[d]:
                            found = d
                            break
                        queue.append(d)
                    if found >= 0:
                        break
            if found < 0:
                break
            node = found
            while node != o:
                s, giver = parent[node]
                pl.remove(s, giver)
                pl.dropped[s].remove(node)
                pl.dropped[s].append(giver)
                pl.add(s, node)
                node = giver


def fill(pl: _Planner) -> None:
    """Give every shard its missing replicas, on the nodes with the largest deficit.

    When the work is small enough to sort, the shards with the fewest
    possible receivers go first, so that they are not crowded out.
    """
    order = [s for s in range(len(pl.specs)) if pl.r[s] > len(pl.members[s])]
    under = [u for u in pl.act if pl.count[u] < pl.quota[u]]
    if len(order) * len(under) <= _SORT_BUDGET:
        choices = {s: sum(1 for u in under if pl.valid(s, u)) for s in order}
        order.sort(key=lambda s: (choices[s], s))
    for s in order:
        for _ in range(pl.r[s] - len(pl.members[s])):
            i = pl.pick(s)
            if i < 0:
                i = make_room(pl, s)
            if i < 0:
                i = least_loaded(pl, s)
            if i < 0:
                pl.shortfall[s] += 1
                continue
            pl.add(s, i)


def least_loaded(pl: _Planner, shard: int) -> int:
    """Any valid node, least over its quota; used only when no node with a deficit fits.

    Nodes that stay within one of their ideal come first: balance() can
    then settle the difference by trading quota instead of copying.
    """
    best = -1
    best_key = (0, 0, 0)
    for i in pl.act:
        if pl.valid(shard, i):
            key = (max(0, pl.count[i] + 1 - math.ceil(pl.x[i] - _EPS)), pl.count[i] - pl.quota[i], i)
            if best < 0 or key < best_key:
                best, best_key = i, key
    return best


def balance(pl: _Planner) -> list[int]:
    """Bring nodes over quota down, cheapest remedy first.

    1. retarget a copy this plan already makes, directly or by passing
       it to a node whose own new copy moves on (free);
    2. trade a unit of quota with a node under quota (free; both stay
       within one of their ideal);
    3. move a replica the node holds to a node under quota, or to one whose
       quota can take a unit from a node under quota (one copy);
    4. trade quota with a node that can then shed directly (one copy);
    5. move a replica through an intermediate node (two copies);
    6. trade quota with any node that can spare it (it then sheds one).
    """
    stuck: list[int] = []
    work = sorted(
        (i for i in pl.act if pl.count[i] > pl.quota[i]),
        key=lambda i: (pl.quota[i] - pl.count[i], i),
    )
    relaxes = 2 * len(pl.act)  # bounds step 5's trades
    retries = 2  # a node stuck early may move once the others have
    while work:
        # Most constrained first: a node with few shards that anyone under
        # quota could take must not find them taken by nodes with many.
        o = min(work, key=lambda i: (options(pl, i), work.index(i)))
        work.remove(o)
        cands = candidates(pl, o)
        fresh = [s for s in cands if o in pl.new[s]]
        kept = [s for s in cands if o not in pl.new[s]]
        while pl.count[o] > pl.quota[o]:
            if shed(pl, o, fresh) or chain(pl, o, fresh_only=True):
                continue
            if relax(pl, o, pl.x, pl.quota, pl.count, under_only=True) >= 0:
                continue
            if shed(pl, o, kept) or shed_flex(pl, o):
                continue
            # A chain costs two copies; handing a unit of quota to a node that
            # can shed directly costs one.
            donor = relax(pl, o, pl.x, pl.quota, pl.count, direct=True) if relaxes > 0 else -1
            if donor < 0 and chain(pl, o):
                continue
            if donor < 0 and relaxes > 0:
                donor = relax(pl, o, pl.x, pl.quota, pl.count)
            if donor < 0:
                stuck.append(o)
                break
            relaxes -= 1
            if pl.count[donor] > pl.quota[donor] and donor not in work:
                work.append(donor)
        if not work and stuck and retries:
            retries -= 1
            work, stuck = stuck, []
    return stuck


def options(pl: _Planner, giver: int, limit: int = 8) -> int:
    """How many of ``giver``'s shards some node under quota could take (counted up to ``limit``)."""
    under = [u for u in pl.act if pl.count[u] < pl.quota[u]]
    found = 0
    for s in pl.node_shards[giver]:
        if any(pl.valid(s, u, giver) for u in under):
            found += 1
            if found >= limit:
                break
    return found


def shed(pl: _Planner, giver: int, shards: list[int]) -> bool:
    """Transfer the first of ``shards`` still on ``giver`` that a node under quota can take."""
    while shards:
        s = shards.pop(0)
        if giver not in pl.member_set[s]:
            continue
        u = pl.pick(s, leaving=giver)
        if u >= 0:
            transfer(pl, s, giver, u)
            return True
    return False


def shed_flex(pl: _Planner, giver: int) -> bool:
    """Move one of ``giver``'s replicas to a node at quota that may still grow to its ceiling,
    paid for by a unit of quota from a node under quota."""
    x, quota, count = pl.x, pl.quota, pl.count
    donors = [d for d in pl.act if count[d] < quota[d] and quota[d] - 1 >= math.floor(x[d] + _EPS)]
    if not donors:
        return False
    growable = [v for v in pl.act if v != giver and quota[v] + 1 <= math.ceil(x[v] - _EPS)]
    for s in candidates(pl, giver):
        for v in growable:
            if not pl.valid(s, v, giver):
                continue
            d = next((d for d in donors if d != v), -1)
            if d < 0:
                continue
            quota[d] -= 1
            quota[v] += 1
            transfer(pl, s, giver, v)
            return True
    return False


def relax(
    pl: _Planner,
    giver: int,
    ideals: list[float],
    quota: list[int],
    count: list[int],
    under_only: bool = False,
    direct: bool = False,
) -> int:
    """Trade one unit of quota from another node to ``giver``, both staying within one.

    Rounding picks the ceilings before it knows which replicas are pinned
    in place (the replacement for a lost replica can only go where the
    shard is not yet); this repairs that choice without moving anything.
    The donor is preferably under its quota; otherwise it now has one
    replica to shed. Returns the donor, or -1 if no trade keeps both
    within one of their ideal.
    """
    if quota[giver] + 1 > math.ceil(ideals[giver] - _EPS):
        return -1
    best = -1
    best_key = (0, 0, 0)
    for u in pl.act:
        if u == giver or quota[u] - 1 < math.floor(ideals[u] + _EPS):
            continue
        if under_only and count[u] >= quota[u]:
            continue
        if direct and not options(pl, u, limit=1):
            continue
        key = (0 if count[u] < quota[u] else 1, count[u] - quota[u], u)
        if best < 0 or key < best_key:
            best, best_key = u, key
    if best < 0:
        return -1
    quota[best] -= 1
    quota[giver] += 1
    pl.push(best)
    return best
