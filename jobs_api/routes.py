"""HTTP routes of the jobs API: submit, inspect, list, stream, cancel; one error middleware.

Every error leaves through `error_middleware` as `{"error": {"type", "message"}}` with the status
of its `JobsError` class; nothing else turns exceptions into responses. A caller only ever sees
jobs of its own tenant (admins see all); another tenant's job answers 404 like a missing one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from jobs_api.auth import Principal
from jobs_api.batches import BATCH_TYPE, ItemStatus, batch_items, item_count, item_outcome
from jobs_api.batches import counts as item_counts
from jobs_api.errors import (
    BadRequest,
    JobNotFound,
    JobsError,
    OutcomeUnknown,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)
from jobs_api.keys import AUTH, CLOCK, HANDLERS, METRICS, PROMETHEUS, RUNNER, SETTINGS, STOPPING, STORE
from jobs_api.models import Job, JobStatus, is_job_id, nested_deeper_than, new_job_id, request_cancel
from jobs_api.schemas import JOB_FIELDS, JobSubmit
from jobs_api.store import JobEvent, JobQuery, LogLevel
from jobs_api.submission_options import from_cache, with_webhook

log = logging.getLogger(__name__)

PRINCIPAL: Final = web.RequestKey("principal", Principal)
# The response of the request once it has been prepared (its status line is on its way).
STARTED_RESPONSE: Final = web.RequestKey("started_response", web.StreamResponse)

DEFAULT_LIST_LIMIT: Final = 20
MAX_LIST_LIMIT: Final = 100
MAX_IDEMPOTENCY_KEY: Final = 255
# A listing's JSON around its jobs: `{"jobs":[`, `],"next_cursor":"<about 80 characters>"}`.
LIST_ENVELOPE_BYTES: Final = 128
READ_CHUNK: Final = 64 * 1024
WRITE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Event ids are SQLite rowids and Redis stream ids: signed 64-bit integers.
MAX_EVENT_ID: Final = 2**63 - 1
HTTP_ERROR_TYPES: Final = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- representation -----------------------------------------------------------------------------


def rfc3339(t: float | None) -> str | None:
    """Wall-clock seconds as an RFC 3339 UTC timestamp with microseconds (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def job_links(job: Job) -> dict[str, str]:
    """Where to follow a job: itself, its events, logs, cancel, (once completed) its result and
    (for a batch) its items."""
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "events": f"{base}/events", "logs": f"{base}/logs", "cancel": f"{base}/cancel"}
    if job.status is JobStatus.COMPLETED:
        links["result"] = f"{base}/result"
    if job.type == BATCH_TYPE:
        links["batch"] = f"/v1/batches/{job.id}"
    return links


def batch_view(job: Job) -> dict[str, Any]:
    """A batch as `GET /v1/batches/{id}` shows it: its job's state, item counts and every item."""
    items = batch_items(job)
    view: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "tenant": job.tenant,
        "progress": job.progress.model_dump(),
        "attempts": job.attempts,
        "total": len(items),
        "counts": item_counts([ItemStatus(item["status"]) for item in items]),
        "items": items,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "updated_at": rfc3339(job.updated_at),
    }
    error = _error_view(job)
    if error is not None:
        view["error" if job.status.terminal else "last_error"] = error
    links = job_links(job)
    batch_url = links.pop("batch")
    view["links"] = {**links, "self": batch_url, "job": links["self"]}
    return view


def _error_view(job: Job) -> dict[str, Any] | None:
    if job.error is None:
        return None
    view: dict[str, Any] = {
        "type": job.error.type,
        "message": job.error.message,
        "retryable": job.error.retryable,
    }
    if job.error.status is not None:
        view["status"] = job.error.status
    return view


