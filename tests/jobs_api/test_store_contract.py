"""The job store contract, run against every backend (the `store` fixture is parametrized)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from jobs_api.errors import IdempotencyConflict, InvalidTransition, JobNotFound
from jobs_api.models import Job, JobError, JobStatus, Progress, request_cancel, transition
from jobs_api.store.base import JobQuery, JobStore, LogLevel, LogLine
from tests.jobs_api.conftest import T0, MakeJob, open_another, open_sqlite


def finished(job: Job, at: float, status: JobStatus = JobStatus.COMPLETED) -> Job:
    """`job` as if it ran and ended at `at`."""
    running = transition(job, JobStatus.RUNNING, at - 1, worker="w", attempts=1)
    return transition(running, status, at)


async def test_create_then_get_returns_the_same_job(store: JobStore, make_job: MakeJob) -> None:
    job = make_job(tenant="acme", priority=3, metadata={"k": "v"}, input={"path": "/x", "body": [1, "é"]})
    stored, created = await store.create(job)
    assert created and stored == job
    assert await store.get(job.id) == job
    assert await store.get("00000000-0000-4000-8000-000000000000") is None


async def test_create_with_same_idempotency_key_returns_the_first_job(
    store: JobStore, make_job: MakeJob
) -> None:
    first, created = await store.create(make_job(tenant="t", idempotency_key="k", request_hash="h1"))
    again, created_again = await store.create(make_job(tenant="t", idempotency_key="k", request_hash="h1"))
    assert created and not created_again
    assert again == first
    # Keys are per tenant.
    other, created_other = await store.create(make_job(tenant="u", idempotency_key="k", request_hash="h2"))
    assert created_other and other.id != first.id


async def test_create_with_reused_key_and_other_request_conflicts(store: JobStore, make_job: MakeJob) -> None:
    await store.create(make_job(tenant="t", idempotency_key="k", request_hash="h1"))
    with pytest.raises(IdempotencyConflict, match="'k'"):
        await store.create(make_job(tenant="t", idempotency_key="k", request_hash="h2"))
    jobs, _ = await store.list_jobs(JobQuery())
    assert len(jobs) == 1


async def test_list_filters_by_tenant_status_type_and_time(store: JobStore, make_job: MakeJob) -> None:
    a = make_job(tenant="a", type="inference", created_at=T0 + 1)
    b = make_job(tenant="b", type="batch", created_at=T0 + 2)
    c = make_job(tenant="a", type="batch", created_at=T0 + 3, status=JobStatus.CANCELLED)
    for job in (a, b, c):
        await store.create(job)

    async def ids(**query: object) -> list[str]:
        jobs, _ = await store.list_jobs(JobQuery(**query))  # type: ignore[arg-type]
        return [j.id for j in jobs]

    assert await ids() == [c.id, b.id, a.id]
    assert await ids(tenant="a") == [c.id, a.id]
    assert await ids(status=JobStatus.QUEUED) == [b.id, a.id]
    assert await ids(type="batch") == [c.id, b.id]
    assert await ids(tenant="a", type="batch", status=JobStatus.CANCELLED) == [c.id]
    assert await ids(created_after=T0 + 1) == [c.id, b.id]
    assert await ids(created_before=T0 + 3) == [b.id, a.id]
    assert await ids(tenant="nobody") == []


async def test_list_pages_with_cursor_without_duplicates_or_gaps(store: JobStore, make_job: MakeJob) -> None:
    # Pairs share a creation time, so the cursor must break ties by id.
    jobs = [make_job(created_at=T0 + i // 2) for i in range(25)]
    for job in jobs:
        await store.create(job)
    seen: list[str] = []
    cursor: tuple[float, str] | None = None
    pages = 0
    while True:
        page, cursor = await store.list_jobs(JobQuery(limit=10, cursor=cursor))
        pages += 1
        seen.extend(j.id for j in page)
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 25
    expected = sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)
    assert seen == [j.id for j in expected]


async def test_list_last_full_page_has_no_cursor(store: JobStore, make_job: MakeJob) -> None:
    for _ in range(10):
        await store.create(make_job())
    page, cursor = await store.list_jobs(JobQuery(limit=10))
    assert len(page) == 10 and cursor is None


async def test_claim_takes_highest_priority_then_oldest(store: JobStore, make_job: MakeJob) -> None:
    low_old = make_job(priority=0, created_at=T0)
    high_new = make_job(priority=5, created_at=T0 + 2)
    high_old = make_job(priority=5, created_at=T0 + 1)
    low_new = make_job(priority=0, created_at=T0 + 3)
    # Submitted oldest first, as the API does (one tenant's jobs go in the order submitted).
    for job in (low_old, high_old, high_new, low_new):
        await store.create(job)
    order = []
    while (claimed := await store.claim("w", T0 + 10, 30.0)) is not None:
        order.append(claimed.id)
    assert order == [high_old.id, high_new.id, low_old.id, low_new.id]


async def test_claim_counts_the_attempt_and_leases_the_job(store: JobStore, make_job: MakeJob) -> None:
    job, _ = await store.create(make_job())
    claimed = await store.claim("worker-1", T0 + 10, 30.0)
    assert claimed is not None and claimed.id == job.id
    assert claimed.status is JobStatus.RUNNING
    assert (claimed.attempts, claimed.worker, claimed.lease_until) == (1, "worker-1", T0 + 40)
    assert claimed.started_at == T0 + 10
    assert await store.get(job.id) == claimed
    assert await store.claim("worker-2", T0 + 10, 30.0) is None


async def test_claim_respects_run_after(store: JobStore, make_job: MakeJob) -> None:
    later = make_job(priority=9, run_after=T0 + 100)
    now = make_job(priority=0)
    await store.create(later)
    await store.create(now)
    first = await store.claim("w", T0 + 50, 30.0)
    assert first is not None and first.id == now.id
    assert await store.claim("w", T0 + 50, 30.0) is None
    second = await store.claim("w", T0 + 100, 30.0)
    assert second is not None and second.id == later.id


async def test_claim_is_exclusive_under_concurrent_claimers(
    store: JobStore, make_job: MakeJob, store_path: Path
) -> None:
    jobs = [make_job() for _ in range(30)]
    for job in jobs:
        await store.create(job)
    # A second store on the same data competes too (SQLite: another connection to the file;
    # Redis: another replica).
    others = [await open_another(store, store_path)]
    try:
        stores = [store, *others]

        async def claimer(n: int) -> list[str]:
            got = []
            while (job := await stores[n % len(stores)].claim(f"w{n}", T0 + 10, 30.0)) is not None:
                got.append(job.id)
            return got

        results = await asyncio.gather(*(claimer(n) for n in range(20)))
    finally:
        for other in others:
            await other.close()
    claimed = [job_id for got in results for job_id in got]
    assert sorted(claimed) == sorted(j.id for j in jobs)
    assert len(set(claimed)) == len(claimed)


async def test_mutate_applies_and_returns_the_change(store: JobStore, make_job: MakeJob) -> None:
    job, _ = await store.create(make_job())
    after = await store.mutate(job.id, lambda j: request_cancel(j, T0 + 5))
    assert after.status is JobStatus.CANCELLED
    assert await store.get(job.id) == after


async def test_mutate_that_raises_writes_nothing(store: JobStore, make_job: MakeJob) -> None:
    job, _ = await store.create(make_job())
    events = await store.events_after(job.id, 0)

    def change(j: Job) -> Job:
        transition(j, JobStatus.RUNNING, T0 + 1, worker="w")  # a legal step first...
        return transition(j, JobStatus.COMPLETED, T0 + 2, result="partial")  # ...then an illegal one

    with pytest.raises(InvalidTransition):
        await store.mutate(job.id, change)
    assert await store.get(job.id) == job
    assert await store.events_after(job.id, 0) == events
    # The store stays usable after the rolled-back transaction.
    other, _ = await store.create(make_job())
    assert (await store.mutate(other.id, lambda j: request_cancel(j, T0 + 2))).status is JobStatus.CANCELLED


async def test_mutate_unknown_job_raises_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        await store.mutate("00000000-0000-4000-8000-000000000000", lambda j: j)


async def test_events_record_each_state_and_progress_change(store: JobStore, make_job: MakeJob) -> None:
    job, _ = await store.create(make_job())
    await store.claim("w", T0 + 1, 30.0)
    await store.mutate(
        job.id, lambda j: j.model_copy(update={"progress": Progress(percent=50, message="half")})
    )
    await store.mutate(job.id, lambda j: j.model_copy(update={"lease_until": T0 + 60}))  # invisible: no event
    await store.mutate(job.id, lambda j: transition(j, JobStatus.COMPLETED, T0 + 3, result=1))
    events = await store.events_after(job.id, 0)
    assert [(e.type, e.data["status"]) for e in events] == [
        ("state", "queued"),
        ("state", "running"),
        ("progress", "running"),
        ("state", "completed"),
    ]
    assert events[2].data["progress"] == {"percent": 50.0, "message": "half", "phase": None}
    assert events[1].data["attempts"] == 1
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(e.job_id == job.id for e in events)
    assert [e.id for e in await store.events_after(job.id, ids[1])] == ids[2:]
    assert await store.events_after(job.id, ids[-1]) == []


async def test_failed_event_carries_the_error(store: JobStore, make_job: MakeJob) -> None:
    job, _ = await store.create(make_job())
    await store.claim("w", T0 + 1, 30.0)
    error = JobError(type="upstream_error", message="bad", status=400)
    await store.mutate(job.id, lambda j: transition(j, JobStatus.FAILED, T0 + 2, error=error))
    last = (await store.events_after(job.id, 0))[-1]
    assert last.data["status"] == "failed"
    assert last.data["error"] == {
        "type": "upstream_error",
        "message": "bad",
        "retryable": False,
        "status": 400,
    }


async def test_wait_for_events_wakes_on_a_change(store: JobStore, make_job: MakeJob) -> None:
    job, _ = await store.create(make_job())
    waiter = asyncio.create_task(store.wait_for_events(job.id, 10.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await store.mutate(job.id, lambda j: request_cancel(j, T0 + 1))
    async with asyncio.timeout(2):
        await waiter


async def test_wait_for_events_returns_after_timeout(store: JobStore, make_job: MakeJob) -> None:
    job, _ = await store.create(make_job())
    async with asyncio.timeout(2):
        await store.wait_for_events(job.id, 0.05)


async def test_logs_keep_the_newest_max_log_lines(
    store: JobStore, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "max_log_lines", 5)
    job, _ = await store.create(make_job())
    other, _ = await store.create(make_job())
    for i in range(12):
        await store.append_log(job.id, LogLine(T0 + i, LogLevel.INFO, f"line {i}"))
    await store.append_log(other.id, LogLine(T0, LogLevel.INFO, "other"))
    lines = await store.logs(job.id, LogLevel.DEBUG)
    assert [line.message for line in lines] == [f"line {i}" for i in range(7, 12)]
    assert lines[0].time == T0 + 7 and lines[0].level is LogLevel.INFO
    assert [line.message for line in await store.logs(other.id, LogLevel.DEBUG)] == ["other"]


async def test_logs_filter_by_minimum_level(store: JobStore, make_job: MakeJob) -> None:
    job, _ = await store.create(make_job())
    for level in LogLevel:
        await store.append_log(job.id, LogLine(T0, level, level.name.lower()))
    assert [line.message for line in await store.logs(job.id, LogLevel.WARNING)] == ["warning", "error"]
    assert len(await store.logs(job.id, LogLevel.DEBUG)) == 4
    assert await store.logs("00000000-0000-4000-8000-000000000000", LogLevel.DEBUG) == []


async def test_expired_leases_lists_running_jobs_past_their_lease(store: JobStore, make_job: MakeJob) -> None:
    short, _ = await store.create(make_job(priority=2))
    long, _ = await store.create(make_job(priority=1))
    await store.create(make_job(priority=0))  # stays queued
    await store.claim("w", T0, 5.0)
    await store.claim("w", T0, 50.0)
    assert await store.expired_leases(T0 + 1) == []
    assert await store.expired_leases(T0 + 10) == [short.id]
    assert sorted(await store.expired_leases(T0 + 100)) == sorted([short.id, long.id])


async def test_purge_finished_deletes_only_old_finished_jobs(store: JobStore, make_job: MakeJob) -> None:
    old = finished(make_job(), T0 + 10)
    recent = finished(make_job(), T0 + 100, JobStatus.FAILED)
    queued = make_job()
    running = transition(make_job(), JobStatus.RUNNING, T0 + 1, worker="w", lease_until=T0 + 2)
    for job in (old, recent, queued, running):
        await store.create(job)
        await store.append_log(job.id, LogLine(T0, LogLevel.INFO, "x"))
    assert await store.purge_finished(T0 + 50) == 1
    assert await store.get(old.id) is None
    assert await store.events_after(old.id, 0) == []
    assert await store.logs(old.id, LogLevel.DEBUG) == []
    for kept in (recent, queued, running):
        assert await store.get(kept.id) == kept
        assert await store.logs(kept.id, LogLevel.DEBUG) != []
        assert await store.events_after(kept.id, 0) != []
    assert await store.purge_finished(T0 + 50) == 0


async def test_count_by_status(store: JobStore, make_job: MakeJob) -> None:
    assert all(count == 0 for count in (await store.count_by_status()).values())
    for _ in range(3):
        await store.create(make_job())
    await store.create(finished(make_job(), T0 + 5))
    await store.claim("w", T0 + 10, 30.0)
    counts = await store.count_by_status()
    assert counts.get(JobStatus.QUEUED) == 2
    assert counts.get(JobStatus.RUNNING) == 1
    assert counts.get(JobStatus.COMPLETED) == 1
    assert counts.get(JobStatus.FAILED, 0) == 0


async def test_ping_answers_when_open(store: JobStore) -> None:
    await store.ping()


async def test_reopened_sqlite_store_sees_everything(store_path: Path, make_job: MakeJob) -> None:
    first = await open_sqlite(store_path)
    job, _ = await first.create(make_job(idempotency_key="k", request_hash="h"))
    claimed = await first.claim("w", T0 + 1, 30.0)
    await first.mutate(job.id, lambda j: j.model_copy(update={"progress": Progress(percent=10)}))
    await first.append_log(job.id, LogLine(T0 + 2, LogLevel.WARNING, "careful"))
    events = await first.events_after(job.id, 0)
    stored = await first.get(job.id)
    await first.close()

    second = await open_sqlite(store_path)
    try:
        assert claimed is not None
        assert await second.get(job.id) == stored
        assert await second.events_after(job.id, 0) == events
        assert [line.message for line in await second.logs(job.id, LogLevel.DEBUG)] == ["careful"]
        again, created = await second.create(make_job(idempotency_key="k", request_hash="h"))
        assert not created and again.id == job.id
        assert await second.expired_leases(T0 + 100) == [job.id]
    finally:
        await second.close()
