"""Errors the gateway answers itself, each with its HTTP status and JSON `type`."""

from __future__ import annotations

import asyncio


class GatewayError(Exception):
    """Root of the gateway's own errors; `status` and `error_type` shape the JSON response."""

    status = 502
    error_type = "gateway_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class NoUpstreamAvailable(GatewayError):
    """No upstream could take the request (all drained, failing, or at max_inflight)."""

    status = 503
    error_type = "no_upstream_available"


class UpstreamUnavailable(GatewayError):
    """Every attempt failed to connect or was reset before response headers."""

    status = 502
    error_type = "upstream_unavailable"


class UpstreamTimeout(GatewayError, asyncio.TimeoutError):
    """The last attempt got no response headers within its timeout."""

    status = 504
    error_type = "upstream_timeout"


class DeadlineExceeded(GatewayError, asyncio.TimeoutError):
    """The request's overall deadline passed before any response started."""

    status = 504
    error_type = "deadline_exceeded"


class BadRequest(GatewayError):
    """The client's request cannot be forwarded as sent."""

    status = 400
    error_type = "invalid_request"


class ClientTimeout(GatewayError):
    """The client did not send its request (headers or body) in time."""

    status = 408
    error_type = "request_timeout"


class ModelNotFound(GatewayError):
    """No upstream serves the model the request asks for."""

    status = 404
    error_type = "model_not_found"


class Unauthorized(GatewayError):
    """Callers are configured and the request carries no known caller key."""

    status = 401
    error_type = "unauthorized"


class ModelNotAllowed(GatewayError):
    """The caller may not use the model it asked for."""

    status = 403
    error_type = "model_not_allowed"


class CallerLimited(GatewayError):
    """The caller is over its requests_per_minute or max_inflight."""

    status = 429
    error_type = "caller_rate_limited"


class EnginesSaturated(GatewayError):
    """Every engine stayed saturated for the whole admission wait."""

    status = 429
    error_type = "engines_saturated"
