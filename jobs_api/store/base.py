"""The job store contract: a few atomic verbs that every backend implements the same way.

Changes are pure functions of a Job (status changes through models.transition) applied by
`mutate` (and `claim`), which a backend runs atomically (read, apply, write, record events,
commit) before anyone is told. Each committed change appends events numbered per job (so an id
says nothing about other tenants' activity), which `/events` streams and `Last-Event-ID` resumes
from. The backends share the event
bookkeeping (`event_for`, `EventHub`) and `redacted_url` from here.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any
from urllib.parse import urlsplit

import orjson
from pydantic import ValidationError

from jobs_api.caching import CacheEntry, CacheStats
from jobs_api.models import MAX_JSON_DEPTH, Job, JobError, JobStatus, nested_deeper_than
from jobs_api.webhooks import Delivery

Mutation = Callable[[Job], Job]

# The error type of a stored job that cannot be read back whole (see `load_job`).
UNDECODABLE = "undecodable"
# What a field too deep to read back becomes.
_EMPTIED: dict[str, Any] = {"input": {}, "metadata": {}, "result": None}


def load_job(data: str | bytes) -> Job:
    """The job stored as `data`; one that cannot be read back whole still comes back.

    Input, metadata or a result nested deeper than pydantic's JSON parser reads (stored by an
    earlier version, which took any depth) is emptied, and a job that has not ended gets an
    `undecodable` error naming it; `claim` fails such a job (`undecodable`) instead of stopping on it.
    """
    try:
        return Job.model_validate_json(data)
    except ValidationError:
        salvaged = _salvage(data)
        if salvaged is None:
            raise
        return salvaged


def _salvage(data: str | bytes) -> Job | None:
    try:
        raw = orjson.loads(data)  # orjson reads 1024 levels, deeper than anything stored could be
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    fields = [name for name in _EMPTIED if nested_deeper_than(raw.get(name), MAX_JSON_DEPTH)]
    if not fields:
        return None
    raw.update((name, _EMPTIED[name]) for name in fields)
    try:
        job = Job.model_validate(raw)
    except ValidationError:
        return None
    if job.status.terminal and job.error is not None:
        return job  # keep why it ended
    message = (
        f"the job's {' and '.join(fields)} {'is' if len(fields) == 1 else 'are'} nested more than "
        f"{MAX_JSON_DEPTH} levels deep and cannot be read back"
    )
    if not job.status.terminal:
        message += ", so the job cannot run"
    return job.model_copy(update={"error": JobError(type=UNDECODABLE, message=message)})


def undecodable(job: Job) -> bool:
    """True for a job `load_job` could not read whole that has not ended: it can only fail."""
    return not job.status.terminal and job.error is not None and job.error.type == UNDECODABLE


def redacted_url(url: str) -> str:
    """A store URL fit for logs: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


class LogLevel(IntEnum):
    """Levels of job log lines, lowest first."""

    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Filters and page of a job listing, newest first."""

    tenant: str | None = None  # None: every tenant (admins only)
    status: JobStatus | None = None
    type: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    limit: int = 50
    cursor: tuple[float, str] | None = None  # (created_at, id) of the last job of the previous page


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One recorded change of a job."""

    id: int
    job_id: str
    type: str  # "state" or "progress"
    data: dict[str, Any]
    time: float


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of a job's log."""

    time: float
    level: LogLevel
    message: str


def event_for(before: Job | None, after: Job) -> list[tuple[str, dict[str, Any]]]:
    """The events a change from `before` to `after` produces (none if nothing visible changed)."""
    snapshot = {
        "status": after.status.value,
        "attempts": after.attempts,
        "progress": after.progress.model_dump(),
    }
    if after.error is not None:
        snapshot["error"] = after.error.model_dump()
    if before is None or before.status is not after.status or before.attempts != after.attempts:
        return [("state", snapshot)]
    if before.progress != after.progress:
        return [("progress", snapshot)]
    return []


