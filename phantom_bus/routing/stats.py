"""Bounded-memory statistics the balancer keeps per node and per shard.

* :class:`LatencySketch` — a log-bucketed latency histogram with a fixed
  relative error (the DDSketch idea): quantiles are exact up to a factor
  ``1 +/- relative_error`` however many samples it holds, in at most a few
  hundred buckets.
* :class:`WindowedLatency` — two sketches in rotation, so percentiles describe
  the last one to two windows instead of all history.
* :class:`PeakEwma` — the latency estimate the ``performance`` strategy uses:
  jumps up at once on a slow sample, decays smoothly otherwise (or, with a
  sample weight, the moving average of the last few samples).
* :class:`RateMeter` — events per second over a sliding window, O(1) per event.

None of these lock: the balancer calls them under its own lock.
"""

from __future__ import annotations

import math

# Range in which the sketch guarantees its relative error. Below the floor a
# latency is reported as 0 (an absolute error under 1 us, irrelevant for a
# network round trip); above the ceiling it is clamped (about 2.8 hours).
SKETCH_MIN_MS = 1e-3
SKETCH_MAX_MS = 1e7


class LatencySketch:
    """Latency quantiles with relative error at most ``relative_error``.

    A sample ``x`` in ms goes to bucket ``i = ceil(log(x) / log(g))`` where
    ``g = (1 + a) / (1 - a)``; the bucket covers ``(g**(i-1), g**i]`` and is
    reported as ``2 g**i / (g + 1)``, which is within a factor ``1 +/- a`` of
    every value in the bucket. Hence ``quantile(q)`` is within relative error
    ``a`` of the exact sample of rank ``floor(q * (n - 1))`` for samples in
    ``[SKETCH_MIN_MS, SKETCH_MAX_MS]``. Memory is bounded by the number of
    buckets over that range: ``ln(1e10) / ln(g)``, 576 at ``a = 0.02``.
    """

    __slots__ = ("_buckets", "_inv_log_gamma", "_log_gamma", "_max", "_min", "_zero",
                 "count", "relative_error")

    def __init__(self, relative_error: float = 0.02) -> None:
        if not 0 < relative_error < 1:
            raise ValueError(f"relative_error must be in (0, 1), got {relative_error!r}")
        self.relative_error = relative_error
        gamma = (1 + relative_error) / (1 - relative_error)
        self._log_gamma = math.log(gamma)
        self._inv_log_gamma = 1.0 / self._log_gamma
        self._buckets: dict[int, int] = {}
        self._zero = 0
        self.count = 0
        self._min = math.inf
        self._max = -math.inf

    def add(self, ms: float) -> None:
        """Record one latency sample in milliseconds (negative counts as 0)."""
        self.count += 1
        if ms < self._min:
            self._min = ms
        if ms > self._max:
            self._max = ms
        if ms < SKETCH_MIN_MS:
            self._zero += 1
            return
        if ms > SKETCH_MAX_MS:
            ms = SKETCH_MAX_MS
        index = math.ceil(math.log(ms) * self._inv_log_gamma)
        buckets = self._buckets
        buckets[index] = buckets.get(index, 0) + 1

    def merge(self, other: LatencySketch) -> None:
        """Add every sample of ``other`` (same relative error) to this sketch."""
        if other.relative_error != self.relative_error:
            raise ValueError("cannot merge sketches with different relative errors")
        for index, n in other._buckets.items():
            self._buckets[index] = self._buckets.get(index, 0) + n
        self._zero += other._zero
        self.count += other.count
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1) in ms, or None when empty."""
        if self.count == 0:
            return None
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        rank = int(q * (self.count - 1))
        seen = self._zero
        if rank < seen:
            return max(0.0, self._min)
        gamma_factor = 2.0 / (1.0 + math.exp(self._log_gamma))
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if rank < seen:
                estimate = math.exp(index * self._log_gamma) * gamma_factor
                # The exact answer lies in [min, max]; clamping can only move the
                # estimate closer to it, so the error bound still holds.
                return min(max(estimate, self._min), self._max)
        return self._max  # unreachable unless counts were corrupted

    @property
    def buckets(self) -> int:
        """Number of non-empty buckets (the memory in use)."""
        return len(self._buckets) + (1 if self._zero else 0)


class WindowedLatency:
    """Latency percentiles over the current and the previous window.

    Two sketches rotate every ``window_s``; a query merges both, so it covers
    between one and two windows of samples and forgets anything older.
    """

    __slots__ = ("_current", "_previous", "_relative_error", "_start", "_window")

    def __init__(self, window_s: float, relative_error: float, now: float) -> None:
        self._window = window_s
        self._relative_error = relative_error
        self._start = now
        self._current = LatencySketch(relative_error)
        self._previous: LatencySketch | None = None

    def _rotate(self, now: float) -> None:
        periods = int((now - self._start) // self._window)
        if periods <= 0:
            return
        self._previous = self._current if periods == 1 else None
        self._current = LatencySketch(self._relative_error)
        self._start += periods * self._window

    def add(self, ms: float, now: float) -> None:
        """Record a sample taken at ``now``."""
        if now - self._start >= self._window:
            self._rotate(now)
        self._current.add(ms)

    def snapshot(self, now: float) -> LatencySketch:
        """A sketch of the samples in the last one to two windows."""
        self._rotate(now)
        merged = LatencySketch(self._relative_error)
        merged.merge(self._current)
        if self._previous is not None:
            merged.merge(self._previous)
        return merged


class PeakEwma:
    """Peak-sensitive moving average of latency, in ms, with time-based decay.

    Between samples the estimate decays toward zero with time constant
    ``decay_s``: a node that nobody picks because it once looked slow becomes
    cheap again and gets re-probed, and a node that gets fewer requests looks
    a little cheaper, which evens traffic out. A sample above the decayed
    estimate replaces it at once (a node that turns slow is avoided at once);
    a lower sample is blended in with weight ``1 - exp(-dt / decay_s)``, dt
    being the time since the previous sample, so a fast node is trusted again
    gradually and one sample after a long silence counts almost fully.

    With ``sample_weight`` > 0 the estimate is instead a plain moving average
    over samples: every sample (above or below) is blended in with that
    weight, so 0.1 is about the mean of the last ten responses, a measure of
    the node's current queueing delay rather than of its worst recent one.
    The decay toward zero between samples is the same.
    """

    # Public so that the performance strategy can inline estimate() on its hot path.
    __slots__ = ("at", "decay_s", "sample_weight", "value")

    def __init__(self, decay_s: float, sample_weight: float = 0.0) -> None:
        self.decay_s = decay_s
        self.sample_weight = sample_weight
        self.value: float | None = None
        self.at = 0.0

    def observe(self, ms: float, now: float) -> None:
        """Fold in a latency sample taken at ``now``."""
        value = self.value
        if value is None:
            self.value = ms
            self.at = now
            return
        dt = now - self.at
        if dt > 0:
            w = math.exp(-dt / self.decay_s)
            value *= w
        else:
            # Same instant (or a caller's clock stepping back): no decay, no blend.
            w = 1.0
        a = self.sample_weight
        if a > 0:
            self.value = value + a * (ms - value)
        else:
            self.value = ms if ms >= value else value * w + ms * (1.0 - w)
        if dt > 0:
            self.at = now

    def estimate(self, now: float) -> float | None:
        """The current estimate in ms, or None before the first sample."""
        value = self.value
        if value is None:
            return None
        dt = now - self.at
        if dt <= 0:
            return value
        return value * math.exp(-dt / self.decay_s)

    @property
    def last(self) -> float | None:
        """The value at the last sample, without idle decay (for reports)."""
        return self.value


class RateMeter:
    """Events per second over a sliding window of ``window_s``.

    Counts go into fixed windows; the rate weights the previous window by the
    part of it still inside the sliding window. During the first window the
    rate reads low (the previous window counts as empty), which errs on the
    side of not splitting a shard on a cold start.
    """

    __slots__ = ("_current", "_previous", "_start", "_window")

    def __init__(self, window_s: float, now: float) -> None:
        self._window = window_s
        self._start = now
        self._current = 0
        self._previous = 0

    def _roll(self, now: float) -> None:
        periods = int((now - self._start) // self._window)
        if periods <= 0:
            return
        self._previous = self._current if periods == 1 else 0
        self._current = 0
        self._start += periods * self._window

    def add(self, now: float, n: int = 1) -> None:
        """Count ``n`` events at ``now``."""
        if now - self._start >= self._window:
            self._roll(now)
        self._current += n

    def rate(self, now: float) -> float:
        """Events per second over the window ending at ``now``."""
        self._roll(now)
        into = (now - self._start) / self._window
        into = min(max(into, 0.0), 1.0)
        return (self._previous * (1.0 - into) + self._current) / self._window
