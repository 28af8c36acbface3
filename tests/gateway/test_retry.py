"""Retry decisions, backoff, and the retry budget."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.classify import Outcome
from gateway.retry import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    GiveUp,
    Retry,
    RetryBudget,
    RetryPolicy,
    backoff_s,
)

POLICY = RetryPolicy(max_attempts=3, on_statuses=frozenset({429, 500, 502, 503, 504}))


def decide(policy: RetryPolicy = POLICY, **overrides: Any) -> Retry | GiveUp:
    args: dict[str, Any] = {
        "attempt": 1,
        "outcome": Outcome.HTTP_5XX,
        "status": 503,
        "response_started": False,
        "body_replayable": True,
        "deadline_left_s": None,
    }
    args.update(overrides)
    return policy.decide(**args)


# --- RetryPolicy.decide --------------------------------------------------------------------


def test_decide_retries_listed_status() -> None:
    assert decide() == Retry("http_5xx")


@pytest.mark.parametrize("outcome", [Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET])
def test_decide_retries_transport_failures_without_status(outcome: Outcome) -> None:
    assert decide(outcome=outcome, status=None) == Retry(str(outcome))


def test_decide_transport_failure_retried_even_with_empty_status_list() -> None:
    policy = RetryPolicy(max_attempts=3, on_statuses=frozenset())
    assert decide(policy, outcome=Outcome.CONNECT_ERROR, status=None) == Retry("connect_error")
    assert decide(policy, outcome=Outcome.HTTP_5XX, status=503) == GiveUp("not_retryable")


def test_decide_retries_429_when_listed() -> None:
    assert decide(outcome=Outcome.RATE_LIMITED, status=429) == Retry("rate_limited")


@pytest.mark.parametrize(
    ("outcome", "status"),
    [(Outcome.HTTP_5XX, 501), (Outcome.HTTP_4XX, 404), (Outcome.HTTP_4XX, 400)],
)
def test_decide_gives_up_on_unlisted_status(outcome: Outcome, status: int) -> None:
    assert decide(outcome=outcome, status=status) == GiveUp("not_retryable")


def test_decide_custom_status_list_is_honoured() -> None:
    policy = RetryPolicy(max_attempts=3, on_statuses=frozenset({409}))
    assert decide(policy, outcome=Outcome.HTTP_4XX, status=409) == Retry("http_4xx")
    assert decide(policy, outcome=Outcome.HTTP_5XX, status=503) == GiveUp("not_retryable")


def test_decide_never_retries_success() -> None:
    policy = RetryPolicy(max_attempts=3, on_statuses=frozenset({200}))
    assert decide(policy, outcome=Outcome.SUCCESS, status=200) == GiveUp("success")


def test_decide_gives_up_once_response_started() -> None:
    assert decide(response_started=True) == GiveUp("response_started")
    assert decide(outcome=Outcome.RESET, status=None, response_started=True) == GiveUp("response_started")


def test_decide_gives_up_when_attempts_exhausted() -> None:
    assert decide(attempt=2) == Retry("http_5xx")
    assert decide(attempt=3) == GiveUp("attempts_exhausted")
    assert decide(attempt=4) == GiveUp("attempts_exhausted")


def test_decide_single_attempt_policy_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1, on_statuses=frozenset({503}))
    assert decide(policy, attempt=1) == GiveUp("attempts_exhausted")


def test_decide_gives_up_when_body_not_replayable() -> None:
    assert decide(body_replayable=False) == GiveUp("body_not_replayable")


@pytest.mark.parametrize("left", [0.0, -0.5])
def test_decide_gives_up_when_deadline_passed(left: float) -> None:
    assert decide(deadline_left_s=left) == GiveUp("deadline")


def test_decide_retries_while_deadline_remains() -> None:
    assert decide(deadline_left_s=0.001) == Retry("http_5xx")


def test_decide_no_longer_takes_budget_argument() -> None:
    # The retry budget is applied after the decision, by budget.RetryGate.
    with pytest.raises(TypeError):
        decide(budget_allows=False)


def test_decide_reasons_checked_in_documented_order() -> None:
    everything_wrong: dict[str, Any] = {
        "attempt": 3,
        "response_started": True,
        "body_replayable": False,
        "deadline_left_s": 0.0,
    }
    assert decide(**everything_wrong) == GiveUp("response_started")
    everything_wrong["response_started"] = False
    assert decide(**everything_wrong, status=501) == GiveUp("not_retryable")
    assert decide(**everything_wrong) == GiveUp("attempts_exhausted")
    everything_wrong["attempt"] = 1
    assert decide(**everything_wrong) == GiveUp("body_not_replayable")
    everything_wrong["body_replayable"] = True
    assert decide(**everything_wrong) == GiveUp("deadline")
    everything_wrong["deadline_left_s"] = 1.0
    assert decide(**everything_wrong) == Retry("http_5xx")


def test_retryable_requires_status_in_list_for_http_outcomes() -> None:
    assert POLICY.retryable(Outcome.HTTP_5XX, 502)
    assert not POLICY.retryable(Outcome.HTTP_5XX, None)
    assert POLICY.retryable(Outcome.TIMEOUT, None)


# --- backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_number", [1, 2, 5])
def test_backoff_zero_when_switching_upstream(retry_number: int) -> None:
    rng = random.Random(0)
    state = rng.getstate()
    assert backoff_s(retry_number, same_upstream=False, rng=rng) == 0.0
    assert rng.getstate() == state


@pytest.mark.parametrize(
    ("retry_number", "ceiling"),
    [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (9, 0.25)],
)
def test_backoff_full_jitter_within_exponential_ceiling(retry_number: int, ceiling: float) -> None:
    rng = random.Random(0)
    samples = [backoff_s(retry_number, same_upstream=True, rng=rng) for _ in range(2000)]
    assert all(0.0 <= s <= ceiling for s in samples)
    # full jitter: spread over the whole range, not clustered at the top
    assert min(samples) < ceiling * 0.05
    assert max(samples) > ceiling * 0.95
    assert sum(samples) / len(samples) == pytest.approx(ceiling / 2, rel=0.1)


def test_backoff_constants_match_envoy_defaults() -> None:
    assert BACKOFF_BASE_S == 0.025
    assert BACKOFF_MAX_S == 0.25


# --- RetryBudget ---------------------------------------------------------------------------


def test_budget_min_concurrency_allowed_with_no_requests() -> None:
    b = RetryBudget(ratio=0.2, min_concurrency=3)
    for _ in range(3):
        assert b.allows()
        b.retry_started()
    assert not b.allows()


def test_budget_zero_min_concurrency_and_no_traffic_allows_nothing() -> None:
    b = RetryBudget(ratio=0.2, min_concurrency=0)
    assert not b.allows()


def test_budget_scales_with_active_requests() -> None:
    b = RetryBudget(ratio=0.2, min_concurrency=3)
    for _ in range(50):
        b.request_started()
    # limit = max(3, int(50 * 0.2)) = 10
    for _ in range(10):
        assert b.allows()
        b.retry_started()
    assert not b.allows()


def test_budget_ratio_below_min_concurrency_uses_minimum() -> None:
    b = RetryBudget(ratio=0.2, min_concurrency=3)
    for _ in range(10):  # 10 * 0.2 = 2 < 3
        b.request_started()
    for _ in range(3):
        b.retry_started()
    assert not b.allows()
    b.retry_finished()
    assert b.allows()


def test_budget_truncates_fractional_limit() -> None:
    b = RetryBudget(ratio=0.5, min_concurrency=0)
    for _ in range(5):  # 2.5 -> 2
        b.request_started()
    b.retry_started()
    assert b.allows()
    b.retry_started()
    assert not b.allows()


def test_budget_shrinks_as_requests_finish() -> None:
    b = RetryBudget(ratio=0.5, min_concurrency=1)
    for _ in range(10):
        b.request_started()
    for _ in range(4):
        b.retry_started()
    assert b.allows()  # 4 < 5
    for _ in range(4):
        b.request_finished()
    assert not b.allows()  # 4 >= max(1, 3)
    assert (b.active_requests, b.active_retries) == (6, 4)


def test_budget_counters_balance() -> None:
    b = RetryBudget(ratio=0.2, min_concurrency=3)
    b.request_started()
    b.retry_started()
    b.retry_finished()
    b.request_finished()
    assert (b.active_requests, b.active_retries) == (0, 0)
