"""The README's hosted-provider examples, run as written: Azure OpenAI (v1 API), OpenAI, both together.

The YAML blocks are read from README.md, section "Hosted providers". Only the upstream hosts change:
each becomes a loopback mock-inference server (over TLS with a trustme CA for the https ones, and
mounted under `/openai` for Azure), and `tls_ca_file` is added so the gateway trusts that CA.
Everything else, paths, headers, `models`, aliases and fallbacks, is the documented text.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.config import load_settings
from gateway.testing.mock_inference import (
    MOCK_BEHAVIOUR,
    MOCK_STATS,
    MockBehaviour,
    MockStats,
    create_mock_app,
)
from tests.conftest import RunningGateway, StartGateway

README = Path(__file__).resolve().parents[2] / "README.md"
AZURE_KEY = "azure-key-0123456789abcdef"
OPENAI_KEY = "sk-openai-test-0123456789"
HOSTS = {"name.openai.azure.com": "azure", "api.openai.com": "openai", "vllm.inference:8000": "vllm"}


def documented_examples() -> list[dict[str, Any]]:
    """The YAML blocks of the README's "Hosted providers" section, parsed."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n### Hosted providers\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    return [yaml.safe_load(b) for b in blocks]


@dataclass
class Provider:
    """A mock provider on loopback and the requests it received."""

    origin: str
    behaviour: MockBehaviour
    stats: MockStats
    posts: list[str] = field(default_factory=list)

    def last_body(self) -> dict[str, Any]:
        assert self.stats.last_body is not None
        body: dict[str, Any] = orjson.loads(self.stats.last_body)
        return body

    def last_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in (self.stats.last_headers or {}).items()}


StartProvider = Callable[[str, str, bool], Awaitable[Provider]]


@pytest.fixture
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def start_provider(tls_ca: trustme.CA) -> AsyncIterator[StartProvider]:
    """Start mock-inference as a provider: `await start_provider("azure", "/openai", True)`."""
    servers: list[TestServer] = []

    async def start(name: str, prefix: str, tls: bool) -> Provider:
        mock = create_mock_app(MockBehaviour(name=name), seed=0)
        posts: list[str] = []

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST":
                posts.append(request.path)
            response: web.StreamResponse = await handler(request)
            return response

        app = mock
        if prefix:  # the provider's API lives under a path, as Azure's /openai/v1/...
            app = web.Application()
            app.add_subapp(prefix, mock)
        app.middlewares.append(record)
        context = None
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_ca.issue_cert("127.0.0.1").configure_cert(context)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(ssl=context)
        servers.append(server)
        origin = f"{'https' if tls else 'http'}://127.0.0.1:{server.port}"
        return Provider(origin, mock[MOCK_BEHAVIOUR], mock[MOCK_STATS], posts)

    yield start
    for server in servers:
        await server.close()


async def providers_for(config: dict[str, Any], start_provider: StartProvider) -> dict[str, Provider]:
    """One mock per documented host, with the path prefix and scheme the example uses."""
    out = {}
    for up in config["upstreams"]:
        url = URL(up["url"])
        name = HOSTS[url.raw_authority]
        out[name] = await start_provider(name, url.path.rstrip("/"), url.scheme == "https")
    return out


def on_loopback(config: dict[str, Any], providers: dict[str, Provider], ca_file: str) -> dict[str, Any]:
    """The documented config with each upstream's host replaced by its mock's (path kept)."""
    upstreams = []
    for up in config["upstreams"]:
        url = URL(up["url"])
        mock = providers[HOSTS[url.raw_authority]]
        moved = {**up, "url": mock.origin + url.raw_path.rstrip("/")}
        if url.scheme == "https":
            moved["tls_ca_file"] = ca_file
        upstreams.append(moved)
    return {**config, "upstreams": upstreams}


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)


async def started(
    index: int, start_provider: StartProvider, start_gateway: StartGateway, ca_file: str, tmp_path: Path
) -> tuple[RunningGateway, dict[str, Provider]]:
    """The gateway running README example `index` in front of its mock providers."""
    examples = documented_examples()
    assert len(examples) == 3, "the README's Hosted providers section should have three YAML examples"
    documented = examples[index]
    providers = await providers_for(documented, start_provider)
    config = on_loopback(documented, providers, ca_file)
    # As a config file it loads too (the environment provides the keys).
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert [u.url for u in load_settings(config_file=path).upstreams] == [
        u["url"] for u in config["upstreams"]
    ]
    rest = {k: v for k, v in config.items() if k != "upstreams"}
    return await start_gateway(*config["upstreams"], **rest), providers


