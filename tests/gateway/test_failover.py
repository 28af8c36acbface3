"""Failover through a real gateway: failing, rate-limiting, hanging and slow upstreams."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import AiohttpServer, StartGateway, StartMock


async def test_failover_skips_refused_upstream(
    start_mock: StartMock, start_gateway: StartGateway, refused_url: str, chat_body: dict[str, Any]
) -> None:
    good = await start_mock("good")
    gw = await start_gateway(f"dead={refused_url}", good.spec, strategy="round_robin")
    for _ in range(10):
        resp = await gw.client.post("/v1/chat/completions", json=chat_body)
        assert resp.status == 200
        assert resp.headers["X-Gateway-Upstream"] == "good"
    assert gw.sample("gateway_upstream_requests_total", {"upstream": "dead", "outcome": "connect_error"}) >= 1
    assert gw.state.pool.by_name["dead"].health.state(gw.state.clock()) == "ejected"


async def test_failover_retries_503_on_another_upstream(
    start_mock: StartMock, start_gateway: StartGateway, chat_body: dict[str, Any]
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=503)
    good = await start_mock("good")
    gw = await start_gateway(bad.spec, good.spec, strategy="priority")
    resp = await gw.client.post("/v1/chat/completions", json=chat_body)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Upstream"] == "good"
    assert resp.headers["X-Gateway-Attempts"] == "2"
    assert bad.stats.requests == 1
    assert gw.sample("gateway_retries_total", {"reason": "http_5xx"}) == 1


async def test_failover_never_retries_other_4xx(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a", error_rate=1.0, error_status=400)
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    resp = await gw.client.post("/v1/chat/completions", json={})
    assert resp.status == 400
    assert resp.headers["X-Gateway-Attempts"] == "1"
    assert b.stats.requests == 0
    # A client error says nothing bad about the upstream.
    assert gw.state.pool.by_name["a"].health.consecutive_failures == 0


async def test_failover_429_cools_upstream_down_for_retry_after(
    start_mock: StartMock, start_gateway: StartGateway, chat_body: dict[str, Any]
) -> None:
    limited = await start_mock("limited", rate_limit_rate=1.0, retry_after_s=7)
    good = await start_mock("good", latency_s=0.05)
    gw = await start_gateway(limited.spec, good.spec, strategy="priority")
    up = gw.state.pool.by_name["limited"]
    before = up.latency_s
    resp = await gw.client.post("/v1/chat/completions", json=chat_body)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Upstream"] == "good"
    view = {u["name"]: u for u in (await (await gw.admin.get("/admin/upstreams")).json())["upstreams"]}
    assert view["limited"]["state"] == "cooling_down"
    assert 5 < view["limited"]["cooldown_until"] - time.time() <= 7.5
    assert up.health.consecutive_failures == 0
    # A fast 429 must not make the upstream look fast.
    assert up.latency_s == before
    # While cooling down, it gets no traffic.
    for _ in range(5):
        assert (await gw.client.post("/v1/chat/completions", json=chat_body)).status == 200
    assert limited.stats.requests == 1


async def test_failover_all_rate_limited_passes_429_through(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", rate_limit_rate=1.0, retry_after_s=3)
    b = await start_mock("b", rate_limit_rate=1.0, retry_after_s=3)
    gw = await start_gateway(a.spec, b.spec)
    resp = await gw.client.post("/v1/chat/completions", json={})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "3"
    assert resp.headers["X-Gateway-Attempts"] == "2"


async def test_failover_hanging_upstream_times_out_and_retries(
    start_mock: StartMock, start_gateway: StartGateway, chat_body: dict[str, Any]
) -> None:
    hung = await start_mock("hung", hang=True)
    good = await start_mock("good")
    gw = await start_gateway(hung.spec, good.spec, strategy="priority", timeouts={"attempt_s": 0.3})
    started = time.monotonic()
    resp = await gw.client.post("/v1/chat/completions", json=chat_body)
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert resp.headers["X-Gateway-Upstream"] == "good"
    assert 0.25 < elapsed < 2.0
    assert gw.sample("gateway_upstream_requests_total", {"upstream": "hung", "outcome": "timeout"}) == 1


async def test_failover_all_down_answers_json_error_quickly(
    start_gateway: StartGateway, refused_url: str
) -> None:
    from tests.conftest import free_port

    other = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(f"a={refused_url}", f"b={other}")
    started = time.monotonic()
    resp = await gw.client.post("/v1/chat/completions", json={})
    assert time.monotonic() - started < 2.0
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["type"] == "upstream_unavailable"
    assert "connect_error" in error["message"]
    assert sorted(set(error["upstreams_tried"])) == ["a", "b"]


async def test_failover_all_hanging_answers_504(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a", hang=True)
    gw = await start_gateway(a.spec, timeouts={"attempt_s": 0.2}, retry={"max_attempts": 2})
    resp = await gw.client.post("/v1/chat/completions", json={})
    assert resp.status == 504
    assert (await resp.json())["error"]["type"] == "upstream_timeout"


async def test_failover_deadline_header_bounds_all_attempts(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", hang=True)
    b = await start_mock("b", hang=True)
    gw = await start_gateway(a.spec, b.spec)
    started = time.monotonic()
    resp = await gw.client.post("/v1/chat/completions", json={}, headers={"X-Gateway-Timeout": "0.4"})
    elapsed = time.monotonic() - started
    assert resp.status == 504
    assert (await resp.json())["error"]["type"] == "deadline_exceeded"
    assert 0.35 < elapsed < 1.5


async def test_failover_oversized_body_is_streamed_once_without_retry(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=503)
    good = await start_mock("good")
    gw = await start_gateway(bad.spec, good.spec, strategy="priority", retry={"replay_buffer_bytes": 1024})
    resp = await gw.client.post("/echo", data=b"z" * 4096)
    assert resp.status == 503
    assert resp.headers["X-Gateway-Attempts"] == "1"
    assert bad.stats.last_body == b"z" * 4096
    assert good.stats.requests == 0
    assert gw.sample("gateway_retries_skipped_total", {"reason": "body_not_replayable"}) == 1


async def test_failover_small_body_is_replayed_exactly(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=502)
    good = await start_mock("good")
    gw = await start_gateway(bad.spec, good.spec, strategy="priority")
    body = bytes(range(256)) * 16
    resp = await gw.client.post("/echo", data=body)
    assert resp.status == 200
    assert good.stats.last_body == body
    assert bad.stats.last_body == body


async def test_failover_retry_budget_stops_retries(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=503)
    good = await start_mock("good")
    gw = await start_gateway(
        bad.spec, good.spec, strategy="priority", retry={"budget_ratio": 0.0, "budget_min_concurrency": 0}
    )
    resp = await gw.client.post("/v1/chat/completions", json={})
    assert resp.status == 503
    assert gw.sample("gateway_retries_skipped_total", {"reason": "budget_exhausted"}) == 1


async def test_failover_error_response_held_while_retry_waits_frees_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """A 503 is read whole and its attempt ends before the retry waits for the budget."""
    bad = await start_mock("bad", error_rate=1.0, error_status=503)
    gw = await start_gateway(
        bad.spec, retry={"budget_ratio": 0.0, "budget_min_concurrency": 0, "budget_wait_s": 0.5}
    )
    request = asyncio.create_task(gw.client.post("/v1/chat/completions", json={}))
    await asyncio.sleep(0.25)  # the retry is waiting for a budget slot that never comes
    assert not request.done()
    assert gw.state.pool.by_name["bad"].inflight == 0
    # The error's connection went back to the pool instead of being held open.
    assert gw.state.clients[0].idle_connections == 1
    resp = await request
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["type"]  # the upstream's own error body, relayed whole
    assert resp.headers["X-Gateway-Upstream"] == "bad"


async def test_failover_max_attempts_bounds_tries(start_mock: StartMock, start_gateway: StartGateway) -> None:
    mocks = [await start_mock(n, error_rate=1.0, error_status=500) for n in "abcd"]
    gw = await start_gateway(*(m.spec for m in mocks), retry={"max_attempts": 3})
    resp = await gw.client.post("/v1/chat/completions", json={})
    assert resp.status == 500
    assert resp.headers["X-Gateway-Attempts"] == "3"
    assert sum(m.stats.requests for m in mocks) == 3
    assert max(m.stats.requests for m in mocks) == 1  # each retry went to a new upstream


async def test_failover_single_flaky_upstream_is_retried(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", error_rate=0.5, error_status=503)
    gw = await start_gateway(a.spec, retry={"max_attempts": 5}, outlier={"consecutive_failures": 100})
    statuses = [(await gw.client.post("/v1/chat/completions", json={})).status for _ in range(40)]
    # P(5 failures in a row) = 1/32 per request; the seeded mock makes this deterministic.
    assert statuses.count(200) >= 36


async def test_failover_slow_upstream_gets_little_traffic(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    slow = await start_mock("slow", latency_s=0.05)
    fast = await start_mock("fast")
    gw = await start_gateway(slow.spec, fast.spec)
    for _ in range(100):
        assert (await gw.client.post("/v1/chat/completions", json={})).status == 200
    assert slow.stats.requests + fast.stats.requests == 100
    assert slow.stats.requests < 20


async def test_failover_priority_tier_used_only_when_primary_down(
    start_mock: StartMock, start_gateway: StartGateway, refused_url: str
) -> None:
    primary = await start_mock("primary")
    backup = await start_mock("backup")
    gw = await start_gateway(
        {"name": "primary", "url": primary.url, "priority": 0},
        {"name": "backup", "url": backup.url, "priority": 1},
    )
    for _ in range(10):
        await gw.client.post("/v1/chat/completions", json={})
    assert (primary.stats.requests, backup.stats.requests) == (10, 0)
    await primary.server.close()
    for _ in range(10):
        assert (await gw.client.post("/v1/chat/completions", json={})).status == 200
    assert backup.stats.requests == 10


async def test_failover_panic_mode_tries_ejected_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", error_rate=1.0, error_status=500)
    gw = await start_gateway(a.spec, retry={"max_attempts": 1})
    for _ in range(3):
        await gw.client.post("/v1/chat/completions", json={})
    assert gw.state.pool.routable_count(gw.state.clock()) == 0
    a.behaviour.error_rate = 0.0
    resp = await gw.client.post("/v1/chat/completions", json={})
    assert resp.status == 200
    assert gw.sample("gateway_panic_selections_total") == 1
    # A success in panic mode ends the ejection.
    assert gw.state.pool.routable_count(gw.state.clock()) == 1


async def test_failover_max_inflight_spills_to_other_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", latency_s=0.3)
    b = await start_mock("b", latency_s=0.3)
    gw = await start_gateway(
        {"name": "a", "url": a.url, "max_inflight": 1},
        {"name": "b", "url": b.url, "max_inflight": 1},
        strategy="priority",
    )
    results = await asyncio.gather(*(gw.client.post("/v1/chat/completions", json={}) for _ in range(3)))
    statuses = sorted(r.status for r in results)
    assert statuses == [200, 200, 503]
    assert (a.stats.requests, b.stats.requests) == (1, 1)
    shed = next(r for r in results if r.status == 503)
    assert (await shed.json())["error"]["type"] == "no_upstream_available"


async def test_ejection_and_recovery_through_active_checks(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", error_rate=1.0, error_status=500)
    b = await start_mock("b")
    # Passing checks do not end the ejection by request failures: keep it short.
    gw = await start_gateway(
        a.spec,
        b.spec,
        strategy="round_robin",
        health={"interval_s": 0.1, "jitter_ratio": 0.0},
        outlier={"base_ejection_s": 0.5},
    )
    a.behaviour.healthy = False
    for _ in range(8):
        assert (await gw.client.post("/v1/chat/completions", json={})).status == 200
    pool, clock = gw.state.pool, gw.state.clock
    assert pool.by_name["a"].health.state(clock()) in ("ejected", "unhealthy")
    await _wait_for(lambda: pool.by_name["a"].health.state(clock()) == "unhealthy")
    # Fixed: two passing checks bring it back and it gets traffic again.
    a.behaviour.error_rate = 0.0
    a.behaviour.healthy = True
    await _wait_for(lambda: pool.by_name["a"].health.state(clock()) == "healthy")
    before = a.stats.requests
    # Slow start: it comes back at a tenth of its weight, so it takes a few more to be picked.
    for _ in range(30):
        await gw.client.post("/v1/chat/completions", json={})
    assert a.stats.requests > before
    events = (await (await gw.admin.get("/admin/events")).json())["events"]
    assert [e["to"] for e in events if e["upstream"] == "a"][-1] == "healthy"


async def test_passing_check_does_not_end_an_ejection_by_default(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    # The mock answers /health with 200 while every inference request fails: a common failure.
    a = await start_mock("a", error_rate=1.0, error_status=500)
    b = await start_mock("b")
    gw = await start_gateway(
        a.spec, b.spec, strategy="priority", health={"interval_s": 0.05, "jitter_ratio": 0.0}
    )
    for _ in range(3):
        assert (await gw.client.post("/v1/chat/completions", json={})).status == 200
    pool, clock = gw.state.pool, gw.state.clock
    checks = a.stats.health_checks
    await _wait_for(lambda: a.stats.health_checks >= checks + 3, timeout_s=2)
    assert pool.by_name["a"].health.state(clock()) == "ejected"
    assert [e["to"] for e in gw.state.events if e["upstream"] == "a"] == ["ejected"]


async def test_ejection_ended_early_by_passing_check_when_enabled(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", error_rate=1.0, error_status=500)
    b = await start_mock("b")
    gw = await start_gateway(
        a.spec,
        b.spec,
        strategy="priority",
        health={"interval_s": 0.2, "jitter_ratio": 0.0},
        outlier={"uneject_on_health_check": True},
    )
    for _ in range(3):
        assert (await gw.client.post("/v1/chat/completions", json={})).status == 200
    pool, clock = gw.state.pool, gw.state.clock
    # The ejection would last 30 s, but the next passing check ends it.
    await _wait_for(lambda: pool.by_name["a"].health.state(clock()) == "healthy", timeout_s=2)
    events = [e for e in gw.state.events if e["upstream"] == "a"]
    assert [(e["from"], e["to"]) for e in events] == [("healthy", "ejected"), ("ejected", "healthy")]
    assert events[1]["reason"] == "health check passed while ejected"
    assert (
        gw.sample("gateway_upstream_ejections_total", {"upstream": "a", "reason": "consecutive_failures"})
        == 1
    )


async def _wait_for(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_health_path_answering_404_is_logged_once_as_misconfiguration(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    hits: list[str] = []

    async def missing(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/health", missing)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    caplog.set_level("WARNING", logger="gateway.prober")
    gw = await start_gateway(f"a={url}", health={"interval_s": 0.02, "jitter_ratio": 0.0})
    await _wait_for(lambda: len(hits) >= 6, timeout_s=3)
    warned = [r.getMessage() for r in caplog.records if "misconfigured" in r.getMessage()]
    assert warned == [
        f"health check of a is misconfigured: GET {url}/health answered 404: the health path is wrong "
        "for this server: vLLM, TGI, SGLang and llama.cpp serve /health, LiteLLM /health/liveliness; "
        "for a hosted API set health_path: null"
    ]
    view = (await (await gw.admin.get("/admin/upstreams")).json())["upstreams"][0]
    assert view["health_check"]["misconfiguration"].startswith(f"GET {url}/health answered 404")
    assert view["state"] == "unhealthy"  # it still fails: nothing proves the server works
