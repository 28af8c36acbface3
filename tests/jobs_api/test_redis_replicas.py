"""Replicas on Redis: the Redis store's own guarantees, then real `jobs-api` processes sharing one Redis.

Every test uses its own key prefix (the `redis_prefix` fixture deletes its keys afterwards; the
server may be shared, so nothing here flushes a database). The process tests run three real
`jobs-api` replicas, a real gateway and mock upstreams on 127.0.0.1, and kill every process at the end.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection

from jobs_api.app import create_app
from jobs_api.errors import StoreUnavailable
from jobs_api.handlers import HandlerRegistry, JobContext
from jobs_api.keys import STORE
from jobs_api.metrics import JobsMetrics
from jobs_api.models import Job, JobStatus, request_cancel, transition
from jobs_api.runner import JobRunner
from jobs_api.store import open_store, redacted_url
from jobs_api.store.base import JobEvent, JobQuery, LogLevel, LogLine
from jobs_api.store.redis import Keys, RedisJobStore, order_member, sortable
from tests.conftest import AiohttpClient, free_port
from tests.gateway.test_cli import Proc, Spawn, start_gateway_proc, start_mock_proc
from tests.jobs_api.conftest import (
    T0,
    JobsSettingsFactory,
    MakeJob,
    open_redis,
    prefixed_keys,
)
from tests.jobs_api.faults import FaultProxy
from tests.jobs_api.test_cli import clean_env, start_jobs_proc
from tests.jobs_api.test_routes import CHAT, inference

T = TypeVar("T")


async def eq(value: Awaitable[T], expected: T) -> bool:
    return await value == expected


async def until(check: Callable[[], Awaitable[T | None]], within_s: float, every_s: float = 0.05) -> T:
    """The first truthy result of `check()`, polled every `every_s`; fails after `within_s`."""
    async with asyncio.timeout(within_s):
        while True:
            if result := await check():
                return result
            await asyncio.sleep(every_s)


# --- the Redis store on its own -------------------------------------------------------------------


def test_sortable_orders_like_the_numbers() -> None:
    values = [-1e300, -2.5, -0.0, 0.0, 1e-300, 1.0, T0, T0 + 0.001, 1e300, float("inf")]
    assert sorted(values, key=sortable) == sorted(values)
    assert sortable(-0.0) == sortable(0.0)
    assert order_member(T0, "b") > order_member(T0, "a") > order_member(T0 - 1, "z")


def test_keys_all_start_with_the_prefix_and_quote_tenants() -> None:
    keys = Keys("dep1:")
    names = [
        keys.job("j"),
        keys.events("j"),
        keys.logs("j"),
        keys.idempotency("t", "k"),
        keys.tenant_jobs("t"),
        keys.status_jobs(JobStatus.QUEUED),
        keys.tenant_status_jobs("t", JobStatus.RUNNING),
        keys.queue,
        keys.delayed,
        keys.leases,
        keys.finished,
        keys.all_jobs,
        keys.fairness,
        keys.channel,
    ]
    assert all(name.startswith("dep1:") for name in names)
    assert len(set(names)) == len(names)
    # A ':' in a tenant cannot make two tenants' idempotency keys collide.
    assert keys.idempotency("a:b", "c") != keys.idempotency("a", "b:c")


def test_open_store_dispatches_redis_urls_and_refuses_bad_ones() -> None:
    store = open_store("redis://:s3cret@127.0.0.1:6379/2", prefix="dep1:", retention_s=60)
    assert isinstance(store, RedisJobStore)
    assert store.keys.prefix == "dep1:" and store.retention_s == 60
    assert "s3cret" not in store.safe_url
    assert isinstance(open_store("rediss://user:pw@cache.example:6380/0"), RedisJobStore)
    for bad in ("redis:///0", "redis://host:port/0", "redis://127.0.0.1:6379/jobs"):
        with pytest.raises(ValueError, match="Redis store URL"):
            open_store(bad)
    with pytest.raises(ValueError, match="JOBS_REDIS_PREFIX"):
        open_store("redis://127.0.0.1:6379/0", prefix="")
    assert redacted_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redacted_url("rediss://u:pw@h:1/0") == "rediss://u:***@h:1/0"
    assert redacted_url("redis://h:1/0") == "redis://h:1/0"


async def test_rediss_url_connects_with_tls() -> None:
    store = RedisJobStore.from_url(f"rediss://127.0.0.1:{free_port()}/0", prefix="tls-test:")
    await store.open()  # nothing listens there: open warns, the store reports unavailable
    try:
        assert store.redis.connection_pool.connection_class is SSLConnection
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()


async def test_unreachable_redis_is_store_unavailable_quickly(make_job: MakeJob) -> None:
    store = RedisJobStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="down-test:")
    await store.open()
    try:
        started = time.monotonic()
        for call in (
            store.ping(),
            store.create(make_job()),
            store.get("00000000-0000-4000-8000-000000000000"),
            store.claim("w", T0, 30.0),
            store.list_jobs(JobQuery()),
        ):
            with pytest.raises(StoreUnavailable, match="redis"):
                await call
        assert time.monotonic() - started < 5
        await store.wait_for_events("00000000-0000-4000-8000-000000000000", 0.01)  # still just waits
    finally:
        await store.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A redis-server of our own with a password: (port, password)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (needed to run a Redis with a password)")
    port, password = free_port(), "s3cret-pw"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password]
        + ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)
        yield port, password
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_password_in_the_url_authenticates(private_redis: tuple[int, str], make_job: MakeJob) -> None:
    port, password = private_redis
    store = await open_redis(f"redis://:{password}@127.0.0.1:{port}/0", "pw-test:")
    try:
        job, created = await store.create(make_job())
        assert created and await store.get(job.id) == job
    finally:
        await store.close()
    wrong = RedisJobStore.from_url(f"redis://:nope@127.0.0.1:{port}/0", prefix="pw-test:")
    with pytest.raises(StoreUnavailable) as raised:
        await wrong.open()
    assert "nope" not in raised.value.message and ":***@" in raised.value.message


async def test_prefixes_keep_deployments_apart(redis_url: str, redis_prefix: str, make_job: MakeJob) -> None:
    first = await open_redis(redis_url, redis_prefix + "one:")
    second = await open_redis(redis_url, redis_prefix + "two:")
    try:
        job, _ = await first.create(make_job(tenant="t", idempotency_key="k", request_hash="h"))
        other, created = await second.create(make_job(tenant="t", idempotency_key="k", request_hash="h2"))
        assert created and other.id != job.id
        assert await second.get(job.id) is None
        assert await second.claim("w", T0 + 1, 30.0) == transition(
            other, JobStatus.RUNNING, T0 + 1, attempts=1, worker="w", lease_until=T0 + 31
        )
        assert [j.id for j in (await first.list_jobs(JobQuery()))[0]] == [job.id]
        assert (await first.count_by_status()) == {JobStatus.QUEUED: 1}
    finally:
        await first.close()
        await second.close()
    keys = prefixed_keys(redis_url, redis_prefix)
    assert keys and all(k.startswith((redis_prefix + "one:", redis_prefix + "two:")) for k in keys)


async def test_replicas_wake_each_others_event_waiters(
    redis_url: str, redis_prefix: str, make_job: MakeJob
) -> None:
    a = await open_redis(redis_url, redis_prefix)
    b = await open_redis(redis_url, redis_prefix)
    try:
        job, _ = await a.create(make_job())
        await asyncio.sleep(0.2)  # b's listener has subscribed
        waiter = asyncio.create_task(b.wait_for_events(job.id, 10.0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await a.mutate(job.id, lambda j: request_cancel(j, T0 + 1))
        async with asyncio.timeout(2):
            await waiter
        assert time.monotonic() - started < 1.0
        assert [e.data["status"] for e in await b.events_after(job.id, 0)] == ["queued", "cancelled"]
    finally:
        await a.close()
        await b.close()


async def test_finished_jobs_expire_after_retention_and_purge_leaves_no_keys(
    redis_url: str, redis_prefix: str, make_job: MakeJob
) -> None:
    store = await open_redis(redis_url, redis_prefix, retention_s=1)
    try:
        job, _ = await store.create(make_job(tenant="t", idempotency_key="k", request_hash="h"))
        claimed = await store.claim("w", T0 + 1, 30.0)
        assert claimed is not None
        await store.append_log(job.id, LogLine(T0 + 1, LogLevel.INFO, "working"))
        keys = store.keys
        ttl_keys = [keys.job(job.id), keys.events(job.id), keys.logs(job.id), keys.idempotency("t", "k")]
        assert [await store.redis.ttl(k) for k in ttl_keys] == [-1, -1, -1, -1]  # alive: no expiry
        await store.mutate(job.id, lambda j: transition(j, JobStatus.COMPLETED, T0 + 2, result=1))
        await store.append_log(job.id, LogLine(T0 + 2, LogLevel.INFO, "attempt 1 completed"))
        assert all([0 < await store.redis.ttl(k) <= 1 for k in ttl_keys])

        # Redis expires them by itself...
        async def expired() -> bool:
            return await store.redis.exists(*ttl_keys) == 0

        await until(expired, within_s=10)
        assert await store.get(job.id) is None
        assert (await store.list_jobs(JobQuery()))[0] == []
        # ...a new submission may reuse the key...
        again, created = await store.create(make_job(tenant="t", idempotency_key="k", request_hash="h2"))
        assert created and again.id != job.id
        await store.mutate(again.id, lambda j: request_cancel(j, T0 + 3))
        # ...and the purge drops what the indexes still name: only the fair-queuing clocks stay.
        assert await store.purge_finished(time.time()) == 2
        assert prefixed_keys(redis_url, redis_prefix) == [keys.fairness]
        assert await store.count_by_status() == {}
    finally:
        await store.close()


async def test_list_by_type_scans_past_other_types(store_redis: RedisJobStore, make_job: MakeJob) -> None:
    store = store_redis
    wanted = [make_job(type="batch", created_at=T0 + 1000 + i) for i in range(2)]
    for job in wanted:
        await store.create(job)
    for i in range(450):  # more than a scan chunk of other types in between
        await store.create(make_job(created_at=T0 + 100 + i / 10))
    wanted.append(make_job(type="batch", created_at=T0))
    await store.create(wanted[2])
    page, cursor = await store.list_jobs(JobQuery(type="batch", limit=2))
    assert [j.id for j in page] == [wanted[1].id, wanted[0].id] and cursor is not None
    page, cursor = await store.list_jobs(JobQuery(type="batch", limit=2, cursor=cursor))
    assert [j.id for j in page] == [wanted[2].id] and cursor is None


@pytest.fixture
async def store_redis(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisJobStore]:
    store = await open_redis(redis_url, redis_prefix)
    try:
        yield store
    finally:
        await store.close()


# --- an outage: Redis away while a job runs -------------------------------------------------------


class CuttableProxy:
    """A loopback TCP forwarder to Redis that a test can cut (refuse and drop) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, RuntimeError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def report_through_an_outage(ctx: JobContext) -> dict[str, Any]:
    """A job type that reports progress and a log line mid-way, about 0.6 s apart."""
    await asyncio.sleep(0.6)
    await ctx.progress(50, "halfway")
    await ctx.log("info", "halfway there")
    await asyncio.sleep(0.6)
    return {"done": True}


