"""Attacks and careless clients on the data path, each reproduced on loopback and now refused.

Each test here failed on the gateway before the hardening issue: trailers crossing clients,
unbounded partial headers, slow clients holding connections, a connection cap, client deadlines
ejecting upstreams, leaked replay reservations, path traversal past the prefix, unbounded
upstream headers, repeated execution of a POST, and framing named in Connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import StartGateway, StartMock
from tests.gateway.raw_http import (
    OpenRaw,
    RawConnection,
    RawUpstream,
    StartRaw,
    expect_eof,
    read_response,
    response,
)


def spec(up: RawUpstream | str, name: str = "u", **extra: Any) -> dict[str, Any]:
    """Settings of one upstream at `up`, without active health checks."""
    url = up if isinstance(up, str) else up.url
    return {"name": name, "url": url, "health_path": None, **extra}


def chunked_response(body: bytes, *trailers: bytes, extra: bytes = b"") -> bytes:
    """A chunked 200 response whose body is followed by trailer fields."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n" + extra
    tail = b"".join(t + b"\r\n" for t in trailers)
    return head + b"\r\n" + b"%x\r\n%b\r\n0\r\n" % (len(body), body) + tail + b"\r\n"


# --- 1. trailers ---------------------------------------------------------------------------------


async def test_upstream_trailers_never_become_headers_of_any_response(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    answers = [
        chunked_response(b"first", b"Set-Cookie: session=victim", b"Content-Type: text/evil"),
        response(200, b"second", b"Content-Type: application/json"),
    ]

    async def script(conn: RawConnection) -> None:
        for answer in answers:
            if await conn.next_request() is None:
                return
            conn.writer.write(answer)
            await conn.writer.drain()

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    first = await gw.client.get("/a")
    assert await first.read() == b"first"
    assert "Set-Cookie" not in first.headers
    second = await gw.client.get("/b")
    assert await second.read() == b"second"
    assert up.accepted == 1  # the same pooled connection carried both
    assert "Set-Cookie" not in second.headers
    assert second.headers["Content-Type"] == "application/json"


async def test_request_trailers_are_not_forwarded_as_headers(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    async def script(conn: RawConnection) -> None:
        while await conn.next_request() is not None:
            conn.writer.write(response())
            await conn.writer.drain()

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    reader, writer = await open_raw(gw.server.port)
    writer.write(
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nAuthorization: Bearer stolen\r\nX-Injected: 1\r\n\r\n"
    )
    assert (await read_response(reader)).status == 200
    (seen,) = up.requests
    assert seen.body == b"hello"
    assert seen.values(b"authorization") == []
    assert seen.values(b"x-injected") == []


# --- 3. header fields that never end -------------------------------------------------------------


@pytest.mark.parametrize("where", ["name", "value", "target"])
async def test_header_bytes_without_line_end_get_431(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw, where: str
) -> None:
    up = await start_mock("a")
    gw = await start_gateway(up.spec, max_header_bytes=8192)
    reader, writer = await open_raw(gw.server.port)
    start = {
        "name": b"GET / HTTP/1.1\r\nHost: x\r\nX-",
        "value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: ",
        "target": b"GET /",
    }[where]
    writer.write(start)
    for _ in range(40):  # 40 x 4 KiB, far past the limit, never a line end
        writer.write(b"a" * 4096)
        await writer.drain()
        await asyncio.sleep(0.005)
    resp = await read_response(reader)
    assert resp.status == 431
    await expect_eof(reader)


# --- 4. slow clients -----------------------------------------------------------------------------


async def test_headers_sent_a_byte_at_a_time_time_out_with_408(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    up = await start_mock("a")
    gw = await start_gateway(up.spec, client_header_timeout_s=0.4)
    reader, writer = await open_raw(gw.server.port)
    started = time.monotonic()

    async def trickle() -> None:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 100:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(trickle())
    try:
        resp = await read_response(reader)
    finally:
        task.cancel()
    assert resp.status == 408
    assert orjson.loads(resp.body)["error"]["type"] == "request_timeout"
    assert 0.35 < time.monotonic() - started < 1.5


async def test_declared_body_that_never_arrives_times_out_with_408(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    up = await start_mock("a")
    gw = await start_gateway(up.spec, client_body_timeout_s=0.4)
    reader, writer = await open_raw(gw.server.port)
    writer.write(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"a"')
    resp = await read_response(reader)
    assert resp.status == 408
    assert up.stats.requests == 0  # nothing half-sent went upstream
    await expect_eof(reader)


async def test_slow_but_steady_upload_is_not_cut(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    up = await start_mock("a")
    gw = await start_gateway(up.spec, client_body_timeout_s=0.4)
    reader, writer = await open_raw(gw.server.port)
    body = b'{"model": "m", "messages": []}'
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 4):  # 0.2 s gaps, 1.5 s in all: slow, never silent for 0.4 s
        writer.write(body[i : i + 4])
        await asyncio.sleep(0.2)
    resp = await read_response(reader)
    assert resp.status == 200


# --- 5. the connection cap -----------------------------------------------------------------------


async def test_idle_keepalive_connections_make_room_for_new_clients(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    up = await start_mock("a")
    gw = await start_gateway(up.spec, max_connections=5)
    idle = []
    for _ in range(5):
        reader, writer = await open_raw(gw.server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).status == 200
        idle.append(reader)
    for _ in range(20):  # many more clients than the cap, each served
        resp = await gw.client.get("/health")
        assert resp.status == 200
        await resp.read()
    await expect_eof(idle[0])  # the oldest idle connection went first
    assert (await gw.admin.get("/healthz")).status == 200


async def test_over_the_cap_with_every_connection_busy_answers_503(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    up = await start_mock("a", latency_s=1.0)
    gw = await start_gateway(up.spec, max_connections=3)
    busy = []
    for _ in range(3):
        reader, writer = await open_raw(gw.server.port)
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        writer.write(body)
        busy.append(reader)
    await asyncio.sleep(0.1)
    reader, writer = await open_raw(gw.server.port)
    resp = await read_response(reader)
    assert resp.status == 503
    assert orjson.loads(resp.body)["error"]["type"] == "too_many_connections"
    for r in busy:
        assert (await read_response(r)).status == 200  # those already served are unharmed


# --- 6. a client's deadline is the client's business ---------------------------------------------


async def test_client_deadline_never_ejects_or_teaches_latency(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", latency_s=0.05)
    b = await start_mock("b", latency_s=0.05)
    gw = await start_gateway(a.spec, b.spec)
    before = {n: gw.state.pool.by_name[n].latency_s for n in "ab"}
    for _ in range(6):
        resp = await gw.client.post(
            "/v1/chat/completions", json={}, headers={"X-Gateway-Timeout": "0.000001"}
        )
        assert resp.status == 504
        assert (await resp.json())["error"]["type"] == "deadline_exceeded"
    now = gw.state.clock()
    for name in "ab":
        up = gw.state.pool.by_name[name]
        assert up.health.routable(now)
        assert up.health.consecutive_failures == 0
        assert not up.measured  # no sample taken: the estimate is still the start-up prior
        assert up.latency_s <= before[name]
    assert (await gw.admin.get("/readyz")).status == 200
    assert (
        gw.sample("gateway_upstream_ejections_total", {"upstream": "a", "reason": "consecutive_failures"})
        == 0
    )


# --- 7. replay reservations ----------------------------------------------------------------------


async def test_aborted_uploads_return_their_replay_reservation(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=503)
    good = await start_mock("good")
    gw = await start_gateway(
        bad.spec,
        good.spec,
        strategy="priority",
        retry={"replay_buffer_bytes": 64 * 1024, "total_replay_buffer_bytes": 256 * 1024},
    )
    for _ in range(16):  # header-only chunked uploads, then the client goes away
        reader, writer = await open_raw(gw.server.port)
        writer.write(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.close()
    await asyncio.sleep(0.2)
    assert gw.state.proxy._buffers.in_use == 0
    resp = await gw.client.post("/v1/chat/completions", data=b'{"model": "m"}')
    assert resp.status == 200  # replayed onto the good upstream: failover still works
    assert resp.headers["X-Gateway-Upstream"] == "good"


async def test_slow_uploads_hold_only_what_they_sent_of_the_replay_cap(
    start_mock: StartMock, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=503)
    good = await start_mock("good")
    gw = await start_gateway(
        bad.spec,
        good.spec,
        strategy="priority",
        retry={"replay_buffer_bytes": 64 * 1024, "total_replay_buffer_bytes": 256 * 1024},
    )
    writers = []
    for _ in range(32):  # each declares 60 KiB and sends 10 bytes of it
        reader, writer = await open_raw(gw.server.port)
        writer.write(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 61440\r\n\r\n0123456789")
        writers.append(writer)
    await asyncio.sleep(0.2)
    assert gw.state.proxy._buffers.in_use == 32 * 10
    resp = await gw.client.post("/v1/chat/completions", data=b'{"model": "m"}')
    assert resp.status == 200
    assert resp.headers["X-Gateway-Upstream"] == "good"


# --- 9. the upstream's path prefix cannot be left ------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"/../admin",
        b"/v1/../../admin",
        b"/v1/%2e%2e/%2E%2E/admin",
        b"/v1/..%2f..%2fadmin",
        b"/v1/.%2E/x?q=1",
        b"/v1/..%5cadmin",
    ],
)
async def test_dot_dot_segments_are_refused_before_any_upstream(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw, path: bytes
) -> None:
    async def script(conn: RawConnection) -> None:
        while await conn.next_request() is not None:
            conn.writer.write(response())

    up = await start_raw(script)
    gw = await start_gateway(spec(f"{up.url}/openai"))
    reader, writer = await open_raw(gw.server.port)
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 400
    assert up.requests == []


async def test_dots_that_do_not_leave_the_prefix_pass(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    async def script(conn: RawConnection) -> None:
        while await conn.next_request() is not None:
            conn.writer.write(response())

    up = await start_raw(script)
    gw = await start_gateway(spec(f"{up.url}/openai"))
    for path in ("/v1/models/llama-3.1-8b", "/v1/files/a..b", "/v1/x?next=../y"):
        assert (await gw.client.get(path)).status == 200
    assert [r.target for r in up.requests] == [
        b"/openai/v1/models/llama-3.1-8b",
        b"/openai/v1/files/a..b",
        b"/openai/v1/x?next=../y",
    ]


# --- 10. upstream header size --------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["many", "endless"])
async def test_oversized_upstream_headers_fail_the_attempt(
    start_raw: StartRaw, start_gateway: StartGateway, shape: str
) -> None:
    async def huge(conn: RawConnection) -> None:
        await conn.next_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(200):  # 200 x 4 KiB
            if shape == "many":
                conn.writer.write(b"X-H%d: %b\r\n" % (i, b"v" * 4090))
            else:
                conn.writer.write(b"X-Endless: " if i == 0 else b"v" * 4096)
            await conn.writer.drain()
        await asyncio.sleep(30)  # and never finishes the head

    async def good(conn: RawConnection) -> None:
        while await conn.next_request() is not None:
            conn.writer.write(response(200, b"fine"))

    bad_up = await start_raw(huge)
    good_up = await start_raw(good)
    gw = await start_gateway(spec(bad_up, "bad"), spec(good_up, "good"), strategy="priority")
    started = time.monotonic()
    resp = await gw.client.get("/v1/x")
    assert time.monotonic() - started < 3  # failed at the limit, not when the upstream gave up
    assert resp.status == 200
    assert await resp.read() == b"fine"
    assert gw.sample("gateway_upstream_requests_total", {"upstream": "bad", "outcome": "reset"}) == 1


# --- 11. a POST runs at most retry.max_attempts times --------------------------------------------


async def test_post_runs_at_most_max_attempts_times_even_with_keepalive_resends(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    working = True

    async def script(conn: RawConnection) -> None:
        # While warming up, answer; afterwards "do the work" and drop the connection unanswered,
        # on pooled and new connections alike.
        while await conn.next_request() is not None:
            if not working:
                return
            conn.writer.write(response())
            await conn.writer.drain()

    up = await start_raw(script)
    gw = await start_gateway(spec(up), retry={"max_attempts": 3}, outlier={"consecutive_failures": 100})
    # Three kept-alive connections in the pool, each about to drop the next request it gets.
    warm = await asyncio.gather(*(gw.client.post("/warm", data=b"w") for _ in range(3)))
    assert all(r.status == 200 for r in warm)
    working = False
    up.requests.clear()
    resp = await gw.client.post("/v1/charge-card", data=b"once please")
    assert resp.status == 502
    assert len(up.requests) == 3  # retry.max_attempts, keep-alive resends included
    assert resp.headers["X-Gateway-Attempts"] == "3"


async def test_late_reset_of_a_reused_connection_is_not_resent(
    start_raw: StartRaw, start_gateway: StartGateway
) -> None:
    async def script(conn: RawConnection) -> None:
        if await conn.next_request() is None:
            return
        conn.writer.write(response())
        await conn.writer.drain()
        if await conn.next_request() is None:
            return
        await asyncio.sleep(0.5)  # worked on it for a while, then crashed: not a keep-alive race

    up = await start_raw(script)
    gw = await start_gateway(spec(up), retry={"max_attempts": 1})
    assert (await gw.client.get("/warm")).status == 200
    up.requests.clear()
    resp = await gw.client.get("/v1/x")
    assert resp.status == 502
    assert len(up.requests) == 1


# --- 12. framing is never hop-by-hop -------------------------------------------------------------


async def test_connection_naming_content_length_keeps_the_body(
    start_raw: StartRaw, start_gateway: StartGateway, open_raw: OpenRaw
) -> None:
    async def script(conn: RawConnection) -> None:
        while await conn.next_request() is not None:
            conn.writer.write(response())

    up = await start_raw(script)
    gw = await start_gateway(spec(up))
    reader, writer = await open_raw(gw.server.port)
    writer.write(
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nConnection: content-length, transfer-encoding\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    assert (await read_response(reader)).status == 200
    (seen,) = up.requests
    assert seen.body == b"hello"


# --- 8. a hung upstream never drifts to the traffic ----------------------------------------------


async def test_hung_upstream_does_not_draw_traffic_with_the_latency_strategy(
    start_mock: StartMock, start_gateway: StartGateway, chat_body: dict[str, Any]
) -> None:
    """An upstream that accepts requests and never answers (while /health passes) stays avoided.

    Its estimate decays while nothing completes; requests waiting there floor it, and a request
    the client gave up on counts the time it waited.
    """
    hung = await start_mock("hung", hang=True)
    good = await start_mock("good", latency_s=0.01)
    gw = await start_gateway(
        {"name": "hung", "url": hung.url, "health_path": "/health"},
        {"name": "good", "url": good.url, "health_path": "/health"},
        ewma_decay_s=1.0,
        health={"interval_s": 0.2},
    )
    timeout = aiohttp.ClientTimeout(total=0.5)
    windows = []
    for _ in range(4):
        before = hung.stats.requests
        for _ in range(10):
            try:
                async with gw.client.post("/v1/chat/completions", json=chat_body, timeout=timeout) as resp:
                    await resp.read()
            except TimeoutError:
                pass  # this one went to the hung upstream: the client gives up, as clients do
            await asyncio.sleep(0.05)
        windows.append(hung.stats.requests - before)
    assert sum(windows) <= 4, windows
    assert windows[-1] <= 1, windows
