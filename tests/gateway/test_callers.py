"""Callers of a shared gateway, through real loopback upstreams: keys, model lists, limits."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
import pytest

from gateway.config import GatewaySettings
from gateway.policy.callers import Callers, TokenBucket, presented_key
from tests.conftest import MockUpstream, RunningGateway, StartGateway, StartMock

CHAT = {"model": "llama-3-70b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ALICE = "sk-alice-0123456789"
BOB = "sk-bob-9876543210"


def callers(**alice: Any) -> list[dict[str, Any]]:
    return [
        {"name": "alice", "key": ALICE, **alice},
        {"name": "bob", "key_sha256": hashlib.sha256(BOB.encode()).hexdigest(), "models": ["llama-3-8b"]},
    ]


async def call(
    gw: RunningGateway, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, Any, dict[str, Any]]:
    async with gw.client.post("/v1/chat/completions", json=body or CHAT, headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def mock(start_mock: StartMock) -> MockUpstream:
    return await start_mock("a")


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("sk-wrong"), {"Authorization": "Basic " + ALICE}, {"Authorization": "Bearer"}],
    ids=["none", "unknown", "not-bearer", "empty"],
)
async def test_a_request_without_a_known_key_gets_401_and_is_not_forwarded(
    mock: MockUpstream, start_gateway: StartGateway, headers: dict[str, str]
) -> None:
    gw = await start_gateway(mock.spec, callers=callers())
    status, _, answer = await call(gw, headers)
    assert status == 401
    assert answer["error"]["type"] == "unauthorized"
    assert mock.stats.requests == 0


@pytest.mark.parametrize("headers", [bearer(ALICE), {"api-key": ALICE}], ids=["bearer", "api-key"])
async def test_a_known_key_is_served_and_never_forwarded(
    mock: MockUpstream, start_gateway: StartGateway, headers: dict[str, str]
) -> None:
    gw = await start_gateway(
        {"name": "a", "url": mock.url, "headers": {"Authorization": "Bearer upstream-key"}}, callers=callers()
    )
    status, _, _ = await call(gw, headers)
    assert status == 200
    sent = {k.lower(): v for k, v in (mock.stats.last_headers or {}).items()}
    assert sent.get("authorization") == "Bearer upstream-key"  # the upstream's own key, not the caller's
    assert "api-key" not in sent
    assert ALICE not in str(sent)


async def test_a_key_given_by_its_digest_or_from_the_environment_works(
    mock: MockUpstream, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALICE_KEY", ALICE)
    gw = await start_gateway(
        mock.spec,
        callers=[
            {"name": "alice", "key": "${ALICE_KEY}"},
            {"name": "bob", "key_sha256": hashlib.sha256(BOB.encode()).hexdigest()},
        ],
    )
    assert (await call(gw, bearer(ALICE)))[0] == 200
    assert (await call(gw, bearer(BOB)))[0] == 200


async def test_a_model_outside_the_callers_list_gets_403(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(
        {"name": "a", "url": a.url, "models": ["llama-3-70b", "llama-3-8b"]}, callers=callers()
    )
    status, _, answer = await call(gw, bearer(BOB))  # bob may use llama-3-8b only
    assert status == 403
    assert answer["error"]["type"] == "model_not_allowed"
    assert (await call(gw, bearer(BOB), {**CHAT, "model": "llama-3-8b"}))[0] == 200
    assert a.stats.requests == 1


async def test_a_caller_over_its_requests_per_minute_gets_429_with_retry_after(
    mock: MockUpstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(mock.spec, callers=callers(requests_per_minute=6))  # a burst of one
    assert (await call(gw, bearer(ALICE)))[0] == 200
    status, headers, answer = await call(gw, bearer(ALICE))
    assert status == 429
    assert answer["error"]["type"] == "caller_rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 10
    assert (await call(gw, bearer(BOB), {**CHAT, "model": "llama-3-8b"}))[0] == 200  # bob is not limited
    assert mock.stats.requests == 2


async def test_a_caller_limit_holds_under_concurrent_load(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    slow = await start_mock("a", latency_s=0.3)
    gw = await start_gateway(slow.spec, callers=callers(max_inflight=3))
    results = await asyncio.gather(*(call(gw, bearer(ALICE)) for _ in range(12)))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 3
    assert statuses.count(429) == 9
    assert slow.stats.requests == 3
    assert gw.state.proxy._admission.callers.by_name["alice"].inflight == 0  # type: ignore[union-attr]
    assert (await call(gw, bearer(ALICE)))[0] == 200  # given back


async def test_metrics_and_access_log_name_the_caller(
    mock: MockUpstream, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_gateway(mock.spec, callers=callers(), access_log=True)
    caplog.set_level("INFO", logger="gateway.access")
    await call(gw, bearer(ALICE))
    await call(gw, bearer("sk-wrong"))
    assert gw.sample("gateway_model_requests_total", {"model": "", "caller": "alice", "code": "200"}) == 1
    assert gw.sample("gateway_model_requests_total", {"model": "", "caller": "", "code": "401"}) == 1
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert [line["caller"] for line in lines] == ["alice", None]


# Pure parts --------------------------------------------------------------------------------------


def test_identify_finds_the_caller_by_key_and_nothing_else() -> None:
    settings = GatewaySettings(upstreams=["http://127.0.0.1:1"], callers=callers())
    table = Callers(list(settings.callers), 0.0)
    assert (table.identify(ALICE.encode()) or table).name == "alice"  # type: ignore[union-attr]
    assert table.identify(b"sk-alice") is None
    assert table.identify(None) is None


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=2.0, tokens=2.0, stamp=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(1.0) == 0.0


@pytest.mark.parametrize(
    ("authorization", "api_key", "key"),
    [
        (b"Bearer abc", None, b"abc"),
        (b"bearer  abc ", None, b"abc"),
        (None, b"abc", b"abc"),
        (b"Basic abc", None, None),
        (b"Basic abc", b"k", b"k"),
        (None, None, None),
    ],
)
def test_presented_key(authorization: bytes | None, api_key: bytes | None, key: bytes | None) -> None:
    assert presented_key(authorization, api_key) == key


async def test_the_model_list_needs_a_caller_key_too(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway({"name": "a", "url": a.url, "models": ["llama-3-70b"]}, callers=callers())
    async with gw.client.get("/v1/models") as resp:
        assert resp.status == 401
    async with gw.client.get("/v1/models", headers=bearer(ALICE)) as resp:
        assert resp.status == 200
        assert [m["id"] for m in (await resp.json())["data"]] == ["llama-3-70b"]
