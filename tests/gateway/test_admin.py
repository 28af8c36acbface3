"""Admin endpoints of a real gateway in front of real mock upstreams on loopback."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import RunningGateway, StartGateway, StartMock

CHAT: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}
AUTH = {"Authorization": "Bearer s3cret"}


async def _upstreams(gw: RunningGateway) -> dict[str, dict[str, Any]]:
    resp = await gw.admin.get("/admin/upstreams")
    assert resp.status == 200
    data = await resp.json()
    return {u["name"]: u for u in data["upstreams"]}


async def test_healthz_answers_ok(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    resp = await gw.admin.get("/healthz")
    assert resp.status == 200
    assert (await resp.json()) == {"status": "ok"}


async def test_readyz_ready_with_routable_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec)
    resp = await gw.admin.get("/readyz")
    assert resp.status == 200
    data = await resp.json()
    assert data["status"] == "ready"
    assert data["routable_upstreams"] == 2


async def test_readyz_not_ready_when_every_upstream_drained(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, admin_token="s3cret")
    assert (await gw.admin.post("/admin/upstreams/a/drain", headers=AUTH)).status == 200
    resp = await gw.admin.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["routable_upstreams"] == 1
    assert (await gw.admin.post("/admin/upstreams/b/drain", headers=AUTH)).status == 200
    resp = await gw.admin.get("/readyz")
    assert resp.status == 503
    assert (await resp.json()) == {"status": "no_routable_upstream", "routable_upstreams": 0}


async def test_readyz_not_ready_when_every_upstream_ejected(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", error_rate=1.0, error_status=503)
    gw = await start_gateway(a.spec)
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503  # three attempts at the one upstream, all 503
    assert a.stats.requests == 3
    assert (await _upstreams(gw))["a"]["state"] == "ejected"
    resp = await gw.admin.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "no_routable_upstream"


async def test_readyz_not_ready_while_shutting_down(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    gw.state.draining = True
    resp = await gw.admin.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "shutting_down"


async def test_metrics_is_prometheus_text(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 200
    resp = await gw.admin.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert "# TYPE gateway_requests_total counter" in text
    assert 'gateway_requests_total{code="200"} 1.0' in text


async def test_upstreams_lists_state_fields(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, strategy="round_robin")
    resp = await gw.admin.get("/admin/upstreams")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    data = await resp.json()
    assert data["strategy"] == "round_robin"
    assert [u["name"] for u in data["upstreams"]] == ["a", "b"]
    for view in data["upstreams"]:
        assert view["state"] == "healthy"
        assert view["routable"] is True
        assert isinstance(view["latency_ewma_s"], float) and view["latency_ewma_s"] > 0
        assert view["inflight"] == 0
        assert view["consecutive_failures"] == 0
        assert view["ejected_until"] is None
        assert view["cooldown_until"] is None
        assert view["drained"] is False
    assert data["upstreams"][0]["url"] == a.url


async def test_upstreams_shows_failures_ejection_and_cooldown(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=500)
    busy = await start_mock("busy", rate_limit_rate=1.0, retry_after_s=7)
    gw = await start_gateway(bad.spec, busy.spec, retry={"max_attempts": 1}, strategy="priority")
    before = time.time()
    assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 500
    views = await _upstreams(gw)
    assert views["bad"]["consecutive_failures"] == 1
    assert views["bad"]["state"] == "healthy"
    assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 500
    assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 500
    views = await _upstreams(gw)
    bad_view = views["bad"]
    assert bad_view["state"] == "ejected"
    assert bad_view["routable"] is False
    assert bad_view["ejection_count"] == 1
    # 30 s base ejection, shown as wall-clock time.
    assert before + 29 <= bad_view["ejected_until"] <= time.time() + 31
    # Now the priority strategy falls through to `busy`, which answers 429 with Retry-After: 7.
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 429
    busy_view = (await _upstreams(gw))["busy"]
    assert busy_view["state"] == "cooling_down"
    assert before + 6 <= busy_view["cooldown_until"] <= time.time() + 8
    assert busy_view["consecutive_failures"] == 0


async def test_events_record_drain_then_enable_in_order(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, admin_token="s3cret")
    assert (await (await gw.admin.get("/admin/events")).json()) == {"events": []}
    before = time.time()
    assert (await gw.admin.post("/admin/upstreams/a/drain", headers=AUTH)).status == 200
    assert (await gw.admin.post("/admin/upstreams/a/enable", headers=AUTH)).status == 200
    resp = await gw.admin.get("/admin/events")
    assert resp.status == 200
    events = (await resp.json())["events"]
    assert [(e["upstream"], e["from"], e["to"]) for e in events] == [
        ("a", "healthy", "drained"),
        ("a", "drained", "healthy"),
    ]
    assert events[0]["reason"] == "drained by operator"
    assert events[1]["reason"] == "enabled by operator"
    assert before - 1 <= events[0]["time"] <= events[1]["time"] <= time.time() + 1


@pytest.mark.parametrize("action", ["drain", "enable"])
async def test_mutation_forbidden_without_configured_token(
    action: str, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    resp = await gw.admin.post(f"/admin/upstreams/a/{action}", headers=AUTH)
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "forbidden"
    assert (await _upstreams(gw))["a"]["drained"] is False


@pytest.mark.parametrize("action", ["drain", "enable"])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer s3cre"},
        {"Authorization": "Bearer s3cret2"},
        {"Authorization": "Basic s3cret"},
        {"Authorization": "s3cret"},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "prefix", "longer", "basic", "bare", "empty"],
)
async def test_mutation_unauthorized_without_matching_token(
    action: str, headers: dict[str, str], start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec, admin_token="s3cret")
    resp = await gw.admin.post(f"/admin/upstreams/a/{action}", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "unauthorized"
    assert (await _upstreams(gw))["a"]["drained"] is False
    assert (await (await gw.admin.get("/admin/events")).json())["events"] == []


async def test_mutation_authorized_with_bearer_token(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec, admin_token="s3cret")
    resp = await gw.admin.post("/admin/upstreams/a/drain", headers=AUTH)
    assert resp.status == 200
    view = await resp.json()
    assert view["name"] == "a"
    assert view["state"] == "drained"
    assert view["drained"] is True
    resp = await gw.admin.post("/admin/upstreams/a/enable", headers={"Authorization": "bearer s3cret"})
    assert resp.status == 200
    view = await resp.json()
    assert view["state"] == "healthy"
    assert view["drained"] is False


async def test_mutation_get_not_allowed(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec, admin_token="s3cret")
    resp = await gw.admin.get("/admin/upstreams/a/drain", headers=AUTH)
    assert resp.status == 405
    assert (await _upstreams(gw))["a"]["drained"] is False


@pytest.mark.parametrize("action", ["drain", "enable"])
async def test_mutation_unknown_upstream_not_found(
    action: str, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec, admin_token="s3cret")
    resp = await gw.admin.post(f"/admin/upstreams/nope/{action}", headers=AUTH)
    assert resp.status == 404
    assert resp.content_type == "application/json"
    err = (await resp.json())["error"]
    assert err["type"] == "not_found"
    assert "nope" in err["message"]


async def test_drained_upstream_gets_no_traffic_until_enabled(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    # Full share at once after enable: slow start's ramp has its own test (test_slow_start_http.py).
    gw = await start_gateway(a.spec, b.spec, admin_token="s3cret", strategy="round_robin", slow_start_s=0)
    for _ in range(4):
        assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert (a.stats.requests, b.stats.requests) == (2, 2)

    assert (await gw.admin.post("/admin/upstreams/a/drain", headers=AUTH)).status == 200
    a.stats.reset()
    b.stats.reset()
    for _ in range(10):
        resp = await gw.client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200
        assert resp.headers["X-Gateway-Upstream"] == "b"
    assert a.stats.requests == 0
    assert b.stats.requests == 10

    assert (await gw.admin.post("/admin/upstreams/a/enable", headers=AUTH)).status == 200
    a.stats.reset()
    b.stats.reset()
    for _ in range(10):
        assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert a.stats.requests >= 4
    assert a.stats.requests + b.stats.requests == 10


async def test_drained_upstream_gets_no_traffic_with_latency_strategy(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, admin_token="s3cret")
    assert (await gw.admin.post("/admin/upstreams/a/drain", headers=AUTH)).status == 200
    for _ in range(20):
        resp = await gw.client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200
        assert resp.headers["X-Gateway-Upstream"] == "b"
    assert a.stats.requests == 0
    assert b.stats.requests == 20


async def test_enabled_upstream_regains_traffic_with_latency_strategy(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, admin_token="s3cret")
    assert (await gw.admin.post("/admin/upstreams/a/drain", headers=AUTH)).status == 200
    for _ in range(5):
        assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert a.stats.requests == 0
    assert (await gw.admin.post("/admin/upstreams/a/enable", headers=AUTH)).status == 200
    for _ in range(10):
        assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status == 200
    # With no measurement since it came back, the enabled upstream is probed at once.
    assert a.stats.requests >= 1
    assert a.stats.requests + b.stats.requests == 15


async def test_all_drained_proxy_answers_no_upstream_available(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, admin_token="s3cret")
    for name in ("a", "b"):
        assert (await gw.admin.post(f"/admin/upstreams/{name}/drain", headers=AUTH)).status == 200
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503
    assert resp.content_type == "application/json"
    err = (await resp.json())["error"]
    assert err["type"] == "no_upstream_available"
    assert err["attempts"] == 0
    assert err["upstreams_tried"] == []
    assert "2 drained" in err["message"]
    assert resp.headers["X-Gateway-Attempts"] == "0"
    assert "Retry-After" not in resp.headers  # drained upstreams never come back by themselves
    assert a.stats.requests == b.stats.requests == 0

    assert (await gw.admin.post("/admin/upstreams/b/enable", headers=AUTH)).status == 200
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Upstream"] == "b"


async def test_redundancy_follows_drains_and_is_exported(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    c = await start_mock("c")
    backup = {"name": "c", "url": c.url, "priority": 1}
    gw = await start_gateway(a.spec, b.spec, backup, admin_token="s3cret")
    data = await (await gw.admin.get("/admin/redundancy")).json()
    assert (data["level"], data["degraded"], data["reasons"]) == ("dual", False, [])
    assert gw.sample("gateway_redundancy_level") == 2 and gw.sample("gateway_degraded") == 0
    assert (await gw.admin.post("/admin/upstreams/c/drain", headers=AUTH)).status == 200
    data = await (await gw.admin.get("/admin/redundancy")).json()
    assert data["degraded"] and data["level"] == "dual"
    assert data["reasons"] == ["no backup is routable (0 of 1 in the tiers above priority 0)"]
    assert gw.sample("gateway_degraded") == 1
    for name in ("a", "b"):
        assert (await gw.admin.post(f"/admin/upstreams/{name}/drain", headers=AUTH)).status == 200
    data = await (await gw.admin.get("/admin/redundancy")).json()
    assert (data["level"], data["level_value"], data["routable"]) == ("none", 0, 0)
    assert gw.sample("gateway_redundancy_level") == 0
