"""The gateway's live state and its two servers: the proxy (data path) and the admin app.

`Gateway` wires settings, pool, metrics, upstream clients and the proxy together;
`start_proxy_server` serves the proxy on the project's own HTTP/1.1 server, and
`create_admin_app` serves health, readiness, metrics and the admin API (aiohttp; not on the hot
path) from the same live state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.budget import RetryGate
from gateway.config import GatewaySettings
from gateway.health import HealthProber
from gateway.http_client import UpstreamClient
from gateway.http_server import HttpServer, Request, Responder
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
        self._clients: list[UpstreamClient] = []
        self._session: aiohttp.ClientSession | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.prober: HealthProber | None = None

    async def handle(self, request: Request, responder: Responder) -> None:
        """Server handler for every proxied request."""
        assert self._proxy is not None, "the gateway has not started"
        await self._proxy.handle(request, responder)

    async def start(self) -> None:
        """Create the upstream clients and the proxy, and start the health prober."""
        s = self.settings
        self._clients = [
            UpstreamClient(
                up.base_url, connect_timeout_s=s.timeouts.connect_s, keepalive_s=s.upstream_keepalive_s
            )
            for up in self.pool.upstreams
        ]
        self._proxy = Proxy(
            s,
            self.pool,
            self._clients,
            self.metrics,
            self.retry_gate,
            clock=self.clock,
            wall_clock=self.wall_clock,
            rng=self.rng,
        )
        # Health checks are a few requests a second at most: aiohttp's client is fine there.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=s.upstream_keepalive_s),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self.prober = HealthProber(
            self.pool, self._session, s.health, self.metrics, clock=self.clock, rng=self.rng
        )
        self.prober.start()
        self._sweep()

    def _sweep(self) -> None:
        # Idle upstream connections past keep-alive are closed even when no request comes.
        for client in self._clients:
            client.sweep()
        interval = max(1.0, self.settings.upstream_keepalive_s)
        self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    async def close(self) -> None:
        """Stop the prober and close every upstream connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.prober is not None:
            await self.prober.stop()
        for client in self._clients:
            client.close()
        if self._session is not None:
            await self._session.close()

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


def build_gateway(
    settings: GatewaySettings,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    registry: CollectorRegistry | None = None,
) -> Gateway:
    """The gateway's state for `settings` (call `start()` on a running loop before serving)."""
    return Gateway(
        settings,
        clock=clock,
        wall_clock=wall_clock,
        rng=rng or random.Random(),
        registry=registry or CollectorRegistry(),
    )


async def start_proxy_server(gateway: Gateway, *, reuse_port: bool = False) -> HttpServer:
    """Serve `gateway` on its configured host and port (port 0 picks a free one)."""
    s = gateway.settings
    server = HttpServer(gateway.handle, max_header_bytes=s.max_header_bytes)
    await server.start(s.host, s.port, backlog=1024, reuse_port=reuse_port)
    return server


def create_admin_app(gateway: Gateway) -> web.Application:
    """The admin application for `gateway`."""
    from gateway.admin import add_admin_routes

    app = web.Application()
    app[GATEWAY] = gateway
    add_admin_routes(app)
    return app
