"""Server-Sent Events through the gateway: incremental delivery and visible mid-stream failure."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import AiohttpServer, StartGateway, StartMock

STREAM = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_streaming_first_event_arrives_before_upstream_finishes(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", chunk_interval_s=0.2, stream_chunks=5)
    gw = await start_gateway(a.spec)
    started = time.monotonic()
    resp = await gw.client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    first = await resp.content.readline()
    first_at = time.monotonic() - started
    assert first.startswith(b"data: ")
    rest = await resp.read()
    total = time.monotonic() - started
    assert total > 0.7  # chunks 0.2 s apart
    assert first_at < total - 0.5  # delivered as soon as the upstream sent it, not at the end
    events = [line for line in (first + rest).split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 5 + 2  # chunks, the finish chunk and [DONE]


async def test_streaming_each_chunk_is_forwarded_separately(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await release.wait()
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/s", handler)
    server = await aiohttp_server(app)
    gw = await start_gateway({"name": "u", "url": str(server.make_url("")), "health_path": None})
    resp = await gw.client.post("/s")
    # The first event must arrive while the upstream is still blocked before the second.
    assert await asyncio.wait_for(resp.content.readline(), 2) == b"data: one\n"
    release.set()
    assert (await resp.read()).strip() == b"data: two"


async def test_streaming_upstream_dying_mid_stream_ends_with_sse_error_event(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", stream_chunks=6, drop_after_chunks=2, chunk_interval_s=0.01)
    b = await start_mock("b")
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    resp = await gw.client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 200
    assert resp.headers["X-Gateway-Upstream"] == "a"
    body = await resp.read()  # the stream ends cleanly, with an error event last
    blocks = [b for b in body.split(b"\n\n") if b.strip()]
    assert len([b for b in blocks if b.startswith(b"data: {")]) == 2
    last = blocks[-1].split(b"\n")
    assert last[0] == b"event: error"
    error = orjson.loads(last[1].removeprefix(b"data: "))["error"]
    assert error["type"] == "upstream_stream_error"
    assert b"[DONE]" not in body
    assert gw.sample("gateway_stream_aborts_total", {"upstream": "a"}) == 1
    assert b.stats.requests == 0  # never retried once bytes reached the client


async def test_streaming_non_sse_body_cut_mid_way_is_truncated_for_client(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", drop_after_chunks=1)
    gw = await start_gateway(a.spec)
    resp = await gw.client.post("/v1/chat/completions", json={"model": "m"})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert gw.sample("gateway_stream_aborts_total", {"upstream": "a"}) == 1


async def test_streaming_idle_timeout_cuts_stalled_stream(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await asyncio.sleep(30)
        return resp

    app = web.Application()
    app.router.add_post("/s", handler)
    server = await aiohttp_server(app)
    gw = await start_gateway(
        {"name": "u", "url": str(server.make_url("")), "health_path": None}, timeouts={"idle_s": 0.3}
    )
    started = time.monotonic()
    resp = await gw.client.post("/s")
    body = await resp.read()
    assert time.monotonic() - started < 2
    assert b"event: error" in body
    assert b"idle timeout" in body
    assert gw.sample("gateway_upstream_requests_total", {"upstream": "u", "outcome": "success"}) == 1
    assert gw.sample("gateway_stream_aborts_total", {"upstream": "u"}) == 1


async def test_streaming_long_stream_is_not_cut_by_attempt_timeout(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", chunk_interval_s=0.1, stream_chunks=8)
    gw = await start_gateway(a.spec, timeouts={"attempt_s": 0.3, "idle_s": 0.5})
    resp = await gw.client.post("/v1/chat/completions", json=STREAM)
    body = await resp.read()
    assert body.rstrip().endswith(b"data: [DONE]")


async def test_streaming_client_disconnect_stops_upstream_stream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", chunk_interval_s=0.1, stream_chunks=50)
    gw = await start_gateway(a.spec)
    resp = await gw.client.post("/v1/chat/completions", json=STREAM)
    await resp.content.readline()
    resp.close()
    for _ in range(100):
        if a.stats.disconnects:
            break
        await asyncio.sleep(0.05)
    assert a.stats.disconnects == 1
