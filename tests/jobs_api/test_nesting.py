"""Deeply nested JSON: refused at the door, and a stored job that cannot be decoded fails alone.

Real stores (SQLite in tmp_path, Redis), a real jobs app, a real gateway and upstreams on 127.0.0.1.
A job "too deep to decode" is put in the store directly, as an earlier version accepted it.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiohttp import web

from jobs_api.keys import RUNNER
from jobs_api.models import Job, JobStatus, request_cancel
from jobs_api.store.base import JobQuery, JobStore
from tests.conftest import AiohttpClient, AiohttpServer
from tests.jobs_api.conftest import T0, JobsSettingsFactory, MakeJob, StartJobsGateway
from tests.jobs_api.test_routes import CHAT, StartJobs, inference, jobs_starter, read_events
from tests.jobs_api.test_runner import ONE_SHOT

UNREADABLE = 220  # readable by orjson, beyond what pydantic's JSON parser reads back (200 levels)


def nested(depth: int) -> Any:
    """A JSON value `depth` containers deep: [[...[1]...]]."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def deep_job(field: str, depth: int) -> dict[str, Any]:
    """A submission whose `input` or `metadata` is `depth` containers deep."""
    job = inference()
    if field == "input":
        job["input"]["body"] = nested(depth - 1)
    else:
        job["metadata"] = {"deep": nested(depth - 1)}
    return job


def deep_body(field: str, depth: int) -> bytes:
    """`deep_job(field, depth)` as JSON text, written out: encoders stop at 254 levels or so."""
    marker = "DEEP"
    text = orjson.dumps(deep_job(field, 1)).decode()
    inner = "[" * (depth - 1) + "1" + "]" * (depth - 1)
    if field == "input":
        text = text.replace('"body":1', f'"body":"{marker}"')
    else:
        text = text.replace('"deep":1', f'"deep":"{marker}"')
    return text.replace(f'"{marker}"', inner).encode()


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    return jobs_starter(aiohttp_client, jobs_settings)


