"""The upstream HTTP/1.1 client, exercised through a real gateway against real loopback upstreams.

Upstreams are raw asyncio servers running a script where the test needs bytes no well-behaved
server sends (keep-alive races, interim responses, garbage, stalls), and aiohttp apps otherwise.
Outcomes are checked on the gateway's own metrics: a keep-alive the upstream closed is a normal
event and must never count as an upstream failure.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import RunningGateway, StartGateway
from tests.gateway.raw_http import (
    OpenRaw,
    RawConnection,
    RawUpstream,
    StartRaw,
    keepalive_script,
    read_response,
    response,
)


def spec(up: RawUpstream | str, **extra: Any) -> dict[str, Any]:
    """Settings of upstream "u" at `up`, without active health checks."""
    url = up if isinstance(up, str) else up.url
    return {"name": "u", "url": url, "health_path": None, **extra}


def outcomes(gw: RunningGateway) -> dict[str, float]:
    """Non-zero upstream attempt counts of upstream "u" by outcome."""
    counts = {}
    for outcome in ("success", "reset", "timeout", "connect_error", "server_error", "rate_limited"):
        value = gw.sample("gateway_upstream_requests_total", {"upstream": "u", "outcome": outcome})
        if value:
            counts[outcome] = value
    return counts


# --- connection reuse and the keep-alive race -----------------------------------------------------


async def test_client_reuses_one_upstream_connection_for_sequential_requests(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    up = await start_raw(keepalive_script())
    gw = await start_gateway(spec(up))
    for i in range(20):
        if i % 2:
            resp = await gw.client.post("/v1/x", data=b"body %d" % i)
        else:
            resp = await gw.client.get("/v1/x")
        assert resp.status == 200
        assert await resp.read() == b"ok"
    assert up.accepted == 1
    assert len(up.requests) == 20
    assert outcomes(gw) == {"success": 20}


async def test_client_reuses_the_newest_idle_connection_first(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    both_arrived = asyncio.Event()
    release_second = asyncio.Event()
    served_by: list[int] = []
    open_now = 0

    async def script(conn: RawConnection) -> None:
        nonlocal open_now
        while await conn.next_request() is not None:
            if conn.index <= 2 and len(served_by) < 2:
                # Hold the first two requests so they need two connections, then answer
                # connection 1 before connection 2: connection 2 goes back to the pool last.
                open_now += 1
                if open_now == 2:
                    both_arrived.set()
                await both_arrived.wait()
                if conn.index == 2:
                    await release_second.wait()
            served_by.append(conn.index)
            conn.writer.write(response())
            await conn.writer.drain()
            if conn.index == 1:
                release_second.set()

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    first = await asyncio.gather(gw.client.get("/a"), gw.client.get("/b"))
    assert [r.status for r in first] == [200, 200]
    assert served_by == [1, 2]
    for _ in range(5):
        assert (await gw.client.get("/c")).status == 200
    assert served_by[2:] == [2] * 5
    assert up.accepted == 2


async def test_client_opens_new_connection_after_keepalive_expiry(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    up = await start_raw(keepalive_script())
    gw = await start_gateway(spec(up), upstream_keepalive_s=0.2)
    assert (await gw.client.get("/1")).status == 200
    assert (await gw.client.get("/2")).status == 200
    assert up.accepted == 1
    await asyncio.sleep(0.3)
    assert (await gw.client.get("/3")).status == 200
    assert up.accepted == 2
    assert outcomes(gw) == {"success": 3}


async def test_client_connection_close_responses_cause_no_errors(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.next_request()
        conn.writer.write(response(200, b"bye", b"Connection: close"))
        await conn.writer.drain()
        # and the connection closes as the script ends

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    for _ in range(20):
        resp = await gw.client.post("/v1/x", data=b"{}")
        assert resp.status == 200
        assert await resp.read() == b"bye"
    assert up.accepted == 20
    assert outcomes(gw) == {"success": 20}


async def test_client_upstream_closing_idle_connections_early_causes_no_errors(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    async def script(conn: RawConnection) -> None:
        # A server whose keep-alive (50 ms) is far shorter than the gateway's (4 s).
        while True:
            try:
                request = await asyncio.wait_for(conn.next_request(), 0.05)
            except TimeoutError:
                return
            if request is None:
                return
            conn.writer.write(response())
            await conn.writer.drain()

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    for i in range(6):
        assert (await gw.client.post("/v1/x", data=b"%d" % i)).status == 200
        await asyncio.sleep(0.08)
    assert up.accepted >= 6  # a closed connection is never reused
    assert outcomes(gw) == {"success": 6}


@pytest.mark.parametrize(("close", "method"), [("fin", "POST"), ("rst", "POST"), ("fin", "PUT")])
async def test_client_keepalive_race_resends_on_fresh_connection(
    start_raw: StartRaw, start_gateway: StartGateway, close: str, method: str
) -> None:
    async def script(conn: RawConnection) -> None:
        await keepalive_script(max_requests=1)(conn)
        if conn.index == 1:
            # The next request arrives on the kept-alive connection just as the server gives up
            # on it: it is read, never answered, and the socket goes away.
            await conn.next_request()
            if close == "rst":
                sock = conn.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        await keepalive_script()(conn)

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    assert (await gw.client.request(method, "/v1/x", data=b"first")).status == 200
    resp = await gw.client.request(method, "/v1/x", data=b"second")
    assert resp.status == 200
    assert await resp.read() == b"ok"
    # Not a retry, and no upstream failure; but a non-idempotent request sent twice takes an
    # attempt, so a POST never runs more than retry.max_attempts times.
    assert resp.headers["X-Gateway-Attempts"] == ("2" if method == "POST" else "1")
    assert up.accepted == 2
    assert [r.body for r in up.requests] == [b"first", b"second", b"second"]
    assert outcomes(gw) == {"success": 2}


async def test_client_keepalive_race_never_resends_a_streamed_body(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    async def script(conn: RawConnection) -> None:
        await keepalive_script(max_requests=1)(conn)
        await conn.next_request()  # read, then closed unanswered

    up = await start_raw(script)
    gw = await start_gateway(spec(up), retry={"replay_buffer_bytes": 16})
    assert (await gw.client.post("/v1/x", data=b"{}")).status == 200
    resp = await gw.client.post("/v1/x", data=b"a body too large to replay")
    # The body was consumed by the first send and cannot be sent twice: an honest 502.
    assert resp.status == 502
    assert (await resp.json())["error"]["type"] == "upstream_unavailable"
    assert [r.body for r in up.requests] == [b"{}", b"a body too large to replay"]
    assert gw.sample("gateway_retries_skipped_total", {"reason": "body_not_replayable"}) == 1


# --- response framing -------------------------------------------------------------------------------


async def test_client_head_with_content_length_then_next_request_on_same_connection(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    async def script(conn: RawConnection) -> None:
        while (request := await conn.next_request()) is not None:
            if request.start_line.startswith(b"HEAD "):
                conn.writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n')
            else:
                conn.writer.write(response(200, b"after head"))
            await conn.writer.drain()

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    reader, writer = await open_raw(gw.server.port)
    writer.write(b"HEAD /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    head = await read_response(reader, head=True)
    assert head.status == 200
    assert head.header(b"content-length") == b"1234"
    assert head.header(b"etag") == b'"v1"'
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    after = await asyncio.wait_for(read_response(reader), 2)
    assert (after.status, after.body) == (200, b"after head")
    assert outcomes(gw) == {"success": 2}


async def test_client_passes_204_and_304_through_without_bodies(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    answers = {
        b"/204": b"HTTP/1.1 204 No Content\r\nX-Kind: empty\r\n\r\n",
        # A 304 may state the representation's length; no body follows it.
        b"/304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n',
        b"/ok": response(200, b"fine"),
    }

    async def script(conn: RawConnection) -> None:
        while (request := await conn.next_request()) is not None:
            conn.writer.write(answers[request.target])
            await conn.writer.drain()

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    reader, writer = await open_raw(gw.server.port)
    for _ in range(2):
        writer.write(b"GET /204 HTTP/1.1\r\nHost: gw\r\n\r\n")
        no_content = await read_response(reader)
        assert no_content.status == 204
        assert no_content.header(b"x-kind") == b"empty"
        assert no_content.header(b"transfer-encoding") is None
        assert no_content.header(b"content-length") is None
        writer.write(b'GET /304 HTTP/1.1\r\nHost: gw\r\nIf-None-Match: "v1"\r\n\r\n')
        not_modified = await read_response(reader)
        assert not_modified.status == 304
        assert not_modified.header(b"etag") == b'"v1"'
        assert not_modified.header(b"transfer-encoding") is None
        # Nothing stray follows on the connection: the next response parses cleanly.
        writer.write(b"GET /ok HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert (await read_response(reader)).body == b"fine"
    assert up.accepted == 1
    assert outcomes(gw) == {"success": 6}


@pytest.mark.parametrize("client_version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_client_close_delimited_body_arrives_complete(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw, client_version: bytes
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB

    async def script(conn: RawConnection) -> None:
        await conn.next_request()
        conn.writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(body), 100_000):
            conn.writer.write(body[i : i + 100_000])
            await conn.writer.drain()
        # The end of the connection is the end of the body.

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    reader, writer = await open_raw(gw.server.port)
    writer.write(b"GET /blob %b\r\nHost: gw\r\n\r\n" % client_version)
    resp = await read_response(reader)
    assert resp.status == 200
    assert resp.body == body
    if client_version == b"HTTP/1.1":
        assert resp.header(b"transfer-encoding") == b"chunked"
        writer.write(b"GET /blob HTTP/1.1\r\nHost: gw\r\n\r\n")  # and the client connection lives on
        assert (await read_response(reader)).body == body
    else:
        assert resp.header(b"connection") == b"close"
    assert gw.sample("gateway_stream_aborts_total", {"upstream": "u"}) == 0
    assert outcomes(gw) == {"success": up.accepted}


@pytest.mark.parametrize("split", [False, True])
async def test_client_skips_interim_responses(
    start_raw: StartRaw, start_gateway: StartGateway, split: bool
) -> None:
    parts = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        response(200, b"final", b"X-Final: 1"),
    ]

    async def script(conn: RawConnection) -> None:
        while await conn.next_request() is not None:
            for part in parts if split else [b"".join(parts)]:
                conn.writer.write(part)
                await conn.writer.drain()
                if split:
                    await asyncio.sleep(0.01)

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    for _ in range(2):  # and the connection is still in step for the next request
        resp = await gw.client.post("/v1/x", data=b"{}")
        assert resp.status == 200
        assert resp.headers["X-Final"] == "1"
        assert "Link" not in resp.headers
        assert await resp.read() == b"final"
    assert up.accepted == 1


@pytest.mark.parametrize(
    "garbage",
    [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"],
)
async def test_client_malformed_upstream_response_is_502_and_counted_as_reset(
    start_raw: StartRaw, start_gateway: StartGateway, garbage: bytes
) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.next_request()
        conn.writer.write(garbage)
        await conn.writer.drain()
        await conn.reader.read()  # until the gateway hangs up

    up = await start_raw(script)
    gw = await start_gateway(spec(up), retry={"max_attempts": 1})
    resp = await gw.client.post("/v1/x", data=b"{}")
    assert resp.status == 502
    assert resp.headers["Content-Type"] == "application/json"
    error = (await resp.json())["error"]
    assert error["type"] == "upstream_unavailable"
    assert "reset" in error["message"]
    assert outcomes(gw) == {"reset": 1}


async def test_client_malformed_chunked_body_truncates_response(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.next_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await conn.writer.drain()
        await asyncio.sleep(0.05)
        conn.writer.write(b"zz\r\nnot a chunk\r\n")
        await conn.reader.read()

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    resp = await gw.client.get("/v1/x")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert gw.sample("gateway_stream_aborts_total", {"upstream": "u"}) == 1


@pytest.mark.parametrize(
    "trailing", [b"GARBAGE", b"HT", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstale"]
)
async def test_client_bytes_after_a_response_never_reach_the_next_request(
    start_raw: StartRaw, start_gateway: StartGateway, trailing: bytes
) -> None:
    async def script(conn: RawConnection) -> None:
        served = 0
        while await conn.next_request() is not None:
            served += 1
            # The first answer on each connection carries bytes nobody asked for, in the same write.
            conn.writer.write(response(200, b"n%d" % served) + (trailing if served == 1 else b""))
            await conn.writer.drain()

    up = await start_raw(script)
    gw = await start_gateway(spec(up), timeouts={"attempt_s": 1.0}, retry={"max_attempts": 1})
    first = await gw.client.get("/1")
    assert await first.read() == b"n1"
    second = await gw.client.get("/2")
    assert second.status == 200
    assert await second.read() == b"n1"  # from a fresh connection: the spoiled one was dropped
    assert up.accepted == 2
    assert outcomes(gw) == {"success": 2}


# --- timeouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", [b"Content-Length: 100000", b"Transfer-Encoding: chunked"])
async def test_client_idle_timeout_mid_body_truncates_non_sse_stream(
    start_raw: StartRaw, start_gateway: StartGateway, framing: bytes
) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.next_request()
        first = b"10\r\n" + b"x" * 16 + b"\r\n" if b"chunked" in framing else b"x" * 16
        conn.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%b\r\n\r\n%b" % (framing, first)
        )
        await conn.writer.drain()
        await conn.reader.read()  # stall until the gateway gives up

    up = await start_raw(script)
    gw = await start_gateway(spec(up), timeouts={"idle_s": 0.2})
    started = time.monotonic()
    resp = await gw.client.get("/v1/x")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert 0.15 < time.monotonic() - started < 1.5
    assert gw.sample("gateway_stream_aborts_total", {"upstream": "u"}) == 1


async def test_client_attempt_timeout_on_partial_headers_is_504(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.next_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-")  # and then nothing
        await conn.writer.drain()
        await conn.reader.read()

    up = await start_raw(script)
    gw = await start_gateway(spec(up), timeouts={"attempt_s": 0.2}, retry={"max_attempts": 1})
    started = time.monotonic()
    resp = await gw.client.get("/v1/x")
    assert resp.status == 504
    assert (await resp.json())["error"]["type"] == "upstream_timeout"
    assert 0.15 < time.monotonic() - started < 1.5
    assert outcomes(gw) == {"timeout": 1}


# --- what the upstream receives ----------------------------------------------------------------------


async def test_client_request_line_carries_prefix_and_host_on_the_wire(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    up = await start_raw(keepalive_script())
    gw = await start_gateway(spec(up.url + "/prefix/"))
    assert (await gw.client.get("/v1/models?x=1&y=%20")).status == 200
    assert (await gw.client.get("/")).status == 200
    first, second = up.requests
    assert first.start_line == b"GET /prefix/v1/models?x=1&y=%20 HTTP/1.1"
    assert second.start_line == b"GET /prefix/ HTTP/1.1"
    assert first.header(b"host") == up.url.removeprefix("http://").encode()


async def test_client_static_headers_replace_client_fields_of_the_same_name(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    up = await start_raw(keepalive_script())
    static = {"Authorization": "Bearer upstream-key", "X-Forwarded-For": "static", "X-Tenant": "t1"}
    gw = await start_gateway(spec(up, headers=static))
    resp = await gw.client.get(
        "/v1/x",
        headers={"authorization": "Bearer client", "X-Forwarded-For": "203.0.113.9", "X-Other": "kept"},
    )
    assert resp.status == 200
    sent = up.requests[0]
    assert sent.values(b"authorization") == [b"Bearer upstream-key"]
    assert sent.values(b"x-forwarded-for") == [b"static"]
    assert sent.values(b"x-tenant") == [b"t1"]
    assert sent.values(b"x-other") == [b"kept"]


@pytest.mark.parametrize("replay_buffer_bytes", [1 << 20, 1024])
async def test_client_frames_streamed_request_bodies_as_the_size_allows(
    start_raw: StartRaw, start_gateway: StartGateway, replay_buffer_bytes: int
) -> None:
    up = await start_raw(keepalive_script())
    gw = await start_gateway(spec(up), retry={"replay_buffer_bytes": replay_buffer_bytes})
    chunks = [bytes([i]) * 1000 for i in range(8)]

    async def gen() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    assert (await gw.client.post("/v1/x", data=gen())).status == 200
    sent = up.requests[0]
    assert sent.body == b"".join(chunks)
    if replay_buffer_bytes > 8000:
        # Buffered whole for replay, so its length is known.
        assert sent.header(b"content-length") == b"8000"
        assert sent.header(b"transfer-encoding") is None
    else:
        assert sent.header(b"transfer-encoding") == b"chunked"
        assert sent.header(b"content-length") is None


async def test_client_unasked_101_switching_protocols_is_502(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.next_request()
        conn.writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81"
        )
        await conn.writer.drain()
        await conn.reader.read()

    up = await start_raw(script)
    gw = await start_gateway(spec(up), retry={"max_attempts": 1})
    reader, writer = await open_raw(gw.server.port)
    # The gateway drops Upgrade (hop-by-hop), so the upstream switching protocols is a broken answer.
    writer.write(b"GET /v1/x HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 502
    assert orjson.loads(resp.body)["error"]["type"] == "upstream_unavailable"
    assert outcomes(gw) == {"reset": 1}
