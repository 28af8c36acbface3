"""The bodies of the jobs API as pydantic models: what the routes validate and what they answer.

`JobSubmit` is the model `POST /v1/jobs` validates with; the response models describe exactly the
JSON the routes build (`routes.job_view` and friends), and `/openapi.json` is generated from all
of them, so the documentation is the code. The schemathesis test checks every answer of the
running service against these shapes. Pure: pydantic and the jobs_api models only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs_api.batches import ItemStatus
from jobs_api.caching import CacheSpec
from jobs_api.models import JobStatus
from jobs_api.webhooks import WebhookSpec

# Fields of a batch submission that describe the job rather than its input.
JOB_FIELDS = ("priority", "max_attempts", "timeout_s", "metadata", "cache", "webhook")
LogLevelName = Literal["debug", "info", "warning", "error"]


class JobSubmit(BaseModel):
    """The body of `POST /v1/jobs`; strict: no coercion of strings to numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: str = Field(min_length=1, max_length=64, description="a registered job type")
    input: dict[str, Any] = Field(description="the job type's input")
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first")
    max_attempts: int | None = Field(None, ge=1, le=100, description="default JOBS_MAX_ATTEMPTS")
    timeout_s: float | None = Field(
        None, gt=0, description="for the whole job; default JOBS_DEFAULT_TIMEOUT_S"
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="kept with the job, shown as given")
    cache: CacheSpec | None = Field(
        None, description="answer from (and fill) the result cache: same tenant, type and input"
    )
    webhook: WebhookSpec | None = Field(
        None, description="called, signed, once the job ends; its host must be in JOBS_WEBHOOK_ALLOWED_HOSTS"
    )


# --- answers --------------------------------------------------------------------------------------


class CacheStats(BaseModel):
    """`GET /v1/cache/stats`."""

    scope: Literal["tenant", "all"]
    tenant: str | None
    hits: int
    misses: int
    entries: int
    bytes: int


class CacheCleared(BaseModel):
    """`DELETE /v1/cache?confirm=true`."""

    deleted: int


_OPEN = ConfigDict(extra="forbid")


