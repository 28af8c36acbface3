"""Whether a failed attempt is tried again, and the budget that keeps retries from snowballing.

An attempt is retried only if all hold: its outcome is retryable (a transport failure before
response headers, or a status in the configured list); nothing of the response has reached the
client; the request body can be replayed; attempts remain; and the deadline has not passed. The
retry budget is applied after this decision (budget.py), since admission there may wait.
Retries on another upstream go at once; a retry on the same upstream waits a short full-jitter
exponential backoff (Envoy's 25 ms base, 250 ms cap).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gateway.classify import TRANSPORT_FAILURES, Outcome

BACKOFF_BASE_S = 0.025
BACKOFF_MAX_S = 0.25


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again; `reason` is the label of gateway_retries_total."""

    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop and answer with what we have; `reason` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The retry rules of one gateway."""

    max_attempts: int
    on_statuses: frozenset[int]

    def retryable(self, outcome: Outcome, status: int | None) -> bool:
        """True when this outcome is worth another attempt at all."""
        if outcome in TRANSPORT_FAILURES:
            return True
        return status is not None and status in self.on_statuses

    def decide(
        self,
        *,
        attempt: int,
        outcome: Outcome,
        status: int | None,
        response_started: bool,
        body_replayable: bool,
        deadline_left_s: float | None,
    ) -> Retry | GiveUp:
        """Decide after attempt number `attempt` (1-based) ended with `outcome`."""
        if outcome is Outcome.SUCCESS:
            return GiveUp("success")
        if response_started:
            return GiveUp("response_started")
        if not self.retryable(outcome, status):
            return GiveUp("not_retryable")
        if attempt >= self.max_attempts:
            return GiveUp("attempts_exhausted")
        if not body_replayable:
            return GiveUp("body_not_replayable")
        if deadline_left_s is not None and deadline_left_s <= 0:
            return GiveUp("deadline")
        return Retry(str(outcome))


def backoff_s(retry_number: int, same_upstream: bool, rng: random.Random) -> float:
    """Delay before retry number `retry_number` (1-based); none when switching upstream."""
    if not same_upstream:
        return 0.0
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** (retry_number - 1)))
    return rng.uniform(0.0, ceiling)


class RetryBudget:
    """Retries in flight may be at most `ratio` of requests in flight, or `min_concurrency`."""

    __slots__ = ("active_requests", "active_retries", "min_concurrency", "ratio")

    def __init__(self, ratio: float, min_concurrency: int) -> None:
        self.ratio = ratio
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0

    def allows(self) -> bool:
        """True if one more retry may start now."""
        limit = max(self.min_concurrency, int(self.active_requests * self.ratio))
        return self.active_retries < limit

    def request_started(self) -> None:
        """A request entered the gateway."""
        self.active_requests += 1

    def request_finished(self) -> None:
        """A request left the gateway."""
        self.active_requests -= 1

    def retry_started(self) -> None:
        """A retry attempt began."""
        self.active_retries += 1

    def retry_finished(self) -> None:
        """A retry attempt ended (whatever its outcome)."""
        self.active_retries -= 1
