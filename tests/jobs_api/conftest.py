"""Shared jobs API fixtures: settings factory, a real store on tmp_path, jobs, a real gateway.

Everything runs for real on 127.0.0.1: a SQLite file under `tmp_path`, mock-inference upstreams
and a gateway app server in front of them (fixtures from tests/conftest.py).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from jobs_api.config import JobsSettings
from jobs_api.models import Job, new_job_id
from jobs_api.store.base import JobStore
from jobs_api.store.sqlite import SqliteJobStore
from tests.conftest import AiohttpServer, MockUpstream, StartMock, settings_for

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


@pytest.fixture(params=["sqlite"])
async def store(request: pytest.FixtureRequest, store_path: Path) -> AsyncIterator[JobStore]:
    """An opened store, closed after the test; parametrized over backends (Redis joins later)."""
    backend = request.param
    if backend == "sqlite":
        opened: JobStore = await open_sqlite(store_path)
    else:  # pragma: no cover - future backends
        raise AssertionError(f"unknown store backend {backend!r}")
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
def start_jobs_gateway(aiohttp_server: AiohttpServer) -> StartJobsGateway:
    """Start a real gateway server in front of mock upstreams; returns its base URL."""

    async def start(*upstreams: MockUpstream | str, **overrides: Any) -> str:
        specs = [u.spec if isinstance(u, MockUpstream) else u for u in upstreams]
        server = await aiohttp_server(create_app(settings_for(*specs, **overrides)))
        return str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
async def mocks(start_mock: StartMock) -> tuple[MockUpstream, MockUpstream]:
    """Two healthy mock-inference upstreams, "a" and "b"."""
    return await start_mock("a"), await start_mock("b")


@pytest.fixture
async def gateway_url(mocks: tuple[MockUpstream, MockUpstream], start_jobs_gateway: StartJobsGateway) -> str:
    """Base URL of a real gateway in front of two healthy mock upstreams (`mocks`)."""
    return await start_jobs_gateway(*mocks, strategy="priority")
