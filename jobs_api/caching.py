"""Result cache: a completed job's result reused by later submissions of the same work.

A submission with `"cache": {"ttl_s": N}` looks up its key: the tenant plus the SHA-256 of the
canonical JSON (sorted keys, no whitespace) of its type and validated input. An entry hits when
it has not expired (its producer's ttl_s after it was cached) and is at most the asker's ttl_s
old; the new job is then completed at once with the entry's result and `cache_info`. A job that
completes from a real run, submitted with `cache`, stores its result under its key for its ttl_s.
Tenants never share entries. Pure: `now` (wall-clock seconds) is passed in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from jobs_api.models import CacheInfo, Job, JobStatus

# Longest ttl_s a submission may ask for (30 days).
MAX_CACHE_TTL_S: Final = 30 * 24 * 3600.0


class CacheSpec(BaseModel):
    """The `cache` field of a submission."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    ttl_s: float = Field(gt=0, le=MAX_CACHE_TTL_S)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached result: whose (tenant, key), from which job, when, until when."""

    tenant: str
    key: str
    source_job_id: str
    result_json: str  # the result as JSON text, as the job stored it
    cached_at: float
    expires_at: float

    @property
    def size(self) -> int:
        """Bytes the entry's result takes (UTF-8 JSON)."""
        return len(self.result_json.encode())


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Lookups that hit and missed, and the live entries with their total result bytes."""

    hits: int = 0
    misses: int = 0
    entries: int = 0
    bytes: int = 0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(
            self.hits + other.hits,
            self.misses + other.misses,
            self.entries + other.entries,
            self.bytes + other.bytes,
        )


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(job_type: str, job_input: dict[str, Any]) -> str:
    """The key of a submission's work: SHA-256 hex of the canonical JSON of its type and input."""
    return hashlib.sha256(canonical_json({"input": job_input, "type": job_type}).encode()).hexdigest()


def tenant_of(job: Job) -> str:
    """The tenant a job's cache entries belong to ('' for the open API's anonymous caller)."""
    return job.tenant or ""


def is_hit(entry: CacheEntry, now: float, max_age_s: float) -> bool:
    """Whether `entry` may answer a lookup at `now` from a submission with ttl_s `max_age_s`."""
    return now < entry.expires_at and now - entry.cached_at <= max_age_s


def entry_for(job: Job, result_json: str, now: float) -> CacheEntry | None:
    """The entry a job that just completed stores (None: it asked for no cache, or came from it)."""
    if job.status is not JobStatus.COMPLETED or job.cache_ttl_s is None or job.cache_key is None:
        return None
    if job.cache_info is not None:
        return None  # a hit: the source's entry keeps its own expiry
    return CacheEntry(
        tenant=tenant_of(job),
        key=job.cache_key,
        source_job_id=job.id,
        result_json=result_json,
        cached_at=now,
        expires_at=now + job.cache_ttl_s,
    )


def complete_from(job: Job, entry: CacheEntry, result: Any, now: float) -> Job:
    """A job not stored yet, born completed at `now` with the cached `result` of `entry`.

    Not a `transition`: the job never was queued anywhere; it is created in its final state.
    """
    if job.status is not JobStatus.QUEUED or job.attempts:
        raise ValueError(f"job {job.id}: only a new job can be completed from the cache")
    return job.model_copy(
        update={
            "status": JobStatus.COMPLETED,
            "result": result,
            "progress": job.progress.model_copy(update={"percent": 100.0}),
            "cache_info": CacheInfo(source_job_id=entry.source_job_id, cached_at=entry.cached_at),
            "started_at": now,
            "finished_at": now,
            "updated_at": now,
        }
    )
