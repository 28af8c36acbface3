"""The handler registry, custom handler modules, built-in inputs, the context, and answer classification."""

from __future__ import annotations

import random
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import BaseModel

from jobs_api.config import JobsSettings
from jobs_api.errors import ValidationFailed
from jobs_api.handlers import (
    HandlerRegistry,
    JobContext,
    PermanentError,
    RetryableError,
    backoff_s,
    excerpt,
)
from jobs_api.job_types import default_registry
from jobs_api.models import JobStatus, Progress, transition
from jobs_api.store.base import JobStore, LogLevel
from tests.conftest import MockUpstream, StartMock
from tests.jobs_api.conftest import T0, JobsSettingsFactory, MakeJob, StartJobsGateway


async def echo(ctx: JobContext) -> Any:
    return ctx.input


class Greeting(BaseModel):
    name: str
    times: int = 1


def test_registry_lists_built_in_types() -> None:
    assert default_registry().types() == ["batch", "inference"]


def test_validate_input_unknown_type_lists_known_types() -> None:
    with pytest.raises(ValidationFailed, match=r"unknown job type 'nope'; known types: batch, inference"):
        default_registry().validate_input("nope", {})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "input.path: Field required"),
        ({"path": "v1/chat"}, "input.path"),
        ({"path": "//evil.example/x"}, "input.path"),
        ({"path": "/x", "headers": {"a": 1}}, "input.headers.a"),
        ({"path": "/x", "method": "no such"}, "input.method"),
        ({"path": "/x", "bogus": 1}, "input.bogus: Extra inputs are not permitted"),
    ],
)
def test_validate_input_inference_names_the_bad_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed, match=f"invalid input for a 'inference' job: {field}"):
        default_registry().validate_input("inference", data)


def test_validate_input_fills_inference_defaults() -> None:
    normalized = default_registry().validate_input("inference", {"path": "/v1/models", "method": "get"})
    assert normalized == {"method": "GET", "path": "/v1/models", "body": None, "headers": {}}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"items": []}, "input.items: List should have at least 1 item"),
        ({"items": [{"path": "/x"}] * 1001}, "input.items: List should have at most 1000 items"),
        ({"items": [{"path": "/x"}], "parallel_limit": 0}, "input.parallel_limit"),
        ({"items": [{"path": "/x"}], "parallel_limit": 65}, "input.parallel_limit"),
        ({"items": [{"path": "/x"}, {"path": "nope"}]}, "input.items.1.path"),
    ],
)
def test_validate_input_batch_names_the_bad_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed, match=field):
        default_registry().validate_input("batch", data)


def test_validate_input_rejects_a_non_object() -> None:
    with pytest.raises(ValidationFailed, match="must be a JSON object"):
        default_registry().validate_input("inference", ["/x"])


def test_register_custom_type_with_and_without_model() -> None:
    registry = HandlerRegistry()
    registry.register("greet", echo, input_model=Greeting)
    registry.register("free-form", echo)
    assert registry.types() == ["free-form", "greet"]
    assert registry.handler("greet") is echo
    assert registry.validate_input("greet", {"name": "x"}) == {"name": "x", "times": 1}
    assert registry.validate_input("free-form", {"anything": [1]}) == {"anything": [1]}
    with pytest.raises(KeyError):
        registry.handler("nope")


def test_register_refuses_duplicates_and_bad_names() -> None:
    registry = default_registry()
    with pytest.raises(ValueError, match="'inference' is already registered"):
        registry.register("inference", echo)
    with pytest.raises(ValueError, match="must match"):
        registry.register("Bad Name", echo)


def test_default_registry_bad_import_path_is_a_one_line_value_error() -> None:
    with pytest.raises(ValueError, match=r"JOBS_HANDLERS: cannot import 'no_such_module_xyz'") as info:
        default_registry(["no_such_module_xyz"])
    assert "\n" not in str(info.value)


