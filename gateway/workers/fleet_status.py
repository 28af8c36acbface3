"""The status page and `/admin/status` under `--workers N`: every worker's status side by side.

The page is the single gateway's; it sees a `workers` list in the JSON and shows one section per
worker. `merge_status` does no I/O, so it is tested on plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from gateway.status_api import EVENTS_SHOWN, STATUS_PAGE
from gateway.workers.fleet_admin import FLEET, WorkerAnswer, _json, ask_all, merge_events


def merge_status(answers: Sequence[WorkerAnswer]) -> dict[str, Any] | None:
    """The first answering worker's status, each worker's under `workers`, events merged.

    None when no worker answered. Events carry their `worker` and are the newest EVENTS_SHOWN of
    all workers, oldest first; a worker that did not answer appears with its `error`.
    """
    answered = {a.worker: a for a in answers if a.ok and isinstance(a.body, dict)}
    if not answered:
        return None
    first = next(iter(answered.values())).body
    merged = {k: v for k, v in first.items() if k != "events"}
    merged["workers"] = [
        {"worker": a.worker, "pid": a.pid, **{k: v for k, v in a.body.items() if k != "events"}}
        if a.worker in answered
        else a.failure()
        for a in answers
    ]
    events = merge_events(answers)
    merged["events"] = events["events"][-EVENTS_SHOWN:]
    merged["unavailable_workers"] = events["unavailable_workers"]
    return merged


async def status(request: web.Request) -> web.Response:
    """GET /admin/status with --workers: each worker's status under `workers`."""
    answers = await ask_all(request.app[FLEET], "GET", "/admin/status")
    merged = merge_status(answers)
    if merged is None:
        error = {"type": "no_worker_answered", "message": "no worker answered"}
        return _json({"error": error, "workers": [a.failure() for a in answers]}, 503)
    return _json(merged)


def add_fleet_status_routes(app: web.Application) -> None:
    """Register `GET /` (the page) and `GET /admin/status` on the supervisor's admin app."""
    app.router.add_get("/", STATUS_PAGE.handle)
    app.router.add_get("/admin/status", status)
