"""Errors of the jobs API; each maps to one HTTP status and JSON `type` in one middleware."""

from __future__ import annotations


class JobsError(Exception):
    """Root of the jobs API's errors."""

    status = 500
    error_type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(JobsError):
    """The request is malformed (bad JSON, bad id, bad query parameter)."""

    status = 400
    error_type = "invalid_request"


class Unauthorized(JobsError):
    """Missing or bad credentials."""

    status = 401
    error_type = "unauthorized"


class Forbidden(JobsError):
    """The caller is authenticated but its roles do not allow this (an admin-only endpoint)."""

    status = 403
    error_type = "forbidden"


class RequestTimeout(JobsError):
    """The client went silent while its request body was being read; the connection is closed."""

    status = 408
    error_type = "request_timeout"


class JobNotFound(JobsError):
    """No such job, or one the caller may not see."""

    status = 404
    error_type = "not_found"


class InvalidTransition(JobsError):
    """A state change the job's life cycle does not allow."""

    status = 409
    error_type = "conflict"


class PayloadTooLarge(JobsError):
    """The submitted job is larger than the configured limit."""

    status = 413
    error_type = "payload_too_large"


class UnsupportedMediaType(JobsError):
    """A write whose body is not declared as application/json."""

    status = 415
    error_type = "unsupported_media_type"


class ValidationFailed(JobsError):
    """The body is JSON but not a valid job (wrong types, unknown job type)."""

    status = 422
    error_type = "validation_error"


class IdempotencyConflict(JobsError):
    """The Idempotency-Key was used before with a different request body."""

    status = 422
    error_type = "idempotency_key_reused"


class StoreUnavailable(JobsError):
    """The job store cannot be reached (for a submission: and nothing was stored)."""

    status = 503
    error_type = "store_unavailable"


class JwksUnavailable(JobsError):
    """The JWKS endpoint that holds the token signing keys cannot be reached or read."""

    status = 503
    error_type = "jwks_unavailable"


class OutcomeUnknown(JobsError):
    """A submission's write was sent, but the store never said whether it was applied.

    Not a 503, which promises nothing was stored: the job `job_id` may exist (now or shortly).
    """

    status = 504
    error_type = "outcome_unknown"

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id
