"""The handler API: a registry of async handlers by job type, and the context they run with.

A handler is `async def handler(ctx: JobContext) -> result` where the result is JSON-able and
becomes the job's `result`. It reads its validated input from `ctx.job.input`, reports with
`await ctx.progress(...)` and `await ctx.log(...)`, calls the gateway through `ctx.gateway` (or
`ctx.call`, which classifies the answer), and watches `ctx.cancelled`. It ends an attempt early by
raising `RetryableError` (run the whole attempt again after a backoff, up to the job's
`max_attempts`) or `PermanentError` (fail the job now). Anything else it raises fails the job as
`handler_error`; the traceback goes to the server log only.

Custom types live in modules named in `JOBS_HANDLERS` (comma-separated import paths). Each such
module defines `register(registry: HandlerRegistry) -> None`, which calls
`registry.register("my_type", handler, input_model=MyInput)`; `module:function` names another
function. See `jobs_api/examples/pipeline.py` for a complete example.

The built-in types (`inference`, `batch`) are written against this same API in
`jobs_api.job_types`, whose `default_registry` registers them before the JOBS_HANDLERS modules.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError

from gateway.http.headers import parse_retry_after
from jobs_api.attempts import owns
from jobs_api.config import JobsSettings
from jobs_api.errors import StoreUnavailable, ValidationFailed
from jobs_api.models import ItemProgress, Job, JobError, Progress
from jobs_api.store.base import JobStore, LogLevel, LogLine

__all__ = [
    "Handler",
    "HandlerRegistry",
    "JobContext",
    "PermanentError",
    "RetryableError",
    "backoff_s",
    "load_handlers",
]

log = logging.getLogger(__name__)

# Statuses worth another attempt later: rate limits, server errors, the gateway's own 502/503/504
# (no upstream available, every upstream unreachable, upstream timeout). 500 counts too: inference
# servers answer 500 for transient faults (OOM, a crashed worker) far more often than for a bad
# request, and max_attempts bounds the cost when it is not transient.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Response headers kept in an inference result.
RESULT_HEADERS = ("content-type", "x-request-id", "x-gateway-upstream", "x-gateway-attempts")
# Longest job log message kept; longer ones are cut (a log line is not a place for payloads).
MAX_LOG_MESSAGE_CHARS = 8192
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class RetryableError(Exception):
    """The attempt failed for a reason that may pass: run the whole attempt again later."""

    error_type = "retryable_error"

    def __init__(
        self,
        message: str,
        retry_after_s: float | None = None,
        *,
        status: int | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.status = status
        if error_type is not None:
            self.error_type = error_type

    def to_error(self) -> JobError:
        """The job `error` this becomes."""
        return JobError(type=self.error_type, message=self.message, retryable=True, status=self.status)


class PermanentError(Exception):
    """The job cannot succeed: fail it now; `result` (if any) is kept on the failed job."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        error_type: str = "permanent_error",
        *,
        result: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.result = result

    def to_error(self) -> JobError:
        """The job `error` this becomes."""
        return JobError(type=self.error_type, message=self.message, retryable=False, status=self.status)


