"""Pool selection (tiers, untried-first, panic mode, capacity) and outcome accounting."""

from __future__ import annotations

import math
import os
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config import GatewaySettings, Strategy, UpstreamSettings
from gateway.policy.classify import Outcome
from gateway.policy.outlier import State, Transition
from gateway.policy.upstreams import FAILURE_PENALTY_S, RETRY_AFTER_CAP_S, Choice, Pool, Upstream

Event = tuple[str, State, State, float]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(key)
    yield


def ups(*specs: dict[str, Any] | str) -> list[UpstreamSettings]:
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            spec = {"name": spec}
        spec = {"url": f"http://10.0.0.{i + 1}:8000", **spec}
        out.append(UpstreamSettings(**spec))
    return out


def make_pool(
    *specs: dict[str, Any] | str,
    strategy: Strategy = Strategy.PRIORITY,
    events: list[Event] | None = None,
    now: float = 0.0,
    **settings: Any,
) -> Pool:
    cfg = GatewaySettings(upstreams=ups(*specs), strategy=strategy, **settings)

    def listener(u: Upstream, t: Transition, at: float) -> None:
        if events is not None:
            events.append((u.name, t.before, t.after, at))

    return Pool(cfg, now, listener)


def eject(pool: Pool, up: Upstream, now: float) -> None:
    for _ in range(3):
        pool.record(up, Outcome.HTTP_5XX, now, 0.01)
    assert up.health.state(now) is State.EJECTED


def make_unhealthy(pool: Pool, up: Upstream, now: float) -> None:
    for _ in range(3):
        pool.record_check(up, False, now)
    assert up.health.state(now) is State.UNHEALTHY


def choose(pool: Pool, now: float = 0.0, tried: tuple[Upstream, ...] = ()) -> Choice:
    return choose_with(pool, now, random.Random(0), tried)


def choose_with(pool: Pool, now: float, rng: random.Random, tried: tuple[Upstream, ...] = ()) -> Choice:
    c = pool.choose(now, rng, tried)
    assert c is not None
    return c


# --- construction --------------------------------------------------------------------------


def test_pool_builds_upstreams_from_settings() -> None:
    pool = make_pool(
        {"name": "a", "weight": 2.0, "priority": 1, "max_inflight": 4, "headers": {"K": "v"}},
        "b",
        ewma_default_s=0.25,
    )
    a, b = pool.upstreams
    assert (a.index, a.name, a.weight, a.priority, a.max_inflight) == (0, "a", 2.0, 1, 4)
    assert a.headers == (("K", "v"),)
    assert a.base_url == "http://10.0.0.1:8000"
    assert pool.by_name == {"a": a, "b": b}
    assert a.latency_s == b.latency_s == 0.25
    assert a.inflight == 0 and a.has_capacity
    assert not a.measured and not b.measured  # the default is only a prior


# --- normal selection ----------------------------------------------------------------------


def test_choose_prefers_lowest_priority_tier() -> None:
    pool = make_pool({"name": "backup", "priority": 1}, {"name": "primary", "priority": 0})
    c = choose(pool)
    assert c.upstream.name == "primary"
    assert not c.panic


@pytest.mark.parametrize("strategy", list(Strategy))
def test_choose_never_leaves_best_tier_for_any_strategy(strategy: Strategy) -> None:
    pool = make_pool(
        {"name": "p1", "priority": 0},
        {"name": "p2", "priority": 0},
        {"name": "b1", "priority": 1, "weight": 100.0},
        strategy=strategy,
    )
    pool.by_name["p1"].inflight = 50
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        c = pool.choose(0.0, rng)
        assert c is not None
        seen.add(c.upstream.name)
    assert seen <= {"p1", "p2"}


def test_choose_applies_strategy_within_tier() -> None:
    pool = make_pool(
        {"name": "a", "priority": 0},
        {"name": "b", "priority": 0},
        {"name": "c", "priority": 1},
        strategy=Strategy.ROUND_ROBIN,
    )
    rng = random.Random(0)
    seq = []
    for _ in range(4):
        c = pool.choose(0.0, rng)
        assert c is not None
        seq.append(c.upstream.name)
    assert seq == ["a", "b", "a", "b"]


