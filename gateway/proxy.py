"""The proxy handler: the only code that forwards bytes between clients and upstreams.

Per request: read (and, if small enough, buffer) the body; then up to max_attempts times ask the
pool for an upstream, send the request, classify what came back, record it, and ask the retry
policy whether to go on. Once response headers are accepted, stream the body to the client chunk
by chunk; from then on failover is over, and a failure mid-body ends the stream visibly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.budget import RetryGate
from gateway.classify import Outcome, classify_status
from gateway.config import GatewaySettings
from gateway.errors import (
    BadRequest,
    DeadlineExceeded,
    GatewayError,
    NoUpstreamAvailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.headers import client_response_headers, parse_retry_after, upstream_request_headers
from gateway.metrics import GatewayMetrics
from gateway.pool import Choice, Pool, Upstream
from gateway.retry import GiveUp, RetryPolicy, backoff_s

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")

_SSE = "text/event-stream"
# Give-up reasons where a retry was wanted but not allowed (gateway_retries_skipped_total).
_SKIPPED_RETRY_REASONS = frozenset({"body_not_replayable", "deadline"})


class _AttemptFailed(Exception):
    """An attempt ended before usable response headers; carries its outcome."""

    def __init__(self, outcome: Outcome, detail: str, deadline_hit: bool = False) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.deadline_hit = deadline_hit


@dataclass(slots=True)
class _Body:
    """The request body: bytes that can be replayed, or a stream that can be sent once."""

    data: bytes | AsyncIterator[bytes] | aiohttp.StreamReader | None
    replayable: bool
    reserved: int = 0


@dataclass(slots=True)
class _Exchange:
    """What one request has been through so far, for metrics, headers and the access log."""

    request_id: str
    started: float
    attempts: int = 0
    tried: list[Upstream] = field(default_factory=list)

    @property
    def upstream(self) -> Upstream | None:
        """The upstream of the latest attempt."""
        return self.tried[-1] if self.tried else None


class ReplayBuffers:
    """Accounts bytes held for replay across all requests, so their total stays capped."""

    __slots__ = ("capacity", "in_use")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0

    def reserve(self, n: int) -> bool:
        """Take `n` bytes of the shared allowance, if available."""
        if self.in_use + n > self.capacity:
            return False
        self.in_use += n
        return True

    def release(self, n: int) -> None:
        """Give back a reservation."""
        self.in_use -= n


class _IdleWatchdog:
    """Closes the upstream response after `idle_s` without a chunk, with one timer per period.

    Re-arming a timer on every chunk would cost a timer handle per chunk; instead the chunk loop
    only stamps the time, and the timer re-arms itself for the remainder when it fires early.
    """

    __slots__ = ("_handle", "_idle_s", "_loop", "_on_expire", "expired", "last")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_s: float, on_expire: Callable[[], None]) -> None:
        self._loop = loop
        self._idle_s = idle_s
        self._on_expire = on_expire
        self.expired = False
        self.last = loop.time()
        self._handle = loop.call_at(self.last + idle_s, self._check)

    def touch(self) -> None:
        """A chunk arrived."""
        self.last = self._loop.time()

    def _check(self) -> None:
        deadline = self.last + self._idle_s
        if self._loop.time() >= deadline:
            self.expired = True
            self._on_expire()
        else:
            self._handle = self._loop.call_at(deadline, self._check)

    def cancel(self) -> None:
        """Stop watching."""
        self._handle.cancel()


class _AttemptTimer:
    """Cancels the current task after `timeout_s`; a lighter `asyncio.timeout` for the hot path.

    Same contract as asyncio.timeout: after a CancelledError, `expired()` says whether it came
    from this timer (and then takes the cancellation back) or from elsewhere (client gone).
    """

    __slots__ = ("_cancelling", "_fired", "_handle", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._fired = False
        self._handle = loop.call_later(timeout_s, self._fire)

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """True if the CancelledError being handled is this timer's (and absorb it)."""
        return self._fired and self._task.uncancel() <= self._cancelling

    def cancel(self) -> None:
        """The operation finished; disarm."""
        self._handle.cancel()


