"""The retry budget: retries in flight may be at most a share of requests in flight.

Envoy's retry budget: with `ratio` 0.2, at most one in five requests in flight may be a retry,
but `min_concurrency` concurrent retries are always allowed so a quiet gateway can still retry.
This is the accounting only; `gateway.retry_gate` admits retries against it and queues the
burst above it for a short while.
"""

from __future__ import annotations


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