def test_choose_latency_strategy_favours_faster_upstream() -> None:
    pool = make_pool("slow", "fast", "mid", strategy=Strategy.LATENCY)
    pool.record(pool.by_name["slow"], Outcome.SUCCESS, 0.0, 0.9)
    pool.record(pool.by_name["mid"], Outcome.SUCCESS, 0.0, 0.5)
    pool.record(pool.by_name["fast"], Outcome.SUCCESS, 0.0, 0.1)
    rng = random.Random(0)
    wins: Counter[str] = Counter()
    for _ in range(2000):
        c = pool.choose(0.0, rng)
        assert c is not None
        wins[c.upstream.name] += 1
    assert wins["fast"] / 2000 > 0.6
    assert wins["slow"] == 0


def test_choose_latency_strategy_probes_unmeasured_upstream_at_once() -> None:
    pool = make_pool("known", "new", strategy=Strategy.LATENCY, ewma_default_s=5.0)
    known, new = pool.upstreams
    pool.record(known, Outcome.SUCCESS, 0.0, 0.001)
    rng = random.Random(0)
    for _ in range(50):
        assert pool.choose(0.0, rng) == Choice(new, False)
    # With the probe in flight, the next requests see its prior (5.0 * 2) and go elsewhere.
    new.inflight = 1
    for _ in range(50):
        assert pool.choose(0.0, rng) == Choice(known, False)


def test_choose_latency_strategy_equally_fast_upstreams_share_traffic() -> None:
    pool = make_pool("a", "b", strategy=Strategy.LATENCY)
    a, b = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.100)
    pool.record(b, Outcome.SUCCESS, 0.0, 0.105)  # within TIE_TOLERANCE
    rng = random.Random(0)
    wins: Counter[str] = Counter()
    for _ in range(2000):
        c = pool.choose(0.0, rng)
        assert c is not None
        wins[c.upstream.name] += 1
    assert 0.45 < wins["a"] / 2000 < 0.55


def test_choose_latency_strategy_decays_candidate_estimates() -> None:
    pool = make_pool("a", "b", strategy=Strategy.LATENCY, ewma_decay_s=10.0)
    a, b = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 1.0)
    pool.record(b, Outcome.SUCCESS, 0.0, 0.5)
    choose(pool, 10.0)
    assert a.latency_s == pytest.approx(math.exp(-1.0))
    assert b.latency_s == pytest.approx(0.5 * math.exp(-1.0))
    assert a.ewma.stamp == b.ewma.stamp == 10.0
    assert a.measured and b.measured


def test_choose_latency_strategy_idle_slow_upstream_wins_again_after_decay() -> None:
    pool = make_pool("slow", "fast", strategy=Strategy.LATENCY, ewma_decay_s=10.0)
    slow, fast = pool.upstreams
    pool.record(slow, Outcome.SUCCESS, 0.0, 1.0)
    pool.record(fast, Outcome.SUCCESS, 0.0, 0.1)
    assert choose(pool, 0.0).upstream is fast
    pool.record(fast, Outcome.SUCCESS, 100.0, 0.1)  # fast kept serving; slow sat idle
    assert choose(pool, 100.0).upstream is slow  # 1.0 * exp(-10) < 0.1


def test_choose_decays_only_final_candidates() -> None:
    pool = make_pool(
        {"name": "p", "priority": 0},
        {"name": "tried", "priority": 0},
        {"name": "backup", "priority": 1},
        {"name": "ejected", "priority": 0},
        strategy=Strategy.LATENCY,
    )
    p, tried, backup, ejected = pool.upstreams
    for u in pool.upstreams:
        pool.record(u, Outcome.SUCCESS, 0.0, 2.0)
    eject(pool, ejected, 0.0)
    before = {u.name: u.latency_s for u in pool.upstreams}
    assert choose(pool, 10.0, tried=(tried,)) == Choice(p, False)
    assert p.latency_s == pytest.approx(2.0 * math.exp(-1.0))
    for u in (tried, backup, ejected):
        assert u.latency_s == before[u.name]
        assert u.ewma.stamp == 0.0


@pytest.mark.parametrize("strategy", [Strategy.ROUND_ROBIN, Strategy.LEAST_INFLIGHT, Strategy.PRIORITY])
def test_choose_other_strategies_do_not_decay(strategy: Strategy) -> None:
    pool = make_pool("a", "b", strategy=strategy)
    for u in pool.upstreams:
        pool.record(u, Outcome.SUCCESS, 0.0, 0.7)
    choose(pool, 50.0)
    assert all(u.latency_s == 0.7 and u.ewma.stamp == 0.0 for u in pool.upstreams)


