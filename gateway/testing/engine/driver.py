"""Runs the pure scheduler in real time on the event loop and hands tokens to waiting handlers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.testing.engine.config import EngineConfig
from gateway.testing.engine.outputs import OutputPlan
from gateway.testing.engine.scheduler import Output, Scheduler, SimRequest
from gateway.testing.engine.tokens import Tokens

__all__ = ["EngineDriver", "EngineFailed", "Submission"]

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine loop died; requests in it cannot finish."""


@dataclass(frozen=True)
class Submission:
    """A request in the engine and the queue its outputs arrive on (None: the engine failed)."""

    request: SimRequest
    outputs: asyncio.Queue[Output | None]


class EngineDriver:
    """One engine loop: plan a step, sleep its duration, apply it, deliver the tokens."""

    def __init__(self, config: EngineConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.scheduler = Scheduler(config)
        self._clock = clock
        self._queues: dict[str, asyncio.Queue[Output | None]] = {}
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self.failed = False

    def start(self) -> None:
        """Start the loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        """Stop the loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(self, prompt: Tokens, plan: OutputPlan) -> Submission:
        """Queue a request; ValueError if the engine cannot take it, EngineFailed if it is dead."""
        if self.failed:
            raise EngineFailed("the engine loop has failed")
        request_id = f"req-{next(self._ids)}"
        req = self.scheduler.add(request_id, prompt, plan.token_ids, plan.finish_reason, self._clock())
        queue: asyncio.Queue[Output | None] = asyncio.Queue()
        self._queues[request_id] = queue
        self._wake.set()
        return Submission(req, queue)

    def abort(self, request_id: str) -> None:
        """Drop a request whose client went away (a finished one is left alone)."""
        self._queues.pop(request_id, None)
        if self.scheduler.abort(request_id):
            log.debug("engine: aborted %s", request_id)

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("engine loop failed")
            self.failed = True
            for queue in self._queues.values():
                queue.put_nowait(None)
            self._queues.clear()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        sched = self.scheduler
        while True:
            step = sched.schedule(self._clock())
            if step is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Sleep to a deadline, not for a duration, so timer overshoot does not pile up over steps.
            deadline = max(deadline, loop.time()) + step.duration_s
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            for out in sched.complete(step, self._clock()):
                queue = self._queues.get(out.request_id)
                if queue is None:
                    continue
                queue.put_nowait(out)
                if out.finish_reason is not None:
                    del self._queues[out.request_id]
