"""GET /openapi.json and GET /docs: the API's description and a page that renders it.

Both are public metadata, served without credentials like /healthz. The document is generated
once per app (`operations.add_routes`), from the route table and the app's job types and limits.
The page is a small self-contained renderer shipped in the package (no CDN: it works offline).
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web

from jobs_api.keys import OPENAPI

DOCS_PAGE: Final = resources.files("jobs_api").joinpath("static/docs.html").read_bytes()
# The page runs only its own inline script and style, and talks only to this service.
DOCS_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 document of this service."""
    return web.Response(
        body=request.app[OPENAPI],
        content_type="application/json",
        headers={"Cache-Control": "no-cache", "Access-Control-Allow-Origin": "*"},
    )


async def docs_page(request: web.Request) -> web.Response:
    """GET /docs: an HTML reference rendered from /openapi.json."""
    return web.Response(
        body=DOCS_PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff"},
    )
