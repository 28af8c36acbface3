"""JobRunner end to end: a real SQLite store, a real gateway and real upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from jobs_api.app import create_app
from jobs_api.auth import Authenticator
from jobs_api.handlers import HandlerRegistry, JobContext
from jobs_api.job_types import default_registry
from jobs_api.metrics import JobsMetrics
from jobs_api.models import Job, JobStatus, request_cancel
from jobs_api.runner import JobRunner
from jobs_api.store.base import JobStore, LogLevel
from jobs_api.store.redis import RedisJobStore
from jobs_api.store.sqlite import SqliteJobStore
from tests.conftest import AiohttpServer, MockUpstream, StartMock
from tests.jobs_api.conftest import (
    DEFAULT_TEST_REDIS_URL,
    JobsSettingsFactory,
    MakeJob,
    StartJobsGateway,
    open_sqlite,
)

# A gateway that forwards each request once and never ejects: every job attempt is one upstream call.
ONE_SHOT = {"retry": {"max_attempts": 1}, "outlier": {"consecutive_failures": 100}, "strategy": "priority"}


@dataclass
class RunningRunner:
    """A started runner and the registry its metrics live on."""

    runner: JobRunner
    registry: CollectorRegistry

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


StartRunner = Callable[..., Awaitable[RunningRunner]]


@pytest.fixture
async def start_runner(store: JobStore, jobs_settings: JobsSettingsFactory) -> AsyncIterator[StartRunner]:
    """`await start_runner(gateway_url, concurrency=1)`: a started runner, stopped after the test."""
    started: list[JobRunner] = []

    async def start(
        gateway_url: str,
        *,
        registry: HandlerRegistry | None = None,
        worker_id: str | None = None,
        **overrides: Any,
    ) -> RunningRunner:
        settings = jobs_settings(gateway_url=gateway_url, **overrides)
        prom = CollectorRegistry()
        runner = JobRunner(
            store,
            settings,
            registry or default_registry(settings.handlers),
            JobsMetrics(prom),
            worker_id=worker_id,
            rng=random.Random(0),
        )
        await runner.start()
        started.append(runner)
        return RunningRunner(runner, prom)

    yield start
    for runner in started:
        await runner.stop()


async def submit(store: JobStore, make_job: MakeJob, runner: JobRunner | None = None, **fields: Any) -> Job:
    """Store a job created now (real time), and wake the runner."""
    now = time.time()
    job, _ = await store.create(make_job(created_at=now, **fields))
    if runner is not None:
        runner.wake()
    return job


def inference(path: str = "/v1/chat/completions", body: Any = None, **extra: Any) -> dict[str, Any]:
    """An inference job input."""
    default = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}
    return {"method": "POST", "path": path, "body": default if body is None else body, **extra}


async def wait_status(store: JobStore, job_id: str, *statuses: JobStatus, timeout_s: float = 10.0) -> Job:
    """The job once it is in one of `statuses`."""
    async with asyncio.timeout(timeout_s):
        while True:
            job = await store.get(job_id)
            assert job is not None, f"job {job_id} vanished"
            if job.status in statuses:
                return job
            await store.wait_for_events(job_id, 0.05)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Return once `predicate()` holds; fail after `timeout_s`."""
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout_s} s")


@dataclass
class Scripted:
    """An upstream answering a script of statuses (then 200s), tracking calls and concurrency."""

    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    delay_s: float = 0.0
    calls: list[float] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            await request.read()
            self.calls.append(time.monotonic())
            n = len(self.calls)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            finally:
                self.inflight -= 1
            if n <= len(self.statuses) and self.statuses[n - 1] != 200:
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                body = {"error": {"message": f"scripted {self.statuses[n - 1]}", "type": "scripted"}}
                return web.json_response(body, status=self.statuses[n - 1], headers=headers)
            return web.json_response({"call": n, "path": request.path})

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_route("*", "/{tail:.*}", answer)
        return app


StartScripted = Callable[..., Awaitable[tuple[Scripted, str]]]


@pytest.fixture
def start_scripted(aiohttp_server: AiohttpServer, start_jobs_gateway: StartJobsGateway) -> StartScripted:
    """`script, gateway_url = await start_scripted(statuses=[503, 200])`: behind a one-shot gateway."""

    async def start(**script: Any) -> tuple[Scripted, str]:
        scripted = Scripted(**script)
        server = await aiohttp_server(scripted.app())
        url = str(server.make_url("")).rstrip("/")
        return scripted, await start_jobs_gateway(f"s={url}", **ONE_SHOT)

    return start


