"""Forwarding behaviour through a real gateway to real upstreams on loopback."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import AiohttpServer, StartGateway, StartMock


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_proxy_forwards_each_method_path_query_and_body(
    method: str, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    body = b"x" * 1000 if method not in ("GET", "OPTIONS") else b""
    resp = await gw.client.request(method, "/echo/some/path?q=1&r=%20x", data=body or None)
    assert resp.status == 200
    echo = await resp.json()
    assert echo["method"] == method
    assert echo["path"] == "/echo/some/path"
    assert echo["raw_path"] == "/echo/some/path?q=1&r=%20x"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert resp.headers["X-Gateway-Upstream"] == "a"
    assert resp.headers["X-Gateway-Attempts"] == "1"


async def test_proxy_head_passes_through_without_body(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    resp = await gw.client.head("/v1/models")
    assert resp.status == 200
    assert await resp.read() == b""


async def test_proxy_prepends_upstream_path_prefix(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    gw = await start_gateway({"name": "p", "url": str(server.make_url("/openai/")), "health_path": None})
    resp = await gw.client.post("/v1/chat/completions?api-version=2024", json={})
    assert resp.status == 200
    assert seen == ["/openai/v1/chat/completions?api-version=2024"]


async def test_proxy_chat_completion_json(
    start_mock: StartMock, start_gateway: StartGateway, chat_body: dict[str, Any]
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    resp = await gw.client.post("/v1/chat/completions", json=chat_body)
    assert resp.status == 200
    data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"]


async def test_proxy_strips_hop_by_hop_request_headers_and_adds_forwarding(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    resp = await gw.client.get(
        "/echo",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "X-Forwarded-For": "203.0.113.9",
            "X-Request-ID": "req-123",
            "X-Custom": "kept",
        },
    )
    echo = await resp.json()
    names = {name.lower(): value for name, value in echo["headers"]}
    for hop in ("connection", "x-private", "keep-alive", "te", "proxy-authorization"):
        assert hop not in names, hop
    assert names["x-custom"] == "kept"
    assert names["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert "x-forwarded-host" in names
    assert names["x-request-id"] == "req-123"
    assert names["host"] == a.url.removeprefix("http://")
    assert resp.headers["X-Request-ID"] == "req-123"


async def test_proxy_generates_request_id_when_missing(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    resp = await gw.client.get("/echo")
    echo = await resp.json()
    sent = dict((n.lower(), v) for n, v in echo["headers"])["x-request-id"]
    assert len(sent) == 32
    assert resp.headers["X-Request-ID"] == sent


async def test_proxy_strips_hop_by_hop_response_headers_and_keeps_repeats(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers["Connection"] = "X-Hop"
        resp.headers["X-Hop"] = "1"
        resp.headers["Proxy-Authenticate"] = "Basic"
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        return resp

    app = web.Application()
    app.router.add_get("/x", handler)
    server = await aiohttp_server(app)
    gw = await start_gateway({"name": "u", "url": str(server.make_url("")), "health_path": None})
    resp = await gw.client.get("/x")
    assert await resp.text() == "ok"
    assert "X-Hop" not in resp.headers
    assert "Proxy-Authenticate" not in resp.headers
    assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]


async def test_proxy_sends_static_upstream_headers_with_env_expansion(
    start_mock: StartMock, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PROVIDER_KEY", "sk-test")
    a = await start_mock("a")
    gw = await start_gateway(
        {"name": "a", "url": a.url, "headers": {"Authorization": "Bearer ${TEST_PROVIDER_KEY}"}}
    )
    resp = await gw.client.get("/echo", headers={"Authorization": "Bearer client"})
    names = dict((n.lower(), v) for n, v in (await resp.json())["headers"])
    assert names["authorization"] == "Bearer sk-test"


async def test_proxy_passes_compressed_bodies_through_unchanged(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    import gzip

    payload = gzip.compress(b'{"hello": "world"}' * 100)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=payload, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/z", handler)
    server = await aiohttp_server(app)
    gw = await start_gateway({"name": "u", "url": str(server.make_url("")), "health_path": None})
    resp = await gw.client.get("/z", auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert await resp.read() == payload


async def test_proxy_does_not_follow_redirects(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app.router.add_get("/r", handler)
    server = await aiohttp_server(app)
    gw = await start_gateway({"name": "u", "url": str(server.make_url("")), "health_path": None})
    resp = await gw.client.get("/r", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/elsewhere"


async def test_proxy_streams_large_chunked_upload(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec, retry={"replay_buffer_bytes": 1024})
    chunks = [bytes([i]) * 4096 for i in range(8)]

    async def gen() -> Any:
        for c in chunks:
            yield c

    resp = await gw.client.post("/echo", data=gen())
    echo = await resp.json()
    assert echo["body_length"] == 8 * 4096
    assert echo["body_sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


async def test_proxy_rejects_bad_deadline_header(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    resp = await gw.client.get("/echo", headers={"X-Gateway-Timeout": "soon"})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request"
    assert "X-Gateway-Timeout" in err["message"]


async def test_proxy_large_response_arrives_intact(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    blob = bytes(range(256)) * 40_000  # ~10 MB

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=blob)

    app = web.Application()
    app.router.add_get("/big", handler)
    server = await aiohttp_server(app)
    gw = await start_gateway({"name": "u", "url": str(server.make_url("")), "health_path": None})
    resp = await gw.client.get("/big")
    assert resp.headers["Content-Length"] == str(len(blob))
    assert await resp.read() == blob


async def test_proxy_client_disconnect_closes_upstream_request(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    import asyncio

    a = await start_mock("a", hang=True)
    gw = await start_gateway(a.spec)
    with pytest.raises(asyncio.TimeoutError):
        await gw.client.post("/v1/chat/completions", json={}, timeout=aiohttp.ClientTimeout(total=0.3))
    for _ in range(50):
        if a.stats.disconnects:
            break
        await asyncio.sleep(0.05)
    assert a.stats.disconnects == 1
    assert gw.sample("gateway_client_disconnects_total") == 1


async def test_proxy_access_log_is_one_json_line_per_request(
    start_mock: StartMock, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import orjson

    a = await start_mock("a")
    gw = await start_gateway(a.spec, access_log=True)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        resp = await gw.client.get("/echo?x=1", headers={"X-Request-ID": "abc"})
        assert resp.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 1
    entry = orjson.loads(lines[0])
    assert entry["request_id"] == "abc"
    assert entry["upstream"] == "a"
    assert entry["status"] == 200
    assert entry["attempts"] == 1
    assert entry["path"] == "/echo"
    assert entry["duration_s"] >= 0