class ErrorInfo(BaseModel):
    """What went wrong: a stable machine-readable `type` and a message for people."""

    model_config = _OPEN

    type: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"type", "message"}}`."""

    model_config = _OPEN

    error: ErrorInfo


class OutcomeUnknownInfo(ErrorInfo):
    """A submission whose write the store never confirmed: the job `job_id` may exist."""

    job_id: str


class OutcomeUnknownBody(BaseModel):
    """The 504 of a submission: `{"error": {"type": "outcome_unknown", "message", "job_id"}}`."""

    model_config = _OPEN

    error: OutcomeUnknownInfo


class JobErrorView(BaseModel):
    """Why a job failed (or why its last attempt did)."""

    model_config = _OPEN

    type: str
    message: str
    retryable: bool
    status: int | None = Field(None, description="the upstream's HTTP status, when one answered")


class ProgressView(BaseModel):
    """How far a job has got."""

    model_config = _OPEN

    percent: float = Field(ge=0, le=100)
    message: str | None
    phase: str | None


class JobLinks(BaseModel):
    """Where to follow a job."""

    model_config = _OPEN

    self: str
    events: str
    logs: str
    cancel: str
    result: str | None = Field(None, description="once the job completed")
    batch: str | None = Field(None, description="for a batch job: its items")


class CacheInfoView(BaseModel):
    """Where a job answered from the result cache got its result."""

    model_config = _OPEN

    source_job_id: str = Field(json_schema_extra={"format": "uuid"})
    cached_at: str = Field(json_schema_extra={"format": "date-time"})


class JobView(BaseModel):
    """A job as the API shows it (listings leave out `input`)."""

    model_config = _OPEN

    id: str = Field(json_schema_extra={"format": "uuid"})
    type: str
    status: JobStatus
    tenant: str | None
    priority: int
    progress: ProgressView
    attempts: int
    max_attempts: int
    timeout_s: float
    metadata: dict[str, Any]
    cancel_requested: bool
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    started_at: str | None = Field(json_schema_extra={"format": "date-time"})
    finished_at: str | None = Field(json_schema_extra={"format": "date-time"})
    updated_at: str = Field(json_schema_extra={"format": "date-time"})
    input: dict[str, Any] | None = Field(None, description="left out of listings")
    result: Any = Field(None, description="once completed (also kept on a failed batch)")
    error: JobErrorView | None = Field(None, description="once the job failed")
    last_error: JobErrorView | None = Field(None, description="why the last attempt failed, while it retries")
    cache: CacheSpec | None = Field(None, description="the submission's cache request, if any")
    webhook: WebhookSpec | None = Field(None, description="the submission's webhook, if any")
    cache_info: CacheInfoView | None = Field(None, description="set on a job answered from the cache")
    links: JobLinks


class JobEventData(BaseModel):
    """The JSON `data` of a `state` or `progress` event: a snapshot of the job after the change."""

    model_config = _OPEN

    job_id: str
    time: str = Field(json_schema_extra={"format": "date-time"})
    status: JobStatus
    attempts: int
    progress: ProgressView
    error: JobErrorView | None = None


class JobList(BaseModel):
    """One page of jobs, newest first."""

    model_config = _OPEN

    jobs: list[JobView]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class JobResult(BaseModel):
    """The outcome of an ended job: its result, or why it did not complete."""

    model_config = _OPEN

    id: str
    status: JobStatus
    result: Any = None
    error: JobErrorView | None = None


class NotFinished(BaseModel):
    """409 while a job (or a batch item) has no outcome yet."""

    model_config = _OPEN

    id: str
    status: JobStatus
    error: ErrorInfo


class LogLineView(BaseModel):
    """One line of a job's log."""

    model_config = _OPEN

    time: str = Field(json_schema_extra={"format": "date-time"})
    level: LogLevelName
    message: str


class JobLogs(BaseModel):
    """A job's log lines, oldest first."""

    model_config = _OPEN

    id: str
    logs: list[LogLineView]


class BatchItemView(BaseModel):
    """One item of a batch: where it is and where its outcome is served once stored."""

    model_config = _OPEN

    index: int = Field(ge=0)
    status: ItemStatus
    job_id: str = Field(description="the batch's job, which runs the item")
    result_url: str | None = Field(description="set once the item's outcome is stored (the batch ended)")
    error: dict[str, Any] | None = Field(None, description="a failed item's error, once stored")


class BatchCounts(BaseModel):
    """How many items of a batch are in each status."""

    model_config = _OPEN

    queued: int
    running: int
    completed: int
    failed: int
    skipped: int
    cancelled: int


class BatchLinks(BaseModel):
    """Where to follow a batch."""

    model_config = _OPEN

    self: str
    job: str
    events: str
    logs: str
    cancel: str
    result: str | None = None


class BatchView(BaseModel):
    """A batch: its job's state, item counts by status and every item."""

    model_config = _OPEN

    id: str
    status: JobStatus
    tenant: str | None
    progress: ProgressView
    attempts: int
    total: int
    counts: BatchCounts
    items: list[BatchItemView]
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    started_at: str | None = Field(json_schema_extra={"format": "date-time"})
    finished_at: str | None = Field(json_schema_extra={"format": "date-time"})
    updated_at: str = Field(json_schema_extra={"format": "date-time"})
    error: JobErrorView | None = None
    last_error: JobErrorView | None = None
    links: BatchLinks


class BatchItemOutcome(BaseModel):
    """One item's stored outcome: its result, or its error."""

    model_config = _OPEN

    index: int
    status: Literal["completed", "failed"]
    result: Any = None
    error: dict[str, Any] | None = None


class ItemNotReady(BaseModel):
    """409 for an item without a stored outcome: `not_finished` (yet) or `no_result` (never)."""

    model_config = _OPEN

    index: int
    status: ItemStatus
    error: ErrorInfo


class Health(BaseModel):
    """`/healthz` and `/readyz`."""

    model_config = _OPEN

    status: Literal["ok", "ready", "shutting_down", "store_unavailable"]
    message: str | None = None
