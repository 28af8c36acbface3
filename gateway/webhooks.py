"""WebhookNotifier: sends fleet state changes to the configured webhooks from a background task.

`emit` only queues (policy/webhooks.py's bounded Outbox) and wakes the task, so the data path
and the state machine never wait on a receiver. The task sends due deliveries, at most
CONCURRENCY at a time (a slow receiver holds one slot, not the queue), each with a total timeout
of ATTEMPT_TIMEOUT_S, and requeues the ones to retry. Deliveries live in memory only: a restart
loses what was pending.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiohttp

from gateway.config import WebhookEvent, WebhookSettings, load_webhook_secret
from gateway.policy.webhooks import Delivery, Outbox, Result, RetryPolicy, decide, payload, signed_headers

log = logging.getLogger(__name__)

CONCURRENCY: Final = 4
ATTEMPT_TIMEOUT_S: Final = 10.0


class WebhookNotifier:
    """Queues and delivers webhook events; `start()` on the running loop, `stop()` at shutdown."""

    def __init__(
        self,
        hooks: Sequence[WebhookSettings],
        count: Callable[[Result], None],
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        policy: RetryPolicy | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self._hooks = list(hooks)
        self._keys = [load_webhook_secret(h.secret.get_secret_value()) for h in hooks]
        self._count = count
        self._clock = clock
        self._wall_clock = wall_clock
        self.policy = policy or RetryPolicy()
        self.outbox = outbox if outbox is not None else Outbox()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def emit(self, event: WebhookEvent, data: dict[str, Any]) -> None:
        """Queue `event` for every webhook subscribed to it; never blocks."""
        body: bytes | None = None
        for index, hook in enumerate(self._hooks):
            if event not in hook.events:
                continue
            body = body or payload(event, data, self._wall_clock())
            # One id per event and receiver, the same on every retry, so receivers can dedupe.
            delivery = Delivery(index, f"msg_{uuid.uuid4().hex}", body, self._clock())
            dropped = self.outbox.push(delivery)
            if dropped is not None:
                self._count(Result.DROPPED)
                log.warning("webhook queue full (%d): dropped the oldest delivery", self.outbox.limit)
        if body is not None:
            self._wake.set()

    async def start(self) -> None:
        """Open the HTTP session and start the sending task (nothing when no webhook is set)."""
        if not self._hooks:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S),
            trust_env=False,  # the configured URL is what is called, never an environment proxy
        )
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        """Stop sending; what is still queued is lost (and logged)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if len(self.outbox):
            log.warning("stopping with %d webhook deliveries not sent", len(self.outbox))

    async def _run(self) -> None:
        sending: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            sending.discard(task)
            self._wake.set()  # a slot is free
            if not task.cancelled() and task.exception() is not None:
                log.error("webhook attempt crashed", exc_info=task.exception())

        try:
            while True:
                self._wake.clear()
                # A slow receiver holds one slot, not the whole queue.
                for delivery in self.outbox.take_due(self._clock(), CONCURRENCY - len(sending)):
                    task = asyncio.create_task(self._attempt(delivery))
                    sending.add(task)
                    task.add_done_callback(done)
                next_at = self.outbox.next_due() if len(sending) < CONCURRENCY else None
                wait = None if next_at is None else max(0.0, next_at - self._clock())
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)

    async def _attempt(self, delivery: Delivery) -> None:
        hook = self._hooks[delivery.hook]
        started = self._clock()
        status, error = await self._post(hook.url, self._keys[delivery.hook], delivery)
        result, keep = decide(delivery, status, started, self.policy)
        self._count(result)
        what = f"HTTP {status}" if status is not None else error
        if result is Result.RETRIED and keep is not None:
            log.info(
                "webhook %s to %s: %s; retrying in %.0f s",
                delivery.msg_id,
                hook.url,
                what,
                keep.next_at - started,
            )
            dropped = self.outbox.push(keep)
            if dropped is not None:
                self._count(Result.DROPPED)
        elif result is Result.FAILED:
            log.warning(
                "webhook %s to %s failed after %d attempt(s): %s",
                delivery.msg_id,
                hook.url,
                delivery.attempts + 1,
                what,
            )
        else:
            log.debug("webhook %s delivered to %s", delivery.msg_id, hook.url)

    async def _post(self, url: str, key: bytes, delivery: Delivery) -> tuple[int | None, str]:
        assert self._session is not None, "start() first"
        headers = signed_headers(key, delivery.msg_id, int(self._wall_clock()), delivery.body)
        try:
            async with self._session.post(
                url, data=delivery.body, headers=headers, allow_redirects=False
            ) as resp:
                return resp.status, ""
        except TimeoutError:
            return None, f"no answer within {ATTEMPT_TIMEOUT_S:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}".rstrip(": ")
