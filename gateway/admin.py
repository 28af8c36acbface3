"""Admin endpoints on their own port: liveness, readiness, metrics, upstream state and control."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from gateway.app import Gateway
from gateway.policy.upstreams import Upstream
from gateway.status_api import add_status_routes

GATEWAY = web.AppKey("gateway", Gateway)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _error(status: int, error_type: str, message: str) -> web.Response:
    return _json({"error": {"type": error_type, "message": message}}, status)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while at least one upstream is routable and the gateway is not shutting down."""
    gw = request.app[GATEWAY]
    routable = gw.pool.routable_count(gw.clock())
    if gw.draining:
        return _json({"status": "shutting_down", "routable_upstreams": routable}, 503)
    if routable == 0:
        return _json({"status": "no_routable_upstream", "routable_upstreams": 0}, 503)
    return _json({"status": "ready", "routable_upstreams": routable})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = generate_latest(request.app[GATEWAY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _view(gw: Gateway, up: Upstream, now: float) -> dict[str, Any]:
    h = up.health

    def until(t: float | None) -> float | None:
        # Shown as wall-clock time; kept in monotonic time internally.
        return None if t is None or t <= now else round(gw.wall_clock() + (t - now), 3)

    return {
        "name": up.name,
        "url": up.base_url,
        "priority": up.priority,
        "weight": up.weight,
        "effective_weight": round(
            up.refresh_weight(now, gw.pool.slow_start_s, gw.pool.slow_start_aggression), 6
        ),
        "slow_start_until": until(up.slow_start_ends_at(gw.pool.slow_start_s)),
        "state": h.state(now).value,
        "routable": h.routable(now),
        "latency_ewma_s": round(up.latency_s, 6),
        "inflight": up.inflight,
        "max_inflight": up.max_inflight,
        "consecutive_failures": h.consecutive_failures,
        "ejection_count": h.ejection_count,
        "ejected_until": until(h.ejected_until),
        "cooldown_until": until(h.cooldown_until),
        "health_check": {
            "enabled": up.health_path is not None,
            "path": up.health_path,
            "passing": h.probe_healthy,
            "consecutive_failures": h.check_failures,
            "consecutive_successes": h.check_successes,
            "misconfiguration": up.check_problem,
        },
        "drained": h.drained,
    }


async def list_upstreams(request: web.Request) -> web.Response:
    """State of every upstream."""
    gw = request.app[GATEWAY]
    now = gw.clock()
    return _json(
        {
            "strategy": gw.settings.strategy.value,
            "upstreams": [_view(gw, up, now) for up in gw.pool.upstreams],
        }
    )


async def redundancy(request: web.Request) -> web.Response:
    """The fleet's redundancy level, whether it is degraded, and why."""
    gw = request.app[GATEWAY]
    return _json(gw.pool.redundancy(gw.clock()).to_json())


async def list_events(request: web.Request) -> web.Response:
    """Recent upstream state changes, oldest first."""
    return _json({"events": list(request.app[GATEWAY].events)})


def _authorized(request: web.Request) -> web.Response | None:
    return check_token(request, request.app[GATEWAY].settings.admin_token)


def check_token(request: web.Request, token: SecretStr | None) -> web.Response | None:
    """None when `request` carries the admin token, else the 403/401 answer to send."""
    if token is None:
        return _error(403, "forbidden", "admin mutations are disabled: set GATEWAY_ADMIN_TOKEN")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return _error(401, "unauthorized", "send Authorization: Bearer <GATEWAY_ADMIN_TOKEN>")
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        return _error(401, "unauthorized", "the admin token does not match")
    return None


async def _mutate(request: web.Request, drain: bool) -> web.Response:
    denied = _authorized(request)
    if denied is not None:
        return denied
    gw = request.app[GATEWAY]
    name = request.match_info["name"]
    up = gw.pool.by_name.get(name)
    if up is None:
        return _error(404, "not_found", f"no upstream named {name!r}")
    now = gw.clock()
    if drain:
        gw.pool.drain(up, now)
    else:
        gw.pool.enable(up, now)
    return _json(_view(gw, up, now))


async def drain(request: web.Request) -> web.Response:
    """Take an upstream out of rotation (in-flight requests finish)."""
    return await _mutate(request, drain=True)


async def enable(request: web.Request) -> web.Response:
    """Put a drained upstream back into rotation."""
    return await _mutate(request, drain=False)


Handler = Callable[[web.Request], Awaitable[web.Response]]


def admin_routes(
    *,
    healthz: Handler,
    readyz: Handler,
    metrics: Handler,
    list_upstreams: Handler,
    list_events: Handler,
    redundancy: Handler,
    drain: Handler,
    enable: Handler,
) -> list[web.RouteDef]:
    """The admin API's paths, served by these handlers (a single gateway's, or the supervisor's)."""
    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.get("/admin/upstreams", list_upstreams),
        web.get("/admin/events", list_events),
        web.get("/admin/redundancy", redundancy),
        web.post("/admin/upstreams/{name}/drain", drain),
        web.post("/admin/upstreams/{name}/enable", enable),
    ]


def add_admin_routes(app: web.Application) -> None:
    """Register every admin route of a single gateway on `app`."""
    app.add_routes(
        admin_routes(
            healthz=healthz,
            readyz=readyz,
            metrics=metrics,
            list_upstreams=list_upstreams,
            list_events=list_events,
            redundancy=redundancy,
            drain=drain,
            enable=enable,
        )
    )


def create_admin_app(gateway: Gateway) -> web.Application:
    """The admin application of a single gateway process."""
    app = web.Application()
    app[GATEWAY] = gateway
    add_admin_routes(app)
    add_status_routes(app, gateway, _view)
    return app