def test_choose_skips_unroutable_even_in_better_tier() -> None:
    pool = make_pool({"name": "primary", "priority": 0}, {"name": "backup", "priority": 1})
    eject(pool, pool.by_name["primary"], 0.0)
    c = choose(pool)
    assert c.upstream.name == "backup"
    assert not c.panic


@pytest.mark.parametrize("condition", ["ejected", "cooling", "unhealthy", "drained"])
def test_choose_skips_each_unroutable_state(condition: str) -> None:
    pool = make_pool("a", "b")
    a = pool.by_name["a"]
    if condition == "ejected":
        eject(pool, a, 0.0)
    elif condition == "cooling":
        pool.record(a, Outcome.RATE_LIMITED, 0.0, 0.01, retry_after_s=10.0)
    elif condition == "unhealthy":
        make_unhealthy(pool, a, 0.0)
    else:
        pool.drain(a, 0.0)
    rng = random.Random(0)
    for _ in range(20):
        assert pool.choose(1.0, rng) == Choice(pool.by_name["b"], False)


def test_choose_prefers_untried_upstream() -> None:
    pool = make_pool("a", "b", "c")
    a, b, c = pool.upstreams
    assert choose(pool, tried=(a,)).upstream is b
    assert choose(pool, tried=(a, b)).upstream is c


def test_a_retry_stays_in_its_tier_until_the_tier_is_spent() -> None:
    pool = make_pool({"name": "primary", "priority": 0}, {"name": "backup", "priority": 1})
    primary, backup = pool.upstreams
    assert choose(pool, tried=(primary,)) == Choice(primary, False)  # a blip: the same upstream
    c = choose(pool, tried=(primary, primary))  # tried twice: the tier is spent
    assert c.upstream is backup
    assert not c.panic


def test_a_retry_goes_to_an_untried_upstream_of_the_same_tier_before_the_next_tier() -> None:
    pool = make_pool({"name": "a"}, {"name": "b"}, {"name": "backup", "priority": 1})
    a, b, backup = pool.upstreams
    assert choose(pool, tried=(a,)).upstream is b
    assert choose(pool, tried=(a, b)).upstream is backup


def test_a_short_rate_limit_cooldown_is_waited_out_in_the_tier() -> None:
    pool = make_pool({"name": "primary", "priority": 0}, {"name": "backup", "priority": 1})
    primary, backup = pool.upstreams
    pool.record(primary, Outcome.RATE_LIMITED, 0.0, 0.01, retry_after_s=1.5)
    rng = random.Random(0)
    assert pool.choose(0.5, rng, (primary,), wait_up_to_s=2.0) == Choice(primary, False, 1.0)
    assert pool.choose(0.5, rng, (primary,), wait_up_to_s=0.5) == Choice(backup, False, 0.0)
    assert pool.choose(0.5, rng, (primary,)) == Choice(backup, False, 0.0)


def test_a_long_rate_limit_cooldown_moves_to_the_next_tier() -> None:
    pool = make_pool({"name": "primary", "priority": 0}, {"name": "backup", "priority": 1})
    primary, backup = pool.upstreams
    pool.record(primary, Outcome.RATE_LIMITED, 0.0, 0.01, retry_after_s=30)
    assert pool.choose(0.0, random.Random(0), (primary,), wait_up_to_s=2.0) == Choice(backup, False)


def test_choose_reuses_tried_routable_when_all_tried() -> None:
    pool = make_pool({"name": "a", "priority": 0}, {"name": "b", "priority": 1})
    a, b = pool.upstreams
    c = choose(pool, tried=(a, b))
    assert c == Choice(a, False)


def test_choose_reuses_tried_routable_rather_than_panicking_into_untried() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    eject(pool, b, 0.0)
    assert choose(pool, tried=(a,)) == Choice(a, False)


def test_choose_skips_full_upstream() -> None:
    pool = make_pool({"name": "a", "max_inflight": 2}, "b")
    a, b = pool.upstreams
    a.inflight = 2
    assert choose(pool).upstream is b
    a.inflight = 1
    assert choose(pool).upstream is a


def test_choose_none_when_all_healthy_are_full() -> None:
    pool = make_pool(
        {"name": "a", "max_inflight": 1},
        {"name": "b", "max_inflight": 3},
        "broken",
    )
    a, b, broken = pool.upstreams
    eject(pool, broken, 0.0)
    a.inflight, b.inflight = 1, 3
    # shed load instead of panicking into the ejected one, which has capacity
    assert pool.choose(1.0, random.Random(0)) is None


