"""The jobs page (`GET /ui`) in headless Chromium, against a real `jobs-api` process on SQLite."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Page, expect

from tests.browser import browser_page, screenshot
from tests.conftest import StartMock
from tests.gateway.test_cli import Spawn
from tests.jobs_api.test_cli import clean_env, spawn, start_jobs_proc
from tests.jobs_api.test_routes import CHAT

__all__ = ["spawn"]  # the fixture, used by name

KEYS = {"key-a": {"tenant": "org-a", "roles": ["user"]}, "key-b": {"tenant": "org-b", "roles": ["user"]}}
XSS = "<img src=x onerror=window.__xss=1>"


def batch(items: int, **job: Any) -> dict[str, Any]:
    """A batch of chat completions, one at a time, so its progress moves item by item."""
    item = {"method": "POST", "path": "/v1/chat/completions", "body": CHAT}
    return {"type": "batch", "input": {"items": [item] * items, "parallel_limit": 1}, **job}


async def api(base: str, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(method, base + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def submit(base: str, key: str, body: dict[str, Any]) -> str:
    status, job = await api(base, "POST", "/v1/jobs", key, body)
    assert status == 202, job
    return str(job["id"])


async def start_service(spawn: Spawn, tmp_path: Path, gateway_url: str) -> str:
    env = clean_env(
        JOBS_STORE=f"sqlite:///{tmp_path / 'jobs.db'}",
        JOBS_API_KEYS=json.dumps(KEYS),
        JOBS_GATEWAY_URL=gateway_url,
        JOBS_SHUTDOWN_GRACE_S="1",
    )
    _, base = await start_jobs_proc(spawn, "--host", "127.0.0.1", env=env)
    return base


async def percent_of(page: Page, job_id: str) -> int:
    text = await page.locator(f'tr[data-job="{job_id}"] .percent').text_content()
    return int((text or "0").rstrip("%"))


async def test_jobs_page_shows_live_progress_and_cancels(
    spawn: Spawn, start_mock: StartMock, tmp_path: Path
) -> None:
    mock = await start_mock("m", latency_s=0.25)
    base = await start_service(spawn, tmp_path, mock.url)
    done_id = await submit(base, "key-a", batch(1, metadata={"name": "warm-up"}))
    xss_id = await submit(base, "key-a", batch(1, metadata={"name": XSS}))
    other_tenant = await submit(base, "key-b", batch(1))

    async with browser_page(height=900) as bp:
        page = bp.page
        await page.goto(f"{base}/ui")
        await expect(page.locator("#auth-state")).to_have_text("not connected")
        await page.fill("#key", "key-a")
        await page.click("#connect")
        await expect(page.locator(f'tr[data-job="{done_id}"] .status')).to_have_text("completed")
        await expect(page.locator(f'tr[data-job="{other_tenant}"]')).to_have_count(0)
        # Metadata is shown as text: the markup in it is neither parsed nor run.
        await expect(page.locator(f'tr[data-job="{xss_id}"] .meta')).to_have_text(f"name: {XSS}")
        assert await page.locator("#jobs img").count() == 0
        assert await page.evaluate("window.__xss") is None

        short = await submit(base, "key-a", batch(16, metadata={"name": "moving"}))
        long = await submit(base, "key-a", batch(400, metadata={"name": "to cancel"}))
        row = page.locator(f'tr[data-job="{short}"]')
        await expect(row.locator(".status")).to_have_text("running")
        await page.click(f'tr[data-job="{short}"] button.id')
        await expect(page.locator("#detail-stream")).to_have_text("live")

        # The bar moves while the job runs: several distinct values between 0 and 100, in order.
        seen: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not seen or seen[-1] < 100):
            value = await percent_of(page, short)
            if not seen or value != seen[-1]:
                seen.append(value)
            if len([v for v in seen if 0 < v < 100]) == 3:
                await expect(page.locator("#detail-progress")).to_contain_text("completed")
                # The bar is drawn at its percentage of the track's width.
                fill = await row.locator(".fill").evaluate("e => e.getBoundingClientRect().width")
                track = await row.locator(".bar").evaluate("e => e.getBoundingClientRect().width")
                assert 0 < fill < track, (fill, track)
                await screenshot(page, tmp_path, "jobs-ui.png")
            await asyncio.sleep(0.1)
        assert seen == sorted(seen), seen
        assert len([v for v in seen if 0 < v < 100]) >= 3, seen
        await expect(row.locator(".status")).to_have_text("completed", timeout=20_000)
        await expect(page.locator("#detail-stream")).to_have_text("ended")
        await expect(page.locator("#detail-progress")).to_contain_text("100% · 16 completed, 0 failed")
        await expect(page.locator("#detail-result")).to_contain_text('"items": [')
        assert await page.locator("#events li").count() >= 5

        # Cancel the long batch from its row.
        cancel = page.locator(f'tr[data-job="{long}"] button.cancel')
        await expect(page.locator(f'tr[data-job="{long}"] .status')).to_have_text("running")
        await cancel.click()
        await expect(page.locator(f'tr[data-job="{long}"] .status')).to_have_text("cancelled", timeout=5_000)
        await expect(page.locator(f'tr[data-job="{long}"] button.cancel')).to_have_count(0)
        status, job = await api(base, "GET", f"/v1/jobs/{long}", "key-a")
        assert status == 200 and job["status"] == "cancelled"
        assert job["progress"]["percent"] < 100

        # The status filter lists only the jobs in that state.
        await page.select_option("#status", "cancelled")
        await expect(page.locator("#jobs tbody tr")).to_have_count(1)
        await expect(page.locator(f'tr[data-job="{long}"]')).to_have_count(1)
        await page.select_option("#status", "completed")
        await expect(page.locator("#jobs tbody tr")).to_have_count(3)  # org-b's completed job is not listed
        assert bp.errors == []


async def test_jobs_page_refused_key_asks_again(spawn: Spawn, start_mock: StartMock, tmp_path: Path) -> None:
    mock = await start_mock("m")
    base = await start_service(spawn, tmp_path, mock.url)
    async with browser_page() as bp:
        page = bp.page
        await page.goto(f"{base}/ui")
        await page.fill("#key", "not-a-key")
        await page.click("#connect")
        await expect(page.locator("#banner")).to_contain_text("refused the credentials")
        await expect(page.locator("#auth-state")).to_have_text("not connected")
        assert await page.evaluate("sessionStorage.getItem('jobs-api-key')") is None
        # The right key works, and survives a reload of the tab (sessionStorage).
        await page.fill("#key", "key-b")
        await page.click("#connect")
        await expect(page.locator("#auth-state")).to_have_text("key set")
        await page.reload()
        await expect(page.locator("#auth-state")).to_have_text("key set")
        await expect(page.locator("#banner")).to_be_hidden()
        # Only the one refused request shows in the console.
        assert len(bp.errors) == 1 and "401" in bp.errors[0], bp.errors


async def test_jobs_page_is_public_and_self_contained(
    spawn: Spawn, start_mock: StartMock, tmp_path: Path
) -> None:
    mock = await start_mock("m")
    base = await start_service(spawn, tmp_path, mock.url)
    async with aiohttp.ClientSession() as session, session.get(f"{base}/ui") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        html = await resp.text()
        assert "script-src 'sha256-" in resp.headers["Content-Security-Policy"]
    assert "innerHTML" not in html and "EventSource(" not in html
    status, body = await api(base, "GET", "/v1/jobs", "wrong")
    assert status == 401 and body["error"]["type"] == "unauthorized"
