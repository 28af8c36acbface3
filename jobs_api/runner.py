"""JobRunner: in-process asyncio workers that claim jobs under a lease and run their handlers.

Life of an attempt: a worker claims the best queued job (highest priority, tenants in turn, then
oldest; the claim counts the attempt and leases the job to this runner), runs its handler in its
own task until the job's deadline, then records how the attempt ended with one `store.mutate`
(`attempts.settle`). While it runs, a watch loop renews the lease every ~lease_s/3 and stops the
task when the job was cancelled (cancel_requested in the store) or no longer belongs to this
attempt. The attempt also keeps its own view of the lease on the monotonic clock
(`attempts.LocalLease`): if no renewal succeeded in time (the store is cut off, or a renewal
hangs), the attempt is stopped before the lease runs out and records nothing, so it never runs
on while another worker runs the job again. Each job's checks run in their own task, so one that
hangs delays no other job. A sweeper requeues running jobs whose lease expired: that is how jobs
of a crashed process (`kill -9`) are finished by the next one, within about lease_s (plus one
sweep) of the crash, or at once when a restart happens later than that. Delivery is at least
once: an attempt whose outcome could not be recorded runs again after its lease expires.

This module does the I/O; what each step changes is decided by the pure functions of
`jobs_api.attempts`. Every write of an attempt (its outcome, a lease renewal) runs inside
`store.mutate` guarded by `owns`, so an attempt only ever writes to the job while the job still
belongs to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pydantic_core

from jobs_api.attempts import (
    AttemptEnd,
    EndKind,
    LocalLease,
    attempt_outcome,
    expire_lease,
    expire_queued,
    overdue,
    owns,
    release,
    settle,
)
from jobs_api.caching import entry_for
from jobs_api.config import JobsSettings
from jobs_api.errors import JobNotFound, StoreUnavailable
from jobs_api.handlers import HandlerRegistry, JobContext, PermanentError, RetryableError, backoff_s
from jobs_api.metrics import JobsMetrics
from jobs_api.models import MAX_JSON_DEPTH, Job, JobError, JobStatus, nested_deeper_than
from jobs_api.store.base import JobQuery, JobStore, LogLevel, LogLine

log = logging.getLogger(__name__)

# How long a handler gets to unwind after its task was cancelled before the runner moves on.
CANCEL_GRACE_S = 5.0
# How often the queued-gauge is refreshed and queued jobs are checked against their deadline.
QUEUED_GAUGE_INTERVAL_S = 2.0
QUEUED_DEADLINE_INTERVAL_S = 5.0


@dataclass
class _Running:
    """An attempt running in this process."""

    job: Job
    ctx: JobContext
    task: asyncio.Task[Any]
    lease: LocalLease
    reason: EndKind | None = None  # set when the runner itself stopped the attempt
    check: asyncio.Task[None] | None = None  # the watch loop's check of this attempt, while it runs

    def stop(self, reason: EndKind) -> None:
        """Stop the attempt for `reason` (the first reason given wins)."""
        if self.reason is None:
            self.reason = reason
        self.ctx.cancelled.set()
        self.task.cancel()


class JobRunner:
    """Claims and runs jobs with `settings.concurrency` workers; one per process."""

    def __init__(
        self,
        store: JobStore,
        settings: JobsSettings,
        registry: HandlerRegistry,
        metrics: JobsMetrics,
        *,
        worker_id: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        # Unique per process start, so a restarted process never mistakes a dead one's jobs for its own.
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._running: dict[str, _Running] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._loops: list[asyncio.Task[None]] = []
        # Watch checks still waiting on the store (they may outlive their attempt a little).
        self._checks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._store_down = False

    async def start(self) -> None:
        """Open the gateway client, recover expired leases, start workers and background loops."""
        if self._workers:
            raise RuntimeError(f"job runner {self.worker_id} is already running")
        settings = self.settings
        if urlsplit(settings.gateway_url).path not in ("", "/"):
            # aiohttp resolves "/v1/..." against the origin: a path prefix would be dropped silently.
            raise ValueError(
                f"JOBS_GATEWAY_URL {settings.gateway_url!r} has a path; give the gateway's origin, "
                "e.g. http://127.0.0.1:8080"
            )
        self._session = aiohttp.ClientSession(
            base_url=settings.gateway_url,
            timeout=aiohttp.ClientTimeout(total=settings.request_timeout_s),
            # No pool cap: concurrency and each batch's parallel_limit already bound the requests.
            connector=aiohttp.TCPConnector(limit=0),
        )
        self._stopping = False
        await self._guarded(self.sweep_leases)  # jobs of a crashed predecessor
        await self._guarded(self.refresh_queued)
        watch_s = min(1.0, settings.lease_s / 3)
        sweep_s = max(settings.poll_interval_s, min(5.0, settings.lease_s / 2))
        purge_s = min(60.0, settings.retention_s / 2)
        self._loops = [
            asyncio.create_task(self._every(watch_s, self.watch), name="jobs-watch"),
            asyncio.create_task(self._every(sweep_s, self.sweep_leases), name="jobs-sweep-leases"),
            asyncio.create_task(
                self._every(QUEUED_DEADLINE_INTERVAL_S, self.sweep_queued), name="jobs-sweep-queued"
            ),
            asyncio.create_task(self._every(purge_s, self.purge), name="jobs-purge"),
            asyncio.create_task(self._every(QUEUED_GAUGE_INTERVAL_S, self.refresh_queued), name="jobs-gauge"),
        ]
        self._workers = [
            asyncio.create_task(self._work(), name=f"jobs-worker-{n}") for n in range(settings.concurrency)
        ]
        log.info("job runner %s started with %d workers", self.worker_id, settings.concurrency)

    async def stop(self) -> None:
        """Stop claiming; give running jobs shutdown_grace_s, then interrupt and requeue them."""
        self._stopping = True
        self._wake.set()
        workers, self._workers = self._workers, []
        if workers:
            _, pending = await asyncio.wait(workers, timeout=self.settings.shutdown_grace_s)
            if pending:
                log.info("interrupting %d running jobs to shut down", len(self._running))
                for running in list(self._running.values()):
                    running.stop(EndKind.INTERRUPTED)
                _, pending = await asyncio.wait(pending, timeout=CANCEL_GRACE_S + 1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if self._checks:
            # They end with the store's own timeouts; cancel only those that outlast the grace.
            _, pending = await asyncio.wait(set(self._checks), timeout=CANCEL_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("job runner %s stopped", self.worker_id)

    def wake(self) -> None:
        """A job was just submitted: let an idle worker claim it now rather than after a poll."""
        self._wake.set()

    def cancel_local(self, job_id: str) -> None:
        """Cancellation was requested: if `job_id` runs here, stop it now."""
        running = self._running.get(job_id)
        if running is not None:
            running.stop(EndKind.CANCELLED)

    # --- workers ---

    async def _work(self) -> None:
        while not self._stopping:
            # Cleared before claiming: a wake() from here on makes the wait below return at once.
            self._wake.clear()
            # Read before the wall clock the claim's lease is computed from: the local view of
            # the lease then never ends later than the stored one.
            sent_at = time.monotonic()
            try:
                job = await self.store.claim(self.worker_id, self.clock(), self.settings.lease_s)
            except StoreUnavailable as exc:
                if not self._store_down:  # once per outage, not once per worker and poll
                    log.warning("the store is unavailable (%s); workers keep polling", exc)
                self._store_down = True
                job = None
            except Exception:
                log.exception("claiming a job failed; retrying in %.2f s", self.settings.poll_interval_s)
                job = None
            else:
                if self._store_down:
                    log.info("the store answers again")
                self._store_down = False
            if job is not None and self._stopping:
                # The claim was in flight when stop() began (a networked store makes that likely).
                await self._release(job)
                return
            if job is None:
                try:
                    async with asyncio.timeout(self.settings.poll_interval_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            await self._run(job, LocalLease.granted(sent_at, self.settings.lease_s))

    async def _release(self, job: Job) -> None:
        now = self.clock()
        try:
            await self.store.mutate(job.id, lambda current: release(current, job, now))
        except Exception:
            log.exception("job %s: could not hand it back; it runs again when its lease expires", job.id)
        else:
            log.info("job %s: claimed while stopping; handed back to the queue", job.id)

    async def _run(self, job: Job, lease: LocalLease) -> None:
        log.info(
            "job %s (%s) running: attempt %d of %d on %s",
            job.id,
            job.type,
            job.attempts,
            job.max_attempts,
            self.worker_id,
        )
        try:
            handler = self.registry.handler(job.type)
        except KeyError:
            message = f"no handler for job type {job.type!r} in this process (check JOBS_HANDLERS)"
            await self._finish(
                job, AttemptEnd(EndKind.FAILED, error=JobError(type="unknown_type", message=message))
            )
            return
        remaining = job.deadline - self.clock()
        if remaining <= 0:
            await self._finish(job, AttemptEnd(EndKind.TIMED_OUT))
            return
        assert self._session is not None, "start() the runner first"
        ctx = JobContext(job, self._session, self.store, self.settings, clock=self.clock, rng=self.rng)
        task = asyncio.create_task(self._call(handler, ctx), name=f"job-{job.id}")
        running = _Running(job, ctx, task, lease)
        self._running[job.id] = running
        self.metrics.running.inc()
        try:
            end = await self._attempt(running, remaining)
        finally:
            del self._running[job.id]
            self.metrics.running.dec()
        await self._finish(job, end, ctx)
        # A lost attempt's progress is no longer the job's (and the store may still be away).
        if end.kind is not EndKind.LOST and ctx.unsaved and not await ctx.flush():
            log.warning("job %s: progress and log lines kept during a store outage are lost", job.id)

    @staticmethod
    async def _call(handler: Callable[[JobContext], Awaitable[Any]], ctx: JobContext) -> Any:
        return await handler(ctx)

    async def _attempt(self, running: _Running, remaining_s: float) -> AttemptEnd:
        """Wait for the handler until the deadline or the end of the lease; how the attempt ended.

        Timed on the monotonic clock alone, without the store: a cut-off store cannot delay it.
        """
        task = running.task
        deadline = time.monotonic() + remaining_s
        try:
            while running.reason is None and not task.done():
                now = time.monotonic()
                reason = overdue(now, deadline, running.lease)
                if reason is EndKind.LOST:
                    log.warning(
                        "job %s: attempt %d could not renew its lease in time; stopping it and "
                        "leaving the job to the lease sweep",
                        running.job.id,
                        running.job.attempts,
                    )
                if reason is not None:
                    running.stop(reason)
                    break
                # Renewals move the lease on while this waits: look again when it would end.
                await asyncio.wait({task}, timeout=min(deadline, running.lease.stop_at) - now)
            if running.reason is not None:
                await self._drain(running)
        except asyncio.CancelledError:
            # The worker itself is being cancelled (hard stop): do not leave the handler behind.
            running.stop(EndKind.INTERRUPTED)
            raise
        return self._end_of(running)

    async def _drain(self, running: _Running) -> None:
        _, pending = await asyncio.wait({running.task}, timeout=CANCEL_GRACE_S)
        if pending:
            log.warning("job %s: handler ignored cancellation for %.0f s", running.job.id, CANCEL_GRACE_S)

    def _end_of(self, running: _Running) -> AttemptEnd:
        job, task, reason = running.job, running.task, running.reason
        if reason is EndKind.INTERRUPTED:
            error = JobError(
                type="interrupted",
                message=f"worker {self.worker_id} shut down during attempt {job.attempts}",
                retryable=True,
            )
            return AttemptEnd(reason, error=error)
        if reason is not None:
            return AttemptEnd(reason)
        if task.cancelled():  # cancelled by something other than the runner
            return AttemptEnd(EndKind.INTERRUPTED)
        exc = task.exception()
        end = AttemptEnd(EndKind.COMPLETED, result=task.result()) if exc is None else self._failed(job, exc)
        return end if end.result is None else self._storable(job, end)

    def _storable(self, job: Job, end: AttemptEnd) -> AttemptEnd:
        """`end`, unless its result cannot be stored as JSON and read back: then the job fails
        (a failure keeps its error and drops the result)."""
        if nested_deeper_than(end.result, MAX_JSON_DEPTH):
            message = f"the result is nested more than {MAX_JSON_DEPTH} levels deep, too deep to store"
            error = JobError(type="result_too_deep", message=message)
        else:
            try:
                pydantic_core.to_json(end.result)
                return end
            except Exception as exc:
                message = f"handler of {job.type!r} returned a result that is not JSON ({type(exc).__name__})"
                error = JobError(type="handler_error", message=message)
        log.error("job %s: %s", job.id, message)
        if end.kind is EndKind.COMPLETED:
            return AttemptEnd(EndKind.FAILED, error=error)
        return replace(end, result=None)

    def _failed(self, job: Job, exc: BaseException) -> AttemptEnd:
        settings = self.settings
        # A custom handler calling ctx.gateway directly may let aiohttp's errors through.
        if isinstance(exc, RetryableError | aiohttp.ClientConnectionError | TimeoutError):
            if isinstance(exc, RetryableError):
                error, retry_after = exc.to_error(), exc.retry_after_s
            else:
                message = f"gateway unreachable: {type(exc).__name__}: {exc}".rstrip(": ")
                error = JobError(type="gateway_unreachable", message=message, retryable=True)
                retry_after = None
            delay = backoff_s(
                job.attempts, settings.backoff_base_s, settings.backoff_max_s, self.rng, retry_after
            )
            return AttemptEnd(EndKind.RETRY, error=error, delay_s=delay)
        if isinstance(exc, PermanentError):
            return AttemptEnd(EndKind.FAILED, error=exc.to_error(), result=exc.result)
        # A bug in the handler: the traceback goes to the server log, never into the job.
        log.error("job %s (%s): handler raised", job.id, job.type, exc_info=exc)
        message = f"handler of {job.type!r} raised {type(exc).__name__}; see the server log"
        return AttemptEnd(EndKind.FAILED, error=JobError(type="handler_error", message=message))

    async def _finish(self, job: Job, end: AttemptEnd, ctx: JobContext | None = None) -> None:
        """Record how the attempt ended (nothing if the job no longer belongs to it).

        Progress and log lines the handler reported while the store was unavailable are stored
        first, so they come before the outcome.
        """
        if end.kind is EndKind.LOST:
            log.warning("job %s: attempt %d lost its lease; its outcome is dropped", job.id, job.attempts)
            return
        now = self.clock()
        changed: list[Job] = []

        def change(current: Job) -> Job:
            changed.clear()  # a store may apply a mutation more than once (optimistic retry)
            if not owns(current, job):
                return current
            changed.append(current)
            return settle(current, end, now)

        after = await self._record(job, end, change, ctx)
        if after is None:
            return
        if not changed:
            log.warning(
                "job %s: attempt %d no longer owns the job; outcome %s dropped",
                job.id,
                job.attempts,
                end.kind,
            )
            return
        self._observe(changed[0], after, end.kind)
        await self._log_attempt(after, end)
        await self._cache(after, now)

    async def _cache(self, job: Job, now: float) -> None:
        """Store a completed job's result in the result cache if its submission asked for it."""
        entry = entry_for(job, orjson.dumps(job.result).decode(), now)
        if entry is None:
            return
        try:
            await self.store.cache_put(entry)
        except Exception:
            # Only later submissions lose: they miss and run the job again.
            log.exception("job %s: could not store its result in the cache", job.id)

    async def _record(
        self, job: Job, end: AttemptEnd, change: Callable[[Job], Job], ctx: JobContext | None
    ) -> Job | None:
        """Apply `change`; while the store is unavailable keep the outcome and retry (until stop)."""
        delay = 0.1
        while True:
            try:
                if ctx is not None and ctx.unsaved and not await ctx.flush():
                    raise StoreUnavailable("progress and log lines are not stored yet")
                return await self.store.mutate(job.id, change)
            except JobNotFound:
                log.warning("job %s vanished while it ran", job.id)
                return None
            except StoreUnavailable as exc:
                log.warning(
                    "job %s: store unavailable (%s); keeping its %s outcome, retrying in %.1f s",
                    job.id,
                    exc,
                    end.kind,
                    delay,
                )
            except Exception:
                log.exception(
                    "job %s: recording its %s failed; it runs again when its lease expires", job.id, end.kind
                )
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _log_attempt(self, after: Job, end: AttemptEnd) -> None:
        if after.status is JobStatus.QUEUED and after.error is not None:
            delay = max(0.0, after.run_after - after.updated_at)
            reason = f"{after.error.type}: {after.error.message}"
            line = f"attempt {after.attempts} failed ({reason}); retrying in {delay:.2f} s"
            level = LogLevel.WARNING
        elif after.status is JobStatus.COMPLETED:
            line, level = f"attempt {after.attempts} completed", LogLevel.INFO
        else:
            detail = f" ({after.error.type}: {after.error.message})" if after.error else ""
            line, level = f"attempt {after.attempts} ended: {after.status.value}{detail}", LogLevel.INFO
        try:
            await self.store.append_log(after.id, LogLine(after.updated_at, level, line))
        except Exception:
            log.exception("job %s: could not append to its log", after.id)

    def _observe(self, before: Job, after: Job, end: EndKind) -> None:
        """Metrics and the INFO log line of a state change."""
        self.metrics.attempts.labels(after.type, attempt_outcome(end, after)).inc()
        if after.status.terminal and after.finished_at is not None:
            self.metrics.finished.labels(after.type, after.status.value).inc()
            self.metrics.duration.labels(after.type).observe(max(0.0, after.finished_at - after.created_at))
        error = (
            f" ({after.error.type})"
            if after.error is not None and after.status is not JobStatus.COMPLETED
            else ""
        )
        log.info(
            "job %s (%s): %s -> %s after attempt %d of %d%s",
            after.id,
            after.type,
            before.status.value,
            after.status.value,
            after.attempts,
            after.max_attempts,
            error,
        )

    # --- background loops ---

    async def _every(self, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._guarded(step)

    async def _guarded(self, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except StoreUnavailable as exc:
            log.warning("job runner: %s failed: %s", getattr(step, "__name__", step), exc)
        except Exception:
            log.exception("job runner: %s failed", getattr(step, "__name__", step))

    async def watch(self) -> None:
        """Check each job running here in its own task (unless its last check still waits).

        A check that hangs on the store is left to the store's own timeouts rather than
        cancelled (cancelling a store call midway could leave a transaction open); the attempt's
        own lease timer in `_attempt` stops the attempt in time regardless.
        """
        for running in list(self._running.values()):
            if running.task.done() or running.reason is not None:
                continue
            if running.check is not None and not running.check.done():
                continue
            check = asyncio.create_task(self._check(running), name=f"jobs-watch-{running.job.id}")
            running.check = check
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def _check(self, running: _Running) -> None:
        """Renew the attempt's lease; stop it if cancelled or no longer ours.

        Also stores the progress and log lines its handler reported while the store was unavailable.
        """
        job_id = running.job.id
        try:
            if running.ctx.unsaved and not await running.ctx.flush():
                return  # the store is still unavailable: nothing to renew or check this time
            current = await self.store.get(job_id)
            if current is None or not owns(current, running.job):
                log.warning(
                    "job %s: attempt %d no longer owns the job; stopping it", job_id, running.job.attempts
                )
                running.stop(EndKind.LOST)
                return
            if current.cancel_requested:
                log.info("job %s: cancellation requested; stopping it", job_id)
                running.stop(EndKind.CANCELLED)
                return
            if running.lease.due(time.monotonic()):
                await self._renew(running)
        except StoreUnavailable as exc:
            log.warning("job %s: checking attempt %d failed: %s", job_id, running.job.attempts, exc)
        except Exception:
            log.exception("job %s: checking attempt %d failed", job_id, running.job.attempts)

    async def _renew(self, running: _Running) -> None:
        attempt = running.job
        sent_at = time.monotonic()  # before the wall clock `until` is computed from
        until = self.clock() + self.settings.lease_s

        def renew(job: Job) -> Job:
            return job.model_copy(update={"lease_until": until}) if owns(job, attempt) else job

        after = await self.store.mutate(attempt.id, renew)
        if owns(after, attempt):
            running.lease.renewed(sent_at)

    async def sweep_leases(self) -> None:
        """Requeue (or end) running jobs whose lease expired: their worker died or stalled."""
        now = self.clock()
        for job_id in await self.store.expired_leases(now):
            await self._apply(job_id, lambda job: expire_lease(job, now), EndKind.LOST)

    async def sweep_queued(self) -> None:
        """Time out queued jobs past their deadline (claims also check it, this keeps views honest)."""
        now = self.clock()
        cursor: tuple[float, str] | None = None
        while True:
            jobs, cursor = await self.store.list_jobs(
                JobQuery(status=JobStatus.QUEUED, created_before=now, limit=500, cursor=cursor)
            )
            for job in jobs:
                if now >= job.deadline:
                    await self._apply(job.id, lambda j: expire_queued(j, now), EndKind.TIMED_OUT)
            if cursor is None:
                return

    async def _apply(self, job_id: str, change: Callable[[Job], Job], end: EndKind) -> None:
        before: list[Job] = []

        def record(job: Job) -> Job:
            before[:] = [job]  # a store may apply a mutation more than once (optimistic retry)
            return change(job)

        try:
            after = await self.store.mutate(job_id, record)
        except JobNotFound:
            return
        if before and before[0] != after:
            self._observe(before[0], after, end)

    async def purge(self) -> None:
        """Delete jobs that finished more than retention_s ago, and expired cache entries."""
        now = self.clock()
        swept = await self.store.cache_sweep(now)
        if swept:
            log.debug("dropped %d expired result cache entries", swept)
        count = await self.store.purge_finished(now - self.settings.retention_s)
        if count:
            log.info("purged %d jobs finished more than %g s ago", count, self.settings.retention_s)

    async def refresh_queued(self) -> None:
        """Set the jobs_queued gauge from the store."""
        counts = await self.store.count_by_status()
        self.metrics.queued.set(counts.get(JobStatus.QUEUED, 0))
