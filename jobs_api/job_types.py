"""The built-in job types: `inference` (one request through the gateway) and `batch` (many).

Both are ordinary handlers written against `jobs_api.handlers`, the API custom types use too.
`default_registry` registers them, then the types of each JOBS_HANDLERS module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.config import check_header_name
from jobs_api.batches import BATCH_TYPE, ItemStatus
from jobs_api.handlers import (
    HandlerRegistry,
    JobContext,
    PermanentError,
    RetryableError,
    backoff_s,
    load_handlers,
)


class InferenceInput(BaseModel):
    """One request to send through the gateway; strict like the job around it (no coercion)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: str = Field("POST", pattern=r"^[A-Za-z]{3,10}$")
    # The validators below check these; the patterns say the same in the OpenAPI document.
    path: str = Field(json_schema_extra={"pattern": "^/([^/]|$)"})
    body: Any = None
    headers: dict[str, str] = Field(
        default_factory=dict,
        json_schema_extra={
            "propertyNames": {"pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"},
            "additionalProperties": {"type": "string", "pattern": "^[\t\u0020-\u007e\u0080-\u00ff]*$"},
        },
    )

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or value.startswith("//"):
            raise ValueError("must be a path on the gateway starting with one '/', e.g. /v1/chat/completions")
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        # Refused at submission: CR/LF or another control character would otherwise fail every
        # attempt of the job later (or split the request), and the HTTP client would raise.
        for name, field_value in value.items():
            check_header_name(name)
            bad = next((c for c in field_value if (c < " " and c != "\t") or c == "\x7f"), None)
            if bad is not None:
                raise ValueError(f"header {name!r} has a control character {bad!r} in its value")
            if not field_value.isascii() and any(ord(c) > 0xFF for c in field_value):
                raise ValueError(f"header {name!r} has characters outside Latin-1 in its value")
        return value


