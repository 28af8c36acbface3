"""WebhookSender: sends the webhook deliveries the store holds, in a bounded pool of its own tasks.

Job workers never wait on a receiver: a job's end only records a delivery in the store (the same
write that ends it, `jobs_api.webhooks.delivery_for`), and this sender, one per process, claims
due deliveries (at most `webhook_concurrency` at a time, each put off in the store for the
attempt's timeout plus a margin, so replicas share the work and a crashed process's claims come
back), calls each with a total timeout of `webhook_timeout_s`, records the attempt in the job's
log, and keeps the delivery for its next attempt or deletes it (`webhooks.decide`). What is
pending survives restarts; delivery is at least once (a receiver dedupes on `webhook-id`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

import aiohttp

from jobs_api.config import JobsSettings
from jobs_api.errors import StoreUnavailable
from jobs_api.store.base import JobStore, LogLevel, LogLine
from jobs_api.webhooks import (
    Delivery,
    RetryPolicy,
    Step,
    Verdict,
    check_url,
    decide,
    load_secret,
    signed_headers,
)

log = logging.getLogger(__name__)

# A claimed delivery is kept from others this long past its attempt's timeout.
CLAIM_MARGIN_S: Final = 5.0
# How long stop() lets attempts under way finish before cancelling them (they are claimed again).
STOP_GRACE_S: Final = 2.0


class WebhookSender:
    """Delivers pending webhooks; `start()` once the store is open, `stop()` before it closes."""

    def __init__(
        self, store: JobStore, settings: JobsSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        secret = settings.webhook_secret
        self._key = load_secret(secret.get_secret_value()) if secret is not None else None
        self.policy = RetryPolicy(
            base_s=settings.webhook_retry_base_s,
            max_s=settings.webhook_retry_max_s,
            give_up_s=settings.webhook_retry_for_s,
        )
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()

    async def start(self) -> None:
        """Open the HTTP client and start polling for due deliveries."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            connector=aiohttp.TCPConnector(limit=self.settings.webhook_concurrency),
            trust_env=False,  # the allowed hosts are what is called: never through an env proxy
        )
        self._loop = asyncio.create_task(self._run(), name="jobs-webhooks")

    async def stop(self) -> None:
        """Stop claiming; let attempts under way finish briefly, then cancel them."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        if self._sending:
            _, pending = await asyncio.wait(set(self._sending), timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        poll_s = self.settings.webhook_poll_s
        while True:
            free = self.settings.webhook_concurrency - len(self._sending)
            claimed: list[Delivery] = []
            if free > 0:
                claimed = await self._claim(free)
                for delivery in claimed:
                    task = asyncio.create_task(self._send(delivery), name=f"webhook-{delivery.job_id}")
                    self._sending.add(task)
                    task.add_done_callback(self._done)
            if claimed and len(claimed) == free:
                # There may be more due: look again as soon as a slot frees.
                self._slot_freed.clear()
                try:
                    async with asyncio.timeout(poll_s):
                        await self._slot_freed.wait()
                except TimeoutError:
                    pass
                continue
            await asyncio.sleep(poll_s)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._slot_freed.set()

    async def _claim(self, limit: int) -> list[Delivery]:
        lease_s = self.settings.webhook_timeout_s + CLAIM_MARGIN_S
        try:
            return await self.store.webhook_claim(self.clock(), lease_s, limit)
        except StoreUnavailable as exc:
            log.warning("webhooks: cannot claim deliveries: %s", exc)
        except Exception:
            log.exception("webhooks: claiming deliveries failed")
        return []

    async def _send(self, delivery: Delivery) -> None:
        """One attempt, then its record: the job's log line and the delivery kept or deleted."""
        started = self.clock()
        refusal = self._refusal(delivery)
        if refusal is not None:
            step = Step(Verdict.FAILED, None, f"webhook attempt {delivery.attempts + 1}: refused: {refusal}")
        else:
            status, error = await self._post(delivery, started)
            step = decide(delivery, status, error, self.clock(), self.policy)
        level = LogLevel.INFO if step.verdict is Verdict.DELIVERED else LogLevel.WARNING
        log.info("job %s: %s", delivery.job_id, step.note)
        try:
            await self.store.append_log(
                delivery.job_id, LogLine(started, level, f"{step.note} ({delivery.url})")
            )
            if step.keep is None:
                await self.store.webhook_delete(delivery.job_id)
            else:
                await self.store.webhook_save(step.keep)
        except Exception as exc:
            # The claim runs out and the delivery is tried again: at least once.
            log.warning("job %s: could not record webhook attempt: %s", delivery.job_id, exc)

    def _refusal(self, delivery: Delivery) -> str | None:
        """Why the delivery may no longer be sent (None: it may).

        Checked at each attempt: an operator who removed a host since has withdrawn consent.
        """
        try:
            check_url(delivery.url, self.settings.webhook_allowed_hosts)
        except ValueError as exc:
            return str(exc)
        if self._key is None:
            return "JOBS_WEBHOOK_SECRET is not set"
        return None

    async def _post(self, delivery: Delivery, now: float) -> tuple[int | None, str | None]:
        """POST the delivery: the receiver's status, or None and why there was none."""
        assert self._session is not None and self._key is not None, "start() the sender first"
        body = delivery.body.encode()
        headers = signed_headers(self._key, delivery.job_id, int(now), body)
        try:
            async with self._session.post(
                delivery.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                return response.status, None
        except TimeoutError:
            return None, f"no answer within {self.settings.webhook_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            return None, f"{type(exc).__name__}: {exc}".rstrip(": ")
