"""The supervisor's admin API under `--workers N`: each endpoint answers for every worker.

Every worker serves the normal admin app on a unix socket in a private directory. These handlers
ask all workers at once and merge what they say. The merge functions (`merge_metrics`,
`merge_upstreams`, `merge_events`, `merge_readiness`, `merge_mutation`,
`merge_redundancy`) do no I/O, so they are
tested on plain values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from gateway.admin import admin_routes, check_token
from gateway.policy.redundancy import LEVELS, worst

WORKER_LABEL = "worker"
# Below the chart's 2 s probe timeout, so a hung worker gives a 503 rather than a probe timeout.
PROBE_TIMEOUT_S = 1.0
ADMIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerRef:
    """One worker as the admin API sees it."""

    index: int
    pid: int | None
    alive: bool
    session: aiohttp.ClientSession  # bound to the worker's admin unix socket


class Fleet(Protocol):
    """What the supervisor tells its admin app about the workers."""

    admin_token: SecretStr | None

    @property
    def stopping(self) -> bool:
        """True once shutdown has begun."""
        ...

    def workers(self) -> Sequence[WorkerRef]:
        """Every worker slot, in index order."""
        ...

    def remember(self, upstream: str, drained: bool) -> None:
        """Record a drain or enable so replacement workers get it too."""
        ...


FLEET: web.AppKey[Fleet] = web.AppKey("fleet")


@dataclass(frozen=True)
class WorkerAnswer:
    """What one worker answered (status and parsed body), or why it did not."""

    worker: int
    pid: int | None
    status: int | None = None
    body: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The worker answered 200."""
        return self.status == 200

    def failure(self) -> dict[str, Any]:
        """This worker in a response, when it had nothing useful to say."""
        why = self.error if self.error is not None else f"answered {self.status}"
        return {"worker": self.worker, "pid": self.pid, "error": why}


# --- pure merges --------------------------------------------------------------------------------


class _Families:
    """A collector that yields already-built families, so prometheus_client renders them."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        """The families given."""
        yield from self._families


def merge_metrics(scrapes: Mapping[int, str | None]) -> str:
    """One exposition from every worker's: each sample gets `worker="<index>"`, HELP/TYPE once.

    A worker whose scrape is None (it did not answer) adds only `gateway_worker_up{worker} 0`.
    Raises ValueError when a scrape is not Prometheus text.
    """
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "gateway_worker_up", "1 while the worker process answered this scrape.", labels=[WORKER_LABEL]
    )
    for index in sorted(scrapes):
        text = scrapes[index]
        up.add_metric([str(index)], 0.0 if text is None else 1.0)
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            label = {WORKER_LABEL: str(index)}
            merged.samples.extend(s._replace(labels={**s.labels, **label}) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), up]))
    return generate_latest(registry).decode()


def merge_upstreams(answers: Sequence[WorkerAnswer]) -> dict[str, Any] | None:
    """Worker 0's view (the single-process shape) plus every worker's upstreams; None if none answered."""
    answered = [a for a in answers if a.ok and isinstance(a.body, dict)]
    if not answered:
        return None
    merged = dict(answered[0].body)
    merged["workers"] = [
        {"worker": a.worker, "pid": a.pid, "upstreams": a.body.get("upstreams", [])}
        if a in answered
        else a.failure()
        for a in answers
    ]
    return merged


def merge_events(answers: Sequence[WorkerAnswer]) -> dict[str, Any]:
    """Every worker's events, each tagged with its worker, oldest first."""
    events: list[dict[str, Any]] = []
    unavailable: list[int] = []
    for a in answers:
        if not (a.ok and isinstance(a.body, dict)):
            unavailable.append(a.worker)
            continue
        events.extend({**e, "worker": a.worker} for e in a.body.get("events", []))
    # A stable sort keeps each worker's own order among equal timestamps.
    events.sort(key=lambda e: float(e.get("time", 0.0)))
    return {"events": events, "unavailable_workers": unavailable}


