"""Health state machine: ejection, cooldown, active checks, drain, and transitions."""

from __future__ import annotations

import pytest

from gateway.config import HealthSettings, OutlierSettings
from gateway.policy.classify import Outcome
from gateway.policy.outlier import State, Transition, UpstreamHealth

INF = float("inf")


def make(**outlier: float) -> UpstreamHealth:
    return UpstreamHealth(OutlierSettings(**outlier), HealthSettings())


def fail(h: UpstreamHealth, now: float, n: int = 3) -> list[Transition]:
    """Record `n` failed attempts at `now`; return the transitions they caused."""
    out = [h.record(Outcome.HTTP_5XX, now) for _ in range(n)]
    return [t for t in out if t is not None]


def eject_duration(h: UpstreamHealth, now: float) -> float:
    """Eject `h` with three failures at `now` and return how long the ejection lasts."""
    fail(h, now)
    assert h.state(now) is State.EJECTED
    assert h.ejected_until is not None
    return h.ejected_until - now


# --- initial state -------------------------------------------------------------------------


def test_health_starts_healthy_and_routable() -> None:
    h = make()
    assert h.state(0.0) is State.HEALTHY
    assert h.routable(0.0)
    assert h.available_at(12.5) == 12.5
    assert h.refresh(0.0) is None


# --- passive ejection ----------------------------------------------------------------------


def test_ejection_needs_consecutive_failures_threshold() -> None:
    h = make()
    assert fail(h, 0.0, n=2) == []
    assert h.state(0.0) is State.HEALTHY
    t = h.record(Outcome.HTTP_5XX, 0.0)
    assert t is not None
    assert (t.before, t.after) == (State.HEALTHY, State.EJECTED)
    assert "3 consecutive failures" in t.reason
    assert not h.routable(0.0)


@pytest.mark.parametrize("outcome", [Outcome.HTTP_5XX, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET])
def test_ejection_counts_every_failure_kind(outcome: Outcome) -> None:
    h = make()
    for _ in range(3):
        h.record(outcome, 1.0)
    assert h.state(1.0) is State.EJECTED


def test_ejection_threshold_follows_settings() -> None:
    h = make(consecutive_failures=5)
    fail(h, 0.0, n=4)
    assert h.state(0.0) is State.HEALTHY
    fail(h, 0.0, n=1)
    assert h.state(0.0) is State.EJECTED


def test_ejection_streak_reset_by_success() -> None:
    h = make()
    fail(h, 0.0, n=2)
    assert h.record(Outcome.SUCCESS, 0.0) is None
    fail(h, 0.0, n=2)
    assert h.state(0.0) is State.HEALTHY


@pytest.mark.parametrize("outcome", [Outcome.HTTP_4XX, Outcome.RATE_LIMITED])
def test_ejection_not_caused_by_client_errors_or_rate_limits(outcome: Outcome) -> None:
    h = make()
    for _ in range(20):
        h.record(outcome, 0.0, 0.0)
    assert h.state(0.0) is State.HEALTHY
    assert h.ejection_count == 0


def test_ejection_lasts_base_time_then_ends_by_itself() -> None:
    h = make()
    fail(h, 100.0)
    assert h.state(129.999) is State.EJECTED
    assert h.available_at(110.0) == 130.0
    assert h.state(130.0) is State.HEALTHY
    assert h.routable(130.0)


def test_ejection_time_grows_with_each_ejection() -> None:
    h = make()
    now = 0.0
    durations = []
    for _ in range(4):
        d = eject_duration(h, now)
        durations.append(d)
        now += d + 1.0  # fail again one second after each ejection ends
    assert durations == [30.0, 60.0, 90.0, 120.0]


def test_ejection_time_capped_at_max_ejection() -> None:
    h = make()
    now = 0.0
    durations = []
    for _ in range(15):
        d = eject_duration(h, now)
        durations.append(d)
        now += d + 1.0
    assert max(durations) == 300.0
    assert durations[9:] == [300.0] * 6
    assert durations[:10] == [30.0 * k for k in range(1, 11)]


def test_ejection_time_cap_follows_settings() -> None:
    h = make(base_ejection_s=10.0, max_ejection_s=25.0)
    now = 0.0
    durations = []
    for _ in range(4):
        d = eject_duration(h, now)
        durations.append(d)
        now += d + 0.5
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_ejection_count_decays_by_one_per_quiet_base_period() -> None:
    h = make()
    assert eject_duration(h, 0.0) == 30.0  # ends at 30
    assert eject_duration(h, 31.0) == 60.0  # count 2, ends at 91
    # 30 s of good behaviour takes one step off the multiplier: 2 - 1 + 1 = 2.
    assert eject_duration(h, 91.0 + 30.0) == 60.0  # ends at 181
    # 60 s quiet takes two steps off: back to the base time.
    assert eject_duration(h, 181.0 + 60.0) == 30.0


