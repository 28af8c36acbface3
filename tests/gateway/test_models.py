"""Routing by model through real loopback upstreams: maps, aliases, fallbacks, refusals, /v1/models."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config import ConfigError, load_settings
from gateway.policy.models import read_model, rewrite_model
from tests.conftest import MockUpstream, RunningGateway, StartGateway, StartMock, free_port

CHAT = {"model": "llama-3-70b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def up(mock: MockUpstream, models: Any, **extra: Any) -> dict[str, Any]:
    return {"name": mock.name, "url": mock.url, "models": models, "health_path": None, **extra}


async def post(gw: RunningGateway, body: Any, path: str = "/v1/chat/completions") -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with gw.client.post(path, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def test_two_providers_with_different_names_for_one_model(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(
        up(a, ["llama-3-70b", "llama-3-8b"]),
        up(b, {"llama-3-70b": "meta-llama/Llama-3-70B-Instruct"}, priority=1),
    )
    a.behaviour.error_rate = 1.0  # the primary is down
    raw = (
        b'{"model": "llama-3-70b", "messages": [{"role": "user", "content": "caf\\u00e9"}], "max_tokens": 4}'
    )
    status, headers, answer = await post(gw, raw)
    assert status == 200
    assert headers["X-Gateway-Upstream"] == "b"
    assert headers["X-Gateway-Model"] == "llama-3-70b"
    assert answer["model"] == "meta-llama/Llama-3-70B-Instruct"  # left as the upstream sent it
    # Only the model's value changed; every other byte of the body is as the client sent it.
    assert b.stats.last_body == raw.replace(b'"llama-3-70b"', b'"meta-llama/Llama-3-70B-Instruct"')


async def test_an_upstream_serves_only_its_models(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(up(a, ["llama-3-70b"]), up(b, ["llama-3-8b"]), strategy="round_robin")
    for _ in range(4):
        status, headers, _ = await post(gw, {**CHAT, "model": "llama-3-8b"})
        assert status == 200 and headers["X-Gateway-Upstream"] == "b"
    assert a.stats.requests == 0


async def test_an_upstream_without_models_serves_every_model(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    anything = await start_mock("any")
    gw = await start_gateway(up(a, ["llama-3-70b"]), {"name": "any", "url": anything.url})
    status, headers, _ = await post(gw, {**CHAT, "model": "mistral"})
    assert status == 200 and headers["X-Gateway-Upstream"] == "any"


async def test_aliases_resolve_before_routing(start_mock: StartMock, start_gateway: StartGateway) -> None:
    a = await start_mock("a")
    gw = await start_gateway(up(a, {"gpt-4o": "azure-gpt4o-deployment"}), model_aliases={"gpt-4": "gpt-4o"})
    status, headers, answer = await post(gw, {**CHAT, "model": "gpt-4"})
    assert status == 200
    assert headers["X-Gateway-Model"] == "gpt-4o"
    assert orjson.loads(a.stats.last_body or b"")["model"] == "azure-gpt4o-deployment"
    assert answer["model"] == "azure-gpt4o-deployment"


async def test_fallback_models_serve_when_the_model_cannot(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(
        up(a, ["llama-3-70b"]),
        up(b, {"gpt-4o-mini": "gpt-4o-mini-2024-07-18"}),
        model_fallbacks={"llama-3-70b": ["gpt-4o-mini"]},
    )
    a.behaviour.error_rate = 1.0
    status, headers, answer = await post(gw, CHAT)
    assert status == 200
    assert headers["X-Gateway-Upstream"] == "b"
    assert headers["X-Gateway-Model"] == "gpt-4o-mini"
    assert answer["model"] == "gpt-4o-mini-2024-07-18"
    assert int(headers["X-Gateway-Attempts"]) <= 3  # within retry.max_attempts
    labels = {"model": "llama-3-70b", "fallback": "gpt-4o-mini"}
    assert gw.sample("gateway_model_fallbacks_total", labels) == 1


async def test_the_model_on_another_tier_goes_before_a_fallback_model(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """Regression: one failure of the model's only tier-0 upstream moved the request to the
    fallback model, though a tier-1 upstream of the asked-for model was untried and routable."""
    a = await start_mock("a")
    b = await start_mock("b")
    c = await start_mock("c")
    gw = await start_gateway(
        up(a, ["llama-3-70b"]),
        up(b, {"llama-3-70b": "Llama-3-70B-hosted"}, priority=1),
        up(c, ["gpt-4o-mini"], priority=1),
        model_fallbacks={"llama-3-70b": ["gpt-4o-mini"]},
    )
    a.behaviour.error_rate = 1.0
    status, headers, answer = await post(gw, CHAT)
    assert status == 200
    assert headers["X-Gateway-Upstream"] == "b" and headers["X-Gateway-Model"] == "llama-3-70b"
    assert answer["model"] == "Llama-3-70B-hosted"
    assert c.stats.requests == 0
    assert (
        gw.sample("gateway_model_fallbacks_total", {"model": "llama-3-70b", "fallback": "gpt-4o-mini"}) == 0
    )


async def test_a_fallback_is_used_at_once_when_the_model_has_no_routable_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(
        up(a, ["llama-3-70b"]), up(b, ["gpt-4o-mini"]), model_fallbacks={"llama-3-70b": ["gpt-4o-mini"]}
    )
    gw.state.pool.drain(gw.state.pool.by_name["a"], 0.0)
    status, headers, _ = await post(gw, CHAT)
    assert status == 200 and headers["X-Gateway-Model"] == "gpt-4o-mini"
    assert headers["X-Gateway-Attempts"] == "1"
    assert a.stats.requests == 0


async def test_a_context_window_error_goes_to_the_fallback_model(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(
        up(a, ["llama-3-70b"], max_context=8192),
        up(b, ["gpt-4o-mini"], max_context=128000),
        model_fallbacks={"llama-3-70b": ["gpt-4o-mini"]},
    )
    async with gw.client.post(
        "/v1/chat/completions", json=CHAT, headers={"X-Mock-Fault": "context-length@a"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Gateway-Model"] == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({**CHAT, "model": "no-such-model"}, 404, "model_not_found"),
        ({"messages": []}, 400, "invalid_request"),
        ({**CHAT, "model": 7}, 400, "invalid_request"),
        ({**CHAT, "model": ""}, 400, "invalid_request"),
    ],
)
async def test_requests_that_cannot_be_routed_are_refused_and_not_sent(
    start_mock: StartMock, start_gateway: StartGateway, body: Any, status: int, kind: str
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(up(a, ["llama-3-70b"]))
    got, _, answer = await post(gw, body)
    assert got == status
    assert answer["error"]["type"] == kind
    assert a.stats.requests == 0


async def test_v1_models_is_answered_from_the_configuration(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    gw = await start_gateway(
        up(a, ["llama-3-70b"]), up(b, {"gpt-4o": "dep"}), model_aliases={"gpt-4": "gpt-4o"}
    )
    async with gw.client.get("/v1/models") as resp:
        assert resp.status == 200
        listing = await resp.json()
    assert listing["object"] == "list"
    assert {m["id"] for m in listing["data"]} == {"llama-3-70b", "gpt-4o", "gpt-4"}
    assert all(m["object"] == "model" for m in listing["data"])
    assert a.stats.requests == b.stats.requests == 0


async def test_model_metrics_use_configured_names_only(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(up(a, ["llama-3-70b"]), {"name": "any", "url": a.url})
    await post(gw, CHAT)
    await post(gw, {**CHAT, "model": "random-name-1"})
    await post(gw, {**CHAT, "model": "random-name-2"})
    sample = gw.sample
    assert sample("gateway_model_requests_total", {"model": "llama-3-70b", "caller": "", "code": "200"}) == 1
    assert sample("gateway_model_requests_total", {"model": "other", "caller": "", "code": "200"}) == 2


async def test_the_plain_path_has_no_model_routing(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a")
    gw = await start_gateway(a.spec)
    status, headers, _ = await post(gw, {**CHAT, "model": "anything"})
    assert status == 200
    assert "X-Gateway-Model" not in headers
    async with gw.client.get("/v1/models") as resp:  # forwarded to the upstream
        assert (await resp.json())["data"][0]["owned_by"] == "a"


async def test_kill_9_of_the_primary_under_load_every_answer_from_the_right_model(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    port = free_port()
    argv = ["-m", "gateway.testing.mock_inference", "--port", str(port), "--name", "primary"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, "--latency", "0.02", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        b = await start_mock("b")
        gw = await start_gateway(
            {"name": "primary", "url": f"http://127.0.0.1:{port}", "models": ["llama-3-70b"]},
            up(b, {"llama-3-70b": "Llama-3-70B-hosted"}, priority=1),
        )
        answers: list[tuple[int, str, str]] = []

        async def worker() -> None:
            for _ in range(25):  # bounded: 100 requests in all
                status, headers, answer = await post(gw, CHAT)
                answers.append((status, headers.get("X-Gateway-Upstream", ""), answer.get("model", "")))

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        for _ in range(500):  # kill it once it has served some of the load (bounded wait)
            if len(answers) >= 20:
                break
            await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*workers), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert len(answers) == 100
    assert all(status == 200 for status, _, _ in answers), [a for a in answers if a[0] != 200][:3]
    expected = {"primary": "llama-3-70b", "b": "Llama-3-70B-hosted"}
    assert all(model == expected[served] for _, served, model in answers)
    assert {served for _, served, _ in answers} == {"primary", "b"}


# Configuration and the pure parts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model_aliases": {"gpt-4": "nope"}}, "model_aliases.gpt-4: no upstream serves 'nope'"),
        ({"model_aliases": {"a1": "a2", "a2": "m1"}}, "is itself an alias"),
        ({"model_fallbacks": {"m1": ["nope"]}}, "model_fallbacks.m1: no upstream serves 'nope'"),
    ],
)
def test_model_configuration_errors_name_the_field(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_settings({"upstreams": [{"url": "http://127.0.0.1:1", "models": ["m1", "m2"]}], **extra})


def test_rewrite_changes_only_the_top_level_model() -> None:
    body = b'{"tools": [{"model": "x"}], "model" : "x", "n": 1}'
    found = read_model(body)
    assert found is not None
    # Two verbatim matches: re-serialised rather than guessing which one is top level.
    assert orjson.loads(rewrite_model(body, found, "y")) == {"tools": [{"model": "x"}], "model": "y", "n": 1}
    body = b'{"messages": [], "model" : "x", "n": 1}'
    found = read_model(body)
    assert found is not None
    assert rewrite_model(body, found, "y") == b'{"messages": [], "model" : "y", "n": 1}'