def job_view(job: Job, *, with_input: bool = True) -> dict[str, Any]:
    """A job as the API shows it: no scheduling internals (worker, lease, hash, run_after)."""
    view: dict[str, Any] = {
        "id": job.id,
        "type": job.type,
        "status": job.status.value,
        "tenant": job.tenant,
        "priority": job.priority,
        "progress": job.progress.model_dump(),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "timeout_s": job.timeout_s,
        "metadata": job.metadata,
        "cancel_requested": job.cancel_requested,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "updated_at": rfc3339(job.updated_at),
    }
    if with_input:
        view["input"] = job.input
    if job.status is JobStatus.COMPLETED:
        view["result"] = job.result
    if job.cache_ttl_s is not None:
        view["cache"] = {"ttl_s": job.cache_ttl_s}
    if job.webhook_url is not None:
        view["webhook"] = {"url": job.webhook_url}
    if job.cache_info is not None:
        view["cache_info"] = {
            "source_job_id": job.cache_info.source_job_id,
            "cached_at": rfc3339(job.cache_info.cached_at),
        }
    error = _error_view(job)
    if error is not None:
        # On a job still running or queued for another attempt, this is why the last one failed.
        view["error" if job.status.terminal else "last_error"] = error
    view["links"] = job_links(job)
    return view


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, error_type: str, message: str) -> web.Response:
    """The one error body shape: `{"error": {"type", "message"}}`."""
    return json_response({"error": {"type": error_type, "message": message}}, status)


