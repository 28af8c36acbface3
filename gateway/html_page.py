"""A self-contained HTML page shipped as package data, served with a strict Content-Security-Policy.

The page carries its CSS and JavaScript inline (no external assets, no build step). The policy
allows exactly those inline blocks, by their SHA-256, and fetches to the page's own origin only:
even a value the page failed to escape could not run a script or load anything from elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from aiohttp import web

_BLOCK_RE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(html: str) -> str:
    """The policy that allows the inline `<script>` and `<style>` blocks of `html` and nothing else."""
    scripts = [_hash(body) for tag, body in _BLOCK_RE.findall(html) if tag == "script"]
    styles = [_hash(body) for tag, body in _BLOCK_RE.findall(html) if tag == "style"]
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + (" ".join(scripts) or "'none'"),
            "style-src " + (" ".join(styles) or "'none'"),
            "connect-src 'self'",
            "img-src data:",  # the empty inline favicon, so the browser asks for no /favicon.ico
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class HtmlPage:
    """One page loaded once from `package`'s data files; `handle` serves it."""

    def __init__(self, package: str, resource: str) -> None:
        self.html = files(package).joinpath(resource).read_text(encoding="utf-8")
        self.body = self.html.encode()
        self.headers = {
            "Content-Security-Policy": content_security_policy(self.html),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        }

    async def handle(self, request: web.Request) -> web.Response:
        """The page (it holds no data: the data comes from the JSON API it polls)."""
        return web.Response(body=self.body, content_type="text/html", charset="utf-8", headers=self.headers)
