"""Engine-aware routing: load reports as vLLM writes them, saturation, affinity, the engine strategy."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.policy.affinity import prefix_key, rendezvous, session_key
from gateway.policy.engine import EngineRules, load_of, pick_engine, saturated
from gateway.policy.load import EngineLoad, MalformedReport, MetricNames, fresh, parse_orca, parse_prometheus
from tests.conftest import AiohttpServer, RunningGateway, StartGateway

# --- load reports ----------------------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3-8B"} 12.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3-8B"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3-8B"} 0.42
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3-8B"} 1.2e+06
"""
SGLANG_METRICS = """\
sglang:num_running_reqs{model_name="m",tp_rank="0"} 4.0
sglang:num_queue_reqs{model_name="m",tp_rank="0"} 7.0
sglang:token_usage{model_name="m",tp_rank="0"} 0.5
"""


def test_orca_text_as_vllm_writes_it() -> None:
    got = parse_orca(
        "TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=2.0", 5.0
    )
    assert got == EngineLoad(5.0, waiting=2.0, kv=0.4)


def test_orca_json_as_vllm_writes_it() -> None:
    value = (
        "JSON "
        + orjson.dumps({"named_metrics": {"kv_cache_usage_perc": 0.9, "num_requests_waiting": 7.0}}).decode()
    )
    assert parse_orca(value, 1.0) == EngineLoad(1.0, waiting=7.0, kv=0.9)


@pytest.mark.parametrize(
    "value",
    [
        "TEXT",
        "TEXT garbage",
        "TEXT named_metrics.kv_cache_usage_perc=abc",
        "JSON {",
        'JSON {"x": 1}',
        "TEXT named_metrics.num_requests_waiting=-1",
        "TEXT named_metrics.cpu=0.5",
        "TEXT named_metrics.kv_cache_usage_perc=nan",
    ],
)
def test_malformed_orca_reports_are_refused(value: str) -> None:
    with pytest.raises(MalformedReport):
        parse_orca(value, 0.0)


def test_prometheus_text_with_vllm_names() -> None:
    assert parse_prometheus(VLLM_METRICS, MetricNames(), 2.0) == EngineLoad(2.0, 3.0, 12.0, 0.42)


def test_prometheus_text_with_sglang_names() -> None:
    assert parse_prometheus(SGLANG_METRICS, MetricNames(), 2.0) == EngineLoad(2.0, 7.0, 4.0, 0.5)


def test_prometheus_samples_of_one_name_are_summed_over_labels() -> None:
    text = 'vllm:num_requests_waiting{model_name="a"} 2\nvllm:num_requests_waiting{model_name="b"} 3\n'
    assert parse_prometheus(text, MetricNames(), 0.0).waiting == 5.0


@pytest.mark.parametrize(
    "text", ["", "# nothing here\n", "other_metric 1\n", "vllm:num_requests_waiting NaN\n"]
)
def test_prometheus_text_without_load_is_malformed(text: str) -> None:
    with pytest.raises(MalformedReport):
        parse_prometheus(text, MetricNames(), 0.0)


def test_a_stale_report_is_ignored() -> None:
    report = EngineLoad(10.0, waiting=1.0)
    assert fresh(report, 12.9, 3.0) is report
    assert fresh(report, 13.1, 3.0) is None


# --- affinity and the engine strategy ----------------------------------------------------------------


@dataclass
class Eng:
    name: str
    inflight: int = 0
    engine: EngineLoad | None = None
    sent_since_report: int = 0
    stale_s: float = 3.0
    weight: float = 1.0


def test_rendezvous_moves_only_the_keys_of_an_engine_that_leaves() -> None:
    engines = [Eng(f"e{i}") for i in range(4)]
    keys = [f"key-{i}".encode() for i in range(2000)]
    before = {k: rendezvous(k, engines)[0].name for k in keys}
    assert len(set(before.values())) == 4
    assert max(list(before.values()).count(e.name) for e in engines) < 700  # spread
    rest = engines[1:]
    after = {k: rendezvous(k, rest)[0].name for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "e0" for k in moved)  # only e0's keys moved


def test_the_preferred_engine_is_kept_while_its_load_is_within_the_bound() -> None:
    engines = [Eng("a"), Eng("b"), Eng("c")]
    key = b"system prompt of tenant 1"
    preferred = rendezvous(key, engines)[0]
    rng = random.Random(0)
    rules = EngineRules()
    assert pick_engine(engines, key, 0.0, rules, rng) is preferred
    preferred.inflight = 1  # one request more than the others: still within the bound
    assert pick_engine(engines, key, 0.0, rules, rng) is preferred


