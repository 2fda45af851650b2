"""Key spaces of the sharding core: split points and shard ids, split and merge, load-based splits.

Plain functions over a :class:`~services.sharding.core.ShardingCore`; its
public methods take the lock and call these.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from phantom_bus.errors import BadRequest, Refused
from phantom_bus.shardmap import key_bytes
from services.sharding.records import _number, _Space
from services.sharding.samples import KeySample

if TYPE_CHECKING:
    from services.sharding.core import ShardingCore


def parse_split_points(points: Iterable[str | bytes] | None, shards: int | None) -> list[bytes]:
    if points is None:
        n = 1 if shards is None else shards
        if n > 1 << 16:
            raise BadRequest("at most 65536 evenly cut range shards")
        cuts = sorted({(i << 16) // n for i in range(1, n)})
        return [c.to_bytes(2, "big") for c in cuts]
    if isinstance(points, str | bytes) or not isinstance(points, Iterable):
        raise BadRequest("split_points must be a list of str or bytes keys")
    out = [key_bytes(p) for p in points]
    if shards is not None and shards != len(out) + 1:
        raise BadRequest(f"{len(out)} split points make {len(out) + 1} shards, not {shards}")
    if any(p == b"" for p in out):
        raise BadRequest("a split point must not be the empty key (it starts the first shard)")
    if any(a >= b for a, b in itertools.pairwise(out)):
        raise BadRequest("split points must be sorted and distinct")
    return out


def new_id(sp: _Space) -> str:
    sid = f"{sp.name}/{sp.next_seq}"
    sp.next_seq += 1
    return sid


def split_shard(core: ShardingCore, sp: _Space, shard: str, at: str | bytes | int | None) -> str:
    if core._engine.busy(shard) or shard in core._merges or shard in core._merges.values():
        raise Refused(f"shard {shard} is moving or merging; split it once it settles", shard=shard)
    if len(sp.order) >= core.config.max_shards_per_keyspace:
        raise Refused(
            f"key space {sp.name} has reached max_shards_per_keyspace ({core.config.max_shards_per_keyspace})",
            keyspace=sp.name,
        )
    if sp.kind == "hash":
        low_ranges, high_ranges = split_slots(sp, shard, at)
    else:
        start, end = sp.ranges[shard]
        if at is None:
            sample = core._samples.get(shard)
            median = sample.median() if sample is not None else None
            if sample is None or len(sample) < core.config.min_split_sample or median is None or median <= start:
                raise Refused(
                    f"not enough keys seen in shard {shard} to choose a split point; pass `at`",
                    shard=shard,
                )
        elif isinstance(at, int):
            raise BadRequest("a range shard splits at a key (str or bytes), not a number")
        else:
            median = key_bytes(at)
        point = median
        if point <= start or (end is not None and point >= end):
            raise BadRequest(f"split point {point!r} is not inside shard {shard} [{start!r}, {end!r})", shard=shard)
    upper = new_id(sp)
    core._engine.clone_shard(shard, upper)
    sp.order.insert(sp.order.index(shard) + 1, upper)
    core._space_of[upper] = sp.name
    if sp.kind == "hash":
        sp.slot_ranges[shard] = low_ranges
        sp.slot_ranges[upper] = high_ranges
    else:
        sp.ranges[shard] = (start, point)
        sp.ranges[upper] = (point, end)
        sample = core._samples.pop(shard, None)
        if sample is not None:
            core._samples[shard], core._samples[upper] = sample.split(point)
    core._hot.pop(shard, None)
    return upper


def split_slots(sp: _Space, shard: str, at: Any) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    ranges = sp.slot_ranges[shard]
    owned = [s for a, b in ranges for s in range(a, b)]
    if len(owned) < 2:
        raise Refused(f"shard {shard} owns a single slot and cannot be split", shard=shard)
    if at is None:
        cut = owned[len(owned) // 2]
    elif type(at) is int:
        cut = at
        if not owned[0] < cut <= owned[-1]:
            raise BadRequest(
                f"slot {cut} does not split shard {shard} (it owns slots {owned[0]}..{owned[-1]})",
                shard=shard,
            )
    else:
        raise BadRequest("a hash shard splits at a slot number (int) or in the middle (None)")
    return (_ranges(s for s in owned if s < cut), _ranges(s for s in owned if s >= cut))


def adjacent(sp: _Space, low: str, high: str) -> bool:
    if sp.kind == "range":
        return sp.ranges[low][1] == sp.ranges[high][0]
    ra, rb = sp.slot_ranges[low], sp.slot_ranges[high]
    return any(a[1] == b[0] or b[1] == a[0] for a in ra for b in rb)


def finish_merges(core: ShardingCore) -> None:
    eng = core._engine
    done = False
    for high, low in list(core._merges.items()):
        if eng.busy(high) or eng.busy(low):
            continue
        rh, rl = eng.roles(high), eng.roles(low)
        if set(rh) != set(rl) or eng.primary(high) != eng.primary(low):
            continue
        sp = core._spaces[core._space_of[low]]
        if sp.kind == "hash":
            slots = sorted(s for a, b in sp.slot_ranges[low] + sp.slot_ranges[high] for s in range(a, b))
            sp.slot_ranges[low] = _ranges(slots)
            del sp.slot_ranges[high]
        else:
            sp.ranges[low] = (sp.ranges[low][0], sp.ranges[high][1])
            del sp.ranges[high]
            a, b = core._samples.pop(low, None), core._samples.pop(high, None)
            if a is not None or b is not None:
                core._samples[low] = (a or KeySample(core.config.key_sample_size)).merge(
                    b or KeySample(core.config.key_sample_size)
                )
        sp.order.remove(high)
        del core._space_of[high]
        del core._merges[high]
        core._hot.pop(high, None)
        core._hot.pop(low, None)
        for pair in [p for p in core._avoid if p[0] == high]:
            del core._avoid[pair]
        eng.remove_shard(high)
        done = True
    if done:
        core._replan()


def _ranges(slots: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted slots as half-open contiguous ranges."""
    out: list[tuple[int, int]] = []
    for s in slots:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return tuple(out)


def load_splits(core: ShardingCore, rates: Mapping[str, float], t: float) -> tuple[list[str], list[str]]:
    """Track how long each range shard is hot and split those hot for ``split_window``.

    Returns the new upper shards and the unknown shard ids that were ignored.
    """
    cfg = core.config
    ignored: list[str] = []
    due: list[str] = []
    for shard, rate in rates.items():
        r = _number(rate, f"rate of shard {shard!r}")
        if r < 0:
            raise BadRequest(f"rate of shard {shard!r} must be >= 0, got {rate!r}")
        name = core._space_of.get(shard) if isinstance(shard, str) else None
        if name is None:
            ignored.append(str(shard))
            continue
        if core._spaces[name].kind != "range":
            continue
        if r >= cfg.split_rate:
            since = core._hot.setdefault(shard, t)
            if t - since >= cfg.split_window:
                due.append(shard)
        else:
            core._hot.pop(shard, None)
    split: list[str] = []
    for shard in due:
        try:
            split.append(split_shard(core, core._spaces[core._space_of[shard]], shard, None))
        except Refused:
            continue  # moving, too few keys sampled, or at the cap: try again later
    return split, ignored