def test_choose_full_untried_loses_to_tried_with_capacity() -> None:
    pool = make_pool({"name": "a", "max_inflight": 1}, "b")
    a, b = pool.upstreams
    a.inflight = 1
    assert choose(pool, tried=(b,)) == Choice(b, False)


# --- panic mode ----------------------------------------------------------------------------


def test_panic_when_none_routable_picks_soonest_available() -> None:
    pool = make_pool("a", "b", "c")
    a, b, c = pool.upstreams
    eject(pool, a, 0.0)  # until 30
    pool.record(b, Outcome.RATE_LIMITED, 0.0, 0.01, retry_after_s=10.0)  # until 10
    make_unhealthy(pool, c, 0.0)  # never by itself
    choice = choose(pool, now=1.0)
    assert choice == Choice(b, True)


def test_panic_never_picks_tried_upstream() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    eject(pool, a, 0.0)
    pool.record(b, Outcome.RATE_LIMITED, 0.0, 0.01, retry_after_s=60.0)
    assert choose(pool, 1.0, tried=(a,)) == Choice(b, True)
    assert pool.choose(1.0, random.Random(0), (a, b)) is None


def test_panic_never_picks_drained_upstream() -> None:
    pool = make_pool({"name": "drained", "priority": 0}, {"name": "sick", "priority": 1})
    drained, sick = pool.upstreams
    pool.drain(drained, 0.0)
    make_unhealthy(pool, sick, 0.0)
    assert choose(pool, 1.0) == Choice(sick, True)
    pool.drain(sick, 2.0)
    assert pool.choose(3.0, random.Random(0)) is None


def test_panic_never_exceeds_max_inflight() -> None:
    pool = make_pool({"name": "soon", "max_inflight": 1}, "later")
    soon, later = pool.upstreams
    pool.record(soon, Outcome.RATE_LIMITED, 0.0, 0.01, retry_after_s=1.0)
    eject(pool, later, 0.0)
    soon.inflight = 1
    assert choose(pool, 0.5) == Choice(later, True)
    later.max_inflight = 2
    later.inflight = 2
    assert pool.choose(0.5, random.Random(0)) is None


def test_panic_ties_broken_by_priority_then_cost() -> None:
    pool = make_pool({"name": "b1", "priority": 1}, {"name": "p-slow", "priority": 0}, {"name": "p-fast"})
    b1, slow, fast = pool.upstreams
    for u in pool.upstreams:
        make_unhealthy(pool, u, 0.0)  # all available_at = inf
    slow.ewma.observe(2.0, 0.0)  # first samples: these replace the priors
    fast.ewma.observe(0.2, 0.0)
    assert choose(pool, 1.0) == Choice(fast, True)
    fast.inflight = 20  # cost 0.2 * 21 = 4.2 > 2.0
    assert choose(pool, 1.0) == Choice(slow, True)


def test_panic_prefers_unmeasured_idle_upstream_on_cost() -> None:
    pool = make_pool("measured", "fresh")
    measured, fresh = pool.upstreams
    pool.record(measured, Outcome.HTTP_4XX, 0.0, 0.01)
    assert measured.measured and not fresh.measured
    for u in pool.upstreams:
        make_unhealthy(pool, u, 0.0)
    assert choose(pool, 1.0) == Choice(fresh, True)  # cost 0 while nothing is in flight
    fresh.inflight = 1  # now its prior counts: 0.05 * 2 > 0.01
    assert choose(pool, 1.0) == Choice(measured, True)


def test_panic_does_not_decay_estimates() -> None:
    pool = make_pool("a", strategy=Strategy.LATENCY)
    (a,) = pool.upstreams
    pool.record(a, Outcome.HTTP_4XX, 0.0, 0.4)
    make_unhealthy(pool, a, 0.0)
    assert choose(pool, 20.0) == Choice(a, True)
    assert a.latency_s == 0.4
    assert a.ewma.stamp == 0.0


def test_panic_unhealthy_used_as_last_resort() -> None:
    pool = make_pool("only")
    (only,) = pool.upstreams
    make_unhealthy(pool, only, 0.0)
    assert choose(pool, 5.0) == Choice(only, True)


def test_panic_ends_when_ejection_expires() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    eject(pool, a, 0.0)
    eject(pool, b, 5.0)
    assert choose(pool, 10.0).panic
    assert choose(pool, 30.0) == Choice(a, False)


