"""The engine simulator over real HTTP on loopback: TTFT, prefix caching, preemption, metrics, ORCA."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from gateway.testing.engine import ENGINE, EngineConfig, create_engine_app
from gateway.testing.mock_inference import main

Client = TestClient[web.Request, web.Application]
REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
SYSTEM = "You are the support assistant of a company that sells routing gear. " * 100  # ~1700 tokens


def engine_config(**kw: Any) -> EngineConfig:
    base: dict[str, Any] = {
        "step_time_s": 0.002,
        "step_time_per_seq_s": 0.0001,
        "prefill_time_per_token_s": 0.00005,
        "num_gpu_blocks": 2048,
        "max_model_len": 16384,
    }
    base.update(kw)
    return EngineConfig(**base)


async def make_client(aiohttp_client: AiohttpClient, **kw: Any) -> Client:
    return await aiohttp_client(create_engine_app(engine_config(**kw), name="e1"))


def chat_body(system: str, user: str, max_tokens: int | None = 8, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "mock-model",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def stream(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    """Send a streaming request; the times of its headers and first content, its text and usage."""
    start = time.perf_counter()
    async with client.post(CHAT, json=body) as resp:
        headers_s = time.perf_counter() - start
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        first_s: float | None = None
        text, usage, finish, done = "", None, None, False
        async for raw in resp.content:
            line = raw.strip()
            if not line:
                continue
            assert line.startswith(b"data: ")
            if line == b"data: [DONE]":
                done = True
                continue
            event = orjson.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                content = choice["delta"].get("content")
                if content:
                    first_s = first_s if first_s is not None else time.perf_counter() - start
                    text += content
                finish = choice["finish_reason"] or finish
    assert done and first_s is not None
    return {"headers_s": headers_s, "ttft_s": first_s, "text": text, "usage": usage, "finish": finish}


async def stats(client: Client) -> dict[str, Any]:
    async with client.get("/stats") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def test_prefix_hit_lowers_ttft(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client)
    cold = await stream(client, chat_body(SYSTEM, "first question"))
    warm = await stream(client, chat_body(SYSTEM, "second question"))
    other = await stream(client, chat_body(SYSTEM.replace("support", "sales"), "third question"))
    # ~1700 uncached tokens cost ~85 ms of prefill; a hit leaves a block or two
    assert warm["ttft_s"] < cold["ttft_s"] / 3
    assert warm["ttft_s"] < other["ttft_s"] / 3
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0.9 * warm["usage"]["prompt_tokens"] and cached % 16 == 0
    s = await stats(client)
    assert s["prefix_cache"]["hits"] == cached and 0.2 < s["prefix_cache"]["hit_rate"] < 0.4
    assert s["completed"] == 3 and s["running"] == 0


async def test_stream_headers_at_admission_content_after_prefill(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await make_client(aiohttp_client, prefill_time_per_token_s=0.0001)
    result = await stream(client, chat_body(SYSTEM, "hi", max_tokens=3))
    assert result["headers_s"] < 0.05 and result["ttft_s"] > 0.15  # ~170 ms of prefill between them
    assert result["finish"] == "length" and result["usage"]["completion_tokens"] == 3
    assert len(result["text"].split()) == 3


async def test_full_cache_preempts_and_requests_still_complete(aiohttp_client: AiohttpClient) -> None:
    # 48 blocks of 16 = 768 tokens; four answers of 300 tokens after 100-token prompts do not fit.
    client = await make_client(aiohttp_client, num_gpu_blocks=48, max_model_len=768, step_time_s=0.0005)
    bodies = [chat_body(f"tenant {i} " * 40, "go", max_tokens=300) for i in range(4)]
    results = await asyncio.gather(*(stream(client, b) for b in bodies))
    for r in results:
        assert r["finish"] == "length" and r["usage"]["completion_tokens"] == 300
        assert len(r["text"].split()) == 300
    s = await stats(client)
    assert s["preemptions"] > 0 and s["completed"] == 4 and s["kv_cache_usage"] == 0.0
    async with client.get("/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    assert families["vllm:num_preemptions"].samples[0].value == s["preemptions"]


async def test_ttft_grows_with_the_waiting_queue(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, max_num_seqs=1, step_time_s=0.003)
    bodies = [chat_body(f"caller {i}", "q", max_tokens=10) for i in range(5)]
    tasks = []
    for b in bodies:  # in order, so the queue order is known
        tasks.append(asyncio.create_task(stream(client, b)))
        await asyncio.sleep(0.005)
    results = await asyncio.gather(*tasks)
    ttfts = [r["ttft_s"] for r in results]
    assert ttfts[4] > 3 * ttfts[0]
    assert all(later > earlier for earlier, later in zip(ttfts, ttfts[1:], strict=False))


async def test_metrics_use_vllm_names_and_labels(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, model_name="llama-sim", max_num_seqs=1)
    slow = asyncio.create_task(stream(client, chat_body("a", "b", max_tokens=200)))
    queued = asyncio.create_task(stream(client, chat_body("c", "d", max_tokens=5)))
    await asyncio.sleep(0.1)
    async with client.get("/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    labels = {"model_name": "llama-sim", "engine": "0"}

    def value(name: str) -> float:
        (sample,) = [s for s in families[name].samples if not s.name.endswith("_created")]
        assert sample.labels == labels
        return sample.value

    assert value("vllm:num_requests_running") == 1 and value("vllm:num_requests_waiting") == 1
    assert 0 < value("vllm:kv_cache_usage_perc") < 1
    assert families["vllm:prefix_cache_queries"].type == "counter"
    assert {s.name for s in families["vllm:prefix_cache_hits"].samples} == {"vllm:prefix_cache_hits_total"}
    assert value("vllm:prefix_cache_queries") > 0
    await asyncio.gather(slow, queued)
    async with client.get("/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    assert value("vllm:num_requests_running") == 0 and value("vllm:generation_tokens") == 205
    ttft = {s.labels.get("le"): s.value for s in families["vllm:time_to_first_token_seconds"].samples}
    assert ttft["+Inf"] == 2
    success = {
        s.labels["finished_reason"]: s.value
        for s in families["vllm:request_success"].samples
        if s.name == "vllm:request_success_total"
    }
    assert success["length"] == 2


def parse_orca_text(value: str) -> dict[str, float]:
    assert value.startswith("TEXT ")
    out = {}
    for item in value[5:].split(", "):
        key, _, number = item.partition("=")
        assert key.startswith("named_metrics.")
        out[key[len("named_metrics.") :]] = float(number)
    return out


async def test_orca_header_reports_load_on_non_streaming_responses(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, max_num_seqs=1)
    hdr = {"endpoint-load-metrics-format": "TEXT"}
    first = asyncio.create_task(client.post(CHAT, json=chat_body("a", "b", 30, stream=False), headers=hdr))
    await asyncio.sleep(0.02)
    waiting = [
        asyncio.create_task(client.post(CHAT, json=chat_body(f"x{i}", "y", 3, stream=False)))
        for i in range(2)
    ]
    resp = await first
    assert resp.status == 200
    report = parse_orca_text(resp.headers["endpoint-load-metrics"])
    assert set(report) == {"kv_cache_usage_perc", "num_requests_waiting"}
    assert report["num_requests_waiting"] >= 1 and 0 < report["kv_cache_usage_perc"] <= 1
    body = await resp.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 30
    assert body["choices"][0]["finish_reason"] == "length"
    for task in waiting:
        r = await task
        assert "endpoint-load-metrics" not in r.headers  # not asked for
        await r.read()
    async with client.post(CHAT, json=chat_body("a", "b", 2, stream=False), headers={
        "endpoint-load-metrics-format": "JSON"
    }) as resp:  # fmt: skip
        value = resp.headers["endpoint-load-metrics"]
        assert value.startswith("JSON ")
        assert json.loads(value[5:]) == {
            "named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}
        }
    async with client.post(CHAT, json=chat_body("a", "b", 2), headers=hdr) as resp:
        assert "endpoint-load-metrics" not in resp.headers  # vLLM reports on non-streaming responses only
        await resp.read()


async def test_completions_endpoint_and_default_output_length(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, output_len=20, output_len_sigma=0.5, seed=3)
    lengths = []
    for prompt in ("alpha", "beta", "alpha"):
        async with client.post("/v1/completions", json={"prompt": prompt}) as resp:
            body = await resp.json()
            assert body["object"] == "text_completion"
            assert body["choices"][0]["finish_reason"] == "stop"
            lengths.append(body["usage"]["completion_tokens"])
            assert len(body["choices"][0]["text"].split()) == lengths[-1]
    assert lengths[0] == lengths[2] and all(1 <= n <= 200 for n in lengths)
    async with client.post("/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 2}) as resp:
        events = [line for line in (await resp.read()).split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]" and len(events) == 3  # two tokens, no usage asked for
    assert orjson.loads(events[1][6:])["choices"][0]["finish_reason"] == "length"


async def test_bad_requests_get_json_400(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, max_model_len=2048, num_gpu_blocks=128)
    cases: list[tuple[bytes, str | None]] = [
        (b"{not json", None),
        (orjson.dumps({"messages": "hi"}), "messages"),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}), "max_tokens"),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}), "messages"),
    ]
    for raw, param in cases:
        async with client.post(CHAT, data=raw, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["param"] == param and error["message"]
    async with client.post(
        CHAT, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}
    ) as r:
        assert "maximum context length is 2048 tokens" in (await r.json())["error"]["message"]
    assert (await stats(client))["completed"] == 0


async def test_client_leaving_aborts_its_request(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client)
    async with client.post(CHAT, json=chat_body("a", "b", max_tokens=5000)) as resp:
        await resp.content.readline()
    for _ in range(100):
        s = await stats(client)
        if s["aborted"] == 1:
            break
        await asyncio.sleep(0.02)
    assert s["aborted"] == 1 and s["running"] == 0 and s["kv_cache_usage"] == 0.0


async def test_health_and_models(aiohttp_client: AiohttpClient) -> None:
    client = await make_client(aiohttp_client, model_name="m1")
    async with client.get("/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with client.get("/v1/models") as resp:
        assert (await resp.json())["data"][0]["id"] == "m1"
    assert isinstance(client.app[ENGINE].config, EngineConfig)


async def test_cli_engine_serves_and_exits_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = ["-m", "gateway.testing.mock_inference", "--engine", "--port", "0", "--name", "sim",
            "--speed", "0.7", "--time-scale", "0.1", "--model", "m2"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=REPO_ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        prefix = "mock-inference engine sim listening on http://127.0.0.1:"
        assert line.startswith(prefix), line
        base = f"http://127.0.0.1:{int(line[len(prefix) :])}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}{CHAT}", json=chat_body("s", "u", 4, stream=False)) as resp:
                assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 4
            async with session.get(f"{base}/stats") as resp:
                s = await resp.json()
                assert s["speed"] == 0.7 and s["model"] == "m2" and s["completed"] == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "--speed", "0"], "--speed must be above 0"),
        (["--engine", "--num-gpu-blocks", "4"], "--max-model-len 32768 exceeds the KV cache"),
        (["--max-num-seqs", "4"], "--max-num-seqs needs --engine"),
    ],
)
def test_cli_engine_flags_are_validated(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert message in str(info.value.code)