def test_ejection_count_returns_to_base_after_long_healthy_period() -> None:
    h = make()
    now = 0.0
    for _ in range(6):
        now += eject_duration(h, now) + 1.0
    assert h.ejection_count == 6
    assert eject_duration(h, now + 10_000.0) == 30.0
    assert h.ejection_count == 1


def test_ejection_failures_while_ejected_do_not_extend_it() -> None:
    h = make()
    fail(h, 0.0)
    assert fail(h, 10.0, n=10) == []
    assert h.ejected_until == 30.0
    assert h.ejection_count == 1


def test_ejection_ended_early_by_successful_attempt() -> None:
    h = make()
    fail(h, 0.0)
    t = h.record(Outcome.SUCCESS, 5.0)
    assert t is not None
    assert (t.before, t.after) == (State.EJECTED, State.HEALTHY)
    assert "while ejected" in t.reason
    assert h.routable(5.0)
    assert h.ejected_until is None


def test_passing_health_check_does_not_end_an_ejection_by_default() -> None:
    h = make()
    fail(h, 0.0)
    assert h.record_check(True, 4.0) is None
    assert h.state(4.0) is State.EJECTED
    assert h.record(Outcome.SUCCESS, 5.0) is not None  # a real success still does
    assert h.routable(5.0)


def test_ejection_ended_early_by_passing_health_check_when_enabled() -> None:
    h = UpstreamHealth(OutlierSettings(uneject_on_health_check=True), HealthSettings())
    fail(h, 0.0)
    t = h.record_check(True, 4.0)
    assert t is not None
    assert (t.before, t.after) == (State.EJECTED, State.HEALTHY)
    assert "health check passed while ejected" == t.reason
    assert h.routable(4.0)


def test_ejection_ended_early_still_grows_next_ejection() -> None:
    h = make()
    fail(h, 0.0)
    h.record(Outcome.SUCCESS, 5.0)
    # Failing again right after an early end: the multiplier has not decayed.
    assert eject_duration(h, 6.0) == 60.0


def test_ejection_ended_early_decays_from_the_early_end() -> None:
    h = make()
    fail(h, 0.0)
    h.record(Outcome.SUCCESS, 5.0)
    # 30 s after the early end (well before the scheduled end + 30 s) the count has decayed.
    assert eject_duration(h, 35.0) == 30.0


def test_ejection_failed_health_check_does_not_end_it() -> None:
    h = make()
    fail(h, 0.0)
    assert h.record_check(False, 5.0) is None
    assert h.state(5.0) is State.EJECTED


# --- rate-limit cooldown -------------------------------------------------------------------


def test_cooldown_after_429_uses_default_without_retry_after() -> None:
    h = make()
    t = h.record(Outcome.RATE_LIMITED, 10.0)
    assert t == Transition(State.HEALTHY, State.COOLING_DOWN, "rate limited (429)")
    assert h.state(14.999) is State.COOLING_DOWN
    assert h.available_at(11.0) == 15.0
    assert h.state(15.0) is State.HEALTHY


def test_cooldown_after_429_honours_retry_after() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=12.0)
    assert h.state(11.9) is State.COOLING_DOWN
    assert h.state(12.0) is State.HEALTHY


def test_cooldown_retry_after_capped_by_max_rate_limit_cooldown() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=3600.0)
    assert h.cooldown_until == 60.0
    assert h.state(59.9) is State.COOLING_DOWN
    assert h.state(60.0) is State.HEALTHY


def test_cooldown_default_and_cap_follow_settings() -> None:
    h = make(rate_limit_cooldown_s=2.0, max_rate_limit_cooldown_s=7.0)
    h.record(Outcome.RATE_LIMITED, 0.0)
    assert h.cooldown_until == 2.0
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=100.0)
    assert h.cooldown_until == 7.0


@pytest.mark.parametrize("retry_after", [0.0, -5.0])
def test_cooldown_zero_or_negative_retry_after_keeps_upstream_routable(
    retry_after: float,
) -> None:
    h = make()
    assert h.record(Outcome.RATE_LIMITED, 3.0, retry_after_s=retry_after) is None
    assert h.routable(3.0)