async def test_redis_outage_answers_503_and_a_running_job_is_persisted_once_redis_is_back(
    aiohttp_client: AiohttpClient,
    jobs_settings: JobsSettingsFactory,
    refused_url: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    target = urlsplit(redis_url)
    proxy = CuttableProxy((target.hostname or "127.0.0.1", target.port or 6379))
    await proxy.start()
    registry = HandlerRegistry()
    registry.register("report", report_through_an_outage)
    # The lease outlasts the outage: the attempt keeps its job and records its outcome itself.
    settings = jobs_settings(
        gateway_url=refused_url,
        store=f"redis://127.0.0.1:{proxy.port}/0",
        redis_prefix=redis_prefix,
        lease_s=10.0,
    )
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings, registry=registry))
    try:
        resp = await client.post("/v1/jobs", json={"type": "report", "input": {}})
        assert resp.status == 202
        job_id = (await resp.json())["id"]

        async def status() -> str:
            resp = await client.get(f"/v1/jobs/{job_id}")
            return str((await resp.json())["status"]) if resp.status == 200 else ""

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await until(lambda: eq(status(), "running"), within_s=5, every_s=0.01)

        await proxy.cut()
        started = time.monotonic()
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["status"] == "store_unavailable"
        resp = await client.post("/v1/jobs", json={"type": "report", "input": {}})
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "store_unavailable"
        assert (await client.get(f"/v1/jobs/{job_id}")).status == 503
        assert time.monotonic() - started < 5
        await asyncio.sleep(1.5)  # the handler reports and finishes while Redis is away

        await proxy.start()
        await until(ready, within_s=10)
        await until(lambda: eq(status(), "completed"), within_s=10)
        job = await (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["attempts"] == 1 and job["result"] == {"done": True}  # from memory, not run again
        events = await (await client.get(f"/v1/jobs/{job_id}/events")).text()
        snapshots = [orjson.loads(line[6:]) for line in events.splitlines() if line.startswith("data: ")]
        assert [(s["status"], s["progress"]["percent"]) for s in snapshots] == [
            ("queued", 0.0),
            ("running", 0.0),
            ("running", 50.0),  # reported during the outage, stored before the outcome
            ("completed", 100.0),
        ]
        logs = await (await client.get(f"/v1/jobs/{job_id}/logs")).json()
        assert [line["message"] for line in logs["logs"]] == ["halfway there", "attempt 1 completed"]
    finally:
        await client.close()
        await proxy.cut()


# --- many concurrent store calls: the connection pool ---------------------------------------------


async def hammer(base_url: str, job_ids: list[str], count: int) -> list[int]:
    """`count` concurrent requests (GETs of `job_ids` and submissions), no client-side cap."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def one(n: int) -> int:
            if n % 3 == 0:
                async with session.post(f"{base_url}/v1/jobs", json=inference()) as resp:
                    await resp.read()
                    return resp.status
            async with session.get(f"{base_url}/v1/jobs/{job_ids[n % len(job_ids)]}") as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one(n) for n in range(count))))


@pytest.mark.parametrize("max_connections", [None, 4])
async def test_300_concurrent_requests_wait_for_a_pooled_connection_instead_of_failing(
    aiohttp_client: AiohttpClient,
    jobs_settings: JobsSettingsFactory,
    refused_url: str,
    redis_url: str,
    redis_prefix: str,
    max_connections: int | None,
) -> None:
    pool = {} if max_connections is None else {"redis_max_connections": max_connections}
    settings = jobs_settings(gateway_url=refused_url, store=redis_url, redis_prefix=redis_prefix, **pool)
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings, start_runner=False))
    base_url = str(client.make_url("")).rstrip("/")
    try:
        resp = await client.post("/v1/jobs", json=inference())
        assert resp.status == 202
        job_id = (await resp.json())["id"]
        statuses = await hammer(base_url, [job_id], 300)
        assert statuses.count(200) == 200 and statuses.count(202) == 100, sorted(set(statuses))
        store = client.app[STORE]
        assert isinstance(store, RedisJobStore)
        connections = store.redis.connection_pool
        assert isinstance(connections, BlockingConnectionPool)
        assert connections.max_connections == (max_connections or 100)
    finally:
        await client.close()


async def test_an_event_stream_whose_store_breaks_ends_with_an_error_event(
    aiohttp_client: AiohttpClient,
    jobs_settings: JobsSettingsFactory,
    refused_url: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    target = urlsplit(redis_url)
    proxy = FaultProxy((target.hostname or "127.0.0.1", target.port or 6379))
    await proxy.start()
    settings = jobs_settings(
        gateway_url=refused_url,
        store=proxy.url(int(target.path.strip("/") or 0)),
        redis_prefix=redis_prefix,
        sse_poll_s=0.05,
    )
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings, start_runner=False))
    try:
        resp = await client.post("/v1/jobs", json=inference())
        assert resp.status == 202
        job_id = (await resp.json())["id"]
        async with client.get(f"/v1/jobs/{job_id}/events") as stream:
            first = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
            assert first.startswith(b"id: ") and b"event: state" in first
            await proxy.close()  # Redis is gone: every connection reset, new ones refused
            rest = await asyncio.wait_for(stream.content.read(), 10)
        assert rest.startswith(b"event: error\ndata: "), rest
        frames = [frame for frame in rest.decode().split("\n\n") if frame]
        assert len(frames) == 1
        error = orjson.loads(frames[0].split("data: ", 1)[1])["error"]
        assert error["type"] == "store_unavailable" and "redis" in error["message"]
    finally:
        await client.close()
        await proxy.close()


# --- a submission whose reply is lost: the answer agrees with what was stored ----------------------


async def app_behind(
    proxy: FaultProxy,
    aiohttp_client: AiohttpClient,
    jobs_settings: JobsSettingsFactory,
    redis_url: str,
    redis_prefix: str,
) -> tuple[TestClient[Any, Any], RedisJobStore]:
    """A jobs app (no runner) whose Redis store talks through `proxy` with a 0.5 s socket timeout."""
    db = int(urlsplit(redis_url).path.strip("/") or 0)
    store = await open_redis(proxy.url(db), redis_prefix, socket_timeout_s=0.5)
    settings = jobs_settings(gateway_url="http://127.0.0.1:9", redis_prefix=redis_prefix)
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings, store=store, start_runner=False))
    # Open a few connections (and load the scripts) while the proxy forwards.
    warm = await asyncio.gather(*(client.post("/v1/jobs", json=inference()) for _ in range(5)))
    assert [resp.status for resp in warm] == [202] * 5
    return client, store


async def test_a_submission_whose_reply_is_lost_answers_202_once_it_is_stored(
    aiohttp_client: AiohttpClient,
    jobs_settings: JobsSettingsFactory,
    redis_url: str,
    redis_prefix: str,
) -> None:
    target = urlsplit(redis_url)
    proxy = FaultProxy((target.hostname or "127.0.0.1", target.port or 6379))
    await proxy.start()
    direct = await open_redis(redis_url, redis_prefix)
    client, store = await app_behind(proxy, aiohttp_client, jobs_settings, redis_url, redis_prefix)
    try:
        proxy.drop_replies()  # Redis runs every write; no answer comes back
        posts = [asyncio.create_task(client.post("/v1/jobs", json=inference())) for _ in range(5)]
        await until(lambda: asyncio.sleep(0, result=proxy.replies_dropped > 0), within_s=5, every_s=0.01)
        # Longer than a socket timeout and redis-py's own re-send: a 503 here used to be a lie.
        await asyncio.sleep(0.8)
        proxy.heal()
        answers = [await post for post in posts]
        statuses = [resp.status for resp in answers]
        # Every answer agrees with the store: nothing stored behind a 503.
        assert await direct.count_by_status() == {JobStatus.QUEUED: 5 + statuses.count(202)}, statuses
        # A 503 comes only from a write that never left (a new connection's handshake timed out).
        assert set(statuses) <= {202, 503} and statuses.count(202) >= 3, statuses
        ids = [(await resp.json())["id"] for resp in answers if resp.status == 202]
        assert len(set(ids)) == len(ids)
        for job_id in ids:  # stored once each: one job, one "queued" event
            job = await direct.get(job_id)
            assert job is not None and job.status is JobStatus.QUEUED
            assert states(await direct.events_after(job_id, 0)) == [("queued", 0)]

    finally:
        await client.close()
        await store.close()
        await direct.close()
        await proxy.close()


async def test_a_submission_never_answered_is_not_a_503_but_names_the_job_to_check(
    aiohttp_client: AiohttpClient,
    jobs_settings: JobsSettingsFactory,
    redis_url: str,
    redis_prefix: str,
) -> None:
    target = urlsplit(redis_url)
    proxy = FaultProxy((target.hostname or "127.0.0.1", target.port or 6379))
    await proxy.start()
    direct = await open_redis(redis_url, redis_prefix)
    client, store = await app_behind(proxy, aiohttp_client, jobs_settings, redis_url, redis_prefix)
    try:
        proxy.blackhole()  # a partition: the write may or may not have reached Redis
        started = time.monotonic()
        resp = await client.post("/v1/jobs", json=inference())
        elapsed = time.monotonic() - started
        body = await resp.json()
        assert resp.status == 504, body
        error = body["error"]
        assert error["type"] == "outcome_unknown" and "unknown" in error["message"]
        job_id = error["job_id"]
        assert resp.headers["Location"] == f"/v1/jobs/{job_id}" and job_id in error["message"]
        assert elapsed < 5, elapsed  # bounded: the first timeout plus three more
        proxy.heal()
        # Here the blackhole dropped the write, so the check says: not stored.
        assert await direct.get(job_id) is None
        resp = await client.get(f"/v1/jobs/{job_id}")
        assert resp.status == 404
    finally:
        await client.close()
        await store.close()
        await direct.close()
        await proxy.close()


# --- a replica cut off from Redis: its lease runs out ---------------------------------------------


async def test_a_replica_cut_off_from_redis_stops_its_attempt_by_the_lease_deadline(
    jobs_settings: JobsSettingsFactory,
    refused_url: str,
    redis_url: str,
    redis_prefix: str,
    make_job: MakeJob,
) -> None:
    """Two runners share Redis; one reaches it through a proxy that is then blackholed.

    The cut-off runner cannot renew its lease, so it must stop its attempt before the lease runs
    out (and record nothing); the other runner then runs the job to completion, once.
    """
    target = urlsplit(redis_url)
    proxy = FaultProxy((target.hostname or "127.0.0.1", target.port or 6379))
    await proxy.start()
    seen: list[tuple[str, float]] = []

    async def stalls(ctx: JobContext) -> None:
        seen.append(("a-started", time.monotonic()))
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append(("a-cancelled", time.monotonic()))
            raise

    async def finishes(ctx: JobContext) -> dict[str, str]:
        seen.append(("b-started", time.monotonic()))
        await asyncio.sleep(0.2)
        seen.append(("b-finished", time.monotonic()))
        return {"by": "b"}

    lease_s = 1.5
    settings = jobs_settings(gateway_url=refused_url, lease_s=lease_s, concurrency=1)
    db = int(target.path.strip("/") or 0)
    store_a = await open_redis(proxy.url(db), redis_prefix)
    store_b = await open_redis(redis_url, redis_prefix)
    runners = []
    for name, handler, store in (("a", stalls, store_a), ("b", finishes, store_b)):
        registry = HandlerRegistry()
        registry.register("work", handler)
        metrics = JobsMetrics(CollectorRegistry())
        runners.append(JobRunner(store, settings, registry, metrics, worker_id=f"replica-{name}"))
    runner_a, runner_b = runners
    try:
        await runner_a.start()
        job, _ = await store_b.create(make_job(type="work", input={}, created_at=time.time()))
        await until(lambda: asyncio.sleep(0, result=bool(seen)), within_s=5, every_s=0.01)
        await asyncio.sleep(lease_s)  # renewals go through while Redis is reachable
        running = await store_b.get(job.id)
        assert running is not None and running.status is JobStatus.RUNNING
        assert running.worker == "replica-a" and running.attempts == 1

        proxy.blackhole()
        cut_at = time.monotonic()
        await runner_b.start()

        async def finished() -> Job | None:
            current = await store_b.get(job.id)
            return current if current is not None and current.status.terminal else None

        done = await until(finished, within_s=15, every_s=0.05)
        assert [kind for kind, _ in seen] == ["a-started", "a-cancelled", "b-started", "b-finished"]
        times = dict(seen)
        # Its last renewal was sent before the cut, so the lease (less a margin) ends within lease_s.
        assert times["a-cancelled"] - cut_at < lease_s, times["a-cancelled"] - cut_at
        assert times["a-cancelled"] <= times["b-started"]  # never on two replicas at once
        assert done.status is JobStatus.COMPLETED and done.result == {"by": "b"}
        assert done.attempts == 2 and done.worker is None
        events = await store_b.events_after(job.id, 0)
        assert states(events) == [
            ("queued", 0),
            ("running", 1),
            ("queued", 1),
            ("running", 2),
            ("completed", 2),
        ]
        requeued = [e for e in events if e.data["status"] == "queued"][1]
        assert requeued.data["error"]["type"] == "worker_lost"  # by the sweep, not by replica a
    finally:
        await proxy.close()
        for runner in runners:
            await runner.stop()
        await store_a.close()
        await store_b.close()


# --- real replicas ------------------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Spawn]:
    """Start subprocesses that are always killed and reaped when the test ends."""
    started: list[Proc] = []

    def start(args: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        proc = Proc(args, clean_env() if env is None else env, tmp_path)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.close()


async def request(
    method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(method, url, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


async def start_replicas(
    procs: Spawn, count: int, gateway_port: int, redis_url: str, prefix: str, **env: str
) -> list[tuple[Proc, str]]:
    environment = clean_env(
        JOBS_REDIS_PREFIX=prefix,
        JOBS_LEASE_S="2",
        JOBS_POLL_INTERVAL_S="0.1",
        JOBS_CONCURRENCY="4",
        JOBS_BACKOFF_BASE_S="0.05",
        JOBS_BACKOFF_MAX_S="0.2",
        JOBS_SHUTDOWN_GRACE_S="1",
        **env,
    )
    args = ["serve", "--gateway-url", f"http://127.0.0.1:{gateway_port}", "--store", redis_url]
    return list(await asyncio.gather(*(start_jobs_proc(procs, *args, env=environment) for _ in range(count))))


async def start_inference(procs: Spawn, latency_s: float) -> int:
    """Two mock upstreams behind a gateway process; the gateway's port."""
    mocks = await asyncio.gather(
        *(start_mock_proc(procs, name, "--latency", str(latency_s)) for name in "ab")
    )
    _, port, _ = await start_gateway_proc(
        procs,
        *(arg for name, (_, url) in zip("ab", mocks, strict=True) for arg in ("--upstream", f"{name}={url}")),
        "--health-interval",
        "60",
        "--strategy",
        "round_robin",
    )
    return port


def runs_on(job: Job, proc: Proc) -> bool:
    """True when `job` is running in the process `proc` (worker ids carry the pid)."""
    return job.status is JobStatus.RUNNING and f"-{proc.popen.pid}-" in (job.worker or "")


async def all_jobs(store: RedisJobStore, **filters: Any) -> list[Job]:
    jobs: list[Job] = []
    cursor: tuple[float, str] | None = None
    while True:
        page, cursor = await store.list_jobs(JobQuery(limit=500, cursor=cursor, **filters))
        jobs.extend(page)
        if cursor is None:
            return jobs


def states(events: list[JobEvent]) -> list[tuple[str, int]]:
    return [(e.data["status"], e.data["attempts"]) for e in events if e.type == "state"]


async def submit_spread(replicas: Sequence[tuple[Proc, str]], count: int) -> list[str]:
    """Submit `count` inference jobs round-robin, each with its own idempotency key; like a
    failover proxy, move on to the next replica when one does not answer. The job ids in order."""
    limit = asyncio.Semaphore(20)

    async def submit(n: int) -> str:
        async with limit:
            for k in range(2 * len(replicas)):
                _, base = replicas[(n + k) % len(replicas)]
                try:
                    status, view, _ = await request(
                        "POST", f"{base}/v1/jobs", inference(), {"Idempotency-Key": f"job-{n}"}
                    )
                except aiohttp.ClientError:
                    continue
                assert status == 202, view
                return str(view["id"])
            raise AssertionError(f"no replica took job {n}")

    return list(await asyncio.gather(*(submit(n) for n in range(count))))


async def running_in(store: RedisJobStore, proc: Proc) -> list[Job]:
    """The jobs running in `proc`."""
    return [job for job in await all_jobs(store, status=JobStatus.RUNNING) if runs_on(job, proc)]


async def check_completed_exactly_once(store: RedisJobStore, ids: list[str], lost: list[Job]) -> None:
    """Every job completed once, with one `running` state per attempt; `lost` ones ran again."""
    jobs = {job.id: job for job in await all_jobs(store)}
    assert sorted(jobs) == sorted(ids)
    assert await store.count_by_status() == {JobStatus.COMPLETED: len(ids)}
    for job in jobs.values():
        seen = states(await store.events_after(job.id, 0))
        assert [s for s, _ in seen].count("completed") == 1 and seen[-1] == ("completed", job.attempts)
        assert [a for s, a in seen if s == "running"] == list(range(1, job.attempts + 1)), seen
        assert job.result["status"] == 200 and job.worker is None and job.lease_until is None
    for job in lost:
        after = jobs[job.id]
        assert after.attempts > job.attempts, after
        # Requeued when the dead replica's lease ran out, then run by a survivor.
        assert ("queued", job.attempts) in states(await store.events_after(job.id, 0))
    assert await store.redis.zcard(store.keys.leases) == 0
    assert await store.redis.zcard(store.keys.queue) == 0


async def test_three_replicas_finish_200_jobs_exactly_once_when_one_is_killed(
    procs: Spawn, redis_url: str, redis_prefix: str
) -> None:
    gateway_port = await start_inference(procs, latency_s=0.15)
    replicas = await start_replicas(procs, 3, gateway_port, redis_url, redis_prefix)
    store = await open_redis(redis_url, redis_prefix)
    try:
        submitting = asyncio.create_task(submit_spread(replicas, 200))
        # SIGKILL replica 0 while it runs jobs of its own.
        victim, _ = replicas[0]

        async def busy() -> bool:
            return len(await running_in(store, victim)) >= 2

        await until(busy, within_s=15, every_s=0.01)
        victim.popen.send_signal(signal.SIGKILL)
        assert await victim.wait_exit() == -signal.SIGKILL
        # Its jobs stay `running` under its worker id until their lease (2 s) runs out.
        lost = await running_in(store, victim)
        assert lost
        ids = await submitting
        assert len(set(ids)) == 200

        # A replayed key answers the same job from any replica.
        for n in (0, 1, 2):
            status, view, headers = await request(
                "POST", f"{replicas[1 + n % 2][1]}/v1/jobs", inference(), {"Idempotency-Key": f"job-{n}"}
            )
            assert status == 202 and view["id"] == ids[n] and headers["Idempotent-Replayed"] == "true"

        async def all_completed() -> bool:
            return (await store.count_by_status()).get(JobStatus.COMPLETED, 0) == 200

        await until(all_completed, within_s=30, every_s=0.2)
        await check_completed_exactly_once(store, ids, lost)
        # The survivors answer for every job, whichever replica ran it.
        for job_id in ids[:10]:
            status, view, _ = await request("GET", f"{replicas[2][1]}/v1/jobs/{job_id}")
            assert status == 200 and view["status"] == "completed"

        # Key growth: with a tiny retention, purge and expiry leave only the event counter.
        for proc, _ in replicas[1:]:
            proc.popen.send_signal(signal.SIGTERM)
        for proc, _ in replicas[1:]:
            assert await proc.wait_exit(within_s=15) == 0, proc.output()
        await start_replicas(procs, 1, gateway_port, redis_url, redis_prefix, JOBS_RETENTION_S="1")

        async def only_the_fair_clocks_left() -> bool:
            return prefixed_keys(redis_url, redis_prefix) == [store.keys.fairness]

        await until(only_the_fair_clocks_left, within_s=15, every_s=0.2)
    finally:
        await store.close()


class SseReader:
    """Server-Sent Events of one job from one replica."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def events(self) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
        frame: dict[str, str] = {}
        async for raw in self.resp.content:
            line = raw.decode().rstrip("\n")
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    frame[name] = value
                continue
            if "id" in frame:
                yield int(frame["id"]), frame["event"], orjson.loads(frame["data"])
            frame = {}


async def test_replicas_cancel_and_stream_events_of_jobs_running_elsewhere(
    procs: Spawn, redis_url: str, redis_prefix: str
) -> None:
    gateway_port = await start_inference(procs, latency_s=0.2)
    replicas = await start_replicas(procs, 3, gateway_port, redis_url, redis_prefix)
    store = await open_redis(redis_url, redis_prefix)
    item = {"method": "POST", "path": "/v1/chat/completions", "body": CHAT}
    try:

        async def running_on(job_id: str) -> int:
            """Index of the replica that runs the job."""
            async with asyncio.timeout(10):
                while True:
                    job = await store.get(job_id)
                    assert job is not None
                    for n, (proc, _) in enumerate(replicas):
                        if runs_on(job, proc):
                            return n
                    await asyncio.sleep(0.02)

        # Events: follow on one replica, resume on another, while a third runs the job.
        batch = {"type": "batch", "input": {"items": [item] * 8, "parallel_limit": 1}}
        status, job, _ = await request("POST", f"{replicas[0][1]}/v1/jobs", batch)
        assert status == 202, job
        runner = await running_on(job["id"])
        first, second = [replicas[n][1] for n in range(3) if n != runner]
        received: list[tuple[int, str, dict[str, Any]]] = []
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{first}/v1/jobs/{job['id']}/events") as resp:
                async for event in SseReader(resp).events():
                    received.append(event)
                    if event[1] == "progress":
                        break  # the client drops off mid-job
            headers = {"Last-Event-ID": str(received[-1][0])}
            async with (
                asyncio.timeout(20),
                session.get(f"{second}/v1/jobs/{job['id']}/events", headers=headers) as resp,
            ):
                async for event in SseReader(resp).events():
                    received.append(event)
        stored = await store.events_after(job["id"], 0)
        assert [e[0] for e in received] == [e.id for e in stored]  # nothing lost, nothing twice
        assert [(e[1], e[2]["status"]) for e in received][-1] == ("state", "completed")
        assert sum(1 for e in received if e[1] == "progress") >= 4  # reported by the worker elsewhere

        # Cancel: asked on one replica, the job stops on the replica running it within about a second.
        long = {"type": "batch", "input": {"items": [item] * 100, "parallel_limit": 1}}
        status, job, _ = await request("POST", f"{replicas[1][1]}/v1/jobs", long)
        assert status == 202, job
        runner = await running_on(job["id"])
        other = replicas[(runner + 1) % 3][1]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        status, view, _ = await request("POST", f"{other}/v1/jobs/{job['id']}/cancel")
        assert status == 202 and view["cancel_requested"] is True

        async def stopped() -> Job | None:
            current = await store.get(job["id"])
            return None if current is None or current.status is JobStatus.RUNNING else current

        current = await until(stopped, within_s=5, every_s=0.02)
        elapsed = time.monotonic() - started
        assert current.status is JobStatus.CANCELLED
        assert elapsed < 2.0, elapsed
        assert current.progress.percent < 50
    finally:
        await store.close()
