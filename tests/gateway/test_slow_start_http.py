"""Slow start end to end: a recovered upstream's share of real requests rises over the window."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from gateway.app import build_gateway, start_proxy_server
from tests.conftest import LoopbackClient, StartMock, settings_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_recovered_upstream_share_rises_over_the_window(start_mock: StartMock) -> None:
    a = await start_mock("a", error_rate=1.0, error_status=500)
    b = await start_mock("b")
    clock = FakeClock()
    settings = settings_for(
        a.spec, b.spec, host="127.0.0.1", port=0, strategy="round_robin", slow_start_s=30.0
    )
    gw = build_gateway(settings, clock=clock, registry=CollectorRegistry())
    await gw.start()
    server = await start_proxy_server(gw)
    client = LoopbackClient(f"http://127.0.0.1:{server.port}")
    try:
        for _ in range(6):  # a fails three times (each retried on b) and is ejected for 30 s
            async with client.post("/v1/chat/completions", json={}) as resp:
                assert resp.status == 200
        assert gw.pool.by_name["a"].health.state(clock()) == "ejected"
        a.behaviour.error_rate = 0.0
        clock.now += 31.0
        # The refresh loop notices the ejection ran out and starts the ramp.
        for _ in range(100):
            if any(e["to"] == "healthy" for e in gw.events):
                break
            await asyncio.sleep(0.05)
        assert any(e["to"] == "healthy" for e in gw.events), list(gw.events)
        shares = []
        for step in range(4):
            a.stats.reset()
            for _ in range(60):
                async with client.post("/v1/chat/completions", json={}) as resp:
                    assert resp.status == 200
            shares.append(a.stats.requests / 60)
            clock.now += 10.0 if step < 2 else 20.0
        # 10% of its weight at first, then a third, about two thirds, then full: an even split.
        print("share of the recovered upstream at 0, 10, 20, 40 s:", shares)
        assert shares == sorted(shares), shares
        assert shares[0] <= 0.15 and 0.4 <= shares[-1] <= 0.6, shares
        view = {u.name: u.effective_weight for u in gw.pool.upstreams}
        assert view == {"a": 1.0, "b": 1.0}
    finally:
        await client.session.close()
        await server.shutdown(0)
        await gw.close()
