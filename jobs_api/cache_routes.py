"""The result cache over HTTP: `GET /v1/cache/stats` and `DELETE /v1/cache`.

Stats are the caller's tenant's; an admin (or the anonymous caller of an open API, who sees
every tenant's jobs) gets the totals of every tenant. Clearing the cache is for those same
callers only (403 otherwise), and needs `?confirm=true` (400 otherwise): it deletes every
tenant's entries, while the hit and miss counts keep counting.
"""

from __future__ import annotations

import logging

from aiohttp import web

from jobs_api.errors import BadRequest, Forbidden
from jobs_api.keys import CLOCK, STORE
from jobs_api.routes import PRINCIPAL, json_response

log = logging.getLogger(__name__)


async def cache_stats(request: web.Request) -> web.Response:
    """GET /v1/cache/stats: hits, misses, entries and bytes (the tenant's, or all for an admin)."""
    principal = request[PRINCIPAL]
    tenant = None if principal.sees_all else principal.tenant or ""
    stats = await request.app[STORE].cache_stats(tenant, request.app[CLOCK]())
    return json_response(
        {
            "scope": "all" if tenant is None else "tenant",
            "tenant": tenant,
            "hits": stats.hits,
            "misses": stats.misses,
            "entries": stats.entries,
            "bytes": stats.bytes,
        }
    )


async def clear_cache(request: web.Request) -> web.Response:
    """DELETE /v1/cache?confirm=true: delete every entry (admins only)."""
    if not request[PRINCIPAL].sees_all:
        raise Forbidden("clearing the result cache needs the admin role")
    if request.query.get("confirm") != "true":
        raise BadRequest("DELETE /v1/cache deletes every tenant's cached results: add ?confirm=true")
    deleted = await request.app[STORE].cache_clear()
    log.info("result cache cleared by %s: %d entries deleted", request[PRINCIPAL].subject, deleted)
    return json_response({"deleted": deleted})


def add_cache_routes(app: web.Application) -> None:
    """Register the cache endpoints on `app`."""
    app.router.add_get("/v1/cache/stats", cache_stats)
    app.router.add_delete("/v1/cache", clear_cache)
