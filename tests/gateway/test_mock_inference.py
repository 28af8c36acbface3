"""Tests for the OpenAI-compatible mock inference server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.testing.mock_inference import (
    MOCK_BEHAVIOUR,
    MOCK_STATS,
    MockBehaviour,
    MockStats,
    create_mock_app,
    main,
)

Client = TestClient[web.Request, web.Application]
REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello"}]


async def make_client(
    aiohttp_client: AiohttpClient, behaviour: MockBehaviour | None = None, seed: int | None = None
) -> Client:
    return await aiohttp_client(create_mock_app(behaviour, seed=seed))


def stats_of(client: Client) -> MockStats:
    return client.app[MOCK_STATS]


async def wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(150):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met within 3 s")


async def read_sse(resp: aiohttp.ClientResponse) -> list[bytes]:
    events = []
    async for raw in resp.content:
        line = raw.strip()
        if line:
            assert line.startswith(b"data: ")
            events.append(line[len(b"data: ") :])
    return events


async def test_chat_completion_returns_openai_shape(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(name="up-a", stream_chunks=3))
    payload = {"model": "gpt-x", "messages": MESSAGES}
    resp = await client.post(CHAT, json=payload, headers={"X-Trace": "t1"})
    assert resp.status == 200
    assert resp.headers["X-Mock-Name"] == "up-a"
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-x"
    assert body["id"] and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "token0 token1 token2"}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3
    stats = stats_of(client)
    assert stats.requests == 1 and stats.by_status == {200: 1}
    assert stats.last_headers is not None and stats.last_headers["X-Trace"] == "t1"
    assert stats.last_body is not None and orjson.loads(stats.last_body) == payload


async def test_chat_completion_respects_max_tokens_and_default_model(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(stream_chunks=8))
    resp = await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2})
    body = await resp.json()
    assert body["model"] == "mock-model"
    assert body["choices"][0]["message"]["content"] == "token0 token1"
    assert body["usage"]["completion_tokens"] == 2


async def test_text_completion_returns_text_completion_object(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(stream_chunks=2))
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "token0 token1"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
async def test_chat_completion_rejects_malformed_body(aiohttp_client: AiohttpClient, raw: bytes) -> None:
    client = await make_client(aiohttp_client)
    resp = await client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert stats_of(client).by_status == {400: 1}


async def test_streaming_chat_arrives_incrementally(aiohttp_client: AiohttpClient) -> None:
    behaviour = MockBehaviour(chunk_interval_s=0.2, stream_chunks=5)
    client = await make_client(aiohttp_client, behaviour)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with client.post(CHAT, json={"messages": MESSAGES, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readline()
        first_at = loop.time() - start
        assert first.startswith(b"data: ")
        rest = await read_sse(resp)
    total = loop.time() - start
    assert first_at < 0.4 < 0.7 < total
    events = [first[len(b"data: ") :].strip(), *rest]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "token0 token1 token2 token3 token4"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stamp", [False, True])
async def test_stamp_chunks_adds_monotonic_send_time_only_when_enabled(
    aiohttp_client: AiohttpClient, stamp: bool
) -> None:
    behaviour = MockBehaviour(chunk_interval_s=0.01, stream_chunks=4, stamp_chunks=stamp)
    client = await make_client(aiohttp_client, behaviour)
    before = time.monotonic_ns()
    async with client.post(CHAT, json={"messages": MESSAGES, "stream": True}) as resp:
        events = await read_sse(resp)
    after = time.monotonic_ns()
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 5  # 4 content chunks and the finish chunk
    if not stamp:
        assert all("sent_ns" not in c for c in chunks)
        return
    sent = [c["sent_ns"] for c in chunks]
    assert all(type(ns) is int for ns in sent)
    assert before <= sent[0] and sent[-1] <= after
    # Content chunks are ~10 ms apart (asyncio may wake a clock tick early); the finish chunk follows.
    assert all(b - a >= 9_000_000 for a, b in zip(sent[:3], sent[1:4], strict=True))
    assert sent == sorted(sent)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "token0 token1 token2 token3"


async def test_stamp_chunks_is_settable_through_control(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(stream_chunks=1))
    assert (await client.post("/control", json={"stamp_chunks": True})).status == 200
    async with client.post(CHAT, json={"messages": MESSAGES, "stream": True}) as resp:
        events = await read_sse(resp)
    assert "sent_ns" in orjson.loads(events[0])


async def test_streaming_completion_uses_text_field(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(stream_chunks=3))
    async with client.post("/v1/completions", json={"prompt": "x", "stream": True}) as resp:
        events = await read_sse(resp)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion"] * 4
    assert "".join(c["choices"][0]["text"] for c in chunks) == "token0 token1 token2"


async def test_streaming_client_disconnect_counts_disconnect(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(chunk_interval_s=0.2))
    async with client.post(CHAT, json={"messages": MESSAGES, "stream": True}) as resp:
        await resp.content.readline()
        resp.close()
    stats = stats_of(client)
    await wait_for(lambda: stats.disconnects == 1)


async def test_embeddings_return_deterministic_vectors(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client)
    resp = await client.post("/v1/embeddings", json={"model": "e", "input": ["a", "b", "a"]})
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list" and body["model"] == "e"
    data = body["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in data)
    assert data[0]["embedding"] == data[2]["embedding"] != data[1]["embedding"]
    single = await (await client.post("/v1/embeddings", json={"input": "a"})).json()
    assert single["data"][0]["embedding"] == data[0]["embedding"]
    assert "prompt_tokens" in body["usage"]
    bad = await client.post("/v1/embeddings", json={"input": [1, 2]})
    assert bad.status == 400


async def test_models_lists_mock_model(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(name="owner-x"))
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert body["data"] == [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "owner-x"}]


async def test_health_toggles_with_behaviour(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client)
    resp = await client.get("/health")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    client.app[MOCK_BEHAVIOUR].healthy = False
    assert (await client.get("/health")).status == 503
    client.app[MOCK_BEHAVIOUR].healthy = True
    assert (await client.get("/health")).status == 200
    stats = stats_of(client)
    assert stats.health_checks == 3 and stats.requests == 0 and stats.by_status == {}


async def test_error_rate_one_returns_error_status(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(error_rate=1.0, error_status=502))
    resp = await client.post(CHAT, json={"messages": MESSAGES})
    assert resp.status == 502
    assert resp.headers["X-Mock-Name"] == "mock"
    assert (await resp.json())["error"]["type"] == "server_error"
    stats = stats_of(client)
    assert stats.requests == 1 and stats.by_status == {502: 1}


async def test_rate_limit_returns_429_with_retry_after(aiohttp_client: AiohttpClient) -> None:
    behaviour = MockBehaviour(rate_limit_rate=1.0, retry_after_s=1.2, error_rate=1.0)
    client = await make_client(aiohttp_client, behaviour)
    resp = await client.post(CHAT, json={"messages": MESSAGES})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"
    assert (await resp.json())["error"]["type"] == "rate_limit_error"


async def test_hang_times_out_and_counts_disconnect(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(hang=True))
    with pytest.raises(asyncio.TimeoutError):
        await client.post(CHAT, json={"messages": MESSAGES}, timeout=aiohttp.ClientTimeout(total=0.3))
    stats = stats_of(client)
    await wait_for(lambda: stats.disconnects == 1)
    assert stats.requests == 1 and stats.by_status == {}


async def test_drop_after_chunks_streaming_raises_payload_error(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(drop_after_chunks=2))
    received: list[bytes] = []
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        async with client.post(CHAT, json={"messages": MESSAGES, "stream": True}) as resp:
            async for line in resp.content:
                received.append(line)
    assert len([line for line in received if line.startswith(b"data: ")]) == 2
    assert b"[DONE]" not in b"".join(received)
    stats = stats_of(client)
    assert stats.by_status == {200: 1} and stats.disconnects == 0


async def test_drop_after_chunks_non_streaming_raises_payload_error(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(drop_after_chunks=0))
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        async with client.post(CHAT, json={"messages": MESSAGES}) as resp:
            assert resp.status == 200 and resp.content_length
            await resp.read()
    assert stats_of(client).disconnects == 0


async def test_control_updates_behaviour_and_stats(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client)
    resp = await client.post("/control", json={"error_rate": 1, "error_status": 500})
    assert resp.status == 200
    assert (await resp.json())["error_rate"] == 1.0
    assert client.app[MOCK_BEHAVIOUR].error_status == 500
    assert (await client.post(CHAT, json={"messages": MESSAGES})).status == 500
    current = await (await client.get("/control")).json()
    assert current["error_status"] == 500 and current["drop_after_chunks"] is None
    stats = await (await client.get("/stats")).json()
    assert stats["requests"] == 1 and stats["by_status"] == {"500": 1}
    assert (await client.post("/control/reset-stats")).status == 200
    assert stats_of(client).requests == 0 and stats_of(client).by_status == {}


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"error_rate": 2}, "error_rate"),
        ({"rate_limit_rate": -0.1}, "rate_limit_rate"),
        ({"latency_s": "slow"}, "latency_s"),
        ({"latency_s": -1}, "latency_s"),
        ({"error_status": 700}, "error_status"),
        ({"stream_chunks": True}, "stream_chunks"),
        ({"hang": 1}, "hang"),
        ({"stamp_chunks": "yes"}, "stamp_chunks"),
        ({"drop_after_chunks": 1.5}, "drop_after_chunks"),
        ({"healthy": False, "name": 3}, "name"),
    ],
)
async def test_control_rejects_invalid_update(
    aiohttp_client: AiohttpClient, update: dict[str, Any], field: str
) -> None:
    client = await make_client(aiohttp_client)
    resp = await client.post("/control", json=update)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert field in error["message"] and error["param"] == field
    assert client.app[MOCK_BEHAVIOUR] == MockBehaviour()


async def test_control_rejects_non_object(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client)
    assert (await client.post("/control", data=b"[]")).status == 400


async def test_echo_preserves_repeated_headers(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(name="echoer"))
    headers = CIMultiDict([("X-Dup", "one"), ("X-Dup", "two"), ("X-Single", "s")])
    resp = await client.put("/echo/a/b?q=1&q=2", data=b"payload", headers=headers)
    assert resp.status == 200
    assert resp.headers["X-Mock-Name"] == "echoer"
    body = await resp.json()
    assert body["method"] == "PUT"
    assert body["path"] == "/echo/a/b"
    assert body["query_string"] == "q=1&q=2"
    assert [v for k, v in body["headers"] if k.lower() == "x-dup"] == ["one", "two"]
    assert body["body_length"] == 7
    assert len(body["body_sha256"]) == 64
    assert (await client.get("/echo")).status == 200


async def test_echo_honours_error_knobs(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, MockBehaviour(error_rate=1.0))
    assert (await client.post("/echo", data=b"x")).status == 503


async def test_seeded_rng_is_deterministic(aiohttp_client: AiohttpClient) -> None:
    async def statuses(seed: int) -> list[int]:
        behaviour = MockBehaviour(error_rate=0.5, rate_limit_rate=0.2)
        client = await make_client(aiohttp_client, behaviour, seed=seed)
        return [(await client.post(CHAT, json={})).status for _ in range(30)]

    first = await statuses(1234)
    assert first == await statuses(1234)
    assert {200, 429, 503} <= set(first)


async def test_server_handler_cancellation_counts_disconnect(
    aiohttp_server: AiohttpServer,
) -> None:
    app = create_mock_app(MockBehaviour(latency_s=30.0))
    server = await aiohttp_server(app)  # TestServer always enables handler_cancellation
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(server.make_url(CHAT), json={})
    await wait_for(lambda: app[MOCK_STATS].disconnects == 1)


async def test_cli_serves_health_and_exits_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = ["-m", "gateway.testing.mock_inference", "--port", "0", "--name", "cli", "--seed", "1"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=REPO_ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        prefix = "mock-inference cli listening on http://127.0.0.1:"
        assert line.startswith(prefix), line
        port = int(line[len(prefix) :])
        assert port > 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    "argv",
    [["--error-rate", "2"], ["--latency", "-1"], ["--error-status", "99"], ["--chunks", "x"]],
)
def test_cli_rejects_invalid_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


def test_cli_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--host", "--port", "--name", "--latency", "--chunk-interval", "--chunks",
        "--error-rate", "--error-status", "--rate-limit-rate", "--retry-after", "--hang",
        "--drop-after", "--unhealthy", "--seed", "--stamp-chunks",
    ):  # fmt: skip
        assert flag in out
