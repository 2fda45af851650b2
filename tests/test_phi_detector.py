"""The phi accrual detector: statistics, the phi function, its inverse, bad input."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.membership.detector import MAX_PHI, PhiDetector, tail_phi, tail_phi_inverse


def steady(det: PhiDetector, start: float, interval: float, count: int) -> float:
    t = start
    for _ in range(count):
        det.heartbeat(t)
        t += interval
    return t - interval


def test_phi_is_zero_before_the_first_heartbeat() -> None:
    det = PhiDetector(0.25)
    assert det.phi(1e6) == 0.0
    assert det.last_arrival is None


def test_first_heartbeat_bootstraps_from_the_expected_interval() -> None:
    det = PhiDetector(0.25, min_std_dev=0.01, acceptable_pause=0.0)
    det.heartbeat(10.0)
    assert det.samples == 2
    assert det.mean == pytest.approx(0.25)
    assert det.std_dev == pytest.approx(0.0625)
    # Meaningful at once: on time is unremarkable, four intervals late is damning.
    assert det.phi(10.25) == pytest.approx(math.log10(2), abs=1e-9)
    assert det.phi(11.0) > 8


def test_steady_stream_learns_mean_and_floors_std_dev() -> None:
    det = PhiDetector(1.0, window_size=50, min_std_dev=0.1, acceptable_pause=0.0)
    steady(det, 0.0, 0.25, 200)
    assert det.samples == 50
    assert det.mean == pytest.approx(0.25)
    assert det.std_dev == pytest.approx(0.1)  # true spread is 0: the floor holds


def test_window_forgets_old_behaviour() -> None:
    det = PhiDetector(0.25, window_size=20, min_std_dev=0.001)
    last = steady(det, 0.0, 1.0, 30)
    steady(det, last + 0.25, 0.25, 40)
    assert det.mean == pytest.approx(0.25)
    assert det.samples == 20


def test_running_sums_match_an_exact_recomputation() -> None:
    rng = random.Random(7)
    det = PhiDetector(0.25, window_size=37, min_std_dev=1e-9)
    t = 0.0
    gaps = []
    for _ in range(10_000):
        gap = rng.uniform(0.0, 3.0) if rng.random() < 0.1 else rng.gauss(0.25, 0.01)
        gap = abs(gap)
        t += gap
        det.heartbeat(t)
        gaps.append(gap)
    window = gaps[-37:]
    assert det.mean == pytest.approx(statistics.fmean(window), rel=1e-9)
    assert det.std_dev == pytest.approx(statistics.pstdev(window), rel=1e-6)


def test_acceptable_pause_is_added_to_the_mean() -> None:
    det = PhiDetector(0.25, min_std_dev=0.1, acceptable_pause=0.5)
    last = steady(det, 0.0, 0.25, 100)
    # Up to mean + pause the silence is no evidence: phi stays at or below log10(2).
    assert det.phi(last + 0.75) <= math.log10(2) + 1e-9
    no_pause = PhiDetector(0.25, min_std_dev=0.1, acceptable_pause=0.0)
    steady(no_pause, 0.0, 0.25, 100)
    assert no_pause.phi(last + 0.75) > 5


def test_phi_grows_with_silence() -> None:
    det = PhiDetector(0.25)
    last = steady(det, 0.0, 0.25, 50)
    phis = [det.phi(last + s / 10) for s in range(0, 100)]
    assert phis == sorted(phis)
    assert phis[0] < 0.01 and phis[-1] == MAX_PHI


def test_min_std_dev_floors_a_perfectly_regular_node() -> None:
    det = PhiDetector(0.25, min_std_dev=0.1, acceptable_pause=0.0)
    last = steady(det, 0.0, 0.25, 100)
    # Without the floor sigma would be 0 and 20 ms late would already be "certain death".
    assert det.phi(last + 0.27) < 1


def test_restart_moves_the_silence_clock_without_learning_a_gap() -> None:
    det = PhiDetector(0.25, window_size=10)
    last = steady(det, 0.0, 0.25, 20)
    mean, std = det.mean, det.std_dev
    det.restart(last + 30.0)
    assert (det.mean, det.std_dev) == (mean, std)
    assert det.last_arrival == last + 30.0
    assert det.phi(last + 30.1) < 0.1


def test_reset_forgets_everything() -> None:
    det = PhiDetector(0.25)
    steady(det, 0.0, 3.0, 20)
    det.reset()
    assert det.samples == 0 and det.last_arrival is None
    det.heartbeat(100.0)
    assert det.mean == pytest.approx(0.25)


def test_arrival_from_the_past_is_ignored() -> None:
    det = PhiDetector(0.25)
    last = steady(det, 0.0, 0.25, 10)
    n = det.samples
    det.heartbeat(last - 1.0)
    assert det.last_arrival == last and det.samples == n


def test_tail_phi_known_values() -> None:
    assert tail_phi(0.0) == pytest.approx(math.log10(2))
    assert tail_phi(3.090232306) == pytest.approx(3.0, abs=1e-6)  # Q = 1e-3
    assert tail_phi(5.612001244) == pytest.approx(8.0, abs=1e-6)  # Q = 1e-8


def test_tail_phi_is_finite_everywhere() -> None:
    assert tail_phi(-1e300) == 0.0
    assert tail_phi(1e300) == MAX_PHI
    assert tail_phi(math.inf) == MAX_PHI
    assert tail_phi(-math.inf) == 0.0
    assert tail_phi(math.nan) == 0.0
    # The switch from erfc to the asymptotic tail is seamless.
    assert tail_phi(29.999999) == pytest.approx(tail_phi(30.000001), rel=1e-6)


@given(st.floats(min_value=-50, max_value=100), st.floats(min_value=-50, max_value=100))
def test_tail_phi_is_monotonic(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert 0.0 <= tail_phi(lo) <= tail_phi(hi) <= MAX_PHI


@given(st.floats(min_value=0.01, max_value=MAX_PHI - 1))
def test_tail_phi_inverse_round_trips(phi: float) -> None:
    y = tail_phi_inverse(phi)
    assert tail_phi(y) >= phi - 1e-9
    assert tail_phi(y - 1e-6) < phi + 1e-6


@settings(max_examples=200)
@given(
    st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=60),
    st.floats(min_value=0.5, max_value=50.0),
)
def test_silence_for_phi_inverts_phi_for_silence(gaps: list[float], phi: float) -> None:
    det = PhiDetector(0.25, window_size=30)
    t = 0.0
    det.heartbeat(t)
    for g in gaps:
        t += g
        det.heartbeat(t)
    silence = det.silence_for_phi(phi)
    assert det.phi_for_silence(silence) >= phi - 1e-6
    assert det.phi_for_silence(silence - 1e-4) <= phi


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"expected_interval": 0.0}, "expected_interval"),
        ({"expected_interval": math.nan}, "expected_interval"),
        ({"window_size": 1}, "window_size"),
        ({"min_std_dev": 0.0}, "min_std_dev"),
        ({"acceptable_pause": -1.0}, "acceptable_pause"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs: dict[str, float], name: str) -> None:
    args: dict[str, float] = {"expected_interval": 0.25, **kwargs}
    with pytest.raises(ValueError, match=name):
        PhiDetector(**args)  # type: ignore[arg-type]


def test_tail_phi_inverse_refuses_out_of_range() -> None:
    with pytest.raises(ValueError):
        tail_phi_inverse(-1.0)
    with pytest.raises(ValueError):
        tail_phi_inverse(MAX_PHI * 2)
