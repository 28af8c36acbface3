"""Inference metrics through real loopback upstreams: TTFT, chunk gaps, tokens, overhead, faults."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson

from tests.conftest import StartGateway, StartMock
from tests.gateway.test_cli import Spawn, spawn, start_gateway_proc, start_mock_proc

__all__ = ["spawn"]  # the fixture, from the CLI tests

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_chunk_gaps_are_the_time_between_content_events(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", chunk_interval_s=0.05, stream_chunks=6)
    gw = await start_gateway(a.spec)
    async with gw.client.post("/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 6}) as r:
        await r.read()
    count = gw.sample("gateway_stream_chunk_gap_seconds_count", {"upstream": "a"})
    total = gw.sample("gateway_stream_chunk_gap_seconds_sum", {"upstream": "a"})
    assert count == 5  # six content events, five gaps
    assert 0.2 <= total < 1.0


async def test_tokens_are_counted_from_json_bodies_and_from_the_final_stream_chunk(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", stream_chunks=5)
    gw = await start_gateway(a.spec)
    async with gw.client.post("/v1/chat/completions", json=CHAT) as r:
        usage = (await r.json())["usage"]
    labels = {"upstream": "a", "model": "", "caller": ""}
    assert gw.sample("gateway_tokens_total", {**labels, "kind": "completion"}) == 5
    assert gw.sample("gateway_tokens_total", {**labels, "kind": "prompt"}) == usage["prompt_tokens"]
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with gw.client.post("/v1/chat/completions", json=body) as r:
        await r.read()
    assert gw.sample("gateway_tokens_total", {**labels, "kind": "completion"}) == 10


TOKENS_LLAMA = {"upstream": "a", "model": "llama", "caller": "", "kind": "completion"}


async def test_tokens_carry_the_configured_model_label(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", stream_chunks=3)
    gw = await start_gateway({"name": "a", "url": a.url, "models": ["llama"]})
    async with gw.client.post("/v1/chat/completions", json={**CHAT, "model": "llama"}) as r:
        assert r.status == 200
    assert gw.sample("gateway_tokens_total", TOKENS_LLAMA) == 3


async def test_overhead_excludes_the_time_waiting_on_the_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", latency_s=0.2)
    gw = await start_gateway(a.spec)
    for _ in range(3):
        async with gw.client.post("/v1/chat/completions", json=CHAT) as r:
            await r.read()
    assert gw.sample("gateway_overhead_seconds_count") == 3
    assert gw.sample("gateway_overhead_seconds_sum") < 0.1  # the 0.6 s of upstream time is not ours
    assert gw.sample("gateway_request_duration_seconds_sum") >= 0.6


async def test_every_non_2xx_is_counted_once_by_whose_fault_it_was(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    async with gw.client.post("/v1/chat/completions", json=CHAT, headers={"X-Gateway-Timeout": "x"}) as r:
        assert r.status == 400  # the client's bad header
    async with gw.client.get("/no/such/path") as r:
        assert r.status == 404  # relayed from the upstream: the request's
    async with gw.client.post("/v1/chat/completions", json=CHAT, headers={"X-Mock-Fault": "status=503"}) as r:
        assert r.status == 503  # relayed: the upstream's
    gw.state.pool.drain(gw.state.pool.by_name["a"], 0.0)
    async with gw.client.post("/v1/chat/completions", json=CHAT) as r:
        assert r.status == 503  # nothing to choose: the gateway's
    assert gw.sample("gateway_errors_total", {"fault": "client"}) == 2
    assert gw.sample("gateway_errors_total", {"fault": "upstream"}) == 1
    assert gw.sample("gateway_errors_total", {"fault": "gateway"}) == 1


async def test_build_info_and_process_metrics_without_created_series(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    async with gw.admin.get("/metrics") as resp:
        text = await resp.text()
    assert re.search(r'^gateway_build_info\{version="[^"]+"\} 1\.0$', text, re.M)
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text
    assert "_created" not in text


async def test_the_access_log_is_pure_json_lines_with_ttft_tokens_and_fault(spawn: Spawn) -> None:
    _, mock_url = await start_mock_proc(spawn, "a")
    proc, port, _ = await start_gateway_proc(spawn, "--upstream", f"a={mock_url}", "--access-log")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        async with session.get(f"http://127.0.0.1:{port}/nope") as r:
            assert r.status == 404
    for _ in range(100):
        lines = [line for line in proc.stderr if line.lstrip().startswith("{")]
        if len(lines) >= 2:
            break
        await asyncio.sleep(0.05)
    entries = [orjson.loads(line) for line in lines]
    assert [e["status"] for e in entries] == [200, 404]
    ok, missing = entries
    assert ok["completion_tokens"] == 5 and ok["prompt_tokens"] > 0
    assert ok["ttft_s"] > 0 and ok["overhead_s"] >= 0
    assert missing["fault"] == "client"


async def test_usage_injection_counts_tokens_and_keeps_the_clients_stream_as_asked(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", stream_chunks=4)
    gw = await start_gateway(a.spec, usage={"include_usage_injection": True})
    body = {**CHAT, "stream": True}
    async with gw.client.post("/v1/chat/completions", json=body) as r:
        raw = await r.read()
    sent = orjson.loads(a.stats.last_body or b"{}")
    assert sent["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in raw  # the client did not ask for it
    assert raw.rstrip().endswith(b"data: [DONE]")
    completion = {"upstream": "a", "model": "", "caller": "", "kind": "completion"}
    assert gw.sample("gateway_tokens_total", completion) == 4
    asked = {**body, "stream_options": {"include_usage": True}}
    async with gw.client.post("/v1/chat/completions", json=asked) as r:
        assert b'"usage"' in await r.read()  # asked for: passed on


async def test_a_long_json_answer_does_not_make_its_engine_look_slow(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    # 0.2 s for 40 tokens: the latency sample is per output token (5 ms), not 0.2 s.
    a = await start_mock("a", latency_s=0.2, stream_chunks=40)
    gw = await start_gateway(a.spec)
    async with gw.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 40}) as r:
        assert r.status == 200
        await r.read()
    estimate = gw.state.pool.by_name["a"].latency_s
    assert 0.004 <= estimate <= 0.02
