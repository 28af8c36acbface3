"""Polls engines' Prometheus text for their own load (upstreams with `load_metrics`).

One loop per such upstream: GET its `load_metrics.path` every `interval_s` (with jitter), read
the queue and KV usage (gateway.policy.load), and hand the report to the pool. A failed or
unreadable poll keeps nothing: the last report goes stale on its own and is then ignored.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import aiohttp
from yarl import URL

from gateway.metrics import GatewayMetrics
from gateway.policy.load import MalformedReport, MetricNames, parse_prometheus
from gateway.policy.upstreams import Pool, Upstream
from gateway.prober import Egress, new_session, request_options

log = logging.getLogger(__name__)


class LoadPoller:
    """The load polling loops of one gateway."""

    def __init__(
        self,
        pool: Pool,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        keepalive_s: float,
        egress: Egress | None = None,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        self._keepalive_s = keepalive_s
        self._options = request_options(pool, egress)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failing: set[str] = set()  # logged once per change

    async def start(self) -> None:
        """Start one loop per upstream with load_metrics."""
        pairs = zip(self._pool.upstreams, self._pool.load_metrics, strict=True)
        polled = [(up, cfg) for up, cfg in pairs if cfg is not None]
        if not polled:
            return
        self._session = new_session(self._keepalive_s)
        for up, cfg in polled:
            names = MetricNames(cfg.names.waiting, cfg.names.running, cfg.names.kv)
            url = URL(up.base_url + cfg.path, encoded=True)
            self._tasks.append(
                asyncio.create_task(self._loop(up, url, names, cfg.interval_s), name=f"load:{up.name}")
            )

    async def stop(self) -> None:
        """Cancel the loops and close the session."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def poll(self, up: Upstream, url: URL, names: MetricNames, timeout_s: float) -> str:
        """One poll; returns its result label (ok, malformed, error)."""
        assert self._session is not None, "start() first"
        try:
            async with self._session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
                **self._options[up.name],
            ) as resp:
                text = await resp.text(errors="replace")
                if resp.status != 200:
                    return self._failed(up, f"GET {url} answered {resp.status}", "error")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._failed(up, f"GET {url} failed: {type(exc).__name__}: {exc}".rstrip(": "), "error")
        try:
            report = parse_prometheus(text, names, self._clock())
        except MalformedReport as exc:
            return self._failed(up, f"GET {url}: unreadable load metrics ({exc})", "malformed")
        self._pool.record_load(up, report)
        if up.name in self._failing:
            self._failing.discard(up.name)
            log.info("upstream %s: load metrics readable again", up.name)
        return "ok"

    def _failed(self, up: Upstream, why: str, result: str) -> str:
        if up.name not in self._failing:
            self._failing.add(up.name)
            log.warning("upstream %s: %s; its last load report will go stale", up.name, why)
        return result

    async def _loop(self, up: Upstream, url: URL, names: MetricNames, interval_s: float) -> None:
        counters = self._metrics.per_upstream[up.name].load_reports
        while True:
            result = await self.poll(up, url, names, max(0.2, interval_s))
            counters[("metrics", result)].inc()
            await asyncio.sleep(interval_s * (0.9 + 0.2 * self._rng.random()))
