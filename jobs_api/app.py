"""Application factory of the jobs API: state behind AppKeys, one cleanup_ctx for store and runner.

`create_app` wires settings, the handler registry, authentication and metrics together under the
keys of `jobs_api.keys`, and adds the routes of `jobs_api.routes`. The store
(opened from `settings.store` unless one is passed in) and the JobRunner working on it live in a
single cleanup_ctx, so they open before the first request and close after the last.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from jobs_api.auth import Authenticator
from jobs_api.config import JobsSettings
from jobs_api.handlers import HandlerRegistry
from jobs_api.job_types import default_registry
from jobs_api.keys import (
    AUTH,
    CLOCK,
    HANDLERS,
    METRICS,
    PROMETHEUS,
    RUNNER,
    SETTINGS,
    STOPPING,
    STORE,
    WEBHOOKS,
)
from jobs_api.metrics import JobsMetrics
from jobs_api.operations import add_routes
from jobs_api.routes import auth_middleware, content_type_middleware, error_middleware
from jobs_api.runner import JobRunner
from jobs_api.store import JobStore, open_store
from jobs_api.webhook_sender import WebhookSender

log = logging.getLogger(__name__)

# Room above max_input_bytes for aiohttp's own body limit (headers of a multipart, a batch wrapper).
BODY_SLACK_BYTES: Final = 64 * 1024


def _lifecycle(
    given_store: JobStore | None, start_runner: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: open the store (unless given), start the runner; stop both on the way out."""
        settings = app[SETTINGS]
        if not app[AUTH].enabled:
            log.warning(
                "no API keys or JWT key configured: the jobs API is open to anyone who can reach it "
                "(set JOBS_API_KEYS, JOBS_JWT_HS256_SECRET, JOBS_JWT_RS256_PUBLIC_KEY or JOBS_JWT_JWKS_URL)"
            )
        store = given_store
        if store is None:
            store = open_store(
                settings.store,
                prefix=settings.redis_prefix,
                retention_s=settings.retention_s,
                max_connections=settings.redis_max_connections,
                pool_timeout_s=settings.redis_pool_timeout_s,
            )
            await store.open()
        app[STORE] = store
        runner = JobRunner(store, settings, app[HANDLERS], app[METRICS], clock=app[CLOCK])
        app[RUNNER] = runner
        webhooks = WebhookSender(store, settings, clock=app[CLOCK])
        app[WEBHOOKS] = webhooks
        try:
            if start_runner:
                await runner.start()
                await webhooks.start()
            yield
        finally:
            try:
                await runner.stop()
                await webhooks.stop()
            finally:
                if given_store is None:
                    await store.close()

    return lifecycle


async def _on_shutdown(app: web.Application) -> None:
    app[STOPPING].set()


def create_app(
    settings: JobsSettings,
    *,
    store: JobStore | None = None,
    registry: HandlerRegistry | None = None,
    clock: Callable[[], float] = time.time,
    registry_metrics: CollectorRegistry | None = None,
    start_runner: bool = True,
) -> web.Application:
    """The jobs API application; a given `store` must be open already and is not closed here.

    With `start_runner=False` the runner exists (wake and cancel work) but runs no job until a
    test starts it with `await app[RUNNER].start()`.
    Raises ValueError (AuthConfigError) for an unusable credential or handler module.
    """
    prometheus = registry_metrics if registry_metrics is not None else CollectorRegistry()
    app = web.Application(
        middlewares=[error_middleware, content_type_middleware, auth_middleware],
        client_max_size=settings.max_input_bytes + BODY_SLACK_BYTES,
    )
    app[SETTINGS] = settings
    app[HANDLERS] = registry if registry is not None else default_registry(settings.handlers)
    app[AUTH] = Authenticator(settings)
    app[PROMETHEUS] = prometheus
    app[METRICS] = JobsMetrics(prometheus)
    app[CLOCK] = clock
    app[STOPPING] = asyncio.Event()
    app.cleanup_ctx.append(_lifecycle(store, start_runner))
    app.on_shutdown.append(_on_shutdown)
    add_routes(app)
    return app
