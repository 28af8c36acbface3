"""The admin port's status page in headless Chromium, against real gateway processes."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from playwright.async_api import expect

from tests.browser import browser_page, screenshot
from tests.conftest import StartMock
from tests.gateway.test_workers import AUTH, Gateways, gateways, send_fresh

__all__ = ["gateways"]  # the fixture, used by name

WITHIN_MS = 5_000


async def drain(admin_port: int, name: str) -> None:
    url = f"http://127.0.0.1:{admin_port}/admin/upstreams/{name}/drain"
    async with aiohttp.ClientSession() as session, session.post(url, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()


async def test_status_page_shows_upstreams_and_follows_ejection_and_drain(
    gateways: Gateways, start_mock: StartMock, tmp_path: Path
) -> None:
    a, b = await start_mock("primary", latency_s=0.02), await start_mock("backup", latency_s=0.08)
    _, port, admin_port = await gateways.start([a, b], "--strategy", "priority")
    assert await send_fresh(port, 10) == [200] * 10

    async with browser_page() as bp:
        page = bp.page
        await page.goto(f"http://127.0.0.1:{admin_port}/")
        primary, backup = (
            page.locator('tr[data-upstream="primary"]'),
            page.locator('tr[data-upstream="backup"]'),
        )
        await expect(primary.locator(".state")).to_have_text("healthy")
        await expect(backup.locator(".state")).to_have_text("healthy")
        await expect(page.locator("#summary")).to_contain_text("2 of 2 upstreams routable")
        await expect(primary.locator(".ewma")).to_contain_text("ms")
        await expect(page.locator("#conn")).to_contain_text("updated")

        # The primary starts failing: the gateway ejects it and the backup answers.
        a.behaviour.error_rate = 1.0
        assert await send_fresh(port, 6) == [200] * 6
        await expect(primary.locator(".state")).to_have_text("ejected", timeout=WITHIN_MS)
        await expect(primary.locator(".recent-errors")).to_contain_text("http_5xx 3", timeout=WITHIN_MS)
        await expect(page.locator('#events tr[data-upstream="primary"][data-to="ejected"]')).to_have_count(1)
        await screenshot(page, tmp_path, "status-page.png")

        await drain(admin_port, "backup")
        await expect(backup.locator(".state")).to_have_text("drained", timeout=WITHIN_MS)
        await expect(page.locator("#summary")).to_contain_text("0 of 2 upstreams routable")
        await expect(page.locator('#events tr[data-upstream="backup"][data-to="drained"]')).to_have_count(1)
        assert bp.errors == []


async def test_status_page_shows_every_worker(gateways: Gateways, start_mock: StartMock) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    _, port, admin_port = await gateways.start([a, b], "--workers", "2")
    async with browser_page() as bp:
        page = bp.page
        await page.goto(f"http://127.0.0.1:{admin_port}/")
        sections = page.locator("section.worker")
        await expect(sections).to_have_count(2)
        for worker in ("0", "1"):
            section = page.locator(f'section[data-worker="{worker}"]')
            await expect(section.locator("h2")).to_contain_text(f"Worker {worker} (pid ")
            await expect(section.locator('tr[data-upstream="a"] .state')).to_have_text("healthy")
        await drain(admin_port, "a")
        for worker in ("0", "1"):
            section = page.locator(f'section[data-worker="{worker}"]')
            await expect(section.locator('tr[data-upstream="a"] .state')).to_have_text(
                "drained", timeout=WITHIN_MS
            )
            await expect(section.locator('tr[data-upstream="b"] .state')).to_have_text("healthy")
        events = page.locator('#events tr[data-upstream="a"][data-to="drained"]')
        await expect(events).to_have_count(2)
        await expect(page.locator("#events td.worker-col").first).to_be_visible()
        assert await send_fresh(port, 4) == [200] * 4
        assert bp.errors == []