def test_cooldown_later_429_extends_but_never_shortens() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=20.0)
    assert h.record(Outcome.RATE_LIMITED, 1.0, retry_after_s=2.0) is None
    assert h.cooldown_until == 20.0
    h.record(Outcome.RATE_LIMITED, 10.0, retry_after_s=30.0)
    assert h.cooldown_until == 40.0


def test_cooldown_ended_early_by_success() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=30.0)
    t = h.record(Outcome.SUCCESS, 1.0)
    assert t is not None
    assert (t.before, t.after) == (State.COOLING_DOWN, State.HEALTHY)
    assert h.cooldown_until is None


def test_cooldown_not_ended_by_client_error() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=30.0)
    assert h.record(Outcome.HTTP_4XX, 1.0) is None
    assert h.state(1.0) is State.COOLING_DOWN


def test_cooldown_and_ejection_available_when_both_end() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=50.0)
    fail(h, 0.0)
    assert h.state(0.0) is State.EJECTED
    assert h.available_at(1.0) == 50.0
    assert h.state(30.0) is State.COOLING_DOWN
    assert h.available_at(30.0) == 50.0
    assert h.state(50.0) is State.HEALTHY


def test_cooldown_hidden_under_longer_ejection_is_available_at_ejection_end() -> None:
    h = make()
    fail(h, 0.0)
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=5.0)
    assert h.available_at(1.0) == 30.0


# --- active health checks ------------------------------------------------------------------


def test_active_checks_three_failures_make_unhealthy() -> None:
    h = make()
    assert h.record_check(False, 0.0) is None
    assert h.record_check(False, 10.0) is None
    t = h.record_check(False, 20.0)
    assert t is not None
    assert (t.before, t.after) == (State.HEALTHY, State.UNHEALTHY)
    assert t.reason == "3 health checks failed"
    assert not h.routable(20.0)
    assert h.available_at(20.0) == INF


def test_active_checks_two_passes_make_healthy_again() -> None:
    h = make()
    for i in range(3):
        h.record_check(False, float(i))
    assert h.record_check(True, 10.0) is None
    assert h.state(10.0) is State.UNHEALTHY
    t = h.record_check(True, 20.0)
    assert t is not None
    assert (t.before, t.after) == (State.UNHEALTHY, State.HEALTHY)
    assert t.reason == "2 health checks passed"


def test_active_checks_pass_interrupts_failure_streak() -> None:
    h = make()
    h.record_check(False, 0.0)
    h.record_check(False, 1.0)
    h.record_check(True, 2.0)
    h.record_check(False, 3.0)
    h.record_check(False, 4.0)
    assert h.state(4.0) is State.HEALTHY


def test_active_checks_failure_interrupts_recovery_streak() -> None:
    h = make()
    for i in range(3):
        h.record_check(False, float(i))
    h.record_check(True, 10.0)
    h.record_check(False, 11.0)
    h.record_check(True, 12.0)
    assert h.state(12.0) is State.UNHEALTHY
    h.record_check(True, 13.0)
    assert h.state(13.0) is State.HEALTHY


def test_active_checks_thresholds_follow_settings() -> None:
    h = UpstreamHealth(OutlierSettings(), HealthSettings(unhealthy_threshold=1, healthy_threshold=3))
    h.record_check(False, 0.0)
    assert h.state(0.0) is State.UNHEALTHY
    h.record_check(True, 1.0)
    h.record_check(True, 2.0)
    assert h.state(2.0) is State.UNHEALTHY
    h.record_check(True, 3.0)
    assert h.state(3.0) is State.HEALTHY


def test_active_checks_unhealthy_not_cured_by_successful_attempt() -> None:
    h = make()
    for i in range(3):
        h.record_check(False, float(i))
    assert h.record(Outcome.SUCCESS, 5.0) is None
    assert h.state(5.0) is State.UNHEALTHY


def test_active_checks_unhealthy_not_cured_by_time() -> None:
    h = make()
    for i in range(3):
        h.record_check(False, float(i))
    assert h.refresh(1e9) is None
    assert h.state(1e9) is State.UNHEALTHY


# --- drain / enable ------------------------------------------------------------------------


def test_drain_takes_upstream_out_until_enable() -> None:
    h = make()
    t = h.drain(0.0)
    assert t == Transition(State.HEALTHY, State.DRAINED, "drained by operator")
    assert not h.routable(1e9)
    assert h.available_at(5.0) == INF
    assert h.record(Outcome.SUCCESS, 1.0) is None
    assert h.record_check(True, 2.0) is None
    assert h.state(3.0) is State.DRAINED
    t = h.enable(4.0)
    assert t == Transition(State.DRAINED, State.HEALTHY, "enabled by operator")
    assert h.routable(4.0)


