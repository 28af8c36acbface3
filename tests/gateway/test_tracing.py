"""OpenTelemetry traces through a real gateway to a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import AiohttpServer, StartGateway, StartMock

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Receiver:
    """An OTLP/HTTP traces endpoint that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    async def traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def named(self, name: str) -> list[Any]:
        return [s for s in self.spans if s.name == name]


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> tuple[Receiver, str]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rec.traces)
    server = await aiohttp_server(app)
    return rec, str(server.make_url("/v1/traces"))


async def flushed(gw: Any, rec: Receiver, ready: Callable[[], bool]) -> None:
    for _ in range(50):
        await asyncio.to_thread(gw.state.proxy.tracing.flush)
        if ready():
            return
        await asyncio.sleep(0.05)


async def test_one_span_per_request_and_per_attempt_with_genai_attributes_and_propagation(
    start_mock: StartMock, start_gateway: StartGateway, receiver: tuple[Receiver, str]
) -> None:
    rec, endpoint = receiver
    a = await start_mock("a", stream_chunks=4)
    b = await start_mock("b", stream_chunks=4)
    gw = await start_gateway(
        {"name": "a", "url": a.url, "models": {"llama": "llama-a"}},
        {"name": "b", "url": b.url, "models": {"llama": "llama-b"}},
        strategy="priority",
        tracing={"otlp_endpoint": endpoint},
    )
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    headers = {"traceparent": traceparent, "X-Mock-Fault": "status=503@a"}
    async with gw.client.post("/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200
        await resp.read()
    sent = {k.lower(): v for k, v in (b.stats.last_headers or {}).items()}
    version, trace_id, parent_id, flags = sent["traceparent"].split("-")
    assert trace_id == CLIENT_TRACE and parent_id != CLIENT_SPAN  # continued, with the attempt's span
    await flushed(gw, rec, lambda: len(rec.spans) >= 3)
    (request,) = rec.named("gateway request")
    attempts = rec.named("gateway attempt")
    assert len(attempts) == 2  # a (503), then b
    assert request.trace_id.hex() == CLIENT_TRACE and request.parent_span_id.hex() == CLIENT_SPAN
    assert all(s.parent_span_id == request.span_id for s in attempts)
    assert attempts[-1].span_id.hex() == parent_id  # the upstream saw the last attempt's span
    got = attributes(request)
    assert got["http.response.status_code"] == 200
    assert got["gen_ai.request.model"] == "llama"
    assert got["gen_ai.response.model"] == "llama-b"
    assert got["gen_ai.usage.output_tokens"] == 4 and got["gen_ai.usage.input_tokens"] > 0
    outcomes = [attributes(s)["gateway.outcome"] for s in attempts]
    assert sorted(outcomes) == ["http_5xx", "success"]
    assert {attributes(s)["server.address"] for s in attempts} == {"127.0.0.1"}


async def test_a_stream_is_traced_with_its_models(
    start_mock: StartMock, start_gateway: StartGateway, receiver: tuple[Receiver, str]
) -> None:
    rec, endpoint = receiver
    a = await start_mock("a", stream_chunks=3)
    gw = await start_gateway(a.spec, tracing={"otlp_endpoint": endpoint})
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with gw.client.post("/v1/chat/completions", json=body) as resp:
        await resp.read()
    await flushed(gw, rec, lambda: len(rec.named("gateway request")) == 1)
    got = attributes(rec.named("gateway request")[0])
    assert got["gen_ai.response.model"] == "llama"
    assert got["gen_ai.usage.output_tokens"] == 3


async def test_sampling_ratio_zero_sends_nothing_without_a_sampled_parent(
    start_mock: StartMock, start_gateway: StartGateway, receiver: tuple[Receiver, str]
) -> None:
    rec, endpoint = receiver
    a = await start_mock("a")
    gw = await start_gateway(a.spec, tracing={"otlp_endpoint": endpoint, "sample_ratio": 0.0})
    for _ in range(5):
        async with gw.client.post("/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
    tracing = gw.state.proxy.tracing
    assert tracing is not None
    await asyncio.to_thread(tracing.flush)
    assert rec.spans == []
    assert "traceparent" in {k.lower() for k in (a.stats.last_headers or {})}  # still propagated


async def test_tracing_is_off_by_default(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    assert gw.state.proxy.tracing is None
    async with gw.client.post(
        "/v1/chat/completions", json=CHAT, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    ) as r:
        await r.read()
    # Off, the gateway does not touch the header: it is forwarded as the client sent it.
    assert {k.lower(): v for k, v in (a.stats.last_headers or {}).items()}["traceparent"].endswith(
        CLIENT_SPAN + "-01"
    )
