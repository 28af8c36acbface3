"""How an attempt of a job ends, as pure decisions: no I/O, clock or event loop (`now` is passed in).

The model: a claim moves a queued job to running and counts the attempt; the job then belongs to
that attempt, identified by (worker, attempts), until its status changes. Rules:
- An attempt writes to the job only while it still owns it (`owns`); anything else it learns
  after that (its outcome, progress, a lease renewal) is dropped.
- An attempt ends exactly one way (`EndKind`); `settle` records it with this precedence:
  completed, then a requested cancel, then a permanent failure, then the job's deadline. A
  retryable end (also a lost lease or a runner shutting down) requeues the job with a later
  `run_after` until `max_attempts` are used up, then fails it.
- A claimed job whose attempt never started is handed back uncounted (`release`); a queued job
  past its deadline times out (`expire_queued`).
- A worker keeps its own view of the lease (`LocalLease`, on its monotonic clock) and stops the
  attempt before that runs out (`overdue`), whether or not the store answers: once the stored
  lease may have expired, another worker may take the job, so this one must no longer run it.
Every status change here goes through `models.transition`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from jobs_api.models import Job, JobError, JobStatus, transition


class EndKind(StrEnum):
    """How an attempt ended."""

    COMPLETED = "completed"
    RETRY = "retry"  # retryable failure: another attempt after a backoff
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    INTERRUPTED = "interrupted"  # this runner stopped before the attempt ended
    LOST = "lost"  # the job no longer belongs to this attempt (lease expired and taken over)


# An attempt stops this share of its lease (at most LEASE_MARGIN_MAX_S) before the lease runs
# out, so its handler has unwound by the time another worker may take the job.
LEASE_MARGIN_SHARE = 0.1
LEASE_MARGIN_MAX_S = 1.0
# Renew once a third of the lease is used, so two missed renewals still keep it.
RENEW_WHEN_LEFT_SHARE = 2 / 3


@dataclass(slots=True)
class LocalLease:
    """An attempt's lease as its own worker sees it, in seconds of the worker's monotonic clock.

    `expires` counts from the moment the last successful claim or renewal was sent: the store's
    `lease_until` was computed from a clock read after that, so this view never ends later than
    the stored lease. A renewal that fails, hangs or answers late moves nothing.
    """

    lease_s: float
    expires: float

    @classmethod
    def granted(cls, sent_at: float, lease_s: float) -> LocalLease:
        """The lease of a claim (or renewal) sent at `sent_at` that succeeded."""
        return cls(lease_s, sent_at + lease_s)

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at `sent_at` succeeded."""
        self.expires = max(self.expires, sent_at + self.lease_s)

    @property
    def stop_at(self) -> float:
        """When the attempt must stop unless the lease was renewed by then."""
        return self.expires - min(self.lease_s * LEASE_MARGIN_SHARE, LEASE_MARGIN_MAX_S)

    def due(self, now: float) -> bool:
        """True once the lease should be renewed."""
        return self.expires - now < self.lease_s * RENEW_WHEN_LEFT_SHARE


def overdue(now: float, deadline: float, lease: LocalLease) -> EndKind | None:
    """Why an attempt still running at `now` must stop (None: it may go on).

    The lease comes first: past it the job may belong to another worker, so the attempt ends as
    LOST and records nothing; the store's lease sweep requeues (or times out) the job.
    """
    if now >= lease.stop_at:
        return EndKind.LOST
    if now >= deadline:
        return EndKind.TIMED_OUT
    return None


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    """The outcome of one attempt, ready to be recorded by `settle`."""

    kind: EndKind
    result: Any = None
    error: JobError | None = None
    delay_s: float = 0.0  # for RETRY: wait before the next attempt


def owns(current: Job, attempt: Job) -> bool:
    """True while the stored job still belongs to the attempt that claimed it as `attempt`."""
    return (
        current.status is JobStatus.RUNNING
        and current.worker == attempt.worker
        and current.attempts == attempt.attempts
    )


def timeout_error(job: Job) -> JobError:
    """The error of a job that ran out of time."""
    return JobError(type="timeout", message=f"job did not finish within timeout_s={job.timeout_s:g}")


def settle(job: Job, end: AttemptEnd, now: float) -> Job:
    """The running job after its attempt ended as `end` at `now`.

    Completed wins; then a cancel request; then a permanent failure; then the deadline. A
    retryable end requeues the job (run_after = now + delay) unless its attempts are used up.
    """
    if end.kind is EndKind.COMPLETED:
        progress = job.progress.model_copy(update={"percent": 100.0})
        return transition(job, JobStatus.COMPLETED, now, result=end.result, error=None, progress=progress)
    if end.kind is EndKind.CANCELLED or job.cancel_requested:
        return transition(job, JobStatus.CANCELLED, now)
    if end.kind is EndKind.FAILED:
        return transition(job, JobStatus.FAILED, now, error=end.error, result=end.result)
    if end.kind is EndKind.TIMED_OUT or now >= job.deadline:
        return transition(job, JobStatus.TIMED_OUT, now, error=timeout_error(job))
    error = end.error or JobError(type="retryable_error", message="attempt failed", retryable=True)
    if job.attempts >= job.max_attempts:
        message = f"{error.message} (gave up after {job.attempts} of {job.max_attempts} attempts)"
        return transition(job, JobStatus.FAILED, now, error=error.model_copy(update={"message": message}))
    return transition(job, JobStatus.QUEUED, now, run_after=now + end.delay_s, error=error)


def expire_lease(job: Job, now: float) -> Job:
    """A running job whose lease ran out before `now`: requeued (or ended); else unchanged."""
    if job.status is not JobStatus.RUNNING or job.lease_until is None or job.lease_until >= now:
        return job
    error = JobError(
        type="worker_lost",
        message=f"worker {job.worker} stopped renewing its lease during attempt {job.attempts}",
        retryable=True,
    )
    return settle(job, AttemptEnd(EndKind.LOST, error=error), now)


def release(job: Job, attempt: Job, now: float) -> Job:
    """A job claimed as `attempt` that never started (its runner began stopping): queued again
    with the attempt uncounted; unchanged if it no longer belongs to the attempt."""
    if not owns(job, attempt):
        return job
    attempts = job.attempts - 1
    started_at = job.started_at if attempts > 0 else None
    return transition(job, JobStatus.QUEUED, now, attempts=attempts, started_at=started_at)


def expire_queued(job: Job, now: float) -> Job:
    """A queued job past its deadline: timed out; else unchanged."""
    if job.status is not JobStatus.QUEUED or now < job.deadline:
        return job
    return transition(job, JobStatus.TIMED_OUT, now, error=timeout_error(job))


def attempt_outcome(end: EndKind, after: Job) -> str:
    """The `outcome` label of jobs_attempts_total for an attempt that left the job as `after`."""
    if after.status is JobStatus.COMPLETED:
        return "success"
    if after.status is JobStatus.QUEUED:
        return "lost" if end in (EndKind.LOST, EndKind.INTERRUPTED) else "retry"
    return after.status.value
