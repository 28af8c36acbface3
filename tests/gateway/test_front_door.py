"""The async front door: Prefer: respond-async through a real gateway and a real jobs-api process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.front_door import wants_async
from tests.conftest import StartGateway, StartMock, free_port
from tests.deploy.procs import JOBS_READY, Proc

BIN = Path(sys.executable).parent
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
ASYNC = {"Prefer": "respond-async"}


@pytest.mark.parametrize(
    ("value", "wanted"),
    [(b"respond-async", True), (b"wait=10, Respond-Async", True), (b"return=minimal", False), (None, False)],
)
def test_wants_async_reads_the_prefer_tokens(value: bytes | None, wanted: bool) -> None:
    assert wants_async(value) is wanted


@pytest.fixture
async def jobs_api(tmp_path: Path) -> AsyncIterator[tuple[Proc, str, list[int]]]:
    """A jobs-api process whose gateway URL is set later (a port reserved now)."""
    gateway_port = free_port()
    argv = [
        str(BIN / "jobs-api"),
        "serve",
        "--port",
        "0",
        "--gateway-url",
        f"http://127.0.0.1:{gateway_port}",
    ]
    argv += ["--store", f"sqlite:///{tmp_path / 'jobs.db'}"]
    proc = Proc(argv, tmp_path / "jobs.log")
    try:
        port = int((await asyncio.to_thread(proc.wait_for, JOBS_READY)).group(1))
        yield proc, f"http://127.0.0.1:{port}", [gateway_port]
    finally:
        await asyncio.to_thread(proc.stop)


async def test_respond_async_becomes_a_job_that_runs_through_the_gateway(
    start_mock: StartMock, start_gateway: StartGateway, jobs_api: tuple[Proc, str, list[int]]
) -> None:
    _, jobs_url, (gateway_port,) = jobs_api
    a = await start_mock("a", stream_chunks=3)
    gw = await start_gateway(a.spec, port=gateway_port, jobs={"url": jobs_url})
    async with gw.client.post("/v1/chat/completions?x=1", json=CHAT, headers=ASYNC) as resp:
        assert resp.status == 202
        assert resp.headers["Preference-Applied"] == "respond-async"
        location = resp.headers["Location"]
        assert location.startswith(jobs_url + "/v1/jobs/")
        job = await resp.json()
    assert job["type"] == "inference"
    assert job["input"]["path"] == "/v1/chat/completions?x=1"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(location) as resp:
                job = await resp.json()
            if job["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.05)
    assert job["status"] == "completed", job
    assert a.stats.requests == 1  # the job's own request, sent by the jobs API through the gateway
    assert "prefer" not in {k.lower() for k in (a.stats.last_headers or {})}  # no loop


async def test_without_jobs_url_the_preference_is_ignored(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    async with gw.client.post("/v1/chat/completions", json=CHAT, headers=ASYNC) as resp:
        assert resp.status == 200
        assert "Preference-Applied" not in resp.headers


async def test_a_body_that_is_not_json_cannot_become_a_job(
    start_mock: StartMock, start_gateway: StartGateway, jobs_api: tuple[Proc, str, list[int]]
) -> None:
    _, jobs_url, _ = jobs_api
    a = await start_mock("a")
    gw = await start_gateway(a.spec, jobs={"url": jobs_url})
    async with gw.client.post("/v1/chat/completions", data=b"not json", headers=ASYNC) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request"
    assert a.stats.requests == 0


async def test_a_jobs_api_that_is_down_is_a_clear_503(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec, jobs={"url": f"http://127.0.0.1:{free_port()}", "timeout_s": 2})
    async with gw.client.post("/v1/chat/completions", json=CHAT, headers=ASYNC) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "jobs_unavailable"
    assert a.stats.requests == 0