# --- middlewares --------------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map JobsError (and aiohttp's own HTTP errors) to JSON; never a traceback in a response."""
    try:
        return await handler(request)
    except Exception as exc:
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise
        response = _error_response(request, exc)
        started: web.StreamResponse | None = request.get(STARTED_RESPONSE)
        if started is None:
            return response
        # The response (an event stream) has started: an error response written now would land
        # inside it. The connection is dropped instead, which tells the client the stream broke.
        request.protocol.force_close()
        return started


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    if isinstance(exc, JobsError):
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        response = error_response(exc.status, exc.error_type, exc.message)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="jobs-api"'
        if isinstance(exc, RequestTimeout):
            response.force_close()  # the rest of the body may still come: never parse it as a request
        return response
    if isinstance(exc, web.HTTPException):
        message = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
        if exc.status == 404:
            message = f"no route for {request.method} {request.path}"
        response = error_response(exc.status, HTTP_ERROR_TYPES.get(exc.status, "http_error"), message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error; the server log has the details")


async def mark_response_started(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: from here on, an error can no longer become a response of its own."""
    request[STARTED_RESPONSE] = response


def needs_json_content_type(method: str, has_body: bool) -> bool:
    """Whether a request must be `Content-Type: application/json` to be served: writes with a body.

    A cross-site HTML form or a plain `fetch` can send text/plain, form and multipart bodies
    without a CORS preflight, but never application/json; so requiring it keeps a web page from
    submitting jobs through a visitor's browser (CSRF; in open mode nothing else would stop it).
    A write without a body (a cancel) passes whatever it declares: clients such as aiohttp label
    even an empty POST application/octet-stream.
    """
    return has_body and method in WRITE_METHODS


@web.middleware
async def content_type_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 for a write whose body is not declared as application/json (parameters allowed)."""
    if needs_json_content_type(request.method, request.body_exists):
        if request.content_type != "application/json":
            declared = request.headers.get("Content-Type")
            shown = "none" if declared is None else repr(declared[:100])
            raise UnsupportedMediaType(
                f"Content-Type must be application/json for {request.method} requests (got {shown})"
            )
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every /v1/ request; health, readiness and metrics stay open for probes."""
    if request.path.startswith("/v1/"):
        request[PRINCIPAL] = await request.app[AUTH].authenticate_request(
            request.headers.get("Authorization")
        )
    return await handler(request)


# --- request parsing ----------------------------------------------------------------------------


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body in chunks; RequestTimeout when the client is silent for too long.

    The timeout (JOBS_CLIENT_BODY_TIMEOUT_S) is per read, so a slow but steady upload is fine; a
    client that stops sending would otherwise hold its connection and handler for ever.
    """
    idle_timeout_s = request.app[SETTINGS].client_body_timeout_s
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await request.content.read(READ_CHUNK)
        except TimeoutError:
            raise RequestTimeout(
                f"request body silent for more than {idle_timeout_s:g} s (JOBS_CLIENT_BODY_TIMEOUT_S)"
            ) from None
        if not chunk:
            return
        yield chunk


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, refusing bodies over `limit` bytes before reading them whole."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the limit of {limit} (JOBS_MAX_INPUT_BYTES)"
        )
    body = bytearray()
    async for chunk in body_chunks(request):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (JOBS_MAX_INPUT_BYTES)")
    if not body.strip():
        raise BadRequest("empty body: send a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationFailed(f"body must be a JSON object, not {type(data).__name__}")
    return data


def describe(exc: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        field = ".".join(str(p) for p in err["loc"]) or "body"
        message = "unknown field" if err["type"] == "extra_forbidden" else str(err["msg"])
        parts.append(f"{field}: {message.removeprefix('Value error, ')}")
    return "; ".join(parts)


def idempotency_key(request: web.Request) -> str | None:
    """The Idempotency-Key header (an sf-string, quotes optional), or None."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable() or not key.isascii():
        raise BadRequest(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters")
    return key


def request_hash(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a submission (sorted keys, no whitespace)."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def parse_job_id(request: web.Request, name: str = "job_id") -> str:
    """The `{job_id}` (or another id) of the path, or BadRequest if it is not a UUID."""
    raw = request.match_info[name]
    if not is_job_id(raw):
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        what = "a batch id" if name == "batch_id" else "a job id"
        raise BadRequest(f"{shown!r} is not {what} (a UUID)")
    return raw.lower()


def parse_time(name: str, text: str) -> float:
    """An RFC 3339 timestamp with an offset, or epoch seconds, as epoch seconds."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise BadRequest(f"{name}: {text!r} is not a finite number of seconds")
        return value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{name}: {text!r} is neither RFC 3339 (2024-05-01T12:00:00Z) nor epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        raise BadRequest(f"{name}: {text!r} has no UTC offset; add Z or +00:00")
    return parsed.timestamp()


def encode_cursor(cursor: tuple[float, str]) -> str:
    """The opaque page cursor: urlsafe base64 of the store's (created_at, id)."""
    return base64.urlsafe_b64encode(orjson.dumps(list(cursor))).rstrip(b"=").decode()


def decode_cursor(text: str) -> tuple[float, str]:
    """The store's (created_at, id) from an opaque cursor, or BadRequest."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, job_id = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise BadRequest("cursor: not a next_cursor of a previous page") from None
    if isinstance(created_at, bool) or not isinstance(created_at, int | float) or not isinstance(job_id, str):
        raise BadRequest("cursor: not a next_cursor of a previous page")
    if not is_job_id(job_id):
        raise BadRequest("cursor: not a next_cursor of a previous page")
    return float(created_at), job_id


def parse_limit(text: str | None) -> int:
    """Page size: 1..100, default 20."""
    if text is None:
        return DEFAULT_LIST_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest(f"limit: {text!r} is not an integer") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise BadRequest(f"limit: must be within 1..{MAX_LIST_LIMIT}, got {limit}")
    return limit


def parse_status(text: str | None) -> JobStatus | None:
    """A status filter, or None."""
    if text is None:
        return None
    try:
        return JobStatus(text)
    except ValueError:
        choices = ", ".join(s.value for s in JobStatus)
        raise BadRequest(f"status: {text!r} is not one of {choices}") from None


def parse_level(text: str | None) -> LogLevel:
    """A log level name (debug, info, warning, error); default debug."""
    if text is None:
        return LogLevel.DEBUG
    try:
        return LogLevel[text.upper()]
    except KeyError:
        raise BadRequest(f"level: {text!r} is not one of debug, info, warning, error") from None


def parse_event_id(text: str) -> int:
    """An event id as a client may send it back: decimal digits, 0..MAX_EVENT_ID; else ValueError."""
    digits = text.strip()
    # str.isdigit alone would pass other scripts' digits; int() would pass "+1", "1_0", " -0".
    if not (digits.isascii() and digits.isdigit()) or len(digits) > len(str(MAX_EVENT_ID)):
        raise ValueError(text)
    value = int(digits)
    if value > MAX_EVENT_ID:
        raise ValueError(text)
    return value


def parse_last_event_id(request: web.Request) -> int:
    """The event id to resume after (Last-Event-ID header or ?last_event_id=), 0 from the start."""
    text = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if text is None or not text.strip():
        return 0
    try:
        return parse_event_id(text)
    except ValueError:
        shown = text if len(text) <= 64 else text[:64] + "..."
        raise BadRequest(
            f"Last-Event-ID: {shown!r} is not an event id (an integer 0..{MAX_EVENT_ID})"
        ) from None


# --- handlers -----------------------------------------------------------------------------------


async def visible_job(request: web.Request) -> Job:
    """The job of the path if the caller may see it; 400 for a bad id, 404 otherwise."""
    job_id = parse_job_id(request)
    job = await request.app[STORE].get(job_id)
    if job is None or not request[PRINCIPAL].can_see(job):
        raise JobNotFound(f"job {job_id} not found")
    return job


async def visible_batch(request: web.Request) -> Job:
    """The batch of the path if the caller may see it; 400 for a bad id, 404 otherwise (also
    for a job that is not a batch)."""
    batch_id = parse_job_id(request, "batch_id")
    job = await request.app[STORE].get(batch_id)
    if job is None or job.type != BATCH_TYPE or not request[PRINCIPAL].can_see(job):
        raise JobNotFound(f"batch {batch_id} not found")
    return job


async def submit(request: web.Request, body: dict[str, Any]) -> web.Response:
    """Validate, store and wake the runner; 202 with the job (a replay returns the same job)."""
    app = request.app
    settings = app[SETTINGS]
    key = idempotency_key(request)
    depth = settings.max_input_depth
    for name, value in body.items():
        if nested_deeper_than(value, depth):
            raise ValidationFailed(f"{name}: nested more than {depth} levels deep (JOBS_MAX_INPUT_DEPTH)")
    try:
        spec = JobSubmit.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(describe(exc)) from None
    if spec.priority > settings.max_priority:
        raise ValidationFailed(f"priority: must be at most {settings.max_priority} (JOBS_MAX_PRIORITY)")
    job_input = app[HANDLERS].validate_input(spec.type, spec.input)
    timeout_s = spec.timeout_s if spec.timeout_s is not None else settings.default_timeout_s
    if timeout_s > settings.max_timeout_s:
        raise ValidationFailed(f"timeout_s: must be at most {settings.max_timeout_s:g} (JOBS_MAX_TIMEOUT_S)")
    now = app[CLOCK]()
    job = Job(
        id=new_job_id(),
        tenant=request[PRINCIPAL].tenant,
        type=spec.type,
        input=job_input,
        priority=spec.priority,
        max_attempts=spec.max_attempts or settings.default_max_attempts,
        timeout_s=timeout_s,
        metadata=spec.metadata,
        created_at=now,
        updated_at=now,
        idempotency_key=key,
        request_hash=request_hash(body) if key is not None else None,
    )
    job = await from_cache(app, with_webhook(settings, job, spec.webhook), spec.cache)
    try:
        stored, created = await app[STORE].create(job)
    except OutcomeUnknown as exc:
        # Not 503 (which says nothing was stored): give the id so the client can look it up.
        log.warning("POST %s: %s", request.path, exc.message)
        body = {"error": {"type": exc.error_type, "message": exc.message, "job_id": exc.job_id}}
        return json_response(body, exc.status, {"Location": f"/v1/jobs/{exc.job_id}"})
    headers = {"Location": f"/v1/jobs/{stored.id}"}
    if created:
        app[METRICS].submitted.labels(stored.type).inc()
        app[RUNNER].wake()
        log.info("job %s (%s) %s for tenant %s", stored.id, stored.type, stored.status, stored.tenant)
    else:
        # IETF Idempotency-Key draft: a retried request gets the original response again.
        headers["Idempotent-Replayed"] = "true"
    return json_response(job_view(stored), 202, headers)


async def create_job(request: web.Request) -> web.Response:
    """POST /v1/jobs."""
    body = await read_json_object(request, request.app[SETTINGS].max_input_bytes)
    return await submit(request, body)


async def create_batch(request: web.Request) -> web.Response:
    """POST /v1/batches: a `batch` job whose input is the body minus the job-level fields."""
    body = await read_json_object(request, request.app[SETTINGS].max_input_bytes)
    job: dict[str, Any] = {"type": "batch"}
    job["input"] = {k: v for k, v in body.items() if k not in JOB_FIELDS}
    job.update((k, body[k]) for k in JOB_FIELDS if k in body)
    return await submit(request, job)


async def get_job(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}."""
    return json_response(job_view(await visible_job(request)))


async def get_batch(request: web.Request) -> web.Response:
    """GET /v1/batches/{batch_id}: counts by status and every item's status and result reference."""
    return json_response(batch_view(await visible_batch(request)))


def parse_item_index(request: web.Request, total: int) -> int:
    """The `{index}` of the path: a decimal item number below `total`; 400 or 404 otherwise."""
    raw = request.match_info["index"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        raise BadRequest(f"index: {shown!r} is not an item number (0, 1, 2, ...)")
    index = int(raw)
    if index >= total:
        raise JobNotFound(f"batch {request.match_info['batch_id']} has no item {index} ({total} items)")
    return index


async def get_batch_item(request: web.Request) -> web.Response:
    """GET /v1/batches/{batch_id}/items/{index}: the item's outcome once it is stored; 409 before."""
    job = await visible_batch(request)
    index = parse_item_index(request, item_count(job))
    outcome = item_outcome(job, index)
    if outcome is not None:
        return json_response(outcome)
    status = ItemStatus(batch_items(job)[index]["status"])
    what = f"item {index} of batch {job.id}"
    if job.status.terminal:
        message = f"{what} has no result: it is {status.value} (the batch {job.status.value})"
        error, headers = {"type": "no_result", "message": message}, None
    else:
        message = f"{what} is {status.value}; its outcome is stored when the batch ends"
        error, headers = {"type": "not_finished", "message": message}, {"Retry-After": "1"}
    return json_response({"index": index, "status": status.value, "error": error}, 409, headers)


async def get_result(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}/result: 200 once finished (result or error), 409 while it is not."""
    job = await visible_job(request)
    if not job.status.terminal:
        return json_response(
            {
                "id": job.id,
                "status": job.status.value,
                "error": {
                    "type": "not_finished",
                    "message": f"job {job.id} is {job.status.value}; its result is ready once it completes",
                },
            },
            409,
            {"Retry-After": "1"},
        )
    out: dict[str, Any] = {"id": job.id, "status": job.status.value}
    if job.status is JobStatus.COMPLETED:
        out["result"] = job.result
    else:
        out["error"] = _error_view(job) or {
            "type": job.status.value,
            "message": f"job {job.id} ended as {job.status.value}",
            "retryable": False,
        }
    return json_response(out)


async def list_jobs(request: web.Request) -> web.Response:
    """GET /v1/jobs: newest first, filtered, one page at a time."""
    principal: Principal = request[PRINCIPAL]
    q = request.query
    job_type = q.get("type")
    if job_type is not None and not 1 <= len(job_type) <= 64:
        raise BadRequest("type: must be 1-64 characters")
    cursor = q.get("cursor")
    query = JobQuery(
        tenant=None if principal.sees_all else principal.tenant,
        status=parse_status(q.get("status")),
        type=job_type,
        created_after=None if "created_after" not in q else parse_time("created_after", q["created_after"]),
        created_before=None
        if "created_before" not in q
        else parse_time("created_before", q["created_before"]),
        limit=parse_limit(q.get("limit")),
        cursor=None if not cursor else decode_cursor(cursor),
    )
    jobs, next_cursor = await request.app[STORE].list_jobs(query)
    # The page ends early rather than pass max_list_bytes; its cursor then goes on after its last
    # job. A single job over the limit still makes a page of its own, so paging always advances.
    room = request.app[SETTINGS].max_list_bytes - LIST_ENVELOPE_BYTES
    views: list[bytes] = []
    for index, job in enumerate(jobs):
        view = orjson.dumps(job_view(job, with_input=False))
        room -= len(view) + 1
        if views and room < 0:
            last = jobs[index - 1]
            next_cursor = (last.created_at, last.id)
            break
        views.append(view)
    tail = orjson.dumps(None if next_cursor is None else encode_cursor(next_cursor))
    body = b'{"jobs":[' + b",".join(views) + b'],"next_cursor":' + tail + b"}"
    return web.Response(body=body, content_type="application/json")


async def cancel_job(request: web.Request) -> web.Response:
    """POST /v1/jobs/{id}/cancel and DELETE /v1/jobs/{id}: 202 with the job, 409 if it ended."""
    job = await visible_job(request)
    now = request.app[CLOCK]()
    updated = await request.app[STORE].mutate(job.id, lambda j: request_cancel(j, now))
    request.app[RUNNER].cancel_local(job.id)
    log.info("job %s: cancel requested (now %s)", job.id, updated.status.value)
    return json_response(job_view(updated), 202)


async def job_logs(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}/logs?level=: the job's (bounded) log, oldest first."""
    level = parse_level(request.query.get("level"))
    job = await visible_job(request)
    lines = await request.app[STORE].logs(job.id, level)
    return json_response(
        {
            "id": job.id,
            "logs": [
                {"time": rfc3339(line.time), "level": line.level.name.lower(), "message": line.message}
                for line in lines
            ],
        }
    )


def sse_frame(event: JobEvent) -> bytes:
    """One Server-Sent Event: id, event type and the JSON snapshot."""
    data = {"job_id": event.job_id, "time": rfc3339(event.time), **event.data}
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, event.type.encode(), orjson.dumps(data))


def sse_error_frame(error_type: str, message: str) -> bytes:
    """An `error` event: why a stream ends before the job's terminal state. It has no id, so a
    client that reconnects with Last-Event-ID resumes after the last real event."""
    body = orjson.dumps({"error": {"type": error_type, "message": message}})
    return b"event: error\ndata: %s\n\n" % body


async def end_stream_with_error(response: web.StreamResponse, error_type: str, message: str) -> None:
    """Send an `error` event if the client still listens (the status line is long gone)."""
    try:
        await response.write(sse_error_frame(error_type, message))
    except ConnectionResetError:
        pass


def ends_stream(event: JobEvent) -> bool:
    """The event after which a job's stream ends: its terminal state."""
    return event.type == "state" and JobStatus(event.data["status"]).terminal


async def job_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/jobs/{id}/events: SSE of every state and progress change until the terminal state."""
    after = parse_last_event_id(request)
    job = await visible_job(request)
    store = request.app[STORE]
    settings = request.app[SETTINGS]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    stopping = asyncio.ensure_future(request.app[STOPPING].wait())
    last_write = loop.time()
    try:
        # `job` was read before the first events_after: a terminal job with no later events ended
        # before `after` (a resume past the end), so there is nothing more to send.
        terminal_before = job.status.terminal
        while True:
            waiter = asyncio.ensure_future(store.wait_for_events(job.id, settings.sse_poll_s))
            try:
                await asyncio.sleep(0)  # the waiter registers before we look: no event slips between
                events = await store.events_after(job.id, after)
                for event in events:
                    await response.write(sse_frame(event))
                    after = event.id
                    if ends_stream(event):
                        return response
                if events:
                    last_write = loop.time()
                    continue
                if terminal_before:
                    return response
                await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if stopping.done():
                # The client resumes elsewhere with Last-Event-ID.
                await end_stream_with_error(response, "shutting_down", "the service is shutting down")
                return response
            if loop.time() - last_write >= settings.sse_keepalive_s:
                if await store.get(job.id) is None:  # purged after its retention: no terminal event
                    await end_stream_with_error(response, "not_found", f"job {job.id} no longer exists")
                    return response
                await response.write(b": keepalive\n\n")
                last_write = loop.time()
    except ConnectionResetError as exc:
        log.debug("event stream of job %s ended: %s", job.id, exc)
        return response
    except JobsError as exc:
        # The response has started, so the error goes out as an event, not as a JSON body.
        log.warning("event stream of job %s ended: %s", job.id, exc.message)
        await end_stream_with_error(response, exc.error_type, exc.message)
        return response
    except Exception:
        log.exception("event stream of job %s failed", job.id)
        message = "internal error; the server log has the details"
        await end_stream_with_error(response, "internal_error", message)
        return response
    finally:
        stopping.cancel()


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process and its event loop answer."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 while the store answers and the service is not shutting down."""
    if request.app[STOPPING].is_set():
        return json_response({"status": "shutting_down"}, 503)
    try:
        await request.app[STORE].ping()
    except JobsError as exc:
        return json_response({"status": "store_unavailable", "message": exc.message}, 503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition of this app's registry."""
    try:
        counts = await request.app[STORE].count_by_status()
    except JobsError:
        pass  # the scrape still shows every other series
    else:
        request.app[METRICS].queued.set(counts.get(JobStatus.QUEUED, 0))
    body = generate_latest(request.app[PROMETHEUS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
