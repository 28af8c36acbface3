"""Retry decisions and backoff."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.policy.classify import Outcome
from gateway.policy.retry import (
    GiveUp,
    GiveUpReason,
    Retry,
    RetryPolicy,
    backoff_s,
)

POLICY = RetryPolicy(max_attempts=3, on_statuses=frozenset({429, 500, 502, 503, 504}))


def decide(policy: RetryPolicy = POLICY, **overrides: Any) -> Retry | GiveUp:
    args: dict[str, Any] = {
        "attempt": 1,
        "outcome": Outcome.HTTP_5XX,
        "status": 503,
        "body_replayable": True,
        "deadline_left_s": None,
    }
    args.update(overrides)
    return policy.decide(**args)


# --- RetryPolicy.decide --------------------------------------------------------------------


def test_decide_retries_listed_status() -> None:
    assert decide() == Retry(Outcome.HTTP_5XX)


@pytest.mark.parametrize("outcome", [Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET])
def test_decide_retries_transport_failures_without_status(outcome: Outcome) -> None:
    assert decide(outcome=outcome, status=None) == Retry(outcome)


def test_decide_transport_failure_retried_even_with_empty_status_list() -> None:
    policy = RetryPolicy(max_attempts=3, on_statuses=frozenset())
    assert decide(policy, outcome=Outcome.CONNECT_ERROR, status=None) == Retry(Outcome.CONNECT_ERROR)
    assert decide(policy, outcome=Outcome.HTTP_5XX, status=503) == GiveUp(GiveUpReason.NOT_RETRYABLE)


def test_decide_retries_429_when_listed() -> None:
    assert decide(outcome=Outcome.RATE_LIMITED, status=429) == Retry(Outcome.RATE_LIMITED)


@pytest.mark.parametrize(
    ("outcome", "status"),
    [(Outcome.HTTP_5XX, 501), (Outcome.HTTP_4XX, 404), (Outcome.HTTP_4XX, 400)],
)
def test_decide_gives_up_on_unlisted_status(outcome: Outcome, status: int) -> None:
    assert decide(outcome=outcome, status=status) == GiveUp(GiveUpReason.NOT_RETRYABLE)


def test_decide_custom_status_list_is_honoured() -> None:
    policy = RetryPolicy(max_attempts=3, on_statuses=frozenset({409}))
    assert decide(policy, outcome=Outcome.HTTP_4XX, status=409) == Retry(Outcome.HTTP_4XX)
    assert decide(policy, outcome=Outcome.HTTP_5XX, status=503) == GiveUp(GiveUpReason.NOT_RETRYABLE)


def test_decide_gives_up_when_attempts_exhausted() -> None:
    assert decide(attempt=2) == Retry(Outcome.HTTP_5XX)
    assert decide(attempt=3) == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
    assert decide(attempt=4) == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)


def test_decide_single_attempt_policy_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1, on_statuses=frozenset({503}))
    assert decide(policy, attempt=1) == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)


def test_decide_gives_up_when_body_not_replayable() -> None:
    assert decide(body_replayable=False) == GiveUp(GiveUpReason.BODY_NOT_REPLAYABLE)


@pytest.mark.parametrize("left", [0.0, -0.5])
def test_decide_gives_up_when_deadline_passed(left: float) -> None:
    assert decide(deadline_left_s=left) == GiveUp(GiveUpReason.DEADLINE)


def test_decide_retries_while_deadline_remains() -> None:
    assert decide(deadline_left_s=0.001) == Retry(Outcome.HTTP_5XX)


def test_decide_reasons_checked_in_documented_order() -> None:
    everything_wrong: dict[str, Any] = {
        "attempt": 3,
        "body_replayable": False,
        "deadline_left_s": 0.0,
    }
    assert decide(**everything_wrong, status=501) == GiveUp(GiveUpReason.NOT_RETRYABLE)
    assert decide(**everything_wrong) == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
    everything_wrong["attempt"] = 1
    assert decide(**everything_wrong) == GiveUp(GiveUpReason.BODY_NOT_REPLAYABLE)
    everything_wrong["body_replayable"] = True
    assert decide(**everything_wrong) == GiveUp(GiveUpReason.DEADLINE)
    everything_wrong["deadline_left_s"] = 1.0
    assert decide(**everything_wrong) == Retry(Outcome.HTTP_5XX)


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
