"""Selection strategies: given the servable nodes of one shard, pick one.

Every strategy implements :class:`Strategy`. The balancer has already removed
the nodes that must not serve and decided on panic mode, so a strategy only
ranks a non-empty pool of distinct :class:`NodeState` values. Strategies run
under the balancer's lock and keep per-shard state of their own (positions,
current weights) which :meth:`Strategy.forget` drops.

Weights: the effective weight of a node is its configured weight times its
slow-start factor. ``weighted``, ``random``, ``least_connections`` and
``performance`` honour it; ``round_robin`` deliberately ignores it, being
the strategy whose order is easiest to predict.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from math import exp as _exp
from typing import ClassVar, Protocol

from phantom_bus.routing.config import BalancerConfig
from phantom_bus.routing.health import NodeState

# A node that once answered in 0 ms would otherwise cost 0 whatever its
# in-flight count; the floor keeps in-flight meaningful. 1 us, far below any
# real round trip.
_MIN_LATENCY_MS = 1e-3
# Latency assumed when neither node of a comparison has any sample: the
# comparison then rests on in-flight, load and weight alone.
_UNKNOWN_LATENCY_MS = 1.0


class Strategy(Protocol):
    """Picks one node from a shard's servable pool."""

    name: ClassVar[str]

    def pick(self, shard: str, pool: Sequence[NodeState], now: float) -> NodeState:
        """Return one member of ``pool`` (non-empty, distinct nodes)."""
        ...

    def forget(self, shard: str) -> None:
        """Drop any state kept for ``shard``."""
        ...


class RoundRobin:
    """Each node of the shard's pool in turn, in candidate order; ignores weights."""

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, shard: str, pool: Sequence[NodeState], now: float) -> NodeState:
        """The next node after the one picked last time for ``shard``."""
        turn = self._next.get(shard, 0)
        self._next[shard] = turn + 1
        return pool[turn % len(pool)]

    def forget(self, shard: str) -> None:
        """Reset the shard's position."""
        self._next.pop(shard, None)


class RandomPick:
    """A node at random, with probability proportional to its effective weight."""

    name: ClassVar[str] = "random"

    def __init__(self, rng: random.Random, config: BalancerConfig) -> None:
        self._rng = rng
        self._floor = config.slow_start_floor

    def pick(self, shard: str, pool: Sequence[NodeState], now: float) -> NodeState:
        """A weighted random choice (uniform when all weights are equal)."""
        floor = self._floor
        weights = [n.weight * n.ramp(now, floor) for n in pool]
        first = weights[0]
        if all(w == first for w in weights):
            return pool[int(self._rng.random() * len(pool))]
        target = self._rng.random() * sum(weights)
        for node, w in zip(pool, weights, strict=True):
            target -= w
            if target < 0:
                return node
        return pool[-1]  # float rounding left a sliver past the last weight

    def forget(self, shard: str) -> None:
        """Stateless."""


class LeastConnections:
    """The node with the fewest leases in flight per unit of effective weight.

    Ties are broken by scanning from a random start, so equally loaded nodes
    share the traffic instead of the first one taking it all.
    """

    name: ClassVar[str] = "least_connections"

    def __init__(self, rng: random.Random, config: BalancerConfig) -> None:
        self._rng = rng
        self._floor = config.slow_start_floor

    def pick(self, shard: str, pool: Sequence[NodeState], now: float) -> NodeState:
        """Minimum of (in_flight + 1) / weight; a node in slow start keeps its win
        with probability equal to its ramp (else the runner-up takes the request)."""
        size = len(pool)
        if size == 1:
            return pool[0]
        start = int(self._rng.random() * size)
        best = pool[start]
        best_score = (best.in_flight + 1) / best.weight
        second: NodeState | None = None
        second_score = math.inf
        for i in range(1, size):
            node = pool[(start + i) % size]
            score = (node.in_flight + 1) / node.weight
            if score < best_score:
                second, second_score = best, best_score
                best, best_score = node, score
            elif score < second_score:
                second, second_score = node, score
        # Dividing the score by the ramp instead made a new node lose every
        # comparison while in-flight counts were low: no traffic until the ramp
        # was nearly over (bench/e2e.py), rather than a growing share.
        ramp = best.ramp(now, self._floor)
        if second is not None and ramp < 1.0 and self._rng.random() >= ramp:
            return second
        return best

    def forget(self, shard: str) -> None:
        """Stateless."""