# --- end to end --------------------------------------------------------------------------------


async def test_runner_completes_an_inference_job(
    store: JobStore,
    make_job: MakeJob,
    gateway_url: str,
    mocks: tuple[MockUpstream, MockUpstream],
    start_runner: StartRunner,
) -> None:
    r = await start_runner(gateway_url)
    job = await submit(store, make_job, r.runner, input=inference())
    done = await wait_status(store, job.id, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.status is JobStatus.COMPLETED, done.error
    assert done.attempts == 1 and done.error is None and done.progress.percent == 100
    result = done.result
    assert result["status"] == 200 and result["upstream"] == "a"
    assert result["body"]["object"] == "chat.completion"
    assert result["headers"]["x-gateway-upstream"] == "a"
    assert mocks[0].stats.requests == 1
    assert r.sample("jobs_finished_total", {"type": "inference", "status": "completed"}) == 1
    assert r.sample("jobs_attempts_total", {"type": "inference", "outcome": "success"}) == 1
    assert r.sample("jobs_duration_seconds_count", {"type": "inference"}) == 1
    assert r.sample("jobs_running") == 0
    lines = await store.logs(job.id, LogLevel.DEBUG)
    assert [line.message for line in lines] == ["attempt 1 completed"]
    assert [e.data["status"] for e in await store.events_after(job.id, 0)] == [
        "queued",
        "running",
        "completed",
    ]


async def test_runner_retries_with_backoff_honouring_retry_after(
    store: JobStore, make_job: MakeJob, start_scripted: StartScripted, start_runner: StartRunner
) -> None:
    script, url = await start_scripted(statuses=[503, 502, 200], retry_after="1")
    r = await start_runner(url)
    job = await submit(store, make_job, r.runner, input=inference())
    done = await wait_status(store, job.id, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.status is JobStatus.COMPLETED, done.error
    assert done.attempts == 3 and done.result["body"] == {"call": 3, "path": "/v1/chat/completions"}
    assert done.error is None
    gaps = [b - a for a, b in zip(script.calls, script.calls[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps  # Retry-After: 1 beats the 0.05 s backoff cap
    assert r.sample("jobs_attempts_total", {"type": "inference", "outcome": "retry"}) == 2
    assert r.sample("jobs_attempts_total", {"type": "inference", "outcome": "success"}) == 1
    warnings = await store.logs(job.id, LogLevel.WARNING)
    assert len(warnings) == 2 and "upstream answered 503" in warnings[0].message
    retried = [e for e in await store.events_after(job.id, 0) if e.data["status"] == "queued"][1:]
    assert [e.data["error"]["status"] for e in retried] == [503, 502]


async def test_runner_gives_up_after_max_attempts(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
) -> None:
    flaky = await start_mock("flaky", error_rate=1.0, error_status=503)
    r = await start_runner(await start_jobs_gateway(flaky, **ONE_SHOT))
    job = await submit(store, make_job, r.runner, input=inference(), max_attempts=3)
    done = await wait_status(store, job.id, JobStatus.FAILED, JobStatus.COMPLETED)
    assert done.status is JobStatus.FAILED and done.attempts == 3
    assert done.error is not None and done.error.retryable and done.error.status == 503
    assert "gave up after 3 of 3 attempts" in done.error.message
    assert flaky.stats.requests == 3


async def test_runner_fails_a_client_error_at_once_with_the_upstream_excerpt(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
) -> None:
    bad = await start_mock("bad")
    r = await start_runner(await start_jobs_gateway(bad, **ONE_SHOT))
    # The mock answers 400 for an embeddings request without a usable `input`.
    job = await submit(store, make_job, r.runner, input=inference("/v1/embeddings", {"input": 5}))
    done = await wait_status(store, job.id, JobStatus.FAILED, JobStatus.COMPLETED)
    assert done.status is JobStatus.FAILED and done.attempts == 1
    assert done.error is not None
    assert (done.error.type, done.error.status, done.error.retryable) == ("upstream_error", 400, False)
    assert "'input' must be a string or a non-empty list of strings" in done.error.message
    assert bad.stats.requests == 1
    assert r.sample("jobs_finished_total", {"type": "inference", "status": "failed"}) == 1


async def test_runner_gateway_unreachable_is_retried_then_fails(
    store: JobStore, make_job: MakeJob, refused_url: str, start_runner: StartRunner
) -> None:
    r = await start_runner(refused_url)
    job = await submit(store, make_job, r.runner, input=inference(), max_attempts=2)
    done = await wait_status(store, job.id, JobStatus.FAILED)
    assert done.attempts == 2
    assert done.error is not None and done.error.type == "gateway_unreachable" and done.error.retryable


async def test_runner_times_out_a_slow_job_and_closes_its_request(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
) -> None:
    slow = await start_mock("slow", latency_s=30)
    r = await start_runner(await start_jobs_gateway(slow, **ONE_SHOT))
    job = await submit(store, make_job, r.runner, input=inference(), timeout_s=0.5)
    done = await wait_status(store, job.id, JobStatus.TIMED_OUT, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.status is JobStatus.TIMED_OUT
    assert done.finished_at is not None and done.finished_at - done.created_at < 2.0
    assert done.error is not None and done.error.type == "timeout"
    await wait_for(lambda: slow.stats.disconnects == 1)
    assert r.sample("jobs_finished_total", {"type": "inference", "status": "timed_out"}) == 1


async def test_runner_times_out_a_job_claimed_past_its_deadline(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    job, _ = await store.create(make_job(created_at=time.time() - 100, timeout_s=10, input=inference()))
    await start_runner(gateway_url)
    done = await wait_status(store, job.id, JobStatus.TIMED_OUT, JobStatus.COMPLETED)
    assert done.status is JobStatus.TIMED_OUT


async def test_sweep_times_out_queued_jobs_past_their_deadline(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    late = await submit(store, make_job, timeout_s=0.2, run_after=time.time() + 3600)
    fine = await submit(store, make_job, run_after=time.time() + 3600)
    r = await start_runner(gateway_url)
    await asyncio.sleep(0.3)
    await r.runner.sweep_queued()
    assert (await wait_status(store, late.id, JobStatus.TIMED_OUT)).error is not None
    assert (await store.get(fine.id)).status is JobStatus.QUEUED  # type: ignore[union-attr]


async def hanging_job(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
    **settings: Any,
) -> tuple[MockUpstream, RunningRunner, Job]:
    """A runner whose one job hangs in its upstream request."""
    hung = await start_mock("hung", hang=True)
    r = await start_runner(await start_jobs_gateway(hung, **ONE_SHOT), **settings)
    job = await submit(store, make_job, r.runner, input=inference())
    await wait_status(store, job.id, JobStatus.RUNNING)
    await wait_for(lambda: hung.stats.requests == 1)
    return hung, r, job


async def test_cancel_local_stops_a_running_job_at_once(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
) -> None:
    hung, r, job = await hanging_job(
        store, make_job, start_mock, start_jobs_gateway, start_runner, lease_s=30
    )
    assert r.sample("jobs_running") == 1
    started = time.monotonic()
    await store.mutate(job.id, lambda j: request_cancel(j, time.time()))
    r.runner.cancel_local(job.id)
    done = await wait_status(store, job.id, JobStatus.CANCELLED, timeout_s=2)
    assert time.monotonic() - started < 0.5  # not waiting for the 1 s watch poll
    assert done.cancel_requested and done.worker is None
    await wait_for(lambda: hung.stats.disconnects == 1)
    assert r.sample("jobs_attempts_total", {"type": "inference", "outcome": "cancelled"}) == 1
    assert r.sample("jobs_running") == 0


async def test_cancel_through_the_store_reaches_the_running_job(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
) -> None:
    # Another process's API flagged the job: only the store knows.
    hung, r, job = await hanging_job(
        store, make_job, start_mock, start_jobs_gateway, start_runner, lease_s=30
    )
    await store.mutate(job.id, lambda j: request_cancel(j, time.time()))
    await wait_status(store, job.id, JobStatus.CANCELLED, timeout_s=2.5)
    await wait_for(lambda: hung.stats.disconnects == 1)


async def test_cooperative_handler_sees_the_cancel_signal(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    seen: list[bool] = []

    async def patient(ctx: JobContext) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            seen.append(ctx.cancelled.is_set())

    registry = default_registry()
    registry.register("patient", patient)
    r = await start_runner(gateway_url, registry=registry)
    job = await submit(store, make_job, r.runner, type="patient", input={})
    await wait_status(store, job.id, JobStatus.RUNNING)
    await store.mutate(job.id, lambda j: request_cancel(j, time.time()))
    r.runner.cancel_local(job.id)
    await wait_status(store, job.id, JobStatus.CANCELLED, timeout_s=2)
    assert seen == [True]


async def test_batch_runs_items_within_parallel_limit_in_order(
    store: JobStore, make_job: MakeJob, start_scripted: StartScripted, start_runner: StartRunner
) -> None:
    script, url = await start_scripted(statuses=[200, 200, 400], delay_s=0.05)
    r = await start_runner(url)
    items = [inference(f"/v1/item/{i}") for i in range(7)]
    job = await submit(store, make_job, r.runner, type="batch", input={"items": items, "parallel_limit": 2})
    done = await wait_status(store, job.id, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.status is JobStatus.COMPLETED
    assert script.max_inflight == 2 and len(script.calls) == 7
    result = done.result
    assert (result["completed"], result["failed"]) == (6, 1)
    assert [item["index"] for item in result["items"]] == list(range(7))
    by_status = {item["index"]: item["status"] for item in result["items"]}
    assert list(by_status.values()).count("failed") == 1
    for item in result["items"]:
        if item["status"] == "completed":
            assert item["result"]["body"]["path"] == f"/v1/item/{item['index']}"
        else:
            assert item["error"]["status"] == 400 and not item["error"]["retryable"]
    assert done.progress.message == "6 completed, 1 failed, 7 total" and done.progress.percent == 100
    progress = [
        e.data["progress"]["percent"] for e in await store.events_after(job.id, 0) if e.type == "progress"
    ]
    assert progress == sorted(progress) and len(progress) >= 6


async def test_batch_retries_items_on_their_own(
    store: JobStore, make_job: MakeJob, start_scripted: StartScripted, start_runner: StartRunner
) -> None:
    script, url = await start_scripted(statuses=[503])
    r = await start_runner(url)
    items = [inference("/v1/a"), inference("/v1/b")]
    job = await submit(store, make_job, r.runner, type="batch", input={"items": items, "parallel_limit": 1})
    done = await wait_status(store, job.id, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.attempts == 1 and done.result["completed"] == 2 and len(script.calls) == 3


async def test_batch_fail_fast_skips_the_rest_and_fails_the_job(
    store: JobStore, make_job: MakeJob, start_scripted: StartScripted, start_runner: StartRunner
) -> None:
    script, url = await start_scripted(statuses=[200, 404])
    r = await start_runner(url)
    items = [inference(f"/v1/item/{i}") for i in range(5)]
    job_input = {"items": items, "parallel_limit": 1, "fail_fast": True}
    job = await submit(store, make_job, r.runner, type="batch", input=job_input)
    done = await wait_status(store, job.id, JobStatus.FAILED, JobStatus.COMPLETED)
    assert done.status is JobStatus.FAILED and done.attempts == 1
    assert done.error is not None and done.error.type == "batch_item_failed" and done.error.status == 404
    assert done.error.message.startswith("batch item 1 failed")
    assert [item["status"] for item in done.result["items"]] == [
        "completed",
        "failed",
        "skipped",
        "skipped",
        "skipped",
    ]
    assert len(script.calls) == 2


async def test_pipeline_example_runs_its_three_phases(
    store: JobStore,
    make_job: MakeJob,
    gateway_url: str,
    mocks: tuple[MockUpstream, MockUpstream],
    start_runner: StartRunner,
) -> None:
    r = await start_runner(gateway_url, handlers=("jobs_api.examples.pipeline",))
    documents = ["WAL lets readers run during writes.", "Bananas are yellow.", "Leases expire."]
    job_input = {"question": "What is WAL?", "documents": documents, "top_k": 2}
    job = await submit(store, make_job, r.runner, type="pipeline", input=job_input)
    done = await wait_status(store, job.id, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.status is JobStatus.COMPLETED, done.error
    result = done.result
    assert len(result["retrieve"]["documents"]) == 2 and set(result["retrieve"]["documents"]) <= set(
        documents
    )
    assert result["retrieve"]["scores"] == sorted(result["retrieve"]["scores"], reverse=True)
    assert result["generate"]["answer"] and result["generate"]["upstream"] == "a"
    assert result["summarize"]["summary"] and result["summarize"]["upstream"] == "a"
    assert mocks[0].stats.requests == 3
    phases = [
        e.data["progress"]["phase"] for e in await store.events_after(job.id, 0) if e.type == "progress"
    ]
    assert phases[:3] == ["retrieve", "generate", "summarize"]
    assert any("retrieved 2 of 3" in line.message for line in await store.logs(job.id, LogLevel.INFO))


async def test_runner_takes_highest_priority_first_then_oldest(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    jobs = [await submit(store, make_job, priority=p, input=inference()) for p in (0, 5, 1, 5)]
    await start_runner(gateway_url, concurrency=1)
    done = [await wait_status(store, j.id, JobStatus.COMPLETED) for j in jobs]
    order = [j.id for j in sorted(done, key=lambda j: j.started_at or 0)]
    assert order == [jobs[1].id, jobs[3].id, jobs[2].id, jobs[0].id]


async def test_wake_starts_a_submitted_job_before_the_next_poll(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    r = await start_runner(gateway_url, poll_interval_s=30)
    await asyncio.sleep(0.05)  # the workers are idle, waiting
    job = await submit(store, make_job, r.runner, input=inference())
    await wait_status(store, job.id, JobStatus.COMPLETED, timeout_s=2)


async def test_crashed_workers_job_is_requeued_and_finished(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    job = await submit(store, make_job, input=inference())
    # A worker claimed it and died (kill -9): its lease runs out and nobody renews it.
    dead = await store.claim("dead-worker", time.time(), 0.05)
    assert dead is not None and dead.id == job.id and dead.attempts == 1
    await asyncio.sleep(0.1)
    r = await start_runner(gateway_url)
    done = await wait_status(store, job.id, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.status is JobStatus.COMPLETED and done.attempts == 2
    requeued = [e for e in await store.events_after(job.id, 0) if e.data["status"] == "queued"][1:]
    assert requeued and requeued[0].data["error"]["type"] == "worker_lost"
    assert r.sample("jobs_attempts_total", {"type": "inference", "outcome": "lost"}) == 1


async def test_crashed_workers_job_on_its_last_attempt_fails(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    job = await submit(store, make_job, input=inference(), max_attempts=1)
    await store.claim("dead-worker", time.time(), 0.05)
    await asyncio.sleep(0.1)
    await start_runner(gateway_url)
    done = await wait_status(store, job.id, JobStatus.FAILED)
    assert done.attempts == 1 and done.error is not None and done.error.type == "worker_lost"


async def test_lease_expiring_while_running_is_noticed_by_the_sweeper(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    job = await submit(store, make_job, input=inference())
    await store.claim("dead-worker", time.time(), 0.5)  # still valid when the runner starts
    await start_runner(gateway_url, lease_s=0.6)
    done = await wait_status(store, job.id, JobStatus.COMPLETED, timeout_s=5)
    assert done.attempts == 2


async def test_running_jobs_lease_is_renewed(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
) -> None:
    hung, r, job = await hanging_job(
        store, make_job, start_mock, start_jobs_gateway, start_runner, lease_s=0.6
    )
    first = await store.get(job.id)
    await asyncio.sleep(1.5)  # more than two leases
    later = await store.get(job.id)
    assert first is not None and later is not None and first.lease_until is not None
    assert later.status is JobStatus.RUNNING and later.attempts == 1
    assert later.lease_until is not None and later.lease_until > first.lease_until + 0.5
    assert hung.stats.requests == 1


async def test_a_worker_that_cannot_renew_its_sqlite_lease_stops_by_the_deadline(
    store_path: Path, jobs_settings: JobsSettingsFactory, refused_url: str, make_job: MakeJob
) -> None:
    """Another connection holds the SQLite write lock, so renewals wait (busy_timeout) and fail:
    the attempt stops before its lease runs out, records nothing, and the job runs again."""
    store = await open_sqlite(store_path)
    seen: list[tuple[str, float]] = []

    async def stalls_once(ctx: JobContext) -> str:
        seen.append(("started", time.monotonic()))
        if ctx.job.attempts == 1:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen.append(("cancelled", time.monotonic()))
                raise
        return "done"

    registry = HandlerRegistry()
    registry.register("work", stalls_once)
    lease_s = 1.0
    settings = jobs_settings(gateway_url=refused_url, lease_s=lease_s, concurrency=1)
    runner = JobRunner(store, settings, registry, JobsMetrics(CollectorRegistry()), worker_id="w1")
    locker = sqlite3.connect(store_path, isolation_level=None, timeout=0)
    try:
        await runner.start()
        job = await submit(store, make_job, runner, type="work", input={})
        await wait_for(lambda: bool(seen))
        await asyncio.sleep(lease_s)  # renewals go through while the file is writable
        locker.execute("BEGIN IMMEDIATE")
        locked_at = time.monotonic()
        await wait_for(lambda: len(seen) == 2, timeout_s=3 * lease_s)
        assert seen[1][0] == "cancelled" and seen[1][1] - locked_at < lease_s, seen[1][1] - locked_at
        locker.execute("ROLLBACK")
        done = await wait_status(store, job.id, JobStatus.COMPLETED, JobStatus.FAILED, timeout_s=10)
        assert done.status is JobStatus.COMPLETED and done.attempts == 2 and done.result == "done"
        assert [kind for kind, _ in seen] == ["started", "cancelled", "started"]
        queued = [e for e in await store.events_after(job.id, 0) if e.data["status"] == "queued"]
        assert queued[1].data["error"]["type"] == "worker_lost"  # the sweep requeued it
    finally:
        locker.close()
        await runner.stop()
        await store.close()


async def test_stop_interrupts_and_requeues_running_jobs(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
) -> None:
    hung, r, job = await hanging_job(
        store, make_job, start_mock, start_jobs_gateway, start_runner, shutdown_grace_s=0.1
    )
    await r.runner.stop()
    stopped = await store.get(job.id)
    assert stopped is not None and stopped.status is JobStatus.QUEUED
    assert stopped.attempts == 1 and stopped.worker is None
    assert stopped.error is not None and stopped.error.type == "interrupted"
    await wait_for(lambda: hung.stats.disconnects == 1)
    # The next process finishes it.
    hung.behaviour.hang = False
    await start_runner(r.runner.settings.gateway_url)
    done = await wait_status(store, job.id, JobStatus.COMPLETED)
    assert done.attempts == 2 and done.error is None


async def test_stop_lets_running_jobs_finish_within_the_grace(
    store: JobStore,
    make_job: MakeJob,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    start_runner: StartRunner,
) -> None:
    slow = await start_mock("slow", latency_s=0.3)
    r = await start_runner(await start_jobs_gateway(slow, **ONE_SHOT), shutdown_grace_s=5)
    job = await submit(store, make_job, r.runner, input=inference())
    await wait_status(store, job.id, JobStatus.RUNNING)
    later = await submit(store, make_job, input=inference())
    await r.runner.stop()
    assert (await store.get(job.id)).status is JobStatus.COMPLETED  # type: ignore[union-attr]
    # Stopping means no new claims.
    assert (await store.get(later.id)).status is JobStatus.QUEUED  # type: ignore[union-attr]


async def test_finished_jobs_are_purged_after_retention(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    r = await start_runner(gateway_url, retention_s=0.3)
    job = await submit(store, make_job, r.runner, input=inference())
    queued = await submit(store, make_job, input=inference(), run_after=time.time() + 3600)
    await wait_status(store, job.id, JobStatus.COMPLETED)
    for _ in range(100):
        if await store.get(job.id) is None:
            break
        await asyncio.sleep(0.05)
    assert await store.get(job.id) is None, "not purged within 5 s"
    assert await store.events_after(job.id, 0) == []
    assert await store.get(queued.id) is not None


async def test_handler_bug_fails_the_job_without_leaking_the_traceback(
    store: JobStore,
    make_job: MakeJob,
    gateway_url: str,
    start_runner: StartRunner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def buggy(ctx: JobContext) -> None:
        raise ValueError("secret internals")

    async def not_json(ctx: JobContext) -> object:
        return object()

    registry = default_registry()
    registry.register("buggy", buggy)
    registry.register("not-json", not_json)
    r = await start_runner(gateway_url, registry=registry)
    with caplog.at_level(logging.ERROR, logger="jobs_api.runner"):
        bug = await submit(store, make_job, r.runner, type="buggy", input={})
        odd = await submit(store, make_job, r.runner, type="not-json", input={})
        done = await wait_status(store, bug.id, JobStatus.FAILED)
        odd_done = await wait_status(store, odd.id, JobStatus.FAILED)
    assert done.error is not None and done.error.type == "handler_error" and done.attempts == 1
    assert "ValueError" in done.error.message and "secret" not in done.error.message
    assert odd_done.error is not None and "not JSON" in odd_done.error.message
    assert any(rec.exc_info and "secret internals" in str(rec.exc_info[1]) for rec in caplog.records)
    assert all("secret" not in line.message for line in await store.logs(bug.id, LogLevel.DEBUG))


async def test_unknown_job_type_fails(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    r = await start_runner(gateway_url)
    job = await submit(store, make_job, r.runner, type="ghost", input={})
    done = await wait_status(store, job.id, JobStatus.FAILED)
    assert done.error is not None and done.error.type == "unknown_type"


async def test_custom_handler_progress_and_logs_are_persisted_as_it_runs(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    release = asyncio.Event()

    async def stepwise(ctx: JobContext) -> dict[str, int]:
        await ctx.log("info", "starting")
        await ctx.progress(50, "half way", phase="one")
        await release.wait()
        return {"attempt": ctx.job.attempts}

    registry = default_registry()
    registry.register("stepwise", stepwise)
    r = await start_runner(gateway_url, registry=registry)
    job = await submit(store, make_job, r.runner, type="stepwise", input={})
    async with asyncio.timeout(5):
        while (current := await store.get(job.id)) is None or current.progress.percent != 50:
            await store.wait_for_events(job.id, 0.05)
    assert current.status is JobStatus.RUNNING and current.progress.phase == "one"
    assert [line.message for line in await store.logs(job.id, LogLevel.INFO)] == ["starting"]
    assert r.sample("jobs_running") == 1
    release.set()
    done = await wait_status(store, job.id, JobStatus.COMPLETED)
    assert done.result == {"attempt": 1}
    assert r.sample("jobs_running") == 0


async def test_queued_gauge_follows_the_store(
    store: JobStore, make_job: MakeJob, gateway_url: str, start_runner: StartRunner
) -> None:
    for _ in range(3):
        await submit(store, make_job, input=inference(), run_after=time.time() + 3600)
    r = await start_runner(gateway_url)
    assert r.sample("jobs_queued") == 3
    await submit(store, make_job, input=inference(), run_after=time.time() + 3600)
    await r.runner.refresh_queued()
    assert r.sample("jobs_queued") == 4


async def test_runner_runs_jobs_concurrently(
    store: JobStore, make_job: MakeJob, start_scripted: StartScripted, start_runner: StartRunner
) -> None:
    script, url = await start_scripted(delay_s=0.2)
    r = await start_runner(url, concurrency=3)
    jobs = [await submit(store, make_job, r.runner, input=inference()) for _ in range(6)]
    for job in jobs:
        await wait_status(store, job.id, JobStatus.COMPLETED)
    assert script.max_inflight == 3


async def test_start_refuses_a_gateway_url_with_a_path(
    store: JobStore, jobs_settings: JobsSettingsFactory
) -> None:
    settings = jobs_settings(gateway_url="http://127.0.0.1:8080/gw")
    runner = JobRunner(store, settings, default_registry(), JobsMetrics(CollectorRegistry()))
    with pytest.raises(ValueError, match="has a path; give the gateway's origin"):
        await runner.start()
    await runner.stop()


def test_runner_stores_and_app_are_whole_before_the_loop_runs(
    jobs_settings: JobsSettingsFactory, store_path: Path
) -> None:
    """Nothing needs a running loop to be built; the loop is only needed by start() and open()."""
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    settings = jobs_settings()
    registry = default_registry()
    for store in (SqliteJobStore(store_path), RedisJobStore.from_url(DEFAULT_TEST_REDIS_URL)):
        JobRunner(store, settings, registry, JobsMetrics(CollectorRegistry()))
    Authenticator(settings)
    create_app(settings, registry=registry, registry_metrics=CollectorRegistry())
