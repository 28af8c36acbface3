"""The result cache through the real jobs app, on both stores (a SQLite file and the real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis

from jobs_api.app import create_app
from jobs_api.caching import MAX_CACHE_TTL_S, CacheEntry, cache_key, canonical_json, complete_from, is_hit
from jobs_api.config import ApiKey
from jobs_api.handlers import JobContext
from jobs_api.job_types import default_registry
from jobs_api.models import JobStatus
from jobs_api.store.base import JobStore
from jobs_api.store.redis import RedisJobStore
from tests.conftest import AiohttpClient, free_port
from tests.jobs_api.conftest import JobsSettingsFactory, MakeJob

KEYS = {
    "key-a": ApiKey(tenant="org-a"),
    "key-b": ApiKey(tenant="org-b"),
    "key-admin": ApiKey(tenant="ops", roles=("admin",)),
}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
ADMIN = {"Authorization": "Bearer key-admin"}


@dataclass
class Echo:
    """A job type that counts its runs and answers with its input."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, ctx: JobContext) -> dict[str, Any]:
        self.runs.append(ctx.input)
        return {"echo": ctx.input, "run": len(self.runs)}


@dataclass
class Api:
    """A jobs app on a real store, with the Echo job type."""

    client: Any
    echo: Echo

    async def submit(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        resp = await self.client.post("/v1/jobs", json=body, headers=headers)
        assert resp.status == 202, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data

    async def finished(self, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while True:
            resp = await self.client.get(f"/v1/jobs/{job_id}", headers=headers)
            job: dict[str, Any] = await resp.json()
            if job["status"] in ("completed", "failed", "cancelled", "timed_out"):
                return job
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.02)

    async def stats(self, headers: dict[str, str]) -> dict[str, Any]:
        resp = await self.client.get("/v1/cache/stats", headers=headers)
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


StartApi = Callable[[], Awaitable[Api]]


@pytest.fixture
def start_api(store: JobStore, aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartApi:
    async def start() -> Api:
        echo = Echo()
        registry = default_registry()
        registry.register("echo", echo)
        # Nothing listens on the gateway port: a batch job submitted here never reaches anything.
        settings = jobs_settings(api_keys=KEYS, gateway_url=f"http://127.0.0.1:{free_port()}")
        app = create_app(settings, store=store, registry=registry)
        return Api(await aiohttp_client(app), echo)

    return start


def echo_job(text: str = "hello", ttl_s: float | None = 3600, **input_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "echo", "input": {"text": text, **input_fields}}
    if ttl_s is not None:
        body["cache"] = {"ttl_s": ttl_s}
    return body


async def test_cache_hit_completes_at_once_with_cache_info(start_api: StartApi) -> None:
    api = await start_api()
    first = await api.submit(echo_job(options={"b": 1, "a": 2}), A)
    assert first["cache"] == {"ttl_s": 3600} and "cache_info" not in first
    done = await api.finished(first["id"], A)
    assert done["status"] == "completed"

    # The same input with its keys in another order: the canonical JSON is the same.
    again = await api.submit(
        {"cache": {"ttl_s": 60}, "input": {"options": {"a": 2, "b": 1}, "text": "hello"}, "type": "echo"}, A
    )
    assert again["status"] == "completed"
    assert again["id"] != first["id"]
    assert (
        again["result"]
        == done["result"]
        == {"echo": {"text": "hello", "options": {"b": 1, "a": 2}}, "run": 1}
    )
    assert again["cache_info"]["source_job_id"] == first["id"]
    assert again["cache_info"]["cached_at"] >= done["finished_at"][:19]
    assert again["attempts"] == 0 and again["progress"]["percent"] == 100
    assert len(api.echo.runs) == 1
    result = await api.client.get(f"/v1/jobs/{again['id']}/result", headers=A)
    assert (await result.json())["result"] == done["result"]
    stats = await api.stats(A)
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1)
    assert stats["bytes"] == len(orjson.dumps(done["result"]))


async def test_cache_misses_on_other_input_and_is_off_by_default(start_api: StartApi) -> None:
    api = await start_api()
    first = await api.finished((await api.submit(echo_job("one"), A))["id"], A)
    other = await api.submit(echo_job("two"), A)
    assert other["status"] == "queued"
    uncached = await api.submit(echo_job("one", ttl_s=None), A)
    assert uncached["status"] == "queued" and "cache" not in uncached
    await api.finished(other["id"], A)
    await api.finished(uncached["id"], A)
    assert [run["text"] for run in api.echo.runs] == ["one", "two", "one"]
    assert first["status"] == "completed"
    # A job completed without `cache` stored nothing; a lookup without `cache` counted nothing.
    stats = await api.stats(A)
    assert (stats["hits"], stats["misses"], stats["entries"]) == (0, 2, 2)


async def test_cache_other_tenant_never_hits(start_api: StartApi) -> None:
    api = await start_api()
    await api.finished((await api.submit(echo_job(), A))["id"], A)
    theirs = await api.submit(echo_job(), B)
    assert theirs["status"] == "queued" and "cache_info" not in theirs
    done = await api.finished(theirs["id"], B)
    assert done["result"]["run"] == 2
    # Each tenant sees only its own numbers; the admin sees the sum.
    assert (await api.stats(A))["entries"] == 1
    b = await api.stats(B)
    assert (b["scope"], b["tenant"], b["hits"], b["misses"], b["entries"]) == ("tenant", "org-b", 0, 1, 1)
    everyone = await api.stats(ADMIN)
    assert (everyone["scope"], everyone["misses"], everyone["entries"]) == ("all", 2, 2)


async def test_cache_entries_expire_after_their_ttl(start_api: StartApi, store: JobStore) -> None:
    api = await start_api()
    source = await api.finished((await api.submit(echo_job(ttl_s=0.4), A))["id"], A)
    hit = await api.submit(echo_job(ttl_s=0.4), A)
    assert hit["cache_info"]["source_job_id"] == source["id"]
    await asyncio.sleep(0.6)
    assert (await api.stats(A))["entries"] == 0
    if isinstance(store, RedisJobStore):  # gone from Redis by the key's own TTL
        key = store.keys.cache_entry("org-a", cache_key("echo", {"text": "hello"}))
        with redis.Redis.from_url(store.url) as client:
            assert client.exists(key) == 0
    late = await api.submit(echo_job(ttl_s=0.4), A)
    assert late["status"] == "queued"
    assert (await api.finished(late["id"], A))["result"]["run"] == 2
    assert await store.cache_sweep(time.time() + 10) == 1


async def test_cache_hit_needs_an_entry_younger_than_the_asked_ttl(start_api: StartApi) -> None:
    api = await start_api()
    await api.finished((await api.submit(echo_job(ttl_s=3600), A))["id"], A)
    await asyncio.sleep(0.3)
    picky = await api.submit(echo_job(ttl_s=0.1), A)
    assert picky["status"] == "queued"
    relaxed = await api.submit(echo_job(ttl_s=60), A)
    assert relaxed["status"] == "completed"


async def test_cache_clear_needs_admin_and_confirm(start_api: StartApi) -> None:
    api = await start_api()
    await api.finished((await api.submit(echo_job(), A))["id"], A)
    await api.finished((await api.submit(echo_job(), B))["id"], B)
    refused = await api.client.delete("/v1/cache?confirm=true", headers=A)
    assert refused.status == 403
    assert (await refused.json())["error"]["type"] == "forbidden"
    unconfirmed = await api.client.delete("/v1/cache", headers=ADMIN)
    assert unconfirmed.status == 400
    assert "confirm=true" in (await unconfirmed.json())["error"]["message"]
    assert (await api.stats(ADMIN))["entries"] == 2
    cleared = await api.client.delete("/v1/cache?confirm=true", headers=ADMIN)
    assert cleared.status == 200 and await cleared.json() == {"deleted": 2}
    everyone = await api.stats(ADMIN)
    assert (everyone["entries"], everyone["bytes"], everyone["misses"]) == (0, 0, 2)
    assert (await api.submit(echo_job(), A))["status"] == "queued"
    unauthenticated = await api.client.get("/v1/cache/stats")
    assert unauthenticated.status == 401


@pytest.mark.parametrize(
    "cache",
    [
        {"ttl_s": 0},
        {"ttl_s": -1},
        {"ttl_s": MAX_CACHE_TTL_S + 1},
        {"ttl_s": "60"},
        {},
        {"ttl_s": 5, "x": 1},
        60,
    ],
)
async def test_cache_bad_ttl_is_422_and_stores_nothing(
    start_api: StartApi, store: JobStore, cache: Any
) -> None:
    api = await start_api()
    resp = await api.client.post("/v1/jobs", json={**echo_job(), "cache": cache}, headers=A)
    assert resp.status == 422, await resp.text()
    assert "cache" in (await resp.json())["error"]["message"]
    assert await store.count_by_status() == {}


async def test_cache_on_batch_shorthand_is_a_job_field(start_api: StartApi) -> None:
    api = await start_api()
    resp = await api.client.post(
        "/v1/batches",
        json={"items": [{"path": "/v1/models", "method": "GET"}], "cache": {"ttl_s": 5}},
        headers=A,
    )
    assert resp.status == 202, await resp.text()
    job = await resp.json()
    assert job["cache"] == {"ttl_s": 5} and "cache" not in job["input"]


# --- pure -----------------------------------------------------------------------------------------


def test_cache_key_ignores_key_order_but_not_type_or_values() -> None:
    assert cache_key("t", {"a": 1, "b": [1, {"y": 2, "x": 1}]}) == cache_key(
        "t", {"b": [1, {"x": 1, "y": 2}], "a": 1}
    )
    assert cache_key("t", {"a": 1}) != cache_key("u", {"a": 1})
    assert cache_key("t", {"a": 1}) != cache_key("t", {"a": 2})
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'


def test_is_hit_needs_live_and_young_enough_entry() -> None:
    entry = CacheEntry("t", "k", "job", "1", cached_at=100.0, expires_at=200.0)
    assert is_hit(entry, 150.0, 60.0)
    assert not is_hit(entry, 150.0, 40.0)
    assert not is_hit(entry, 200.0, 1000.0)
    assert entry.size == 1


def test_complete_from_refuses_a_job_that_ran(make_job: MakeJob) -> None:
    entry = CacheEntry("", "k", "src", "{}", 1.0, 2.0)
    ran = make_job(attempts=1)
    with pytest.raises(ValueError):
        complete_from(ran, entry, {}, 5.0)
    fresh = complete_from(make_job(), entry, {"r": 1}, 5.0)
    assert fresh.status is JobStatus.COMPLETED and fresh.finished_at == 5.0 and fresh.result == {"r": 1}
