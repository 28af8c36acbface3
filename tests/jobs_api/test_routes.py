"""The jobs API over HTTP: a real jobs app (SQLite in tmp_path) in front of a real gateway and mocks."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from gateway.testing.mock_inference import MOCK_STATS, MockBehaviour, create_mock_app
from jobs_api.app import create_app
from jobs_api.keys import RUNNER, STORE
from jobs_api.models import JobStatus
from jobs_api.store import JobStore
from jobs_api.store.sqlite import SqliteJobStore
from tests.conftest import AiohttpClient, AiohttpServer, StartMock
from tests.jobs_api.conftest import JobsSettingsFactory, StartJobsGateway

CHAT: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}
TERMINAL = {"completed", "failed", "cancelled", "timed_out"}


def inference(body: Any = None, **job: Any) -> dict[str, Any]:
    """A submission of one chat completion through the gateway."""
    return {
        "type": "inference",
        "input": {"method": "POST", "path": "/v1/chat/completions", "body": CHAT if body is None else body},
        **job,
    }


@dataclass
class JobsHarness:
    """A jobs app under test: its HTTP client, the app and its Prometheus registry."""

    client: TestClient[Any, Any]
    app: web.Application
    registry: CollectorRegistry
    headers: dict[str, str]

    @property
    def store(self) -> JobStore:
        return self.app[STORE]

    @property
    def base_url(self) -> str:
        return str(self.client.server.make_url("")).rstrip("/")

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    async def submit(self, job: dict[str, Any], *, headers: dict[str, str] | None = None) -> dict[str, Any]:
        resp = await self.client.post("/v1/jobs", json=job, headers={**self.headers, **(headers or {})})
        assert resp.status == 202, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data

    async def get(self, job_id: str, *, headers: dict[str, str] | None = None) -> dict[str, Any]:
        resp = await self.client.get(f"/v1/jobs/{job_id}", headers={**self.headers, **(headers or {})})
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data

    async def wait_for(
        self, job_id: str, statuses: Iterable[str] = TERMINAL, *, within_s: float = 15.0
    ) -> dict[str, Any]:
        """Poll the job until its status is one of `statuses`."""
        wanted = set(statuses)
        deadline = time.monotonic() + within_s
        while True:
            job = await self.get(job_id)
            if job["status"] in wanted:
                return job
            assert time.monotonic() < deadline, f"job still {job['status']} after {within_s} s: {job}"
            await asyncio.sleep(0.02)

    async def counts(self) -> dict[JobStatus, int]:
        return await self.store.count_by_status()


StartJobs = Callable[..., Awaitable[JobsHarness]]


def jobs_starter(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """`await start(gateway_url=..., start_runner=False, headers={...}, **settings)`."""

    async def start(
        *,
        store: JobStore | None = None,
        start_runner: bool = True,
        clock: Callable[[], float] = time.time,
        headers: dict[str, str] | None = None,
        **overrides: Any,
    ) -> JobsHarness:
        registry = CollectorRegistry()
        app = create_app(
            jobs_settings(**overrides),
            store=store,
            clock=clock,
            registry_metrics=registry,
            start_runner=start_runner,
        )
        client = await aiohttp_client(app)
        return JobsHarness(client, app, registry, dict(headers or {}))

    return start


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """Start a jobs app: `await start_jobs(gateway_url=url)`."""
    return jobs_starter(aiohttp_client, jobs_settings)


class TickingClock:
    """Wall clock that moves one second per reading: distinct, ordered created_at values."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def read_events(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """Every event of an SSE response until the server ends it."""
    text = (await resp.read()).decode()
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            events.append(
                {"id": int(fields["id"]), "event": fields["event"], "data": orjson.loads(fields["data"])}
            )
    return events


# --- the life of a job --------------------------------------------------------------------------


async def test_submit_answers_202_and_job_completes_through_gateway(
    start_jobs: StartJobs, gateway_url: str
) -> None:
    jobs = await start_jobs(gateway_url=gateway_url)
    resp = await jobs.client.post(
        "/v1/jobs", json=inference(priority=3, max_attempts=2, timeout_s=20, metadata={"run": "a"})
    )
    assert resp.status == 202
    accepted = await resp.json()
    job_id = accepted["id"]
    assert resp.headers["Location"] == f"/v1/jobs/{job_id}"
    assert accepted["status"] in ("queued", "running")
    assert accepted["links"]["self"] == f"/v1/jobs/{job_id}"
    assert accepted["links"]["events"] == f"/v1/jobs/{job_id}/events"
    assert accepted["links"]["cancel"] == f"/v1/jobs/{job_id}/cancel"
    assert (accepted["priority"], accepted["max_attempts"], accepted["timeout_s"]) == (3, 2, 20.0)
    assert accepted["metadata"] == {"run": "a"}

    job = await jobs.wait_for(job_id)
    assert job["status"] == "completed", job
    assert job["attempts"] == 1
    assert job["progress"]["percent"] == 100.0
    result = job["result"]
    assert result["status"] == 200
    assert result["upstream"] == "a"
    assert result["body"]["object"] == "chat.completion"
    assert result["body"]["choices"][0]["message"]["role"] == "assistant"
    assert job["links"]["result"] == f"/v1/jobs/{job_id}/result"
    for field in ("created_at", "started_at", "finished_at", "updated_at"):
        assert job[field].endswith("Z"), job[field]
        datetime.fromisoformat(job[field])  # RFC 3339
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    for hidden in ("worker", "lease_until", "request_hash", "run_after", "idempotency_key"):
        assert hidden not in job
    assert job["cancel_requested"] is False
    assert "error" not in job

    resp = await jobs.client.get(f"/v1/jobs/{job_id}/result")
    assert resp.status == 200
    assert await resp.json() == {"id": job_id, "status": "completed", "result": result}
    assert jobs.sample("jobs_submitted_total", {"type": "inference"}) == 1


async def test_job_completes_when_its_upstream_is_killed_mid_job(
    start_jobs: StartJobs,
    start_jobs_gateway: StartJobsGateway,
    start_mock: StartMock,
    aiohttp_server: AiohttpServer,
) -> None:
    # "a" takes the request and never answers; closing its server drops the connection mid-job.
    app_a = create_mock_app(MockBehaviour(name="a", hang=True), seed=0)
    server_a = await aiohttp_server(app_a, shutdown_timeout=0.1)
    url_a = str(server_a.make_url("")).rstrip("/")
    b = await start_mock("b")
    gateway_url = await start_jobs_gateway(f"a={url_a}", b.spec, strategy="priority")
    jobs = await start_jobs(gateway_url=gateway_url)

    job = await jobs.submit(inference())
    await jobs.wait_for(job["id"], {"running"})
    deadline = time.monotonic() + 5
    while app_a[MOCK_STATS].requests == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await server_a.close()
    assert b.stats.requests == 0  # "a" had the request when it died

    done = await jobs.wait_for(job["id"])
    assert done["status"] == "completed", done
    assert done["result"]["upstream"] == "b"
    assert done["result"]["status"] == 200


async def test_non_retryable_upstream_400_fails_with_its_message(
    start_jobs: StartJobs, gateway_url: str
) -> None:
    jobs = await start_jobs(gateway_url=gateway_url)
    # A JSON list is not a chat request: the mock answers 400 with an OpenAI-style error.
    job = await jobs.submit(inference(body=["not", "an", "object"]))
    done = await jobs.wait_for(job["id"])
    assert done["status"] == "failed"
    assert done["attempts"] == 1
    error = done["error"]
    assert error["retryable"] is False
    assert error["status"] == 400
    assert "Request body must be a JSON object" in error["message"]
    assert "result" not in done

    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/result")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "failed"
    assert "Request body must be a JSON object" in body["error"]["message"]


async def test_batch_shorthand_runs_every_item(start_jobs: StartJobs, gateway_url: str) -> None:
    jobs = await start_jobs(gateway_url=gateway_url)
    item = {"method": "POST", "path": "/v1/chat/completions", "body": CHAT}
    resp = await jobs.client.post(
        "/v1/batches", json={"items": [item, item, item], "parallel_limit": 2, "priority": 1}
    )
    assert resp.status == 202, await resp.text()
    job = await resp.json()
    assert job["type"] == "batch"
    assert job["priority"] == 1
    assert job["input"]["parallel_limit"] == 2
    done = await jobs.wait_for(job["id"])
    assert done["status"] == "completed", done
    assert done["result"]["completed"] == 3
    assert [i["status"] for i in done["result"]["items"]] == ["completed"] * 3
    assert jobs.sample("jobs_submitted_total", {"type": "batch"}) == 1


async def test_result_is_409_while_the_job_has_not_finished(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    job = await jobs.submit(inference())
    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/result")
    assert resp.status == 409
    body = await resp.json()
    assert body["status"] == "queued"
    assert body["error"]["type"] == "not_finished"


async def test_logs_show_the_attempts_filtered_by_level(start_jobs: StartJobs, gateway_url: str) -> None:
    jobs = await start_jobs(gateway_url=gateway_url)
    job = await jobs.submit(inference())
    await jobs.wait_for(job["id"])
    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/logs")
    assert resp.status == 200
    lines = (await resp.json())["logs"]
    assert any(line["level"] == "info" and "attempt 1 completed" in line["message"] for line in lines)
    assert all(line["time"].endswith("Z") for line in lines)
    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/logs", params={"level": "error"})
    assert (await resp.json())["logs"] == []


# --- cancellation -------------------------------------------------------------------------------


async def test_cancel_queued_job_ends_it_at_once(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    job = await jobs.submit(inference())
    resp = await jobs.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status == 202
    cancelled = await resp.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    assert (await jobs.get(job["id"]))["status"] == "cancelled"

    again = await jobs.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status == 409
    assert (await again.json())["error"]["type"] == "conflict"

    other = await jobs.submit(inference())
    resp = await jobs.client.delete(f"/v1/jobs/{other['id']}")
    assert resp.status == 202
    assert (await resp.json())["status"] == "cancelled"

    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/result")
    assert resp.status == 200
    assert (await resp.json())["error"]["type"] == "cancelled"


async def test_cancel_queued_job_behind_a_saturated_runner(
    start_jobs: StartJobs, start_mock: StartMock, start_jobs_gateway: StartJobsGateway
) -> None:
    hang = await start_mock("hang", hang=True)
    jobs = await start_jobs(gateway_url=await start_jobs_gateway(hang), concurrency=1)
    busy = await jobs.submit(inference())
    await jobs.wait_for(busy["id"], {"running"})
    waiting = await jobs.submit(inference())
    assert (await jobs.get(waiting["id"]))["status"] == "queued"
    resp = await jobs.client.post(f"/v1/jobs/{waiting['id']}/cancel")
    assert resp.status == 202
    assert (await resp.json())["status"] == "cancelled"
    assert (await jobs.get(busy["id"]))["status"] == "running"
    await jobs.client.post(f"/v1/jobs/{busy['id']}/cancel")  # leave no request hanging at teardown
    assert (await jobs.wait_for(busy["id"]))["status"] == "cancelled"


async def test_cancel_running_job_stops_it_and_its_upstream_request(
    start_jobs: StartJobs, start_mock: StartMock, start_jobs_gateway: StartJobsGateway
) -> None:
    hang = await start_mock("hang", hang=True)
    jobs = await start_jobs(gateway_url=await start_jobs_gateway(hang))
    job = await jobs.submit(inference())
    await jobs.wait_for(job["id"], {"running"})
    deadline = time.monotonic() + 5
    while hang.stats.requests == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

    resp = await jobs.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status == 202
    flagged = await resp.json()
    assert flagged["status"] in ("running", "cancelled")
    assert flagged["cancel_requested"] is True

    done = await jobs.wait_for(job["id"], within_s=5)
    assert done["status"] == "cancelled"
    assert done["attempts"] == 1
    # The gateway saw its client leave and hung up on the upstream too.
    while hang.stats.disconnects == 0:
        assert time.monotonic() < deadline + 5, hang.stats
        await asyncio.sleep(0.02)


# --- events -------------------------------------------------------------------------------------


async def test_events_stream_every_state_in_order_and_resume_after_last_event_id(
    start_jobs: StartJobs, start_mock: StartMock, start_jobs_gateway: StartJobsGateway
) -> None:
    slow = await start_mock("slow", latency_s=0.2)
    jobs = await start_jobs(gateway_url=await start_jobs_gateway(slow))
    job = await jobs.submit(inference())
    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/events")
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    events = await read_events(resp)  # returns because the server ends the stream

    assert [e["event"] for e in events] == ["state", "state", "state"]
    assert [e["data"]["status"] for e in events] == ["queued", "running", "completed"]
    assert [e["data"]["attempts"] for e in events] == [0, 1, 1]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(e["data"]["job_id"] == job["id"] for e in events)
    assert events[-1]["data"]["progress"]["percent"] == 100.0

    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(ids[0])})
    assert [e["id"] for e in await read_events(resp)] == ids[1:]
    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/events", params={"last_event_id": str(ids[-1])})
    assert await read_events(resp) == []  # resumed after the end: nothing more, stream closed


async def test_events_include_progress_of_a_batch(start_jobs: StartJobs, gateway_url: str) -> None:
    jobs = await start_jobs(gateway_url=gateway_url)
    item = {"path": "/v1/chat/completions", "body": CHAT}
    resp = await jobs.client.post("/v1/batches", json={"items": [item, item], "parallel_limit": 1})
    job = await resp.json()
    events = await read_events(await jobs.client.get(f"/v1/jobs/{job['id']}/events"))
    kinds = [(e["event"], e["data"]["status"]) for e in events]
    assert kinds[0] == ("state", "queued") and kinds[-1] == ("state", "completed")
    progress = [e["data"]["progress"]["percent"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress) and progress, kinds
    assert "1 completed" in str([e["data"]["progress"]["message"] for e in events])


async def test_events_send_keepalive_comments_while_idle(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, sse_keepalive_s=0.1, sse_poll_s=0.05)
    job = await jobs.submit(inference())
    async with jobs.client.get(f"/v1/jobs/{job['id']}/events") as resp:
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"id: ")
        assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b": keepalive\n\n"
        await jobs.client.post(f"/v1/jobs/{job['id']}/cancel")
        rest = await asyncio.wait_for(resp.content.read(), 5)
    assert b'"status":"cancelled"' in rest


# --- idempotency --------------------------------------------------------------------------------


async def test_idempotency_key_replays_the_same_job_and_refuses_another_body(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    key = {"Idempotency-Key": '"order-42"'}
    first = await jobs.client.post("/v1/jobs", json=inference(priority=1), headers=key)
    assert first.status == 202
    job = await first.json()
    assert "Idempotent-Replayed" not in first.headers

    # Same body with its keys in another order: the canonical JSON is the same.
    reordered = {"priority": 1, "input": inference()["input"], "type": "inference"}
    replay = await jobs.client.post("/v1/jobs", json=reordered, headers={"Idempotency-Key": "order-42"})
    assert replay.status == 202
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert (await replay.json())["id"] == job["id"]

    other = await jobs.client.post("/v1/jobs", json=inference(priority=2), headers=key)
    assert other.status == 422
    assert (await other.json())["error"]["type"] == "idempotency_key_reused"
    assert await jobs.counts() == {JobStatus.QUEUED: 1}
    assert jobs.sample("jobs_submitted_total", {"type": "inference"}) == 1


# --- listing ------------------------------------------------------------------------------------


async def test_list_filters_and_paginates_newest_first(start_jobs: StartJobs) -> None:
    clock = TickingClock()
    jobs = await start_jobs(start_runner=False, clock=clock)
    ids = []
    for n in range(5):
        ids.append((await jobs.submit(inference(metadata={"n": n})))["id"])
    item = {"path": "/v1/chat/completions", "body": CHAT}
    for _ in range(2):
        resp = await jobs.client.post("/v1/batches", json={"items": [item]})
        ids.append((await resp.json())["id"])
    await jobs.client.post(f"/v1/jobs/{ids[1]}/cancel")
    newest_first = ids[::-1]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        resp = await jobs.client.get("/v1/jobs", params=params)
        assert resp.status == 200
        page = await resp.json()
        pages += 1
        assert len(page["jobs"]) <= 3
        assert all("input" not in j for j in page["jobs"])
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first
    assert pages == 3

    async def listed(**params: str) -> list[str]:
        resp = await jobs.client.get("/v1/jobs", params=params)
        assert resp.status == 200, await resp.text()
        return [j["id"] for j in (await resp.json())["jobs"]]

    assert await listed(status="cancelled") == [ids[1]]
    assert await listed(type="batch") == newest_first[:2]
    assert await listed(type="batch", status="queued") == newest_first[:2]
    assert await listed(type="pipeline") == []
    created = [(await jobs.get(i))["created_at"] for i in ids]
    # created_after/before are exclusive; RFC 3339 and epoch seconds both work.
    assert await listed(created_after=created[4]) == newest_first[:2]
    assert await listed(created_before=created[2]) == [ids[1], ids[0]]
    epoch = datetime.fromisoformat(created[3]).timestamp()
    assert await listed(created_after=str(epoch), created_before=created[5]) == [ids[4]]
    with_offset = datetime.fromisoformat(created[0]).astimezone(UTC).isoformat()  # ...+00:00
    assert await listed(created_after=with_offset, limit="100") == newest_first[:-1]
    assert (await (await jobs.client.get("/v1/jobs")).json())["next_cursor"] is None


# --- bad input: clean errors and nothing stored -------------------------------------------------

BAD_SUBMISSIONS: dict[str, tuple[bytes, dict[str, str], int, str, str]] = {
    # id: (body, headers, status, error type, words in the message)
    "malformed_json": (b'{"type": "inference", ', {}, 400, "invalid_request", "not valid JSON"),
    "empty_body": (b"", {}, 400, "invalid_request", "empty body"),
    "not_an_object": (b"[1, 2]", {}, 422, "validation_error", "JSON object"),
    "priority_is_a_string": (
        b'{"type": "inference", "input": {"path": "/v1/x"}, "priority": "high"}',
        {},
        422,
        "validation_error",
        "priority",
    ),
    "max_attempts_zero": (
        b'{"type": "inference", "input": {"path": "/v1/x"}, "max_attempts": 0}',
        {},
        422,
        "validation_error",
        "max_attempts",
    ),
    "timeout_above_max": (
        b'{"type": "inference", "input": {"path": "/v1/x"}, "timeout_s": 99999999}',
        {},
        422,
        "validation_error",
        "timeout_s",
    ),
    "input_missing": (b'{"type": "inference"}', {}, 422, "validation_error", "input"),
    "unknown_field": (
        b'{"type": "inference", "input": {"path": "/v1/x"}, "colour": "red"}',
        {},
        422,
        "validation_error",
        "colour",
    ),
    "unknown_type": (b'{"type": "teleport", "input": {}}', {}, 422, "validation_error", "teleport"),
    "bad_inference_input": (
        b'{"type": "inference", "input": {"path": "no-slash"}}',
        {},
        422,
        "validation_error",
        "input.path",
    ),
    "bad_idempotency_key": (
        b'{"type": "inference", "input": {"path": "/v1/x"}}',
        {"Idempotency-Key": "x" * 300},
        400,
        "invalid_request",
        "Idempotency-Key",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SUBMISSIONS))
async def test_bad_submission_is_refused_and_stores_nothing(start_jobs: StartJobs, case: str) -> None:
    body, headers, status, error_type, words = BAD_SUBMISSIONS[case]
    jobs = await start_jobs(start_runner=False, max_timeout_s=3600)
    resp = await jobs.client.post(
        "/v1/jobs", data=body, headers={"Content-Type": "application/json", **headers}
    )
    assert resp.status == status, await resp.text()
    data = await resp.json()
    assert set(data) == {"error"}
    assert data["error"]["type"] == error_type
    assert words in data["error"]["message"]
    assert "Traceback" not in data["error"]["message"]
    assert await jobs.counts() == {}
    assert jobs.sample("jobs_submitted_total", {"type": "inference"}) == 0


async def test_bad_batch_is_refused_and_stores_nothing(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    resp = await jobs.client.post("/v1/batches", json={"items": [], "parallel_limit": 4})
    assert resp.status == 422
    assert "items" in (await resp.json())["error"]["message"]
    assert await jobs.counts() == {}


async def test_oversized_submission_is_413_by_content_length_and_by_stream(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, max_input_bytes=4096)
    big = inference(body={**CHAT, "padding": "x" * 10_000})
    resp = await jobs.client.post("/v1/jobs", json=big)
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        payload = orjson.dumps(big)
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    # No Content-Length (chunked): the read stops at the limit.
    resp = await jobs.client.post("/v1/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "payload_too_large"
    assert await jobs.counts() == {}
    # Just under the limit is fine.
    assert (await jobs.client.post("/v1/jobs", json=inference())).status == 202


@pytest.mark.parametrize(
    ("path", "status", "error_type"),
    [
        ("/v1/jobs/not-a-uuid", 400, "invalid_request"),
        ("/v1/jobs/not-a-uuid/events", 400, "invalid_request"),
        ("/v1/jobs/not-a-uuid/result", 400, "invalid_request"),
        ("/v1/jobs/3f1c1d2e-1111-4222-8333-944444444444", 404, "not_found"),
        ("/v1/jobs/3f1c1d2e-1111-4222-8333-944444444444/events", 404, "not_found"),
        ("/v1/jobs/3f1c1d2e-1111-4222-8333-944444444444/logs", 404, "not_found"),
        ("/v1/jobs/3f1c1d2e-1111-4222-8333-944444444444/result", 404, "not_found"),
        ("/v1/jobs?status=done", 400, "invalid_request"),
        ("/v1/jobs?limit=0", 400, "invalid_request"),
        ("/v1/jobs?limit=101", 400, "invalid_request"),
        ("/v1/jobs?limit=ten", 400, "invalid_request"),
        ("/v1/jobs?created_after=yesterday", 400, "invalid_request"),
        ("/v1/jobs?created_before=2024-01-01T00:00:00", 400, "invalid_request"),
        ("/v1/jobs?created_after=nan", 400, "invalid_request"),
        ("/v1/jobs?cursor=bm90LWEtY3Vyc29y", 400, "invalid_request"),
        ("/v1/jobs?cursor=%%%", 400, "invalid_request"),
        ("/v1/nothing-here", 404, "not_found"),
    ],
)
async def test_bad_reads_are_json_errors(
    start_jobs: StartJobs, path: str, status: int, error_type: str
) -> None:
    jobs = await start_jobs(start_runner=False)
    await jobs.submit(inference())
    resp = await jobs.client.get(path)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["type"] == error_type
    assert await jobs.counts() == {JobStatus.QUEUED: 1}


async def test_bad_cancel_and_log_level_change_nothing(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    job = await jobs.submit(inference())
    for method, path, status in [
        ("POST", "/v1/jobs/nope/cancel", 400),
        ("DELETE", "/v1/jobs/3f1c1d2e-1111-4222-8333-944444444444", 404),
        ("GET", f"/v1/jobs/{job['id']}/logs?level=loud", 400),
        ("PUT", "/v1/jobs", 405),
    ]:
        resp = await jobs.client.request(method, path)
        assert resp.status == status, (method, path, await resp.text())
        assert "error" in await resp.json()
    assert await jobs.counts() == {JobStatus.QUEUED: 1}


# --- health, readiness, metrics -----------------------------------------------------------------


async def test_health_readiness_and_metrics(start_jobs: StartJobs, store_path: Path) -> None:
    store = SqliteJobStore(store_path)
    await store.open()
    jobs = await start_jobs(start_runner=False, store=store)
    assert (await jobs.client.get("/healthz")).status == 200
    resp = await jobs.client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ready"

    await jobs.submit(inference())
    resp = await jobs.client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    assert 'jobs_submitted_total{type="inference"} 1.0' in text
    assert "jobs_queued 1.0" in text
    assert jobs.sample("jobs_submitted_total", {"type": "inference"}) == 1
    assert re.search(r'^jobs_build_info\{version="[^"]+"\} 1\.0$', text, re.M)
    assert "process_resident_memory_bytes" in text
    assert "_created" not in text

    await store.close()  # the store goes away: not ready, but still alive
    resp = await jobs.client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "store_unavailable"
    assert (await jobs.client.get("/healthz")).status == 200
    resp = await jobs.client.get(f"/v1/jobs/{'3f1c1d2e-1111-4222-8333-944444444444'}")
    assert resp.status == 503
    assert (await resp.json())["error"]["type"] == "store_unavailable"


async def test_runner_started_later_runs_what_was_queued(start_jobs: StartJobs, gateway_url: str) -> None:
    jobs = await start_jobs(start_runner=False, gateway_url=gateway_url)
    job = await jobs.submit(inference())
    await asyncio.sleep(0.1)
    assert (await jobs.get(job["id"]))["status"] == "queued"
    await jobs.app[RUNNER].start()
    assert (await jobs.wait_for(job["id"]))["status"] == "completed"
