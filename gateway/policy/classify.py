"""Outcome of one upstream attempt, from its status or the transport error that ended it.

Rules: 2xx/3xx succeed; 429 is a rate limit (the upstream is alive, only busy); other 4xx are the
caller's fault and say nothing bad about the upstream; 5xx, connect errors, timeouts and resets
are failures that count toward ejection, as is a stream that reports an error, breaks its format
or ends without output. An attempt the client ended (it left, or its own
deadline passed) is abandoned: it says nothing about the upstream either.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How one attempt ended; also the `outcome` label of gateway_upstream_requests_total."""

    SUCCESS = "success"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    RATE_LIMITED = "rate_limited"
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    RESET = "reset"
    STREAM_ERROR = "stream_error"  # HTTP 200, but the stream reported an error or broke its format
    ABANDONED = "abandoned"  # the client left or its own deadline passed first


# Failures count toward passive ejection; a 429 or a client error does not.
FAILURES = frozenset(
    {Outcome.HTTP_5XX, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET, Outcome.STREAM_ERROR}
)
# Failures before anything reached the client that are always worth another upstream: transport
# failures, and a stream that failed before its first content event.
TRANSPORT_FAILURES = frozenset({Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET, Outcome.STREAM_ERROR})


def classify_status(status: int) -> Outcome:
    """Classify an upstream response by its status code."""
    if status < 400:
        return Outcome.SUCCESS
    if status == 429:
        return Outcome.RATE_LIMITED
    if status < 500:
        return Outcome.HTTP_4XX
    return Outcome.HTTP_5XX


def is_failure(outcome: Outcome) -> bool:
    """True when the outcome should count toward ejecting the upstream."""
    return outcome in FAILURES
