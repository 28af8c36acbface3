"""Shared ejections under --workers: what is shared, adopted without echo, and the worker routes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.admin import create_admin_app
from gateway.config import HealthSettings, OutlierSettings
from gateway.policy.classify import Outcome
from gateway.policy.outlier import State, UpstreamHealth
from gateway.policy.shared import Kind, SharedChange, SharedLog, to_share
from gateway.workers.shared_state import add_worker_routes
from tests.conftest import StartGateway, StartMock
from tests.gateway.test_upstreams import make_pool


def fail3(h: UpstreamHealth, now: float) -> Any:
    return [h.record(Outcome.HTTP_5XX, now) for _ in range(3)][-1]


def test_local_ejection_cooldown_and_early_end_are_shared() -> None:
    h = UpstreamHealth(OutlierSettings(), HealthSettings())
    change = fail3(h, 10.0)
    assert to_share("a", h, change, 10.0) == SharedChange("a", Kind.EJECTED, 30.0, 1)
    back = h.record(Outcome.SUCCESS, 12.0)
    assert back is not None and to_share("a", h, back, 12.0) == SharedChange("a", Kind.UNEJECTED)
    cool = h.record(Outcome.RATE_LIMITED, 13.0, retry_after_s=4.0)
    assert cool is not None and to_share("a", h, cool, 13.0) == SharedChange("a", Kind.COOLDOWN, 4.0)
    # Health checks are each worker's own: not shared.
    for i in range(3):
        last = h.record_check(False, 20.0 + i)
    assert last is not None and last.after is State.UNHEALTHY
    assert to_share("a", h, last, 22.0) is None


def test_adopted_ejection_keeps_the_later_end_and_the_higher_count() -> None:
    h = UpstreamHealth(OutlierSettings(), HealthSettings())
    t = h.adopt_ejection(30.0, 2, 100.0)
    assert t is not None and (t.after, t.reason) == (State.EJECTED, "ejected by another worker")
    assert h.adopt_ejection(5.0, 1, 101.0) is None  # an earlier end changes nothing
    assert h.ejected_until == 130.0 and h.ejection_count == 2
    t = h.adopt_unejection(102.0)
    assert t is not None and t.after is State.HEALTHY
    t = h.adopt_cooldown(3.0, 103.0)
    assert t is not None and t.after is State.COOLING_DOWN and h.cooldown_until == 106.0


def test_pool_adopts_changes_by_kind() -> None:
    pool = make_pool("a", "b")
    a = pool.by_name["a"]
    pool.adopt(a, SharedChange("a", Kind.EJECTED, 30.0, 1), 0.0)
    assert a.health.state(1.0) is State.EJECTED and not a.health.routable(29.0)
    pool.adopt(a, SharedChange("a", Kind.UNEJECTED), 2.0)
    assert a.health.routable(2.0)


def test_shared_log_numbers_changes_and_restarts_for_another_epoch() -> None:
    log = SharedLog("e1", kept=2)
    for name in ("a", "b", "c"):
        log.add(SharedChange(name, Kind.EJECTED, 30.0, 1))
    assert [c.seq for c in log.since("e1", 0)] == [2, 3]  # only the last two are kept
    assert [c.upstream for c in log.since("e1", 2)] == ["c"]
    assert [c.upstream for c in log.since("other", 3)] == ["b", "c"]  # a new epoch reads from 0
    wire = SharedChange.from_json(log.since("e1", 2)[0].to_json())
    assert wire == SharedChange("c", Kind.EJECTED, 30.0, 1, 3)
    for bad in (
        {},
        {"upstream": "a", "kind": "exploded"},
        {"upstream": "a", "kind": "ejected", "for_s": "x"},
    ):
        with pytest.raises(ValueError):
            SharedChange.from_json(bad)


async def test_worker_routes_long_poll_and_adopt_without_echo(
    start_mock: StartMock, start_gateway: StartGateway, aiohttp_client: Any
) -> None:
    a = await start_mock("a", error_rate=1.0, error_status=500)
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    app = create_admin_app(gw.state)
    add_worker_routes(app)
    admin = await aiohttp_client(app)
    first = await (await admin.get("/internal/shared?after=0&wait_s=0")).json()
    assert first["changes"] == [] and first["epoch"] == gw.state.shared.epoch
    poll = asyncio.create_task(admin.get(f"/internal/shared?epoch={first['epoch']}&after=0&wait_s=5"))
    await asyncio.sleep(0.05)
    assert not poll.done()  # waits for a change
    for _ in range(3):  # each tries a first (500), then b: the third failure ejects a
        assert (await gw.client.post("/v1/chat/completions", json={})).status == 200
    answer = await (await asyncio.wait_for(poll, 2)).json()
    assert [(c["upstream"], c["kind"], c["seq"]) for c in answer["changes"]] == [("a", "ejected", 1)]

    # Another worker's word: b ejected. Adopted, and not offered back to the relay.
    sent = {
        "changes": [
            {"upstream": "b", "kind": "ejected", "for_s": 30, "ejection_count": 1},
            {"upstream": "zz", "kind": "cooldown", "for_s": 1},
        ]
    }
    resp = await admin.post("/internal/shared", json=sent)
    assert resp.status == 200 and (await resp.json()) == {"applied": 1}
    assert gw.state.pool.by_name["b"].health.state(gw.state.clock()) is State.EJECTED
    assert gw.sample("gateway_upstream_ejections_total", {"upstream": "b", "reason": "shared"}) == 1
    assert (
        gw.sample("gateway_upstream_ejections_total", {"upstream": "b", "reason": "consecutive_failures"})
        == 0
    )
    assert (
        gw.sample("gateway_upstream_ejections_total", {"upstream": "a", "reason": "consecutive_failures"})
        == 1
    )
    later = await (await admin.get(f"/internal/shared?epoch={first['epoch']}&after=1&wait_s=0")).json()
    assert later["changes"] == []
    bad = await admin.post("/internal/shared", data=b"{nope")
    assert bad.status == 400 and (await bad.json())["error"]["type"] == "invalid_request"
    assert (await admin.get("/internal/shared?after=x")).status == 400
    # Not on a single gateway's admin port.
    assert (await gw.admin.get("/internal/shared")).status == 404
