"""Fairness between tenants: capped priorities, round robin within a priority, bounded listings,
and event ids that say nothing about other tenants. Real stores (SQLite file, Redis) and a real app.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from jobs_api.models import Job, JobStatus, Progress, request_cancel, transition
from jobs_api.store.base import JobStore
from jobs_api.store.redis import order_member
from tests.conftest import AiohttpClient
from tests.jobs_api.conftest import T0, JobsSettingsFactory, MakeJob, open_redis, open_sqlite
from tests.jobs_api.test_routes import StartJobs, TickingClock, inference, jobs_starter

NOW = T0 + 1000


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    return jobs_starter(aiohttp_client, jobs_settings)


async def claim_ids(store: JobStore, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        job = await store.claim("w", NOW, 30.0)
        assert job is not None
        ids.append(job.id)
    return ids


async def create_all(store: JobStore, make_job: MakeJob, count: int, **fields: Any) -> list[Job]:
    return [(await store.create(make_job(**fields)))[0] for _ in range(count)]


# --- priorities -----------------------------------------------------------------------------------


async def test_priority_above_the_maximum_is_refused(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    resp = await jobs.client.post("/v1/jobs", json=inference(priority=11))
    assert resp.status == 422, await resp.text()
    message = (await resp.json())["error"]["message"]
    assert message.startswith("priority:") and "10" in message and "JOBS_MAX_PRIORITY" in message
    assert (await jobs.client.post("/v1/jobs", json=inference(priority=1000))).status == 422
    assert (await jobs.client.post("/v1/jobs", json=inference(priority=10))).status == 202
    assert (await jobs.client.post("/v1/jobs", json=inference(priority=-5))).status == 202

    capped = await start_jobs(start_runner=False, max_priority=3)
    assert (await capped.client.post("/v1/jobs", json=inference(priority=4))).status == 422
    assert (
        await capped.client.post("/v1/batches", json={"items": [{"path": "/v1/x"}], "priority": 4})
    ).status == 422
    assert (await capped.client.post("/v1/jobs", json=inference(priority=3))).status == 202


# --- round robin between tenants ------------------------------------------------------------------


async def test_tenant_submitting_after_a_flood_is_served_within_the_first_claims(
    store: JobStore, make_job: MakeJob
) -> None:
    flood = await create_all(store, make_job, 50, tenant="a")
    late = await create_all(store, make_job, 5, tenant="b")
    first = await claim_ids(store, 10)
    assert {j.id for j in late} <= set(first), "tenant b waited behind tenant a's flood"
    rest = await claim_ids(store, 45)
    assert await store.claim("w", NOW, 30.0) is None
    # Each tenant's own jobs still go oldest first.
    order = first + rest
    assert [i for i in order if i in {j.id for j in flood}] == [j.id for j in flood]
    assert [i for i in order if i in {j.id for j in late}] == [j.id for j in late]


async def test_tenant_claimed_most_recently_goes_after_a_waiting_tenant(
    store: JobStore, make_job: MakeJob
) -> None:
    await create_all(store, make_job, 20, tenant="a")
    await claim_ids(store, 5)  # only a has jobs: a is served
    newcomer = await create_all(store, make_job, 2, tenant="c")
    following = await claim_ids(store, 3)
    assert following[0] == newcomer[0].id  # a was served last, c waits: c goes first
    assert newcomer[1].id in following
    # A higher priority still comes first, whoever asks.
    urgent = (await store.create(make_job(tenant="a", priority=1)))[0]
    assert await claim_ids(store, 1) == [urgent.id]


async def test_sqlite_round_robin_holds_across_connections(store_path: Path, make_job: MakeJob) -> None:
    first, second = await open_sqlite(store_path), await open_sqlite(store_path)
    try:
        await create_all(first, make_job, 30, tenant="a")
        late = await create_all(second, make_job, 3, tenant="b")
        claimed = await claim_ids(first, 3) + await claim_ids(second, 3)
        assert {j.id for j in late} <= set(claimed)
    finally:
        await first.close()
        await second.close()


# --- listings bounded by bytes --------------------------------------------------------------------


async def test_listing_page_stops_before_max_list_bytes_and_the_cursor_continues(
    start_jobs: StartJobs,
) -> None:
    cap = 64 * 1024
    jobs = await start_jobs(start_runner=False, clock=TickingClock(), max_list_bytes=cap)
    ids = [(await jobs.submit(inference(metadata={"blob": "x" * 20_000})))["id"] for _ in range(10)]
    huge = (await jobs.submit(inference(metadata={"blob": "y" * 100_000})))["id"]
    pages: list[list[str]] = []
    cursor = None
    while True:
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        resp = await jobs.client.get("/v1/jobs", params=params)
        assert resp.status == 200, await resp.text()
        body = await resp.read()
        page = orjson.loads(body)
        pages.append([job["id"] for job in page["jobs"]])
        if len(page["jobs"]) > 1:
            assert len(body) <= cap, len(body)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages[0] == [huge]  # bigger than the cap on its own: sent alone, never skipped
    assert all(1 <= len(page) <= 3 for page in pages[1:])
    seen = [job_id for page in pages for job_id in page]
    assert seen == [huge, *ids[::-1]]


# --- event ids --------------------------------------------------------------------------------------


def progressed(percent: float) -> Callable[[Job], Job]:
    return lambda job: job.model_copy(update={"progress": Progress(percent=percent), "updated_at": NOW})


async def test_event_ids_count_per_job_whatever_other_tenants_do(store: JobStore, make_job: MakeJob) -> None:
    mine, _ = await store.create(make_job(tenant="a"))
    theirs, _ = await store.create(make_job(tenant="b"))
    await store.claim("w", NOW, 30.0)  # claims mine (older)
    for percent in range(1, 8):
        await store.mutate(theirs.id, progressed(percent))
    await store.mutate(mine.id, lambda j: request_cancel(j, NOW + 1))
    await store.mutate(mine.id, progressed(50))
    events = await store.events_after(mine.id, 0)
    assert [e.id for e in events] == [1, 2, 3]
    assert [e.id for e in await store.events_after(theirs.id, 0)] == list(range(1, 9))
    # Last-Event-ID resume.
    assert await store.events_after(mine.id, 1) == events[1:]
    assert await store.events_after(mine.id, 3) == []


async def test_sse_ids_of_a_job_start_at_one(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    for _ in range(3):
        other = await jobs.submit(inference())
        await jobs.client.post(f"/v1/jobs/{other['id']}/cancel")
    job = await jobs.submit(inference())
    await jobs.client.post(f"/v1/jobs/{job['id']}/cancel")
    text = await (await jobs.client.get(f"/v1/jobs/{job['id']}/events")).text()
    assert [line for line in text.splitlines() if line.startswith("id: ")] == ["id: 1", "id: 2"]
    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "1"})
    assert [line for line in (await resp.text()).splitlines() if line.startswith("id: ")] == ["id: 2"]


# --- stores written by the previous version --------------------------------------------------------

OLD_SQLITE_SCHEMA = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL DEFAULT '', type TEXT NOT NULL,
    status TEXT NOT NULL, priority INTEGER NOT NULL, created_at REAL NOT NULL, run_after REAL NOT NULL,
    lease_until REAL, finished_at REAL, idempotency_key TEXT, data TEXT NOT NULL);
CREATE INDEX jobs_queue ON jobs (status, priority DESC, created_at, id);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL,
    type TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX events_job ON events (job_id, id);
CREATE TABLE logs (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL,
    level INTEGER NOT NULL, message TEXT NOT NULL);
"""


