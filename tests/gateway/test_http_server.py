"""The client-facing HTTP/1.1 server on real loopback sockets, byte by byte.

`HttpServer` runs with small inline handlers where the server alone is under test, and the full
gateway where the behaviour spans the proxy (bodies and backpressure end to end). Clients are raw
asyncio streams, so framing, ordering and connection closes are seen exactly as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiohttp import web

from gateway.http.server import Handler, HttpServer, Request, Responder
from tests.conftest import AiohttpServer, StartGateway, StartMock
from tests.gateway.raw_http import (
    OpenRaw,
    RawConnection,
    StartRaw,
    expect_eof,
    read_response,
)

StartServer = Callable[..., Awaitable[HttpServer]]
TEXT = b"Content-Type: text/plain\r\n"


@pytest.fixture
async def serve() -> AsyncIterator[StartServer]:
    """Start an HttpServer with `handler` on a free loopback port; shut down after the test."""
    servers: list[HttpServer] = []

    async def start(
        handler: Handler,
        *,
        max_header_bytes: int = 8192,
        keepalive_s: float = 75.0,
        sweep_interval_s: float = 5.0,
    ) -> HttpServer:
        server = HttpServer(
            handler,
            max_header_bytes=max_header_bytes,
            keepalive_s=keepalive_s,
            sweep_interval_s=sweep_interval_s,
        )
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.shutdown(0)


async def echo(request: Request, responder: Responder) -> None:
    """Answers `METHOD TARGET BODY` with the whole body read."""
    body = await request.body.read_all()
    responder.send(200, TEXT, request.method + b" " + request.target + b" " + body)


def gateway_spec(url: str) -> dict[str, object]:
    """Settings of upstream "u" at `url`, without active health checks."""
    return {"name": "u", "url": url, "health_path": None}


# --- HttpServer alone ----------------------------------------------------------------------------


async def test_server_answers_pipelined_requests_in_order(serve: StartServer, open_raw: OpenRaw) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        if request.target == b"/slow":
            await asyncio.sleep(0.05)  # the later requests must still wait their turn
        await echo(request, responder)

    server = await serve(handler)
    reader, writer = await open_raw(server.port)
    writer.write(
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
    )
    first = await read_response(reader)
    second = await read_response(reader)
    assert [first.body, second.body] == [b"GET /slow ", b"POST /b xyz"]
    assert first.header(b"connection") is None and second.header(b"connection") is None
    writer.write(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader)).body == b"GET /c "


async def test_server_pipelining_beyond_one_queued_request_closes_after_answering(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    """One request may queue behind the one being answered; a third in the same read is not parsed."""

    async def handler(request: Request, responder: Responder) -> None:
        await asyncio.sleep(0.05)
        await echo(request, responder)

    server = await serve(handler)
    reader, writer = await open_raw(server.port)
    writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
    first = await read_response(reader)
    second = await read_response(reader)
    assert [first.body, second.body] == [b"GET /0 ", b"GET /1 "]
    assert second.header(b"connection") == b"close"  # the client retries the rest on a new connection
    await expect_eof(reader)


async def test_server_pipelining_flood_stays_bounded(serve: StartServer, open_raw: OpenRaw) -> None:
    """Thousands of pipelined requests in one burst: two are answered, the rest never parsed."""
    server = await serve(echo)
    reader, writer = await open_raw(server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000)
    answered = 0
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            await read_response(reader)
            answered += 1
    assert answered == 2


async def test_server_http10_streamed_body_is_close_delimited(serve: StartServer, open_raw: OpenRaw) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        responder.start(200, b"", TEXT, None)
        for part in (b"one ", b"two ", b"three"):
            await responder.write(part)
        responder.end()

    server = await serve(handler)
    reader, writer = await open_raw(server.port)
    writer.write(b"GET /s HTTP/1.0\r\n\r\n")
    resp = await read_response(reader)  # no length, not chunked: the body runs to EOF
    assert resp.status == 200
    assert resp.header(b"transfer-encoding") is None
    assert resp.header(b"content-length") is None
    assert resp.header(b"connection") == b"close"
    assert resp.body == b"one two three"


async def test_server_http10_length_framed_body_then_close(serve: StartServer, open_raw: OpenRaw) -> None:
    server = await serve(echo)
    reader, writer = await open_raw(server.port)
    writer.write(b"GET /x HTTP/1.0\r\n\r\n")
    resp = await read_response(reader)
    assert resp.header(b"content-length") == b"7"
    assert resp.header(b"connection") == b"close"
    assert resp.body == b"GET /x "
    await expect_eof(reader)


async def test_server_http10_keep_alive_is_honoured_when_asked(serve: StartServer, open_raw: OpenRaw) -> None:
    server = await serve(echo)
    reader, writer = await open_raw(server.port)
    for path in (b"/1", b"/2"):
        writer.write(b"GET %b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % path)
        resp = await read_response(reader)
        assert resp.header(b"connection") == b"keep-alive"
        assert resp.body == b"GET %b " % path


@pytest.mark.parametrize("where", ["header", "target"])
async def test_server_oversized_headers_get_431_json_and_close(
    serve: StartServer, where: str, open_raw: OpenRaw
) -> None:
    called = False

    async def handler(request: Request, responder: Responder) -> None:
        nonlocal called
        called = True
        await echo(request, responder)

    server = await serve(handler, max_header_bytes=1024)
    reader, writer = await open_raw(server.port)
    big = b"a" * 4000
    if where == "header":
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: %b\r\n\r\n" % big)
    else:
        writer.write(b"GET /%b HTTP/1.1\r\nHost: x\r\n\r\n" % big)
    resp = await read_response(reader)
    assert resp.status == 431
    assert resp.header(b"content-type") == b"application/json"
    assert resp.header(b"connection") == b"close"
    assert orjson.loads(resp.body)["error"]["type"] == "request_header_too_large"
    await expect_eof(reader)
    assert not called


@pytest.mark.parametrize(
    "garbage",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET / HTTP/9.Z\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        # Ambiguous framing (request smuggling) is refused, never guessed at.
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ],
    ids=["request-line", "version", "header-line", "cl-and-te", "two-cl"],
)
async def test_server_malformed_request_gets_400_json_and_close(
    serve: StartServer, garbage: bytes, open_raw: OpenRaw
) -> None:
    server = await serve(echo)
    reader, writer = await open_raw(server.port)
    writer.write(garbage)
    resp = await read_response(reader)
    assert resp.status == 400
    assert resp.header(b"content-type") == b"application/json"
    assert resp.header(b"connection") == b"close"
    assert orjson.loads(resp.body)["error"]["type"] == "invalid_request"
    await expect_eof(reader)


async def test_server_malformed_body_mid_request_closes_without_answer(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    read_failed = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        try:
            await request.body.read_all()
        except (ConnectionResetError, asyncio.CancelledError):
            read_failed.set()
            raise
        responder.send(200, TEXT, b"never")

    server = await serve(handler)
    reader, writer = await open_raw(server.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    await asyncio.sleep(0.02)  # the handler is reading the body by now
    writer.write(b"zz\r\n")
    # The handler owns the response once it runs, so the server does not write over it: it closes.
    await expect_eof(reader)
    await asyncio.wait_for(read_failed.wait(), 1)


async def test_server_expect_100_continue_gets_interim_before_final(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    server = await serve(echo)
    reader, writer = await open_raw(server.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    interim = await read_response(reader)  # before any body byte was sent
    assert interim.start_line == b"HTTP/1.1 100 Continue"
    writer.write(b"hello")
    final = await read_response(reader)
    assert final.status == 200
    assert final.body == b"POST /up hello"


async def test_server_keeps_one_connection_alive_across_many_requests(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    server = await serve(echo)
    reader, writer = await open_raw(server.port)
    for i in range(100):
        body = b"%d" % i
        writer.write(b"POST /%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (i, len(body), body))
        resp = await read_response(reader)
        assert resp.body == b"POST /%d %d" % (i, i)
        assert resp.header(b"connection") is None
    assert len(server.connections) == 1


async def test_server_handler_seeing_client_gone_is_not_logged_as_a_failure(
    serve: StartServer, open_raw: OpenRaw, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        raise ConnectionResetError("client disconnected")  # as a write to a departed client raises

    server = await serve(handler)
    reader, writer = await open_raw(server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await expect_eof(reader)  # closed without an answer: there is nobody to answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_server_client_disconnect_cancels_handler(serve: StartServer, open_raw: OpenRaw) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await serve(handler)
    _, writer = await open_raw(server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(started.wait(), 2)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 2)


async def test_server_handler_error_answers_500_json_and_closes(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        raise RuntimeError("boom")

    server = await serve(handler)
    reader, writer = await open_raw(server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 500
    assert orjson.loads(resp.body) == {"error": {"type": "internal", "message": "internal error"}}
    assert b"boom" not in resp.body
    await expect_eof(reader)


async def test_server_unread_request_body_closes_instead_of_parsing_it(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        responder.send(200, TEXT, b"ignored your body")

    server = await serve(handler)
    reader, writer = await open_raw(server.port)
    # The body looks like a request: it must never be answered as one.
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(smuggled), smuggled))
    resp = await read_response(reader)
    assert resp.body == b"ignored your body"
    await expect_eof(reader)


async def test_server_absolute_form_target_is_reduced_to_origin_form(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    server = await serve(echo)
    reader, writer = await open_raw(server.port)
    writer.write(b"GET http://example.com:8080/v1/x?y=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert (await read_response(reader)).body == b"GET /v1/x?y=1 "


async def test_server_upgrade_request_is_answered_as_http_then_closed(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    server = await serve(echo)
    reader, writer = await open_raw(server.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00")
    resp = await read_response(reader)
    assert resp.status == 200
    assert resp.header(b"connection") == b"close"
    await expect_eof(reader)


async def test_server_closes_idle_keepalive_connections_only(serve: StartServer, open_raw: OpenRaw) -> None:

    async def handler(request: Request, responder: Responder) -> None:
        if request.target == b"/slow":
            await asyncio.sleep(0.4)  # longer than keep-alive: a busy connection is not idle
        await echo(request, responder)

    server = await serve(handler, keepalive_s=0.1, sweep_interval_s=0.02)
    idle_reader, idle_writer = await open_raw(server.port)
    idle_writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(idle_reader)).status == 200
    busy_reader, busy_writer = await open_raw(server.port)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    await expect_eof(idle_reader, timeout_s=1.0)
    assert time.monotonic() - started < 0.4
    assert (await read_response(busy_reader)).body == b"GET /slow "


async def test_server_shutdown_finishes_inflight_and_closes_idle(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        if request.target == b"/slow":
            await asyncio.sleep(0.3)
        await echo(request, responder)

    server = await serve(handler)
    port = server.port
    idle_reader, idle_writer = await open_raw(port)
    idle_writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(idle_reader)).status == 200
    busy_reader, busy_writer = await open_raw(port)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.05)  # the slow request is in flight
    started = time.monotonic()
    shutdown = asyncio.create_task(server.shutdown(grace_s=2.0))
    await expect_eof(idle_reader, timeout_s=1.0)
    assert time.monotonic() - started < 0.2
    with pytest.raises(OSError):
        await open_raw(port)  # no longer accepting
    resp = await read_response(busy_reader)
    assert resp.body == b"GET /slow "
    assert resp.header(b"connection") == b"close"
    await expect_eof(busy_reader)
    await asyncio.wait_for(shutdown, 1.0)
    assert time.monotonic() - started < 1.0  # returned once the last request was done, not at the grace


async def test_server_shutdown_cuts_requests_still_running_after_grace(
    serve: StartServer, open_raw: OpenRaw
) -> None:
    cancelled = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await serve(handler)
    reader, writer = await open_raw(server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await server.shutdown(grace_s=0.2)
    assert 0.15 < time.monotonic() - started < 1.0
    await expect_eof(reader)
    await asyncio.wait_for(cancelled.wait(), 1.0)


# --- through the gateway ------------------------------------------------------------------------


@pytest.mark.parametrize("replay_buffer_bytes", [1 << 20, 16])
async def test_gateway_raw_chunked_request_body_reaches_upstream_intact(
    start_mock: StartMock, start_gateway: StartGateway, replay_buffer_bytes: int, open_raw: OpenRaw
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec, retry={"replay_buffer_bytes": replay_buffer_bytes})
    parts = [b"x", b"0123456789abcdef" * 3, bytes(range(256)), b"tail"]
    chunked = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    reader, writer = await open_raw(gw.server.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(chunked), 7):  # in small pieces: chunk boundaries fall anywhere
        writer.write(chunked[i : i + 7])
        await writer.drain()
    resp = await read_response(reader)
    echo_body = orjson.loads(resp.body)
    whole = b"".join(parts)
    assert echo_body["body_length"] == len(whole)
    assert echo_body["body_sha256"] == hashlib.sha256(whole).hexdigest()
    assert a.stats.last_body == whole


async def test_gateway_small_chunked_body_is_replayed_on_retry(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=503)
    good = await start_mock("good")
    gw = await start_gateway(bad.spec, good.spec, strategy="priority")
    body = bytes(range(256)) * 8

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 300):
            yield body[i : i + 300]

    resp = await gw.client.post("/echo", data=chunks())
    assert resp.status == 200
    assert resp.headers["X-Gateway-Attempts"] == "2"
    assert bad.stats.last_body == body
    assert good.stats.last_body == body


async def test_gateway_streams_2mib_body_beyond_replay_limit_intact(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    async def digest(request: web.Request) -> web.Response:
        sha = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            sha.update(chunk)
            size += len(chunk)
        framing = request.headers.get("Content-Length"), request.headers.get("Transfer-Encoding")
        return web.json_response({"length": size, "sha256": sha.hexdigest(), "framing": framing})

    app = web.Application()
    app.router.add_post("/digest", digest)
    server = await aiohttp_server(app)
    gw = await start_gateway(gateway_spec(str(server.make_url(""))), retry={"replay_buffer_bytes": 64 * 1024})
    body = hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024 // 32)
    resp = await gw.client.post("/digest", data=io.BytesIO(body))
    seen = await resp.json()
    assert seen == {
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "framing": [str(len(body)), None],
    }


async def test_gateway_slow_reader_backpressure_reaches_upstream(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    total = 48 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB
    sent = 0

    async def script(conn: RawConnection) -> None:
        nonlocal sent
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        await conn.next_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while sent < total:
            conn.writer.write(piece)
            await conn.writer.drain()
            sent += len(piece)

    up = await start_raw(script)
    gw = await start_gateway(gateway_spec(up.url))
    reader, writer = await open_raw(gw.server.port, rcvbuf=64 * 1024)
    writer.write(b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n")
    # The client reads nothing more. Unchecked, the whole body would be through in well under
    # 0.3 s; with backpressure the upstream is held up once the buffers on the way are full.
    await asyncio.sleep(0.3)
    held_at = sent
    await asyncio.sleep(0.2)
    assert 0 < held_at < total // 3, held_at
    assert sent - held_at < 1024 * 1024, (held_at, sent)
    # Reading resumes the flow, and every byte arrives in order.
    resp = await read_response(reader)
    assert len(resp.body) == total
    assert resp.body == piece * (total // len(piece))


async def test_gateway_client_disconnect_mid_body_closes_upstream_connection(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    upstream_saw_close = asyncio.Event()

    async def script(conn: RawConnection) -> None:
        await conn.next_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await conn.writer.drain()
        if await asyncio.wait_for(conn.reader.read(), 5) == b"":
            upstream_saw_close.set()

    up = await start_raw(script)
    gw = await start_gateway(gateway_spec(up.url))
    reader, writer = await open_raw(gw.server.port)
    writer.write(b"GET /long HTTP/1.1\r\nHost: gw\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(1000) == b"x" * 1000
    writer.close()
    await asyncio.wait_for(upstream_saw_close.wait(), 2)
    assert gw.sample("gateway_client_disconnects_total") == 1


async def test_gateway_many_requests_on_one_client_connection(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    reader, writer = await open_raw(gw.server.port)
    for i in range(30):
        method = (b"GET", b"POST", b"HEAD")[i % 3]
        body = b"b%d" % i if method == b"POST" else b""
        writer.write(
            b"%b /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%b" % (method, len(body), body)
        )
        resp = await read_response(reader, head=method == b"HEAD")
        assert resp.status == 200
        if method != b"HEAD":
            assert orjson.loads(resp.body)["body_length"] == len(body)
    assert len(gw.server.connections) == 1
    assert a.stats.requests == 30


async def test_gateway_shutdown_lets_inflight_proxied_request_finish(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    a = await start_mock("a", latency_s=0.3)
    gw = await start_gateway(a.spec)
    reader, writer = await open_raw(gw.server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}")
    await asyncio.sleep(0.05)
    shutdown = asyncio.create_task(gw.server.shutdown(grace_s=2.0))
    resp = await read_response(reader)
    assert resp.status == 200
    assert resp.header(b"connection") == b"close"
    assert orjson.loads(resp.body)["object"] == "chat.completion"
    await asyncio.wait_for(shutdown, 1.0)
    await expect_eof(reader)


async def test_gateway_expect_100_continue_is_not_forwarded(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    async def script(conn: RawConnection) -> None:
        request = await conn.next_request()
        assert request is not None
        conn.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(request.body), request.body)
        )
        await conn.writer.drain()

    up = await start_raw(script)
    gw = await start_gateway(gateway_spec(up.url))
    reader, writer = await open_raw(gw.server.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert (await read_response(reader)).status == 100
    writer.write(b"data")
    final = await read_response(reader)
    assert (final.status, final.body) == (200, b"data")
    assert up.requests[0].header(b"expect") is None
