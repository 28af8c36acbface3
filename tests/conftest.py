"""Shared fixtures: real mock upstreams and a real gateway, all on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from gateway.app import GATEWAY, Gateway, create_admin_app, create_app
from gateway.config import GatewaySettings
from gateway.mock_inference import MOCK_BEHAVIOUR, MOCK_STATS, MockBehaviour, MockStats, create_mock_app

AiohttpServer = Callable[..., Awaitable[TestServer]]
AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture(autouse=True)
def _no_gateway_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in tests come from the test, never from the developer's environment."""
    for name in list(os.environ):
        if name.startswith(("GATEWAY_", "JOBS_")):
            monkeypatch.delenv(name)


@dataclass
class MockUpstream:
    """A running mock inference server and the knobs to change it while the test runs."""

    name: str
    server: TestServer
    behaviour: MockBehaviour
    stats: MockStats

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def spec(self) -> str:
        return f"{self.name}={self.url}"


StartMock = Callable[..., Awaitable[MockUpstream]]


@pytest.fixture
def start_mock(aiohttp_server: AiohttpServer) -> StartMock:
    """Start a mock-inference upstream: `await start_mock("a", latency_s=0.1)`."""

    async def start(name: str, **behaviour: Any) -> MockUpstream:
        app = create_mock_app(MockBehaviour(name=name, **behaviour), seed=0)
        server = await aiohttp_server(app)
        return MockUpstream(name, server, app[MOCK_BEHAVIOUR], app[MOCK_STATS])

    return start


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def refused_url() -> str:
    """An upstream URL that refuses connections."""
    return f"http://127.0.0.1:{free_port()}"


def settings_for(*upstreams: str | dict[str, Any], **overrides: Any) -> GatewaySettings:
    """Gateway settings for tests: active checks slow unless a test speeds them up."""
    base: dict[str, Any] = {"health": {"interval_s": 60.0, "jitter_ratio": 0.0}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return GatewaySettings(upstreams=list(upstreams), **base)


@dataclass
class RunningGateway:
    """A gateway under test: its proxy client, admin client and live state."""

    client: TestClient[Any, Any]
    admin: TestClient[Any, Any]
    app: web.Application
    registry: CollectorRegistry

    @property
    def state(self) -> Gateway:
        return self.app[GATEWAY]

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def start_gateway(aiohttp_client: AiohttpClient) -> StartGateway:
    """Start a gateway in front of upstreams: `await start_gateway(a.spec, b.spec, retry={...})`."""

    async def start(*upstreams: str | dict[str, Any], **overrides: Any) -> RunningGateway:
        registry = CollectorRegistry()
        app = create_app(settings_for(*upstreams, **overrides), registry=registry)
        client = await aiohttp_client(app)
        admin = await aiohttp_client(create_admin_app(app))
        return RunningGateway(client, admin, app, registry)

    return start


@pytest.fixture
def chat_body() -> Iterator[dict[str, Any]]:
    """A small chat completion request."""
    yield {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}