def test_a_hot_prefix_overflows_to_its_next_engine() -> None:
    engines = [Eng("a"), Eng("b"), Eng("c")]
    key = b"a very popular system prompt"
    order = rendezvous(key, engines)
    order[0].engine = EngineLoad(0.0, waiting=4.0, running=20.0)  # busy, but not saturated
    got = pick_engine(engines, key, 0.0, EngineRules(), random.Random(0))
    assert got is order[1]


def test_a_saturated_engine_is_not_chosen_while_another_is_not() -> None:
    engines = [Eng("a"), Eng("b")]
    key = b"k"
    preferred = rendezvous(key, engines)[0]
    preferred.engine = EngineLoad(0.0, waiting=0.0, kv=0.95)
    rules = EngineRules()
    assert saturated(preferred, 0.0, rules)
    for seed in range(20):
        assert pick_engine(engines, key, 0.0, rules, random.Random(seed)) is not preferred
        assert pick_engine(engines, None, 0.0, rules, random.Random(seed)) is not preferred


def test_load_is_the_engines_report_plus_what_was_sent_since() -> None:
    e = Eng("a", inflight=5, engine=EngineLoad(0.0, waiting=2.0, running=10.0), sent_since_report=3)
    assert load_of(e, 1.0) == 15.0
    assert load_of(e, 10.0) == 5.0  # stale: own in-flight only


def test_prefix_key_takes_the_system_message_and_first_turns_up_to_the_limit() -> None:
    body = {"messages": [{"role": "system", "content": "S" * 100}, {"role": "user", "content": "hello"}]}
    assert prefix_key(body, 50) == b"system\x1f" + b"S" * 43
    other = {"messages": [{"role": "system", "content": "S" * 100}, {"role": "user", "content": "bye"}]}
    assert prefix_key(body, 50) == prefix_key(other, 50)  # same start, same key
    assert prefix_key(body, 4096) != prefix_key(other, 4096)
    assert prefix_key({"prompt": "abcdef"}, 3) == b"abc"
    assert prefix_key({"input": "x"}, 10) is None


def test_session_key_is_the_header_else_the_user_field() -> None:
    assert session_key(b"s1", {"user": "u"}) == b"s1"
    assert session_key(None, {"user": "u"}) == b"u"
    assert session_key(None, {}) is None


# --- through the gateway -----------------------------------------------------------------------------


@dataclass
class FakeEngine:
    """An OpenAI-ish upstream that reports a load we set, by ORCA header and /metrics."""

    name: str
    waiting: float = 0.0
    kv: float = 0.1
    served: int = 0
    asked_orca: int = 0
    metrics_ok: bool = True

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.Response:
            await request.read()
            self.served += 1
            headers = {"X-Engine": self.name}
            if request.headers.get("endpoint-load-metrics-format"):
                self.asked_orca += 1
                headers["endpoint-load-metrics"] = (
                    f"TEXT named_metrics.kv_cache_usage_perc={self.kv}, "
                    f"named_metrics.num_requests_waiting={self.waiting}"
                )
            return web.json_response({"choices": [{"message": {"content": "ok"}}]}, headers=headers)

        async def metrics(request: web.Request) -> web.Response:
            if not self.metrics_ok:
                return web.Response(text="garbage without load values\n")
            return web.Response(
                text=f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
                f'vllm:num_requests_running{{model_name="m"}} 1.0\n'
                f'vllm:kv_cache_usage_perc{{model_name="m"}} {self.kv}\n'
            )

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/metrics", metrics)
        return app


CHAT = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "You are tenant one's bot."},
        {"role": "user", "content": "hi"},
    ],
}


def tenant(i: int) -> dict[str, Any]:
    """A request with its own system prompt (so its own affinity key)."""
    return {**CHAT, "messages": [{"role": "system", "content": f"tenant {i} system prompt"}]}


async def engines(aiohttp_server: AiohttpServer, n: int) -> tuple[list[FakeEngine], list[str]]:
    fakes = [FakeEngine(f"e{i}") for i in range(n)]
    urls = [str((await aiohttp_server(f.app())).make_url("")).rstrip("/") for f in fakes]
    return fakes, urls


async def ask(
    gw: RunningGateway, body: dict[str, Any] = CHAT, headers: dict[str, str] | None = None
) -> tuple[int, str, Any]:
    async with gw.client.post("/v1/chat/completions", json=body, headers=headers or {}) as resp:
        return resp.status, resp.headers.get("X-Gateway-Upstream", ""), resp.headers


