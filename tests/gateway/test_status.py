"""The status page and `/admin/status` of a real gateway in front of real mock upstreams."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from gateway.workers.fleet_admin import WorkerAnswer
from gateway.workers.fleet_status import merge_status
from tests.conftest import RunningGateway, StartGateway, StartMock

CHAT: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}
AUTH = {"Authorization": "Bearer s3cret"}


async def status_of(gw: RunningGateway) -> dict[str, Any]:
    resp = await gw.admin.get("/admin/status")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    data: dict[str, Any] = await resp.json()
    return data


async def send(gw: RunningGateway, count: int, **kwargs: Any) -> list[int]:
    statuses = []
    for _ in range(count):
        async with gw.client.post("/v1/chat/completions", json=CHAT, **kwargs) as resp:
            await resp.read()
            statuses.append(resp.status)
    return statuses


async def test_status_shows_every_upstream_with_state_and_estimates(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a, b = await start_mock("a", latency_s=0.05), await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    data = await status_of(gw)
    assert [u["name"] for u in data["upstreams"]] == ["a", "b"]
    assert data["routable_upstreams"] == 2 and data["strategy"] == "priority"
    assert data["window_s"] == 60.0 and data["events"] == []
    first = data["upstreams"][0]
    assert first["state"] == "healthy" and first["url"] == a.url and first["inflight"] == 0
    assert first["ttft"]["recent"]["count"] == 0 and first["ttft"]["recent"]["mean_s"] is None

    assert await send(gw, 5) == [200] * 5
    data = await status_of(gw)
    a_view = data["upstreams"][0]
    assert data["covered_s"] > 0
    assert a_view["outcomes"]["success"] == 5 and sum(a_view["outcomes"].values()) == 5
    assert a_view["recent_outcomes"]["success"] == 5
    recent = a_view["ttft"]["recent"]
    assert recent["count"] == 5
    assert 0.05 <= recent["mean_s"] < 1.0
    assert 0.05 <= recent["p95_s"] <= 0.1  # within the 0.05-0.1 s bucket of the histogram
    assert a_view["ttfb"]["recent"]["count"] == 5
    assert a_view["latency_ewma_s"] > 0
    assert data["upstreams"][1]["recent_outcomes"]["success"] == 0


async def test_status_counts_recent_errors_by_outcome(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a, b = await start_mock("a", error_rate=1.0, error_status=503), await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, strategy="priority", outlier={"consecutive_failures": 2})
    assert await send(gw, 3) == [200] * 3  # a fails, b answers each retry
    data = await status_of(gw)
    a_view, b_view = data["upstreams"]
    assert a_view["recent_outcomes"]["http_5xx"] == 2  # ejected after two
    assert a_view["recent_errors"] == 2 and a_view["errors"] == 2
    assert a_view["recent_error_ratio"] == 1.0
    assert a_view["state"] == "ejected" and a_view["routable"] is False
    assert b_view["recent_errors"] == 0 and b_view["recent_outcomes"]["success"] == 3
    assert [(e["upstream"], e["to"]) for e in data["events"]] == [("a", "ejected")]


async def test_status_shows_a_drain_and_its_event(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, admin_token="s3cret")
    assert (await gw.admin.post("/admin/upstreams/b/drain", headers=AUTH)).status == 200
    data = await status_of(gw)
    assert {u["name"]: u["state"] for u in data["upstreams"]} == {"a": "healthy", "b": "drained"}
    assert data["routable_upstreams"] == 1
    (event,) = data["events"]
    assert (event["upstream"], event["from"], event["to"]) == ("b", "healthy", "drained")


async def test_status_page_is_self_contained_html_allowed_by_its_policy(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    resp = await gw.admin.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "<title>failover-gateway status</title>" in html
    assert not re.search(r"""(src|href)=["']?https?:""", html)  # nothing loaded from elsewhere
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "innerHTML" not in html  # values go in as text nodes only


def test_merge_status_keeps_one_section_per_worker_and_merges_events() -> None:
    def body(worker: int, t: float) -> dict[str, Any]:
        return {
            "time": t,
            "routable_upstreams": 2 - worker,
            "upstreams": [{"name": "a", "state": "healthy" if worker == 0 else "drained"}],
            "events": [{"time": t, "upstream": "a", "from": "healthy", "to": "drained", "reason": "r"}],
        }

    answers = [
        WorkerAnswer(0, 100, 200, body(0, 5.0)),
        WorkerAnswer(1, 101, 200, body(1, 3.0)),
        WorkerAnswer(2, None, error="not running (being replaced)"),
    ]
    merged = merge_status(answers)
    assert merged is not None
    assert merged["routable_upstreams"] == 2 and merged["upstreams"][0]["state"] == "healthy"
    assert [w["worker"] for w in merged["workers"]] == [0, 1, 2]
    assert merged["workers"][1]["pid"] == 101 and merged["workers"][1]["upstreams"][0]["state"] == "drained"
    assert "events" not in merged["workers"][0]
    assert merged["workers"][2] == {"worker": 2, "pid": None, "error": "not running (being replaced)"}
    assert [(e["worker"], e["time"]) for e in merged["events"]] == [(1, 3.0), (0, 5.0)]
    assert merged["unavailable_workers"] == [2]


def test_merge_status_none_when_no_worker_answered() -> None:
    assert merge_status([WorkerAnswer(0, 1, 503, {"error": {}}), WorkerAnswer(1, 2, error="x")]) is None
