"""Active health checks: a cheap GET of each upstream's health path, never an inference call."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from gateway.config import HealthSettings
from gateway.http.egress import ProxyConfig
from gateway.metrics import GatewayMetrics
from gateway.policy.checks import MisconfigurationLatch, Verdict, judge
from gateway.policy.upstreams import Pool, Upstream

log = logging.getLogger(__name__)

# How often time-based state changes (an ejection or cooldown running out) are noticed, so
# they are logged and counted close to when they happen, even with no traffic.
REFRESH_INTERVAL_S = 1.0


Egress = Mapping[str, tuple[ProxyConfig | None, ssl.SSLContext | None]]


def request_options(pool: Pool, egress: Egress | None) -> dict[str, dict[str, Any]]:
    """aiohttp request options per upstream name: its headers, and the same proxy and trust as
    the data path. Built once."""
    out: dict[str, dict[str, Any]] = {}
    for up in pool.upstreams:
        proxy, context = (egress or {}).get(up.name, (None, None))
        options: dict[str, Any] = {"headers": dict(up.headers)}
        if context is not None:
            options["ssl"] = context
        if proxy is not None:
            options["proxy"] = proxy.url
            auth = proxy.authorization
            if auth is not None:
                # aiohttp sends proxy_headers on CONNECT only; a plain http request goes to
                # the proxy itself, so there it is one of the request's own headers.
                if context is not None:
                    options["proxy_headers"] = {"Proxy-Authorization": auth.decode()}
                else:
                    options["headers"]["Proxy-Authorization"] = auth.decode()
        out[up.name] = options
    return out


def new_session(keepalive_s: float) -> aiohttp.ClientSession:
    """A session for the gateway's own small requests to upstreams (checks, load polls)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_s),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


class HealthProber:
    """Runs one check loop per upstream that has a health path, plus a state refresh loop."""

    def __init__(
        self,
        pool: Pool,
        settings: HealthSettings,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        keepalive_s: float,
        egress: Egress | None = None,
    ) -> None:
        """`egress`: each upstream's proxy and TLS context by name, as the data path uses them."""
        self._pool = pool
        self._options = request_options(pool, egress)
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open the checks' HTTP session and start the loops on the running event loop."""
        # Health checks are a few requests a second at most: aiohttp's client is fine here.
        self._session = new_session(self._keepalive_s)
        for up in self._pool.upstreams:
            if up.health_path is not None:
                self._tasks.append(asyncio.create_task(self._loop(up), name=f"health:{up.name}"))
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="health:refresh"))

    async def stop(self) -> None:
        """Cancel the loops, wait for them to end, and close the session."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, up: Upstream) -> tuple[Verdict, str]:
        """One check: its verdict (an expected status within the timeout) and what happened."""
        assert up.health_path is not None and self._session is not None, "start() first"
        url = URL(up.base_url + up.health_path, encoded=True)
        try:
            async with self._session.get(
                url, timeout=self._timeout, allow_redirects=False, **self._options[up.name]
            ) as resp:
                await resp.read()
                verdict = judge(resp.status, self._settings.expected_statuses, str(url))
                return verdict, f"GET {url} answered {resp.status}"
        except TimeoutError:
            return Verdict(False), f"GET {url} got no answer within {self._settings.timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return Verdict(False), f"GET {url} failed: {type(exc).__name__}: {exc}".rstrip(": ")

    async def _loop(self, up: Upstream) -> None:
        interval = self._settings.interval_s
        jitter = self._settings.jitter_ratio
        passing = True
        latch = MisconfigurationLatch()
        while True:
            verdict, detail = await self.check(up)
            ok = verdict.ok
            problem = latch.update(verdict)
            up.check_problem = latch.current
            if problem is not None:
                # Once per upstream until the answer changes: a wrong path is not an outage.
                log.warning("health check of %s is misconfigured: %s", up.name, problem)
            elif ok != passing:
                # Once per change, not per check: a dead upstream would otherwise log every interval.
                if ok:
                    log.info("health check of %s passes again: %s", up.name, detail)
                else:
                    log.warning("health check of %s failed: %s", up.name, detail)
            else:
                log.debug("health check of %s: %s", up.name, detail)
            passing = ok
            self._metrics.per_upstream[up.name].checks[ok].inc()
            self._pool.record_check(up, ok, self._clock())
            # Jitter spreads the checks of many gateway replicas over the interval.
            await asyncio.sleep(interval * (1 + self._rng.uniform(-jitter, jitter)))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            self._pool.refresh(self._clock())
