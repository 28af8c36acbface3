"""The HTTP face of the engine simulator: OpenAI-compatible endpoints, /metrics, /stats, /health."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gateway.testing.engine import orca
from gateway.testing.engine.config import EngineConfig
from gateway.testing.engine.driver import EngineDriver, EngineFailed, Submission
from gateway.testing.engine.metrics import EngineCollector
from gateway.testing.engine.outputs import OutputPlan, output_seed, plan_output
from gateway.testing.engine.protocol import (
    BadRequest,
    GenerationRequest,
    chat_chunk,
    completion_chunk,
    full_response,
    parse_request,
    usage,
)
from gateway.testing.engine.scheduler import Histogram
from gateway.testing.engine.tokens import tokenize

__all__ = ["ENGINE", "create_engine_app"]

log = logging.getLogger(__name__)

ENGINE: Final = web.AppKey("engine", EngineDriver)
_NAME: Final = web.AppKey("engine_name", str)
_REGISTRY: Final = web.AppKey("engine_registry", CollectorRegistry)
_DONE: Final = b"data: [DONE]\n\n"


def _json(
    request: web.Request, data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    hdrs = {"X-Mock-Name": request.app[_NAME], **(headers or {})}
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=hdrs)


def _error(request: web.Request, status: int, message: str, param: str | None = None) -> web.Response:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return _json(request, body, status)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _check_length(config: EngineConfig, prompt_len: int, max_tokens: int | None, chat: bool) -> None:
    """vLLM's refusal of a prompt (and max_tokens) longer than the context window."""
    limit = config.max_model_len
    where = "messages" if chat else "prompt"
    if prompt_len >= limit or (max_tokens is not None and prompt_len + max_tokens > limit):
        asked = prompt_len + (max_tokens or 0)
        raise BadRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested {asked} "
            f"tokens ({prompt_len} in the {where}, {max_tokens or 0} in the completion). Please reduce "
            f"the length of the {where} or completion.",
            where,
        )


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    config = engine.config
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(request, 400, "Request body must be valid JSON")
    try:
        parsed = parse_request(payload, chat=chat)
        prompt = tokenize(parsed.prompt_text)
        if not prompt:
            raise BadRequest("the prompt has no tokens", "prompt")
        _check_length(config, len(prompt), parsed.max_tokens, chat)
    except BadRequest as exc:
        return _error(request, 400, str(exc), exc.param)
    rng = random.Random(output_seed(config, prompt))
    plan = plan_output(config, prompt, parsed.max_tokens, chat=chat, rng=rng)
    try:
        sub = engine.submit(prompt, plan)
    except EngineFailed as exc:
        return _error(request, 500, str(exc))
    rid = sub.request.request_id
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
        "created": int(time.time()),
        "model": parsed.model or config.model_name,
    }
    finished = False
    try:
        if parsed.stream:
            resp, finished = await _stream(request, parsed, plan, sub, base)
            return resp
        reason = None
        while reason is None:
            out = await sub.outputs.get()
            if out is None:
                return _error(request, 500, "the engine loop has failed")
            reason = out.finish_reason
        finished = True
        req = sub.request
        body = full_response(
            base,
            chat,
            "".join(plan.pieces),
            reason,
            usage(len(prompt), len(plan.pieces), req.cached_prompt_tokens),
        )
        headers: dict[str, str] = {}
        value = orca.orca_header(request.headers.get(orca.REQUEST_HEADER, ""), _named_metrics(engine))
        if value is not None:
            headers[orca.RESPONSE_HEADER] = value
        return _json(request, body, headers=headers)
    finally:
        if not finished:  # the client left (or the engine failed): free its seat and blocks
            engine.abort(rid)