def backoff_s(
    attempt: int,
    base_s: float,
    max_s: float,
    rng: random.Random,
    retry_after_s: float | None = None,
) -> float:
    """Delay before the next attempt: full jitter on base*2**(attempt-1), capped; at least Retry-After."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempt - 1))
    delay = rng.uniform(0.0, ceiling)
    if retry_after_s is not None and retry_after_s > delay:
        delay = retry_after_s
    return delay


def excerpt(body: bytes, limit: int) -> str:
    """At most `limit` bytes of `body` as text (a multi-byte character cut at the end is dropped)."""
    text = body[:limit].decode("utf-8", "ignore" if len(body) > limit else "replace")
    return text + "…" if len(body) > limit else text


class JobContext:
    """What a handler gets: its job, a gateway client, progress/log reporting and a cancel signal.

    `progress` and `log` are committed to the store before they return; while the store is
    unavailable they are kept here (the newest progress, a bounded log) and stored by `flush`,
    which the runner calls until it succeeds. After the job stopped belonging to this attempt
    (lease lost, cancelled), `progress` writes nothing. `cancelled` is set when the attempt must
    stop (cancel requested, deadline reached, runner shutting down), just before the handler's
    task is cancelled; a handler may check it between steps.
    """

    def __init__(
        self,
        job: Job,
        gateway: aiohttp.ClientSession,
        store: JobStore,
        settings: JobsSettings,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> None:
        self.job = job
        self.gateway = gateway
        self.store = store
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.cancelled = cancelled or asyncio.Event()
        # What could not be stored yet because the store was unavailable.
        self._unsaved_progress: tuple[Progress, ItemProgress | None, float] | None = None
        self._unsaved_logs: list[LogLine] = []
        self._flushing = asyncio.Lock()

    @property
    def input(self) -> dict[str, Any]:
        """The job's validated input."""
        return self.job.input

    async def progress(
        self,
        percent: float,
        message: str | None = None,
        phase: str | None = None,
        *,
        items: Sequence[str] | None = None,
    ) -> None:
        """Record progress (percent 0-100, clamped): stored before returning, or kept until the
        store answers again.

        `items` is the status of each item of a fan-out job (what `GET /v1/batches/{id}` shows
        while a batch runs); None keeps the statuses stored before.
        """
        if percent != percent:  # NaN
            raise ValueError("progress percent must be a number between 0 and 100, got NaN")
        progress = Progress(percent=min(100.0, max(0.0, float(percent))), message=message, phase=phase)
        item_progress = None
        if items is not None:
            item_progress = ItemProgress(attempt=self.job.attempts, statuses=tuple(items))
        self._unsaved_progress = (progress, item_progress, self.clock())
        await self.flush()

    async def _store_progress(self, progress: Progress, items: ItemProgress | None, now: float) -> None:
        attempt = self.job
        update: dict[str, Any] = {"progress": progress, "updated_at": now}
        if items is not None:
            update["item_progress"] = items

        def change(job: Job) -> Job:
            if not owns(job, attempt):
                return job
            return job.model_copy(update=update)

        await self.store.mutate(self.job.id, change)

    @property
    def unsaved(self) -> bool:
        """True while progress or log lines wait for the store to answer again."""
        return self._unsaved_progress is not None or bool(self._unsaved_logs)

    async def flush(self) -> bool:
        """Store what was kept while the store was unavailable; False if it still is."""
        async with self._flushing:
            try:
                while self._unsaved_logs:
                    await self.store.append_log(self.job.id, self._unsaved_logs[0])
                    del self._unsaved_logs[0]
                pending = self._unsaved_progress
                if pending is not None:
                    await self._store_progress(*pending)
                    if self._unsaved_progress is pending:  # not replaced by a newer one meanwhile
                        self._unsaved_progress = None
            except StoreUnavailable as exc:
                log.warning("job %s: store unavailable (%s); keeping its progress and logs", self.job.id, exc)
                return False
        return True

    async def log(self, level: str, message: str) -> None:
        """Append a line to the job's log (stored like progress); level is debug, info, warning or error."""
        try:
            parsed = LogLevel[level.upper()]
        except KeyError:
            raise ValueError(f"log level {level!r} is not one of debug, info, warning, error") from None
        if len(message) > MAX_LOG_MESSAGE_CHARS:
            message = message[:MAX_LOG_MESSAGE_CHARS] + "…"
        self._unsaved_logs.append(LogLine(self.clock(), parsed, message))
        del self._unsaved_logs[: -self.store.max_log_lines]
        await self.flush()

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send one request through the gateway and classify the answer.

        Returns `{"status", "headers", "body", "upstream"}` for a 2xx. Raises RetryableError for
        429/500/502/503/504 and connection failures or timeouts (Retry-After honoured), and
        PermanentError for any other status, with a bounded excerpt of the body.
        """
        send_headers = {"X-Request-ID": self.job.id, **(headers or {})}
        data = None if json is None else orjson.dumps(json)
        if data is not None:
            send_headers.setdefault("Content-Type", "application/json")
        try:
            async with self.gateway.request(
                method, path, data=data, headers=send_headers, allow_redirects=False
            ) as resp:
                body = await resp.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise RetryableError(
                f"{method} {path}: gateway unreachable: {reason}", error_type="gateway_unreachable"
            ) from exc
        return self._classify(method, path, resp, body)

    def _classify(self, method: str, path: str, resp: aiohttp.ClientResponse, body: bytes) -> dict[str, Any]:
        status = resp.status
        if 200 <= status < 300:
            return {
                "status": status,
                "headers": {h: resp.headers[h] for h in RESULT_HEADERS if h in resp.headers},
                "body": _decode_body(body, resp.headers.get("Content-Type", "")),
                "upstream": resp.headers.get("X-Gateway-Upstream"),
            }
        text = excerpt(body, self.settings.error_excerpt_bytes)
        message = f"{method} {path}: upstream answered {status}: {text}"
        if status in RETRYABLE_STATUSES:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"), self.clock())
            raise RetryableError(message, retry_after, status=status, error_type="upstream_error")
        raise PermanentError(message, status=status, error_type="upstream_error")


def _decode_body(body: bytes, content_type: str) -> Any:
    if "json" in content_type.lower():
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return body.decode("utf-8", "replace")


Handler = Callable[[JobContext], Awaitable[Any]]


class HandlerRegistry:
    """Job type name -> handler and its input model; built once at startup, then read-only."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Handler, type[BaseModel] | None]] = {}

    def register(
        self, type_name: str, handler: Handler, *, input_model: type[BaseModel] | None = None
    ) -> None:
        """Add a job type; raises ValueError for a bad or already registered name."""
        if not _TYPE_NAME.match(type_name):
            raise ValueError(
                f"job type name {type_name!r} must match {_TYPE_NAME.pattern} (e.g. 'summarize')"
            )
        if type_name in self._handlers:
            raise ValueError(f"job type {type_name!r} is already registered")
        self._handlers[type_name] = (handler, input_model)

    def handler(self, type_name: str) -> Handler:
        """The handler of `type_name`; raises KeyError if unknown."""
        return self._handlers[type_name][0]

    def types(self) -> list[str]:
        """Registered type names, sorted."""
        return sorted(self._handlers)

    def input_model(self, type_name: str) -> type[BaseModel] | None:
        """The input model of `type_name` (None: any JSON object); raises KeyError if unknown."""
        return self._handlers[type_name][1]

    def validate_input(self, type_name: str, data: Any) -> dict[str, Any]:
        """The normalized input for a job of `type_name` (defaults filled in).

        Raises ValidationFailed for an unknown type (naming the known ones) or an input its model
        rejects (naming the field).
        """
        entry = self._handlers.get(type_name)
        if entry is None:
            known = ", ".join(self.types()) or "none"
            raise ValidationFailed(f"unknown job type {type_name!r}; known types: {known}")
        model = entry[1]
        if not isinstance(data, dict):
            raise ValidationFailed(f"input of a {type_name!r} job must be a JSON object")
        if model is None:
            return data
        try:
            return model.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            raise ValidationFailed(_describe(type_name, exc)) from None


def _describe(type_name: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in ("input", *err["loc"]))
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - 5
    suffix = f" (and {more} more)" if more > 0 else ""
    return f"invalid input for a {type_name!r} job: " + "; ".join(parts) + suffix


# --- loading custom job types -----------------------------------------------------------------


def load_handlers(registry: HandlerRegistry, path: str) -> None:
    """Import `path` (`module` or `module:function`) and let it register its job types."""
    module_name, _, attr = path.partition(":")
    attr = attr or "register"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ValueError(f"JOBS_HANDLERS: cannot import {module_name!r}: {reason}") from None
    register = getattr(module, attr, None)
    if not callable(register):
        raise ValueError(
            f"JOBS_HANDLERS: module {module_name!r} has no function {attr!r}; "
            "define `def register(registry): registry.register('my_type', handler)`"
        )
    try:
        register(registry)
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"JOBS_HANDLERS: {path!r}: {reason}") from None
    log.info("loaded job handlers from %s; types now %s", path, ", ".join(registry.types()))
