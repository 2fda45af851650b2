"""How many replicas each node should hold: the ideals (water-filling) and their rounding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.sharding.placement.planner import _Planner

_EPS = 1e-9


def waterfill(
    total: float, weights: Sequence[float], caps: Sequence[float], floors: Sequence[float] | None = None
) -> list[float]:
    """Split ``total`` in proportion to ``weights``, each share kept within ``[floor, cap]``.

    Returns ``x_i = clamp(level * w_i, floor_i, cap_i)`` for the level at which
    the shares add up to ``total`` (all floors or all caps when ``total`` is
    outside their sums). Weights must be > 0 and floors <= caps.
    """
    n = len(weights)
    lo = [0.0] * n if floors is None else [float(f) for f in floors]
    hi = [float(c) for c in caps]
    if n == 0:
        return []
    if total <= sum(lo):
        return lo
    if total >= sum(hi):
        return hi

    def filled(level: float) -> float:
        return sum(min(max(level * w, a), b) for w, a, b in zip(weights, lo, hi, strict=True))

    # The sum is piecewise linear in the level, with kinks where a share meets
    # its floor or cap: find the segment that reaches total, then solve it.
    kinks = sorted(
        {a / w for w, a in zip(weights, lo, strict=True)} | {b / w for w, b in zip(weights, hi, strict=True)}
    )
    left, right = 0, len(kinks) - 1
    while left < right:  # last kink whose sum is <= total
        mid = (left + right + 1) // 2
        if filled(kinks[mid]) <= total:
            left = mid
        else:
            right = mid - 1
    base = kinks[left]
    fixed = 0.0
    free = 0.0
    for w, a, b in zip(weights, lo, hi, strict=True):
        if base * w < a or (a == b):
            fixed += a
        elif base * w >= b:
            fixed += b
        else:
            free += w
    level = base if free <= 0 else (total - fixed) / free
    return [min(max(level * w, a), b) for w, a, b in zip(weights, lo, hi, strict=True)]


def compute_ideal(pl: _Planner) -> None:
    N = len(pl.names)
    S = len(pl.specs)
    R = sum(pl.r)
    placed = [s for s in range(S) if pl.r[s] > 0]
    pl.node_cap = len(placed)
    # Zone capacity: one shard can put at most min(cap - pinned there, nodes) in a zone.
    cap_z = [0] * len(pl.zones)
    by_cap: dict[int, int] = {}
    for s in placed:
        by_cap[pl.cap[s]] = by_cap.get(pl.cap[s], 0) + 1
    for z in pl.active_zones:
        cap_z[z] = sum(k * min(c, pl.n_z[z]) for c, k in by_cap.items())
    for s in placed:
        c = pl.cap[s]
        for z, used in pl.zc[s].items():
            if pl.n_z[z]:
                cap_z[z] -= min(c, pl.n_z[z]) - min(max(c - used, 0), pl.n_z[z])
    pl.cap_z = cap_z
    x = [0.0] * N
    if R and pl.act:
        az = pl.active_zones
        xz = waterfill(R, [pl.w_z[z] for z in az], [cap_z[z] for z in az], [pl.zone_floor[z] for z in az])
        members: dict[int, list[int]] = {z: [] for z in az}
        for i in pl.act:
            members[pl.zone[i]].append(i)
        for z, total in zip(az, xz, strict=True):
            nodes = members[z]
            share = waterfill(
                total,
                [pl.weight[i] for i in nodes],
                [pl.node_cap] * len(nodes),
                [pl.zone_all[z]] * len(nodes),
            )
            for i, v in zip(nodes, share, strict=True):
                x[i] = v
    pl.x = x
    pl.total = R
    pl.quota = []  # rounded once keep() knows which replicas stay


def round_quotas(
    pl: _Planner, ideals: list[float], cur: list[int], total: int, node_cap: list[int], cap_z: list[int] | None
) -> list[int]:
    """Round ideals to integers summing to ``total``: floor or ceil of each, never more.

    Ceilings go first to nodes that already hold more than the floor, so
    rounding itself never forces a move; then to nodes that receive
    replicas anyway, so that fewer nodes are disturbed.
    """
    N = len(pl.names)
    q = [0] * N
    zsum = [0] * len(pl.zones)
    for i in pl.act:
        q[i] = min(math.floor(ideals[i] + _EPS), node_cap[i])
        zsum[pl.zone[i]] += q[i]
    extra = total - sum(q)
    order = sorted(
        (i for i in pl.act if ideals[i] - q[i] > _EPS and q[i] < node_cap[i]),
        key=lambda i: (0 if cur[i] > q[i] else 1 if cur[i] < q[i] else 2, -(ideals[i] - q[i]), i),
    )
    for i in order:
        if extra <= 0:
            break
        z = pl.zone[i]
        if cap_z is not None and zsum[z] + 1 > cap_z[z]:
            continue
        q[i] += 1
        zsum[z] += 1
        extra -= 1
    # Float edge cases only: settle the remainder on the least-rounded nodes.
    while extra > 0:
        room = [i for i in pl.act if q[i] < node_cap[i] and (cap_z is None or zsum[pl.zone[i]] < cap_z[pl.zone[i]])]
        if not room:
            break
        i = max(room, key=lambda j: (ideals[j] - q[j], -j))
        q[i] += 1
        zsum[pl.zone[i]] += 1
        extra -= 1
    while extra < 0:
        i = min((j for j in pl.act if q[j] > 0), key=lambda j: (ideals[j] - q[j], j))
        q[i] -= 1
        zsum[pl.zone[i]] -= 1
        extra += 1
    return q