async def test_orca_reports_are_asked_for_read_and_steer_away_from_a_saturated_engine(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    (a, b), (ua, ub) = await engines(aiohttp_server, 2)
    gw = await start_gateway(
        {"name": "e0", "url": ua, "load_report": "orca", "health_path": None},
        {"name": "e1", "url": ub, "load_report": "orca", "health_path": None},
        strategy="engine",
    )
    a.kv = 0.97  # e0 says its KV cache is nearly full
    for i in range(12):
        _, _, headers = await ask(gw, tenant(i))
        assert "endpoint-load-metrics" not in {k.lower() for k in headers}  # not passed to clients
        if a.served:
            break
    assert a.served == 1 and a.asked_orca == 1  # chosen once, before it had reported
    served_before = a.served
    for i in range(10):
        assert (await ask(gw, tenant(100 + i)))[1] == "e1"  # e0 is saturated; e1 is calm
    assert a.served == served_before
    assert gw.sample("gateway_upstream_engine_kv_usage", {"upstream": "e0"}) == pytest.approx(0.97)
    assert gw.sample("gateway_load_reports_total", {"upstream": "e0", "source": "orca", "result": "ok"}) >= 1


async def test_polled_metrics_steer_and_go_stale(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    (a, b), (ua, ub) = await engines(aiohttp_server, 2)
    poll = {"path": "/metrics", "interval_s": 0.05, "stale_s": 0.5}
    gw = await start_gateway(
        {"name": "e0", "url": ua, "load_metrics": poll, "health_path": None},
        {"name": "e1", "url": ub, "load_metrics": poll, "health_path": None},
        strategy="engine",
    )
    a.waiting = 50.0  # a long queue on e0
    await asyncio.sleep(0.3)
    assert gw.sample("gateway_upstream_engine_waiting", {"upstream": "e0"}) == 50.0
    for _ in range(10):
        assert (await ask(gw))[1] == "e1"
    a.metrics_ok = False  # e0's reports become unreadable: its last one goes stale
    await asyncio.sleep(0.8)
    assert gw.sample("gateway_upstream_engine_waiting", {"upstream": "e0"}) == 0.0  # stale: not exported
    assert (
        gw.sample(
            "gateway_load_reports_total", {"upstream": "e0", "source": "metrics", "result": "malformed"}
        )
        >= 1
    )
    seen = {(await ask(gw, tenant(i)))[1] for i in range(20)}
    assert "e0" in seen  # no longer avoided


async def test_when_every_engine_is_saturated_requests_wait_then_get_429(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    (a, b), (ua, ub) = await engines(aiohttp_server, 2)
    poll = {"path": "/metrics", "interval_s": 0.05}
    gw = await start_gateway(
        {"name": "e0", "url": ua, "load_metrics": poll, "health_path": None},
        {"name": "e1", "url": ub, "load_metrics": poll, "health_path": None},
        strategy="engine",
        saturation={"max_wait_s": 0.5},
    )
    a.waiting = b.waiting = 20.0
    await asyncio.sleep(0.3)
    started = time.monotonic()
    status, _, headers = await ask(gw)
    assert status == 429
    assert 0.45 <= time.monotonic() - started < 2
    assert headers["Retry-After"] == "1"
    assert a.served == b.served == 0  # nothing piled onto the thrashing engines
    # A waiting request is admitted as soon as an engine calms down.
    task = asyncio.create_task(ask(gw))
    await asyncio.sleep(0.15)
    b.waiting = 0.0
    status, served, _ = await task
    assert (status, served) == (200, "e1")
    assert gw.sample("gateway_saturation_waits_total", {"result": "rejected"}) == 1
    assert gw.sample("gateway_saturation_waits_total", {"result": "admitted"}) == 1


async def test_the_same_prefix_stays_on_one_engine_and_different_ones_spread(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    fakes, urls = await engines(aiohttp_server, 3)
    gw = await start_gateway(
        *({"name": f"e{i}", "url": u, "health_path": None} for i, u in enumerate(urls)), strategy="engine"
    )
    same = {(await ask(gw))[1] for _ in range(12)}
    assert len(same) == 1
    spread = {(await ask(gw, tenant(i)))[1] for i in range(30)}
    assert len(spread) == 3


async def test_session_affinity_follows_the_header(
    aiohttp_server: AiohttpServer, start_gateway: StartGateway
) -> None:
    fakes, urls = await engines(aiohttp_server, 3)
    gw = await start_gateway(
        *({"name": f"e{i}", "url": u, "health_path": None} for i, u in enumerate(urls)),
        strategy="engine",
        affinity={"key": "session"},
    )
    for session in ("s1", "s2", "s3"):
        chosen = set()
        for i in range(5):
            body = {**CHAT, "messages": [{"role": "user", "content": f"turn {i}"}]}
            chosen.add((await ask(gw, body, {"X-Session-ID": session}))[1])
        assert len(chosen) == 1
