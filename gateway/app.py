"""Application factories: the proxy app (the data path) and the admin app (its own port).

`create_app` wires settings, pool, metrics and the proxy together; the one ClientSession and the
health prober live in a cleanup_ctx. `create_admin_app` serves health, readiness, metrics and the
admin API from the same live state.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.budget import RetryGate
from gateway.config import GatewaySettings
from gateway.health import HealthProber
from gateway.metrics import GatewayMetrics
from gateway.outlier import Transition
from gateway.pool import Pool, Upstream
from gateway.proxy import Proxy
from gateway.retry import RetryBudget

log = logging.getLogger(__name__)


class Gateway:
    """Live state shared by the proxy and admin apps of one gateway process."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        rng: random.Random,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng
        self.registry = registry
        self.events: deque[dict[str, Any]] = deque(maxlen=settings.events_kept)
        self.pool = Pool(settings, clock(), self._on_transition)
        self.budget = RetryBudget(settings.retry.budget_ratio, settings.retry.budget_min_concurrency)
        self.retry_gate = RetryGate(self.budget)
        self.metrics = GatewayMetrics(registry, self.pool, clock, lambda: self.budget.active_requests)
        self.draining = False
        self._proxy: Proxy | None = None
        self.prober: HealthProber | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Route handler for every proxied request."""
        assert self._proxy is not None, "the proxy app has not started"
        return await self._proxy.handle(request)

    async def resources(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the upstream ClientSession and the health prober."""
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=0,  # per-upstream max_inflight is the limit; aiohttp's 100 would cap the gateway
            keepalive_timeout=s.upstream_keepalive_s,
            enable_cleanup_closed=False,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,  # pass bytes through; Content-Encoding is forwarded as is
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
            trust_env=False,
        )
        self._proxy = Proxy(
            s,
            self.pool,
            session,
            self.metrics,
            self.retry_gate,
            clock=self.clock,
            wall_clock=self.wall_clock,
            rng=self.rng,
        )
        self.prober = HealthProber(self.pool, session, s.health, self.metrics, clock=self.clock, rng=self.rng)
        self.prober.start()
        try:
            yield
        finally:
            await self.prober.stop()
            await session.close()

    def _on_transition(self, up: Upstream, change: Transition, now: float) -> None:
        log.info("upstream %s: %s -> %s (%s)", up.name, change.before, change.after, change.reason)
        ejection = self.metrics.per_upstream[up.name].ejections.get(change.after)
        if ejection is not None:
            ejection.inc()
        self.events.append(
            {
                "time": self.wall_clock(),
                "upstream": up.name,
                "from": change.before.value,
                "to": change.after.value,
                "reason": change.reason,
            }
        )


GATEWAY = web.AppKey("gateway", Gateway)


def create_app(
    settings: GatewaySettings,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """The proxy application: every method and path is forwarded to the upstreams."""
    gateway = Gateway(
        settings,
        clock=clock,
        wall_clock=wall_clock,
        rng=rng or random.Random(),
        registry=registry or CollectorRegistry(),
    )
    app = web.Application()
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(gateway.resources)
    app.router.add_route("*", "/{tail:.*}", gateway.handle)
    return app


def create_admin_app(proxy_app: web.Application) -> web.Application:
    """The admin application for the gateway behind `proxy_app`."""
    from gateway.admin import add_admin_routes

    app = web.Application()
    app[GATEWAY] = proxy_app[GATEWAY]
    add_admin_routes(app)
    return app