# --- record: latency estimate --------------------------------------------------------------


def test_record_success_feeds_latency_estimate() -> None:
    pool = make_pool("a")
    (a,) = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 1.0, 0.4)
    assert a.latency_s == 0.4
    assert a.ewma.stamp == 1.0
    assert a.measured


def test_record_first_sample_replaces_default_even_when_lower() -> None:
    pool = make_pool("a", ewma_default_s=0.5)
    (a,) = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.02)
    assert a.latency_s == 0.02
    assert a.measured
    pool.record(a, Outcome.SUCCESS, 0.0, 0.01)  # later lower samples are time-weighted
    assert a.latency_s == 0.02


@pytest.mark.parametrize("outcome", [Outcome.HTTP_5XX, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET])
def test_record_failure_folds_in_at_least_penalty(outcome: Outcome) -> None:
    pool = make_pool("a", "b", "c")
    a = pool.upstreams[0]
    pool.record(a, outcome, 0.0, 0.002)  # a fast failure must not look fast
    assert a.latency_s == FAILURE_PENALTY_S == 1.0


def test_record_slow_failure_folds_in_its_real_latency() -> None:
    pool = make_pool("a")
    (a,) = pool.upstreams
    pool.record(a, Outcome.TIMEOUT, 0.0, 7.5)
    assert a.latency_s == 7.5


def test_record_client_error_folds_in_real_latency_without_penalty() -> None:
    pool = make_pool("a")
    (a,) = pool.upstreams
    pool.record(a, Outcome.HTTP_4XX, 0.0, 0.3)
    assert a.latency_s == 0.3


def test_record_rate_limit_does_not_touch_latency_estimate() -> None:
    pool = make_pool("a")
    (a,) = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.2)
    pool.record(a, Outcome.RATE_LIMITED, 5.0, 9.0)
    pool.record(a, Outcome.RATE_LIMITED, 6.0, 0.001)
    assert a.latency_s == 0.2
    assert a.ewma.stamp == 0.0


def test_record_rate_limit_does_not_count_as_measurement() -> None:
    pool = make_pool("a", "b")
    a = pool.upstreams[0]
    pool.record(a, Outcome.RATE_LIMITED, 0.0, 0.001)
    assert not a.measured
    assert a.latency_s == 0.05


def test_record_rate_limit_starts_cooldown_with_retry_after() -> None:
    pool = make_pool("a", "b")
    a = pool.upstreams[0]
    pool.record(a, Outcome.RATE_LIMITED, 0.0, 0.1, retry_after_s=8.0)
    assert a.health.state(7.9) is State.COOLING_DOWN
    assert a.health.state(8.0) is State.HEALTHY


# --- recovery resets the estimate ----------------------------------------------------------


def test_recovery_resets_latency_to_median_of_other_routable() -> None:
    pool = make_pool("a", "b", "c", "d", "sick")
    a, b, c, d, sick = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.1)
    pool.record(b, Outcome.SUCCESS, 0.0, 0.5)
    pool.record(c, Outcome.SUCCESS, 0.0, 0.9)
    eject(pool, d, 0.0)  # until 30
    eject(pool, sick, 10.0)  # until 40
    assert sick.latency_s == FAILURE_PENALTY_S
    pool.refresh(30.0)
    # d recovers while sick is ejected: median of a, b, c only
    assert d.latency_s == pytest.approx(0.5)
    assert not d.measured
    pool.record(d, Outcome.SUCCESS, 31.0, 2.0)
    pool.refresh(40.0)
    # sick recovers with a, b, c, d routable
    assert sick.latency_s == pytest.approx(statistics.median([0.1, 0.5, 0.9, 2.0]))
    assert not sick.measured


def test_recovery_with_no_other_routable_uses_default_estimate() -> None:
    pool = make_pool("a", "b", ewma_default_s=0.07)
    a, b = pool.upstreams
    eject(pool, a, 0.0)
    make_unhealthy(pool, b, 0.0)
    pool.refresh(30.0)
    assert a.latency_s == 0.07
    assert not a.measured


def test_recovery_by_successful_attempt_keeps_that_attempts_sample() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    pool.record(b, Outcome.SUCCESS, 0.0, 0.3)
    eject(pool, a, 0.0)
    pool.record(a, Outcome.SUCCESS, 5.0, 0.9)  # ends the ejection early
    assert a.health.routable(5.0)
    # The reset to a neutral prior happens first; the real sample then replaces it.
    assert a.latency_s == pytest.approx(0.9)
    assert a.measured


