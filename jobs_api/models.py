"""Jobs and their life cycle.

A job is queued, then running (one attempt at a time), then ends in exactly one terminal state:
completed, failed, cancelled or timed_out. A running attempt that fails retryably goes back to
queued with a later `run_after`; a crashed worker's job goes back to queued when its lease expires.
A queued job that cannot even be read back (stored nested too deep) fails without running.
Every status change goes through `transition`, which refuses anything the table does not allow
and any change of a job that has ended, so `finished_at` is stamped once. Changes that keep the
status are plain copies: lease renewal (runner), progress (the handler context) and the cancel
flag of a running job (`request_cancel`). Pure: timestamps (`now`, wall-clock seconds) are
passed in; only `new_job_id` makes something up.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs_api.errors import InvalidTransition

# Deepest JSON (containers inside containers) a job's input, metadata or result may hold: a stored
# job is read back by pydantic's JSON parser, which stops at 200 levels (the job and its field
# are two of them), and orjson writes at most 254.
MAX_JSON_DEPTH = 128


class JobStatus(StrEnum):
    """Where a job is in its life cycle."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        """True for the states a job never leaves."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset(
        {
            JobStatus.RUNNING,
            JobStatus.FAILED,  # it can never run: stored too deep to read back (store.base.load_job)
            JobStatus.CANCELLED,
            JobStatus.TIMED_OUT,
        }
    ),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.QUEUED,  # retry later, or requeued after its worker died
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.TIMED_OUT,
        }
    ),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.TIMED_OUT: frozenset(),
}


class Progress(BaseModel):
    """How far a job has got, as the API shows it."""

    model_config = ConfigDict(frozen=True)

    percent: float = Field(0.0, ge=0, le=100)
    message: str | None = None
    phase: str | None = None


class ItemProgress(BaseModel):
    """Where each item of a fan-out job (a batch) is, as its attempt `attempt` last stored it."""

    model_config = ConfigDict(frozen=True)

    attempt: int
    statuses: tuple[str, ...]


class JobError(BaseModel):
    """Why a job failed (or why its last attempt did)."""

    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    retryable: bool = False
    status: int | None = None


class CacheInfo(BaseModel):
    """Where the result of a job completed from the result cache came from."""

    model_config = ConfigDict(frozen=True)

    source_job_id: str
    cached_at: float


class Job(BaseModel):
    """One job as stored: everything the API shows plus scheduling fields."""

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str | None = None
    type: str
    status: JobStatus = JobStatus.QUEUED
    input: dict[str, Any]
    priority: int = 0
    max_attempts: int = 5
    timeout_s: float = 900.0
    metadata: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 0
    progress: Progress = Progress()
    # Per-item statuses of a batch while it runs (its result holds them once it ends).
    item_progress: ItemProgress | None = None
    result: Any = None
    error: JobError | None = None
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    # Scheduling: not eligible before run_after; owned by `worker` until lease_until.
    run_after: float = 0.0
    worker: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None
    request_hash: str | None = None
    # Result cache: the submission's ttl_s and the key of its (tenant, type, input) (jobs_api.caching);
    # cache_info is set on a job completed from the cache.
    cache_ttl_s: float | None = None
    cache_key: str | None = None
    cache_info: CacheInfo | None = None
    # Where to POST the job's outcome once it ends (jobs_api.webhooks).
    webhook_url: str | None = None

    @property
    def deadline(self) -> float:
        """Wall-clock time by which the whole job must end (timeout_s from creation)."""
        return self.created_at + self.timeout_s


def nested_deeper_than(value: Any, limit: int) -> bool:
    """True when `value` has more than `limit` levels of lists and dicts (a scalar has 0).

    Iterative, so a value of any depth is measured without recursion; it stops at the first
    container past the limit.
    """
    if not isinstance(value, _CONTAINERS):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, _CONTAINERS))
    return False


_CONTAINERS = (dict, list, tuple)


def new_job_id() -> str:
    """A fresh job id (UUID4)."""
    return str(uuid.uuid4())


def is_job_id(value: str) -> bool:
    """True when `value` is a UUID in its canonical text form."""
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def transition(job: Job, to: JobStatus, now: float, **changes: Any) -> Job:
    """The job moved to `to` at `now`, with other field changes; refuses illegal moves.

    `to` may be the status the job is in while it has not ended (an update of other fields); a
    job that ended is refused even its own status.
    """
    same = to is job.status and not to.terminal
    if not same and to not in TRANSITIONS[job.status]:
        raise InvalidTransition(f"job {job.id}: cannot go from {job.status} to {to}")
    update: dict[str, Any] = {"status": to, "updated_at": now, **changes}
    if to is JobStatus.RUNNING and job.started_at is None:
        update.setdefault("started_at", now)
    if to.terminal:
        update.setdefault("finished_at", now)
        update.setdefault("worker", None)
        update.setdefault("lease_until", None)
    if to is JobStatus.QUEUED:
        update.setdefault("worker", None)
        update.setdefault("lease_until", None)
    return job.model_copy(update=update)


def request_cancel(job: Job, now: float) -> Job:
    """Cancel: a queued job ends at once; a running one is flagged for its worker to stop."""
    if job.status is JobStatus.QUEUED:
        return transition(job, JobStatus.CANCELLED, now)
    if job.status is JobStatus.RUNNING:
        if job.cancel_requested:
            return job
        return job.model_copy(update={"cancel_requested": True, "updated_at": now})
    raise InvalidTransition(f"job {job.id} already ended as {job.status}; nothing to cancel")
