"""Where requests wait while every engine is saturated, instead of piling onto thrashing engines.

Waiters are woken, best first (a higher `saturation.priority_header` value, then arrival order),
whenever an engine reports its load; each woken one chooses again and waits again if every
engine is still saturated, keeping its place. A request waits at most `saturation.max_wait_s`,
and at most `saturation.max_waiting` wait at once; the rest get 429 with a short Retry-After.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

# Waiters also look again this often, in case a calm engine sends no report (a stale one).
RECHECK_S = 0.1


class SaturationGate:
    """The waiting room of one gateway process."""

    __slots__ = ("_heap", "_max_waiting", "_seq")

    def __init__(self, max_waiting: int) -> None:
        self._max_waiting = max_waiting
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        return len(self._heap)

    def ticket(self, priority: int) -> tuple[int, int] | None:
        """A place in the queue (kept across waits), or None when the room is full."""
        if len(self._heap) >= self._max_waiting:
            return None
        return (-priority, next(self._seq))

    async def wait(self, ticket: tuple[int, int], timeout_s: float) -> None:
        """Wait until woken, RECHECK_S passes, or `timeout_s` (whichever is first)."""
        future = asyncio.get_running_loop().create_future()
        entry = (ticket[0], ticket[1], future)
        heapq.heappush(self._heap, entry)
        try:
            await asyncio.wait_for(future, min(timeout_s, RECHECK_S))
        except TimeoutError:
            pass
        finally:
            if not future.done():
                future.cancel()
            try:
                self._heap.remove(entry)
                heapq.heapify(self._heap)
            except ValueError:
                pass  # popped by wake()

    def wake(self, *_: object) -> None:
        """Wake every waiter, best first (they run in this order and choose again)."""
        while self._heap:
            waiter = heapq.heappop(self._heap)[2]
            if not waiter.done():
                waiter.set_result(None)