def test_recovery_by_health_checks_resets_estimate() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    pool.record(b, Outcome.SUCCESS, 0.0, 0.3)
    for _ in range(3):
        pool.record(a, Outcome.TIMEOUT, 0.0, 5.0)
    make_unhealthy(pool, a, 0.0)
    pool.record_check(a, True, 40.0)  # after the 30 s ejection: checks do not end it early
    pool.record_check(a, True, 50.0)
    assert a.health.routable(50.0)
    assert a.latency_s == pytest.approx(0.3)
    assert not a.measured


def test_recovery_after_drain_resets_estimate() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 4.0)
    pool.record(b, Outcome.SUCCESS, 0.0, 0.3)
    pool.drain(a, 1.0)
    pool.enable(a, 2.0)
    assert a.latency_s == pytest.approx(0.3)
    assert not a.measured


def test_recovery_from_cooldown_resets_estimate() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.8)
    pool.record(b, Outcome.SUCCESS, 0.0, 0.1)
    pool.record(a, Outcome.RATE_LIMITED, 1.0, 0.01, retry_after_s=5.0)
    assert a.latency_s == 0.8 and a.measured  # the 429 itself is not folded in
    pool.refresh(6.0)
    assert a.health.routable(6.0)
    assert a.latency_s == pytest.approx(0.1)
    assert not a.measured
    assert a.ewma.stamp == 6.0


def test_recovery_from_cooldown_by_success_keeps_that_attempts_sample() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    pool.record(b, Outcome.SUCCESS, 0.0, 0.2)
    pool.record(a, Outcome.RATE_LIMITED, 1.0, 0.01, retry_after_s=5.0)
    pool.record(a, Outcome.SUCCESS, 2.0, 0.6)  # a success ends the cooldown early
    assert a.health.routable(2.0)
    assert a.latency_s == pytest.approx(0.6)
    assert a.measured


def test_first_sample_after_recovery_replaces_neutral_estimate() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    pool.record(b, Outcome.SUCCESS, 0.0, 0.3)
    eject(pool, a, 0.0)
    pool.refresh(30.0)
    assert a.latency_s == pytest.approx(0.3) and not a.measured
    pool.record(a, Outcome.SUCCESS, 30.0, 0.04)  # lower, at the same instant: still replaces
    assert a.latency_s == 0.04
    assert a.measured


def test_recovered_upstream_is_probed_first_under_latency_strategy() -> None:
    # Without slow start, which would draw it into fewer pairs (tests/gateway/test_slow_start.py).
    pool = make_pool("a", "b", "c", strategy=Strategy.LATENCY, slow_start_s=0.0)
    a, b, c = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.01)
    pool.record(b, Outcome.SUCCESS, 0.0, 0.01)
    eject(pool, c, 0.0)
    pool.record(a, Outcome.SUCCESS, 30.0, 0.01)
    pool.record(b, Outcome.SUCCESS, 30.0, 0.01)
    pool.refresh(30.0)
    assert not c.measured
    rng = random.Random(0)
    # c wins every pair it is drawn into while idle: 2 of the 3 pairs.
    wins = Counter(choose_with(pool, 30.0, rng).upstream.name for _ in range(3000))
    assert wins["c"] / 3000 > 0.6


def test_recovery_median_ignores_unroutable_and_self() -> None:
    pool = make_pool("a", "b", "c", ewma_default_s=0.05)
    a, b, c = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.2)
    pool.record(b, Outcome.SUCCESS, 0.0, 0.4)
    pool.drain(b, 0.0)
    pool.record(c, Outcome.SUCCESS, 0.0, 9.0)
    pool.drain(c, 0.0)
    pool.enable(c, 1.0)  # a is the only other routable one; b is drained
    assert c.latency_s == pytest.approx(0.2)


