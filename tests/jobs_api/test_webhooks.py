"""Webhooks on completion: a real receiver on loopback, the real app, both stores; signatures are
checked with the `standardwebhooks` package (an independent implementation of the spec)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook

from jobs_api.app import create_app
from jobs_api.config import JobsSettings
from jobs_api.handlers import HandlerRegistry, JobContext, PermanentError
from jobs_api.store.base import JobStore
from jobs_api.webhooks import (
    Delivery,
    RetryPolicy,
    Verdict,
    check_url,
    classify,
    decide,
    load_secret,
    sign,
)
from tests.conftest import AiohttpClient, free_port
from tests.jobs_api.conftest import JobsSettingsFactory

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers `statuses` in turn (then 200), after `delay_s`."""

    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls.append((dict(request.headers), body))
        self.arrived.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok")

    async def wait_calls(self, n: int, within_s: float = 10.0) -> None:
        deadline = time.monotonic() + within_s
        while len(self.calls) < n:
            assert time.monotonic() < deadline, f"{len(self.calls)} calls of {n}"
            await asyncio.sleep(0.02)


async def start_receiver(receiver: Receiver, port: int | None = None) -> TestServer:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    return server


@dataclass
class Hooks:
    client: Any
    runs: list[str]

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.client.post("/v1/jobs", json=body)
        assert resp.status == 202, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data

    async def logs(self, job_id: str) -> list[str]:
        data = await (await self.client.get(f"/v1/jobs/{job_id}/logs")).json()
        return [line["message"] for line in data["logs"]]


StartHooks = Callable[..., Awaitable[Hooks]]


def registry_with_echo(runs: list[str]) -> HandlerRegistry:
    async def echo(ctx: JobContext) -> dict[str, Any]:
        runs.append(ctx.job.id)
        if ctx.input.get("fail"):
            raise PermanentError("asked to fail", error_type="asked")
        if ctx.input.get("block"):
            await asyncio.sleep(30)  # until cancelled
        return {"echo": ctx.input}

    registry = HandlerRegistry()
    registry.register("echo", echo)
    return registry


def hook_settings(jobs_settings: JobsSettingsFactory, port: int | None, **overrides: Any) -> JobsSettings:
    values: dict[str, Any] = {
        "webhook_secret": SECRET,
        "webhook_allowed_hosts": () if port is None else (f"127.0.0.1:{port}",),
        "webhook_poll_s": 0.05,
        "webhook_retry_base_s": 0.1,
        "webhook_timeout_s": 2.0,
        **overrides,
    }
    return jobs_settings(**values)


@pytest.fixture
def start_hooks(
    store: JobStore, aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory
) -> StartHooks:
    async def start(port: int | None, **overrides: Any) -> Hooks:
        runs: list[str] = []
        settings = hook_settings(jobs_settings, port, **overrides)
        app = create_app(settings, store=store, registry=registry_with_echo(runs))
        return Hooks(await aiohttp_client(app), runs)

    return start


def echo_job(port: int, **input_fields: Any) -> dict[str, Any]:
    return {"type": "echo", "input": input_fields, "webhook": {"url": f"http://127.0.0.1:{port}/hook"}}