def test_default_registry_module_without_register_function() -> None:
    with pytest.raises(ValueError, match=r"module 'json' has no function 'register'"):
        default_registry(["json"])


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_default_registry_loads_a_custom_module_by_import_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(
        tmp_path,
        monkeypatch,
        "custom_jobs_mod",
        """
        from pydantic import BaseModel

        class ShoutInput(BaseModel):
            text: str

        async def shout(ctx):
            return ctx.input["text"].upper()

        def register(registry):
            registry.register("shout", shout, input_model=ShoutInput)

        def register_other(registry):
            registry.register("whisper", shout)
        """,
    )
    registry = default_registry(["custom_jobs_mod", "custom_jobs_mod:register_other"])
    assert registry.types() == ["batch", "inference", "shout", "whisper"]
    assert registry.validate_input("shout", {"text": "hi"}) == {"text": "hi"}
    with pytest.raises(ValidationFailed, match="input.text: Field required"):
        registry.validate_input("shout", {})


def test_default_registry_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, monkeypatch, "broken_jobs_mod", "raise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ValueError, match=r"cannot import 'broken_jobs_mod': RuntimeError: boom$"):
        default_registry(["broken_jobs_mod"])


def test_default_registry_module_registering_a_taken_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(
        tmp_path,
        monkeypatch,
        "clash_jobs_mod",
        """
        async def h(ctx):
            return None

        def register(registry):
            registry.register("batch", h)
        """,
    )
    with pytest.raises(ValueError, match="'clash_jobs_mod'.*'batch' is already registered"):
        default_registry(["clash_jobs_mod"])


def test_example_pipeline_registers_by_import_path() -> None:
    registry = default_registry(["jobs_api.examples.pipeline"])
    assert "pipeline" in registry.types()
    with pytest.raises(ValidationFailed, match="input.question"):
        registry.validate_input("pipeline", {"documents": ["a"]})