def test_failures_while_ejected_do_not_preload_next_ejection() -> None:
    events: list[Event] = []
    pool = make_pool("a", "b", events=events)
    a = pool.upstreams[0]
    eject(pool, a, 0.0)  # until 30
    for t in (5.0, 10.0, 15.0):  # panic-mode traffic that also fails
        pool.record(a, Outcome.CONNECT_ERROR, t, 0.01)
    pool.refresh(30.0)
    assert a.health.routable(30.0)
    pool.record(a, Outcome.CONNECT_ERROR, 31.0, 0.01)
    assert a.health.routable(31.0)  # one failure, not four
    pool.record(a, Outcome.CONNECT_ERROR, 32.0, 0.01)
    pool.record(a, Outcome.CONNECT_ERROR, 33.0, 0.01)
    assert a.health.state(33.0) is State.EJECTED
    assert [(e[1], e[2]) for e in events] == [
        (State.HEALTHY, State.EJECTED),
        (State.EJECTED, State.HEALTHY),
        (State.HEALTHY, State.EJECTED),
    ]


def test_recovery_does_not_reset_without_state_change() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.8)
    pool.record(b, Outcome.SUCCESS, 0.0, 0.1)
    pool.record(a, Outcome.SUCCESS, 0.0, 0.5)
    pool.refresh(1.0)
    assert a.latency_s == 0.8
    assert a.measured


# --- transitions ---------------------------------------------------------------------------


def test_on_transition_called_once_per_change() -> None:
    events: list[Event] = []
    pool = make_pool("a", "b", events=events)
    a = pool.by_name["a"]
    for i in range(6):
        pool.record(a, Outcome.HTTP_5XX, float(i) * 0.1, 0.01)
    assert events == [("a", State.HEALTHY, State.EJECTED, 2 * 0.1)]  # on the third failure
    for now in (10.0, 29.9, 30.5, 31.0, 60.0):
        pool.refresh(now)
    assert events[1:] == [("a", State.EJECTED, State.HEALTHY, 30.5)]


def test_on_transition_reports_each_upstream_and_operator_actions() -> None:
    events: list[Event] = []
    pool = make_pool("a", "b", events=events)
    a, b = pool.upstreams
    pool.drain(a, 1.0)
    pool.drain(a, 2.0)
    make_unhealthy(pool, b, 3.0)
    pool.enable(a, 4.0)
    pool.enable(a, 5.0)
    assert events == [
        ("a", State.HEALTHY, State.DRAINED, 1.0),
        ("b", State.HEALTHY, State.UNHEALTHY, 3.0),
        ("a", State.DRAINED, State.HEALTHY, 4.0),
    ]


def test_on_transition_sees_estimate_already_reset() -> None:
    seen: list[float] = []
    cfg = GatewaySettings(upstreams=ups("a", "b"), ewma_default_s=0.05)
    pool = Pool(cfg, 0.0, lambda u, t, now: seen.append(u.latency_s))
    a = pool.upstreams[0]
    for _ in range(3):
        pool.record(a, Outcome.HTTP_5XX, 0.0, 0.01)
    pool.refresh(30.0)
    assert seen == [FAILURE_PENALTY_S, 0.05]
    assert not a.measured


def test_pool_without_listener_still_tracks_state() -> None:
    cfg = GatewaySettings(upstreams=ups("a"))
    pool = Pool(cfg, 0.0)
    (a,) = pool.upstreams
    for _ in range(3):
        pool.record(a, Outcome.HTTP_5XX, 0.0, 0.01)
    assert pool.routable_count(0.0) == 0
    pool.refresh(30.0)
    assert pool.routable_count(30.0) == 1


# --- routable_count, retry_after_s, describe_unavailable -----------------------------------


def test_routable_count_counts_healthy_upstreams() -> None:
    pool = make_pool("a", "b", "c")
    assert pool.routable_count(0.0) == 3
    eject(pool, pool.upstreams[0], 0.0)
    pool.drain(pool.upstreams[1], 0.0)
    assert pool.routable_count(0.0) == 1
    assert pool.routable_count(30.0) == 2


def test_retry_after_is_zero_when_something_routable() -> None:
    pool = make_pool("a", "b")
    eject(pool, pool.upstreams[0], 0.0)
    assert pool.retry_after_s(1.0) == 0.0


def test_retry_after_is_time_until_soonest_recovery() -> None:
    pool = make_pool("a", "b", "c")
    a, b, c = pool.upstreams
    eject(pool, a, 0.0)  # 30
    pool.record(b, Outcome.RATE_LIMITED, 0.0, 0.01, retry_after_s=12.0)  # 12
    pool.drain(c, 0.0)
    assert pool.retry_after_s(2.0) == pytest.approx(10.0)


def test_retry_after_none_when_nothing_recovers_by_itself() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    pool.drain(a, 0.0)
    make_unhealthy(pool, b, 0.0)
    assert pool.retry_after_s(1.0) is None


