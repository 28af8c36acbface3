"""Shared ejections under `--workers N`: what one worker learns reaches the others in milliseconds.

Each worker keeps its recent shareable changes (an ejection, a 429 cooldown, an ejection ended by a
success; gateway/policy/shared.py) and serves two routes on its private admin socket only:
  GET  /internal/shared?epoch=E&after=N&wait_s=S  long-poll: its changes numbered above N (all of
                                                   them when E is not its epoch), within S seconds
  POST /internal/shared {"changes": [...]}          adopt other workers' changes
The supervisor's `SharedStateRelay` holds one long-poll per worker and posts each answer to every
other worker at once, so an upstream one worker ejected stops getting traffic from all of them. It
remembers the latest ejection and cooldown per upstream to bring a replacement worker up to date.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Final

import orjson
from aiohttp import web

from gateway.admin import GATEWAY, _error, _json
from gateway.app import Gateway
from gateway.policy.shared import Kind, SharedChange
from gateway.workers.fleet_admin import WorkerRef, ask

log = logging.getLogger(__name__)

PATH: Final = "/internal/shared"
WAIT_S: Final = 10.0  # one long-poll; a quiet worker answers empty after this and is asked again
MAX_WAIT_S: Final = 60.0
RETRY_S: Final = 0.1  # after a worker did not answer (being replaced, say)


# --- the worker's side --------------------------------------------------------------------------


async def changes(request: web.Request) -> web.Response:
    """Long-poll: this worker's shareable changes after a number."""
    gw = request.app[GATEWAY]
    try:
        after = int(request.query.get("after", "0"))
        wait_s = min(MAX_WAIT_S, max(0.0, float(request.query.get("wait_s", "0"))))
    except ValueError:
        return _error(400, "invalid_request", "after must be an integer and wait_s a number of seconds")
    epoch = request.query.get("epoch", "")
    pending = gw.shared.since(epoch, after)
    if not pending and wait_s > 0:
        gw.shared_changed.clear()
        try:
            async with asyncio.timeout(wait_s):
                await gw.shared_changed.wait()
        except TimeoutError:
            pass
        pending = gw.shared.since(epoch, after)
    return _json({"epoch": gw.shared.epoch, "changes": [c.to_json() for c in pending]})


async def adopt(request: web.Request) -> web.Response:
    """Adopt changes other workers saw."""
    gw: Gateway = request.app[GATEWAY]
    try:
        body = orjson.loads(await request.read())
        received = [SharedChange.from_json(c) for c in body["changes"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return _error(400, "invalid_request", f'send {{"changes": [...]}}: {exc}')
    return _json({"applied": gw.adopt_shared(received)})


def add_worker_routes(app: web.Application) -> None:
    """The shared-state routes, for a worker's admin app on its private unix socket only."""
    app.router.add_get(PATH, changes)
    app.router.add_post(PATH, adopt)


# --- the supervisor's side ----------------------------------------------------------------------


class SharedStateRelay:
    """Reads each worker's changes and posts them to every other worker."""

    def __init__(
        self,
        workers: Callable[[], Sequence[WorkerRef]],
        *,
        clock: Callable[[], float],
        wait_s: float = WAIT_S,
    ) -> None:
        self._workers = workers
        self._clock = clock
        self._wait_s = wait_s
        # The latest ejection and cooldown per upstream, with when they end (supervisor's clock).
        self._latest: dict[tuple[str, Kind], tuple[SharedChange, float]] = {}

    async def follow(self, index: int) -> None:
        """Relay worker `index`'s changes until cancelled."""
        epoch, after = "", 0
        while True:
            ref = self._workers()[index]
            if not ref.alive:
                await asyncio.sleep(RETRY_S)
                continue
            path = f"{PATH}?epoch={epoch}&after={after}&wait_s={self._wait_s:g}"
            answer = await ask(ref, "GET", path, timeout_s=self._wait_s + 5.0)
            if not answer.ok or not isinstance(answer.body, dict):
                await asyncio.sleep(RETRY_S)
                continue
            if answer.body.get("epoch") != epoch:
                epoch, after = str(answer.body.get("epoch", "")), 0
            try:
                received = [SharedChange.from_json(c) for c in answer.body.get("changes", [])]
            except ValueError as exc:
                log.warning("worker %d sent a malformed shared change: %s", index, exc)
                await asyncio.sleep(RETRY_S)
                continue
            if received:
                after = max(c.seq for c in received)
                self._remember(received)
                await self._post([r for r in self._workers() if r.index != index], received)

    async def catch_up(self, ref: WorkerRef) -> None:
        """Give a (replacement) worker the ejections and cooldowns still in force."""
        now = self._clock()
        current = [
            SharedChange(c.upstream, c.kind, ends - now, c.ejection_count)
            for c, ends in self._latest.values()
            if ends > now
        ]
        if current:
            await self._post([ref], current)

    def _remember(self, received: Sequence[SharedChange]) -> None:
        now = self._clock()
        for c in received:
            if c.kind is Kind.UNEJECTED:
                self._latest.pop((c.upstream, Kind.EJECTED), None)
            else:
                self._latest[(c.upstream, c.kind)] = (c, now + c.for_s)

    async def _post(self, refs: Sequence[WorkerRef], received: Sequence[SharedChange]) -> None:
        body = orjson.dumps({"changes": [c.to_json() for c in received]})
        answers = await asyncio.gather(
            *(ask(r, "POST", PATH, timeout_s=5.0, body=body) for r in refs if r.alive)
        )
        for a in answers:
            if not a.ok:
                log.warning("worker %d did not take shared changes: %s", a.worker, a.error or a.status)
