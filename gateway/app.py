"""The gateway's live state, wired once from settings: pool, metrics, upstream clients, proxy, prober.

`Gateway` is whole when built (nothing waits for an event loop); `start()` starts its background
work (health checks, the idle-connection sweep) on the running loop and `close()` stops it.
`start_proxy_server` serves it on the project's own HTTP/1.1 server; the admin app
(`gateway.admin`) serves health, readiness, metrics and the admin API from the same state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.config import GatewaySettings, UpstreamSettings
from gateway.http.client import UpstreamClient
from gateway.http.egress import ProxyConfig, select_proxy
from gateway.http.server import HttpServer
from gateway.load_poller import LoadPoller
from gateway.metrics import GatewayMetrics
from gateway.policy.budget import RetryBudget
from gateway.policy.outlier import State, Transition
from gateway.policy.shared import SharedChange, SharedLog, to_share
from gateway.policy.upstreams import Pool, Upstream
from gateway.policy.webhooks import FleetWatch, upstream_event
from gateway.prober import HealthProber
from gateway.proxy import Proxy
from gateway.retry_gate import RetryGate
from gateway.webhooks import WebhookNotifier

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
        # Proxy and TLS trust per upstream, decided once here for the client and the prober alike.
        self.egress = {cfg.name: upstream_egress(cfg, os.environ) for cfg in settings.upstreams}
        for name, (proxy, _) in self.egress.items():
            if proxy is not None:
                log.info("upstream %s is reached through proxy %s", name, proxy.url)
        self.clients = [
            UpstreamClient(
                up.base_url,
                connect_timeout_s=settings.timeouts.connect_s,
                keepalive_s=settings.upstream_keepalive_s,
                max_header_bytes=settings.max_upstream_header_bytes,
                proxy=self.egress[up.name][0],
                ssl_context=self.egress[up.name][1],
            )
            for up in self.pool.upstreams
        ]
        self.proxy = Proxy(
            settings,
            self.pool,
            self.clients,
            self.metrics,
            self.retry_gate,
            clock=clock,
            wall_clock=wall_clock,
            rng=rng,
        )
        self.prober = HealthProber(
            self.pool,
            settings.health,
            self.metrics,
            clock=clock,
            rng=rng,
            keepalive_s=settings.upstream_keepalive_s,
            egress=self.egress,
        )
        self.load_poller = LoadPoller(
            self.pool,
            self.metrics,
            clock=clock,
            rng=rng,
            keepalive_s=settings.upstream_keepalive_s,
            egress=self.egress,
        )
        # Changes the other workers of --workers N should adopt (gateway/workers/shared_state.py).
        self.shared = SharedLog(epoch=f"{os.getpid()}.{id(self):x}")
        self.shared_changed = asyncio.Event()
        self._adopting = False
        now = clock()
        self.fleet_watch = FleetWatch(self.pool.redundancy(now), self.pool.serving_tier(now))
        self.notifier = WebhookNotifier(
            settings.webhooks, self.metrics.count_webhook, clock=clock, wall_clock=wall_clock
        )
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Start the health checks and the idle-connection sweep on the running loop."""
        await self.prober.start()
        await self.load_poller.start()
        await self.notifier.start()
        self._sweep()

    def _sweep(self) -> None:
        # Idle upstream connections past keep-alive are closed even when no request comes.
        for client in self.clients:
            client.sweep()
        interval = max(1.0, self.settings.upstream_keepalive_s)
        self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    async def close(self) -> None:
        """Stop the prober and close every upstream connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.prober.stop()
        await self.load_poller.stop()
        await self.notifier.stop()
        if self.proxy.front_door is not None:
            await self.proxy.front_door.close()
        if self.proxy.tracing is not None:
            await asyncio.to_thread(self.proxy.tracing.shutdown)  # flushes spans: not on the loop
        for client in self.clients:
            client.close()

    def adopt_shared(self, changes: list[SharedChange]) -> int:
        """Apply changes other workers saw (never shared again); how many named a known upstream."""
        now = self.clock()
        applied = 0
        self._adopting = True
        try:
            for c in changes:
                up = self.pool.by_name.get(c.upstream)
                if up is not None:
                    self.pool.adopt(up, c, now)
                    applied += 1
        finally:
            self._adopting = False
        return applied

    def _on_transition(self, up: Upstream, change: Transition, now: float) -> None:
        log.info("upstream %s: %s -> %s (%s)", up.name, change.before, change.after, change.reason)
        if not self._adopting:
            shared = to_share(up.name, up.health, change, now)
            if shared is not None:
                self.shared.add(shared)
                self.shared_changed.set()
        counters = self.metrics.per_upstream[up.name]
        ejection = counters.ejections.get(change.after)
        if ejection is not None and self._adopting and change.after is not State.DRAINED:
            ejection = counters.shared_ejections
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
        self._notify_webhooks(up, change, now)

    def _notify_webhooks(self, up: Upstream, change: Transition, now: float) -> None:
        event = upstream_event(change)
        if event is not None:
            data = {"upstream": up.name, "from": change.before.value, "to": change.after.value}
            self.notifier.emit(event, {**data, "reason": change.reason})
        for fleet_event, fleet_data in self.fleet_watch.observe(
            self.pool.redundancy(now), self.pool.serving_tier(now)
        ):
            self.notifier.emit(fleet_event, fleet_data)


Egress = tuple[ProxyConfig | None, ssl.SSLContext | None]


def upstream_egress(cfg: UpstreamSettings, env: Mapping[str, str]) -> Egress:
    """The proxy (None: direct) and the TLS context (None: http) of one upstream."""
    proxy = select_proxy(cfg.url, cfg.proxy, env)
    context = None
    if cfg.url.startswith("https:"):
        # With a CA file only that bundle is trusted (as curl's --cacert), else the system's CAs.
        context = ssl.create_default_context(cafile=cfg.tls_ca_file)
    return proxy, context


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


async def start_proxy_server(
    gateway: Gateway, *, reuse_port: bool = False, max_connections: int | None = None
) -> HttpServer:
    """Serve `gateway` on its configured host and port (port 0 picks a free one).

    `max_connections` applies when the settings leave it unset (the process derives it from its
    open-files limit); unset in both, connections are not capped.
    """
    s = gateway.settings
    server = HttpServer(
        gateway.proxy.handle,
        max_header_bytes=s.max_header_bytes,
        header_timeout_s=s.client_header_timeout_s,
        body_timeout_s=s.client_body_timeout_s,
        max_connections=s.max_connections or max_connections,
    )
    await server.start(s.host, s.port, backlog=1024, reuse_port=reuse_port)
    return server
