"""Admission of retries under the retry budget, with a short wait instead of a hard refusal.

When an upstream dies, every request in flight to it fails in the same instant, and their retries
arrive as one burst. Refusing the part of that burst above the budget would turn a clean failover
into client errors; instead, retries over budget queue (first come, first served) for up to
`wait_s` until earlier retries finish. Concurrent retry load stays within the budget either way,
so a real retry storm is still contained: its excess retries wait, then give up.
"""

from __future__ import annotations

import asyncio
from collections import deque

from gateway.policy.budget import RetryBudget


class RetryGate:
    """Hands out retry slots of a RetryBudget; `release` must follow every granted `acquire`."""

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget
        self._waiters: deque[asyncio.Future[None]] = deque()

    def request_started(self) -> None:
        """A request entered the gateway (the budget grows with traffic)."""
        self.budget.request_started()
        self._wake()

    def request_finished(self) -> None:
        """A request left the gateway."""
        self.budget.request_finished()

    async def acquire(self, wait_s: float) -> bool:
        """Take a retry slot, waiting up to `wait_s`; False if none came free in time."""
        if not self._waiters and self.budget.allows():
            self.budget.retry_started()
            return True
        if wait_s <= 0:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                await waiter
            return True
        except TimeoutError:
            # The slot may have been handed over just as the timer fired.
            return waiter.done() and not waiter.cancelled()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, but the request went away: pass the slot on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        """A retry attempt ended; its slot goes to the longest waiter, if any."""
        self.budget.retry_finished()
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.budget.allows():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.budget.retry_started()  # the slot is taken on the waiter's behalf
                waiter.set_result(None)
