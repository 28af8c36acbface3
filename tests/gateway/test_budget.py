"""The retry budget's accounting: retries in flight within a share of requests in flight."""

from __future__ import annotations

from gateway.policy.budget import RetryBudget


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