async def wait_pending(store: JobStore, n: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while await store.webhook_pending() != n:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_webhook_signed_post_when_job_completes(start_hooks: StartHooks, store: JobStore) -> None:
    receiver = Receiver()
    server = await start_receiver(receiver)
    assert server.port is not None
    hooks = await start_hooks(server.port)
    job = await hooks.submit(echo_job(server.port, text="hi"))
    assert job["webhook"] == {"url": f"http://127.0.0.1:{server.port}/hook"}
    await receiver.wait_calls(1)
    headers, body = receiver.calls[0]
    payload = Webhook(SECRET).verify(body, headers)  # raises unless the signature is right
    assert headers["webhook-id"] == job["id"]
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 10
    assert headers["Content-Type"] == "application/json"
    assert payload["type"] == "job.completed"
    data = payload["data"]
    assert (data["id"], data["status"], data["job_type"]) == (job["id"], "completed", "echo")
    assert data["links"]["result"] == f"/v1/jobs/{job['id']}/result"
    await wait_pending(store, 0)
    assert any("webhook attempt 1: HTTP 200; delivered" in line for line in await hooks.logs(job["id"]))
    # A tampered body fails the independent check.
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(body.replace(b"completed", b"failed"), headers)
    await server.close()


async def test_webhook_called_for_every_terminal_status(start_hooks: StartHooks) -> None:
    receiver = Receiver()
    server = await start_receiver(receiver)
    assert server.port is not None
    hooks = await start_hooks(server.port)
    failed = await hooks.submit(echo_job(server.port, fail=True))
    await receiver.wait_calls(1)
    assert Webhook(SECRET).verify(receiver.calls[0][1], receiver.calls[0][0])["data"]["status"] == "failed"
    cancelled = await hooks.submit(echo_job(server.port, block=True))
    resp = await hooks.client.post(f"/v1/jobs/{cancelled['id']}/cancel")
    assert resp.status == 202
    timed_out = await hooks.submit({**echo_job(server.port, block=True), "timeout_s": 0.3})
    await receiver.wait_calls(3)
    seen = {
        (p["data"]["id"], p["data"]["status"])
        for p in (Webhook(SECRET).verify(b, h) for h, b in receiver.calls)
    }
    assert seen == {(failed["id"], "failed"), (cancelled["id"], "cancelled"), (timed_out["id"], "timed_out")}
    error = [Webhook(SECRET).verify(b, h)["data"] for h, b in receiver.calls if b"asked to fail" in b]
    assert error[0]["error"] == {"type": "asked", "message": "asked to fail"}
    await server.close()


async def test_webhook_retried_after_500_until_200(start_hooks: StartHooks, store: JobStore) -> None:
    receiver = Receiver(statuses=[500, 503])
    server = await start_receiver(receiver)
    assert server.port is not None
    hooks = await start_hooks(server.port)
    job = await hooks.submit(echo_job(server.port))
    await receiver.wait_calls(3)
    ids = {h["webhook-id"] for h, _ in receiver.calls}
    bodies = {b for _, b in receiver.calls}
    assert ids == {job["id"]} and len(bodies) == 1  # the same message each time
    for headers, body in receiver.calls:
        Webhook(SECRET).verify(body, headers)
    await wait_pending(store, 0)
    await asyncio.sleep(0.3)
    assert len(receiver.calls) == 3  # a 2xx ends it
    lines = [line for line in await hooks.logs(job["id"]) if line.startswith("webhook")]
    assert lines[0].startswith("webhook attempt 1: HTTP 500; retrying in 0.1 s")
    assert lines[1].startswith("webhook attempt 2: HTTP 503; retrying in 0.2 s")
    assert lines[2].startswith("webhook attempt 3: HTTP 200; delivered")
    await server.close()


async def test_webhook_4xx_ends_as_failed_without_retry(start_hooks: StartHooks, store: JobStore) -> None:
    receiver = Receiver(statuses=[410])
    server = await start_receiver(receiver)
    assert server.port is not None
    hooks = await start_hooks(server.port)
    job = await hooks.submit(echo_job(server.port))
    await receiver.wait_calls(1)
    await wait_pending(store, 0)
    await asyncio.sleep(0.3)
    assert len(receiver.calls) == 1
    assert any("HTTP 410; failed (not retried)" in line for line in await hooks.logs(job["id"]))
    await server.close()


async def test_webhook_host_not_allowed_is_422(start_hooks: StartHooks, store: JobStore) -> None:
    closed = await start_hooks(None, webhook_secret=None)
    resp = await closed.client.post("/v1/jobs", json=echo_job(9))
    assert resp.status == 422
    message = (await resp.json())["error"]["message"]
    assert "webhook.url" in message and "JOBS_WEBHOOK_ALLOWED_HOSTS" in message
    port = free_port()
    hooks = await start_hooks(port)
    for url in (
        f"http://127.0.0.1:{port + 1}/hook",  # another port
        f"http://localhost:{port}/hook",  # another name for the same host is still another host
        f"ftp://127.0.0.1:{port}/hook",
        f"http://user:pw@127.0.0.1:{port}/hook",
        "not a url",
    ):
        resp = await hooks.client.post("/v1/jobs", json={**echo_job(port), "webhook": {"url": url}})
        assert resp.status == 422, url
    resp = await hooks.client.post("/v1/jobs", json={**echo_job(port), "webhook": {"url": 5}})
    assert resp.status == 422
    assert await store.count_by_status() == {}


async def test_webhook_slow_receiver_delays_no_job(start_hooks: StartHooks, store: JobStore) -> None:
    receiver = Receiver(delay_s=3.0)
    server = await start_receiver(receiver)
    assert server.port is not None
    hooks = await start_hooks(server.port, concurrency=1, webhook_timeout_s=0.5, webhook_retry_base_s=30)
    slow = await hooks.submit(echo_job(server.port))
    await receiver.arrived.wait()
    started = time.monotonic()
    others = [await hooks.submit({"type": "echo", "input": {"n": n}}) for n in range(5)]
    for job in others:
        deadline = time.monotonic() + 5
        while (await (await hooks.client.get(f"/v1/jobs/{job['id']}")).json())["status"] != "completed":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    assert time.monotonic() - started < 1.0  # the one worker never waited on the receiver
    deadline = time.monotonic() + 5
    while not any("no answer within 0.5 s" in line for line in await hooks.logs(slow["id"])):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await store.webhook_pending() == 1  # kept for its retry in 30 s
    await server.close()


async def test_webhook_delivery_survives_a_restart(
    store: JobStore, aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory
) -> None:
    port = free_port()  # the receiver is down while the job ends
    runs: list[str] = []
    settings = hook_settings(jobs_settings, port, webhook_retry_base_s=0.2)
    first = await aiohttp_client(create_app(settings, store=store, registry=registry_with_echo(runs)))
    job = await (await first.post("/v1/jobs", json=echo_job(port))).json()
    deadline = time.monotonic() + 5
    while "webhook attempt 1" not in str(await (await first.get(f"/v1/jobs/{job['id']}/logs")).json()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await first.close()  # the process stops with the delivery pending
    assert await store.webhook_pending() == 1
    receiver = Receiver()
    server = await start_receiver(receiver, port)
    second = await aiohttp_client(create_app(settings, store=store, registry=registry_with_echo(runs)))
    await receiver.wait_calls(1)
    assert Webhook(SECRET).verify(receiver.calls[0][1], receiver.calls[0][0])["data"]["id"] == job["id"]
    await wait_pending(store, 0)
    assert runs == [job["id"]]  # the job itself ran once
    await second.close()
    await server.close()


# --- pure -----------------------------------------------------------------------------------------


def test_sign_matches_standardwebhooks() -> None:
    key = load_secret(SECRET)
    body = '{"a":1}'
    expected = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(1_700_000_000, UTC), body)
    assert sign(key, "msg_1", 1_700_000_000, body.encode()) == expected


@pytest.mark.parametrize("secret", ["abc", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()])
def test_load_secret_refuses_bad_secrets(secret: str) -> None:
    with pytest.raises(ValueError):
        load_secret(secret)


def test_check_url_matches_host_and_port() -> None:
    allowed = ("hooks.example.com", "127.0.0.1:8443", "[::1]:9000")
    assert check_url("https://hooks.example.com/x", allowed)
    assert check_url("http://HOOKS.example.com:81/x", allowed)  # a bare host allows any port
    assert check_url("https://127.0.0.1:8443/", allowed)
    assert check_url("http://[::1]:9000/h", allowed)
    for url in ("https://127.0.0.1/", "http://evil.example.com/", "http://hooks.example.com.evil/"):
        with pytest.raises(ValueError, match="JOBS_WEBHOOK_ALLOWED_HOSTS"):
            check_url(url, allowed)
    with pytest.raises(ValueError, match="off"):
        check_url("https://hooks.example.com/", ())


def test_classify_statuses() -> None:
    assert classify(200) is classify(204) is Verdict.DELIVERED
    assert classify(500) is classify(408) is classify(429) is classify(None) is Verdict.RETRY
    assert classify(400) is classify(404) is classify(301) is Verdict.FAILED


def test_decide_backs_off_exponentially_and_gives_up_after_a_day() -> None:
    policy = RetryPolicy(base_s=5, max_s=3600, give_up_s=86400)
    delivery = Delivery("j", "http://h/", "{}", created_at=0, next_at=0)
    now = 0.0
    delays = []
    while True:
        step = decide(delivery, 503, None, now, policy)
        if step.keep is None:
            break
        delays.append(step.keep.next_at - now)
        now, delivery = step.keep.next_at, step.keep
    assert delays[:5] == [5, 10, 20, 40, 80]
    assert max(delays) == 3600
    assert step.verdict is Verdict.FAILED and "gave up" in step.note
    assert 86400 - 3600 <= now <= 86400
    assert decide(delivery, 200, None, now, policy).verdict is Verdict.DELIVERED
