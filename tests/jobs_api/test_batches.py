"""GET /v1/batches/{id}: pure item-status rules, then the real app on SQLite and on Redis.

The HTTP tests run the real jobs app on the `store` fixture (a SQLite file in tmp_path, or the
real Redis under a fresh key prefix) in front of a real gateway and mock-inference upstreams.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from jobs_api.batches import ItemStatus, batch_items, counts, item_outcome, item_statuses
from jobs_api.models import ItemProgress, Job, JobError, JobStatus
from jobs_api.store import JobStore
from tests.conftest import AiohttpClient, MockUpstream, StartMock
from tests.jobs_api.conftest import JobsSettingsFactory, MakeJob, StartJobsGateway
from tests.jobs_api.test_routes import CHAT, JobsHarness, StartJobs, inference, jobs_starter

API_KEYS: dict[str, Any] = {
    "key-a": {"tenant": "org-a"},
    "key-b": {"tenant": "org-b"},
    "key-admin": {"tenant": "ops", "roles": ["user", "admin"]},
}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
ADMIN = {"Authorization": "Bearer key-admin"}
CHAT_ITEM: dict[str, Any] = {"path": "/v1/chat/completions", "body": CHAT}
MISSING_ITEM: dict[str, Any] = {"method": "GET", "path": "/v1/no-such-route"}  # the mock answers 404


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """Start a jobs app: `await start_jobs(store=store, gateway_url=url, **settings)`."""
    return jobs_starter(aiohttp_client, jobs_settings)


# --- pure: the status of each item ----------------------------------------------------------------


def batch_job(make_job: MakeJob, n: int = 3, **fields: Any) -> Job:
    return make_job(type="batch", input={"items": [CHAT_ITEM] * n, "parallel_limit": 1}, **fields)


def test_item_statuses_of_a_queued_batch_are_queued_even_after_an_attempt(make_job: MakeJob) -> None:
    stale = ItemProgress(attempt=1, statuses=("completed", "running", "queued"))
    job = batch_job(make_job, status=JobStatus.QUEUED, attempts=1, item_progress=stale)
    assert item_statuses(job) == [ItemStatus.QUEUED] * 3


def test_item_statuses_of_a_running_batch_come_from_its_current_attempt(make_job: MakeJob) -> None:
    progress = ItemProgress(attempt=2, statuses=("completed", "running", "queued"))
    job = batch_job(make_job, status=JobStatus.RUNNING, attempts=2, item_progress=progress)
    assert item_statuses(job) == [ItemStatus.COMPLETED, ItemStatus.RUNNING, ItemStatus.QUEUED]
    # What an earlier attempt stored says nothing about this one, which has not reported yet.
    older = batch_job(make_job, status=JobStatus.RUNNING, attempts=3, item_progress=progress)
    assert item_statuses(older) == [ItemStatus.QUEUED] * 3
    assert counts(item_statuses(job)) == {
        "queued": 1,
        "running": 1,
        "completed": 1,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
    }


def test_unfinished_items_of_a_batch_that_ended_without_result_are_cancelled(make_job: MakeJob) -> None:
    progress = ItemProgress(attempt=1, statuses=("completed", "running", "queued"))
    job = batch_job(make_job, status=JobStatus.TIMED_OUT, attempts=1, item_progress=progress)
    assert item_statuses(job) == [ItemStatus.COMPLETED, ItemStatus.CANCELLED, ItemStatus.CANCELLED]
    # No result stored: nothing to point at, even for the item that completed.
    assert [item["result_url"] for item in batch_items(job)] == [None, None, None]
    never_ran = batch_job(make_job, status=JobStatus.CANCELLED)
    assert item_statuses(never_ran) == [ItemStatus.CANCELLED] * 3


def test_result_items_give_statuses_urls_and_outcomes(make_job: MakeJob) -> None:
    result = {
        "items": [
            {"index": 0, "status": "completed", "result": {"status": 200, "body": "ok"}},
            {"index": 1, "status": "failed", "error": {"type": "upstream_error", "message": "404"}},
            {"index": 2, "status": "skipped"},
        ],
        "completed": 1,
        "failed": 1,
    }
    job = batch_job(
        make_job,
        status=JobStatus.FAILED,
        attempts=1,
        result=result,
        error=JobError(type="batch_item_failed", message="batch item 1 failed"),
    )
    items = batch_items(job)
    assert [i["status"] for i in items] == ["completed", "failed", "skipped"]
    assert [i["result_url"] for i in items] == [
        f"/v1/batches/{job.id}/items/0",
        f"/v1/batches/{job.id}/items/1",
        None,
    ]
    assert all(i["job_id"] == job.id for i in items)
    assert items[1]["error"] == {"type": "upstream_error", "message": "404"}
    ok = {"status": 200, "body": "ok"}
    assert item_outcome(job, 0) == {"index": 0, "status": "completed", "result": ok}
    assert item_outcome(job, 1) == {
        "index": 1,
        "status": "failed",
        "error": {"type": "upstream_error", "message": "404"},
    }
    assert item_outcome(job, 2) is None


def test_a_result_that_does_not_match_the_items_is_not_trusted(make_job: MakeJob) -> None:
    job = batch_job(make_job, status=JobStatus.COMPLETED, attempts=1, result={"items": [{"status": "x"}]})
    assert item_statuses(job) == [ItemStatus.CANCELLED] * 3
    assert item_outcome(job, 0) is None


# --- over HTTP, on both stores ----------------------------------------------------------------------


async def get_json(jobs: JobsHarness, path: str, headers: dict[str, str], status: int = 200) -> Any:
    resp = await jobs.client.get(path, headers=headers)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def submit_batch(jobs: JobsHarness, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    resp = await jobs.client.post("/v1/batches", json=body, headers=headers)
    assert resp.status == 202, await resp.text()
    job: dict[str, Any] = await resp.json()
    assert job["links"]["batch"] == f"/v1/batches/{job['id']}"
    return job


async def wait_batch(
    jobs: JobsHarness, batch_id: str, headers: dict[str, str], done: Any, within_s: float = 15.0
) -> dict[str, Any]:
    """Poll the batch until `done(view)` holds."""
    deadline = time.monotonic() + within_s
    while True:
        view: dict[str, Any] = await get_json(jobs, f"/v1/batches/{batch_id}", headers)
        if done(view):
            return view
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.02)


async def test_batch_shows_items_while_running_and_their_results_after(
    store: JobStore, start_jobs: StartJobs, start_mock: StartMock, start_jobs_gateway: StartJobsGateway
) -> None:
    slow: MockUpstream = await start_mock("slow", latency_s=0.3)
    gateway_url = await start_jobs_gateway(slow)
    jobs = await start_jobs(store=store, gateway_url=gateway_url, api_keys=API_KEYS)
    body = {"items": [CHAT_ITEM, MISSING_ITEM, CHAT_ITEM], "parallel_limit": 1}
    job = await submit_batch(jobs, body, A)

    running = await wait_batch(jobs, job["id"], A, lambda v: v["counts"]["running"] == 1)
    assert running["status"] == "running"
    assert running["total"] == 3
    assert [i["status"] for i in running["items"]][0] == "running"
    assert running["counts"]["queued"] == 2
    assert all(i["result_url"] is None for i in running["items"])
    resp = await jobs.client.get(f"/v1/batches/{job['id']}/items/0", headers=A)
    assert resp.status == 409 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["type"] == "not_finished"

    done = await wait_batch(jobs, job["id"], A, lambda v: v["status"] == "completed")
    assert done["counts"] == {
        "queued": 0,
        "running": 0,
        "completed": 2,
        "failed": 1,
        "skipped": 0,
        "cancelled": 0,
    }
    assert [i["status"] for i in done["items"]] == ["completed", "failed", "completed"]
    assert done["items"][1]["error"]["status"] == 404
    assert done["links"]["self"] == f"/v1/batches/{job['id']}"
    assert done["links"]["job"] == f"/v1/jobs/{job['id']}"
    assert done["finished_at"].endswith("Z")
    first = await get_json(jobs, done["items"][0]["result_url"], A)
    assert first["status"] == "completed" and first["result"]["status"] == 200
    assert first["result"]["body"]["object"] == "chat.completion"
    failed = await get_json(jobs, done["items"][1]["result_url"], A)
    assert failed["status"] == "failed" and failed["error"]["status"] == 404
    # The item route and the job's own result agree.
    whole = await get_json(jobs, f"/v1/jobs/{job['id']}/result", A)
    assert whole["result"]["items"][0]["result"] == first["result"]


async def test_another_tenants_batch_is_404_and_an_admin_sees_it(
    store: JobStore, start_jobs: StartJobs
) -> None:
    jobs = await start_jobs(store=store, start_runner=False, api_keys=API_KEYS)
    job = await submit_batch(jobs, {"items": [CHAT_ITEM, CHAT_ITEM]}, A)
    mine = await get_json(jobs, f"/v1/batches/{job['id']}", A)
    assert mine["status"] == "queued" and mine["tenant"] == "org-a"
    assert [i["status"] for i in mine["items"]] == ["queued", "queued"]
    assert mine["counts"]["queued"] == 2

    for path in (f"/v1/batches/{job['id']}", f"/v1/batches/{job['id']}/items/0"):
        other = await get_json(jobs, path, B, status=404)
        assert other["error"]["type"] == "not_found"
        assert job["id"] in other["error"]["message"]
    assert (await get_json(jobs, f"/v1/batches/{job['id']}", ADMIN))["id"] == job["id"]
    resp = await jobs.client.get(f"/v1/batches/{job['id']}")
    assert resp.status == 401


async def test_batch_routes_refuse_bad_ids_plain_jobs_and_missing_items(
    store: JobStore, start_jobs: StartJobs
) -> None:
    jobs = await start_jobs(store=store, start_runner=False, api_keys=API_KEYS)
    plain = await jobs.submit(inference(), headers=A)
    assert "batch" not in plain["links"]
    error = (await get_json(jobs, f"/v1/batches/{plain['id']}", A, status=404))["error"]
    assert error == {"type": "not_found", "message": f"batch {plain['id']} not found"}
    error = (await get_json(jobs, "/v1/batches/not-a-uuid", A, status=400))["error"]
    assert error["type"] == "invalid_request" and "batch id" in error["message"]

    job = await submit_batch(jobs, {"items": [CHAT_ITEM]}, A)
    missing = await get_json(jobs, f"/v1/batches/{job['id']}/items/1", A, status=404)
    assert "has no item 1 (1 items)" in missing["error"]["message"]
    for bad in ("-1", "x", "1e3", "٣", "9999999"):
        resp = await jobs.client.get(f"/v1/batches/{job['id']}/items/{bad}", headers=A)
        assert resp.status in (400, 404), bad
        assert (await resp.json())["error"]["type"] in ("invalid_request", "not_found")


async def test_a_cancelled_batch_shows_what_finished_and_cancels_the_rest(
    store: JobStore, start_jobs: StartJobs, start_mock: StartMock, start_jobs_gateway: StartJobsGateway
) -> None:
    slow = await start_mock("slow", latency_s=0.3)
    gateway_url = await start_jobs_gateway(slow)
    jobs = await start_jobs(store=store, gateway_url=gateway_url, api_keys=API_KEYS)
    job = await submit_batch(jobs, {"items": [CHAT_ITEM] * 4, "parallel_limit": 1}, A)
    await wait_batch(jobs, job["id"], A, lambda v: v["counts"]["completed"] == 1)
    resp = await jobs.client.post(f"/v1/jobs/{job['id']}/cancel", headers=A)
    assert resp.status == 202
    ended = await wait_batch(jobs, job["id"], A, lambda v: v["status"] == "cancelled")
    statuses = [i["status"] for i in ended["items"]]
    assert statuses[0] == "completed"
    assert set(statuses[1:]) <= {"completed", "cancelled"} and "cancelled" in statuses
    assert ended["counts"]["queued"] == ended["counts"]["running"] == 0
    assert all(i["result_url"] is None for i in ended["items"])  # a cancelled batch keeps no result
    gone = await get_json(jobs, f"/v1/batches/{job['id']}/items/0", A, status=409)
    assert gone["error"]["type"] == "no_result" and gone["status"] == "completed"


async def test_fail_fast_batch_points_at_the_items_that_ran(
    store: JobStore, start_jobs: StartJobs, gateway_url: str
) -> None:
    jobs = await start_jobs(store=store, gateway_url=gateway_url)
    body = {"items": [CHAT_ITEM, MISSING_ITEM, CHAT_ITEM], "parallel_limit": 1, "fail_fast": True}
    job = await submit_batch(jobs, body, {})
    ended = await wait_batch(jobs, job["id"], {}, lambda v: v["status"] == "failed")
    assert [i["status"] for i in ended["items"]] == ["completed", "failed", "skipped"]
    assert ended["error"]["type"] == "batch_item_failed"
    assert [i["result_url"] is not None for i in ended["items"]] == [True, True, False]
