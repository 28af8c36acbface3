"""`GET /ui`: the jobs page, served without credentials because it holds no data.

The page asks for an API key or JWT, keeps it in the tab's sessionStorage and sends it as
`Authorization: Bearer` with every `fetch()` to `/v1/...`, the event stream included (read with
fetch, since EventSource cannot send headers). So the page can do exactly what its credential can.
"""

from __future__ import annotations

from aiohttp import web

from gateway.html_page import HtmlPage

JOBS_PAGE = HtmlPage("jobs_api", "static/jobs.html")


def add_ui_routes(app: web.Application) -> None:
    """Register `GET /ui` on the jobs API application."""
    app.router.add_get("/ui", JOBS_PAGE.handle)
