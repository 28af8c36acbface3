"""Shared fixtures: real mock upstreams and a real gateway, all on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.client import _RequestContextManager
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from gateway.admin import create_admin_app
from gateway.app import Gateway, build_gateway, start_proxy_server
from gateway.config import GatewaySettings
from gateway.http.server import HttpServer
from gateway.testing.mock_inference import (
    MOCK_BEHAVIOUR,
    MOCK_STATS,
    MockBehaviour,
    MockStats,
    create_mock_app,
)

AiohttpServer = Callable[..., Awaitable[TestServer]]
AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]


PROXY_ENV = frozenset({"http_proxy", "https_proxy", "no_proxy", "all_proxy"})


@pytest.fixture(autouse=True)
def _no_gateway_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in tests come from the test, never from the developer's environment."""
    for name in list(os.environ):
        # Proxy variables too: a developer's HTTPS_PROXY would route loopback upstreams away.
        if name.startswith(("GATEWAY_", "JOBS_")) or name.lower() in PROXY_ENV:
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


class LoopbackClient:
    """An aiohttp client bound to one server's base URL, with TestClient's request methods."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = aiohttp.ClientSession()

    def make_url(self, path: str) -> str:
        return self.base_url + path

    def request(self, method: str, path: str, **kwargs: Any) -> _RequestContextManager:
        return self.session.request(method, self.base_url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> _RequestContextManager:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> _RequestContextManager:
        return self.request("POST", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> _RequestContextManager:
        return self.request("HEAD", path, **kwargs)


@dataclass
class RunningGateway:
    """A gateway under test: its proxy client, admin client and live state."""

    client: LoopbackClient
    admin: TestClient[Any, Any]
    state: Gateway
    server: HttpServer
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        return self.client.base_url

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(aiohttp_client: AiohttpClient) -> AsyncIterator[StartGateway]:
    """Start a gateway in front of upstreams: `await start_gateway(a.spec, b.spec, retry={...})`.

    The proxy runs on the gateway's own HTTP server on a free loopback port, as in production.
    """
    started: list[RunningGateway] = []

    async def start(*upstreams: str | dict[str, Any], **overrides: Any) -> RunningGateway:
        registry = CollectorRegistry()
        settings = settings_for(*upstreams, **{"host": "127.0.0.1", "port": 0, **overrides})
        gateway = build_gateway(settings, registry=registry)
        await gateway.start()
        server = await start_proxy_server(gateway)
        client = LoopbackClient(f"http://127.0.0.1:{server.port}")
        admin = await aiohttp_client(create_admin_app(gateway))
        running = RunningGateway(client, admin, gateway, server, registry)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.client.session.close()
        await running.server.shutdown(0)
        await running.state.close()


@pytest.fixture
def chat_body() -> Iterator[dict[str, Any]]:
    """A small chat completion request."""
    yield {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}
