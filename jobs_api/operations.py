"""Every route of the jobs API, once: aiohttp serves this table and /openapi.json documents it.

`add_routes` registers each `Operation` with the app's router and generates the app's OpenAPI
document from the same table (see `jobs_api.openapi`), with the app's job types and limits.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Final

import orjson
from aiohttp import web

from jobs_api import cache_routes, docs, routes
from jobs_api.job_types import BatchInput
from jobs_api.keys import AUTH, HANDLERS, OPENAPI, SETTINGS
from jobs_api.models import JobStatus
from jobs_api.openapi import (
    REF,
    Answer,
    Header,
    Operation,
    Param,
    SubmissionLimits,
    at_most,
    build_document,
    errors,
)
from jobs_api.routes import MAX_EVENT_ID
from jobs_api.schemas import (
    BatchItemOutcome,
    BatchView,
    CacheCleared,
    CacheStats,
    ErrorBody,
    Health,
    ItemNotReady,
    JobEventData,
    JobList,
    JobLogs,
    JobResult,
    JobView,
    NotFinished,
    OutcomeUnknownBody,
)
from jobs_api.ui import JOBS_PAGE

UUID_SCHEMA: Final = {
    "type": "string",
    "format": "uuid",
    "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
}
JOB_ID: Final = Param("job_id", "path", UUID_SCHEMA, "the job's id (a UUID)")
BATCH_ID: Final = Param("batch_id", "path", UUID_SCHEMA, "the batch's id: the id of its job")
# What the server reads as an event id: blank (from the start) or decimal digits, at most 19 of
# them, up to 2^63-1; blanks around them are ignored.
EVENT_ID_SCHEMA: Final = {"type": "string", "pattern": f"^[ \\t]*({at_most(MAX_EVENT_ID)})?[ \\t]*$"}
JSON_DATA: Final = {"type": "string", "contentMediaType": "application/json"}
# One Server-Sent Event as schemathesis (and any SSE parser) reads it: `data` holds JSON.
EVENT_SCHEMA: Final = {
    "oneOf": [
        {
            "type": "object",
            "required": ["id", "event", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"enum": ["state", "progress"]},
                "data": {**JSON_DATA, "contentSchema": {"$ref": REF.format(model=JobEventData.__name__)}},
            },
        },
        {
            "type": "object",
            "required": ["event", "data"],
            "not": {"required": ["id"]},
            "properties": {
                "event": {"const": "error"},
                "data": {**JSON_DATA, "contentSchema": {"$ref": REF.format(model=ErrorBody.__name__)}},
            },
        },
    ]
}
TIME_SCHEMA: Final = {
    "anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
}
LOCATION: Final = Header("Location", "the job: /v1/jobs/{id}")
REPLAYED: Final = Header(
    "Idempotent-Replayed", "`true` when an Idempotency-Key returned an earlier job", required=False
)
RETRY_AFTER: Final = Header("Retry-After", "seconds to wait before asking again", schema={"type": "integer"})
SUBMIT_ERRORS: Final = errors(400, 401, 408, 413, 415, 422, 503)
OUTCOME_UNKNOWN: Final = Answer(
    504,
    "the store never confirmed the write: the job `error.job_id` may exist; look it up or resubmit "
    "with the same Idempotency-Key",
    OutcomeUnknownBody,
    headers=(LOCATION,),
)
IDEMPOTENCY_KEY: Final = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]([ -~]*[!-~])?$"},
    "the same key and body return the same job; scoped per tenant (printable ASCII, 1-255 characters)",
)


def _job_ops() -> list[Operation]:
    submitted = Answer(202, "accepted: the job as stored", JobView, headers=(LOCATION, REPLAYED))
    return [
        Operation(
            "POST",
            "/v1/jobs",
            routes.create_job,
            "createJob",
            "Submit a job",
            "jobs",
            (submitted, *SUBMIT_ERRORS, OUTCOME_UNKNOWN),
            params=(IDEMPOTENCY_KEY,),
            body="JobSubmit",
        ),
        Operation(
            "GET",
            "/v1/jobs",
            routes.list_jobs,
            "listJobs",
            "List jobs, newest first",
            "jobs",
            (Answer(200, "one page of jobs (without their input)", JobList), *errors(400, 401, 503)),
            params=(
                Param(
                    "status",
                    "query",
                    {"type": "string", "enum": [s.value for s in JobStatus]},
                    "only jobs in this status",
                ),
                Param(
                    "type",
                    "query",
                    {"type": "string", "minLength": 1, "maxLength": 64},
                    "only jobs of this type",
                ),
                Param("created_after", "query", TIME_SCHEMA, "RFC 3339 or epoch seconds, exclusive"),
                Param("created_before", "query", TIME_SCHEMA, "RFC 3339 or epoch seconds, exclusive"),
                Param(
                    "limit",
                    "query",
                    {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    "page size",
                ),
                Param("cursor", "query", {"type": "string"}, "`next_cursor` of the previous page"),
            ),
            description="A page also ends early rather than pass JOBS_MAX_LIST_BYTES of JSON.",
        ),
        Operation(
            "GET",
            "/v1/jobs/{job_id}",
            routes.get_job,
            "getJob",
            "Get a job",
            "jobs",
            (Answer(200, "the job", JobView), *errors(400, 401, 404, 503)),
            params=(JOB_ID,),
        ),
        Operation(
            "DELETE",
            "/v1/jobs/{job_id}",
            routes.cancel_job,
            "deleteJob",
            "Cancel a job (same as POST .../cancel)",
            "jobs",
            (Answer(202, "cancel requested: the job now", JobView), *errors(400, 401, 404, 409, 415, 503)),
            params=(JOB_ID,),
        ),
        Operation(
            "POST",
            "/v1/jobs/{job_id}/cancel",
            routes.cancel_job,
            "cancelJob",
            "Cancel a job",
            "jobs",
            (Answer(202, "cancel requested: the job now", JobView), *errors(400, 401, 404, 409, 415, 503)),
            params=(JOB_ID,),
            description="A queued job ends at once; a running one stops within moments.",
        ),
        Operation(
            "GET",
            "/v1/jobs/{job_id}/result",
            routes.get_result,
            "getJobResult",
            "Get a job's outcome",
            "jobs",
            (
                Answer(200, "the job has ended: its result, or its error", JobResult),
                Answer(409, "the job has not ended yet", NotFinished, headers=(RETRY_AFTER,)),
                *errors(400, 401, 404, 503),
            ),
            params=(JOB_ID,),
        ),
        Operation(
            "GET",
            "/v1/jobs/{job_id}/events",
            routes.job_events,
            "getJobEvents",
            "Follow a job's changes (Server-Sent Events)",
            "jobs",
            (
                Answer(
                    200,
                    "`state` and `progress` events until the terminal state; an `error` event (no id) "
                    "if the stream ends early; a keepalive comment every 15 s",
                    None,
                    media_type="text/event-stream",
                    schema=EVENT_SCHEMA,
                    uses=(JobEventData, ErrorBody),
                ),
                *errors(400, 401, 404, 503),
            ),
            params=(
                JOB_ID,
                Param("Last-Event-ID", "header", EVENT_ID_SCHEMA, "resume after this event id"),
                Param(
                    "last_event_id", "query", EVENT_ID_SCHEMA, "the same, for clients that cannot set headers"
                ),
            ),
        ),
        Operation(
            "GET",
            "/v1/jobs/{job_id}/logs",
            routes.job_logs,
            "getJobLogs",
            "Get a job's log lines",
            "jobs",
            (
                Answer(200, "the newest 1,000 lines at `level` or above, oldest first", JobLogs),
                *errors(400, 401, 404, 503),
            ),
            params=(
                JOB_ID,
                Param(
                    "level",
                    "query",
                    {"type": "string", "enum": ["debug", "info", "warning", "error"], "default": "debug"},
                    "lowest level shown",
                ),
            ),
        ),
    ]


def _batch_ops() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/batches",
            routes.create_batch,
            "createBatch",
            "Submit a batch of inference requests",
            "batches",
            (
                Answer(202, "accepted: the batch's job as stored", JobView, headers=(LOCATION, REPLAYED)),
                *SUBMIT_ERRORS,
                OUTCOME_UNKNOWN,
            ),
            params=(IDEMPOTENCY_KEY,),
            body="BatchSubmit",
            description="Shorthand for a `batch` job; its id is the batch id.",
        ),
        Operation(
            "GET",
            "/v1/batches/{batch_id}",
            routes.get_batch,
            "getBatch",
            "Get a batch: counts by status and every item",
            "batches",
            (Answer(200, "the batch", BatchView), *errors(400, 401, 404, 503)),
            params=(BATCH_ID,),
        ),
        Operation(
            "GET",
            "/v1/batches/{batch_id}/items/{index}",
            routes.get_batch_item,
            "getBatchItem",
            "Get one item's outcome",
            "batches",
            (
                Answer(200, "the item's stored outcome", BatchItemOutcome),
                Answer(
                    409,
                    "no stored outcome: `not_finished` while the batch runs, `no_result` once it ended "
                    "without one",
                    ItemNotReady,
                ),
                *errors(400, 401, 404, 503),
            ),
            params=(
                BATCH_ID,
                Param("index", "path", {"type": "integer", "minimum": 0, "maximum": 999}, "item number"),
            ),
        ),
    ]


def _service_ops() -> list[Operation]:
    health = Answer(200, "alive", Health)
    return [
        Operation(
            "GET",
            "/healthz",
            routes.healthz,
            "healthz",
            "Liveness",
            "service",
            (health,),
            authenticated=False,
        ),
        Operation(
            "GET",
            "/readyz",
            routes.readyz,
            "readyz",
            "Readiness: the store answers",
            "service",
            (
                Answer(200, "ready", Health),
                Answer(503, "not ready: store unavailable or shutting down", Health),
            ),
            authenticated=False,
        ),
        Operation(
            "GET",
            "/metrics",
            routes.metrics,
            "metrics",
            "Prometheus metrics",
            "service",
            (
                Answer(
                    200,
                    "Prometheus text exposition",
                    None,
                    media_type="text/plain",
                    schema={"type": "string"},
                ),
            ),
            authenticated=False,
        ),
        Operation(
            "GET",
            "/openapi.json",
            docs.openapi_json,
            "openapi",
            "This document",
            "service",
            (Answer(200, "the OpenAPI 3.1 document", None, schema={"type": "object"}),),
            authenticated=False,
        ),
        Operation(
            "GET",
            "/docs",
            docs.docs_page,
            "docs",
            "The API reference, rendered from /openapi.json",
            "service",
            (Answer(200, "an HTML page", None, media_type="text/html", schema={"type": "string"}),),
            authenticated=False,
        ),
    ]


def _cache_ops() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/cache/stats",
            cache_routes.cache_stats,
            "getCacheStats",
            "Result cache numbers: the caller's tenant's, or every tenant's for an admin",
            "cache",
            (Answer(200, "hits, misses, entries and bytes", CacheStats), *errors(400, 401, 503)),
        ),
        Operation(
            "DELETE",
            "/v1/cache",
            cache_routes.clear_cache,
            "clearCache",
            "Delete every cached result (admin role; needs confirm=true)",
            "cache",
            (Answer(200, "how many entries were deleted", CacheCleared), *errors(400, 401, 403, 503)),
            params=(Param("confirm", "query", {"type": "string"}, "must be `true`"),),
        ),
    ]


def _ui_ops() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/ui",
            JOBS_PAGE.handle,
            "jobsPage",
            "The jobs page: a browser UI of the caller's jobs (it asks for the credential)",
            "service",
            (Answer(200, "an HTML page", None, media_type="text/html", schema={"type": "string"}),),
            authenticated=False,
        ),
    ]


OPERATIONS: Final = (*_job_ops(), *_batch_ops(), *_cache_ops(), *_service_ops(), *_ui_ops())


def _links() -> dict[tuple[str, str, int], dict[str, Any]]:
    """OpenAPI links: what a client (and schemathesis' stateful phase) does with a new job."""
    job = {"job_id": "$response.body#/id"}
    batch = {"batch_id": "$response.body#/id"}
    job_links = {
        op: {"operationId": op, "parameters": job}
        for op in ("getJob", "getJobResult", "getJobEvents", "getJobLogs", "cancelJob", "deleteJob")
    }
    batch_links = {
        **job_links,
        "getBatch": {"operationId": "getBatch", "parameters": batch},
        "getBatchItem": {"operationId": "getBatchItem", "parameters": {**batch, "index": 0}},
    }
    return {("POST", "/v1/jobs", 202): job_links, ("POST", "/v1/batches", 202): batch_links}


def _version() -> str:
    try:
        return metadata.version("failover-gateway")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def openapi_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of `app`: its job types, its limits, and bearer auth when configured."""
    settings = app[SETTINGS]
    registry = app[HANDLERS]
    limits = SubmissionLimits(
        job_types={name: registry.input_model(name) for name in registry.types()},
        max_priority=settings.max_priority,
        max_timeout_s=settings.max_timeout_s,
        max_input_depth=settings.max_input_depth,
        batch_input=BatchInput,
    )
    secured = app[AUTH].enabled
    access = (
        "Every /v1/ route needs `Authorization: Bearer <API key or JWT>`; a caller sees only its "
        "tenant's jobs."
        if secured
        else "No credentials are configured: the API is open to anyone who can reach it."
    )
    return build_document(
        OPERATIONS,
        limits,
        title="jobs-api",
        version=_version(),
        description=(
            "Durable asynchronous jobs sent through the failover gateway. Errors are always "
            f'`{{"error": {{"type", "message"}}}}`. {access} /openapi.json and /docs are public.'
        ),
        secured=secured,
        links=_links(),
    )


def add_routes(app: web.Application) -> None:
    """Register every route of the jobs API on `app`, and its OpenAPI document."""
    app.on_response_prepare.append(routes.mark_response_started)
    for op in OPERATIONS:
        if op.method == "GET":
            app.router.add_get(op.path, op.handler)  # and HEAD, as aiohttp does by default
        else:
            app.router.add_route(op.method, op.path, op.handler)
    app[OPENAPI] = orjson.dumps(openapi_document(app))
