"""Latency sketch error bound and memory bound, windowing, peak EWMA, rate meter."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phantom_bus.routing.stats import (
    SKETCH_MAX_MS,
    SKETCH_MIN_MS,
    LatencySketch,
    PeakEwma,
    RateMeter,
    WindowedLatency,
)

# Relative-error bound plus a hair for float rounding at bucket edges.
SLACK = 1e-9

latencies = st.floats(min_value=SKETCH_MIN_MS, max_value=SKETCH_MAX_MS, allow_nan=False)


def exact(samples: list[float], q: float) -> float:
    return sorted(samples)[int(q * (len(samples) - 1))]


@settings(max_examples=200, deadline=None)
@given(
    samples=st.lists(latencies, min_size=1, max_size=300),
    q=st.sampled_from([0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0]),
    error=st.sampled_from([0.005, 0.01, 0.02, 0.05]),
)
def test_sketch_quantiles_are_within_the_relative_error(samples: list[float], q: float, error: float) -> None:
    sketch = LatencySketch(error)
    for x in samples:
        sketch.add(x)
    want = exact(samples, q)
    got = sketch.quantile(q)
    assert got is not None
    assert abs(got - want) <= (error + SLACK) * want


@settings(max_examples=50, deadline=None)
@given(left=st.lists(latencies, max_size=100), right=st.lists(latencies, max_size=100))
def test_merged_sketch_matches_one_sketch_of_all_samples(left: list[float], right: list[float]) -> None:
    a, b, both = LatencySketch(), LatencySketch(), LatencySketch()
    for x in left:
        a.add(x)
        both.add(x)
    for x in right:
        b.add(x)
        both.add(x)
    a.merge(b)
    assert a.count == both.count
    for q in (0.0, 0.5, 0.99, 1.0):
        assert a.quantile(q) == both.quantile(q)


def test_sketch_memory_is_bounded_whatever_the_sample_count() -> None:
    sketch = LatencySketch(0.02)
    rng = random.Random(1)
    for _ in range(200_000):
        sketch.add(math.exp(rng.uniform(math.log(SKETCH_MIN_MS), math.log(SKETCH_MAX_MS))))
    bound = math.ceil(math.log(SKETCH_MAX_MS / SKETCH_MIN_MS) / math.log(1.02 / 0.98)) + 2
    assert sketch.count == 200_000
    assert sketch.buckets <= bound <= 600


def test_sketch_handles_zero_and_out_of_range_samples() -> None:
    sketch = LatencySketch(0.02)
    assert sketch.quantile(0.5) is None
    for x in (0.0, 0.0, 5.0, 1e12):
        sketch.add(x)
    assert sketch.quantile(0.0) == 0.0
    assert sketch.quantile(0.5) == 0.0
    assert sketch.quantile(0.7) == pytest.approx(5.0, rel=0.02)
    assert sketch.quantile(1.0) == pytest.approx(SKETCH_MAX_MS, rel=0.02)
    with pytest.raises(ValueError):
        sketch.quantile(1.5)


def test_sketch_refuses_merging_different_accuracies() -> None:
    with pytest.raises(ValueError):
        LatencySketch(0.01).merge(LatencySketch(0.02))


def test_windowed_latency_forgets_samples_older_than_two_windows() -> None:
    window = WindowedLatency(60.0, 0.02, now=0.0)
    for _ in range(100):
        window.add(500.0, now=10.0)
    window.add(5.0, now=70.0)
    assert window.snapshot(70.0).count == 101  # previous window still counts
    assert window.snapshot(125.0).count == 1  # the 500 ms burst rolled out
    assert window.snapshot(200.0).count == 0
    assert window.snapshot(200.0).quantile(0.5) is None


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    ewma = PeakEwma(decay_s=10.0)
    assert ewma.estimate(0.0) is None
    ewma.observe(10.0, 0.0)
    ewma.observe(100.0, 1.0)
    assert ewma.estimate(1.0) == 100.0  # a slow sample counts at once
    # ten seconds later the estimate has decayed to 100/e, and the new sample
    # is blended in with weight 1 - 1/e
    ewma.observe(10.0, 11.0)
    assert ewma.estimate(11.0) == pytest.approx(100 / math.e**2 + 10 * (1 - 1 / math.e))


def test_peak_ewma_takes_a_sample_after_long_silence_almost_fully() -> None:
    ewma = PeakEwma(decay_s=10.0)
    ewma.observe(40.0, 0.0)
    ewma.observe(2.0, 60.0)
    assert ewma.estimate(60.0) == pytest.approx(2.0, rel=0.01)


def test_peak_ewma_estimate_decays_while_idle() -> None:
    ewma = PeakEwma(decay_s=10.0)
    ewma.observe(80.0, 0.0)
    assert ewma.estimate(10.0) == pytest.approx(80 / math.e)
    assert ewma.last == 80.0


def test_peak_ewma_blends_samples_at_the_same_instant_without_moving() -> None:
    ewma = PeakEwma(decay_s=10.0)
    ewma.observe(50.0, 5.0)
    ewma.observe(1.0, 5.0)
    assert ewma.estimate(5.0) == 50.0


def test_rate_meter_reports_events_per_second() -> None:
    meter = RateMeter(10.0, now=0.0)
    for i in range(1000):
        meter.add(i * 0.01)  # 100/s for 10 s
    assert meter.rate(10.0) == pytest.approx(100.0, rel=0.01)
    assert meter.rate(15.0) == pytest.approx(50.0, rel=0.01)  # half the window is quiet
    assert meter.rate(20.0) == 0.0
    assert meter.rate(100.0) == 0.0


def test_rate_meter_reads_low_during_its_first_window() -> None:
    meter = RateMeter(10.0, now=0.0)
    meter.add(1.0, n=50)
    assert meter.rate(5.0) == 5.0


def test_ewma_with_a_sample_weight_is_a_moving_average_without_the_peak() -> None:
    ewma = PeakEwma(decay_s=10.0, sample_weight=0.1)
    ewma.observe(10.0, 0.0)
    ewma.observe(100.0, 0.0)  # a slow sample moves it a tenth of the way, no jump
    assert ewma.estimate(0.0) == pytest.approx(19.0)
    ewma.observe(1.0, 0.0)  # and a fast one a tenth of the way back, whatever the time
    assert ewma.estimate(0.0) == pytest.approx(17.2)
    for _ in range(100):
        ewma.observe(5.0, 0.0)
    assert ewma.estimate(0.0) == pytest.approx(5.0, rel=1e-3)
    # between samples it decays toward zero as the peak EWMA does
    assert ewma.estimate(10.0) == pytest.approx(ewma.estimate(0.0) / math.e)  # type: ignore[operator]
