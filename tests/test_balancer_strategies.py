"""Each selection strategy: order, distribution, and what it reacts to."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phantom_bus.routing.health import NodeState
from phantom_bus.routing.strategies import PowerOfTwoChoices, build_strategies
from services.balancer import STRATEGY_NAMES, Balancer, BalancerConfig, Candidate

T0 = 1000.0  # every node below became alive at 0, so slow start is long over


def cluster(names: str = "abc", seed: int = 7, **config: object) -> Balancer:
    bal = Balancer(BalancerConfig(**config), random.Random(seed))  # type: ignore[arg-type]
    for n in names:
        bal.node_update(n, state="alive", lifecycle="active", now=0.0)
    return bal


def replicas(names: str = "abc") -> list[Candidate]:
    return [Candidate(n, "primary" if i == 0 else "replica") for i, n in enumerate(names)]


def picks(bal: Balancer, count: int, strategy: str, names: str = "abc", release: bool = True) -> list[str]:
    out = []
    now = T0
    for _ in range(count):
        now += 0.001
        sel = bal.select("s1", replicas(names), strategy=strategy, now=now)
        out.append(sel.node)
        if release:
            assert sel.lease is not None
            bal.release(sel.lease, 2.0, True, now=now)
    return out


def test_registry_names_match_config_names() -> None:
    assert tuple(build_strategies(random.Random(0), BalancerConfig())) == STRATEGY_NAMES


def test_round_robin_cycles_in_candidate_order() -> None:
    assert picks(cluster(), 7, "round_robin") == list("abcabca")


def test_round_robin_keeps_a_position_per_shard() -> None:
    bal = cluster()
    first = [bal.select("s1", replicas(), strategy="round_robin", now=T0).node for _ in range(2)]
    other = bal.select("s2", replicas(), strategy="round_robin", now=T0).node
    assert first == ["a", "b"]
    assert other == "a"


def test_round_robin_skips_unhealthy_nodes() -> None:
    bal = cluster("abcd")
    bal.node_update("b", state="suspect", now=T0)
    assert picks(bal, 6, "round_robin", "abcd") == list("acdacd")


def test_weighted_sequence_is_smooth_for_5_1_1() -> None:
    bal = cluster()
    bal.node_update("a", weight=5, now=0.0)
    assert picks(bal, 14, "weighted") == list("aabacaa" * 2)


def test_weighted_follows_weights_over_many_picks() -> None:
    bal = cluster()
    bal.node_update("a", weight=3, now=0.0)
    bal.node_update("b", weight=2, now=0.0)
    counts = Counter(picks(bal, 600, "weighted"))
    assert counts == {"a": 300, "b": 200, "c": 100}


def test_random_is_uniform_with_equal_weights() -> None:
    counts = Counter(picks(cluster(), 30000, "random"))
    for n in "abc":
        assert 9400 < counts[n] < 10600, counts


def test_random_is_proportional_to_weight() -> None:
    bal = cluster()
    bal.node_update("c", weight=2, now=0.0)
    counts = Counter(picks(bal, 40000, "random"))
    assert 19000 < counts["c"] < 21000, counts
    assert 9000 < counts["a"] < 11000, counts


def test_random_is_deterministic_for_a_seed() -> None:
    assert picks(cluster(seed=3), 50, "random") == picks(cluster(seed=3), 50, "random")
    assert picks(cluster(seed=3), 50, "random") != picks(cluster(seed=4), 50, "random")


def test_least_connections_picks_the_node_with_fewest_in_flight() -> None:
    bal = cluster()
    held = [bal.select("s1", replicas(), strategy="round_robin", now=T0) for _ in range(5)]
    # round robin left a: 2, b: 2, c: 1 in flight
    assert [s.node for s in held] == list("abcab")
    sel = bal.select("s1", replicas(), strategy="least_connections", now=T0)
    assert sel.node == "c"
    # now all have 2; releasing one of b's makes b the least loaded
    bal.release(held[1].lease or "", 1.0, True, now=T0)
    assert bal.select("s1", replicas(), strategy="least_connections", now=T0).node == "b"


def test_least_connections_spreads_held_leases_evenly() -> None:
    bal = cluster("abcd")
    nodes = picks(bal, 400, "least_connections", "abcd", release=False)
    assert Counter(nodes) == {n: 100 for n in "abcd"}


def test_least_connections_shares_ties_instead_of_favouring_the_first() -> None:
    counts = Counter(picks(cluster(), 3000, "least_connections"))
    for n in "abc":
        assert 800 < counts[n] < 1200, counts


def test_least_connections_scales_by_weight() -> None:
    bal = cluster("ab")
    bal.node_update("a", weight=3, now=0.0)
    counts = Counter(picks(bal, 400, "least_connections", "ab", release=False))
    assert counts == {"a": 300, "b": 100}


def _states(count: int) -> list[NodeState]:
    config = BalancerConfig()
    return [NodeState(f"n{i}", config, 0.0) for i in range(count)]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(2, 12), seed=st.integers(0, 2**32 - 1))
def test_p2c_two_choices_are_always_two_different_nodes(size: int, seed: int) -> None:
    p2c = PowerOfTwoChoices(random.Random(seed), BalancerConfig())
    for _ in range(200):
        i, j = p2c.choices(size)
        assert i != j
        assert 0 <= i < size and 0 <= j < size


def test_p2c_choices_cover_every_pair_uniformly() -> None:
    p2c = PowerOfTwoChoices(random.Random(5), BalancerConfig())
    pairs = Counter(frozenset(p2c.choices(4)) for _ in range(12000))
    assert len(pairs) == 6
    for count in pairs.values():
        assert 1700 < count < 2300, pairs


def test_p2c_with_two_nodes_compares_both() -> None:
    # With two nodes p2c must compare the pair, so the cheaper node always wins.
    bal = cluster("ab")
    now = T0
    for _ in range(20):
        for node, ms in (("a", 1.0), ("b", 50.0)):
            sel = bal.select("warm", [Candidate(node)], now=now)
            bal.release(sel.lease or "", ms, True, now=now)
    chosen = {bal.select("s1", replicas("ab"), lease=False, now=now).node for _ in range(200)}
    assert chosen == {"a"}


def test_performance_steers_away_from_a_slow_node() -> None:
    bal = cluster("abcd")
    speed = {"a": 2.0, "b": 2.0, "c": 2.0, "d": 40.0}
    now = T0
    counts: Counter[str] = Counter()
    for _ in range(4000):
        now += 0.001
        sel = bal.select("s1", replicas("abcd"), now=now)
        counts[sel.node] += 1
        bal.release(sel.lease or "", speed[sel.node], True, now=now)
    assert counts["d"] < 0.05 * 4000, counts
    assert min(counts[n] for n in "abc") > 1000, counts


def test_performance_follows_in_flight_when_latencies_are_equal() -> None:
    bal = cluster("ab")
    now = T0
    for node in "ab":
        sel = bal.select("warm", [Candidate(node)], now=now)
        bal.release(sel.lease or "", 5.0, True, now=now)
    for _ in range(3):
        bal.select("s1", [Candidate("a")], now=now)  # a holds 3 leases
    chosen = Counter(bal.select("s1", replicas("ab"), lease=False, now=now).node for _ in range(100))
    assert chosen == {"b": 100}


def test_performance_penalises_cpu_and_memory_pressure() -> None:
    bal = cluster("ab")
    bal.node_update("a", load={"cpu": 95.0, "mem": 95.0}, now=T0)
    bal.node_update("b", load={"cpu": 10.0, "mem": 40.0}, now=T0)
    # one lease on b: cost b = 2 x 1.1; cost a = 1 x (1 + 0.95 + 1.6) = 3.55
    bal.select("s1", [Candidate("b")], now=T0)
    chosen = Counter(bal.select("s1", replicas("ab"), lease=False, now=T0).node for _ in range(100))
    assert chosen == {"b": 100}


def test_performance_ignores_stale_load() -> None:
    bal = cluster("ab")
    bal.node_update("a", load={"cpu": 100.0, "mem": 100.0, "age": 60.0}, now=T0)
    bal.select("s1", [Candidate("b")], now=T0)  # b: one lease, so cost b = 2, cost a = 1
    chosen = Counter(bal.select("s1", replicas("ab"), lease=False, now=T0).node for _ in range(100))
    assert chosen == {"a": 100}


def test_performance_treats_a_node_without_samples_like_its_rival() -> None:
    # b has never been measured; it must not look free (cost 0) nor hopeless.
    bal = cluster("ab")
    sel = bal.select("warm", [Candidate("a")], now=T0)
    bal.release(sel.lease or "", 30.0, True, now=T0)
    got = [bal.select("s1", replicas("ab"), now=T0).node for _ in range(4)]
    # equal cost at first; then the in-flight counts alternate the choice
    assert Counter(got) == {"a": 2, "b": 2}


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_only_picks_among_candidates(name: str) -> None:
    bal = cluster("abcdef")
    got = set(picks(bal, 300, name, "bdf"))
    assert got <= set("bdf")
    assert got == set("bdf")


def test_performance_takes_a_recovered_node_back() -> None:
    # d turns slow, is avoided, then turns fast again: the idle decay of its
    # estimate must let it be probed and win its share back.
    bal = cluster("abcd")
    now = T0
    slow_until = T0 + 20.0

    def run(seconds: float) -> Counter[str]:
        nonlocal now
        counts: Counter[str] = Counter()
        end = now + seconds
        while now < end:
            now += 0.002
            sel = bal.select("s1", replicas("abcd"), now=now)
            counts[sel.node] += 1
            ms = 40.0 if sel.node == "d" and now < slow_until else 2.0
            bal.release(sel.lease or "", ms, True, now=now)
        return counts

    run(10.0)
    slow = run(10.0)
    assert slow["d"] < 0.05 * sum(slow.values()), slow
    run(30.0)
    recovered = run(10.0)
    assert recovered["d"] > 0.15 * sum(recovered.values()), recovered


def scanning(names: str, **config: object) -> Balancer:
    """A cluster whose performance strategy compares every node (as local clients do)."""
    return cluster(names, performance_choices=0, **config)


def measure(bal: Balancer, latency: dict[str, float], now: float = T0) -> None:
    for node, ms in latency.items():
        sel = bal.select("warm", [Candidate(node)], now=now)
        bal.release(sel.lease or "", ms, True, now=now)


def test_performance_with_every_choice_takes_the_cheapest_node() -> None:
    # Two random choices miss the cheapest of six nodes about two thirds of the time;
    # comparing all of them never does.
    names = "abcdef"
    for choices, always in ((0, True), (2, False)):
        bal = cluster(names, performance_choices=choices)
        measure(bal, {n: 5.0 for n in names})
        for i, node in enumerate(names):
            for _ in range(1 if node == "d" else 2 + i):
                bal.select("s1", [Candidate(node)], now=T0)  # d holds the fewest leases
        got = Counter(bal.select("s1", replicas(names), lease=False, now=T0).node for _ in range(300))
        assert (got == {"d": 300}) is always, got


def test_performance_with_every_choice_ranks_latency_and_weight() -> None:
    bal = scanning("abc")
    bal.node_update("b", weight=0.5, now=0.0)
    measure(bal, {"a": 9.0, "b": 4.0, "c": 6.0})  # cost a 9, b 4 / 0.5 = 8, c 6
    got = Counter(bal.select("s1", replicas("abc"), lease=False, now=T0).node for _ in range(100))
    assert got == {"c": 100}


def test_performance_with_every_choice_probes_an_unmeasured_idle_node_first() -> None:
    bal = scanning("abc")
    measure(bal, {"a": 1.0, "b": 1.0})
    sel = bal.select("s1", replicas("abc"), now=T0)
    assert sel.node == "c"
    # with its probe in flight it borrows the lowest measured estimate: a and b cost
    # 1 x 1, c costs 1 x 2, so it gets no second request before the first returns
    got = Counter(bal.select("s1", replicas("abc"), lease=False, now=T0).node for _ in range(100))
    assert set(got) == {"a", "b"}


def test_performance_with_every_choice_shares_exact_ties() -> None:
    bal = scanning("abcd")
    measure(bal, {n: 3.0 for n in "abcd"})
    got = Counter(bal.select("s1", replicas("abcd"), lease=False, now=T0).node for _ in range(4000))
    assert set(got) == set("abcd")
    assert max(got.values()) < 1.15 * min(got.values()), got


def test_performance_compares_the_configured_number_of_nodes() -> None:
    # Three of six: the cheapest wins whenever drawn (half the time), never the dearest.
    names = "abcdef"
    bal = cluster(names, performance_choices=3)
    measure(bal, {n: float(1 + i) for i, n in enumerate(names)})
    got = Counter(bal.select("s1", replicas(names), lease=False, now=T0).node for _ in range(3000))
    assert "f" not in got and "e" not in got
    assert 0.4 < got["a"] / 3000 < 0.6, got


@pytest.mark.parametrize("bad", [1, -1, 2.5, True])
def test_performance_choices_must_be_zero_or_at_least_two(bad: object) -> None:
    with pytest.raises(ValueError, match="performance_choices"):
        BalancerConfig(performance_choices=bad).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_ewma_sample_weight_must_be_a_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="ewma_sample_weight"):
        BalancerConfig(ewma_sample_weight=bad).validate()
