"""The admin port's status page (`GET /`) and the JSON it polls (`GET /admin/status`).

`/admin/status` is one cheap read of everything the page shows: each upstream's admin view, its
TTFT/TTFB and outcomes of the last minute (from the metrics' cumulative counters, by
`gateway.policy.recent`), and the latest state changes. A background task snapshots the counters
every few seconds, so the last minute is known the moment someone opens the page.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client.core import Metric

from gateway.app import Gateway
from gateway.html_page import HtmlPage
from gateway.policy.classify import Outcome, is_failure
from gateway.policy.recent import HistogramCounts, RecentWindow, Snapshot, UpstreamCounters, summarize
from gateway.policy.upstreams import Upstream

WINDOW_S: Final = 60.0
SAMPLE_EVERY_S: Final = 5.0
EVENTS_SHOWN: Final = 50
FAILURE_OUTCOMES: Final = frozenset(o.value for o in Outcome if is_failure(o))

STATUS_PAGE = HtmlPage("gateway", "static/status.html")
# The admin view of one upstream (gateway.admin's), which the status extends.
UpstreamView = Callable[[Gateway, Upstream, float], dict[str, Any]]


class StatusSource:
    """What `/admin/status` reads: the gateway, its upstream view, and the last-minute window."""

    def __init__(self, gateway: Gateway, view: UpstreamView) -> None:
        self.gateway = gateway
        self.view = view
        self.window = RecentWindow(WINDOW_S)


STATUS = web.AppKey("status_source", StatusSource)


def _histograms(family: Metric) -> dict[str, HistogramCounts]:
    bounds: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for s in family.samples:
        name = s.labels.get("upstream", "")
        if s.name.endswith("_bucket") and s.labels.get("le") != "+Inf":
            bounds.setdefault(name, []).append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_sum"):
            sums[name] = s.value
        elif s.name.endswith("_count"):
            counts[name] = s.value
    out = {}
    for name, pairs in bounds.items():
        pairs.sort()
        out[name] = HistogramCounts(
            tuple(b for b, _ in pairs), tuple(c for _, c in pairs), sums.get(name, 0.0), counts.get(name, 0.0)
        )
    return out


def snapshot(gw: Gateway) -> Snapshot:
    """The cumulative TTFT, TTFB and outcome counters of every upstream, read from the metrics."""
    m = gw.metrics
    ttft: dict[str, HistogramCounts] = {}
    ttfb: dict[str, HistogramCounts] = {}
    for family in m.upstream_ttft.collect():
        ttft.update(_histograms(family))
    for family in m.upstream_ttfb.collect():
        ttfb.update(_histograms(family))
    outcomes: dict[str, dict[str, float]] = {}
    for family in m.upstream_requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                outcomes.setdefault(s.labels["upstream"], {})[s.labels["outcome"]] = s.value
    return Snapshot(
        gw.clock(),
        {
            up.name: UpstreamCounters(
                ttft.get(up.name, HistogramCounts()),
                ttfb.get(up.name, HistogramCounts()),
                outcomes.get(up.name, {}),
            )
            for up in gw.pool.upstreams
        },
    )


def errors_in(outcomes: Mapping[str, float]) -> int:
    """Attempts among `outcomes` that count against the upstream (5xx, timeouts, resets ...)."""
    return int(sum(n for name, n in outcomes.items() if name in FAILURE_OUTCOMES))


def status_view(source: StatusSource) -> dict[str, Any]:
    """Everything the status page shows, as JSON-ready values."""
    gw, window = source.gateway, source.window
    current = snapshot(gw)
    window.record(current)
    recent = window.recent(current)
    now = current.time
    upstreams = []
    for up in gw.pool.upstreams:
        total = current.upstreams[up.name]
        last = recent.upstreams[up.name]
        total_outcomes = {k: int(v) for k, v in total.outcomes.items()}
        recent_outcomes = {k: int(v) for k, v in last.outcomes.items()}
        attempts = sum(recent_outcomes.values())
        recent_errors = errors_in(last.outcomes)
        upstreams.append(
            {
                **source.view(gw, up, now),
                "ttft": {"total": summarize(total.ttft, ()), "recent": summarize(last.ttft)},
                "ttfb": {"total": summarize(total.ttfb, ()), "recent": summarize(last.ttfb)},
                "outcomes": total_outcomes,
                "recent_outcomes": recent_outcomes,
                "errors": errors_in(total.outcomes),
                "recent_errors": recent_errors,
                "recent_error_ratio": round(recent_errors / attempts, 4) if attempts else None,
            }
        )
    events = list(gw.events)[-EVENTS_SHOWN:]
    return {
        "time": round(gw.wall_clock(), 3),
        "window_s": window.window_s,
        "covered_s": round(recent.covered_s, 3),
        "strategy": gw.settings.strategy.value,
        "draining": gw.draining,
        "routable_upstreams": gw.pool.routable_count(now),
        "requests_in_flight": gw.budget.active_requests,
        "upstreams": upstreams,
        "events": events,
    }


async def status(request: web.Request) -> web.Response:
    """GET /admin/status: upstream state, latency estimates, recent errors and state changes."""
    body = orjson.dumps(status_view(request.app[STATUS]))
    return web.Response(body=body, content_type="application/json")


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: snapshot the counters every SAMPLE_EVERY_S, so the last minute is known."""

    async def loop() -> None:
        while True:
            source = app[STATUS]
            source.window.record(snapshot(source.gateway))
            await asyncio.sleep(SAMPLE_EVERY_S)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def add_status_routes(app: web.Application, gateway: Gateway, view: UpstreamView) -> None:
    """Register `GET /` (the page) and `GET /admin/status` on a single gateway's admin app."""
    app[STATUS] = StatusSource(gateway, view)
    app.cleanup_ctx.append(_sampler)
    app.router.add_get("/", STATUS_PAGE.handle)
    app.router.add_get("/admin/status", status)
