"""OpenAI-compatible mock inference server for demos, tests and benchmarks of the gateway."""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import itertools
import math
import random
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.testing import faults as fault_catalogue
from gateway.testing.engine.config import FLAGS as ENGINE_FLAGS
from gateway.testing.engine.config import EngineConfig
from gateway.testing.faults import Faults

__all__ = ["MOCK_BEHAVIOUR", "MOCK_STATS", "MockBehaviour", "MockStats", "create_mock_app", "main"]


@dataclass
class MockBehaviour:
    """Runtime-mutable knobs controlling how the mock answers."""

    name: str = "mock"
    latency_s: float = 0.0
    chunk_interval_s: float = 0.0
    stream_chunks: int = 8
    error_rate: float = 0.0
    error_status: int = 503
    rate_limit_rate: float = 0.0
    retry_after_s: float = 1.0
    hang: bool = False
    drop_after_chunks: int | None = None
    healthy: bool = True
    health_latency_s: float = 0.0
    stamp_chunks: bool = False  # put each SSE chunk's send time (sent_ns, CLOCK_MONOTONIC) into it


@dataclass
class MockStats:
    """Counters observed by the mock, readable by tests."""

    requests: int = 0
    health_checks: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    disconnects: int = 0
    last_headers: dict[str, str] | None = None
    last_body: bytes | None = None

    def reset(self) -> None:
        """Zero every counter in place (held references stay valid)."""
        self.requests = self.health_checks = self.disconnects = 0
        self.by_status.clear()
        self.last_headers = self.last_body = None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable view of the stats."""
        body, headers = self.last_body, self.last_headers
        return {
            "requests": self.requests,
            "health_checks": self.health_checks,
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "disconnects": self.disconnects,
            "last_headers": None if headers is None else {str(k): v for k, v in headers.items()},
            "last_body": None if body is None else body.decode("utf-8", "replace"),
        }


MOCK_BEHAVIOUR: Final = web.AppKey("mock_behaviour", MockBehaviour)
MOCK_STATS: Final = web.AppKey("mock_stats", MockStats)
_RNG: Final = web.AppKey("mock_rng", random.Random)
_IDS: Final[web.AppKey[itertools.count[int]]] = web.AppKey("mock_ids")
_ONCE: Final[web.AppKey[set[str]]] = web.AppKey("mock_faults_seen")
_TOKEN_RE: Final = re.compile(r"token\d+")

_JSON: Final = "application/json"
_DEFAULT_MODEL: Final = "mock-model"
_DONE: Final = b"data: [DONE]\n\n"
_EVENT_START: Final = b"data: {"
_FIELDS: Final = frozenset(f.name for f in fields(MockBehaviour))
_FLAGS: Final = frozenset({"hang", "healthy", "stamp_chunks"})
_INT_BOUNDS: Final[dict[str, tuple[int, int | None]]] = {
    "stream_chunks": (0, None),
    "error_status": (100, 599),
    "drop_after_chunks": (0, None),
}
_FLOAT_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    "latency_s": (0.0, math.inf),
    "chunk_interval_s": (0.0, math.inf),
    "retry_after_s": (0.0, math.inf),
    "health_latency_s": (0.0, math.inf),
    "error_rate": (0.0, 1.0),
    "rate_limit_rate": (0.0, 1.0),
}

# (request, behaviour, parsed JSON object ({} for /echo), raw body, its faults) -> response
_Answer = Callable[[web.Request, MockBehaviour, dict[str, Any], bytes, Faults], Awaitable[web.StreamResponse]]


def _json(data: Any, behaviour: MockBehaviour, status: int = 200) -> web.Response:
    headers = {"X-Mock-Name": behaviour.name}
    return web.Response(body=orjson.dumps(data), status=status, content_type=_JSON, headers=headers)


def _error(
    behaviour: MockBehaviour, status: int, kind: str, message: str, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return _json(body, behaviour, status)


def _count(stats: MockStats, status: int) -> None:
    stats.by_status[status] = stats.by_status.get(status, 0) + 1


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


@functools.lru_cache(maxsize=128)
def _tokens(n: int) -> tuple[str, ...]:
    return tuple(f"token{i}" if i == 0 else f" token{i}" for i in range(n))


@functools.lru_cache(maxsize=1024)
def _embedding(text: str) -> list[float]:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest]


async def _apply_knobs(request: web.Request, behaviour: MockBehaviour) -> web.Response | None:
    """Apply hang -> rate limit -> error -> latency; return an early response if any."""
    if behaviour.hang:
        await asyncio.get_running_loop().create_future()
    rng = request.app[_RNG]
    if behaviour.rate_limit_rate > 0 and rng.random() < behaviour.rate_limit_rate:
        resp = _error(behaviour, 429, "rate_limit_error", "Rate limit reached (mock)")
        resp.headers["Retry-After"] = str(max(0, math.ceil(behaviour.retry_after_s)))
        return resp
    if behaviour.error_rate > 0 and rng.random() < behaviour.error_rate:
        return _error(behaviour, behaviour.error_status, "server_error", "Injected failure (mock)")
    if behaviour.latency_s > 0:
        await asyncio.sleep(behaviour.latency_s)
    return None


_CONTEXT_LENGTH: Final = {
    "message": "This model's maximum context length is 4096 tokens. However, you requested 5000 "
    "tokens (4000 in the messages, 1000 in the completion). Please reduce the length of the messages "
    "or completion.",
    "type": "invalid_request_error",
    "param": "messages",
    "code": "context_length_exceeded",
}
_CONTENT_FILTER: Final = {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
    "management policy.",
    "type": None,
    "param": "prompt",
    "code": "content_filter",
    "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation"},
}


def _asks_prefill(payload: dict[str, Any]) -> bool:
    return bool(payload.get("continue_final_message"))


async def _apply_faults(
    request: web.Request, behaviour: MockBehaviour, faults: Faults, payload: dict[str, Any]
) -> web.Response | None:
    """The response a request-level fault asks for, if any (stream faults apply later)."""
    if faults.unknown:
        msg = f"unknown {fault_catalogue.HEADER}: {', '.join(faults.unknown)}"
        return _error(behaviour, 400, "invalid_request_error", msg)
    if faults.no_response:
        await asyncio.get_running_loop().create_future()
    if faults.reset:
        _abort(request)
        return web.Response(status=499)
    if faults.status is not None:
        resp = _error(behaviour, faults.status, "server_error", f"Injected HTTP {faults.status} (mock)")
        if faults.retry_after_s is not None:
            resp.headers["Retry-After"] = f"{faults.retry_after_s:g}"
        return resp
    if faults.error_kind == "context-length":
        return _json({"error": _CONTEXT_LENGTH}, behaviour, 400)
    if faults.error_kind == "content-filter":
        return _json({"error": _CONTENT_FILTER}, behaviour, 400)
    if faults.error_kind == "no-prefill" and _asks_prefill(payload):
        msg = "continue_final_message is not supported by this server (mock)"
        return _error(behaviour, 400, "invalid_request_error", msg, "continue_final_message")
    return None


async def _guarded(answer: _Answer, parse_json: bool, request: web.Request) -> web.StreamResponse:
    app = request.app
    behaviour = app[MOCK_BEHAVIOUR]
    stats = app[MOCK_STATS]
    stats.requests += 1
    try:
        body = await request.read()
        stats.last_headers = dict(request.headers)
        stats.last_body = body
        payload: dict[str, Any] = {}
        resp: web.StreamResponse | None = None
        faults = Faults()
        if parse_json:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                payload = parsed
            else:
                msg = "Request body must be a JSON object"
                resp = _error(behaviour, 400, "invalid_request_error", msg)
        if resp is None:
            faults = fault_catalogue.parse(
                request.headers.get(fault_catalogue.HEADER, ""), behaviour.name, app[_ONCE]
            )
            resp = await _apply_faults(request, behaviour, faults, payload)
        if resp is None:
            resp = await _apply_knobs(request, behaviour)
        if resp is None:
            resp = await answer(request, behaviour, payload, body, faults)
    except asyncio.CancelledError:
        stats.disconnects += 1
        raise
    except ConnectionResetError:
        stats.disconnects += 1
        # The connection is gone: aiohttp drops whatever we return when finishing it.
        return web.Response(status=499)
    if not resp.prepared:  # prepared responses were counted when they started
        _count(stats, resp.status)
    return resp


async def _send_json(request: web.Request, behaviour: MockBehaviour, data: Any) -> web.StreamResponse:
    if behaviour.drop_after_chunks is None:
        return _json(data, behaviour)
    body = orjson.dumps(data)
    resp = web.StreamResponse(headers={"X-Mock-Name": behaviour.name})
    resp.content_type = _JSON
    resp.content_length = len(body)
    stats = request.app[MOCK_STATS]
    _count(stats, resp.status)
    try:
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
    except ConnectionResetError:
        stats.disconnects += 1
        return resp
    _abort(request)
    return resp


def _stamped(chunk: bytes, stamp: bool) -> bytes:
    """`chunk` (an SSE event of a JSON object) with `"sent_ns"` first when `stamp` is set.

    CLOCK_MONOTONIC is one clock for every process on a Linux machine, so a local client can
    subtract `sent_ns` from its own `time.monotonic_ns()` at arrival: the delivery delay of a chunk.
    """
    if not stamp or not chunk.startswith(_EVENT_START):
        return chunk
    return b'data: {"sent_ns":%d,' % time.monotonic_ns() + chunk[len(_EVENT_START) :]


async def _send_stream(
    request: web.Request,
    behaviour: MockBehaviour,
    role: bytes | None,
    chunks: Sequence[bytes],
    final: bytes,
    faults: Faults,
) -> web.StreamResponse:
    """Stream `role` (a role-only chunk, if any), the content `chunks`, `final` and [DONE].

    The knobs `drop_after_chunks` and `chunk_interval_s`, and the request's stream faults, apply.
    """
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    resp = web.StreamResponse(headers={**headers, "X-Mock-Name": behaviour.name})
    stats = request.app[MOCK_STATS]
    _count(stats, resp.status)
    stamp = behaviour.stamp_chunks
    interval = behaviour.chunk_interval_s
    drop = behaviour.drop_after_chunks if faults.cut_after is None else faults.cut_after
    try:
        await resp.prepare(request)
        if role is not None:
            await resp.write(_stamped(role, stamp))
        if faults.empty:
            await resp.write(_DONE)
            return resp
        if faults.first_token_delay_s:
            await asyncio.sleep(faults.first_token_delay_s)
        for i, chunk in enumerate(chunks):
            if i == drop:
                _abort(request)
                return resp
            if i == faults.stall_after:
                await asyncio.sleep(math.inf if faults.stall_s is None else faults.stall_s)
            if i == faults.malformed_after:
                await resp.write(b'data: {"choices": [{"delta": {"content": "\n\n')
            if i == faults.error_event_after:
                error = {"error": {"message": "Injected mid-stream error (mock)", "type": "server_error"}}
                await resp.write(_sse(error))
                return resp
            if i and interval > 0:
                await asyncio.sleep(interval)
            await resp.write(_stamped(chunk, stamp))
        if drop is not None and drop >= len(chunks):
            _abort(request)
            return resp
        await resp.write(_stamped(final, stamp) + (b"" if faults.no_done else _DONE))
    except ConnectionResetError:
        stats.disconnects += 1
    return resp


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _token_count(behaviour: MockBehaviour, payload: dict[str, Any]) -> int:
    n = behaviour.stream_chunks
    max_tokens = payload.get("max_tokens")
    if type(max_tokens) is int and 0 <= max_tokens < n:
        return max_tokens
    return n


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    return model if isinstance(model, str) and model else _DEFAULT_MODEL


def _prefilled_tokens(payload: dict[str, Any], chat: bool) -> int:
    """Tokens of an answer the request asks to continue (vLLM's continue_final_message, or a
    completion prompt ending in the mock's tokens), so a continuation picks up where it was cut."""
    if chat:
        messages = payload.get("messages")
        if not _asks_prefill(payload) or not isinstance(messages, list) or not messages:
            return 0
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            return 0
        content = last.get("content")
        return len(_TOKEN_RE.findall(content)) if isinstance(content, str) else 0
    prompt = payload.get("prompt")
    return len(_TOKEN_RE.findall(prompt)) if isinstance(prompt, str) else 0


async def _answer_completion(
    request: web.Request,
    behaviour: MockBehaviour,
    payload: dict[str, Any],
    body: bytes,
    faults: Faults,
    *,
    chat: bool,
) -> web.StreamResponse:
    start = _prefilled_tokens(payload, chat)
    tokens = _tokens(start + _token_count(behaviour, payload))[start:]
    ids = request.app[_IDS]
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-mock-{next(ids)}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": _model(payload),
    }
    if payload.get("stream") is True:
        role: bytes | None = None
        if chat:
            deltas: list[dict[str, Any]] = [{"content": t} for t in tokens]
            if faults.first_token_delay_s or faults.empty:
                role = _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            elif deltas:
                deltas[0] = {"role": "assistant", "content": tokens[0]}
            chunks = [
                _sse({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in deltas
            ]
            last = {"index": 0, "delta": {}, "finish_reason": "stop"}
        else:
            chunks = [
                _sse({**base, "choices": [{"index": 0, "text": t, "finish_reason": None}]}) for t in tokens
            ]
            last = {"index": 0, "text": "", "finish_reason": "stop"}
        final = _sse({**base, "choices": [last]})
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            # As OpenAI and vLLM do: one more chunk, with no choices, carrying the usage.
            prompt_tokens = max(1, len(body) // 4)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            }
            final += _sse({**base, "choices": [], "usage": usage})
        return await _send_stream(request, behaviour, role, chunks, final, faults)
    text = "".join(tokens)
    if chat:
        base["object"] = "chat.completion"
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
    else:
        choice = {"text": text}
    choice.update(index=0, finish_reason="stop", logprobs=None)
    prompt_tokens = max(1, len(body) // 4)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(tokens),
        "total_tokens": prompt_tokens + len(tokens),
    }
    return await _send_json(request, behaviour, {**base, "choices": [choice], "usage": usage})


async def _answer_embeddings(
    request: web.Request, behaviour: MockBehaviour, payload: dict[str, Any], body: bytes, faults: Faults
) -> web.StreamResponse:
    raw = payload.get("input")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        msg = "'input' must be a string or a non-empty list of strings"
        return _error(behaviour, 400, "invalid_request_error", msg, "input")
    data = [
        {"object": "embedding", "index": i, "embedding": _embedding(text)} for i, text in enumerate(items)
    ]
    tokens = sum(max(1, len(text) // 4) for text in items)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    result = {"object": "list", "data": data, "model": _model(payload), "usage": usage}
    return await _send_json(request, behaviour, result)


async def _answer_echo(
    request: web.Request, behaviour: MockBehaviour, payload: dict[str, Any], body: bytes, faults: Faults
) -> web.StreamResponse:
    result = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query_string": request.query_string,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return await _send_json(request, behaviour, result)


async def _models(request: web.Request) -> web.Response:
    behaviour = request.app[MOCK_BEHAVIOUR]
    model = {"id": _DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": behaviour.name}
    return _json({"object": "list", "data": [model]}, behaviour)


async def _health(request: web.Request) -> web.Response:
    behaviour = request.app[MOCK_BEHAVIOUR]
    request.app[MOCK_STATS].health_checks += 1
    if behaviour.health_latency_s > 0:
        await asyncio.sleep(behaviour.health_latency_s)
    if behaviour.healthy:
        return _json({"status": "ok"}, behaviour)
    return _json({"status": "unhealthy"}, behaviour, 503)


def _validate_field(key: str, value: Any) -> Any:
    """Return ``value`` if it is acceptable for behaviour field ``key``; else raise ValueError."""
    if key not in _FIELDS:
        raise ValueError(f"unknown field {key!r}")
    if key in _FLAGS:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be a boolean")
    elif key == "name":
        if not isinstance(value, str) or not value:
            raise ValueError("name must be a non-empty string")
    elif key in _INT_BOUNDS:
        if value is None and key == "drop_after_chunks":
            return None
        lo, hi = _INT_BOUNDS[key]
        if type(value) is not int:
            raise ValueError(f"{key} must be an integer")
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{key} must be within [{lo}, {hi if hi is not None else 'inf'}]")
    else:
        lo_f, hi_f = _FLOAT_BOUNDS[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number")
        if not (math.isfinite(value) and lo_f <= value <= hi_f):
            raise ValueError(f"{key} must be within [{lo_f:g}, {hi_f:g}]")
        return float(value)
    return value


async def _control_get(request: web.Request) -> web.Response:
    behaviour = request.app[MOCK_BEHAVIOUR]
    return _json(asdict(behaviour), behaviour)


async def _control_update(request: web.Request) -> web.Response:
    behaviour = request.app[MOCK_BEHAVIOUR]
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        msg = "Request body must be a JSON object"
        return _error(behaviour, 400, "invalid_request_error", msg)
    updates: dict[str, Any] = {}
    for key, value in payload.items():
        try:
            updates[key] = _validate_field(key, value)
        except ValueError as exc:
            return _error(behaviour, 400, "invalid_request_error", str(exc), key)
    for key, value in updates.items():
        setattr(behaviour, key, value)
    return _json(asdict(behaviour), behaviour)


async def _reset_stats(request: web.Request) -> web.Response:
    stats = request.app[MOCK_STATS]
    stats.reset()
    return _json(stats.to_json(), request.app[MOCK_BEHAVIOUR])


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[MOCK_STATS].to_json(), request.app[MOCK_BEHAVIOUR])


def create_mock_app(behaviour: MockBehaviour | None = None, *, seed: int | None = None) -> web.Application:
    """Build the mock inference aiohttp application."""
    app = web.Application()
    app[MOCK_BEHAVIOUR] = behaviour if behaviour is not None else MockBehaviour()
    app[MOCK_STATS] = MockStats()
    app[_RNG] = random.Random(seed)
    app[_IDS] = itertools.count(1)
    app[_ONCE] = set()
    router = app.router
    chat = functools.partial(_answer_completion, chat=True)
    text = functools.partial(_answer_completion, chat=False)
    router.add_post("/v1/chat/completions", functools.partial(_guarded, chat, True))
    router.add_post("/v1/completions", functools.partial(_guarded, text, True))
    router.add_post("/v1/embeddings", functools.partial(_guarded, _answer_embeddings, True))
    echo = functools.partial(_guarded, _answer_echo, False)
    router.add_get("/v1/models", _models)
    router.add_get("/health", _health)
    router.add_route("*", "/echo", echo)
    router.add_route("*", "/echo/{tail:.*}", echo)
    router.add_get("/control", _control_get)
    router.add_post("/control", _control_update)
    router.add_post("/control/reset-stats", _reset_stats)
    router.add_get("/stats", _stats)
    return app


# (flag, behaviour field, converter, metavar, help)
_CLI_KNOBS: Final[tuple[tuple[str, str, Callable[[str], Any], str, str], ...]] = (
    ("--name", "name", str, "NAME", "name reported in X-Mock-Name and as model owner"),
    ("--latency", "latency_s", float, "S", "seconds to wait before answering inference requests"),
    ("--chunk-interval", "chunk_interval_s", float, "S", "seconds between streamed SSE chunks"),
    ("--chunks", "stream_chunks", int, "N", "tokens per completion (= streamed content chunks)"),
    ("--error-rate", "error_rate", float, "P", "probability (0..1) of failing with --error-status"),
    ("--error-status", "error_status", int, "CODE", "HTTP status of injected failures (100..599)"),
    ("--rate-limit-rate", "rate_limit_rate", float, "P", "probability (0..1) of a 429 answer"),
    ("--retry-after", "retry_after_s", float, "S", "Retry-After of 429 answers (rounded up)"),
    ("--drop-after", "drop_after_chunks", int, "N",
     "abort the connection after N streamed chunks (non-streaming: after half the body)"),
)  # fmt: skip


def _arg(key: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
        try:
            return _validate_field(key, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("port must be an integer within [0, 65535]")
    return port


# (EngineConfig field, converter, metavar, help) of the --engine flags; the flag is ENGINE_FLAGS[field]
_ENGINE_KNOBS: Final[tuple[tuple[str, Callable[[str], Any], str, str], ...]] = (
    ("model_name", str, "NAME", "served model name (the model_name label of /metrics)"),
    ("max_num_seqs", int, "N", "most sequences in a batch (vLLM's max_num_seqs)"),
    ("max_num_batched_tokens", int, "N", "token budget of one step: decodes plus prefill chunks"),
    ("num_gpu_blocks", int, "N", "KV cache size in blocks"),
    ("block_size", int, "N", "tokens per KV block"),
    ("max_model_len", int, "N", "context window: prompt plus output tokens"),
    ("step_time_s", float, "S", "seconds of one engine step, before per-sequence and prefill costs"),
    ("step_time_per_seq_s", float, "S", "seconds one step gains per sequence in the batch"),
    ("prefill_time_per_token_s", float, "S", "seconds one step gains per uncached prompt token"),
    ("output_len", int, "N", "median output tokens of a request without max_tokens"),
    ("output_len_sigma", float, "X", "log-normal shape of those lengths (0 = always the median)"),
    ("speed", float, "X", "speed of this instance (0.7 = 30%% slower)"),
    ("time_scale", float, "X", "multiply every simulated time by X (tests: 0.1 runs 10x faster)"),
)


def _engine_value(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None

    return parse


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    group = p.add_argument_group(
        "engine simulation",
        "--engine serves a simulated vLLM-like engine (continuous batching, paged KV cache with "
        "prefix caching, vLLM's /metrics and ORCA header) instead of the scripted mock; "
        "the flags above other than --host, --port, --name and --seed do not apply to it",
    )
    group.add_argument("--engine", action="store_true", help="simulate a vLLM-like engine")
    for key, convert, metavar, text in _ENGINE_KNOBS:
        group.add_argument(
            ENGINE_FLAGS[key],
            dest=f"engine_{key}",
            type=_engine_value(convert),
            default=argparse.SUPPRESS,  # absent unless given, so the help shows EngineConfig's default
            metavar=metavar,
            help=f"{text} (default: {getattr(defaults, key)})",
        )


def engine_config(args: argparse.Namespace) -> EngineConfig | None:
    """The EngineConfig of parsed arguments (None without --engine); ValueError names a bad flag."""
    given = {
        key: getattr(args, f"engine_{key}")
        for key, _, _, _ in _ENGINE_KNOBS
        if hasattr(args, f"engine_{key}")
    }
    if not args.engine:
        if given:
            raise ValueError(f"{ENGINE_FLAGS[next(iter(given))]} needs --engine")
        return None
    seed = 0 if args.seed is None else args.seed
    return EngineConfig(**given, seed=seed)


def _build_parser() -> argparse.ArgumentParser:
    defaults = MockBehaviour()
    p = argparse.ArgumentParser(
        prog="mock-inference",
        description="OpenAI-compatible mock inference server for gateway demos, tests, benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=_port, default=8000, help="TCP port to bind (0 = any free port)")
    for flag, key, convert, metavar, text in _CLI_KNOBS:
        default = getattr(defaults, key)
        p.add_argument(flag, dest=key, type=_arg(key, convert), default=default, metavar=metavar, help=text)
    p.add_argument("--hang", action="store_true", help="never answer inference requests")
    p.add_argument("--unhealthy", action="store_true", help="answer GET /health with 503")
    p.add_argument(
        "--stamp-chunks",
        action="store_true",
        help='add "sent_ns" (time.monotonic_ns() at send) to every streamed JSON chunk',
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed for error/rate-limit draws (--engine: output lengths, 0)"
    )
    _add_engine_flags(p)
    return p


async def _serve(
    host: str, port: int, behaviour: MockBehaviour, seed: int | None, engine: EngineConfig | None = None
) -> None:
    if engine is None:
        app = create_mock_app(behaviour, seed=seed)
    else:
        from gateway.testing.engine.server import create_engine_app

        app = create_engine_app(engine, name=behaviour.name)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # e.g. Windows
                pass
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        kind = "engine " if engine is not None else ""
        print(f"mock-inference {kind}{behaviour.name} listening on http://{shown}:{bound}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def main(argv: list[str] | None = None) -> None:
    """Run the mock inference server from the command line."""
    args = _build_parser().parse_args(argv)
    try:
        engine = engine_config(args)
    except ValueError as exc:
        sys.exit(f"mock-inference: error: {exc}")
    knobs = {key: getattr(args, key) for _, key, _, _, _ in _CLI_KNOBS}
    behaviour = MockBehaviour(
        **knobs, hang=args.hang, healthy=not args.unhealthy, stamp_chunks=args.stamp_chunks
    )
    try:
        _run(_serve(args.host, args.port, behaviour, args.seed, engine))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        sys.exit(f"mock-inference: error: cannot listen on {args.host}:{args.port}: {exc}")


if __name__ == "__main__":
    main()