class BatchInput(BaseModel):
    """Many inference requests run as one job; strict (`"parallel_limit": "4"` is refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    items: list[InferenceInput] = Field(min_length=1, max_length=1000)
    parallel_limit: int = Field(4, ge=1, le=64)
    fail_fast: bool = False


async def run_inference(ctx: JobContext) -> dict[str, Any]:
    """Built-in `inference`: one request through the gateway; its answer is the result."""
    spec = InferenceInput.model_validate(ctx.input)
    return await ctx.call(spec.method, spec.path, json=spec.body, headers=spec.headers)


# An item's start is stored by the next write, or at the latest this long after it started: short
# items (the common case) then cost no write of their own, and a long one shows as running soon.
START_REPORT_DELAY_S = 0.25


class _Batch:
    """Book-keeping of one batch attempt: each item's status and outcome, and the counts.

    Every item's end is stored with the progress (`items=`), and its start soon after, so
    `GET /v1/batches/{id}` shows which items run and which are done while the batch runs.
    """

    def __init__(self, ctx: JobContext, spec: BatchInput) -> None:
        self.ctx = ctx
        self.spec = spec
        self.outcomes: list[dict[str, Any] | None] = [None] * len(spec.items)
        self.statuses = [ItemStatus.QUEUED] * len(spec.items)
        self.completed = 0
        self.failed = 0
        self.first_failure: int | None = None
        self.report = asyncio.Lock()
        self.changes = 0  # item status changes so far
        self.written = 0  # how many of them the last progress write carried
        self.start_report: asyncio.Task[None] | None = None

    async def run_item(self, index: int, limit: asyncio.Semaphore) -> None:
        async with limit:
            if self.spec.fail_fast and self.first_failure is not None:
                self.statuses[index] = ItemStatus.SKIPPED  # an earlier item already failed the batch
                return
            self.statuses[index] = ItemStatus.RUNNING
            self.changes += 1
            if self.start_report is None or self.start_report.done():
                self.start_report = asyncio.create_task(self._report_starts_later())
            item = self.spec.items[index]
            try:
                result = await self._call_with_retries(item)
            except (RetryableError, PermanentError) as exc:
                self.outcomes[index] = {"index": index, "status": "failed", "error": exc_error(exc)}
                self.statuses[index] = ItemStatus.FAILED
                self.failed += 1
                if self.first_failure is None:
                    self.first_failure = index
            else:
                self.outcomes[index] = {"index": index, "status": "completed", "result": result}
                self.statuses[index] = ItemStatus.COMPLETED
                self.completed += 1
            self.changes += 1
            await self._report()

    async def _report_starts_later(self) -> None:
        await asyncio.sleep(START_REPORT_DELAY_S)
        if self.written < self.changes:
            await self._report()

    async def stop(self) -> None:
        """Cancel a pending start report (the attempt is over)."""
        if self.start_report is not None:
            self.start_report.cancel()
            await asyncio.gather(self.start_report, return_exceptions=True)

    async def _call_with_retries(self, item: InferenceInput) -> dict[str, Any]:
        # Items retry on their own, so one flaky item does not re-run the whole batch.
        attempt = 1
        while True:
            try:
                return await self.ctx.call(item.method, item.path, json=item.body, headers=item.headers)
            except RetryableError as exc:
                if attempt >= self.ctx.job.max_attempts:
                    raise
                settings = self.ctx.settings
                delay = backoff_s(
                    attempt, settings.backoff_base_s, settings.backoff_max_s, self.ctx.rng, exc.retry_after_s
                )
                await asyncio.sleep(delay)
                attempt += 1

    async def _report(self) -> None:
        async with self.report:  # counts only grow, so progress written in order never goes back
            total = len(self.spec.items)
            done = self.completed + self.failed
            message = f"{self.completed} completed, {self.failed} failed, {total} total"
            self.written = self.changes
            await self.ctx.progress(100.0 * done / total, message, items=list(self.statuses))

    def result(self) -> dict[str, Any]:
        items = [
            outcome if outcome is not None else {"index": i, "status": "skipped"}
            for i, outcome in enumerate(self.outcomes)
        ]
        return {"items": items, "completed": self.completed, "failed": self.failed}


def exc_error(exc: RetryableError | PermanentError) -> dict[str, Any]:
    """The JSON error of a failed request or item."""
    return exc.to_error().model_dump()


async def run_batch(ctx: JobContext) -> dict[str, Any]:
    """Built-in `batch`: run every item (at most `parallel_limit` at once); result in item order.

    Each item gets up to the job's `max_attempts` tries for retryable failures. Without
    `fail_fast` the job completes whatever the items did; with it, the first failed item stops
    the others (they are `skipped`) and fails the job, keeping the partial result.
    """
    spec = BatchInput.model_validate(ctx.input)
    batch = _Batch(ctx, spec)
    limit = asyncio.Semaphore(spec.parallel_limit)
    tasks = [asyncio.create_task(batch.run_item(i, limit)) for i in range(len(spec.items))]
    try:
        pending = set(tasks)
        while pending and not (spec.fail_fast and batch.first_failure is not None):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    raise exc
    finally:
        # Stops what is left (fail_fast, an error, or the job being cancelled) and waits for it,
        # so no request outlives the attempt.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await batch.stop()
    if spec.fail_fast and batch.first_failure is not None:
        failed = batch.outcomes[batch.first_failure]
        assert failed is not None
        raise PermanentError(
            f"batch item {batch.first_failure} failed: {failed['error']['message']}",
            status=failed["error"].get("status"),
            error_type="batch_item_failed",
            result=batch.result(),
        )
    return batch.result()


def register(registry: HandlerRegistry) -> None:
    """Register the built-in types, like a JOBS_HANDLERS module registers its own."""
    registry.register("inference", run_inference, input_model=InferenceInput)
    registry.register(BATCH_TYPE, run_batch, input_model=BatchInput)


def default_registry(handler_paths: Sequence[str] = ()) -> HandlerRegistry:
    """Built-in types plus those registered by each module in `handler_paths`.

    A path is `package.module` (its `register(registry)` is called) or `package.module:function`.
    Raises ValueError with a one-line message when a path cannot be imported or registers badly.
    """
    registry = HandlerRegistry()
    register(registry)
    for path in handler_paths:
        load_handlers(registry, path)
    return registry
