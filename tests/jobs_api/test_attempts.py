"""The pure decisions of an attempt: settle, lease expiry, release and deadlines (no loop, no store)."""

from __future__ import annotations

from typing import Any

from jobs_api.attempts import (
    AttemptEnd,
    EndKind,
    LocalLease,
    attempt_outcome,
    expire_lease,
    expire_queued,
    overdue,
    owns,
    release,
    settle,
)
from jobs_api.models import Job, JobStatus
from tests.jobs_api.conftest import T0, MakeJob


def running(make_job: MakeJob, **fields: Any) -> Job:
    """A job in its first attempt, claimed by worker "w" at T0 with a 30 s lease."""
    values: dict[str, Any] = {
        "status": JobStatus.RUNNING,
        "attempts": 1,
        "worker": "w",
        "lease_until": T0 + 30,
    }
    return make_job(created_at=T0, **{**values, **fields})


def test_settle_retry_requeues_after_the_delay(make_job: MakeJob) -> None:
    after = settle(running(make_job), AttemptEnd(EndKind.RETRY, delay_s=2.5), T0 + 1)
    assert after.status is JobStatus.QUEUED and after.run_after == T0 + 3.5
    assert after.worker is None and after.lease_until is None
    assert after.error is not None and after.error.retryable


def test_settle_retry_on_last_attempt_fails(make_job: MakeJob) -> None:
    after = settle(running(make_job, attempts=3, max_attempts=3), AttemptEnd(EndKind.RETRY), T0 + 1)
    assert after.status is JobStatus.FAILED
    assert after.error is not None and "gave up after 3 of 3 attempts" in after.error.message


def test_settle_past_deadline_times_out_instead_of_retrying(make_job: MakeJob) -> None:
    after = settle(running(make_job, timeout_s=10), AttemptEnd(EndKind.RETRY), T0 + 10)
    assert after.status is JobStatus.TIMED_OUT
    assert after.error is not None and after.error.type == "timeout"


def test_settle_cancel_request_wins_over_retry_but_not_completion(make_job: MakeJob) -> None:
    job = running(make_job, cancel_requested=True)
    assert settle(job, AttemptEnd(EndKind.RETRY), T0 + 1).status is JobStatus.CANCELLED
    assert settle(job, AttemptEnd(EndKind.INTERRUPTED), T0 + 1).status is JobStatus.CANCELLED
    done = settle(job, AttemptEnd(EndKind.COMPLETED, result=[1]), T0 + 1)
    assert done.status is JobStatus.COMPLETED and done.result == [1] and done.progress.percent == 100


def test_expire_lease_requeues_only_expired_running_jobs(make_job: MakeJob) -> None:
    job = running(make_job, lease_until=T0 + 5)
    assert expire_lease(job, T0 + 5) is job
    after = expire_lease(job, T0 + 6)
    assert after.status is JobStatus.QUEUED and after.run_after == T0 + 6
    assert after.error is not None and after.error.type == "worker_lost"
    assert expire_lease(running(make_job, lease_until=T0, attempts=5, max_attempts=5), T0 + 6).status is (
        JobStatus.FAILED
    )
    queued = make_job()
    assert expire_lease(queued, T0 + 100) is queued


def test_expire_queued_times_out_only_past_deadline(make_job: MakeJob) -> None:
    job = make_job(created_at=T0, timeout_s=10)
    assert expire_queued(job, T0 + 9) is job
    assert expire_queued(job, T0 + 10).status is JobStatus.TIMED_OUT


def test_owns_only_the_same_running_attempt(make_job: MakeJob) -> None:
    attempt = running(make_job)
    assert owns(attempt, attempt)
    assert not owns(attempt.model_copy(update={"worker": "other"}), attempt)
    assert not owns(attempt.model_copy(update={"attempts": 2}), attempt)
    assert not owns(settle(attempt, AttemptEnd(EndKind.COMPLETED), T0 + 1), attempt)


def test_release_hands_back_an_unstarted_attempt_uncounted(make_job: MakeJob) -> None:
    attempt = running(make_job, started_at=T0)
    after = release(attempt, attempt, T0 + 1)
    assert after.status is JobStatus.QUEUED and after.attempts == 0
    assert (after.started_at, after.worker, after.lease_until) == (None, None, None)
    second = running(make_job, attempts=2, started_at=T0)
    assert release(second, second, T0 + 1).started_at == T0  # an earlier attempt did start
    taken = attempt.model_copy(update={"worker": "other"})
    assert release(taken, attempt, T0 + 1) is taken


def test_attempt_outcome_labels(make_job: MakeJob) -> None:
    job = running(make_job)
    done = settle(job, AttemptEnd(EndKind.COMPLETED), T0 + 1)
    retried = settle(job, AttemptEnd(EndKind.RETRY), T0 + 1)
    cancelled = settle(job, AttemptEnd(EndKind.CANCELLED), T0 + 1)
    assert attempt_outcome(EndKind.COMPLETED, done) == "success"
    assert attempt_outcome(EndKind.RETRY, retried) == "retry"
    assert attempt_outcome(EndKind.LOST, retried) == "lost"
    assert attempt_outcome(EndKind.INTERRUPTED, retried) == "lost"
    assert attempt_outcome(EndKind.CANCELLED, cancelled) == "cancelled"


def test_local_lease_counts_from_the_last_renewal_sent_and_stops_before_it_ends() -> None:
    lease = LocalLease.granted(sent_at=100.0, lease_s=30.0)
    assert lease.expires == 130.0 and lease.stop_at == 129.0  # margin: 10 %, at most 1 s
    assert not lease.due(109.0) and lease.due(111.0)  # renew once a third is used
    lease.renewed(sent_at=111.0)
    assert lease.expires == 141.0
    lease.renewed(sent_at=105.0)  # a late answer to an older renewal moves nothing back
    assert lease.expires == 141.0
    assert LocalLease.granted(0.0, 1.0).stop_at == 0.9


def test_overdue_puts_the_lease_before_the_deadline() -> None:
    lease = LocalLease.granted(sent_at=0.0, lease_s=10.0)
    assert overdue(5.0, deadline=20.0, lease=lease) is None
    assert overdue(9.0, deadline=20.0, lease=lease) is EndKind.LOST
    assert overdue(5.0, deadline=5.0, lease=lease) is EndKind.TIMED_OUT
    # Past both: the job may belong to another worker, so nothing is recorded from here.
    assert overdue(25.0, deadline=20.0, lease=lease) is EndKind.LOST