# --- at the door ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 200, 254, 300, 1000])
@pytest.mark.parametrize("field", ["input", "metadata"])
async def test_submission_nested_deeper_than_the_limit_is_422_naming_the_field(
    start_jobs: StartJobs, field: str, depth: int
) -> None:
    jobs = await start_jobs(start_runner=False)
    body = deep_body(field, depth)
    resp = await jobs.client.post("/v1/jobs", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 422, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == "validation_error"
    assert error["message"].startswith(f"{field}:")
    assert "64" in error["message"] and "JOBS_MAX_INPUT_DEPTH" in error["message"]
    assert await jobs.counts() == {}


async def test_submission_at_the_depth_limit_is_stored_and_reads_back(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    job = await jobs.submit({**deep_job("input", 64), "metadata": {"deep": nested(63)}})
    assert (await jobs.get(job["id"]))["metadata"] == {"deep": nested(63)}
    assert (await jobs.client.get("/v1/jobs")).status == 200


async def test_depth_limit_is_a_setting_and_covers_batches(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, max_input_depth=5)
    assert (await jobs.client.post("/v1/jobs", json=deep_job("metadata", 5))).status == 202
    resp = await jobs.client.post("/v1/jobs", json=deep_job("metadata", 6))
    assert resp.status == 422
    assert "metadata: " in (await resp.json())["error"]["message"]
    # A batch's input is {"items": [{"body": ...}]}: three levels before the body.
    resp = await jobs.client.post("/v1/batches", json={"items": [{"path": "/v1/x", "body": nested(3)}]})
    assert resp.status == 422
    assert (await resp.json())["error"]["message"].startswith("input:")
    resp = await jobs.client.post("/v1/batches", json={"items": [{"path": "/v1/x", "body": nested(2)}]})
    assert resp.status == 202


# --- a stored job that cannot be decoded ----------------------------------------------------------


async def test_stored_job_too_deep_to_decode_fails_alone(store: JobStore, make_job: MakeJob) -> None:
    poison, _ = await store.create(make_job(tenant="t", priority=5, input={"body": nested(UNREADABLE)}))
    deep_meta, _ = await store.create(make_job(tenant="t", priority=5, metadata={"m": nested(UNREADABLE)}))
    good, _ = await store.create(make_job(tenant="u"))

    seen = await store.get(poison.id)
    assert seen is not None and seen.id == poison.id and seen.status is JobStatus.QUEUED
    assert seen.error is not None and seen.error.type == "undecodable"
    jobs, _ = await store.list_jobs(JobQuery())
    assert {j.id for j in jobs} == {poison.id, deep_meta.id, good.id}

    claimed = await store.claim("w", T0 + 10, 30.0)
    assert claimed is not None and claimed.id == good.id  # the undecodable ones went first, failing
    assert await store.claim("w", T0 + 10, 30.0) is None
    for bad in (poison, deep_meta):
        failed = await store.get(bad.id)
        assert failed is not None and failed.status is JobStatus.FAILED
        assert failed.error is not None and failed.error.type == "undecodable"
        assert "nested" in failed.error.message and "levels" in failed.error.message
        events = await store.events_after(bad.id, 0)
        assert [e.data["status"] for e in events] == ["queued", "failed"]
        assert events[-1].data["error"]["type"] == "undecodable"


async def test_stored_job_too_deep_to_decode_can_be_cancelled_and_listed(
    store: JobStore, make_job: MakeJob
) -> None:
    poison, _ = await store.create(make_job(input={"body": nested(UNREADABLE)}))
    done = transition_to_completed(make_job(), result={"body": nested(UNREADABLE)})
    await store.create(done)
    cancelled = await store.mutate(poison.id, lambda j: request_cancel(j, T0 + 1))
    assert cancelled.status is JobStatus.CANCELLED
    assert (await store.get(poison.id)) == cancelled
    finished = await store.get(done.id)
    assert finished is not None and finished.status is JobStatus.COMPLETED and finished.result is None
    assert finished.error is not None and "result" in finished.error.message
    jobs, _ = await store.list_jobs(JobQuery(status=JobStatus.COMPLETED))
    assert [j.id for j in jobs] == [done.id]


def transition_to_completed(job: Job, result: Any) -> Job:
    return job.model_copy(
        update={"status": JobStatus.COMPLETED, "result": result, "attempts": 1, "finished_at": T0 + 1}
    )


async def test_undecodable_job_does_not_stop_the_queue_or_the_api(
    store: JobStore, make_job: MakeJob, start_jobs: StartJobs, gateway_url: str
) -> None:
    jobs = await start_jobs(store=store, gateway_url=gateway_url, start_runner=False)
    now = time.time()
    poison, _ = await store.create(make_job(priority=5, created_at=now, input={"body": nested(UNREADABLE)}))
    queued, _ = await store.create(make_job(priority=5, created_at=now, metadata={"m": nested(UNREADABLE)}))

    resp = await jobs.client.get(f"/v1/jobs/{poison.id}")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["last_error"]["type"] == "undecodable"
    resp = await jobs.client.get("/v1/jobs")
    assert resp.status == 200, await resp.text()
    assert len((await resp.json())["jobs"]) == 2
    resp = await jobs.client.post(f"/v1/jobs/{queued.id}/cancel")
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["status"] == "cancelled"

    await jobs.app[RUNNER].start()
    good = await jobs.submit(inference())
    assert (await jobs.wait_for(good["id"]))["status"] == "completed"
    failed = await jobs.wait_for(poison.id)
    assert failed["status"] == "failed" and failed["error"]["type"] == "undecodable"
    resp = await jobs.client.post(f"/v1/jobs/{poison.id}/cancel")
    assert resp.status == 409, await resp.text()
    resp = await jobs.client.get(f"/v1/jobs/{poison.id}/events")
    assert [e["data"]["status"] for e in await read_events(resp)] == ["queued", "failed"]
    resp = await jobs.client.get(f"/v1/jobs/{poison.id}/result")
    assert resp.status == 200 and (await resp.json())["error"]["type"] == "undecodable"


class DeepUpstream:
    """An upstream answering JSON nested `depth` levels deep (any other path: a normal answer)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def app(self) -> web.Application:
        async def deep(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response(nested(self.depth))

        async def shallow(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"ok": True})

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/v1/deep", deep)
        app.router.add_route("*", "/{tail:.*}", shallow)
        return app


@pytest.mark.parametrize("depth", [130, 230, 300])
async def test_upstream_result_nested_too_deep_fails_the_job_and_the_store_stays_usable(
    store: JobStore,
    start_jobs: StartJobs,
    aiohttp_server: AiohttpServer,
    start_jobs_gateway: StartJobsGateway,
    depth: int,
) -> None:
    server = await aiohttp_server(DeepUpstream(depth).app())
    gateway = await start_jobs_gateway(f"deep={str(server.make_url('')).rstrip('/')}", **ONE_SHOT)
    jobs = await start_jobs(store=store, gateway_url=gateway)
    deep = await jobs.submit({"type": "inference", "input": {"path": "/v1/deep", "body": CHAT}})
    failed = await jobs.wait_for(deep["id"])
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "result_too_deep"
    assert "nested" in failed["error"]["message"] and "128" in failed["error"]["message"]
    assert failed["attempts"] == 1
    assert (await jobs.client.get("/v1/jobs")).status == 200
    fine = await jobs.submit({"type": "inference", "input": {"path": "/v1/fine", "body": CHAT}})
    done = await jobs.wait_for(fine["id"])
    assert done["status"] == "completed" and done["result"]["body"] == {"ok": True}