@dataclass
class EventHub:
    """Wakes in-process waiters when a job gets new events."""

    _waiters: dict[str, set[asyncio.Event]] = field(default_factory=dict)

    def notify(self, job_id: str) -> None:
        """New events were committed for `job_id`."""
        for event in self._waiters.get(job_id, ()):
            event.set()

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Return when `job_id` gets an event, or after `timeout_s`."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]


class JobStore(ABC):
    """Durable job storage; every method is safe to call concurrently from one event loop."""

    max_log_lines = 1000

    @abstractmethod
    async def open(self) -> None:
        """Connect and prepare the schema."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    @abstractmethod
    async def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new job; with an idempotency key already used by the tenant, return that job.

        Returns (job, created). Raises IdempotencyConflict if the key was used with another
        request hash.
        """

    @abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The job, or None."""

    @abstractmethod
    async def list_jobs(self, query: JobQuery) -> tuple[list[Job], tuple[float, str] | None]:
        """Jobs matching `query`, newest first, and the cursor of the next page (or None)."""

    @abstractmethod
    async def claim(self, worker: str, now: float, lease_s: float) -> Job | None:
        """Atomically take the best eligible queued job: highest priority; within it, tenants
        take turns (one just served goes after those waiting); a tenant's jobs oldest first."""

    @abstractmethod
    async def mutate(self, job_id: str, change: Mutation) -> Job:
        """Atomically apply `change` to the stored job and record its events; returns the result.

        Raises JobNotFound if there is no such job; whatever `change` raises propagates and
        nothing is written.
        """

    @abstractmethod
    async def expired_leases(self, now: float) -> list[str]:
        """Ids of running jobs whose lease ran out before `now`."""

    @abstractmethod
    async def events_after(self, job_id: str, after_id: int) -> list[JobEvent]:
        """Events of `job_id` with id greater than `after_id`, oldest first."""

    @abstractmethod
    async def wait_for_events(self, job_id: str, timeout_s: float) -> None:
        """Return when `job_id` may have new events, or after `timeout_s`."""

    @abstractmethod
    async def append_log(self, job_id: str, line: LogLine) -> None:
        """Add a log line, keeping at most `max_log_lines` per job."""

    @abstractmethod
    async def logs(self, job_id: str, min_level: LogLevel) -> list[LogLine]:
        """Log lines at `min_level` or above, oldest first."""

    @abstractmethod
    async def count_by_status(self) -> dict[JobStatus, int]:
        """How many jobs are in each status (statuses with none may be missing)."""

    @abstractmethod
    async def purge_finished(self, before: float) -> int:
        """Delete jobs that finished before `before` (with their events and logs); returns count."""

    # --- result cache (jobs_api.caching) ---

    @abstractmethod
    async def cache_lookup(self, tenant: str, key: str, now: float, max_age_s: float) -> CacheEntry | None:
        """The tenant's live entry for `key` at most `max_age_s` old, or None; counts a hit or miss."""

    @abstractmethod
    async def cache_put(self, entry: CacheEntry) -> None:
        """Store (or replace) the entry; it expires at `entry.expires_at`."""

    @abstractmethod
    async def cache_stats(self, tenant: str | None, now: float) -> CacheStats:
        """Hits, misses, live entries and their bytes of one tenant (None: of every tenant)."""

    @abstractmethod
    async def cache_clear(self) -> int:
        """Delete every tenant's entries (the hit and miss counts stay); how many there were."""

    @abstractmethod
    async def cache_sweep(self, now: float) -> int:
        """Drop entries that expired before `now`; how many."""

    # --- webhook deliveries (jobs_api.webhooks) ---
    # A delivery is recorded by the same write that ends a job with a webhook (`delivery_for`).

    @abstractmethod
    async def webhook_claim(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Up to `limit` deliveries due at `now`, each put off to `now + lease_s` (so no other
        process takes it meanwhile), soonest first."""

    @abstractmethod
    async def webhook_save(self, delivery: Delivery) -> None:
        """Keep the delivery for its next attempt at `delivery.next_at`."""

    @abstractmethod
    async def webhook_delete(self, job_id: str) -> None:
        """The job's delivery is over (delivered or given up)."""

    @abstractmethod
    async def webhook_pending(self) -> int:
        """How many deliveries are waiting."""
