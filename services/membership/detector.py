"""Phi accrual failure detector for one monitored node.

Instead of a yes/no timeout, the detector reports *phi*: how unlikely the
current silence is given the node's own recent heartbeat history. With the
inter-arrival times modelled as a normal distribution of mean ``mu`` and
standard deviation ``sigma``,

    phi(silence) = -log10 P(next gap > silence)
                 = -log10 Q((silence - mu - acceptable_pause) / sigma)

where ``Q`` is the upper tail of the standard normal. ``phi = 3`` means "a gap
this long happens about once in a thousand heartbeats", ``phi = 8`` about once
in a hundred million. The acceptable pause shifts the whole distribution to the
right so that a known kind of delay (a stop-the-world GC on the node, a
scheduler hiccup) does not count as evidence at all, and the minimum standard
deviation stops a very regular node (sigma -> 0) from being convicted the
moment it is a few milliseconds late.

The detector is sans-I/O: it never reads a clock. The caller passes arrival
times and the current time in whatever monotonic time base it likes (the
membership core uses an *effective* clock from which its own stalls have been
removed). It is not synchronised; :class:`~services.membership.core.Membership`
serialises access to it.
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache

MAX_PHI = 1000.0
"""Phi never exceeds this. A silence that far out is certain death already, and
a finite cap keeps phi serialisable (msgpack, JSON) and comparable."""

_SQRT2 = math.sqrt(2.0)
_LOG10_E = math.log10(math.e)
_LN_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# Below this, 0.5 * erfc(y / sqrt 2) is an accurate positive double (it is about
# 1e-198 at y = 30); above it erfc underflows towards zero, so the asymptotic
# expansion of the tail takes over. Both agree to ~1e-8 at the switch.
_ERFC_LIMIT = 30.0


def tail_phi(sigmas: float) -> float:
    """``-log10 P(Z > sigmas)`` for a standard normal ``Z``: phi at ``sigmas`` standard deviations.

    Finite for every input (capped at :data:`MAX_PHI`), never negative, and
    monotonically non-decreasing in ``sigmas``.
    """
    if math.isnan(sigmas):
        return 0.0
    if sigmas < _ERFC_LIMIT:
        q = 0.5 * math.erfc(sigmas / _SQRT2)
        # q is at most 1, so the log is <= 0; max() turns -0.0 into 0.0.
        return max(0.0, min(-math.log10(q), MAX_PHI))
    if math.isinf(sigmas):
        return MAX_PHI
    # ln Q(y) ~ -y^2/2 - ln(y sqrt(2 pi)) + ln(1 - 1/y^2 + 3/y^4): accurate far
    # out in the tail, where it is only ever needed.
    inv2 = 1.0 / (sigmas * sigmas)
    ln_q = -0.5 * sigmas * sigmas - math.log(sigmas) - _LN_SQRT_2PI + math.log1p(-inv2 + 3.0 * inv2 * inv2)
    return min(-ln_q * _LOG10_E, MAX_PHI)


@lru_cache(maxsize=128)
def tail_phi_inverse(phi: float) -> float:
    """The smallest ``y`` (to ~1e-12) with ``tail_phi(y) >= phi``.

    Used to turn a phi threshold into a silence deadline, so a scheduler can
    wait for the moment phi crosses the threshold instead of recomputing phi
    for every node at every tick. Cached: thresholds are a handful of constants.
    """
    if not math.isfinite(phi) or phi < 0.0 or phi > MAX_PHI:
        raise ValueError(f"phi must be within [0, {MAX_PHI}], got {phi!r}")
    lo, hi = -40.0, 80.0  # tail_phi(-40) == 0 and tail_phi(80) caps at MAX_PHI
    while hi - lo > 1e-12:
        mid = 0.5 * (lo + hi)
        if tail_phi(mid) >= phi:
            hi = mid
        else:
            lo = mid
    return hi


class PhiDetector:
    """Phi accrual over a sliding window of one node's heartbeat inter-arrivals.

    ``expected_interval`` is the heartbeat period the node was configured with;
    it seeds the window on the first heartbeat (as if two gaps of
    ``0.75 x`` and ``1.25 x`` the interval had been seen) so phi is meaningful
    before any real gap has been measured. ``window_size`` gaps are kept; the
    mean and variance come from running sums, so every operation is O(1).
    """

    __slots__ = (
        "_acceptable_pause",
        "_exact_in",
        "_expected",
        "_min_std_dev",
        "_samples",
        "_sum",
        "_sumsq",
        "_window_size",
        "last_arrival",
    )

    def __init__(
        self,
        expected_interval: float,
        window_size: int = 200,
        min_std_dev: float = 0.1,
        acceptable_pause: float = 0.5,
    ) -> None:
        if not (math.isfinite(expected_interval) and expected_interval > 0.0):
            raise ValueError(f"expected_interval must be > 0 seconds, got {expected_interval!r}")
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2, got {window_size!r}")
        if not (math.isfinite(min_std_dev) and min_std_dev > 0.0):
            raise ValueError(f"min_std_dev must be > 0 seconds, got {min_std_dev!r}")
        if not (math.isfinite(acceptable_pause) and acceptable_pause >= 0.0):
            raise ValueError(f"acceptable_pause must be >= 0 seconds, got {acceptable_pause!r}")
        self._expected = float(expected_interval)
        self._window_size = int(window_size)
        self._min_std_dev = float(min_std_dev)
        self._acceptable_pause = float(acceptable_pause)
        self._samples: deque[float] = deque()
        self._sum = 0.0
        self._sumsq = 0.0
        # Running sums drift by rounding as values enter and leave; an exact
        # re-sum once per window length keeps the error bounded at O(1) amortised.
        self._exact_in = self._window_size
        self.last_arrival: float | None = None
        """Time of the latest heartbeat, or ``None`` before the first one."""

    # -- feeding --------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        """Record a heartbeat arriving at ``now``; its gap joins the window.

        A time earlier than the latest arrival is ignored (it carries no
        information about the current gap).
        """
        last = self.last_arrival
        if last is None:
            self._bootstrap()
            self.last_arrival = now
        elif now >= last:
            self._add(now - last)
            self.last_arrival = now

    def restart(self, now: float) -> None:
        """Record an arrival at ``now`` whose gap must not be learned from.

        For gaps known to be distorted by something other than the node (the
        observer was stalled, a backlog was drained in one burst): the silence
        clock restarts but the window is left as it was.
        """
        if self.last_arrival is None:
            self._bootstrap()
            self.last_arrival = now
        elif now >= self.last_arrival:
            self.last_arrival = now

    def reset(self) -> None:
        """Forget everything, as for a brand-new node (used on a new incarnation after death)."""
        self._samples.clear()
        self._sum = 0.0
        self._sumsq = 0.0
        self._exact_in = self._window_size
        self.last_arrival = None

    # -- statistics -----------------------------------------------------------

    @property
    def samples(self) -> int:
        """Number of gaps currently in the window (bootstrap seeds included)."""
        return len(self._samples)

    @property
    def mean(self) -> float:
        """Mean inter-arrival time in the window (the expected interval before any)."""
        n = len(self._samples)
        return self._sum / n if n else self._expected

    @property
    def std_dev(self) -> float:
        """Standard deviation of the window, never below ``min_std_dev``."""
        n = len(self._samples)
        if n == 0:
            return max(0.25 * self._expected, self._min_std_dev)
        mean = self._sum / n
        var = self._sumsq / n - mean * mean
        # Cancellation can make a tiny variance slightly negative.
        return max(math.sqrt(var) if var > 0.0 else 0.0, self._min_std_dev)

    # -- suspicion ------------------------------------------------------------

    def phi(self, now: float) -> float:
        """Phi at ``now``; 0.0 before the first heartbeat (nothing to suspect yet)."""
        if self.last_arrival is None:
            return 0.0
        return self.phi_for_silence(now - self.last_arrival)

    def phi_for_silence(self, silence: float) -> float:
        """Phi after ``silence`` seconds without a heartbeat, given the current window."""
        if silence <= 0.0:
            silence = 0.0
        y = (silence - self.mean - self._acceptable_pause) / self.std_dev
        return tail_phi(y)

    def silence_for_phi(self, phi: float) -> float:
        """The silence (seconds) at which phi reaches ``phi`` with the current window.

        ``phi_for_silence(silence_for_phi(p)) >= p`` up to rounding; the inverse
        lets a caller compute a deadline once per heartbeat instead of
        evaluating phi on every tick.
        """
        return self.mean + self._acceptable_pause + tail_phi_inverse(phi) * self.std_dev

    # -- internals ------------------------------------------------------------

    def _bootstrap(self) -> None:
        # Two seeds with mean = expected and spread = expected / 4: a modest prior
        # that real gaps outweigh after a few heartbeats and push out entirely
        # after one window.
        spread = 0.25 * self._expected
        self._add(self._expected - spread)
        self._add(self._expected + spread)

    def _add(self, gap: float) -> None:
        samples = self._samples
        samples.append(gap)
        self._sum += gap
        self._sumsq += gap * gap
        if len(samples) > self._window_size:
            old = samples.popleft()
            self._sum -= old
            self._sumsq -= old * old
        self._exact_in -= 1
        if self._exact_in <= 0:
            self._sum = math.fsum(samples)
            self._sumsq = math.fsum(g * g for g in samples)
            self._exact_in = self._window_size