def merge_readiness(answers: Sequence[WorkerAnswer]) -> tuple[int, dict[str, Any]]:
    """Ready only when every worker is; the body lists each worker's own answer."""
    workers: list[dict[str, Any]] = []
    for a in answers:
        if isinstance(a.body, dict) and a.status is not None:
            workers.append({"worker": a.worker, "pid": a.pid, **a.body})
        else:
            workers.append({**a.failure(), "status": "unavailable"})
    ready = bool(answers) and all(a.ok for a in answers)
    routable = [int(w["routable_upstreams"]) for w in workers if "routable_upstreams" in w]
    body = {
        "status": "ready" if ready else "not_ready",
        # The least any worker can route to: the conservative view for a single number.
        "routable_upstreams": min(routable) if len(routable) == len(answers) else 0,
        "workers": workers,
    }
    return (200 if ready else 503), body


def merge_redundancy(answers: Sequence[WorkerAnswer]) -> dict[str, Any]:
    """The worst worker's level, degraded if any worker is (or did not answer), each worker's view.

    A worker that did not answer makes the fleet degraded: its share of the traffic may be
    going anywhere, and nothing says otherwise.
    """
    views = [a.body for a in answers if a.ok and isinstance(a.body, dict)]
    level, degraded, reasons = worst(views)
    silent = [a.worker for a in answers if not (a.ok and isinstance(a.body, dict))]
    if silent and views:
        degraded = True
        reasons.append(f"worker(s) {', '.join(map(str, silent))} did not answer")
    return {
        "level": level,
        "level_value": LEVELS.index(level),
        "degraded": degraded,
        "reasons": reasons,
        "workers": [
            {"worker": a.worker, "pid": a.pid, **a.body} if a.worker not in silent else a.failure()
            for a in answers
        ],
    }


def merge_mutation(answers: Sequence[WorkerAnswer]) -> tuple[int, dict[str, Any]]:
    """Answer like worker 0 when every worker agreed; 502 naming the workers that did not."""
    results = [
        {"worker": a.worker, "pid": a.pid, "status": a.status, "body": a.body}
        if a.status is not None
        else a.failure()
        for a in answers
    ]
    answered = [a for a in answers if a.status is not None]
    if answered and len(answered) == len(answers) and len({a.status for a in answered}) == 1:
        first = answered[0]
        body = dict(first.body) if isinstance(first.body, dict) else {"body": first.body}
        return first.status or 502, {**body, "workers": results}
    applied = sum(1 for a in answers if a.ok)
    message = (
        f"applied by {applied} of {len(answers)} workers; see 'workers'. "
        "A worker started later gets every drain made through this port."
    )
    return 502, {"error": {"type": "workers_disagree", "message": message}, "workers": results}


# --- talking to workers -------------------------------------------------------------------------


