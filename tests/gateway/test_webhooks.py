"""Webhooks of a real gateway to real receivers on loopback: signed, retried, filtered per webhook."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.config import WebhookEvent, WebhookSettings
from gateway.policy.webhooks import Outbox, Result
from gateway.webhooks import WebhookNotifier
from tests.conftest import AiohttpServer, StartGateway, StartMock

SECRET = "whsec_" + base64.b64encode(b"gateway-webhook-test-key-32bytes").decode()
OTHER = "whsec_" + base64.b64encode(b"another-receiver-key-of-32-bytes").decode()
AUTH = {"Authorization": "Bearer s3cret"}


class Receiver:
    """A webhook receiver that answers each path with scripted statuses (then 200)."""

    def __init__(self, **scripts: list[int]) -> None:
        self.scripts = scripts
        self.calls: dict[str, list[tuple[dict[str, str], bytes]]] = {}
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.calls.setdefault(name, []).append((dict(request.headers), await request.read()))
        self.arrived.set()
        script = self.scripts.get(name, [])
        return web.Response(status=script.pop(0) if script else 200)

    async def wait(self, name: str, n: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.calls.get(name, [])) < n:
                self.arrived.clear()
                await self.arrived.wait()


async def _receiver(aiohttp_server: AiohttpServer, receiver: Receiver) -> str:
    app = web.Application()
    app.router.add_post("/{name}", receiver.handle)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_deliveries_are_signed_retried_and_filtered_per_webhook(
    aiohttp_server: AiohttpServer, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    receiver = Receiver(ops=[500])  # the first delivery to /ops fails once
    base = await _receiver(aiohttp_server, receiver)
    a, b = await start_mock("a"), await start_mock("b")
    gw = await start_gateway(
        a.spec,
        {"name": "b", "url": b.url, "priority": 1},
        admin_token="s3cret",
        webhooks=[
            {"url": f"{base}/ops", "events": ["drained", "recovered"], "secret": SECRET},
            {"url": f"{base}/pager", "events": ["degraded", "failover"], "secret": OTHER},
        ],
    )
    assert (await gw.admin.post("/admin/upstreams/a/drain", headers=AUTH)).status == 200

    await receiver.wait("pager", 2)
    pager = [Webhook(OTHER).verify(body, headers) for headers, body in receiver.calls["pager"]]
    assert [(p["type"], p["data"]) for p in pager] == [
        ("failover", {"from_tier": 0, "to_tier": 1}),
        (
            "degraded",
            {
                "degraded": True,
                "level": "none",
                "reasons": [
                    "the primary tier (priority 0) has no routable upstream; traffic goes to the backups"
                ],
            },
        ),
    ]

    await receiver.wait("ops", 2)  # a 500, then the retry about a second later
    (h1, body1), (h2, body2) = receiver.calls["ops"]
    assert body1 == body2 and h1["webhook-id"] == h2["webhook-id"]
    assert int(h2["webhook-timestamp"]) >= int(h1["webhook-timestamp"])
    drained = Webhook(SECRET).verify(body2, h2)
    assert drained["type"] == "drained"
    assert drained["data"] == {
        "upstream": "a",
        "from": "healthy",
        "to": "drained",
        "reason": "drained by operator",
    }
    with pytest.raises(WebhookVerificationError):  # each receiver's own secret signs its deliveries
        Webhook(OTHER).verify(body2, h2)

    # Counted once the answer is read, just after the receiver saw the request.
    for _ in range(100):
        if gw.sample("gateway_webhook_deliveries_total", {"result": "delivered"}) == 3:
            break
        await asyncio.sleep(0.02)
    assert gw.sample("gateway_webhook_deliveries_total", {"result": "delivered"}) == 3
    assert gw.sample("gateway_webhook_deliveries_total", {"result": "retried"}) == 1
    assert gw.sample("gateway_webhook_deliveries_total", {"result": "failed"}) == 0

    # Enabling it again: `recovered` to /ops only, and failover/degraded back to /pager.
    assert (await gw.admin.post("/admin/upstreams/a/enable", headers=AUTH)).status == 200
    await receiver.wait("ops", 3)
    await receiver.wait("pager", 4)
    headers3, body3 = receiver.calls["ops"][2]
    assert Webhook(SECRET).verify(body3, headers3)["type"] == "recovered"
    back = [Webhook(OTHER).verify(body, headers)["data"] for headers, body in receiver.calls["pager"][2:]]
    assert back == [{"from_tier": 1, "to_tier": 0}, {"degraded": False, "level": "single", "reasons": []}]


async def test_a_receiver_that_refuses_gets_no_retry_and_a_full_queue_drops_the_oldest(
    aiohttp_server: AiohttpServer,
) -> None:
    receiver = Receiver(gone=[410])
    base = await _receiver(aiohttp_server, receiver)
    counted: list[Result] = []
    hook = WebhookSettings(url=f"{base}/gone", secret=SECRET)
    notifier = WebhookNotifier(
        [hook], counted.append, clock=asyncio.get_running_loop().time, wall_clock=time.time, outbox=Outbox(2)
    )
    for i in range(3):  # queued before the task runs: the first one is dropped
        notifier.emit(WebhookEvent.EJECTED, {"upstream": f"u{i}"})
    assert counted == [Result.DROPPED] and len(notifier.outbox) == 2
    await notifier.start()
    try:
        await receiver.wait("gone", 2)
        await asyncio.sleep(0.05)
    finally:
        await notifier.stop()
    sent = [
        Webhook(SECRET).verify(body, headers)["data"]["upstream"] for headers, body in receiver.calls["gone"]
    ]
    assert sorted(sent) == ["u1", "u2"]
    assert sorted(counted) == sorted([Result.DROPPED, Result.FAILED, Result.DELIVERED])


async def test_no_webhooks_no_task(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec, admin_token="s3cret")
    assert (await gw.admin.post("/admin/upstreams/a/drain", headers=AUTH)).status == 200
    assert len(gw.state.notifier.outbox) == 0
    assert gw.sample("gateway_webhook_deliveries_total", {"result": "dropped"}) == 0


async def test_a_slow_receiver_does_not_hold_up_the_others(aiohttp_server: AiohttpServer) -> None:
    receiver = Receiver()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/slow", slow)
    app.router.add_post("/{name}", receiver.handle)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    hooks = [
        WebhookSettings(url=f"{base}/slow", secret=SECRET),
        WebhookSettings(url=f"{base}/fast", secret=SECRET),
    ]
    counted: list[Result] = []
    notifier = WebhookNotifier(
        hooks, counted.append, clock=asyncio.get_running_loop().time, wall_clock=time.time
    )
    await notifier.start()
    try:
        # Six deliveries for four slots: the third fast one gets a slot freed by the first two.
        for event in (WebhookEvent.EJECTED, WebhookEvent.RECOVERED, WebhookEvent.DRAINED):
            notifier.emit(event, {"upstream": "a"})
        await receiver.wait("fast", 3, timeout_s=2.0)  # while every slow delivery is still waiting
        types = [Webhook(SECRET).verify(b, h)["type"] for h, b in receiver.calls["fast"]]
        assert types == ["ejected", "recovered", "drained"]
    finally:
        release.set()
        await notifier.stop()
