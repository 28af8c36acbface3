"""Shared jobs API fixtures: settings factory, a real store on tmp_path, jobs, a real gateway.

Everything runs for real on 127.0.0.1: a SQLite file under `tmp_path`, a real Redis (TEST_REDIS_URL,
default redis://127.0.0.1:6379/0; each test gets its own key prefix and deletes its keys, never
the whole database: the server may be shared), mock-inference upstreams and a gateway app server
in front of them (fixtures from tests/conftest.py). Without a reachable Redis the Redis tests skip,
except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs_api.config import JobsSettings
from jobs_api.models import Job, new_job_id
from jobs_api.store.base import JobStore
from jobs_api.store.redis import RedisJobStore
from jobs_api.store.sqlite import SqliteJobStore
from tests.conftest import MockUpstream, StartGateway, StartMock

JobsSettingsFactory = Callable[..., JobsSettings]
MakeJob = Callable[..., Job]
# `await start_jobs_gateway(mock_a, mock_b, strategy="priority")` -> the gateway's base URL
StartJobsGateway = Callable[..., Awaitable[str]]

# Wall-clock base for jobs made by `make_job`: far from 0 so deadlines and leases are realistic.
T0 = 1_700_000_000.0


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """The SQLite file every store and runner of one test shares."""
    return tmp_path / "jobs.db"


@pytest.fixture
def jobs_settings(store_path: Path) -> JobsSettingsFactory:
    """`jobs_settings(concurrency=2)`: fast test settings (short lease, poll and backoff)."""

    def make(**overrides: Any) -> JobsSettings:
        values: dict[str, Any] = {
            "store": f"sqlite:///{store_path}",
            "concurrency": 4,
            "lease_s": 1.0,
            "poll_interval_s": 0.05,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "request_timeout_s": 10.0,
            "default_timeout_s": 30.0,
            "shutdown_grace_s": 0.5,
            **overrides,
        }
        return JobsSettings(**values)

    return make


async def open_sqlite(path: Path) -> SqliteJobStore:
    """An opened SQLite store on `path` (the caller closes it)."""
    store = SqliteJobStore(path)
    await store.open()
    return store


DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a Redis that answers PING; skips the test without one (fails in CI instead)."""
    url = os.environ.get("TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        reason = f"no Redis answers at {url} ({exc}); start redis-server or set TEST_REDIS_URL"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires the Redis tests to run: {reason}")
        pytest.skip(reason)
    finally:
        client.close()
    return url


def prefixed_keys(url: str, prefix: str) -> list[str]:
    """Every key starting with `prefix` (SCAN, never KEYS)."""
    assert prefix and not any(c in prefix for c in "*?[]\\"), prefix
    with redis.Redis.from_url(url, decode_responses=True) as client:
        return list(client.scan_iter(match=f"{prefix}*", count=1000))


def delete_keys(url: str, prefix: str) -> None:
    """Delete one test's keys (never FLUSHDB: the server may be shared)."""
    keys = prefixed_keys(url, prefix)
    if keys:
        with redis.Redis.from_url(url) as client:
            client.unlink(*keys)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix for one test; every key under it is deleted afterwards."""
    prefix = f"test-jobs-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        delete_keys(redis_url, prefix)


async def open_redis(url: str, prefix: str, **options: Any) -> RedisJobStore:
    """An opened Redis store on `prefix` (the caller closes it)."""
    store = RedisJobStore.from_url(url, prefix=prefix, **options)
    await store.open()
    return store


async def open_another(store: JobStore, store_path: Path) -> JobStore:
    """A second store on the same data: another connection (SQLite) or another replica (Redis)."""
    if isinstance(store, RedisJobStore):
        return await open_redis(store.url, store.keys.prefix)
    return await open_sqlite(store_path)


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, store_path: Path) -> AsyncIterator[JobStore]:
    """An opened store, closed after the test; parametrized over the SQLite and Redis backends."""
    backend = request.param
    if backend == "sqlite":
        opened: JobStore = await open_sqlite(store_path)
    else:
        prefix: str = request.getfixturevalue("redis_prefix")
        opened = await open_redis(request.getfixturevalue("redis_url"), prefix)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def make_job() -> MakeJob:
    """`make_job(priority=5, created_at=...)`: a queued inference job; each call is 1 ms newer."""
    ticks = itertools.count()

    def make(**fields: Any) -> Job:
        now = T0 + next(ticks) / 1000
        values: dict[str, Any] = {
            "id": new_job_id(),
            "type": "inference",
            "input": {"method": "POST", "path": "/v1/chat/completions", "body": {"model": "m"}},
            "created_at": now,
            **fields,
        }
        values.setdefault("updated_at", values["created_at"])
        return Job(**values)

    return make


@pytest.fixture
def start_jobs_gateway(start_gateway: StartGateway) -> StartJobsGateway:
    """Start a real gateway server in front of mock upstreams; returns its base URL."""

    async def start(*upstreams: MockUpstream | str, **overrides: Any) -> str:
        specs = [u.spec if isinstance(u, MockUpstream) else u for u in upstreams]
        return (await start_gateway(*specs, **overrides)).url

    return start


@pytest.fixture
async def mocks(start_mock: StartMock) -> tuple[MockUpstream, MockUpstream]:
    """Two healthy mock-inference upstreams, "a" and "b"."""
    return await start_mock("a"), await start_mock("b")


@pytest.fixture
async def gateway_url(mocks: tuple[MockUpstream, MockUpstream], start_jobs_gateway: StartJobsGateway) -> str:
    """Base URL of a real gateway in front of two healthy mock upstreams (`mocks`)."""
    return await start_jobs_gateway(*mocks, strategy="priority")