class SmoothWeighted:
    """Smooth weighted round-robin: weights {a: 5, b: 1, c: 1} give a a b a c a a.

    Each pick adds every node's effective weight to its running score, takes
    the highest score (first in candidate order on ties) and subtracts the
    total from the winner. Picks of a heavy node are spread out rather than
    bunched. The scores restart whenever the shard's pool changes.
    """

    name: ClassVar[str] = "weighted"

    def __init__(self, config: BalancerConfig) -> None:
        self._floor = config.slow_start_floor
        self._scores: dict[str, tuple[tuple[str, ...], list[float]]] = {}

    def pick(self, shard: str, pool: Sequence[NodeState], now: float) -> NodeState:
        """The node whose running score is highest after this round's increments."""
        ids = tuple(n.node for n in pool)
        entry = self._scores.get(shard)
        if entry is None or entry[0] != ids:
            scores = [0.0] * len(pool)
            self._scores[shard] = (ids, scores)
        else:
            scores = entry[1]
        floor = self._floor
        total = 0.0
        best = 0
        for i, node in enumerate(pool):
            w = node.weight * node.ramp(now, floor)
            total += w
            scores[i] += w
            if scores[i] > scores[best]:
                best = i
        scores[best] -= total
        return pool[best]

    def forget(self, shard: str) -> None:
        """Drop the shard's running scores."""
        self._scores.pop(shard, None)


