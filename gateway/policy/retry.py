"""Whether a failed attempt is tried again, and how long to wait first.

The policy is asked only about attempts that failed before any of their response reached the
client (a transport failure before response headers or before a stream's first content event,
or a 4xx/5xx status). It retries when all hold: the outcome is retryable (a transport failure, a
status in the configured list, or a context-window error; never a content-policy rejection),
attempts remain, the request body can be replayed, and the deadline has not passed. The retry
budget is applied after this decision (`budget.py`, and `gateway.retry_gate` that waits), since
admission there may wait. Retries on another upstream go at once; a retry on the same upstream
waits a short full-jitter exponential backoff (Envoy's 25 ms base, 250 ms cap).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from gateway.policy.classify import TRANSPORT_FAILURES, Outcome
from gateway.policy.rejections import Rejection

BACKOFF_BASE_S = 0.025
BACKOFF_MAX_S = 0.25


class GiveUpReason(StrEnum):
    """Why a failed attempt is not retried; the `reason` label of gateway_retries_skipped_total."""

    NOT_RETRYABLE = "not_retryable"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    BODY_NOT_REPLAYABLE = "body_not_replayable"
    DEADLINE = "deadline"
    # Decided after the policy, when the retry is admitted (or not):
    BUDGET_EXHAUSTED = "budget_exhausted"
    NO_UPSTREAM = "no_upstream"

    @property
    def skipped(self) -> bool:
        """True when a retry was wanted but not allowed (counted as a skipped retry)."""
        return self not in (GiveUpReason.NOT_RETRYABLE, GiveUpReason.ATTEMPTS_EXHAUSTED)


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again; `reason` (the failed outcome) is the label of gateway_retries_total."""

    reason: Outcome


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop and answer with what we have."""

    reason: GiveUpReason


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The retry rules of one gateway."""

    max_attempts: int
    on_statuses: frozenset[int]

    def retryable(self, outcome: Outcome, status: int | None, rejection: Rejection | None = None) -> bool:
        """True when this outcome is worth another attempt at all.

        A content-policy rejection never is; a context-window error always is (on an upstream
        with a larger context, which the caller chooses).
        """
        if rejection is Rejection.CONTENT_POLICY:
            return False
        if rejection is Rejection.CONTEXT_LENGTH or outcome in TRANSPORT_FAILURES:
            return True
        return status is not None and status in self.on_statuses

    def decide(
        self,
        *,
        attempt: int,
        outcome: Outcome,
        status: int | None,
        body_replayable: bool,
        deadline_left_s: float | None,
        rejection: Rejection | None = None,
    ) -> Retry | GiveUp:
        """Decide after attempt number `attempt` (1-based) failed with `outcome` (and `status`,
        and for a 4xx what its body says, if read)."""
        if not self.retryable(outcome, status, rejection):
            return GiveUp(GiveUpReason.NOT_RETRYABLE)
        if attempt >= self.max_attempts:
            return GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
        if not body_replayable:
            return GiveUp(GiveUpReason.BODY_NOT_REPLAYABLE)
        if deadline_left_s is not None and deadline_left_s <= 0:
            return GiveUp(GiveUpReason.DEADLINE)
        return Retry(outcome)


def backoff_s(retry_number: int, same_upstream: bool, rng: random.Random) -> float:
    """Delay before retry number `retry_number` (1-based); none when switching upstream."""
    if not same_upstream:
        return 0.0
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** (retry_number - 1)))
    return rng.uniform(0.0, ceiling)
