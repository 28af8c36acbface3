"""Exact Prometheus samples after known traffic through a real gateway."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import AiohttpServer, RunningGateway, StartGateway, StartMock

CHAT: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}


def _upstream_requests(gw: RunningGateway, upstream: str, outcome: str) -> float:
    return gw.sample("gateway_upstream_requests_total", {"upstream": upstream, "outcome": outcome})


def _present(gw: RunningGateway, name: str, labels: dict[str, str]) -> float:
    value = gw.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


async def test_metrics_count_successful_requests(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    for _ in range(3):
        assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert gw.sample("gateway_requests_total", {"code": "200"}) == 3
    assert gw.sample("gateway_request_duration_seconds_count") == 3
    assert gw.sample("gateway_request_duration_seconds_sum") > 0
    assert _upstream_requests(gw, "a", "success") == 3
    for outcome in ("http_4xx", "http_5xx", "rate_limited", "connect_error", "timeout", "reset"):
        assert _present(gw, "gateway_upstream_requests_total", {"upstream": "a", "outcome": outcome}) == 0
    assert gw.sample("gateway_upstream_ttfb_seconds_count", {"upstream": "a"}) == 3
    assert gw.sample("gateway_retries_total", {"reason": "http_5xx"}) == 0
    assert gw.sample("gateway_panic_selections_total") == 0


async def test_metrics_count_each_status_code_separately(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert (await gw.client.get("/no/such/route")).status == 404
    assert (await gw.client.get("/no/such/route")).status == 404
    assert gw.sample("gateway_requests_total", {"code": "200"}) == 1
    assert gw.sample("gateway_requests_total", {"code": "404"}) == 2
    assert gw.sample("gateway_request_duration_seconds_count") == 3
    assert _upstream_requests(gw, "a", "success") == 1
    assert _upstream_requests(gw, "a", "http_4xx") == 2
    # A 4xx is the caller's fault: it neither retries nor counts toward ejection.
    assert gw.sample("gateway_retries_total", {"reason": "http_4xx"}) == 0
    assert gw.state.pool.by_name["a"].health.consecutive_failures == 0


async def test_metrics_http_5xx_retries_and_ejection(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    b = await start_mock("b", error_rate=1.0, error_status=503)
    gw = await start_gateway(b.spec)
    assert gw.sample("gateway_upstream_healthy", {"upstream": "b"}) == 1
    assert _present(gw, "gateway_upstream_state", {"upstream": "b", "state": "healthy"}) == 1
    ejections = {"upstream": "b", "reason": "consecutive_failures"}
    assert _present(gw, "gateway_upstream_ejections_total", ejections) == 0

    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503
    assert resp.headers["X-Gateway-Attempts"] == "3"
    assert b.stats.requests == 3
    assert gw.sample("gateway_requests_total", {"code": "503"}) == 1
    assert _upstream_requests(gw, "b", "http_5xx") == 3
    assert _upstream_requests(gw, "b", "success") == 0
    assert gw.sample("gateway_upstream_ttfb_seconds_count", {"upstream": "b"}) == 3
    assert gw.sample("gateway_retries_total", {"reason": "http_5xx"}) == 2
    assert gw.sample("gateway_upstream_ejections_total", ejections) == 1
    assert gw.sample("gateway_upstream_healthy", {"upstream": "b"}) == 0
    assert gw.sample("gateway_upstream_state", {"upstream": "b", "state": "ejected"}) == 1
    assert gw.sample("gateway_upstream_state", {"upstream": "b", "state": "healthy"}) == 0
    assert _present(gw, "gateway_routable_upstreams", {}) == 0


async def test_metrics_ejection_after_three_failures_in_separate_requests(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    bad = await start_mock("bad", error_rate=1.0, error_status=500)
    gw = await start_gateway(bad.spec, a.spec, strategy="priority", retry={"max_attempts": 1})
    ejections = {"upstream": "bad", "reason": "consecutive_failures"}
    for n in (1, 2):
        assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 500
        assert _upstream_requests(gw, "bad", "http_5xx") == n
        assert gw.sample("gateway_upstream_ejections_total", ejections) == 0
        assert gw.sample("gateway_upstream_healthy", {"upstream": "bad"}) == 1
    assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 500
    assert gw.sample("gateway_upstream_ejections_total", ejections) == 1
    assert gw.sample("gateway_upstream_healthy", {"upstream": "bad"}) == 0
    assert gw.sample("gateway_upstream_healthy", {"upstream": "a"}) == 1
    assert gw.sample("gateway_routable_upstreams") == 1
    # The ejected upstream is skipped from now on.
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Upstream"] == "a"
    assert bad.stats.requests == 3
    assert gw.sample("gateway_requests_total", {"code": "500"}) == 3
    assert gw.sample("gateway_requests_total", {"code": "200"}) == 1


async def test_metrics_rate_limited_outcome(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a", rate_limit_rate=1.0, retry_after_s=5)
    gw = await start_gateway(a.spec)
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 429
    assert _upstream_requests(gw, "a", "rate_limited") == 1
    assert _upstream_requests(gw, "a", "http_4xx") == 0
    assert gw.sample("gateway_requests_total", {"code": "429"}) == 1
    # The only upstream is cooling down and already tried: nothing to retry on.
    assert gw.sample("gateway_retries_skipped_total", {"reason": "no_upstream"}) == 1
    assert gw.sample("gateway_retries_total", {"reason": "rate_limited"}) == 0
    cooldowns = {"upstream": "a", "reason": "rate_limited"}
    assert gw.sample("gateway_upstream_ejections_total", cooldowns) == 1
    assert gw.sample("gateway_upstream_healthy", {"upstream": "a"}) == 0
    assert gw.sample("gateway_upstream_state", {"upstream": "a", "state": "cooling_down"}) == 1


async def test_metrics_rate_limited_retries_on_other_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    busy = await start_mock("busy", rate_limit_rate=1.0)
    ok = await start_mock("ok")
    gw = await start_gateway(busy.spec, ok.spec, strategy="priority")
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Attempts"] == "2"
    assert _upstream_requests(gw, "busy", "rate_limited") == 1
    assert _upstream_requests(gw, "ok", "success") == 1
    assert gw.sample("gateway_retries_total", {"reason": "rate_limited"}) == 1
    assert gw.sample("gateway_requests_total", {"code": "200"}) == 1
    assert gw.sample("gateway_requests_total", {"code": "429"}) == 0


async def test_metrics_connect_error_outcome(start_gateway: StartGateway, refused_url: str) -> None:
    gw = await start_gateway(
        {"name": "r", "url": refused_url, "health_path": None}, retry={"max_attempts": 1}
    )
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    assert (await resp.json())["error"]["type"] == "upstream_unavailable"
    assert _upstream_requests(gw, "r", "connect_error") == 1
    assert gw.sample("gateway_upstream_ttfb_seconds_count", {"upstream": "r"}) == 0
    assert gw.sample("gateway_requests_total", {"code": "502"}) == 1


async def test_metrics_connect_error_retried_on_other_upstream(
    start_mock: StartMock, start_gateway: StartGateway, refused_url: str
) -> None:
    ok = await start_mock("ok")
    gw = await start_gateway(
        {"name": "r", "url": refused_url, "health_path": None}, ok.spec, strategy="priority"
    )
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Upstream"] == "ok"
    assert resp.headers["X-Gateway-Attempts"] == "2"
    assert _upstream_requests(gw, "r", "connect_error") == 1
    assert _upstream_requests(gw, "ok", "success") == 1
    assert gw.sample("gateway_retries_total", {"reason": "connect_error"}) == 1
    assert gw.sample("gateway_upstream_ttfb_seconds_count", {"upstream": "ok"}) == 1
    assert gw.sample("gateway_requests_total", {"code": "200"}) == 1


async def test_metrics_timeout_outcome(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a", hang=True)
    gw = await start_gateway(a.spec, timeouts={"attempt_s": 0.3}, retry={"max_attempts": 1})
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 504
    assert (await resp.json())["error"]["type"] == "upstream_timeout"
    assert _upstream_requests(gw, "a", "timeout") == 1
    assert gw.sample("gateway_requests_total", {"code": "504"}) == 1
    assert gw.sample("gateway_request_duration_seconds_count") == 1
    assert 0.3 <= gw.sample("gateway_request_duration_seconds_sum") < 5
    assert gw.sample("gateway_upstream_inflight", {"upstream": "a"}) == 0


async def test_metrics_timeout_retried_on_other_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    slow = await start_mock("slow", hang=True)
    ok = await start_mock("ok")
    gw = await start_gateway(slow.spec, ok.spec, strategy="priority", timeouts={"attempt_s": 0.3})
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Attempts"] == "2"
    assert _upstream_requests(gw, "slow", "timeout") == 1
    assert gw.sample("gateway_retries_total", {"reason": "timeout"}) == 1


async def test_metrics_retry_skipped_when_body_not_replayable(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=503)
    ok = await start_mock("ok")
    gw = await start_gateway(
        {"name": "bad", "url": bad.url, "priority": 0},
        {"name": "ok", "url": ok.url, "priority": 1},
        retry={"replay_buffer_bytes": 100},
    )
    resp = await gw.client.post("/echo", data=b"x" * 1024)
    assert resp.status == 503
    assert resp.headers["X-Gateway-Attempts"] == "1"
    assert resp.headers["X-Gateway-Upstream"] == "bad"
    assert bad.stats.requests == 1
    assert ok.stats.requests == 0
    assert gw.sample("gateway_retries_skipped_total", {"reason": "body_not_replayable"}) == 1
    assert gw.sample("gateway_retries_total", {"reason": "http_5xx"}) == 0
    assert _upstream_requests(gw, "bad", "http_5xx") == 1
    # A small body to the same pair is buffered and retried: once more in the primary tier, then
    # on `ok`.
    resp = await gw.client.post("/echo", data=b"x" * 50)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Attempts"] == "3"
    assert gw.sample("gateway_retries_total", {"reason": "http_5xx"}) == 2
    assert gw.sample("gateway_retries_skipped_total", {"reason": "body_not_replayable"}) == 1


async def test_metrics_reset_retried_on_other_upstream(
    aiohttp_server: AiohttpServer, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    async def die(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()  # the connection resets before any response
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", die)
    dying = await aiohttp_server(app)
    ok = await start_mock("ok")
    gw = await start_gateway(
        {"name": "dying", "url": str(dying.make_url("")), "health_path": None}, ok.spec, strategy="priority"
    )
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Attempts"] == "2"
    assert _upstream_requests(gw, "dying", "reset") == 1
    assert gw.sample("gateway_retries_total", {"reason": "reset"}) == 1


def _dying_upstream(inflight: int) -> web.Application:
    """An upstream that holds requests until `inflight` are in, then resets every connection at
    once, like a process killed under load."""
    arrived = 0
    all_in = asyncio.Event()

    async def die_together(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        if arrived == inflight:
            all_in.set()
        await all_in.wait()
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", die_together)
    return app


async def test_metrics_dying_upstream_inflight_requests_all_retried(
    aiohttp_server: AiohttpServer, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    # Five retries at once exceed the budget (3); the excess waits for a slot instead of failing.
    inflight = 5
    dying = await aiohttp_server(_dying_upstream(inflight))
    backup = await start_mock("backup", latency_s=0.2)
    gw = await start_gateway(
        {"name": "dying", "url": str(dying.make_url("")), "health_path": None},
        backup.spec,
        strategy="priority",
        outlier={"consecutive_failures": 10},
    )
    responses = await asyncio.gather(
        *(gw.client.post("/v1/chat/completions", json=CHAT) for _ in range(inflight))
    )
    assert sorted(r.status for r in responses) == [200] * inflight
    assert _upstream_requests(gw, "dying", "reset") == inflight
    assert gw.sample("gateway_retries_total", {"reason": "reset"}) == inflight
    assert gw.sample("gateway_retries_skipped_total", {"reason": "budget_exhausted"}) == 0
    assert _upstream_requests(gw, "backup", "success") == inflight
    assert backup.stats.requests == inflight


async def test_metrics_retry_budget_exhausted_without_wait(
    aiohttp_server: AiohttpServer, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    inflight = 5
    dying = await aiohttp_server(_dying_upstream(inflight))
    backup = await start_mock("backup", latency_s=0.2)
    gw = await start_gateway(
        {"name": "dying", "url": str(dying.make_url("")), "health_path": None},
        backup.spec,
        strategy="priority",
        outlier={"consecutive_failures": 10},
        retry={"budget_wait_s": 0},
    )
    responses = await asyncio.gather(
        *(gw.client.post("/v1/chat/completions", json=CHAT) for _ in range(inflight))
    )
    # max(budget_min_concurrency=3, 20% of 5 in flight) retries may run at once; no waiting.
    assert sorted(r.status for r in responses) == [200, 200, 200, 502, 502]
    for resp in responses:
        if resp.status == 502:
            assert (await resp.json())["error"]["type"] == "upstream_unavailable"
            assert resp.headers["X-Gateway-Attempts"] == "1"
    assert gw.sample("gateway_retries_total", {"reason": "reset"}) == 3
    assert gw.sample("gateway_retries_skipped_total", {"reason": "budget_exhausted"}) == 2
    assert backup.stats.requests == 3


async def test_metrics_pool_gauges_at_rest(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a", latency_s=0.02)
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, strategy="round_robin")
    for _ in range(6):
        assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 200
    for name in ("a", "b"):
        assert _present(gw, "gateway_upstream_inflight", {"upstream": name}) == 0
        assert _present(gw, "gateway_upstream_healthy", {"upstream": name}) == 1
        assert _present(gw, "gateway_upstream_latency_ewma_seconds", {"upstream": name}) > 0
        assert gw.sample("gateway_upstream_ttfb_seconds_count", {"upstream": name}) == 3
    ewma_a = gw.sample("gateway_upstream_latency_ewma_seconds", {"upstream": "a"})
    assert ewma_a == gw.state.pool.by_name["a"].latency_s
    assert _present(gw, "gateway_routable_upstreams", {}) == 2
    assert _present(gw, "gateway_requests_in_flight", {}) == 0


async def test_metrics_inflight_while_request_pending(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    import asyncio

    a = await start_mock("a", latency_s=0.5)
    gw = await start_gateway(a.spec)
    pending = asyncio.create_task(gw.client.post("/v1/chat/completions", json=CHAT))
    for _ in range(100):
        if a.stats.requests:
            break
        await asyncio.sleep(0.01)
    assert gw.sample("gateway_upstream_inflight", {"upstream": "a"}) == 1
    assert gw.sample("gateway_requests_in_flight") == 1
    resp = await pending
    assert resp.status == 200
    assert gw.sample("gateway_upstream_inflight", {"upstream": "a"}) == 0
    assert gw.sample("gateway_requests_in_flight") == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_metrics_labels_never_contain_request_path(
    method: str, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    for path in ("/v1/secret-path-xyz", "/echo/secret-path-xyz?token=secret-query-abc"):
        await gw.client.request(method, path, data=b"{}" if method == "POST" else None)
    resp = await gw.admin.get("/metrics")
    text = await resp.text()
    assert "gateway_requests_total" in text
    assert "secret-path-xyz" not in text
    assert "secret-query-abc" not in text
    label_values = re.findall(r'="([^"]*)"', text)
    assert label_values
    assert not any("/" in v for v in label_values), sorted({v for v in label_values if "/" in v})
