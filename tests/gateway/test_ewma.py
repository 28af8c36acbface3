"""Peak-EWMA: a prior until the first sample; then a slower sample takes over at once, a faster one
pulls the estimate down over time, and idle time decays it toward zero."""

from __future__ import annotations

import math

import pytest

from gateway.policy.ewma import PeakEwma


def measured(decay_s: float, value_s: float, now: float) -> PeakEwma:
    """An estimate that has seen exactly one sample, `value_s`, at `now`."""
    e = PeakEwma(decay_s=decay_s, initial_s=123.0, now=now)
    e.observe(value_s, now=now)
    assert e.measured and e.value == value_s
    return e


# --- the prior -----------------------------------------------------------------------------


def test_peak_ewma_starts_at_initial_value_unmeasured() -> None:
    e = PeakEwma(decay_s=10.0, initial_s=0.05, now=100.0)
    assert e.value == 0.05
    assert e.stamp == 100.0
    assert e.measured is False


@pytest.mark.parametrize(("sample", "at"), [(2.0, 0.001), (0.001, 0.0), (0.001, 30.0), (0.05, 5.0)])
def test_peak_ewma_first_sample_replaces_prior_whatever_its_value(sample: float, at: float) -> None:
    e = PeakEwma(decay_s=10.0, initial_s=0.05, now=0.0)
    e.observe(sample, now=at)
    assert e.value == sample
    assert e.measured is True
    assert e.stamp == at


def test_peak_ewma_first_sample_replaces_prior_even_with_clock_going_backwards() -> None:
    e = PeakEwma(decay_s=10.0, initial_s=1.0, now=5.0)
    e.observe(0.1, now=4.0)
    assert e.value == 0.1
    assert e.measured


def test_peak_ewma_second_lower_sample_is_time_weighted_not_replaced() -> None:
    e = PeakEwma(decay_s=10.0, initial_s=5.0, now=0.0)
    e.observe(1.0, now=0.0)  # replaces the prior
    e.observe(0.0, now=10.0)  # now a real estimate: time-weighted
    assert e.value == pytest.approx(math.exp(-1.0))


# --- after the first sample ----------------------------------------------------------------


def test_peak_ewma_higher_sample_replaces_estimate_at_once() -> None:
    e = measured(10.0, 0.05, now=0.0)
    e.observe(2.0, now=0.001)
    assert e.value == 2.0
    assert e.measured


def test_peak_ewma_equal_sample_keeps_estimate() -> None:
    e = measured(10.0, 0.5, now=0.0)
    e.observe(0.5, now=30.0)
    assert e.value == 0.5


def test_peak_ewma_lower_sample_at_same_instant_does_not_move_estimate() -> None:
    e = measured(10.0, 1.0, now=5.0)
    e.observe(0.1, now=5.0)
    assert e.value == 1.0


def test_peak_ewma_lower_sample_with_clock_going_backwards_does_not_move_estimate() -> None:
    e = measured(10.0, 1.0, now=5.0)
    e.observe(0.1, now=4.0)
    assert e.value == 1.0


def test_peak_ewma_lower_sample_decays_by_elapsed_over_decay() -> None:
    e = measured(10.0, 1.0, now=0.0)
    e.observe(0.0, now=10.0)
    assert e.value == pytest.approx(math.exp(-1.0))


@pytest.mark.parametrize("elapsed", [0.5, 2.0, 7.5, 20.0])
def test_peak_ewma_lower_sample_weight_matches_formula(elapsed: float) -> None:
    e = measured(4.0, 2.0, now=0.0)
    e.observe(0.5, now=elapsed)
    w = math.exp(-elapsed / 4.0)
    assert e.value == pytest.approx(2.0 * w + 0.5 * (1.0 - w))
    assert 0.5 < e.value < 2.0


def test_peak_ewma_converges_to_sample_after_many_decay_windows() -> None:
    e = measured(10.0, 5.0, now=0.0)
    e.observe(0.1, now=200.0)
    assert e.value == pytest.approx(0.1, abs=1e-6)


def test_peak_ewma_decay_depends_on_time_not_request_count() -> None:
    one = measured(10.0, 1.0, now=0.0)
    one.observe(0.2, now=5.0)

    many = measured(10.0, 1.0, now=0.0)
    for i in range(1, 501):
        many.observe(0.2, now=i * 0.01)  # 500 requests over the same 5 s

    assert many.value == pytest.approx(one.value, rel=1e-9)
    assert many.value == pytest.approx(0.2 + 0.8 * math.exp(-0.5))