class PowerOfTwoChoices:
    """The default: of two distinct random nodes, the one with the lower cost.

    cost = peak-EWMA latency x (in_flight + 1) x load penalty / effective weight

    Two random choices avoid the herd that a global minimum causes when
    estimates are stale, while still steering away from slow, busy or loaded
    nodes. A node without latency samples borrows the other node's estimate,
    so it is judged on in-flight, load and weight rather than looking free.
    Load older than ``load_stale_s`` carries no penalty.

    ``performance_choices`` other than 2 compares that many distinct random
    nodes, or all of them (0), by the same cost: for a view that is never
    stale, such as a locally routing client's own in-flight counts. There a
    node never measured and with nothing in flight is probed first; one
    never measured with requests in flight borrows the lowest estimate of the
    measured nodes compared; exact ties go to one of the tied nodes at random.
    """

    name: ClassVar[str] = "performance"

    def __init__(self, rng: random.Random, config: BalancerConfig) -> None:
        self._rng = rng
        self._floor = config.slow_start_floor
        self._stale = config.load_stale_s
        self._choices = config.performance_choices

    def choices(self, size: int) -> tuple[int, int]:
        """Two distinct indexes in ``range(size)`` (``size`` >= 2), uniformly."""
        rnd = self._rng.random
        i = int(rnd() * size)
        j = int(rnd() * (size - 1))
        if j >= i:
            j += 1
        return i, j

    def pick(self, shard: str, pool: Sequence[NodeState], now: float) -> NodeState:
        """The cheaper of two distinct random nodes (the first on a tie)."""
        size = len(pool)
        if size == 1:
            return pool[0]
        if self._choices != 2 and size > 2:
            return self._pick_many(pool, now)
        # choices() and PeakEwma.estimate() inlined: this is every read's hot path.
        rnd = self._rng.random
        i = int(rnd() * size)
        j = int(rnd() * (size - 1))
        if j >= i:
            j += 1
        a = pool[i]
        b = pool[j]
        # PeakEwma.estimate(now), inlined.
        ea = a.ewma
        la = ea.value
        if la is not None and now > ea.at:
            la *= _exp((ea.at - now) / ea.decay_s)
        eb = b.ewma
        lb = eb.value
        if lb is not None and now > eb.at:
            lb *= _exp((eb.at - now) / eb.decay_s)
        # A node never measured gets one probe at a time: with nothing in flight it
        # wins against a measured rival. Only borrowing the rival's estimate let a
        # slightly higher CPU penalty lose every comparison, so the node never got
        # the sample it needed and starved (tests/test_cluster_load.py); winning
        # outright with requests in flight would send it a whole burst unmeasured.
        if la is None and lb is not None and a.in_flight == 0:
            winner, other = a, b
        elif lb is None and la is not None and b.in_flight == 0:
            winner, other = b, a
        else:
            if la is None:
                la = _UNKNOWN_LATENCY_MS if lb is None else lb
            if lb is None:
                lb = la
            stale = self._stale
            cost_a = (la if la > _MIN_LATENCY_MS else _MIN_LATENCY_MS) * (a.in_flight + 1) \
                * (a.penalty if now - a.load_at <= stale else 1.0) / a.weight
            cost_b = (lb if lb > _MIN_LATENCY_MS else _MIN_LATENCY_MS) * (b.in_flight + 1) \
                * (b.penalty if now - b.load_at <= stale else 1.0) / b.weight
            if cost_a <= cost_b:
                winner, other = a, b
            else:
                winner, other = b, a
        # Slow start as a probability, not a cost factor: folded into the cost, a
        # ramping node that is as fast as its rival lost every comparison and got
        # nothing until its ramp ended (a cliff). Here it keeps a win with
        # probability equal to its ramp, so its share grows with the ramp.
        if now < winner.ramp_end:
            ramp = winner.ramp(now, self._floor)
            if ramp < 1.0 and rnd() >= ramp:
                return other
        return winner

    def _pick_many(self, pool: Sequence[NodeState], now: float) -> NodeState:
        """The cheapest of ``performance_choices`` distinct random nodes (0: all)."""
        size = len(pool)
        rnd = self._rng.random
        d = self._choices
        if d == 0 or d >= size:
            start = int(rnd() * size)
            picked = [*pool[start:], *pool[:start]]
        else:
            picked = [pool[i] for i in self._rng.sample(range(size), d)]
        # Measured nodes first, in pick order; nodes never measured but with
        # requests in flight follow, priced at the lowest measured estimate.
        estimates: list[tuple[NodeState, float]] = []
        waiting: list[NodeState] | None = None
        lowest = math.inf
        for node in picked:
            ew = node.ewma
            latency = ew.value
            if latency is None:
                if node.in_flight == 0:
                    return self._ramped(node, picked, now)  # one probe at a time, as above
                if waiting is None:
                    waiting = []
                waiting.append(node)
                continue
            if now > ew.at:
                latency *= _exp((ew.at - now) / ew.decay_s)
            if latency < lowest:
                lowest = latency
            estimates.append((node, latency))
        if waiting is not None:
            guess = _UNKNOWN_LATENCY_MS if lowest == math.inf else lowest
            estimates.extend((node, guess) for node in waiting)
        stale = self._stale
        best = second = picked[0]
        best_cost = second_cost = math.inf
        ties = 0
        for node, latency in estimates:
            cost = (latency if latency > _MIN_LATENCY_MS else _MIN_LATENCY_MS) * (node.in_flight + 1) \
                * (node.penalty if now - node.load_at <= stale else 1.0) / node.weight
            if cost < best_cost:
                second, second_cost = best, best_cost
                best, best_cost, ties = node, cost, 1
            elif cost == best_cost:
                ties += 1
                if rnd() * ties < 1.0:  # uniform among the tied nodes
                    second, second_cost, best = best, best_cost, node
                else:
                    second, second_cost = node, cost
            elif cost < second_cost:
                second, second_cost = node, cost
        if now < best.ramp_end:
            ramp = best.ramp(now, self._floor)
            if ramp < 1.0 and rnd() >= ramp and second is not best:
                return second
        return best

    def _ramped(self, node: NodeState, picked: Sequence[NodeState], now: float) -> NodeState:
        """``node`` or, with probability 1 - its slow-start ramp, another of ``picked``."""
        if now < node.ramp_end:
            ramp = node.ramp(now, self._floor)
            if ramp < 1.0 and self._rng.random() >= ramp:
                others = [n for n in picked if n is not node]
                return others[int(self._rng.random() * len(others))]
        return node

    def forget(self, shard: str) -> None:
        """Stateless."""


def build_strategies(rng: random.Random, config: BalancerConfig) -> dict[str, Strategy]:
    """One instance of every strategy, by name, sharing the balancer's random source."""
    strategies: list[Strategy] = [
        RoundRobin(),
        RandomPick(rng, config),
        LeastConnections(rng, config),
        SmoothWeighted(config),
        PowerOfTwoChoices(rng, config),
    ]
    return {s.name: s for s in strategies}