def test_describe_unavailable_counts_states_and_full_upstreams() -> None:
    pool = make_pool("a", {"name": "b", "max_inflight": 1}, "c", "d")
    a, b, c, d = pool.upstreams
    pool.drain(a, 0.0)
    b.inflight = 1
    eject(pool, c, 0.0)
    eject(pool, d, 0.0)
    assert pool.describe_unavailable(1.0) == (
        "0 of 4 upstreams can take the request (1 drained, 2 ejected, 1 healthy; 1 at max_inflight)"
    )


def test_describe_unavailable_without_full_upstreams() -> None:
    pool = make_pool("a", "b")
    a, b = pool.upstreams
    make_unhealthy(pool, a, 0.0)
    pool.record(b, Outcome.RATE_LIMITED, 0.0, 0.01)
    assert pool.describe_unavailable(1.0) == (
        "0 of 2 upstreams can take the request (1 cooling_down, 1 unhealthy)"
    )


def test_retry_after_for_an_ejection_is_capped_at_a_few_seconds() -> None:
    pool = make_pool("a", "b")
    for up in pool.upstreams:
        eject(pool, up, 0.0)  # 30 s each: a client honouring Retry-After would stall that long
    assert pool.retry_after_s(1.0) == RETRY_AFTER_CAP_S


def test_retry_after_for_a_rate_limit_is_the_cooldown_asked_for() -> None:
    pool = make_pool("a")
    pool.record(pool.upstreams[0], Outcome.RATE_LIMITED, 0.0, 0.01, retry_after_s=7.0)
    assert pool.retry_after_s(1.0) == pytest.approx(6.0)


# --- requests still waiting bound the estimate from below -------------------------------------


def test_estimate_never_decays_below_the_oldest_waiting_attempt() -> None:
    pool = make_pool("hung", "good", strategy=Strategy.LATENCY)
    hung, good = pool.upstreams
    pool.record(hung, Outcome.SUCCESS, 0.0, 0.05)
    pool.record(good, Outcome.SUCCESS, 0.0, 0.05)
    token = object()
    hung.attempt_started(token, 0.0)
    for now in (5.0, 10.0, 20.0):  # nothing completes at hung; its estimate would decay to ~0
        choose_with(pool, now, random.Random(0))
        assert hung.latency_s >= now - 0.0
        assert good.latency_s < 0.05
    hung.attempt_ended(token)
    assert hung.inflight == 0 and not hung.waiting


def test_answered_attempt_stops_counting_as_waiting() -> None:
    pool = make_pool("a", strategy=Strategy.LATENCY)
    (a,) = pool.upstreams
    token = object()
    a.attempt_started(token, 0.0)
    assert a.oldest_wait_s(3.0) == 3.0
    a.waiting.pop(token)  # headers arrived: a long stream is not a slow upstream
    assert a.oldest_wait_s(100.0) == 0.0
    assert a.inflight == 1


def test_abandoned_attempt_raises_the_estimate_but_never_lowers_it() -> None:
    pool = make_pool("a", strategy=Strategy.LATENCY)
    (a,) = pool.upstreams
    pool.record(a, Outcome.SUCCESS, 0.0, 0.5)
    pool.record_abandoned(a, 0.1, 1.0)  # gave up early: says nothing new
    assert a.latency_s == 0.5
    pool.record_abandoned(a, 4.0, 2.0)  # waited 4 s for nothing: at least that slow
    assert a.latency_s == 4.0


def test_the_last_attempt_goes_to_an_untried_upstream_of_any_tier() -> None:
    pool = make_pool({"name": "primary", "priority": 0}, {"name": "backup", "priority": 1})
    primary, backup = pool.upstreams
    assert pool.choose(0.0, random.Random(0), (primary,), last=True) == Choice(backup, False)


def test_an_upstream_that_refused_the_connection_is_not_retried_while_another_can_serve() -> None:
    pool = make_pool({"name": "primary", "priority": 0}, {"name": "backup", "priority": 1})
    primary, backup = pool.upstreams
    rng = random.Random(0)
    assert pool.choose(0.0, rng, (primary,), refused=(primary,)) == Choice(backup, False)
    lone = make_pool("only")
    (only,) = lone.upstreams
    assert lone.choose(0.0, rng, (only,), refused=(only,)) == Choice(only, False)  # nothing else