def test_peak_ewma_observe_advances_stamp() -> None:
    e = PeakEwma(decay_s=10.0, initial_s=1.0, now=0.0)
    e.observe(3.0, now=7.0)
    assert e.stamp == 7.0
    e.observe(0.1, now=9.0)
    assert e.stamp == 9.0


# --- reset ---------------------------------------------------------------------------------


def test_peak_ewma_reset_sets_prior_and_restarts_clock() -> None:
    e = measured(10.0, 9.0, now=1.0)
    e.reset(0.3, now=50.0)
    assert e.value == 0.3
    assert e.stamp == 50.0
    assert e.measured is False


@pytest.mark.parametrize("sample", [0.1, 0.3, 4.0])
def test_peak_ewma_first_sample_after_reset_replaces_prior(sample: float) -> None:
    e = measured(10.0, 9.0, now=1.0)
    e.reset(0.3, now=50.0)
    e.observe(sample, now=60.0)
    assert e.value == sample
    assert e.measured
    assert e.stamp == 60.0


def test_peak_ewma_time_weighting_resumes_after_first_sample_post_reset() -> None:
    e = measured(10.0, 9.0, now=1.0)
    e.reset(0.3, now=50.0)
    e.observe(1.0, now=60.0)
    e.observe(0.0, now=70.0)
    assert e.value == pytest.approx(math.exp(-1.0))


# --- decay while idle ----------------------------------------------------------------------


def test_peak_ewma_decay_multiplies_by_exp_of_elapsed_and_moves_stamp() -> None:
    e = measured(10.0, 2.0, now=0.0)
    got = e.decay(now=10.0)
    assert got == pytest.approx(2.0 * math.exp(-1.0))
    assert e.value == got
    assert e.stamp == 10.0
    assert e.measured


@pytest.mark.parametrize("elapsed", [0.1, 3.0, 25.0])
def test_peak_ewma_decay_matches_formula(elapsed: float) -> None:
    e = measured(4.0, 0.8, now=1.0)
    assert e.decay(now=1.0 + elapsed) == pytest.approx(0.8 * math.exp(-elapsed / 4.0))


def test_peak_ewma_decay_tends_to_zero_when_idle_long() -> None:
    e = measured(10.0, 5.0, now=0.0)
    assert e.decay(now=500.0) == pytest.approx(0.0, abs=1e-12)


def test_peak_ewma_decay_in_steps_equals_decay_at_once() -> None:
    steps = measured(10.0, 1.0, now=0.0)
    for i in range(1, 11):
        steps.decay(now=float(i))
    once = measured(10.0, 1.0, now=0.0)
    once.decay(now=10.0)
    assert steps.value == pytest.approx(once.value, rel=1e-12)


@pytest.mark.parametrize("at", [5.0, 4.0])
def test_peak_ewma_decay_no_op_without_elapsed_time(at: float) -> None:
    e = measured(10.0, 1.0, now=5.0)
    assert e.decay(now=at) == 1.0
    assert e.value == 1.0
    assert e.stamp == 5.0  # never moved backwards


def test_peak_ewma_decay_of_prior_keeps_it_a_prior() -> None:
    e = PeakEwma(decay_s=10.0, initial_s=1.0, now=0.0)
    assert e.decay(now=10.0) == pytest.approx(math.exp(-1.0))
    assert e.measured is False
    e.observe(0.9, now=11.0)  # still replaces, even though above the decayed prior
    assert e.value == 0.9
    assert e.measured


def test_peak_ewma_higher_sample_after_decay_replaces() -> None:
    e = measured(10.0, 1.0, now=0.0)
    e.decay(now=20.0)
    e.observe(0.5, now=20.0)
    assert e.value == 0.5


def test_peak_ewma_lower_sample_after_decay_weighted_from_decay_stamp() -> None:
    e = measured(10.0, 1.0, now=0.0)
    decayed = e.decay(now=10.0)
    e.observe(0.1, now=20.0)
    w = math.exp(-1.0)
    assert e.value == pytest.approx(decayed * w + 0.1 * (1.0 - w))


def test_decay_stops_at_the_floor() -> None:
    e = PeakEwma(decay_s=1.0, initial_s=1.0, now=0.0)
    e.observe(1.0, 0.0)
    assert e.decay(10.0, floor_s=3.0) == 3.0
    assert e.decay(20.0) == pytest.approx(3.0 * math.exp(-10.0))


def test_observe_at_least_only_raises() -> None:
    e = PeakEwma(decay_s=1.0, initial_s=1.0, now=0.0)
    e.observe(2.0, 0.0)
    e.observe_at_least(0.5, 1.0)
    assert e.value == 2.0
    e.observe_at_least(5.0, 1.0)
    assert e.value == 5.0
