"""Typed keys of the jobs API application's state: `app[STORE]`, `app[RUNNER]`, ...

Set by `app.create_app` (and its cleanup_ctx), read by the routes; kept apart from both so that
the routes need not import the factory that imports them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from jobs_api.auth import Authenticator
from jobs_api.config import JobsSettings
from jobs_api.handlers import HandlerRegistry
from jobs_api.metrics import JobsMetrics
from jobs_api.runner import JobRunner
from jobs_api.store import JobStore
from jobs_api.webhook_sender import WebhookSender

SETTINGS: Final = web.AppKey("settings", JobsSettings)
STORE: Final = web.AppKey("store", JobStore)
HANDLERS: Final = web.AppKey("handlers", HandlerRegistry)
RUNNER: Final = web.AppKey("runner", JobRunner)
WEBHOOKS: Final = web.AppKey("webhooks", WebhookSender)
METRICS: Final = web.AppKey("metrics", JobsMetrics)
PROMETHEUS: Final = web.AppKey("prometheus", CollectorRegistry)
AUTH: Final = web.AppKey("auth", Authenticator)
CLOCK: Final = web.AppKey[Callable[[], float]]("clock")
# Set when the app starts shutting down: event streams end so in-flight requests can drain.
STOPPING: Final = web.AppKey("stopping", asyncio.Event)
# The OpenAPI document of the app, serialised once at start (GET /openapi.json).
OPENAPI: Final = web.AppKey("openapi", bytes)
