"""Slow start: the ramp itself, its effect on each strategy's share, and the pool applying it (pure)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.config import Strategy
from gateway.policy.balancer import pick
from gateway.policy.classify import Outcome
from gateway.policy.slow_start import MIN_FACTOR, ramp
from tests.gateway.test_balancer import Cand
from tests.gateway.test_upstreams import make_pool

PICKS = 20_000


def test_ramp_is_linear_from_the_floor_to_full() -> None:
    assert ramp(0.0, 30.0) == MIN_FACTOR
    assert ramp(1.0, 30.0) == MIN_FACTOR  # 1/30 is below the 10% floor
    assert ramp(15.0, 30.0) == pytest.approx(0.5)
    assert ramp(27.0, 30.0) == pytest.approx(0.9)
    assert ramp(30.0, 30.0) == 1.0
    assert ramp(1e9, 30.0) == 1.0
    assert ramp(float("inf"), 30.0) == 1.0  # never ramped: -inf start


def test_ramp_off_with_zero_window_and_curved_by_aggression() -> None:
    assert ramp(0.0, 0.0) == 1.0
    assert ramp(7.5, 30.0, aggression=2.0) == pytest.approx(0.5)  # sqrt(0.25): faster early
    assert ramp(15.0, 30.0, aggression=0.5) == pytest.approx(0.25)  # slower early


def _share(strategy: Strategy, factor: float, n_others: int, concurrent: bool = False) -> float:
    """The ramping upstream's share of PICKS among `n_others` full-weight peers."""
    rng = random.Random(0)
    new = Cand("new", ramp=factor)
    cands = [new, *(Cand(f"o{i}") for i in range(n_others))]
    counts: Counter[str] = Counter()
    for i in range(PICKS):
        if concurrent and i % 50 == 0:
            for c in cands:
                c.inflight = 0
        chosen = pick(strategy, cands, rng)
        counts[chosen.name] += 1
        if concurrent:
            chosen.inflight += 1  # picks pile up as requests in flight, then drain every 50
    return counts["new"] / PICKS


@pytest.mark.parametrize("factor", [0.1, 0.5, 1.0])
def test_round_robin_share_follows_the_ramp(factor: float) -> None:
    expected = factor / (factor + 2)
    assert _share(Strategy.ROUND_ROBIN, factor, 2) == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize("factor", [0.1, 0.5, 1.0])
def test_least_inflight_share_follows_the_ramp_under_load(factor: float) -> None:
    expected = factor / (factor + 2)
    assert _share(Strategy.LEAST_INFLIGHT, factor, 2, concurrent=True) == pytest.approx(expected, abs=0.03)


def test_latency_share_rises_with_the_ramp() -> None:
    # P2C draws the pair by effective weight and divides cost by it: the share grows with the ramp.
    shares = [_share(Strategy.LATENCY, f, 3, concurrent=True) for f in (0.1, 0.4, 0.7, 1.0)]
    assert shares == sorted(shares)
    assert shares[0] < 0.06 and shares[-1] == pytest.approx(0.25, abs=0.02)


def test_pool_ramps_a_recovered_upstream_and_not_the_starting_ones() -> None:
    pool = make_pool("a", "b", strategy=Strategy.ROUND_ROBIN, slow_start_s=30.0)
    a, b = pool.upstreams
    rng = random.Random(0)
    pool.choose(0.0, rng)
    assert (a.effective_weight, b.effective_weight) == (1.0, 1.0)  # the fleet it started with
    for _ in range(3):
        pool.record(a, Outcome.HTTP_5XX, 0.0, 0.1)
    pool.refresh(30.0)  # the 30 s ejection ran out: back in service, ramping from here

    def share_of_a(at: float, n: int = 1000) -> float:
        picks = [pool.choose(at, rng) for _ in range(n)]
        return sum(1 for c in picks if c is not None and c.upstream is a) / n

    shares = [share_of_a(30.0 + t) for t in (0.0, 7.5, 15.0, 22.5, 30.0)]
    assert shares == sorted(shares)
    assert shares[0] == pytest.approx(0.1 / 1.1, abs=0.01)
    assert shares[2] == pytest.approx(0.5 / 1.5, abs=0.01)
    assert shares[-1] == pytest.approx(0.5, abs=0.01)


def test_429_cooldown_ending_does_not_ramp_and_zero_disables() -> None:
    pool = make_pool("a", "b", strategy=Strategy.ROUND_ROBIN, slow_start_s=30.0)
    a, _ = pool.upstreams
    pool.record(a, Outcome.RATE_LIMITED, 0.0, 0.1, retry_after_s=1.0)
    pool.refresh(2.0)
    pool.choose(2.0, random.Random(0))
    assert a.effective_weight == 1.0
    off = make_pool("a", "b", strategy=Strategy.ROUND_ROBIN, slow_start_s=0.0)
    x, _ = off.upstreams
    off.drain(x, 0.0)
    off.enable(x, 1.0)
    off.choose(1.0, random.Random(0))
    assert x.effective_weight == 1.0
