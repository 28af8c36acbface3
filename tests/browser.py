"""Pages in real headless Chromium (Debian's, driven by Playwright), with console errors collected.

`.ci/run` installs Chromium with apt; on a machine without it the browser tests skip with a
message saying so, except under CI, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import ConsoleMessage, Page, async_playwright

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
REPO = Path(__file__).resolve().parent.parent


def chromium_path() -> str:
    """Debian's chromium binary; skips the test (fails it under CI) when there is none."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is not None:
        return path
    message = "headless Chromium is not installed (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class BrowserPage:
    """A page and what its console said: errors (console.error, failed loads) and uncaught exceptions."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def record(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@asynccontextmanager
async def browser_page(width: int = 1280, height: int = 720) -> AsyncIterator[BrowserPage]:
    """A fresh Chromium page; closed with the browser when the block ends."""
    executable = chromium_path()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=ARGS, timeout=30_000)
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(10_000)
            watched = BrowserPage(page)
            page.on("console", watched.record)
            page.on("pageerror", lambda exc: watched.errors.append(f"uncaught: {exc}"))
            yield watched
        finally:
            await browser.close()


async def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """A PNG of the page in `tmp_path`; with UPDATE_SCREENSHOTS=1 also docs/<name> of the repository."""
    path = tmp_path / name
    await page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / name).write_bytes(data)
    return path