async def _stream(
    request: web.Request, parsed: GenerationRequest, plan: OutputPlan, sub: Submission, base: dict[str, Any]
) -> tuple[web.StreamResponse, bool]:
    """Send the SSE stream; the response, and whether it ended (False: the client went away)."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Mock-Name": request.app[_NAME],
        }
    )
    try:
        await resp.prepare(request)  # headers at admission, before the first token, as vLLM does
        while True:
            out = await sub.outputs.get()
            if out is None:
                error = {"error": {"message": "the engine loop has failed", "type": "InternalServerError"}}
                await resp.write(_sse(error) + _DONE)
                return resp, True
            piece = plan.pieces[out.index]
            if parsed.chat:
                data = b""
                if out.first:
                    data = _sse(chat_chunk(base, {"role": "assistant", "content": ""}, None))
                data += _sse(chat_chunk(base, {"content": piece}, out.finish_reason))
            else:
                data = _sse(completion_chunk(base, piece, out.finish_reason))
            if out.finish_reason is not None:
                if parsed.include_usage:
                    u = usage(len(sub.request.prompt), len(plan.pieces), sub.request.cached_prompt_tokens)
                    kind = "chat.completion.chunk" if parsed.chat else "text_completion"
                    data += _sse({**base, "object": kind, "choices": [], "usage": u})
                await resp.write(data + _DONE)
                await resp.write_eof()
                return resp, True
            await resp.write(data)
    except ConnectionResetError:
        return resp, False


def _named_metrics(engine: EngineDriver) -> list[tuple[str, float]]:
    sched = engine.scheduler
    return [("num_requests_waiting", float(sched.num_waiting)), ("kv_cache_usage_perc", sched.cache.usage())]


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _models(request: web.Request) -> web.Response:
    config = request.app[ENGINE].config
    model = {
        "id": config.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "vllm",
        "max_model_len": config.max_model_len,
    }
    return _json(request, {"object": "list", "data": [model]})


async def _health(request: web.Request) -> web.Response:
    if request.app[ENGINE].failed:
        return _error(request, 500, "the engine loop has failed")
    return web.Response(status=200, headers={"X-Mock-Name": request.app[_NAME]})  # vLLM: 200, empty body


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _summary(hist: Histogram) -> dict[str, Any]:
    return {
        "count": hist.count,
        "mean": hist.total / hist.count if hist.count else None,
        "p50": hist.quantile(0.5),
        "p90": hist.quantile(0.9),
        "p99": hist.quantile(0.99),
    }


def engine_stats(name: str, engine: EngineDriver) -> dict[str, Any]:
    """The /stats document: load, cache and counters of one engine."""
    sched = engine.scheduler
    stats = sched.stats
    cache = sched.cache
    return {
        "name": name,
        "model": engine.config.model_name,
        "speed": engine.config.speed,
        "running": sched.num_running,
        "waiting": sched.num_waiting,
        "kv_cache_usage": cache.usage(),
        "kv_cache_blocks": cache.num_blocks,
        "kv_cache_blocks_free": cache.num_free,
        "kv_cache_blocks_cached": cache.num_cached,
        "evictions": cache.evictions,
        "completed": stats.completed,
        "aborted": stats.aborted,
        "preemptions": stats.preemptions,
        "prefix_cache": {
            "queries": stats.prefix_cache_queries,
            "hits": stats.prefix_cache_hits,
            "hit_rate": stats.prefix_cache_hit_rate,
        },
        "prompt_tokens": stats.prompt_tokens,
        "prefill_tokens_computed": stats.prefill_tokens_computed,
        "generation_tokens": stats.generation_tokens,
        "steps": stats.steps,
        "busy_s": stats.busy_s,
        "ttft_s": _summary(stats.ttft),
        "e2e_s": _summary(stats.e2e),
    }


async def _stats(request: web.Request) -> web.Response:
    return _json(request, engine_stats(request.app[_NAME], request.app[ENGINE]))


async def _engine_loop(app: web.Application) -> AsyncIterator[None]:
    app[ENGINE].start()
    yield
    await app[ENGINE].stop()


def create_engine_app(
    config: EngineConfig, *, name: str = "mock", clock: Callable[[], float] = time.monotonic
) -> web.Application:
    """Build the engine simulator's aiohttp application (its loop runs while the app does)."""
    app = web.Application()
    app[ENGINE] = EngineDriver(config, clock=clock)
    app[_NAME] = name
    registry = CollectorRegistry(auto_describe=True)
    registry.register(EngineCollector(app[ENGINE].scheduler))
    app[_REGISTRY] = registry
    app.cleanup_ctx.append(_engine_loop)
    router = app.router
    router.add_post("/v1/chat/completions", _chat)
    router.add_post("/v1/completions", _completions)
    router.add_get("/v1/models", _models)
    router.add_get("/health", _health)
    router.add_get("/metrics", _metrics)
    router.add_get("/stats", _stats)
    return app