def _outcome_of(exc: BaseException) -> Outcome:
    """Map a transport exception before response headers to an outcome."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Outcome.CONNECT_ERROR
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Outcome.CONNECT_ERROR
    return Outcome.RESET


class Proxy:
    """Forwards requests to the pool's upstreams with retries, streaming the responses back."""

    def __init__(
        self,
        settings: GatewaySettings,
        pool: Pool,
        session: aiohttp.ClientSession,
        metrics: GatewayMetrics,
        retry_gate: RetryGate,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._session = session
        self._metrics = metrics
        self._retry_gate = retry_gate
        self._budget_wait_s = settings.retry.budget_wait_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng
        self._policy = RetryPolicy(settings.retry.max_attempts, settings.retry.on_statuses)
        self._buffers = ReplayBuffers(settings.retry.total_replay_buffer_bytes)
        self._replay_limit = settings.retry.replay_buffer_bytes
        t = settings.timeouts
        self._attempt_timeout_s = t.attempt_s
        self._idle_s = t.idle_s
        self._deadline_s = t.deadline_s
        self._deadline_header = t.deadline_header
        # Only sock_connect: with no connection limit there is no pool wait to bound, and a
        # `connect` timeout would arm a timer on every request, even on reused connections.
        self._client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=None)
        self._access_log = settings.access_log
        self._loop = asyncio.get_running_loop()
        # Request ids: a random per-process prefix and a counter; as unique as uuid4 in practice
        # and much cheaper on the hot path.
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler for every proxied route."""
        request_id = request.headers.get("X-Request-ID") or f"{self._id_prefix}{next(self._ids):016x}"
        ex = _Exchange(request_id, self._clock())
        self._retry_gate.request_started()
        status = 499
        try:
            response = await self._serve(request, ex)
            status = response.status
            return response
        except GatewayError as err:
            response = self._error_response(err, ex)
            status = response.status
            return response
        except asyncio.CancelledError:
            self._metrics.client_disconnects.inc()
            raise
        finally:
            self._retry_gate.request_finished()
            duration = self._clock() - ex.started
            self._metrics.count_request(status, duration)
            if self._access_log:
                self._log_access(request, ex, status, duration)

    async def _serve(self, request: web.Request, ex: _Exchange) -> web.StreamResponse:
        deadline = self._deadline(request, ex.started)
        body = await self._read_body(request)
        try:
            base_headers = upstream_request_headers(
                request.headers,
                client_ip=request.remote,
                scheme=request.scheme,
                host=request.host,
                request_id=ex.request_id,
                static=(),
            )
            return await self._attempts(request, ex, body, base_headers, deadline)
        finally:
            if body.reserved:
                self._buffers.release(body.reserved)

    async def _attempts(
        self,
        request: web.Request,
        ex: _Exchange,
        body: _Body,
        base_headers: CIMultiDict[str],
        deadline: float | None,
    ) -> web.StreamResponse:
        now = self._clock()
        choice = self._pool.choose(now, self._rng)
        if choice is None:
            raise NoUpstreamAvailable(
                self._pool.describe_unavailable(now), retry_after_s=self._pool.retry_after_s(now)
            )
        while True:
            up = choice.upstream
            if choice.panic:
                self._metrics.panic.inc()
            # Every attempt after the first runs on a retry slot taken by _next_choice; the slot
            # is held until the attempt's headers arrive (or it fails), never while deciding the
            # next retry, so retries waiting for slots cannot hold each other up.
            holds_slot = ex.attempts > 0
            same_upstream = up in ex.tried
            ex.attempts += 1
            ex.tried.append(up)
            up.inflight += 1
            try:
                try:
                    if holds_slot:
                        delay = backoff_s(ex.attempts - 1, same_upstream, self._rng)
                        if delay:
                            await asyncio.sleep(delay)
                    resp = await self._send(request, up, body, base_headers, deadline)
                finally:
                    if holds_slot:
                        self._retry_gate.release()
            except _AttemptFailed as failed:
                up.inflight -= 1
                next_choice = await self._next_choice(ex, failed.outcome, None, body, deadline)
                if next_choice is None:
                    raise self._attempt_error(failed, up, ex) from None
                choice = next_choice
                continue
            except BaseException:
                up.inflight -= 1
                raise
            try:
                if resp.status >= 400:
                    outcome = classify_status(resp.status)
                    next_choice = await self._next_choice(ex, outcome, resp.status, body, deadline)
                    if next_choice is not None:
                        resp.release()
                        choice = next_choice
                        continue
                return await self._relay(request, resp, up, ex)
            finally:
                resp.close()
                up.inflight -= 1

    async def _next_choice(
        self,
        ex: _Exchange,
        outcome: Outcome,
        status: int | None,
        body: _Body,
        deadline: float | None,
    ) -> Choice | None:
        """The upstream for a retry, or None to give up and answer with what we have."""
        now = self._clock()
        decision = self._policy.decide(
            attempt=ex.attempts,
            outcome=outcome,
            status=status,
            response_started=False,
            body_replayable=body.replayable,
            deadline_left_s=None if deadline is None else deadline - now,
        )
        if isinstance(decision, GiveUp):
            if decision.reason in _SKIPPED_RETRY_REASONS:
                self._metrics.retries_skipped.labels(decision.reason).inc()
            return None
        wait_s = self._budget_wait_s if deadline is None else min(self._budget_wait_s, deadline - now)
        if not await self._retry_gate.acquire(wait_s):
            self._metrics.retries_skipped.labels("budget_exhausted").inc()
            return None
        # Choose only after any wait for the budget, so the pick reflects the pool as it is now.
        choice = self._pool.choose(self._clock(), self._rng, ex.tried)
        if choice is None:
            self._retry_gate.release()
            self._metrics.retries_skipped.labels("no_upstream").inc()
            return None
        self._metrics.retries.labels(decision.reason).inc()
        return choice

    async def _send(
        self,
        request: web.Request,
        up: Upstream,
        body: _Body,
        base_headers: CIMultiDict[str],
        deadline: float | None,
    ) -> aiohttp.ClientResponse:
        """One attempt up to response headers; records its outcome in pool and metrics."""
        timeout_s = self._attempt_timeout_s
        deadline_bound = False
        started = self._clock()
        if deadline is not None and deadline - started < timeout_s:
            timeout_s = deadline - started
            deadline_bound = True
        headers = base_headers
        if up.headers:
            headers = base_headers.copy()
            headers.update(up.headers)
        url = URL(up.base_url + request.raw_path, encoded=True)
        um = self._metrics.per_upstream[up.name]
        try:
            if timeout_s <= 0:
                raise TimeoutError
            timer = _AttemptTimer(self._loop, timeout_s)
            try:
                resp = await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body.data,
                    allow_redirects=False,
                    timeout=self._client_timeout,
                )
            except asyncio.CancelledError:
                if timer.expired():
                    raise TimeoutError from None
                raise
            finally:
                timer.cancel()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcome = _outcome_of(exc)
            now = self._clock()
            self._pool.record(up, outcome, now, now - started)
            um.outcomes[outcome].inc()
            hit = deadline_bound and outcome is Outcome.TIMEOUT
            raise _AttemptFailed(outcome, f"{type(exc).__name__}: {exc}".rstrip(": "), hit) from None
        now = self._clock()
        ttfb = now - started
        outcome = classify_status(resp.status)
        retry_after = None
        if outcome is Outcome.RATE_LIMITED:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"), self._wall_clock())
        self._pool.record(up, outcome, now, ttfb, retry_after)
        um.outcomes[outcome].inc()
        um.ttfb.observe(ttfb)
        return resp

    def _attempt_error(self, failed: _AttemptFailed, up: Upstream, ex: _Exchange) -> GatewayError:
        retry_after = self._pool.retry_after_s(self._clock())
        if failed.deadline_hit:
            return DeadlineExceeded(
                f"deadline passed after {ex.attempts} attempt(s); last upstream {up.name!r}",
                retry_after_s=retry_after,
            )
        message = f"upstream {up.name!r} failed ({failed.outcome}: {failed.detail})"
        if failed.outcome is Outcome.TIMEOUT:
            return UpstreamTimeout(message, retry_after_s=retry_after)
        return UpstreamUnavailable(message, retry_after_s=retry_after)

    async def _relay(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        up: Upstream,
        ex: _Exchange,
    ) -> web.StreamResponse:
        """Stream the upstream response to the client; failover is over once this starts."""
        out = web.StreamResponse(
            status=resp.status, reason=resp.reason, headers=client_response_headers(resp.headers)
        )
        out.headers["X-Request-ID"] = ex.request_id
        out.headers["X-Gateway-Upstream"] = up.name
        out.headers["X-Gateway-Attempts"] = str(ex.attempts)
        if resp.content_length is not None:
            out.content_length = resp.content_length
        is_sse = resp.content_type == _SSE
        watchdog = _IdleWatchdog(self._loop, self._idle_s, resp.close)
        ended_on_boundary = True
        try:
            await out.prepare(request)
            content = resp.content
            while True:
                try:
                    chunk = await content.readany()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    outcome = Outcome.TIMEOUT if watchdog.expired else Outcome.RESET
                    detail = "idle timeout" if watchdog.expired else type(exc).__name__
                    await self._abort_stream(request, out, up, outcome, detail, is_sse, ended_on_boundary)
                    return out
                if not chunk:
                    break
                watchdog.touch()
                if is_sse:
                    ended_on_boundary = chunk.endswith(b"\n\n") or chunk.endswith(b"\r\n\r\n")
                try:
                    await out.write(chunk)
                except ConnectionResetError:
                    # The client went away; closing the upstream response stops the generation.
                    self._metrics.client_disconnects.inc()
                    return out
            await out.write_eof()
            resp.release()
            return out
        finally:
            watchdog.cancel()

    async def _abort_stream(
        self,
        request: web.Request,
        out: web.StreamResponse,
        up: Upstream,
        outcome: Outcome,
        detail: str,
        is_sse: bool,
        ended_on_boundary: bool,
    ) -> None:
        """The upstream failed mid-body: make that visible to the client, never a clean end."""
        now = self._clock()
        self._pool.record(up, outcome, now, 0.0)
        self._metrics.per_upstream[up.name].stream_aborts.inc()
        log.warning("upstream %s failed mid-response (%s); ending the stream", up.name, detail)
        if is_sse:
            event = {
                "error": {
                    "type": "upstream_stream_error",
                    "message": f"upstream {up.name!r} failed mid-stream ({detail})",
                }
            }
            prefix = b"" if ended_on_boundary else b"\n\n"
            try:
                await out.write(prefix + b"event: error\ndata: " + orjson.dumps(event) + b"\n\n")
                await out.write_eof()
            except ConnectionResetError:
                self._metrics.client_disconnects.inc()
            return
        # Closing without the final chunk (or short of Content-Length) tells the client the
        # body is truncated; a clean end would pass a partial body off as complete.
        transport = request.transport
        if transport is not None:
            transport.close()

    async def _read_body(self, request: web.Request) -> _Body:
        """Buffer a body up to the replay limit so it can be retried; stream larger ones once."""
        if not request.body_exists:
            return _Body(None, True)
        length = request.content_length
        limit = self._replay_limit
        if length is not None:
            if length > limit or not self._buffers.reserve(length):
                return _Body(request.content, False)
            try:
                data = await request.content.readexactly(length)
            except asyncio.IncompleteReadError:
                self._buffers.release(length)
                raise BadRequest("request body ended before its Content-Length") from None
            return _Body(data, True, length)
        # Chunked upload of unknown size: buffer until it ends or passes the limit.
        if not self._buffers.reserve(limit):
            return _Body(request.content, False)
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                self._buffers.release(limit)
                return _Body(_chain(chunks, request), False)
        self._buffers.release(limit - size)
        return _Body(b"".join(chunks), True, size)

    def _deadline(self, request: web.Request, started: float) -> float | None:
        budget = self._deadline_s
        raw = request.headers.get(self._deadline_header)
        if raw is not None:
            try:
                asked = float(raw)
            except ValueError:
                asked = math.nan
            if not math.isfinite(asked) or asked <= 0:
                raise BadRequest(f"{self._deadline_header} must be a positive number of seconds, got {raw!r}")
            budget = asked if budget is None else min(budget, asked)
        return None if budget is None else started + budget

    def _error_response(self, err: GatewayError, ex: _Exchange) -> web.Response:
        payload = {
            "error": {
                "type": err.error_type,
                "message": err.message,
                "request_id": ex.request_id,
                "attempts": ex.attempts,
                "upstreams_tried": [u.name for u in ex.tried],
            }
        }
        resp = web.Response(status=err.status, body=orjson.dumps(payload), content_type="application/json")
        resp.headers["X-Request-ID"] = ex.request_id
        resp.headers["X-Gateway-Attempts"] = str(ex.attempts)
        if err.retry_after_s is not None:
            resp.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
        return resp

    def _log_access(self, request: web.Request, ex: _Exchange, status: int, duration: float) -> None:
        access_log.info(
            orjson.dumps(
                {
                    "ts": self._wall_clock(),
                    "request_id": ex.request_id,
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "upstream": ex.upstream.name if ex.upstream else None,
                    "attempts": ex.attempts,
                    "duration_s": round(duration, 6),
                }
            ).decode()
        )


async def _chain(head: list[bytes], request: web.Request) -> AsyncIterator[bytes]:
    """The buffered start of a body followed by the rest still on the socket."""
    for chunk in head:
        yield chunk
    while chunk := await request.content.readany():
        yield chunk
