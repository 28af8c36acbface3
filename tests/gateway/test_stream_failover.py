"""Streaming failover through real loopback upstreams: the mock's fault catalogue, fault by fault.

Each case says what the client receives (the complete 60-token answer, or a clear error, never a
truncated success), which upstreams saw how many attempts, and that the gateway is fine after.
The primary `a` is broken with `X-Mock-Fault: ...@a`; `b` is healthy unless a case breaks it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from tests.conftest import MockUpstream, RunningGateway, StartGateway, StartMock

TOKENS = 60
ANSWER = "".join(f"token{i}" if i == 0 else f" token{i}" for i in range(TOKENS))
CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "max_tokens": TOKENS,
}
COMPLETION = {"model": "m", "prompt": "say it", "stream": True, "max_tokens": TOKENS}


@dataclass
class Streamed:
    """What a client made of one streamed response."""

    status: int
    headers: dict[str, str]
    body: bytes
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    @property
    def text(self) -> str:
        parts = []
        for e in self.events:
            for choice in e.get("choices", []):
                delta = choice.get("delta") or {}
                parts.append(delta.get("content") or choice.get("text") or "")
        return "".join(parts)

    @property
    def finished(self) -> bool:
        return any(c.get("finish_reason") for e in self.events for c in e.get("choices", []))

    @property
    def ids(self) -> set[str]:
        return {e["id"] for e in self.events if "id" in e}


async def stream(gw: RunningGateway, fault: str = "", body: dict[str, Any] | None = None) -> Streamed:
    path = "/v1/completions" if body is COMPLETION else "/v1/chat/completions"
    headers = {"X-Mock-Fault": fault} if fault else {}
    async with gw.client.post(path, json=body or CHAT, headers=headers) as resp:
        raw = await resp.read()
        out = Streamed(resp.status, dict(resp.headers), raw)
    if out.status != 200 or not out.headers.get("Content-Type", "").startswith("text/event-stream"):
        return out
    for block in raw.split(b"\n\n"):
        lines = block.strip().split(b"\n")
        if lines == [b""]:
            continue
        data = b"\n".join(line[6:] for line in lines if line.startswith(b"data: "))
        if lines[0] == b"event: error":
            out.errors.append(orjson.loads(data))
        elif data == b"[DONE]":
            out.done = True
        elif data:
            out.events.append(orjson.loads(data))
    return out


def assert_complete(got: Streamed) -> None:
    assert got.status == 200, got.body[:300]
    assert got.errors == []
    assert got.text == ANSWER
    assert got.finished
    assert len(got.ids) == 1  # one stream, one answer


def assert_clear_error(got: Streamed) -> None:
    """An error the client cannot take for a complete answer."""
    if got.status == 200:
        assert got.errors, "a failed stream must end with an error event"
        assert not got.done
    else:
        assert got.status >= 400


async def healthy_after(gw: RunningGateway, fault: str = "") -> None:
    """A clean request still gets the whole answer."""
    assert_complete(await stream(gw))
    del fault


@pytest.fixture
async def two(start_mock: StartMock) -> tuple[MockUpstream, MockUpstream]:
    a = await start_mock("a", stream_chunks=TOKENS)
    b = await start_mock("b", stream_chunks=TOKENS)
    return a, b


def prefill(mock: MockUpstream, **extra: Any) -> dict[str, Any]:
    return {"name": mock.name, "url": mock.url, "continuation": "prefill", **extra}


# Request-level faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "a_sees"),
    [
        ("status-once=500@a", 1),
        ("status=503@a", 1),
        ("rate-limit@a", 1),
        ("reset@a", 1),
    ],
)
async def test_request_level_faults_on_the_primary_are_answered_by_the_other(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway, fault: str, a_sees: int
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    got = await stream(gw, fault)
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "b"
    assert got.headers["X-Gateway-Attempts"] == "2"
    assert (a.stats.requests, b.stats.requests) == (a_sees, 1)
    await healthy_after(gw)


async def test_no_response_at_all_is_retried_after_the_attempt_timeout(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority", timeouts={"attempt_s": 0.5})
    started = time.monotonic()
    got = await stream(gw, "no-response@a")
    assert_complete(got)
    assert 0.5 <= time.monotonic() - started < 3
    assert (a.stats.requests, b.stats.requests) == (1, 1)


# Before the first content event: held, so still retried ---------------------------------------


async def test_first_token_after_the_limit_is_abandoned_and_retried(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority", timeouts={"first_token_s": 0.5})
    started = time.monotonic()
    got = await stream(gw, "first-token-delay=20@a")
    elapsed = time.monotonic() - started
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "b"
    assert 0.5 <= elapsed < 3  # abandoned at the limit, not after 20 s
    assert (a.stats.requests, b.stats.requests) == (1, 1)
    assert gw.sample("gateway_upstream_requests_total", {"upstream": "a", "outcome": "timeout"}) == 1


async def test_first_token_within_the_limit_is_waited_for(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority", timeouts={"first_token_s": 5})
    got = await stream(gw, "first-token-delay=0.3@a")
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "a"
    assert b.stats.requests == 0
    # The TTFT sample is the time to the first content event, not to the headers.
    assert gw.sample("gateway_upstream_ttft_seconds_sum", {"upstream": "a"}) >= 0.3
    assert gw.sample("gateway_upstream_ttfb_seconds_sum", {"upstream": "a"}) < 0.3


@pytest.mark.parametrize("fault", ["error-event=0@a", "empty@a", "malformed=0@a", "cut=0@a"])
async def test_a_stream_that_fails_before_any_output_is_retried_elsewhere(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway, fault: str
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    got = await stream(gw, fault)
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "b"
    assert (a.stats.requests, b.stats.requests) == (1, 1)
    outcome = "reset" if fault.startswith("cut") else "stream_error"
    assert gw.sample("gateway_upstream_requests_total", {"upstream": "a", "outcome": outcome}) == 1


async def test_commit_at_headers_keeps_the_old_behaviour(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority", stream={"commit": "headers"})
    got = await stream(gw, "error-event=0@a")
    assert got.status == 200
    assert got.headers["X-Gateway-Upstream"] == "a"
    assert_clear_error(got)
    assert b.stats.requests == 0


async def test_every_upstream_failing_before_output_gets_a_gateway_error_not_a_stream(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority", retry={"max_attempts": 2})
    got = await stream(gw, "error-event=0")
    assert got.status == 502
    error = orjson.loads(got.body)["error"]
    assert "Injected mid-stream error" in error["message"]
    assert (a.stats.requests, b.stats.requests) == (1, 1)


# After the commit point: continuation on an upstream that accepts prefill ----------------------


@pytest.mark.parametrize("body", [CHAT, COMPLETION], ids=["chat", "completions"])
async def test_a_stream_cut_after_40_of_60_tokens_is_finished_on_the_fallback(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway, body: dict[str, Any]
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, prefill(b), strategy="priority")
    got = await stream(gw, "cut=40@a", body)
    assert_complete(got)
    assert got.done
    assert got.headers["X-Gateway-Upstream"] == "a"  # the stream started there
    assert (a.stats.requests, b.stats.requests) == (1, 1)
    sent = orjson.loads(b.stats.last_body or b"{}")
    assert sent["max_tokens"] == TOKENS - 40
    if body is CHAT:
        assert sent["continue_final_message"] is True
        assert sent["add_generation_prompt"] is False
        assert sent["messages"][-1]["role"] == "assistant"
        assert sent["messages"][-1]["content"] == ANSWER.split(" token40")[0]
    else:
        assert sent["prompt"] == "say it" + ANSWER.split(" token40")[0]
    assert gw.sample("gateway_stream_continuations_total", {"upstream": "b", "result": "continued"}) == 1
    assert gw.sample("gateway_stream_aborts_total", {"upstream": "a"}) == 1
    await healthy_after(gw)


async def test_a_stalled_stream_is_finished_on_the_fallback_after_the_idle_timeout(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, prefill(b), strategy="priority", timeouts={"idle_s": 0.5})
    started = time.monotonic()
    got = await stream(gw, "stall=30:30@a")
    assert_complete(got)
    assert time.monotonic() - started < 5
    assert (a.stats.requests, b.stats.requests) == (1, 1)


async def test_a_malformed_chunk_mid_stream_is_withheld_and_the_answer_finished(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, prefill(b), strategy="priority")
    got = await stream(gw, "malformed=30@a")
    assert_complete(got)
    assert b'{"content": "\n' not in got.body  # the broken event never reached the client


async def test_usage_of_a_continued_stream_covers_the_whole_answer(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, prefill(b), strategy="priority")
    body = {**CHAT, "stream_options": {"include_usage": True}}
    got = await stream(gw, "cut=40@a", body)
    assert_complete(got)
    usage = [e["usage"] for e in got.events if e.get("usage")]
    assert len(usage) == 1
    assert usage[0]["completion_tokens"] == TOKENS
    assert usage[0]["total_tokens"] == usage[0]["prompt_tokens"] + TOKENS


async def test_a_cut_stream_without_a_capable_upstream_ends_with_an_error_event(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    got = await stream(gw, "cut=40@a")
    assert_clear_error(got)
    assert got.text == ANSWER.split(" token40")[0]
    assert got.errors[0]["error"]["type"] == "upstream_stream_error"
    assert b.stats.requests == 0


async def test_a_fallback_that_rejects_prefill_does_not_hide_the_original_failure(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, prefill(b), strategy="priority")
    got = await stream(gw, "cut=40@a,no-prefill@b")
    assert_clear_error(got)
    message = got.errors[0]["error"]["message"]
    assert "'a'" in message  # the cut on a, not b's refusal
    assert b.stats.requests == 1
    assert gw.sample("gateway_stream_continuations_total", {"upstream": "b", "result": "refused"}) == 1
    await healthy_after(gw)


async def test_a_stream_that_ends_without_done_but_finished_is_complete(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, prefill(b), strategy="priority")
    got = await stream(gw, "no-done@a")
    assert_complete(got)
    assert not got.done
    assert b.stats.requests == 0
    assert gw.sample("gateway_stream_aborts_total", {"upstream": "a"}) == 0


async def test_an_error_event_mid_stream_is_continued(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, prefill(b), strategy="priority")
    got = await stream(gw, "error-event=20@a")
    assert_complete(got)


# 4xx bodies -------------------------------------------------------------------------------------


async def test_a_content_filter_rejection_is_passed_on_at_once_and_never_retried(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    got = await stream(gw, "content-filter@a")
    assert got.status == 400
    assert orjson.loads(got.body)["error"]["code"] == "content_filter"
    assert b.stats.requests == 0


async def test_a_content_filter_rejection_is_final_even_when_400_is_a_retried_status(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority", retry={"on_statuses": [400, 503]})
    got = await stream(gw, "content-filter@a")
    assert got.status == 400
    assert (a.stats.requests, b.stats.requests) == (1, 0)


async def test_a_context_length_error_goes_to_an_upstream_with_a_larger_context(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", stream_chunks=TOKENS)
    same = await start_mock("same", stream_chunks=TOKENS)
    big = await start_mock("big", stream_chunks=TOKENS)
    gw = await start_gateway(
        {"name": "a", "url": a.url, "max_context": 4096},
        {"name": "same", "url": same.url, "max_context": 4096},
        {"name": "big", "url": big.url, "max_context": 32768},
        strategy="priority",
    )
    got = await stream(gw, "context-length@a")
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "big"
    assert (a.stats.requests, same.stats.requests, big.stats.requests) == (1, 0, 1)


async def test_a_context_length_error_goes_to_the_next_tier_without_larger_contexts(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(*primary_and_backup(a, b))
    got = await stream(gw, "context-length@a")
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "b"
    assert (a.stats.requests, b.stats.requests) == (1, 1)


async def test_a_context_length_error_with_nowhere_larger_is_passed_on(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    got = await stream(gw, "context-length")
    assert got.status == 400
    assert orjson.loads(got.body)["error"]["code"] == "context_length_exceeded"
    assert (a.stats.requests, b.stats.requests) == (1, 0)


async def test_other_4xx_are_never_retried(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    got = await stream(gw, "status=404@a")
    assert got.status == 404
    assert b.stats.requests == 0


# Whole episodes ---------------------------------------------------------------------------------


async def test_a_primary_503_answered_by_the_fallback_reports_the_fallbacks_usage_and_model(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    a = await start_mock("a", stream_chunks=TOKENS)
    b = await start_mock("b", stream_chunks=TOKENS)
    gw = await start_gateway(a.spec, {"name": "b", "url": b.url, "priority": 1}, strategy="priority")
    body = {**CHAT, "stream": False}
    async with gw.client.post(
        "/v1/chat/completions", json=body, headers={"X-Mock-Fault": "status=503@a"}
    ) as r:
        assert r.status == 200
        assert r.headers["X-Gateway-Upstream"] == "b"
        answer = await r.json()
    assert answer["choices"][0]["message"]["content"] == ANSWER
    assert answer["usage"]["completion_tokens"] == TOKENS
    assert answer["model"] == "m"


async def test_a_primary_down_then_healthy_loses_none_of_20_requests(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(
        a.spec, b.spec, strategy="priority", outlier={"base_ejection_s": 0.3, "max_ejection_s": 0.3}
    )
    a.behaviour.error_rate = 1.0  # down: every request 503
    results = []
    for i in range(20):
        if i == 10:
            a.behaviour.error_rate = 0.0  # healthy again
        results.append(await stream(gw))
        await asyncio.sleep(0.05)
    for got in results:
        assert_complete(got)
    assert a.stats.by_status.get(200, 0) >= 1  # it came back into use


# Which upstream a retry goes to: tiers first ----------------------------------------------------


def primary_and_backup(a: MockUpstream, b: MockUpstream) -> tuple[str, dict[str, Any]]:
    return a.spec, {"name": "b", "url": b.url, "priority": 1}


async def test_a_blip_on_the_only_primary_is_retried_there_not_on_the_backup(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(*primary_and_backup(a, b))
    got = await stream(gw, "status-once=500@a")
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "a"
    assert (a.stats.requests, b.stats.requests) == (2, 0)


async def test_a_short_retry_after_on_the_primary_is_waited_out(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(*primary_and_backup(a, b))
    started = time.monotonic()
    got = await stream(gw, "rate-limit-once=1@a")
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "a"
    assert 0.9 <= time.monotonic() - started < 3  # the attempts were the Retry-After apart
    assert b.stats.requests == 0


async def test_a_long_retry_after_on_the_primary_goes_to_the_backup_at_once(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(*primary_and_backup(a, b))
    started = time.monotonic()
    got = await stream(gw, "rate-limit-once=30@a")
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "b"
    assert time.monotonic() - started < 1


async def test_a_persistent_failure_of_the_primary_spends_its_tier_then_uses_the_backup(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(*primary_and_backup(a, b))
    got = await stream(gw, "status=503@a")
    assert_complete(got)
    assert got.headers["X-Gateway-Upstream"] == "b"
    assert got.headers["X-Gateway-Attempts"] == "3"
    assert (a.stats.requests, b.stats.requests) == (2, 1)


async def test_a_client_that_leaves_while_the_stream_is_held_abandons_the_attempt(
    two: tuple[MockUpstream, MockUpstream], start_gateway: StartGateway
) -> None:
    a, b = two
    gw = await start_gateway(a.spec, b.spec, strategy="priority")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(stream(gw, "first-token-delay=30@a"), 0.3)
    for _ in range(50):
        if a.stats.disconnects:
            break
        await asyncio.sleep(0.02)
    assert a.stats.disconnects == 1  # the held upstream request was closed
    assert gw.sample("gateway_upstream_requests_total", {"upstream": "a", "outcome": "abandoned"}) == 1
    assert b.stats.requests == 0