async def ask(
    ref: WorkerRef,
    method: str,
    path: str,
    *,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    text: bool = False,
    body: bytes | None = None,
) -> WorkerAnswer:
    """One request to a worker's admin socket (`body`: JSON to send); never raises for a dead worker."""
    if not ref.alive:
        return WorkerAnswer(ref.index, ref.pid, error="not running (being replaced)")
    try:
        async with ref.session.request(
            method,
            f"http://worker{path}",
            headers={**(headers or {}), "Content-Type": "application/json"} if body is not None else headers,
            data=body,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            answer: Any = await resp.text() if text else orjson.loads(await resp.read())
            return WorkerAnswer(ref.index, ref.pid, resp.status, answer)
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
        return WorkerAnswer(ref.index, ref.pid, error=f"no answer: {type(exc).__name__}: {exc}")


async def ask_all(
    fleet: Fleet,
    method: str,
    path: str,
    *,
    timeout_s: float = ADMIN_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    text: bool = False,
) -> list[WorkerAnswer]:
    """The same request to every worker at once, answers in worker order."""
    refs = fleet.workers()
    return list(
        await asyncio.gather(
            *(ask(r, method, path, timeout_s=timeout_s, headers=headers, text=text) for r in refs)
        )
    )


def bearer(token: SecretStr) -> dict[str, str]:
    """The Authorization header workers expect for admin mutations."""
    return {"Authorization": f"Bearer {token.get_secret_value()}"}


def mutation_path(upstream: str, drain: bool) -> str:
    """Path of a drain or enable on a worker's admin socket."""
    return f"/admin/upstreams/{quote(upstream, safe='')}/{'drain' if drain else 'enable'}"


# --- handlers -----------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _dead(refs: Iterable[WorkerRef]) -> list[WorkerRef]:
    return [r for r in refs if not r.alive]


async def healthz(request: web.Request) -> web.Response:
    """Alive while every worker process is alive."""
    refs = request.app[FLEET].workers()
    dead = _dead(refs)
    if dead:
        names = ", ".join(f"worker {r.index}" for r in dead)
        return _json(
            {
                "status": "worker_down",
                "message": f"{names} not running (a replacement is started automatically)",
                "dead_workers": [r.index for r in dead],
            },
            503,
        )
    return _json({"status": "ok", "workers": len(refs)})


async def readyz(request: web.Request) -> web.Response:
    """Ready only while every worker is ready."""
    fleet = request.app[FLEET]
    if fleet.stopping:
        return _json({"status": "shutting_down", "routable_upstreams": 0, "workers": []}, 503)
    status, body = merge_readiness(await ask_all(fleet, "GET", "/readyz", timeout_s=PROBE_TIMEOUT_S))
    return _json(body, status)


async def metrics(request: web.Request) -> web.Response:
    """Every worker's metrics, labelled with `worker`."""
    answers = await ask_all(request.app[FLEET], "GET", "/metrics", text=True)
    text = merge_metrics({a.worker: a.body if a.ok else None for a in answers})
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_upstreams(request: web.Request) -> web.Response:
    """Worker 0's upstream view, plus each worker's under `workers`."""
    answers = await ask_all(request.app[FLEET], "GET", "/admin/upstreams")
    merged = merge_upstreams(answers)
    if merged is None:
        failures = [a.failure() for a in answers]
        error = {"type": "no_worker_answered", "message": "no worker answered"}
        return _json({"error": error, "workers": failures}, 503)
    return _json(merged)


async def list_events(request: web.Request) -> web.Response:
    """Every worker's recent upstream state changes, oldest first."""
    return _json(merge_events(await ask_all(request.app[FLEET], "GET", "/admin/events")))


async def redundancy(request: web.Request) -> web.Response:
    """The fleet's redundancy: the worst of the workers, with each worker's view."""
    return _json(merge_redundancy(await ask_all(request.app[FLEET], "GET", "/admin/redundancy")))


async def _mutate(request: web.Request, drain: bool) -> web.Response:
    fleet = request.app[FLEET]
    denied = check_token(request, fleet.admin_token)
    if denied is not None:
        return denied
    assert fleet.admin_token is not None  # check_token refuses every request without one
    name = request.match_info["name"]
    answers = await ask_all(fleet, "POST", mutation_path(name, drain), headers=bearer(fleet.admin_token))
    if any(a.ok for a in answers):
        fleet.remember(name, drain)
    status, body = merge_mutation(answers)
    return _json(body, status)


async def drain(request: web.Request) -> web.Response:
    """Take an upstream out of rotation in every worker."""
    return await _mutate(request, drain=True)


async def enable(request: web.Request) -> web.Response:
    """Put a drained upstream back into rotation in every worker."""
    return await _mutate(request, drain=False)


def create_supervisor_admin_app(fleet: Fleet) -> web.Application:
    """The admin application the supervisor serves on the admin port."""
    app = web.Application()
    app[FLEET] = fleet
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
    from gateway.workers.fleet_status import add_fleet_status_routes  # it builds on this module

    add_fleet_status_routes(app)
    return app
