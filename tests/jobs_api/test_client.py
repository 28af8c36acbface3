"""JobsClient against a real jobs app (and a real gateway), directly or through a small proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from jobs_api.client import JobsClient, JobsClientError
from tests.conftest import AiohttpClient, AiohttpServer, StartMock
from tests.jobs_api.conftest import JobsSettingsFactory, StartJobsGateway
from tests.jobs_api.test_routes import StartJobs, inference, jobs_starter

FORWARDED = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "Accept")
PROXY_SESSION = web.AppKey("proxy_session", aiohttp.ClientSession)


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """Start a jobs app: `await start_jobs(start_runner=False, **settings)`."""
    return jobs_starter(aiohttp_client, jobs_settings)


def recording_proxy(target: str, seen: list[str], *, block_events: bool) -> web.Application:
    """A pass-through proxy to `target` that records each request; 404 for /events if blocked."""

    async def session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as s:
            app[PROXY_SESSION] = s
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path}")
        if block_events and request.path.endswith("/events"):
            raise web.HTTPNotFound()
        headers = {h: request.headers[h] for h in FORWARDED if h in request.headers}
        async with request.app[PROXY_SESSION].request(
            request.method, target + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name in ("Content-Type", "Location", "WWW-Authenticate"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def test_client_submit_get_list_cancel(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, api_keys={"k": {"tenant": "t"}})
    async with JobsClient(jobs.base_url, api_key="k") as client:
        job = await client.submit(inference(metadata={"who": "client"}))
        assert job["status"] == "queued"
        assert job["tenant"] == "t"
        again = await client.submit(inference(metadata={"who": "client"}), idempotency_key="k1")
        replay = await client.submit(inference(metadata={"who": "client"}), idempotency_key="k1")
        assert replay["id"] == again["id"] != job["id"]

        assert (await client.get(job["id"]))["metadata"] == {"who": "client"}
        page = await client.list(status="queued", limit=1)
        assert len(page["jobs"]) == 1 and page["next_cursor"]
        rest = await client.list(status="queued", cursor=page["next_cursor"], type=None)
        assert {j["id"] for j in page["jobs"] + rest["jobs"]} == {job["id"], again["id"]}

        cancelled = await client.cancel(job["id"])
        assert cancelled["status"] == "cancelled"
        with pytest.raises(JobsClientError) as conflict:
            await client.cancel(job["id"])
        assert (conflict.value.status, conflict.value.type) == (409, "conflict")
        with pytest.raises(JobsClientError) as missing:
            await client.get("3f1c1d2e-1111-4222-8333-944444444444")
        assert (missing.value.status, missing.value.type) == (404, "not_found")
        with pytest.raises(JobsClientError) as invalid:
            await client.submit({"type": "teleport", "input": {}})
        assert (invalid.value.status, invalid.value.type) == (422, "validation_error")
        assert "teleport" in invalid.value.message

    async with JobsClient(jobs.base_url, api_key="wrong") as stranger:
        with pytest.raises(JobsClientError) as denied:
            await stranger.list()
        assert denied.value.status == 401


async def test_client_wait_follows_the_event_stream(
    start_jobs: StartJobs,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    aiohttp_server: AiohttpServer,
) -> None:
    slow = await start_mock("slow", latency_s=0.3)
    jobs = await start_jobs(gateway_url=await start_jobs_gateway(slow))
    seen: list[str] = []
    proxy = await aiohttp_server(recording_proxy(jobs.base_url, seen, block_events=False))
    updates: list[dict[str, Any]] = []
    async with JobsClient(str(proxy.make_url("")).rstrip("/")) as client:
        job = await client.submit(inference())
        done = await client.wait(job["id"], timeout_s=10, poll_interval_s=0.05, on_update=updates.append)
        assert done["status"] == "completed"
        assert done["result"]["upstream"] == "slow"
        assert await client.result(job["id"]) == {
            "id": job["id"],
            "status": "completed",
            "result": done["result"],
        }
        assert any("attempt 1 completed" in line["message"] for line in await client.logs(job["id"]))
    assert f"GET /v1/jobs/{job['id']}/events" in seen
    # One stream and one final GET: no polling while the stream works.
    assert seen.count(f"GET /v1/jobs/{job['id']}") == 1, seen
    assert [u["status"] for u in updates][-1] == "completed"
    assert "running" in [u["status"] for u in updates]


async def test_client_wait_falls_back_to_polling_when_events_are_unavailable(
    start_jobs: StartJobs,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
    aiohttp_server: AiohttpServer,
) -> None:
    slow = await start_mock("slow", latency_s=0.4)
    jobs = await start_jobs(gateway_url=await start_jobs_gateway(slow))
    seen: list[str] = []
    proxy = await aiohttp_server(recording_proxy(jobs.base_url, seen, block_events=True))
    async with JobsClient(str(proxy.make_url("")).rstrip("/")) as client:
        job = await client.submit(inference())
        done = await client.wait(job["id"], timeout_s=10, poll_interval_s=0.05)
    assert done["status"] == "completed"
    assert seen.count(f"GET /v1/jobs/{job['id']}/events") == 1
    assert seen.count(f"GET /v1/jobs/{job['id']}") >= 2, seen  # polled until it finished


async def test_client_events_yield_each_state(start_jobs: StartJobs, gateway_url: str) -> None:
    jobs = await start_jobs(gateway_url=gateway_url)
    async with JobsClient(jobs.base_url) as client:
        job = await client.submit(inference())
        events = [e async for e in client.events(job["id"])]
        assert [e["data"]["status"] for e in events] == ["queued", "running", "completed"]
        resumed = [e async for e in client.events(job["id"], last_event_id=events[0]["id"])]
        assert [e["id"] for e in resumed] == [e["id"] for e in events[1:]]


async def test_client_wait_times_out(
    start_jobs: StartJobs, start_mock: StartMock, start_jobs_gateway: StartJobsGateway
) -> None:
    hang = await start_mock("hang", hang=True)
    jobs = await start_jobs(gateway_url=await start_jobs_gateway(hang))
    async with JobsClient(jobs.base_url) as client:
        job = await client.submit(inference())
        with pytest.raises(TimeoutError):
            await client.wait(job["id"], timeout_s=0.3)
        await client.cancel(job["id"])
        done = await client.wait(job["id"], timeout_s=5)
    assert done["status"] == "cancelled"


async def test_client_wait_reports_a_failed_job(start_jobs: StartJobs, gateway_url: str) -> None:
    jobs = await start_jobs(gateway_url=gateway_url)
    async with JobsClient(jobs.base_url) as client:
        job = await client.submit(inference(body=[1]))
        done = await client.wait(job["id"], timeout_s=10)
    assert done["status"] == "failed"
    assert done["error"]["status"] == 400


async def test_client_uses_a_given_session_and_leaves_it_open(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    async with aiohttp.ClientSession() as session:
        async with JobsClient(jobs.base_url, session=session) as client:
            await client.submit(inference())
        assert not session.closed
        client = JobsClient(jobs.base_url, session=session)
        assert len((await client.list())["jobs"]) == 1
        await client.close()
        assert not session.closed


async def test_client_reports_a_service_that_is_not_there(refused_url: str) -> None:
    async with JobsClient(refused_url) as client:
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get("3f1c1d2e-1111-4222-8333-944444444444")
