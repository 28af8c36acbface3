"""SQLite writes under cancellation and a full database: every exit ends the transaction.

Real files in tmp_path; "another process" is a plain sqlite3 connection to the same file, holding
the write lock the way a second jobs-api process (or `sqlite3 jobs.db`) would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from jobs_api.errors import StoreUnavailable
from jobs_api.handlers import JobContext
from jobs_api.job_types import default_registry
from jobs_api.metrics import JobsMetrics
from jobs_api.models import TERMINAL, Job, JobStatus, Progress, request_cancel
from jobs_api.runner import JobRunner
from jobs_api.store.base import LogLevel, LogLine
from jobs_api.store.sqlite import SqliteJobStore
from tests.conftest import AiohttpClient
from tests.jobs_api.conftest import T0, JobsSettingsFactory, MakeJob, open_sqlite
from tests.jobs_api.test_routes import StartJobs, inference, jobs_starter
from tests.jobs_api.test_runner import wait_status


@pytest.fixture
def other_process(store_path: Path) -> Iterator[sqlite3.Connection]:
    """A second connection to the store's file that never waits for a lock (timeout 0)."""
    conn = sqlite3.connect(store_path, isolation_level=None, timeout=0)
    try:
        yield conn
    finally:
        conn.close()


def can_write(conn: sqlite3.Connection) -> bool:
    """True when `conn` gets the write lock at once: nobody else holds a transaction open."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return False
    conn.execute("ROLLBACK")
    return True


async def test_write_cancelled_while_waiting_in_begin_leaves_no_transaction(
    store_path: Path, make_job: MakeJob, other_process: sqlite3.Connection
) -> None:
    store = await open_sqlite(store_path)
    try:
        other_process.execute("BEGIN IMMEDIATE")  # the other process writes: our BEGIN waits
        task = asyncio.create_task(store.create(make_job()))
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        await asyncio.sleep(0.05)
        other_process.execute("ROLLBACK")  # now the cancelled BEGIN gets the lock on its thread
        with pytest.raises(asyncio.CancelledError):
            await task

        job, created = await store.create(make_job())
        assert created and await store.get(job.id) == job
        assert can_write(other_process), "the store still holds a transaction open"
        await store.ping()
    finally:
        await store.close()


@pytest.mark.parametrize("verb", ["create", "claim", "mutate", "append_log"])
async def test_write_cancelled_at_any_point_ends_its_transaction(
    store_path: Path, make_job: MakeJob, other_process: sqlite3.Connection, verb: str
) -> None:
    store = await open_sqlite(store_path)
    try:
        target, _ = await store.create(make_job())

        def write() -> Any:
            if verb == "create":
                return store.create(make_job())
            if verb == "claim":
                return store.claim("w", T0 + 1, 30.0)
            if verb == "append_log":
                return store.append_log(target.id, LogLine(T0, LogLevel.INFO, "x"))
            return store.mutate(
                target.id, lambda j: j.model_copy(update={"progress": Progress(percent=1), "updated_at": T0})
            )

        # Cancel after 1, 2, 3, ... turns of the loop: the cancellation lands on each await of the
        # write in turn (BEGIN, the statements, COMMIT) and, later, after the write finished.
        for turns in range(1, 40):
            task = asyncio.create_task(write())
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.ping()  # queued behind whatever the cancelled write left on the thread
            assert not store.db.in_transaction, f"transaction left open after {turns} turns"
            assert can_write(other_process), f"write lock held after {turns} turns"
        # And the store still works normally.
        job, created = await store.create(make_job())
        assert created
        assert (await store.mutate(job.id, lambda j: request_cancel(j, T0 + 9))).status.value == "cancelled"
    finally:
        await store.close()


async def fill(store: SqliteJobStore) -> None:
    """Make the database full: it may not grow by a single page (SQLITE_FULL on the next growth)."""
    (pages,) = next(iter(await store.db.execute_fetchall("PRAGMA page_count")))
    await store.db.execute(f"PRAGMA max_page_count = {int(pages)}")


async def unfill(store: SqliteJobStore) -> None:
    await store.db.execute("PRAGMA max_page_count = 1073741823")


def big_job(make_job: MakeJob) -> Job:
    return make_job(metadata={"blob": "x" * 50_000})


async def test_full_database_is_store_unavailable_and_not_ready_until_it_has_room(
    store_path: Path, make_job: MakeJob
) -> None:
    store = await open_sqlite(store_path)
    try:
        await store.create(make_job())
        await fill(store)
        with pytest.raises(StoreUnavailable, match="full"):
            await store.create(big_job(make_job))
        with pytest.raises(StoreUnavailable, match="full"):
            await store.ping()
        await unfill(store)
        await store.ping()  # a write works again: ready again without waiting for traffic
        job, created = await store.create(big_job(make_job))
        assert created and await store.get(job.id) == job
    finally:
        await store.close()


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    return jobs_starter(aiohttp_client, jobs_settings)


@pytest.fixture
def start_cancelling_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """Jobs apps served like `jobs-api serve` does: a client that leaves cancels its handler."""

    async def client(app: Any, **kwargs: Any) -> Any:
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True}, **kwargs)

    return jobs_starter(client, jobs_settings)


async def test_client_that_gives_up_during_a_slow_write_does_not_freeze_submissions(
    start_cancelling_jobs: StartJobs, other_process: sqlite3.Connection
) -> None:
    jobs = await start_cancelling_jobs(start_runner=False)
    assert (await jobs.client.post("/v1/jobs", json=inference())).status == 202
    other_process.execute("BEGIN IMMEDIATE")  # another process is writing for a while
    try:
        with pytest.raises(asyncio.TimeoutError):
            await jobs.client.post("/v1/jobs", json=inference(), timeout=0.3)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
    finally:
        other_process.execute("ROLLBACK")
    await asyncio.sleep(0.1)

    for _ in range(3):
        resp = await jobs.client.post("/v1/jobs", json=inference())
        assert resp.status == 202, await resp.text()
    assert (await jobs.client.get("/readyz")).status == 200
    assert can_write(other_process)


async def test_full_database_answers_503_and_readyz_fails_until_it_has_room(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    store = jobs.store
    assert isinstance(store, SqliteJobStore)
    assert (await jobs.client.post("/v1/jobs", json=inference())).status == 202
    await fill(store)
    big = inference(metadata={"blob": "x" * 50_000})

    resp = await jobs.client.post("/v1/jobs", json=big)
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["error"]["type"] == "store_unavailable"
    resp = await jobs.client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "store_unavailable"
    assert (await jobs.client.get("/readyz")).status == 503  # still full: still not ready

    await unfill(store)
    assert (await jobs.client.get("/readyz")).status == 200
    assert (await jobs.client.post("/v1/jobs", json=big)).status == 202
    assert (await jobs.client.get("/readyz")).status == 200


async def test_outcome_reached_while_the_database_is_full_is_recorded_once_it_has_room(
    store_path: Path, make_job: MakeJob, jobs_settings: JobsSettingsFactory
) -> None:
    release = asyncio.Event()

    async def big_answer(ctx: JobContext) -> dict[str, str]:
        await release.wait()
        return {"text": "y" * 100_000}

    registry = default_registry()
    registry.register("big-answer", big_answer)
    store = await open_sqlite(store_path)
    runner = JobRunner(
        store, jobs_settings(lease_s=5.0, concurrency=1), registry, JobsMetrics(CollectorRegistry())
    )
    await runner.start()
    try:
        job, _ = await store.create(make_job(type="big-answer", input={}, created_at=time.time()))
        runner.wake()
        await wait_status(store, job.id, JobStatus.RUNNING)
        await fill(store)
        release.set()
        await asyncio.sleep(0.5)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        still = await store.get(job.id)
        assert still is not None and still.status is JobStatus.RUNNING
        await unfill(store)
        done = await wait_status(store, job.id, *TERMINAL)
        assert done.status is JobStatus.COMPLETED, done.error
        assert done.attempts == 1  # the outcome was kept, not dropped and the job run again
        assert done.result == {"text": "y" * 100_000}
    finally:
        await runner.stop()
        await store.close()
