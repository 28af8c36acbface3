"""Egress through a forward proxy: HTTPS_PROXY / HTTP_PROXY / NO_PROXY and per-upstream `proxy`.

The decisions are pure functions tested without sockets. The data path and the prober are then
run against a real forward proxy (tests/gateway/forward_proxy.py) and real upstreams on
loopback: the mock inference server over http, and the same over TLS with a trustme CA.
"""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from aiohttp.test_utils import TestServer

from gateway.config import ConfigError, load_settings
from gateway.http.egress import ProxyConfig, parse_no_proxy, parse_proxy_url, select_proxy
from gateway.testing.mock_inference import MockBehaviour, create_mock_app
from tests.conftest import RunningGateway, StartGateway, StartMock, free_port
from tests.gateway.forward_proxy import ForwardProxy
from tests.gateway.test_cli import CHAT, SERVING_RE, Proc, clean_env, gateway_cmd, run_gateway

# --- pure decisions ---------------------------------------------------------------------------


def test_parse_proxy_url_credentials_default_port_and_bare_host() -> None:
    proxy = parse_proxy_url("http://us%40er:p%3Ass@proxy.corp:3128")
    assert proxy == ProxyConfig("proxy.corp", 3128, "us@er", "p:ss")
    assert proxy.url == "http://proxy.corp:3128"  # no credentials in what is logged
    assert proxy.authorization == b"Basic " + base64.b64encode(b"us@er:p:ss")
    assert parse_proxy_url("proxy.corp:8080") == ProxyConfig("proxy.corp", 8080)
    assert parse_proxy_url("http://proxy.corp/") == ProxyConfig("proxy.corp", 80)
    assert parse_proxy_url("http://[fd00::1]:3128").url == "http://[fd00::1]:3128"
    assert parse_proxy_url("http://proxy:1").authorization is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("socks5://user:secret@proxy:1080", ("socks5://", "not supported")),
        ("https://proxy:443", ("https://", "not supported")),
        ("http://proxy:3128/path", ("path",)),
        ("http://:3128", ("no host",)),
        ("http://proxy:port", ("not a URL",)),
        ("", ("empty",)),
    ],
)
def test_parse_proxy_url_rejects_what_it_cannot_use(value: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as err:
        parse_proxy_url(value)
    for word in words:
        assert word in str(err.value)
    assert "secret" not in str(err.value)  # credentials are never echoed


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("*", "api.openai.com", 443, True),
        ("localhost, *", "api.openai.com", 443, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        (".example.com", "a.b.example.com", 443, True),
        ("*.example.com", "api.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        ("example.com", "example.com.evil.net", 443, False),
        ("EXAMPLE.com.", "Api.Example.COM", 443, True),
        (" foo.internal ,example.com ", "example.com", 80, True),
        ("example.com:8443", "example.com", 8443, True),
        ("example.com:8443", "example.com", 443, False),
        ("10.1.2.3", "10.1.2.3", 80, True),
        ("10.1.2.3", "10.1.2.4", 80, False),
        ("10.0.0.0/8", "10.200.0.1", 80, True),
        ("10.0.0.0/8", "11.0.0.1", 80, False),
        ("10.0.0.0/8:8000", "10.0.0.1", 8000, True),
        ("10.0.0.0/8:8000", "10.0.0.1", 9000, False),
        ("fd00::/8", "fd12::1", 443, True),
        ("::1", "[::1]", 443, True),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "::1", 8081, False),
        ("10.0.0.0/8", "ten.internal", 80, False),  # names are not resolved
        ("foo:bar, [::1, /99, :80", "foo", 80, False),  # malformed entries never match
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy_matching(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    assert parse_no_proxy(no_proxy).bypasses(host, port) is bypass


P = ProxyConfig("proxy", 3128)
Q = ProxyConfig("other", 8080)


@pytest.mark.parametrize(
    ("url", "setting", "env", "expected"),
    [
        ("https://api.openai.com", None, {}, None),
        ("https://api.openai.com", None, {"HTTPS_PROXY": "http://proxy:3128"}, P),
        ("http://vllm:8000", None, {"HTTPS_PROXY": "http://proxy:3128"}, None),  # scheme's own variable
        ("http://vllm:8000", None, {"HTTP_PROXY": "http://proxy:3128"}, P),
        ("http://vllm:8000", None, {"http_proxy": "proxy:3128", "HTTP_PROXY": "other:8080"}, P),
        ("https://a.io", None, {"https_proxy": "proxy:3128", "HTTPS_PROXY": "other:8080"}, P),
        # Set but empty, the lowercase name still wins: no proxy.
        ("https://a.io", None, {"https_proxy": "", "HTTPS_PROXY": "proxy:3128"}, None),
        ("https://a.io", None, {"HTTPS_PROXY": "proxy:3128", "NO_PROXY": "a.io"}, None),
        ("https://a.io", None, {"HTTPS_PROXY": "proxy:3128", "NO_PROXY": "a.io:443"}, None),
        ("https://a.io:8443", None, {"HTTPS_PROXY": "proxy:3128", "NO_PROXY": "a.io:443"}, P),
        ("http://a.io", None, {"HTTP_PROXY": "proxy:3128", "NO_PROXY": "a.io:80"}, None),
        ("https://a.io", None, {"HTTPS_PROXY": "proxy:3128", "no_proxy": "", "NO_PROXY": "*"}, P),
        # The upstream's own setting beats the environment, NO_PROXY included.
        ("https://a.io", "none", {"HTTPS_PROXY": "proxy:3128"}, None),
        ("https://a.io", "NONE", {"HTTPS_PROXY": "proxy:3128"}, None),
        ("https://a.io", "http://other:8080", {"HTTPS_PROXY": "proxy:3128", "NO_PROXY": "*"}, Q),
        ("http://a.io", "http://other:8080", {}, Q),
    ],
)
def test_select_proxy(
    url: str, setting: str | None, env: dict[str, str], expected: ProxyConfig | None
) -> None:
    assert select_proxy(url, setting, env) == expected


def test_select_proxy_error_names_the_variable_and_hides_credentials() -> None:
    with pytest.raises(ValueError) as err:
        select_proxy("https://a.io", None, {"https_proxy": "socks5h://me:hunter2@proxy:1080"})
    assert str(err.value).startswith("https_proxy ")
    assert "hunter2" not in str(err.value)


# --- configuration ----------------------------------------------------------------------------


def test_config_bad_proxy_variable_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy:1080")
    with pytest.raises(ConfigError) as err:
        load_settings({"upstreams": ["openai=https://api.openai.com"]})
    assert "HTTPS_PROXY" in str(err.value) and "'openai'" in str(err.value)
    # Not used by any upstream (all are http): not an error.
    assert load_settings({"upstreams": ["http://127.0.0.1:1"]}).upstreams[0].proxy is None


def test_config_upstream_proxy_and_ca_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("PROXY_PASSWORD", "s3cret")
    s = load_settings(
        {
            "upstreams": [
                {
                    "url": "https://a.io",
                    "proxy": "http://gw:${PROXY_PASSWORD}@proxy:3128",
                    "tls_ca_file": str(ca_file),
                },
                {"url": "https://b.io", "proxy": " None "},
            ]
        }
    )
    assert s.upstreams[0].proxy == "http://gw:s3cret@proxy:3128"
    assert s.upstreams[0].tls_ca_file == str(ca_file)
    assert s.upstreams[1].proxy == "none"


@pytest.mark.parametrize(
    ("upstream", "words"),
    [
        ({"url": "https://a.io", "proxy": "socks5://p:1"}, ("upstreams.0.proxy", "not supported")),
        (
            {"url": "https://a.io", "tls_ca_file": "/nonexistent/ca.pem"},
            ("upstreams.0.tls_ca_file", "CA file"),
        ),
    ],
)
def test_config_bad_upstream_egress_names_the_field(upstream: dict[str, Any], words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"upstreams": [upstream]})
    for word in words:
        assert word in str(err.value)


def test_config_ca_file_on_an_http_upstream_is_refused(ca_file: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"upstreams": [{"url": "http://a.io", "tls_ca_file": ca_file}]})
    assert "upstreams.0" in str(err.value) and "tls_ca_file" in str(err.value)
    assert "not an https URL" in str(err.value)


def test_config_ca_file_that_is_not_pem_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as err:
        load_settings({"upstreams": [{"url": "https://a.io", "tls_ca_file": str(bad)}]})
    assert "upstreams.0.tls_ca_file" in str(err.value)


def test_cli_bad_proxy_variable_exits_with_one_line(tmp_path: Path) -> None:
    env = clean_env(HTTPS_PROXY="socks5://user:hunter2@127.0.0.1:1080")
    result = run_gateway("--upstream", "https://127.0.0.1:1", env=env, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: ") and "HTTPS_PROXY" in lines[0]
    assert "hunter2" not in lines[0]


# --- the data path and the prober through a real proxy ----------------------------------------


@pytest.fixture
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def start_tls_mock(tls_ca: trustme.CA) -> AsyncIterator[Any]:
    """Start the mock inference server over TLS (a cert for 127.0.0.1 from `tls_ca`)."""
    servers: list[TestServer] = []

    async def start(name: str) -> str:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_ca.issue_cert("127.0.0.1").configure_cert(context)
        server = TestServer(create_mock_app(MockBehaviour(name=name), seed=0), host="127.0.0.1")
        await server.start_server(ssl=context)
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    async with ForwardProxy(credentials=("gw", "p@ss:word")) as p:
        yield p


def with_credentials(proxy: ForwardProxy) -> str:
    return f"http://gw:p%40ss%3Aword@127.0.0.1:{proxy.port}"


AUTH = "Basic " + base64.b64encode(b"gw:p@ss:word").decode()


async def chat(gw: RunningGateway, n: int = 1) -> list[str]:
    """Send `n` chat completions; the `upstream` that answered each."""
    served = []
    for _ in range(n):
        async with gw.client.post("/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200, await resp.text()
            served.append(resp.headers["X-Gateway-Upstream"])
            await resp.read()
    return served


def connect_errors(gw: RunningGateway, name: str) -> float:
    return gw.sample("gateway_upstream_requests_total", {"upstream": name, "outcome": "connect_error"})


async def test_http_upstream_through_proxy_uses_absolute_form_and_keeps_alive(
    proxy: ForwardProxy, start_mock: StartMock, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await start_mock("a")
    monkeypatch.setenv("HTTP_PROXY", with_credentials(proxy))
    gw = await start_gateway({"name": "a", "url": a.url, "health_path": None})
    assert await chat(gw, 5) == ["a"] * 5
    authority = a.url.removeprefix("http://")
    assert [(r.method, r.target) for r in proxy.requests] == [("POST", f"{a.url}/v1/chat/completions")] * 5
    for r in proxy.requests:
        assert r.headers["host"] == authority
        assert r.headers["proxy-authorization"] == AUTH
    assert {r.conn for r in proxy.requests} == {0}  # one kept-alive connection to the proxy
    assert a.stats.requests == 5
    assert a.stats.last_headers is not None and "Proxy-Authorization" not in a.stats.last_headers


async def test_https_upstream_through_connect_tunnel(
    proxy: ForwardProxy,
    start_tls_mock: Any,
    ca_file: str,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = await start_tls_mock("t")
    monkeypatch.setenv("https_proxy", with_credentials(proxy))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # lowercase wins
    gw = await start_gateway({"name": "t", "url": url, "health_path": None, "tls_ca_file": ca_file})
    assert await chat(gw, 4) == ["t"] * 4
    authority = url.removeprefix("https://")
    # One CONNECT, with the credentials, then every request inside the same TLS tunnel.
    assert [(r.method, r.target) for r in proxy.requests] == [("CONNECT", authority)]
    assert proxy.requests[0].headers["proxy-authorization"] == AUTH
    assert proxy.requests[0].headers["host"] == authority
    assert gw.state.clients[0].idle_connections == 1


async def test_prober_uses_the_same_proxy_and_ca(
    proxy: ForwardProxy,
    start_mock: StartMock,
    start_tls_mock: Any,
    ca_file: str,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = await start_mock("a")
    tls_url = await start_tls_mock("t")
    monkeypatch.setenv("HTTP_PROXY", with_credentials(proxy))
    monkeypatch.setenv("HTTPS_PROXY", with_credentials(proxy))
    gw = await start_gateway(
        {"name": "a", "url": a.url}, {"name": "t", "url": tls_url, "tls_ca_file": ca_file}
    )
    up_a, up_t = gw.state.pool.upstreams
    assert (await gw.state.prober.check(up_a))[0].ok is True
    verdict, detail = await gw.state.prober.check(up_t)
    assert verdict.ok, detail
    seen = [(r.method, r.target, r.headers.get("proxy-authorization")) for r in proxy.requests]
    assert ("GET", f"{a.url}/health", AUTH) in seen
    assert ("CONNECT", tls_url.removeprefix("https://"), AUTH) in seen
    assert a.stats.health_checks >= 1


async def test_no_proxy_bypasses_the_proxy(
    proxy: ForwardProxy, start_mock: StartMock, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await start_mock("a")
    monkeypatch.setenv("HTTP_PROXY", with_credentials(proxy))
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.0/8")
    gw = await start_gateway({"name": "a", "url": a.url})
    assert await chat(gw, 2) == ["a", "a"]
    assert (await gw.state.prober.check(gw.state.pool.upstreams[0]))[0].ok is True
    assert proxy.requests == [] and proxy.accepted == 0


async def test_refused_proxy_is_a_connect_error_and_fails_over(
    start_mock: StartMock, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens
    gw = await start_gateway(
        {"name": "a", "url": a.url, "health_path": None},
        # Opts out of the environment's proxy.
        {"name": "b", "url": b.url, "health_path": None, "priority": 1, "proxy": "none"},
    )
    assert await chat(gw) == ["b"]
    # A refused connection is not retried on that upstream while another can serve.
    assert connect_errors(gw, "a") == 1 and connect_errors(gw, "b") == 0
    assert a.stats.requests == 0


@pytest.mark.parametrize("case", ["forbidden", "no_credentials"])
async def test_non_2xx_connect_is_a_connect_error_and_fails_over(
    case: str,
    start_tls_mock: Any,
    ca_file: str,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, u = await start_tls_mock("t"), await start_tls_mock("u")
    if case == "forbidden":
        fake = ForwardProxy(connect_status=403)
    else:
        fake = ForwardProxy(credentials=("gw", "right"))
    async with fake as p:
        monkeypatch.setenv("HTTPS_PROXY", p.url)  # no credentials
        async with ForwardProxy() as good:
            gw = await start_gateway(
                {"name": "t", "url": t, "health_path": None, "tls_ca_file": ca_file},
                # An explicit per-upstream proxy instead of the environment's.
                {
                    "name": "u",
                    "url": u,
                    "health_path": None,
                    "priority": 1,
                    "tls_ca_file": ca_file,
                    "proxy": good.url,
                },
            )
            assert await chat(gw) == ["u"]
            assert connect_errors(gw, "t") == 1  # refused: not tried again while another can serve
            assert p.methods() == ["CONNECT"] and good.methods() == ["CONNECT"]
            await gw.state.close()  # before the proxies go


async def test_tls_through_tunnel_still_verifies_the_upstream(
    proxy: ForwardProxy,
    start_tls_mock: Any,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the test CA the upstream's certificate is refused: TLS runs end to end, not at the proxy."""
    t = await start_tls_mock("t")
    monkeypatch.setenv("HTTPS_PROXY", with_credentials(proxy))
    gw = await start_gateway({"name": "t", "url": t, "health_path": None})
    async with gw.client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status in (502, 503)
    assert connect_errors(gw, "t") >= 1
    assert proxy.methods()[0] == "CONNECT"


# --- the real `gateway` process (uvloop) ------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[list[str], dict[str, str]], Proc]]:
    """Start subprocesses that are killed and reaped when the test ends."""
    procs: list[Proc] = []

    def start(args: list[str], env: dict[str, str]) -> Proc:
        procs.append(Proc(args, env, tmp_path))
        return procs[-1]

    try:
        yield start
    finally:
        for proc in procs:
            proc.close()


async def test_gateway_process_reaches_https_upstream_through_proxy(
    proxy: ForwardProxy, start_tls_mock: Any, ca_file: str, spawn: Callable[[list[str], dict[str, str]], Proc]
) -> None:
    url = await start_tls_mock("t")
    upstreams = [{"name": "t", "url": url, "tls_ca_file": ca_file}]
    env = clean_env(HTTPS_PROXY=with_credentials(proxy), GATEWAY_UPSTREAMS=orjson.dumps(upstreams).decode())
    proc = spawn(gateway_cmd("--port", "0", "--admin-port", "0", "--health-interval", "60"), env)
    port = int((await proc.wait_line(SERVING_RE)).group(1))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["X-Gateway-Upstream"] == "t"
    connects = [r for r in proxy.requests if r.method == "CONNECT"]
    assert connects and all(r.headers["proxy-authorization"] == AUTH for r in connects)
    assert proxy.methods() == ["CONNECT"] * len(connects)


async def test_demo_ignores_a_proxy_in_the_environment(
    spawn: Callable[[list[str], dict[str, str]], Proc],
) -> None:
    """The demo's upstreams are local mocks: an HTTP_PROXY left in the shell must not break it."""
    env = clean_env(HTTP_PROXY=f"http://127.0.0.1:{free_port()}")
    proc = spawn(gateway_cmd("demo", "--port", "0", "--admin-port", "0"), env)
    match = await proc.wait_line(
        re.compile(r"curl -si (http://127\.0\.0\.1:\d+)/v1/chat/completions"), stream="stdout"
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{match.group(1)}/v1/chat/completions", json=CHAT) as resp,
    ):
        assert resp.status == 200, await resp.text()
