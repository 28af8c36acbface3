"""The job life cycle: the transition table, cancellation, ids and deadlines (pure, no loop)."""

from __future__ import annotations

import uuid

import pytest

from jobs_api.errors import InvalidTransition
from jobs_api.models import (
    TERMINAL,
    JobStatus,
    is_job_id,
    new_job_id,
    request_cancel,
    transition,
)
from tests.jobs_api.conftest import T0, MakeJob

ALLOWED = {
    (JobStatus.QUEUED, JobStatus.RUNNING),
    (JobStatus.QUEUED, JobStatus.FAILED),  # a stored job that cannot be read back, so never runs
    (JobStatus.QUEUED, JobStatus.CANCELLED),
    (JobStatus.QUEUED, JobStatus.TIMED_OUT),
    (JobStatus.RUNNING, JobStatus.QUEUED),
    (JobStatus.RUNNING, JobStatus.COMPLETED),
    (JobStatus.RUNNING, JobStatus.FAILED),
    (JobStatus.RUNNING, JobStatus.CANCELLED),
    (JobStatus.RUNNING, JobStatus.TIMED_OUT),
}
PAIRS = [(a, b) for a in JobStatus for b in JobStatus]


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_transition_allows_or_refuses_every_move(
    make_job: MakeJob, source: JobStatus, target: JobStatus
) -> None:
    job = make_job(status=source)
    if (source, target) in ALLOWED or (source is target and not source.terminal):
        after = transition(job, target, T0 + 5)
        assert after.status is target
        assert after.updated_at == T0 + 5
    else:
        with pytest.raises(InvalidTransition, match=f"{job.id}: cannot go from {source} to {target}"):
            transition(job, target, T0 + 5)


def test_transition_to_the_same_status_updates_a_job_that_has_not_ended(make_job: MakeJob) -> None:
    job = transition(make_job(), JobStatus.RUNNING, T0 + 1, worker="w", lease_until=T0 + 31)
    again = transition(job, JobStatus.RUNNING, T0 + 2, lease_until=T0 + 32)
    assert (again.status, again.lease_until, again.updated_at) == (JobStatus.RUNNING, T0 + 32, T0 + 2)
    assert (again.started_at, again.worker) == (T0 + 1, "w")


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_transition_never_changes_a_job_that_has_ended(make_job: MakeJob, status: JobStatus) -> None:
    ended = make_job(status=status, finished_at=T0 + 1)
    with pytest.raises(InvalidTransition, match=f"cannot go from {status} to {status}"):
        transition(ended, status, T0 + 2, result=1)  # would re-stamp finished_at


def test_transition_to_running_sets_started_at_once(make_job: MakeJob) -> None:
    job = transition(make_job(), JobStatus.RUNNING, T0 + 1, worker="w", lease_until=T0 + 31)
    assert job.started_at == T0 + 1 and job.worker == "w"
    again = transition(transition(job, JobStatus.QUEUED, T0 + 2), JobStatus.RUNNING, T0 + 3)
    assert again.started_at == T0 + 1


def test_transition_to_queued_or_terminal_releases_the_lease(make_job: MakeJob) -> None:
    running = transition(make_job(), JobStatus.RUNNING, T0 + 1, worker="w", lease_until=T0 + 31)
    queued = transition(running, JobStatus.QUEUED, T0 + 2, run_after=T0 + 3)
    assert (queued.worker, queued.lease_until, queued.finished_at) == (None, None, None)
    done = transition(running, JobStatus.COMPLETED, T0 + 4, result={"ok": True})
    assert (done.worker, done.lease_until, done.finished_at) == (None, None, T0 + 4)
    assert done.result == {"ok": True}


def test_transition_leaves_the_original_untouched(make_job: MakeJob) -> None:
    job = make_job()
    transition(job, JobStatus.RUNNING, T0 + 1)
    assert job.status is JobStatus.QUEUED


def test_request_cancel_ends_a_queued_job_at_once(make_job: MakeJob) -> None:
    job = request_cancel(make_job(), T0 + 1)
    assert job.status is JobStatus.CANCELLED and job.finished_at == T0 + 1


def test_request_cancel_flags_a_running_job_once(make_job: MakeJob) -> None:
    running = make_job(status=JobStatus.RUNNING, worker="w")
    flagged = request_cancel(running, T0 + 1)
    assert flagged.status is JobStatus.RUNNING and flagged.cancel_requested
    assert flagged.updated_at == T0 + 1
    assert request_cancel(flagged, T0 + 2) is flagged


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_request_cancel_refuses_a_finished_job(make_job: MakeJob, status: JobStatus) -> None:
    with pytest.raises(InvalidTransition, match=f"already ended as {status}"):
        request_cancel(make_job(status=status), T0 + 1)


def test_is_job_id_accepts_canonical_uuids_only() -> None:
    fresh = new_job_id()
    assert is_job_id(fresh)
    assert is_job_id(fresh.upper())
    assert not is_job_id(uuid.UUID(fresh).hex)  # no dashes: not canonical
    assert not is_job_id("{" + fresh + "}")
    assert not is_job_id("not-a-job")
    assert not is_job_id("")
    assert new_job_id() != fresh


def test_deadline_is_timeout_from_creation(make_job: MakeJob) -> None:
    job = make_job(created_at=T0, timeout_s=60.0)
    assert job.deadline == T0 + 60.0
    assert transition(job, JobStatus.RUNNING, T0 + 30).deadline == T0 + 60.0