def test_backoff_is_full_jitter_capped_and_honours_retry_after() -> None:
    rng = random.Random(0)
    for attempt in range(1, 10):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        delays = [backoff_s(attempt, 0.5, 4.0, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range
    assert backoff_s(1, 0.5, 4.0, rng, retry_after_s=7.0) == 7.0
    assert backoff_s(1, 0.0, 0.0, rng) == 0.0


def test_excerpt_is_bounded() -> None:
    assert excerpt(b"short", 64) == "short"
    long = ("é" * 100).encode()
    cut = excerpt(long, 65)
    assert cut.endswith("…") and len(cut[:-1].encode()) <= 65
    assert "\ufffd" not in cut


# --- the context, against a real store and a real gateway -----------------------------------------


@pytest.fixture
async def session(gateway_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=gateway_url) as s:
        yield s


async def running_context(
    store: JobStore,
    make_job: MakeJob,
    session: aiohttp.ClientSession,
    settings: JobsSettings,
    **fields: Any,
) -> JobContext:
    job, _ = await store.create(make_job(**fields))
    claimed = await store.claim("w", T0 + 1, 30.0)
    assert claimed is not None and claimed.id == job.id
    return JobContext(claimed, session, store, settings, clock=lambda: T0 + 2, rng=random.Random(0))


async def test_context_progress_is_persisted_with_phase(
    store: JobStore, make_job: MakeJob, session: aiohttp.ClientSession, jobs_settings: JobsSettingsFactory
) -> None:
    ctx = await running_context(store, make_job, session, jobs_settings())
    await ctx.progress(40, "working", phase="retrieve")
    stored = await store.get(ctx.job.id)
    assert stored is not None
    assert stored.progress == Progress(percent=40, message="working", phase="retrieve")
    await ctx.progress(250)  # clamped
    assert (await store.get(ctx.job.id)).progress.percent == 100  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="NaN"):
        await ctx.progress(float("nan"))


async def test_context_progress_writes_nothing_once_the_job_moved_on(
    store: JobStore, make_job: MakeJob, session: aiohttp.ClientSession, jobs_settings: JobsSettingsFactory
) -> None:
    ctx = await running_context(store, make_job, session, jobs_settings())
    await store.mutate(ctx.job.id, lambda j: transition(j, JobStatus.QUEUED, T0 + 3))
    await ctx.progress(50, "zombie")
    stored = await store.get(ctx.job.id)
    assert stored is not None and stored.progress.percent == 0


async def test_context_log_appends_at_level(
    store: JobStore, make_job: MakeJob, session: aiohttp.ClientSession, jobs_settings: JobsSettingsFactory
) -> None:
    ctx = await running_context(store, make_job, session, jobs_settings())
    await ctx.log("info", "hello")
    await ctx.log("ERROR", "x" * 10_000)
    lines = await store.logs(ctx.job.id, LogLevel.DEBUG)
    assert [(line.level, line.time) for line in lines] == [(LogLevel.INFO, T0 + 2), (LogLevel.ERROR, T0 + 2)]
    assert lines[0].message == "hello" and len(lines[1].message) < 9000
    with pytest.raises(ValueError, match="'loud' is not one of"):
        await ctx.log("loud", "x")


async def test_context_call_returns_status_headers_body_and_upstream(
    store: JobStore,
    make_job: MakeJob,
    session: aiohttp.ClientSession,
    jobs_settings: JobsSettingsFactory,
    mocks: tuple[MockUpstream, MockUpstream],
    chat_body: dict[str, Any],
) -> None:
    ctx = await running_context(store, make_job, session, jobs_settings())
    answer = await ctx.call("POST", "/v1/chat/completions", json=chat_body, headers={"X-Custom": "1"})
    assert answer["status"] == 200
    assert answer["upstream"] == "a"
    assert answer["body"]["object"] == "chat.completion"
    assert answer["headers"]["x-gateway-upstream"] == "a"
    assert answer["headers"]["x-request-id"] == ctx.job.id
    assert answer["headers"]["content-type"].startswith("application/json")
    assert set(answer["headers"]) <= {
        "content-type",
        "x-request-id",
        "x-gateway-upstream",
        "x-gateway-attempts",
    }
    sent = mocks[0].stats.last_headers
    assert sent is not None and sent["X-Custom"] == "1"


async def test_context_call_classifies_client_errors_as_permanent(
    store: JobStore,
    make_job: MakeJob,
    jobs_settings: JobsSettingsFactory,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
) -> None:
    bad = await start_mock("bad", error_rate=1.0, error_status=422)
    url = await start_jobs_gateway(bad)
    async with aiohttp.ClientSession(base_url=url) as s:
        ctx = await running_context(store, make_job, s, jobs_settings(error_excerpt_bytes=64))
        with pytest.raises(PermanentError) as info:
            await ctx.call("POST", "/v1/chat/completions", json={})
    assert info.value.status == 422 and info.value.error_type == "upstream_error"
    assert 'upstream answered 422: {"error":{"message":"Injected failure (mock)"' in info.value.message
    assert info.value.message.endswith("…")


async def test_context_call_classifies_rate_limits_as_retryable_with_retry_after(
    store: JobStore,
    make_job: MakeJob,
    jobs_settings: JobsSettingsFactory,
    start_mock: StartMock,
    start_jobs_gateway: StartJobsGateway,
) -> None:
    limited = await start_mock("limited", rate_limit_rate=1.0, retry_after_s=3)
    url = await start_jobs_gateway(limited)
    async with aiohttp.ClientSession(base_url=url) as s:
        ctx = await running_context(store, make_job, s, jobs_settings())
        with pytest.raises(RetryableError) as info:
            await ctx.call("POST", "/v1/chat/completions", json={})
    assert info.value.status == 429
    assert info.value.retry_after_s is not None and 2 <= info.value.retry_after_s <= 3
    assert info.value.to_error().retryable


async def test_context_call_gateway_unreachable_is_retryable(
    store: JobStore, make_job: MakeJob, jobs_settings: JobsSettingsFactory, refused_url: str
) -> None:
    async with aiohttp.ClientSession(base_url=refused_url) as s:
        ctx = await running_context(store, make_job, s, jobs_settings())
        with pytest.raises(RetryableError, match="gateway unreachable") as info:
            await ctx.call("GET", "/v1/models")
    assert info.value.error_type == "gateway_unreachable" and info.value.status is None


async def test_context_call_returns_text_bodies_as_text(
    store: JobStore, make_job: MakeJob, session: aiohttp.ClientSession, jobs_settings: JobsSettingsFactory
) -> None:
    ctx = await running_context(store, make_job, session, jobs_settings())
    answer = await ctx.call(
        "POST", "/v1/chat/completions", json={"model": "m", "messages": [], "stream": True}
    )
    assert isinstance(answer["body"], str) and answer["body"].endswith("data: [DONE]\n\n")
