"""The proxy handler: the only code that forwards bytes between clients and upstreams.

Per request: read (and, if small enough, buffer) the body; then up to max_attempts times ask the
pool for an upstream, send the request, classify what came back, record it, and ask the retry
policy whether to go on. Once response headers are accepted, stream the body to the client chunk
by chunk; from then on failover is over, and a failure mid-body ends the stream visibly.
Each attempt's hold on shared state (the upstream's in-flight count, a retry slot, the open
response) is owned by one `_Attempt`, and given back before waiting to admit the next.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import orjson

from gateway.config import GatewaySettings
from gateway.errors import (
    BadRequest,
    ClientTimeout,
    DeadlineExceeded,
    GatewayError,
    NoUpstreamAvailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.http.client import ConnectError, UpstreamClient, UpstreamError, UpstreamResponse
from gateway.http.headers import (
    NO_STATIC,
    RequestFieldReader,
    RequestFields,
    StaticFields,
    client_response_fields,
    field_value,
    parse_retry_after,
    upstream_request_fields,
)
from gateway.http.server import Request, RequestBody, RequestTimeout, Responder
from gateway.http.target import escapes_prefix
from gateway.metrics import GatewayMetrics
from gateway.policy.classify import Outcome, classify_status
from gateway.policy.retry import GiveUp, GiveUpReason, Retry, RetryPolicy, backoff_s
from gateway.policy.upstreams import Choice, Pool, Upstream
from gateway.retry_gate import RetryGate

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")

_SSE = b"text/event-stream"
# Methods a keep-alive race may resend without taking an attempt (RFC 9110 section 9.2.2).
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# A retryable error response is read whole (so its connection is freed while the next attempt
# waits) when its body is at most this big; inference servers send small JSON errors.
HELD_ERROR_BODY_BYTES = 64 * 1024


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

    data: bytes | bytearray | AsyncIterator[bytes | bytearray] | None
    replayable: bool
    reserved: int = 0  # replay memory held for it
    length: int | None = None  # the declared Content-Length of a streamed body


@dataclass(slots=True)
class _Exchange:
    """What one request has been through so far, for metrics, headers and the access log."""

    request_id: bytes
    started: float
    attempts: int = 0
    tried: list[Upstream] = field(default_factory=list)
    plain_fields: bytes | None = None  # the upstream header block, when no upstream adds its own
    client_deadline: bool = False  # the deadline is the client's (X-Gateway-Timeout), not ours

    @property
    def upstream(self) -> Upstream | None:
        """The upstream of the latest attempt."""
        return self.tried[-1] if self.tried else None


class _Attempt:
    """One attempt's hold on shared state: the upstream's in-flight count, a retry slot, the response.

    Entered as the attempt starts; until its response headers arrive (`headers_in`) it also counts
    as waiting, which bounds the upstream's latency estimate from below. The retry slot (of every
    attempt after the first) is held only until the headers arrive or the attempt fails
    (`release_slot`). On exit everything still held is given back, in one order for every path:
    the slot, the response, the upstream's counts.
    """

    __slots__ = ("_gate", "_started", "response", "upstream")

    def __init__(self, upstream: Upstream, gate: RetryGate | None, now: float) -> None:
        self.upstream = upstream
        self._gate = gate
        self._started = now
        self.response: UpstreamResponse | None = None

    def __enter__(self) -> _Attempt:
        self.upstream.attempt_started(self, self._started)
        return self

    def headers_in(self) -> None:
        """The response headers arrived: no longer waiting."""
        self.upstream.waiting.pop(self, None)

    def release_slot(self) -> None:
        """The attempt no longer counts against the retry budget."""
        gate = self._gate
        if gate is not None:
            self._gate = None
            gate.release()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release_slot()
        response = self.response
        if response is not None:
            self.response = None
            response.close()
        self.upstream.attempt_ended(self)


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


def _outcome_of(exc: UpstreamError) -> Outcome:
    """Map a failure before response headers to an outcome."""
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, ConnectError):
        return Outcome.CONNECT_ERROR
    return Outcome.RESET


class Proxy:
    """Forwards requests to the pool's upstreams with retries, streaming the responses back."""

    def __init__(
        self,
        settings: GatewaySettings,
        pool: Pool,
        clients: Sequence[UpstreamClient],
        metrics: GatewayMetrics,
        retry_gate: RetryGate,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._clients = clients  # by Upstream.index
        self._static = [StaticFields(up.headers) if up.headers else NO_STATIC for up in pool.upstreams]
        self._names = [up.name.encode() for up in pool.upstreams]
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
        self._deadline_key = t.deadline_header.lower().encode()
        self._fields = RequestFieldReader(extra=(t.deadline_header,))
        self._access_log = settings.access_log
        # Request ids: a random per-process prefix and a counter; as unique as uuid4 in practice
        # and much cheaper on the hot path.
        self._id_prefix = os.urandom(8).hex().encode()
        self._ids = itertools.count(1)

    async def handle(self, request: Request, responder: Responder) -> None:
        """Server handler for every proxied request."""
        fields = self._fields.read(request.fields)
        request_id = fields.get(b"x-request-id") or b"%b%016x" % (self._id_prefix, next(self._ids))
        ex = _Exchange(request_id, self._clock())
        self._retry_gate.request_started()
        status = 499
        try:
            status = await self._serve(request, fields, responder, ex)
        except GatewayError as err:
            status = err.status
            self._send_error(responder, err, ex)
        except (asyncio.CancelledError, ConnectionResetError):
            self._metrics.client_disconnects.inc()
            raise
        finally:
            self._retry_gate.request_finished()
            duration = self._clock() - ex.started
            self._metrics.count_request(status, duration)
            if self._access_log:
                self._log_access(request, ex, status, duration)

    async def _serve(
        self, request: Request, fields: RequestFields, responder: Responder, ex: _Exchange
    ) -> int:
        if escapes_prefix(request.target):
            raise BadRequest("the request path has '..' segments; send a normalised path")
        deadline = self._deadline(fields, ex)
        body = _Body(None, True)
        try:
            await self._read_body(request, fields, body)
            return await self._attempts(request, fields, responder, ex, body, deadline)
        except RequestTimeout as exc:
            raise ClientTimeout(str(exc)) from None
        finally:
            if body.reserved:
                self._buffers.release(body.reserved)

    async def _attempts(
        self,
        request: Request,
        fields: RequestFields,
        responder: Responder,
        ex: _Exchange,
        body: _Body,
        deadline: float | None,
    ) -> int:
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
            # Every attempt after the first runs on a retry slot taken by _admit_retry.
            gate = self._retry_gate if ex.attempts > 0 else None
            with _Attempt(up, gate, self._clock()) as attempt:
                failure = await self._try(attempt, request, fields, ex, body, deadline)
                resp = attempt.response
                if resp is not None:
                    if resp.status < 400:
                        return await self._relay(request, responder, resp, up, ex)
                    decision = self._decide(ex, classify_status(resp.status), resp.status, body, deadline)
                    if isinstance(decision, GiveUp) or not await self._hold(resp):
                        return await self._relay(request, responder, resp, up, ex)
                    # Held whole in memory: the connection is free while the retry is admitted.
                    attempt.response = None
                else:
                    assert failure is not None
                    decision = self._decide(ex, failure.outcome, None, body, deadline)
            # The attempt has given back everything it held: nothing waits on the budget held.
            choice = None if isinstance(decision, GiveUp) else await self._admit_retry(ex, decision, deadline)
            if choice is None:
                if resp is None:
                    assert failure is not None
                    raise self._attempt_error(failure, up, ex)
                return await self._relay(request, responder, resp, up, ex)

    async def _try(
        self,
        attempt: _Attempt,
        request: Request,
        fields: RequestFields,
        ex: _Exchange,
        body: _Body,
        deadline: float | None,
    ) -> _AttemptFailed | None:
        """Run one attempt up to its response headers: the response goes to `attempt`, or a failure."""
        up = attempt.upstream
        block = self._upstream_fields(request, fields, ex, up)
        same_upstream = up in ex.tried
        ex.attempts += 1
        ex.tried.append(up)
        try:
            if ex.attempts > 1:
                delay = backoff_s(ex.attempts - 1, same_upstream, self._rng)
                if delay:
                    await asyncio.sleep(delay)
            attempt.response = await self._send(request, up, block, body, ex, deadline)
            attempt.headers_in()
        except _AttemptFailed as failed:
            return failed
        finally:
            attempt.release_slot()
        return None

    def _upstream_fields(self, request: Request, fields: RequestFields, ex: _Exchange, up: Upstream) -> bytes:
        """The header block for `up`; built once per request unless the upstream adds its own."""
        static = self._static[up.index]
        if static is NO_STATIC and ex.plain_fields is not None:
            return ex.plain_fields
        block = upstream_request_fields(
            fields,
            client_ip=request.peer,
            scheme=b"http",
            host=fields.get(b"host"),
            request_id=ex.request_id,
            static=static,
        )
        if static is NO_STATIC:
            ex.plain_fields = block
        return block

    def _decide(
        self, ex: _Exchange, outcome: Outcome, status: int | None, body: _Body, deadline: float | None
    ) -> Retry | GiveUp:
        """Whether the failed attempt is tried again (the budget is asked later, if so)."""
        decision = self._policy.decide(
            attempt=ex.attempts,
            outcome=outcome,
            status=status,
            body_replayable=body.replayable,
            deadline_left_s=None if deadline is None else deadline - self._clock(),
        )
        if isinstance(decision, GiveUp) and decision.reason.skipped:
            self._metrics.retries_skipped.labels(decision.reason).inc()
        return decision

    async def _hold(self, resp: UpstreamResponse) -> bool:
        """Read a retryable error response whole, so it can be answered later; False if too big."""
        try:
            return await resp.wait_ended(HELD_ERROR_BODY_BYTES)
        except UpstreamError:
            return False  # relayed as far as it goes; the client sees the truncation

    async def _admit_retry(self, ex: _Exchange, decision: Retry, deadline: float | None) -> Choice | None:
        """The upstream for the retry, once the budget admits it; None to answer with what we have."""
        now = self._clock()
        wait_s = self._budget_wait_s if deadline is None else min(self._budget_wait_s, deadline - now)
        if not await self._retry_gate.acquire(wait_s):
            self._metrics.retries_skipped.labels(GiveUpReason.BUDGET_EXHAUSTED).inc()
            return None
        # Choose only after any wait for the budget, so the pick reflects the pool as it is now.
        choice = self._pool.choose(self._clock(), self._rng, ex.tried)
        if choice is None:
            self._retry_gate.release()
            self._metrics.retries_skipped.labels(GiveUpReason.NO_UPSTREAM).inc()
            return None
        self._metrics.retries.labels(decision.reason).inc()
        return choice

    async def _send(
        self, request: Request, up: Upstream, block: bytes, body: _Body, ex: _Exchange, deadline: float | None
    ) -> UpstreamResponse:
        """One attempt up to response headers; records its outcome in pool and metrics."""
        timeout_s = self._attempt_timeout_s
        deadline_bound = False
        started = self._clock()
        if deadline is not None and deadline - started < timeout_s:
            timeout_s = deadline - started
            deadline_bound = True
        um = self._metrics.per_upstream[up.name]
        # The keep-alive race resend runs the request again: for a non-idempotent one it takes
        # an attempt, so a POST is never sent more than retry.max_attempts times.
        idempotent = request.method in _IDEMPOTENT
        try:
            resp = await self._clients[up.index].request(
                request.method,
                request.target,
                block,
                body.data,
                length=body.length,
                timeout_s=timeout_s,
                idle_s=self._idle_s,
                resend=idempotent or ex.attempts < self._policy.max_attempts,
            )
        except UpstreamError as exc:
            if exc.resent and not idempotent:
                ex.attempts += 1
            now = self._clock()
            outcome = _outcome_of(exc)
            hit = deadline_bound and outcome is Outcome.TIMEOUT
            if hit and ex.client_deadline:
                # The client's own deadline says nothing about the upstream: not a failure, no
                # ejection, no latency sample.
                outcome = Outcome.ABANDONED
            else:
                self._pool.record(up, outcome, now, now - started)
            um.outcomes[outcome].inc()
            detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
            raise _AttemptFailed(outcome, detail, hit) from None
        except asyncio.CancelledError:
            # The client left while waiting: the upstream took at least this long.
            now = self._clock()
            self._pool.record_abandoned(up, now - started, now)
            um.outcomes[Outcome.ABANDONED].inc()
            raise
        if resp.resent and not idempotent:
            ex.attempts += 1
        now = self._clock()
        ttfb = now - started
        outcome = classify_status(resp.status)
        retry_after = None
        if outcome is Outcome.RATE_LIMITED:
            retry_after = parse_retry_after(field_value(resp.fields, b"retry-after"), self._wall_clock())
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
        request: Request,
        responder: Responder,
        resp: UpstreamResponse,
        up: Upstream,
        ex: _Exchange,
    ) -> int:
        """Stream the upstream response to the client; failover is over once this starts."""
        out = client_response_fields(resp.fields)
        tracing = b"X-Request-ID: %b\r\nX-Gateway-Upstream: %b\r\nX-Gateway-Attempts: %d\r\n" % (
            ex.request_id,
            self._names[up.index],
            ex.attempts,
        )
        responder.start(resp.status, resp.reason, out.block + tracing, out.content_length)
        try:
            data = resp.take_buffered()
            if resp.complete:
                await responder.write(data)
                responder.end()
                return resp.status
            if data:
                await responder.write(data)
            else:
                responder.flush()  # headers now: the first body bytes may take a while (SSE)
            is_sse = out.content_type is not None and out.content_type.startswith(_SSE)
            ended_on_boundary = not data or data.endswith((b"\n\n", b"\r\n\r\n"))
            while True:
                try:
                    chunk = await resp.read()
                except UpstreamError as exc:
                    timed_out = isinstance(exc, TimeoutError)
                    outcome = Outcome.TIMEOUT if timed_out else Outcome.RESET
                    detail = "idle timeout" if timed_out else type(exc).__name__
                    await self._abort_stream(responder, up, outcome, detail, is_sse, ended_on_boundary)
                    return resp.status
                if not chunk:
                    break
                if is_sse:
                    ended_on_boundary = chunk.endswith((b"\n\n", b"\r\n\r\n"))
                await responder.write(chunk)
            responder.end()
        except ConnectionResetError:
            # The client went away; closing the upstream response (by the caller) stops the generation.
            self._metrics.client_disconnects.inc()
        return resp.status

    async def _abort_stream(
        self,
        responder: Responder,
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
            await responder.write(prefix + b"event: error\ndata: " + orjson.dumps(event) + b"\n\n")
            responder.end()
            return
        # Closing without the final chunk (or short of Content-Length) tells the client the
        # body is truncated; a clean end would pass a partial body off as complete.
        responder.abort()

    async def _read_body(self, request: Request, fields: RequestFields, body: _Body) -> None:
        """Buffer a body up to the replay limit so it can be retried; stream larger ones once.

        Replay memory is reserved as bytes arrive, so the shared cap counts only what is held
        and a slow upload holds no more of it than it has sent. A body that passes the limit,
        or finds the cap full, is streamed once instead.
        """
        length = fields.content_length
        if length is None and not fields.chunked:
            return
        stream = request.body
        limit = self._replay_limit
        body.length = length
        if length is not None and length > limit:
            body.data, body.replayable = _rest(stream), False
            return
        buffers = self._buffers
        data: bytes | bytearray = b""
        while chunk := await stream.read():
            size = len(data) + len(chunk)
            if size > limit or not buffers.reserve(len(chunk)):
                body.data, body.replayable = _rest(stream, (data, chunk)), False
                return
            body.reserved += len(chunk)
            if not data:
                data = chunk  # most bodies arrive in one read: no copy
            else:
                if isinstance(data, bytes):
                    data = bytearray(data)
                data += chunk
        if length is not None and len(data) != length:
            raise BadRequest("request body ended before its Content-Length")
        body.data = data

    def _deadline(self, fields: RequestFields, ex: _Exchange) -> float | None:
        """When a response must have started by; notes in `ex` whether the client's header set it."""
        budget = self._deadline_s
        raw = fields.get(self._deadline_key)
        if raw is not None:
            try:
                asked = float(raw)
            except ValueError:
                asked = math.nan
            if not math.isfinite(asked) or asked <= 0:
                shown = raw.decode("latin-1")
                raise BadRequest(
                    f"{self._deadline_header} must be a positive number of seconds, got {shown!r}"
                )
            if budget is None or asked < budget:
                budget = asked
                ex.client_deadline = True
        return None if budget is None else ex.started + budget

    def _send_error(self, responder: Responder, err: GatewayError, ex: _Exchange) -> None:
        request_id = ex.request_id.decode("latin-1")
        payload = {
            "error": {
                "type": err.error_type,
                "message": err.message,
                "request_id": request_id,
                "attempts": ex.attempts,
                "upstreams_tried": [u.name for u in ex.tried],
            }
        }
        fields = b"Content-Type: application/json\r\nX-Request-ID: %b\r\nX-Gateway-Attempts: %d\r\n" % (
            ex.request_id,
            ex.attempts,
        )
        if err.retry_after_s is not None:
            fields += b"Retry-After: %d\r\n" % max(1, math.ceil(err.retry_after_s))
        responder.send(err.status, fields, orjson.dumps(payload))

    def _log_access(self, request: Request, ex: _Exchange, status: int, duration: float) -> None:
        access_log.info(
            orjson.dumps(
                {
                    "ts": self._wall_clock(),
                    "request_id": ex.request_id.decode("latin-1"),
                    "method": request.method.decode("latin-1"),
                    "path": request.path,
                    "status": status,
                    "upstream": ex.upstream.name if ex.upstream else None,
                    "attempts": ex.attempts,
                    "duration_s": round(duration, 6),
                }
            ).decode()
        )


async def _rest(
    body: RequestBody, head: Sequence[bytes | bytearray] = ()
) -> AsyncIterator[bytes | bytearray]:
    """The buffered start of a body (if any) followed by the rest still on the socket."""
    for chunk in head:
        if chunk:
            yield chunk
    while chunk := await body.read():
        yield chunk
