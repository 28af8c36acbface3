"""/docs in real headless Chromium: the page renders every operation of /openapi.json.

The real app serves on a loopback port; Chromium (Debian's, driven by Playwright) loads /docs,
which fetches /openapi.json from the same service and renders it without any other origin.
Skipped without Chromium, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
from playwright.async_api import async_playwright

from tests.conftest import AiohttpClient
from tests.jobs_api.conftest import JobsSettingsFactory
from tests.jobs_api.test_routes import StartJobs, jobs_starter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """Start a jobs app: `await start_jobs(start_runner=False, **settings)`."""
    return jobs_starter(aiohttp_client, jobs_settings)


def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    reason = "no Chromium (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires the browser tests to run: {reason}")
    pytest.skip(reason)


@pytest.mark.timeout(60)
async def test_docs_page_renders_every_operation_offline(start_jobs: StartJobs) -> None:
    executable = chromium_or_skip()
    jobs = await start_jobs(start_runner=False, api_keys={"key-a": {"tenant": "a"}})
    doc: dict[str, Any] = await (await jobs.client.get("/openapi.json")).json()
    operation_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    base = jobs.base_url
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=ARGS, timeout=30_000)
        try:
            page = await browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            other_origins: list[str] = []
            page.on(
                "request", lambda req: None if req.url.startswith(base) else other_origins.append(req.url)
            )
            await page.goto(f"{base}/docs#getBatch")
            await page.wait_for_selector("details.op", timeout=10_000)
            assert await page.title() == "jobs-api: API reference"
            rendered = await page.eval_on_selector_all("details.op", "nodes => nodes.map(n => n.id)")
            assert rendered == operation_ids
            # The anchor opens its operation, with its parameters and responses.
            batch = page.locator("details#getBatch")
            assert await batch.get_attribute("open") is not None
            text = await batch.inner_text()
            assert "batch_id" in text and "BatchView" in text and "counts" in text and "404" in text
            await page.click("details#createJob > summary")  # closed until clicked
            submit = await page.locator("details#createJob").inner_text()
            assert "Idempotency-Key" in submit and "JobSubmit" in submit and "202" in submit
            assert "bearer" in submit
            assert await page.locator("#error").inner_text() == ""
            assert problems == [] and other_origins == []
        finally:
            await browser.close()
