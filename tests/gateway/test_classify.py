"""Outcome classification: which statuses and errors count against an upstream."""

from __future__ import annotations

import pytest

from gateway.policy.classify import (
    FAILURES,
    TRANSPORT_FAILURES,
    Outcome,
    classify_status,
    is_failure,
)


@pytest.mark.parametrize("status", [100, 101, 200, 201, 204, 206, 301, 302, 304, 307, 399])
def test_classify_status_below_400_is_success(status: int) -> None:
    assert classify_status(status) is Outcome.SUCCESS


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 413, 422, 428, 430, 499])
def test_classify_status_client_errors_are_http_4xx(status: int) -> None:
    assert classify_status(status) is Outcome.HTTP_4XX


def test_classify_status_429_is_rate_limited() -> None:
    assert classify_status(429) is Outcome.RATE_LIMITED


@pytest.mark.parametrize("status", [500, 501, 502, 503, 504, 529, 599])
def test_classify_status_server_errors_are_http_5xx(status: int) -> None:
    assert classify_status(status) is Outcome.HTTP_5XX


@pytest.mark.parametrize("outcome", [Outcome.HTTP_5XX, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET])
def test_is_failure_true_for_server_and_transport_errors(outcome: Outcome) -> None:
    assert is_failure(outcome)


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.HTTP_4XX, Outcome.RATE_LIMITED])
def test_is_failure_false_for_success_client_error_and_rate_limit(outcome: Outcome) -> None:
    assert not is_failure(outcome)


def test_is_failure_agrees_with_classify_status_across_all_statuses() -> None:
    for status in range(100, 600):
        failed = is_failure(classify_status(status))
        assert failed == (status >= 500), status


def test_transport_failures_are_failures_but_not_http_5xx() -> None:
    assert TRANSPORT_FAILURES < FAILURES
    assert Outcome.HTTP_5XX not in TRANSPORT_FAILURES
    assert {Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET, Outcome.STREAM_ERROR} == TRANSPORT_FAILURES


def test_outcome_values_are_stable_metric_labels() -> None:
    assert {o.value for o in Outcome} == {
        "success",
        "http_4xx",
        "http_5xx",
        "rate_limited",
        "connect_error",
        "timeout",
        "reset",
        "stream_error",
        "abandoned",
    }
    assert str(Outcome.RATE_LIMITED) == "rate_limited"
