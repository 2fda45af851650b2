"""A bounded, deterministic sample of the keys seen in a range shard, to choose split points."""

from __future__ import annotations

import heapq

from phantom_bus.shardmap import key_hash


class KeySample:
    """The ``size`` distinct keys with the smallest :func:`key_hash` (a bottom-k sketch).

    Because the hash is uniform, these are a uniform sample of the distinct
    keys seen, whatever order they arrive in, and the same keys give the same
    sample on every run: no random generator is involved. Not thread-safe on
    its own; the sharding core holds its lock around it.
    """

    __slots__ = ("_heap", "_seen", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[int, bytes]] = []  # (-hash, key): the root is the largest hash
        self._seen: set[int] = set()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, key: bytes) -> None:
        """Offer one key (already as bytes)."""
        h = key_hash(key)
        if h in self._seen:
            return
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, (-h, key))
            self._seen.add(h)
        elif h < -self._heap[0][0]:
            dropped = heapq.heapreplace(self._heap, (-h, key))
            self._seen.discard(-dropped[0])
            self._seen.add(h)

    def keys(self) -> list[bytes]:
        """The sampled keys in key order."""
        return sorted(k for _, k in self._heap)

    def median(self) -> bytes | None:
        """The middle sampled key (upper median), or None when empty."""
        keys = self.keys()
        return keys[len(keys) // 2] if keys else None

    def split(self, at: bytes) -> tuple[KeySample, KeySample]:
        """Two samples: keys below ``at`` and keys from ``at`` on."""
        low, high = KeySample(self.size), KeySample(self.size)
        for k in self.keys():
            (low if k < at else high).add(k)
        return low, high

    def merge(self, other: KeySample) -> KeySample:
        """A sample of the union of both key sets."""
        out = KeySample(self.size)
        for k in self.keys() + other.keys():
            out.add(k)
        return out