async def chat(gw: RunningGateway, model: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with gw.client.post("/v1/chat/completions", json=body, headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def test_readme_azure_openai_example_rewrites_deployment_and_sends_api_key(
    start_provider: StartProvider, start_gateway: StartGateway, ca_file: str, tmp_path: Path
) -> None:
    gw, providers = await started(0, start_provider, start_gateway, ca_file, tmp_path)
    azure = providers["azure"]
    status, headers, answer = await chat(gw, "gpt-4o")
    assert status == 200, answer
    assert azure.posts == ["/openai/v1/chat/completions"]  # the v1 API's path under the base URL
    assert azure.last_body()["model"] == "gpt-4o-prod-east"  # the deployment name
    assert azure.last_headers()["api-key"] == AZURE_KEY
    assert headers["X-Gateway-Model"] == "gpt-4o"
    status, _, _ = await chat(gw, "gpt-4o-mini")
    assert status == 200 and azure.last_body()["model"] == "gpt-4o-mini-batch"
    # A model without a deployment is refused by the gateway, not sent to Azure.
    status, _, answer = await chat(gw, "gpt-5")
    assert status == 404 and answer["error"]["type"] == "model_not_found"
    assert len(azure.posts) == 2
    assert azure.stats.health_checks == 0  # health_path: null


async def test_readme_openai_example_sends_its_own_bearer_key(
    start_provider: StartProvider, start_gateway: StartGateway, ca_file: str, tmp_path: Path
) -> None:
    gw, providers = await started(1, start_provider, start_gateway, ca_file, tmp_path)
    openai = providers["openai"]
    status, _, answer = await chat(gw, "gpt-4o-mini", {"Authorization": "Bearer client-placeholder"})
    assert status == 200, answer
    assert openai.posts == ["/v1/chat/completions"]
    assert openai.last_headers()["authorization"] == f"Bearer {OPENAI_KEY}"  # replaces the client's
    assert openai.last_body()["model"] == "gpt-4o-mini"  # no models: passed through as sent
    assert openai.stats.health_checks == 0


async def test_readme_combined_example_routes_by_model_and_fails_over_to_openai(
    start_provider: StartProvider, start_gateway: StartGateway, ca_file: str, tmp_path: Path
) -> None:
    gw, providers = await started(2, start_provider, start_gateway, ca_file, tmp_path)
    vllm, azure, openai = providers["vllm"], providers["azure"], providers["openai"]
    status, headers, _ = await chat(gw, "llama")  # an alias
    assert status == 200 and vllm.posts == ["/v1/chat/completions"]
    assert vllm.last_body()["model"] == "meta-llama/Llama-3.1-70B-Instruct"
    assert headers["X-Gateway-Model"] == "meta-llama/Llama-3.1-70B-Instruct"
    assert "api-key" not in vllm.last_headers()  # a provider's key goes to that provider only
    status, _, _ = await chat(gw, "gpt-4o")
    assert status == 200 and azure.last_body()["model"] == "gpt-4o-prod-east"
    assert openai.posts == []  # tier 1 is not used while Azure serves
    # Azure fails: the same model from OpenAI (tier 1), under OpenAI's name for it.
    azure.behaviour.error_rate, azure.behaviour.error_status = 1.0, 503
    status, headers, answer = await chat(gw, "gpt-4o")
    assert status == 200, answer
    assert openai.posts == ["/v1/chat/completions"] and openai.last_body()["model"] == "gpt-4o"
    assert openai.last_headers()["authorization"] == f"Bearer {OPENAI_KEY}"
    assert headers["X-Gateway-Model"] == "gpt-4o"
    # gpt-4o-mini is served only by OpenAI.
    status, _, _ = await chat(gw, "gpt-4o-mini")
    assert status == 200 and openai.last_body()["model"] == "gpt-4o-mini"