def test_drain_twice_reports_one_transition() -> None:
    h = make()
    assert h.drain(0.0) is not None
    assert h.drain(1.0) is None
    assert h.enable(2.0) is not None
    assert h.enable(3.0) is None


def test_drain_enable_returns_to_underlying_ejection() -> None:
    h = make()
    fail(h, 0.0)
    t = h.drain(1.0)
    assert t is not None and (t.before, t.after) == (State.EJECTED, State.DRAINED)
    t = h.enable(2.0)
    assert t is not None and (t.before, t.after) == (State.DRAINED, State.EJECTED)
    assert h.state(30.0) is State.HEALTHY


# --- severity and transitions --------------------------------------------------------------


def test_state_most_severe_condition_wins() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=60.0)
    assert h.state(0.0) is State.COOLING_DOWN
    fail(h, 0.0)
    assert h.state(0.0) is State.EJECTED
    for _ in range(3):
        h.record_check(False, 0.0)
    assert h.state(0.0) is State.UNHEALTHY
    h.drain(0.0)
    assert h.state(0.0) is State.DRAINED


def test_transitions_hidden_changes_report_nothing() -> None:
    h = make()
    h.drain(0.0)
    assert fail(h, 1.0) == []  # ejected underneath, still drained
    assert h.record(Outcome.RATE_LIMITED, 1.0) is None
    for i in range(3):
        assert h.record_check(False, float(i)) is None
    assert h.refresh(100.0) is None


def test_transitions_refresh_notices_ejection_expiry_once() -> None:
    h = make()
    fail(h, 0.0)
    assert h.refresh(29.0) is None
    t = h.refresh(30.0)
    assert t == Transition(State.EJECTED, State.HEALTHY, "ejection or cooldown ended")
    assert h.refresh(31.0) is None
    assert h.refresh(1000.0) is None


def test_transitions_refresh_notices_cooldown_expiry_once() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0)
    assert h.refresh(4.0) is None
    t = h.refresh(5.0)
    assert t is not None and (t.before, t.after) == (State.COOLING_DOWN, State.HEALTHY)
    assert h.refresh(6.0) is None


def test_transitions_refresh_steps_through_ejection_then_cooldown() -> None:
    h = make()
    h.record(Outcome.RATE_LIMITED, 0.0, retry_after_s=50.0)
    fail(h, 0.0)
    t = h.refresh(30.0)
    assert t is not None and (t.before, t.after) == (State.EJECTED, State.COOLING_DOWN)
    t = h.refresh(50.0)
    assert t is not None and (t.before, t.after) == (State.COOLING_DOWN, State.HEALTHY)


def test_transitions_expiry_seen_by_next_record_instead_of_refresh() -> None:
    h = make()
    fail(h, 0.0)
    t = h.record(Outcome.SUCCESS, 40.0)
    assert t is not None
    assert (t.before, t.after) == (State.EJECTED, State.HEALTHY)
    assert h.refresh(41.0) is None


def test_transitions_one_per_visible_change_over_a_scenario() -> None:
    h = make()
    changes: list[tuple[State, State]] = []

    def note(t: Transition | None) -> None:
        if t is not None:
            changes.append((t.before, t.after))

    for _ in range(5):
        note(h.record(Outcome.HTTP_5XX, 0.0))
    for now in (10.0, 20.0, 29.0, 30.0, 31.0, 40.0):
        note(h.refresh(now))
    note(h.record(Outcome.RATE_LIMITED, 50.0, 5.0))
    note(h.record(Outcome.RATE_LIMITED, 51.0, 5.0))
    for now in (52.0, 56.0, 57.0):
        note(h.refresh(now))
    for now in (60.0, 70.0, 80.0, 90.0):
        note(h.record_check(False, now))
    for now in (100.0, 110.0, 120.0):
        note(h.record_check(True, now))
    note(h.drain(130.0))
    note(h.drain(131.0))
    note(h.enable(140.0))

    assert changes == [
        (State.HEALTHY, State.EJECTED),
        (State.EJECTED, State.HEALTHY),
        (State.HEALTHY, State.COOLING_DOWN),
        (State.COOLING_DOWN, State.HEALTHY),
        (State.HEALTHY, State.UNHEALTHY),
        (State.UNHEALTHY, State.HEALTHY),
        (State.HEALTHY, State.DRAINED),
        (State.DRAINED, State.HEALTHY),
    ]
