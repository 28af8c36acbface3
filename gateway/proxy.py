"""The proxy handler: the only code that forwards bytes between clients and upstreams.

Per request: read (and, if small enough, buffer) the body; then up to max_attempts times ask the
pool for an upstream, send the request, classify what came back, record it, and ask the retry
policy whether to go on. A response is committed to the client at its headers, except a
Server-Sent Events stream, which is held until its first content event (`stream.commit`), so a
stream that fails before any output (an error event, a cut, no first token in time) is retried
like a failure before headers. After the commit the body is relayed chunk by chunk (for a
stream, event by event); a stream that fails then is continued on an upstream that accepts
prefill when there is one, and otherwise ends with an error event, never a clean end.
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
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from prometheus_client import Histogram
from yarl import URL

from gateway.admission import Admission, Admitted, ModelRoute
from gateway.config import AffinityKey, GatewaySettings, LoadReport, Strategy, StreamCommit
from gateway.errors import (
    BadRequest,
    CallerLimited,
    ClientTimeout,
    DeadlineExceeded,
    EnginesSaturated,
    GatewayError,
    ModelNotAllowed,
    ModelNotFound,
    NoUpstreamAvailable,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.front_door import PREFER, AsyncFrontDoor, FrontDoorError, wants_async
from gateway.http.client import ConnectError, UpstreamClient, UpstreamError, UpstreamResponse
from gateway.http.headers import (
    NO_STATIC,
    RequestFieldReader,
    RequestFields,
    ResponseFields,
    StaticFields,
    client_response_fields,
    field_value,
    parse_retry_after,
    upstream_request_fields,
)
from gateway.http.server import Request, RequestBody, RequestTimeout, Responder
from gateway.http.target import escapes_prefix
from gateway.metrics import GatewayMetrics
from gateway.policy.affinity import prefix_key, session_key
from gateway.policy.classify import Outcome, classify_status
from gateway.policy.load import ORCA_HEADER, MalformedReport, parse_orca
from gateway.policy.models import read_model
from gateway.policy.rejections import Rejection, classify_rejection
from gateway.policy.retry import GiveUp, GiveUpReason, Retry, RetryPolicy, backoff_s
from gateway.policy.upstreams import Choice, Pool, Upstream
from gateway.retry_gate import RetryGate
from gateway.saturation_gate import SaturationGate
from gateway.stream.continuation import Transcript, continuation_body, splice
from gateway.stream.events import Event, EventScanner, Kind
from gateway.tracing import Tracing

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
class _StreamStart:
    """A held stream at its commit point: the events so far (preamble and first output)."""

    scanner: EventScanner
    events: list[Event]


@dataclass(slots=True)
class _StreamFailure:
    """How a committed stream failed."""

    outcome: Outcome
    detail: str


class _StreamMeter:
    """What one relayed stream tells the metrics: gaps between content events, and its usage."""

    __slots__ = ("_ex", "_gap", "_last_content", "arrived")

    def __init__(self, gap: Histogram, ex: _Exchange, now: float) -> None:
        self._gap = gap
        self._ex = ex
        self._last_content = 0.0
        self.arrived = now  # when the events being passed arrived

    def passed(self, event: Event) -> None:
        """An event went to the client."""
        if event.kind is Kind.CONTENT:
            if self._last_content:
                self._gap.observe(self.arrived - self._last_content)
            self._last_content = self.arrived
        if event.data is not None:
            self._ex.usage = _usage_of(event.data) or self._ex.usage


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
    admitted: Admitted | None = None  # caller and model, when callers or models are configured
    refused: list[Upstream] = field(default_factory=list)  # upstreams that refused to connect
    key: bytes | None = None  # affinity key (engine strategy)
    waited: float = 0.0  # seconds spent waiting on upstreams, the client, or on purpose (backoff)
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens the response reported
    ttft: float | None = None  # seconds to the first content event (or headers, not a stream)
    fault: str | None = None  # whose fault a non-2xx answer is: client, upstream or gateway
    injected_usage: bool = False  # the gateway asked for usage the client did not: strip it
    per_token_pending: bool = False  # the latest attempt's latency sample waits for its usage
    span: Any = None  # the request's trace span, when tracing is on
    response_model: str | None = None  # the model the answer names (traced requests only)

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

    __slots__ = ("_gate", "_started", "forwarded", "held", "response", "sent_at", "span", "upstream")

    def __init__(self, upstream: Upstream, gate: RetryGate | None, now: float) -> None:
        self.upstream = upstream
        self._gate = gate
        self._started = now
        self.response: UpstreamResponse | None = None
        self.sent_at = now  # when the request went out (after any backoff)
        self.held = False  # a stream held until its first content event; not recorded yet
        self.forwarded: ResponseFields | None = None  # the response's fields as the client gets them
        self.span: Any = None  # the attempt's trace span, when tracing is on

    def __enter__(self) -> _Attempt:
        self.upstream.attempt_started(self, self._started)
        return self

    def headers_in(self) -> None:
        """The response headers (or a held stream's first content event) arrived: no longer waiting."""
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
        if self.span is not None:
            self.span.end()


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
        # Upstreams asked for vLLM's ORCA load report carry the request field that asks for it.
        self._orca = [cfg.load_report is LoadReport.ORCA for cfg in settings.upstreams]
        orca_field = (("Endpoint-Load-Metrics-Format", "TEXT"),)
        self._static = [
            StaticFields(up.headers + orca_field)
            if orca
            else StaticFields(up.headers)
            if up.headers
            else NO_STATIC
            for up, orca in zip(pool.upstreams, self._orca, strict=True)
        ]
        self._names = [up.name.encode() for up in pool.upstreams]
        self._metrics = metrics
        self._retry_gate = retry_gate
        self._budget_wait_s = settings.retry.budget_wait_s
        self._max_retry_after_wait_s = settings.retry.max_retry_after_wait_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng
        self._policy = RetryPolicy(settings.retry.max_attempts, settings.retry.on_statuses)
        self._buffers = ReplayBuffers(settings.retry.total_replay_buffer_bytes)
        self._replay_limit = settings.retry.replay_buffer_bytes
        t = settings.timeouts
        self._attempt_timeout_s = t.attempt_s
        self._idle_s = t.idle_s
        self._first_token_s = t.first_token_s
        self._hold_streams = settings.stream.commit is StreamCommit.FIRST_EVENT
        self._max_held_bytes = settings.stream.max_held_bytes
        self._can_continue = any(up.continues for up in pool.upstreams)
        self._inject_usage = settings.usage.include_usage_injection
        self._deadline_s = t.deadline_s
        self._deadline_header = t.deadline_header
        self._deadline_key = t.deadline_header.lower().encode()
        self._admission = Admission(settings, clock())
        # A caller's own credential is read, and never forwarded upstream.
        consume = ("authorization", "api-key") if settings.callers else ()
        self._engine = settings.strategy is Strategy.ENGINE
        aff, sat = settings.affinity, settings.saturation
        self._affinity = aff.key if self._engine else AffinityKey.NONE
        self._affinity_field = aff.header.lower().encode()
        self._prefix_chars = aff.prefix_chars
        self._saturation = SaturationGate(sat.max_waiting)
        self._saturation_wait_s = sat.max_wait_s
        self._priority_field = sat.priority_header.lower().encode()
        pool.on_load = self._saturation.wake
        extra = (t.deadline_header, aff.header, sat.priority_header) if self._engine else (t.deadline_header,)
        self.tracing = None if settings.tracing.otlp_endpoint is None else Tracing(settings.tracing)
        self._attempt_attributes = [_server_attributes(up) for up in pool.upstreams]
        if self.tracing is not None:
            consume = (*consume, "traceparent", "tracestate")  # continued, with our own span ids
        front = settings.jobs
        self.front_door = None if front.url is None else AsyncFrontDoor(front.url, front.timeout_s)
        if self.front_door is not None:
            extra = (*extra, "Prefer", "Authorization", "api-key")
        self._fields = RequestFieldReader(extra=extra, consume=consume)
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
        if self.tracing is not None:
            ex.span = self.tracing.request_span(
                fields.get(b"traceparent"),
                fields.get(b"tracestate"),
                {"http.request.method": request.method.decode("latin-1"), "url.path": request.path},
            )
        self._retry_gate.request_started()
        status = 499
        try:
            status = await self._serve(request, fields, responder, ex)
        except GatewayError as err:
            status = err.status
            ex.fault = _fault_of(err, ex)
            self._send_error(responder, err, ex)
        except (asyncio.CancelledError, ConnectionResetError):
            ex.fault = "client"
            self._metrics.client_disconnects.inc()
            raise
        finally:
            self._retry_gate.request_finished()
            duration = self._clock() - ex.started
            metrics = self._metrics
            metrics.count_request(status, duration)
            metrics.overhead.observe(max(0.0, duration - ex.waited))
            if status >= 400:
                ex.fault = ex.fault or _fault_of_status(status)
                metrics.error_faults[ex.fault].inc()
            if ex.usage is not None and ex.upstream is not None:
                self._count_usage(ex)
            if ex.span is not None:
                self._end_request_span(ex, status)
            if ex.admitted is not None:
                self._count_admitted(ex.admitted, status, ex.ttft)
            if self._access_log:
                self._log_access(request, ex, status, duration)

    async def _serve(
        self, request: Request, fields: RequestFields, responder: Responder, ex: _Exchange
    ) -> int:
        if escapes_prefix(request.target):
            raise BadRequest("the request path has '..' segments; send a normalised path")
        deadline = self._deadline(fields, ex)
        if self._admission.needed:
            ex.admitted = Admitted()
            # The caller first: nothing, not even the model list, is answered without a key.
            ex.admitted.caller = self._admission.identify(
                fields.get(b"authorization"), fields.get(b"api-key")
            )
            listing = self._admission.listing(request.method, request.path)
            if listing is not None:
                responder.send(200, b"Content-Type: application/json\r\n", listing)
                return 200
        body = _Body(None, True)
        try:
            await self._read_body(request, fields, body)
            if self.front_door is not None and wants_async(fields.get(PREFER)):
                return await self._submit_as_job(request, fields, responder, body)
            if self._inject_usage and request.method == b"POST":
                self._ask_for_usage(request, body, ex)
            admitted = ex.admitted
            if admitted is None:
                return await self._attempts(request, fields, responder, ex, body, deadline)
            return await self._admitted(request, fields, responder, ex, body, deadline, admitted)
        except RequestTimeout as exc:
            raise ClientTimeout(str(exc)) from None
        finally:
            if body.reserved:
                self._buffers.release(body.reserved)

    async def _admitted(
        self,
        request: Request,
        fields: RequestFields,
        responder: Responder,
        ex: _Exchange,
        body: _Body,
        deadline: float | None,
        admitted: Admitted,
    ) -> int:
        """Route by model and hold the caller's limits, then run the attempts."""
        data = body.data
        if data is None or isinstance(data, (bytes, bytearray)):
            admitted.route = self._admission.route(request.method, data, True)
        else:  # streamed once: too large to read its model
            admitted.route = self._admission.route(request.method, b"", False)
        caller = admitted.caller
        if caller is None:
            return await self._attempts(request, fields, responder, ex, body, deadline)
        self._admission.check_caller(caller, admitted.route, self._clock())
        caller.inflight += 1
        try:
            return await self._attempts(request, fields, responder, ex, body, deadline)
        finally:
            caller.inflight -= 1

    async def _submit_as_job(
        self, request: Request, fields: RequestFields, responder: Responder, body: _Body
    ) -> int:
        """`Prefer: respond-async`: hand the request to the jobs API and answer its 202 at once."""
        assert self.front_door is not None
        data = body.data
        if data is not None and not isinstance(data, (bytes, bytearray)):
            raise BadRequest("the request body is too large to submit as a job")
        try:
            answer = await self.front_door.submit(request.method, request.target, data, fields.captured)
        except FrontDoorError as exc:
            payload = {"error": {"type": exc.error_type, "message": exc.message}}
            responder.send(exc.status, b"Content-Type: application/json\r\n", orjson.dumps(payload))
            return exc.status
        responder.send(answer.status, answer.fields, answer.body)
        return answer.status

    @staticmethod
    def _ask_for_usage(request: Request, body: _Body, ex: _Exchange) -> None:
        """Add stream_options.include_usage to a streaming chat request that lacks it."""
        data = body.data
        if not isinstance(data, (bytes, bytearray)) or not request.path.endswith("/chat/completions"):
            return
        found = read_model(data)
        if found is None or found.parsed.get("stream") is not True:
            return
        options = found.parsed.get("stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict) or options.get("include_usage") is not None:
            return  # the client chose (or sent something we should not touch)
        found.parsed["stream_options"] = {**options, "include_usage": True}
        body.data = orjson.dumps(found.parsed)
        ex.injected_usage = True

    def _end_request_span(self, ex: _Exchange, status: int) -> None:
        span = ex.span
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("gateway.attempts", ex.attempts)
        route = None if ex.admitted is None else ex.admitted.route
        if route is not None:
            span.set_attribute("gen_ai.request.model", route.asked)
        if ex.response_model is not None:
            span.set_attribute("gen_ai.response.model", ex.response_model)
        if ex.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", ex.usage[0])
            span.set_attribute("gen_ai.usage.output_tokens", ex.usage[1])
        if ex.upstream is not None:
            span.set_attribute("gateway.upstream", ex.upstream.name)
        span.end()

    def _count_usage(self, ex: _Exchange) -> None:
        assert ex.usage is not None and ex.upstream is not None
        admitted = ex.admitted
        route = None if admitted is None else admitted.route
        models = self._admission.models
        model = "" if route is None or models is None else models.label(route.model)
        caller = "" if admitted is None or admitted.caller is None else admitted.caller.name
        self._metrics.count_tokens(ex.upstream.name, model, caller, *ex.usage)

    def _count_admitted(self, admitted: Admitted, status: int, ttft: float | None) -> None:
        route = admitted.route
        models = self._admission.models
        model = "" if route is None or models is None else models.label(route.model)
        if ttft is not None and model:
            self._metrics.observe_model_ttft(model, ttft)
        caller = "" if admitted.caller is None else admitted.caller.name
        self._metrics.count_model_request(model, caller, status)

    async def _attempts(
        self,
        request: Request,
        fields: RequestFields,
        responder: Responder,
        ex: _Exchange,
        body: _Body,
        deadline: float | None,
    ) -> int:
        route = None if ex.admitted is None else ex.admitted.route
        choice: Choice | None = await self._first_upstream(fields, ex, body, route, deadline)
        while True:
            assert choice is not None
            up = choice.upstream
            if choice.panic:
                self._metrics.panic.inc()
            # Every attempt after the first runs on a retry slot taken by _admit_retry.
            gate = self._retry_gate if ex.attempts > 0 else None
            with _Attempt(up, gate, self._clock()) as attempt:
                sent = body if route is None else _Body(route.body_for(up), True)
                failure = await self._try(
                    attempt, request, fields, ex, sent, deadline, self._hold_streams, choice.wait_s
                )
                resp = attempt.response
                if resp is not None and attempt.held:
                    start = await self._first_event(attempt, resp, ex, deadline)
                    if isinstance(start, _StreamStart):
                        return await self._relay(
                            request, fields, responder, resp, up, ex, body, attempt.forwarded, start
                        )
                    failure, resp = start, None  # nothing reached the client: retried as before headers
                accept: Callable[[Upstream], bool] | None = None
                decision: Retry | GiveUp
                if resp is not None:
                    judged = None if resp.status < 400 else await self._judge(resp, up, ex, body, deadline)
                    if judged is None:
                        return await self._relay(
                            request, fields, responder, resp, up, ex, body, attempt.forwarded
                        )
                    decision, accept = judged
                    # Held whole in memory: the connection is free while the retry is admitted.
                    attempt.response = None
                else:
                    assert failure is not None
                    decision = self._decide(ex, failure.outcome, None, body, deadline)
            # The attempt has given back everything it held: nothing waits on the budget held.
            choice = None
            if not isinstance(decision, GiveUp):
                choice = await self._admit_retry(ex, decision, deadline, accept)
            if choice is None:
                if resp is None:
                    assert failure is not None
                    raise self._attempt_error(failure, up, ex)
                return await self._relay(request, fields, responder, resp, up, ex, body, attempt.forwarded)

    async def _try(
        self,
        attempt: _Attempt,
        request: Request,
        fields: RequestFields,
        ex: _Exchange,
        body: _Body,
        deadline: float | None,
        hold_stream: bool,
        wait_s: float = 0.0,
    ) -> _AttemptFailed | None:
        """Run one attempt up to its response headers: the response goes to `attempt`, or a failure.

        With `hold_stream`, a 2xx event stream is left held (`attempt.held`) for `_first_event`.
        A retry on the same upstream waits a backoff, or `wait_s` (the rest of a short rate-limit
        cooldown) if longer.
        """
        up = attempt.upstream
        block = self._upstream_fields(request, fields, ex, up)
        if ex.span is not None and self.tracing is not None:
            attempt.span, lines = self.tracing.attempt_span(ex.span, self._attempt_attributes[up.index])
            block += lines
        same_upstream = up in ex.tried
        ex.attempts += 1
        ex.tried.append(up)
        try:
            if ex.attempts > 1:
                delay = max(wait_s, backoff_s(ex.attempts - 1, same_upstream, self._rng))
                if delay:
                    await asyncio.sleep(delay)
                    ex.waited += delay
            attempt.sent_at = self._clock()
            attempt.response = await self._send(attempt, request, block, body, ex, deadline, hold_stream)
            if not attempt.held:
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
        self,
        ex: _Exchange,
        outcome: Outcome,
        status: int | None,
        body: _Body,
        deadline: float | None,
        rejection: Rejection | None = None,
    ) -> Retry | GiveUp:
        """Whether the failed attempt is tried again (the budget is asked later, if so)."""
        decision = self._policy.decide(
            attempt=ex.attempts,
            outcome=outcome,
            status=status,
            body_replayable=body.replayable,
            deadline_left_s=None if deadline is None else deadline - self._clock(),
            rejection=rejection,
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

    async def _judge(
        self, resp: UpstreamResponse, up: Upstream, ex: _Exchange, body: _Body, deadline: float | None
    ) -> tuple[Retry, Callable[[Upstream], bool] | None] | None:
        """Whether an error response is retried, and where; None to answer with it now.

        A retried one is held whole first. A context-window error goes only to an upstream with a
        larger context or a later tier.
        """
        outcome = classify_status(resp.status)
        rejection = await self._rejection(resp) if outcome is Outcome.HTTP_4XX else None
        decision = self._decide(ex, outcome, resp.status, body, deadline, rejection)
        if isinstance(decision, GiveUp) or not await self._hold(resp):
            return None
        return decision, _larger_context_than(up) if rejection is Rejection.CONTEXT_LENGTH else None

    async def _rejection(self, resp: UpstreamResponse) -> Rejection | None:
        """What a 4xx body says (too long for the context, a content policy), if small enough to read."""
        if not await self._hold(resp):
            return None
        return classify_rejection(resp.peek())

    async def _admit_retry(
        self,
        ex: _Exchange,
        decision: Retry,
        deadline: float | None,
        accept: Callable[[Upstream], bool] | None = None,
    ) -> Choice | None:
        """The upstream for the retry, once the budget admits it; None to answer with what we have.

        With `accept`, only upstreams it accepts may take the retry.
        """
        now = self._clock()
        wait_s = self._budget_wait_s if deadline is None else min(self._budget_wait_s, deadline - now)
        admitted = await self._retry_gate.acquire(wait_s)
        ex.waited += self._clock() - now
        if not admitted:
            self._metrics.retries_skipped.labels(GiveUpReason.BUDGET_EXHAUSTED).inc()
            return None
        # Choose only after any wait for the budget, so the pick reflects the pool as it is now.
        now = self._clock()
        wait_up_to_s = self._max_retry_after_wait_s
        if deadline is not None:
            wait_up_to_s = min(wait_up_to_s, deadline - now)
        choice = self._choose_retry(ex, now, accept, wait_up_to_s)
        if choice is None:
            self._retry_gate.release()
            self._metrics.retries_skipped.labels(GiveUpReason.NO_UPSTREAM).inc()
            return None
        self._metrics.retries.labels(decision.reason).inc()
        return choice

    def _choose_retry(
        self, ex: _Exchange, now: float, accept: Callable[[Upstream], bool] | None, wait_up_to_s: float
    ) -> Choice | None:
        """The retry's upstream; a routed request moves to its fallback model once the upstreams
        of its model are spent (nothing routable, or only ones it already tried)."""
        route = None if ex.admitted is None else ex.admitted.route
        last = ex.attempts + 1 >= self._policy.max_attempts
        pool, rng, tried, refused = self._pool, self._rng, ex.tried, ex.refused
        if route is None:
            return pool.choose(now, rng, tried, accept, wait_up_to_s, last=last, refused=refused, key=ex.key)
        serves = _both(accept, route.accepts)
        choice = pool.choose(now, rng, tried, serves, wait_up_to_s, last=last, refused=refused, key=ex.key)
        if route.has_fallback and not last and choice is not None and choice.upstream in tried:
            # An untried upstream of another tier may serve this very model: it goes before a
            # fallback model, which is a different answer than the client asked for.
            other = pool.choose(now, rng, tried, serves, wait_up_to_s, last=True, refused=refused, key=ex.key)
            if other is not None and other.upstream not in tried:
                return other
        while route.has_fallback and (choice is None or choice.upstream in ex.tried):
            at = route.at
            self._fall_back(route)
            fallback = pool.choose(
                now,
                rng,
                tried,
                _both(accept, route.accepts),
                wait_up_to_s,
                last=last,
                refused=refused,
                key=ex.key,
            )
            if fallback is not None:
                return fallback
            if choice is not None:
                route.at = at  # no fallback can take it: retry the model's own upstreams
                return choice
        return choice

    async def _first_upstream(
        self,
        fields: RequestFields,
        ex: _Exchange,
        body: _Body,
        route: ModelRoute | None,
        deadline: float | None,
    ) -> Choice:
        """The upstream of the first attempt (after waiting, if every engine is saturated)."""
        now = self._clock()
        if self._affinity is not AffinityKey.NONE:
            ex.key = self._affinity_key(fields, body, route)
        if route is None:
            choice = self._pool.choose(now, self._rng, key=ex.key)
        else:
            choice = self._first_choice(route, now, ex.key)
        if choice is not None and choice.saturated:
            choice = await self._when_calm(fields, ex, route, deadline)
        if choice is None:
            now = self._clock()
            raise NoUpstreamAvailable(
                self._pool.describe_unavailable(now), retry_after_s=self._pool.retry_after_s(now)
            )
        return choice

    def _first_choice(self, route: ModelRoute, now: float, key: bytes | None) -> Choice | None:
        """The first upstream for a routed request: of its model, else of its fallbacks in turn."""
        choice = self._pool.choose(now, self._rng, accept=route.accepts, key=key)
        while choice is None and route.has_fallback:
            self._fall_back(route)
            choice = self._pool.choose(now, self._rng, accept=route.accepts, key=key)
        return choice

    def _affinity_key(self, fields: RequestFields, body: _Body, route: ModelRoute | None) -> bytes | None:
        """What keeps this request near its cache: its session, or the start of its prompt."""
        parsed = None if route is None else route.found.parsed
        data = body.data
        if parsed is None and isinstance(data, (bytes, bytearray)) and data[:1] == b"{":
            found = read_model(data)
            parsed = None if found is None else found.parsed
        if self._affinity is AffinityKey.SESSION:
            return session_key(fields.get(self._affinity_field), parsed)
        return None if parsed is None else prefix_key(parsed, self._prefix_chars)

    async def _when_calm(
        self, fields: RequestFields, ex: _Exchange, route: ModelRoute | None, deadline: float | None
    ) -> Choice | None:
        """Every engine is saturated: wait, in priority order, for one to calm down, else 429."""
        raw = fields.get(self._priority_field)
        try:
            priority = int(raw) if raw is not None else 0
        except ValueError:
            raise BadRequest(f"{self._priority_field.decode()} must be an integer") from None
        ticket = self._saturation.ticket(priority)
        until = self._clock() + self._saturation_wait_s
        if deadline is not None:
            until = min(until, deadline)
        waits = self._metrics.saturation_waits
        while ticket is not None and (left := until - self._clock()) > 0:
            before = self._clock()
            await self._saturation.wait(ticket, left)
            now = self._clock()
            ex.waited += now - before
            if route is None:
                choice = self._pool.choose(now, self._rng, key=ex.key)
            else:
                choice = self._first_choice(route, now, ex.key)
            if choice is None or not choice.saturated:
                waits.labels("admitted").inc()
                return choice
        waits.labels("rejected").inc()
        raise EnginesSaturated(
            "every engine is saturated (queue or KV cache); try again shortly", retry_after_s=1.0
        )

    def _fall_back(self, route: ModelRoute) -> None:
        """Move a routed request on to its next fallback model."""
        was = route.model
        route.at += 1
        models = self._admission.models
        assert models is not None
        self._metrics.model_fallbacks.labels(models.label(was), models.label(route.model)).inc()
        log.info("model %s: no upstream could serve it; falling back to %s", was, route.model)

    async def _send(
        self,
        attempt: _Attempt,
        request: Request,
        block: bytes,
        body: _Body,
        ex: _Exchange,
        deadline: float | None,
        hold_stream: bool,
    ) -> UpstreamResponse:
        """One attempt up to response headers; records its outcome in pool and metrics.

        A 2xx event stream with `hold_stream` is not recorded yet: its outcome and latency are
        known at its first content event (`_first_event`).
        """
        up = attempt.upstream
        timeout_s = self._attempt_timeout_s
        deadline_bound = False
        started = attempt.sent_at
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
            ex.waited += now - started
            outcome = _outcome_of(exc)
            if outcome is Outcome.CONNECT_ERROR:
                ex.refused.append(up)  # down for this request: a retry in its tier goes elsewhere
            hit = deadline_bound and outcome is Outcome.TIMEOUT
            if hit and ex.client_deadline:
                # The client's own deadline says nothing about the upstream: not a failure, no
                # ejection, no latency sample.
                outcome = Outcome.ABANDONED
            else:
                self._pool.record(up, outcome, now, now - started)
            um.outcomes[outcome].inc()
            if attempt.span is not None:
                attempt.span.set_attribute("gateway.outcome", outcome.value)
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
        self._headers_in(attempt, request, resp, ex, hold_stream)
        return resp

    def _headers_in(
        self, attempt: _Attempt, request: Request, resp: UpstreamResponse, ex: _Exchange, hold_stream: bool
    ) -> None:
        """An attempt's response headers arrived: record them (a held stream later, at its output)."""
        up = attempt.upstream
        um = self._metrics.per_upstream[up.name]
        now = self._clock()
        ttfb = now - attempt.sent_at
        ex.waited += ttfb
        um.ttfb.observe(ttfb)
        status = resp.status
        attempt.forwarded = out = client_response_fields(resp.fields)
        is_stream = _is_event_stream(out)
        if hold_stream and 200 <= status < 300 and is_stream and request.method != b"HEAD":
            attempt.held = True
            return
        outcome = classify_status(status)
        retry_after = None
        if outcome is Outcome.RATE_LIMITED:
            retry_after = parse_retry_after(field_value(resp.fields, b"retry-after"), self._wall_clock())
        # A JSON answer that is not a stream came after its whole generation: its latency sample
        # is taken per output token once the body's usage is read (_relay_body), so a long answer
        # does not make the engine look slow.
        per_token = outcome is Outcome.SUCCESS and not is_stream and _is_json(out)
        self._pool.record(up, outcome, now, None if per_token else ttfb, retry_after)
        ex.per_token_pending = per_token
        if attempt.span is not None:
            attempt.span.set_attribute("gateway.outcome", outcome.value)
            attempt.span.set_attribute("http.response.status_code", status)
        um.outcomes[outcome].inc()
        if not is_stream:
            um.ttft.observe(ttfb)  # the whole generation, for a response that is not a stream
            ex.ttft = ttfb
        if self._orca[up.index]:
            self._read_orca(up, resp, now)

    def _read_orca(self, up: Upstream, resp: UpstreamResponse, now: float) -> None:
        value = field_value(resp.fields, ORCA_HEADER)
        if value is None:
            return
        results = self._metrics.per_upstream[up.name].load_reports
        try:
            report = parse_orca(value, now)
        except MalformedReport as exc:
            results[("orca", "malformed")].inc()
            log.debug("upstream %s: unreadable ORCA report %r (%s)", up.name, value, exc)
            return
        results[("orca", "ok")].inc()
        self._pool.record_load(up, report)

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

    async def _first_event(
        self, attempt: _Attempt, resp: UpstreamResponse, ex: _Exchange, deadline: float | None
    ) -> _StreamStart | _AttemptFailed:
        """Hold a stream until its first content event (the commit point), or fail the attempt.

        Records the attempt: a success with the time to that event (the TTFT the latency
        estimate uses for streams), or the failure that ended it before any output.
        """
        up = attempt.upstream
        first_by = attempt.sent_at + self._first_token_s
        deadline_bound = deadline is not None and deadline < first_by
        if deadline is not None and deadline_bound:
            first_by = deadline
        scanner = EventScanner()
        events: list[Event] = []
        outcome = Outcome.TIMEOUT
        held_from = self._clock()
        try:
            async with asyncio.timeout(max(0.0, first_by - self._clock())) as scope:
                detail = await self._scan_to_output(resp, scanner, events)
            outcome = Outcome.STREAM_ERROR
        except TimeoutError:
            if scope.expired():
                detail = f"no output within {first_by - attempt.sent_at:.3g} s"
            else:
                detail = "idle timeout before any output"
        except UpstreamError as exc:
            outcome = _outcome_of(exc)
            detail = f"{type(exc).__name__} before any output"
        except asyncio.CancelledError:
            # The client left while the stream was held: the upstream took at least this long.
            now = self._clock()
            self._pool.record_abandoned(up, now - attempt.sent_at, now)
            self._metrics.per_upstream[up.name].outcomes[Outcome.ABANDONED].inc()
            raise
        now = self._clock()
        ex.waited += now - held_from
        um = self._metrics.per_upstream[up.name]
        if attempt.span is not None:
            attempt.span.set_attribute(
                "gateway.outcome", (Outcome.SUCCESS if detail is None else outcome).value
            )
        if detail is None:
            ttft = ex.ttft = now - attempt.sent_at
            attempt.headers_in()
            self._pool.record(up, Outcome.SUCCESS, now, ttft)
            um.outcomes[Outcome.SUCCESS].inc()
            um.ttft.observe(ttft)
            return _StreamStart(scanner, events)
        hit = deadline_bound and outcome is Outcome.TIMEOUT
        if hit and ex.client_deadline:
            outcome = Outcome.ABANDONED  # the client's own deadline says nothing about the upstream
        else:
            self._pool.record(up, outcome, now, now - attempt.sent_at)
        um.outcomes[outcome].inc()
        return _AttemptFailed(outcome, detail, hit)

    async def _scan_to_output(
        self, resp: UpstreamResponse, scanner: EventScanner, events: list[Event]
    ) -> str | None:
        """Read events into `events` until one carries output (None) or the stream fails (why)."""
        held = 0
        data = resp.take_buffered()
        while True:
            if data:
                held += len(data)
                fresh = scanner.feed(data)
                events += fresh  # all of them: those after the first output follow it
                for event in fresh:
                    kind = event.kind
                    if kind is Kind.CONTENT or kind is Kind.FINISH:
                        return None
                    if kind is Kind.ERROR:
                        return f"error event before any output: {event.error}"
                    if kind is Kind.MALFORMED:
                        return event.error
                    if kind is Kind.DONE:
                        return "the stream ended before any output"
                if held > self._max_held_bytes:
                    return None  # preamble past the hold limit: commit rather than buffer more
            data = await resp.read()
            if not data:
                return "the stream ended before any output"

    async def _relay(
        self,
        request: Request,
        fields: RequestFields,
        responder: Responder,
        resp: UpstreamResponse,
        up: Upstream,
        ex: _Exchange,
        body: _Body,
        out: ResponseFields | None,
        start: _StreamStart | None = None,
    ) -> int:
        """Send the upstream response to the client; failover before the commit point is over."""
        if out is None:
            out = client_response_fields(resp.fields)
        tracing = b"X-Request-ID: %b\r\nX-Gateway-Upstream: %b\r\nX-Gateway-Attempts: %d\r\n" % (
            ex.request_id,
            self._names[up.index],
            ex.attempts,
        )
        route = None if ex.admitted is None else ex.admitted.route
        if route is not None:
            tracing += b"X-Gateway-Model: %b\r\n" % route.model.encode()
        responder.start(resp.status, resp.reason, out.block + tracing, out.content_length)
        try:
            if start is not None or (
                200 <= resp.status < 300 and _is_event_stream(out) and request.method != b"HEAD"
            ):
                await self._relay_events(request, fields, responder, resp, up, ex, body, start)
                return resp.status
            await self._relay_body(responder, resp, up, ex, out)
        except ConnectionResetError:
            # The client went away; closing the upstream response (by the caller) stops the generation.
            self._metrics.client_disconnects.inc()
        return resp.status

    async def _relay_body(
        self, responder: Responder, resp: UpstreamResponse, up: Upstream, ex: _Exchange, out: ResponseFields
    ) -> None:
        """Relay a body that is not an event stream, chunk by chunk; note the usage of a JSON one."""
        data = resp.take_buffered()
        want_usage = resp.status < 300 and _is_json(out)
        if ex.span is not None and want_usage:
            ex.response_model = _model_in_head(data)
        if resp.complete:
            await self._write(responder, data, ex)
            responder.end()
            if want_usage:
                ex.usage = _usage_in_tail(data)
            self._per_token_sample(up, ex)
            return
        if data:
            await self._write(responder, data, ex)
        else:
            responder.flush()  # headers now: the first body bytes may take a while
        tail = data[-_TAIL_BYTES:]
        while True:
            try:
                t0 = self._clock()
                chunk = await resp.read()
                ex.waited += self._clock() - t0
            except UpstreamError as exc:
                self._stream_failed(up, _mid_body_failure(exc))
                # Closing without the final chunk (or short of Content-Length) tells the client
                # the body is truncated; a clean end would pass a partial body off as complete.
                responder.abort()
                return
            if not chunk:
                break
            await self._write(responder, chunk, ex)
            if want_usage:
                tail = (tail + chunk)[-_TAIL_BYTES:]
        responder.end()
        if want_usage:
            ex.usage = _usage_in_tail(tail)
        self._per_token_sample(up, ex)

    def _per_token_sample(self, up: Upstream, ex: _Exchange) -> None:
        """The deferred latency sample of a JSON answer: time to it per completion token."""
        if not ex.per_token_pending or ex.ttft is None:
            return
        ex.per_token_pending = False
        tokens = 0 if ex.usage is None else ex.usage[1]
        self._pool.record_latency(up, ex.ttft / tokens if tokens > 0 else ex.ttft, self._clock())

    async def _relay_events(
        self,
        request: Request,
        fields: RequestFields,
        responder: Responder,
        resp: UpstreamResponse,
        up: Upstream,
        ex: _Exchange,
        body: _Body,
        start: _StreamStart | None,
    ) -> None:
        """Relay a committed stream event by event; continue it elsewhere if it fails."""
        transcript = Transcript()
        if start is None:
            scanner = EventScanner()
            events = scanner.feed(resp.take_buffered())
            if not events:
                responder.flush()  # headers now: the first event may take a while
        else:
            scanner, events = start.scanner, start.events
        failure = await self._pump(responder, resp, scanner, events, transcript, None, ex, up)
        if isinstance(transcript.model, str):
            ex.response_model = transcript.model
        while failure is not None:
            self._stream_failed(up, failure)
            continued = await self._continue(request, fields, responder, ex, body, transcript)
            if continued is None:
                await self._write_error_event(responder, up, failure)
                break
            if continued[1] is None:
                break
            up, failure = continued
        responder.end()

    async def _pump(
        self,
        responder: Responder,
        resp: UpstreamResponse,
        scanner: EventScanner,
        events: list[Event],
        transcript: Transcript,
        produced_before: int | None,
        ex: _Exchange,
        up: Upstream,
    ) -> _StreamFailure | None:
        """Pass whole events to the client until the stream ends (None) or fails.

        `produced_before` is set for a continuation: its events are spliced into the stream.
        Only whole, well-formed events are passed on; an answer that stops before it finished
        is a failure, never a clean end.
        """
        meter = _StreamMeter(self._metrics.per_upstream[up.name].chunk_gap, ex, self._clock())
        while True:
            out: list[bytes] = []
            failure: _StreamFailure | None = None
            for event in events:
                kind = event.kind
                if kind is Kind.ERROR or kind is Kind.MALFORMED:
                    failure = _StreamFailure(Outcome.STREAM_ERROR, event.error)
                    break
                raw = event.raw if produced_before is None else splice(event, transcript, produced_before)
                if raw is not None:
                    transcript.add(event)
                    meter.passed(event)
                    if not (ex.injected_usage and _usage_only(event)):
                        out.append(raw)
            if out:
                await self._write(responder, out[0] if len(out) == 1 else b"".join(out), ex)
            if failure is not None:
                return None if transcript.complete else failure
            try:
                t0 = self._clock()
                chunk = await resp.read()
                meter.arrived = self._clock()
                ex.waited += meter.arrived - t0
            except UpstreamError as exc:
                return None if transcript.complete else _mid_body_failure(exc)
            if not chunk:
                if transcript.complete or not scanner.openai:
                    if scanner.pending and not transcript.complete:
                        await responder.write(scanner.pending)  # a last event without its blank line
                    return None
                return _StreamFailure(Outcome.RESET, "the stream ended before the answer finished")
            events = scanner.feed(chunk)

    async def _continue(
        self,
        request: Request,
        fields: RequestFields,
        responder: Responder,
        ex: _Exchange,
        body: _Body,
        transcript: Transcript,
    ) -> tuple[Upstream, _StreamFailure | None] | None:
        """Finish a cut answer on an upstream that accepts prefill; None if none could.

        Each continuation is an attempt (within retry.max_attempts and the retry budget) and is
        held to its own first content event. Returns the upstream that continued and how its
        stream ended.
        """
        data = body.data
        if not self._can_continue or not isinstance(data, (bytes, bytearray)):
            return None
        route = None if ex.admitted is None else ex.admitted.route
        accept = _continues if route is None else _both(_continues, route.accepts)
        models = self._admission.models
        while ex.attempts < self._policy.max_attempts:
            if continuation_body(request.path, data, transcript) is None:
                return None
            if not await self._retry_gate.acquire(self._budget_wait_s):
                self._metrics.retries_skipped.labels(GiveUpReason.BUDGET_EXHAUSTED).inc()
                return None
            choice = self._pool.choose(self._clock(), self._rng, ex.tried, accept, panic=False)
            if choice is None:
                self._retry_gate.release()
                return None
            up = choice.upstream
            model = None if route is None or models is None else models.upstream_name(up.index, route.model)
            cont = continuation_body(request.path, data, transcript, model)
            assert cont is not None
            results = self._metrics.per_upstream[up.name].continuations
            with _Attempt(up, self._retry_gate, self._clock()) as attempt:
                await self._try(attempt, request, fields, ex, _Body(cont, True), None, True)
                resp = attempt.response
                if resp is None:
                    results["failed"].inc()
                    continue
                if not attempt.held:
                    if 400 <= resp.status < 500 and resp.status != 429:
                        results["refused"].inc()
                        log.warning(
                            "upstream %s refused to continue a cut stream (HTTP %d); "
                            "the client gets the original error",
                            up.name,
                            resp.status,
                        )
                        return None
                    results["failed"].inc()
                    continue
                start = await self._first_event(attempt, resp, ex, None)
                if isinstance(start, _AttemptFailed):
                    results["failed"].inc()
                    continue
                results["continued"].inc()
                log.info("continuing a cut stream on upstream %s", up.name)
                failure = await self._pump(
                    responder, resp, start.scanner, start.events, transcript, transcript.chunks, ex, up
                )
                return up, failure
        return None

    async def _write(self, responder: Responder, data: bytes, ex: _Exchange) -> None:
        """Write to the client; time it spends not taking the bytes is not the gateway's."""
        t0 = self._clock()
        await responder.write(data)
        ex.waited += self._clock() - t0

    def _stream_failed(self, up: Upstream, failure: _StreamFailure) -> None:
        """Record a failure after the commit point."""
        self._pool.record(up, failure.outcome, self._clock(), 0.0)
        self._metrics.per_upstream[up.name].stream_aborts.inc()
        log.warning("upstream %s failed mid-response (%s)", up.name, failure.detail)

    async def _write_error_event(self, responder: Responder, up: Upstream, failure: _StreamFailure) -> None:
        """End a failed stream with an error event the client can see, never a clean end."""
        event = {
            "error": {
                "type": "upstream_stream_error",
                "message": f"upstream {up.name!r} failed mid-stream ({failure.detail})",
            }
        }
        await responder.write(b"event: error\ndata: " + orjson.dumps(event) + b"\n\n")

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
        admitted = ex.admitted
        route = None if admitted is None else admitted.route
        caller = None if admitted is None or admitted.caller is None else admitted.caller.name
        access_log.info(
            orjson.dumps(
                {
                    "ts": self._wall_clock(),
                    "request_id": ex.request_id.decode("latin-1"),
                    "method": request.method.decode("latin-1"),
                    "path": request.path,
                    "status": status,
                    "upstream": ex.upstream.name if ex.upstream else None,
                    "model": None if route is None else route.model,
                    "caller": caller,
                    "attempts": ex.attempts,
                    "duration_s": round(duration, 6),
                    "ttft_s": None if ex.ttft is None else round(ex.ttft, 6),
                    "overhead_s": round(max(0.0, duration - ex.waited), 6),
                    "prompt_tokens": None if ex.usage is None else ex.usage[0],
                    "completion_tokens": None if ex.usage is None else ex.usage[1],
                    "fault": ex.fault if status >= 400 else None,
                }
            ).decode()
        )


def _is_event_stream(out: ResponseFields) -> bool:
    value = out.content_type
    return value is not None and value[: len(_SSE)].lower() == _SSE


_TAIL_BYTES = 4096  # OpenAI-style bodies end with their usage
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_CLIENT_ERRORS = (BadRequest, ClientTimeout, Unauthorized, ModelNotAllowed, CallerLimited, ModelNotFound)


def _is_json(out: ResponseFields) -> bool:
    value = out.content_type
    return value is not None and b"json" in value.lower()


def _usage_in_tail(tail: bytes) -> tuple[int, int] | None:
    """The usage at the end of a JSON body, found without parsing the whole body."""
    if b"_tokens" not in tail:
        return None
    prompt = _PROMPT_TOKENS.findall(tail)
    completion = _COMPLETION_TOKENS.findall(tail)
    if not prompt and not completion:
        return None
    return (int(prompt[-1]) if prompt else 0, int(completion[-1]) if completion else 0)


_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')


def _model_in_head(data: bytes) -> str | None:
    """The `model` an OpenAI-style JSON answer names near its start (traced requests only)."""
    match = _MODEL_FIELD.search(data, 0, 2048)
    return None if match is None else match.group(1).decode("utf-8", "replace")


def _server_attributes(up: Upstream) -> dict[str, Any]:
    url = URL(up.base_url)
    return {"server.address": url.host or "", "server.port": url.port or 0, "gateway.upstream": up.name}


def _usage_only(event: Event) -> bool:
    """A chunk that carries usage and no choice (OpenAI's extra final chunk)."""
    data = event.data
    return isinstance(data, dict) and "usage" in data and not data.get("choices")


def _usage_of(data: object) -> tuple[int, int] | None:
    """The usage of a stream chunk, if it carries one."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if type(prompt) is int else 0, completion if type(completion) is int else 0)


def _fault_of(err: GatewayError, ex: _Exchange) -> str:
    """Whose fault an error the gateway answers itself is."""
    if isinstance(err, _CLIENT_ERRORS):
        return "client"
    if isinstance(err, DeadlineExceeded):
        return "client" if ex.client_deadline else "upstream"
    if isinstance(err, NoUpstreamAvailable):
        return "gateway"
    return "upstream"


def _fault_of_status(status: int) -> str:
    """Whose fault a relayed upstream answer is: a 4xx (but 429) is the request's."""
    if status == 499 or (400 <= status < 500 and status != 429):
        return "client"
    return "upstream"


def _larger_context_than(failed: Upstream) -> Callable[[Upstream], bool]:
    """Upstreams worth a retry of a request too long for `failed`: a larger context, or a later tier."""
    limit = failed.max_context or 0

    def accept(up: Upstream) -> bool:
        return (up.max_context or 0) > limit or up.priority > failed.priority

    return accept


def _both(
    first: Callable[[Upstream], bool] | None, second: Callable[[Upstream], bool]
) -> Callable[[Upstream], bool]:
    if first is None:
        return second

    def accept(up: Upstream) -> bool:
        return first(up) and second(up)

    return accept


def _continues(up: Upstream) -> bool:
    return up.continues


def _mid_body_failure(exc: UpstreamError) -> _StreamFailure:
    if isinstance(exc, TimeoutError):
        return _StreamFailure(Outcome.TIMEOUT, "idle timeout")
    return _StreamFailure(Outcome.RESET, type(exc).__name__)


async def _rest(
    body: RequestBody, head: Sequence[bytes | bytearray] = ()
) -> AsyncIterator[bytes | bytearray]:
    """The buffered start of a body (if any) followed by the rest still on the socket."""
    for chunk in head:
        if chunk:
            yield chunk
    while chunk := await body.read():
        yield chunk