async def test_sqlite_file_of_the_previous_version_opens_and_resumes(
    store_path: Path, make_job: MakeJob
) -> None:
    old = make_job(tenant="a")
    conn = sqlite3.connect(store_path)
    conn.executescript(OLD_SQLITE_SCHEMA)
    conn.execute(
        "INSERT INTO jobs VALUES (?, 'a', 'inference', 'queued', 0, ?, 0, NULL, NULL, NULL, ?)",
        (old.id, old.created_at, old.model_dump_json()),
    )
    conn.execute("INSERT INTO events (id, job_id, time, type, data) VALUES (41, 'other', 0, 'state', '{}')")
    snapshot = orjson.dumps({"status": "queued", "attempts": 0, "progress": Progress().model_dump()})
    conn.execute(
        "INSERT INTO events (id, job_id, time, type, data) VALUES (42, ?, ?, 'state', ?)",
        (old.id, old.created_at, snapshot.decode()),
    )
    conn.commit()
    conn.close()

    store = await open_sqlite(store_path)
    try:
        newer, _ = await store.create(make_job(tenant="b"))
        assert await claim_ids(store, 2) == [old.id, newer.id]
        ids = [e.id for e in await store.events_after(old.id, 0)]
        assert ids == [42, 43]  # a client holding Last-Event-ID 42 resumes where it was
        assert [e.id for e in await store.events_after(old.id, 42)] == [43]
        assert [e.id for e in await store.events_after(newer.id, 0)] == [1, 2]
    finally:
        await store.close()


async def test_redis_data_of_the_previous_version_is_claimed_and_resumes(
    redis_url: str, redis_prefix: str, make_job: MakeJob
) -> None:
    old = make_job(tenant="a")
    order = order_member(old.created_at, old.id)
    p = redis_prefix
    with redis.Redis.from_url(redis_url) as client:  # what the previous version's COMMIT wrote
        client.hset(f"{p}job:{old.id}", mapping={"data": old.model_dump_json(), "v": 1})
        client.zadd(f"{p}queue", {order: 0})
        for index in (
            f"{p}idx:all",
            f"{p}idx:tenant:a",
            f"{p}idx:status:queued",
            f"{p}idx:tenant-status:a:queued",
        ):
            client.zadd(index, {order: 0})
        client.xadd(
            f"{p}events:{old.id}", {"type": "state", "time": repr(old.created_at), "data": "{}"}, id="57-0"
        )
        client.set(f"{p}event-counter", 57)
    store = await open_redis(redis_url, redis_prefix)
    try:
        newer, _ = await store.create(make_job(tenant="b"))
        assert await claim_ids(store, 2) == [old.id, newer.id]
        assert [e.id for e in await store.events_after(old.id, 0)] == [57, 58]
        assert [e.id for e in await store.events_after(old.id, 57)] == [58]
        assert [e.id for e in await store.events_after(newer.id, 0)] == [1, 2]
        # Back to the queue (a retry) and out of it again, under its old queue member.
        await store.mutate(old.id, lambda j: transition(j, JobStatus.QUEUED, NOW))
        assert await claim_ids(store, 1) == [old.id]
        await store.mutate(old.id, lambda j: transition(j, JobStatus.COMPLETED, NOW, result=1))
        assert await store.claim("w", NOW, 30.0) is None
        with redis.Redis.from_url(redis_url) as client:
            assert client.zcard(f"{p}queue") == 0
    finally:
        await store.close()
