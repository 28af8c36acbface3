"""JWTs verified against a real JWKS endpoint on loopback, with keys generated here; rotation."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from jobs_api.app import create_app
from jobs_api.config import ApiKey
from tests.conftest import AiohttpClient, AiohttpServer, free_port
from tests.jobs_api.conftest import JobsSettingsFactory

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class Issuer:
    """A token issuer: its keys by kid, the subset it publishes, and how often the set was fetched."""

    keys: dict[str, PrivateKey] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    fetches: int = 0
    delay_s: float = 0.0

    def add(self, kid: str, kind: str = "rsa") -> None:
        self.keys[kid] = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if kind == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        self.published.append(kid)

    def jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        if isinstance(key, rsa.RSAPrivateKey):
            data = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            data["alg"] = "RS256"
        else:
            data = json.loads(ECAlgorithm.to_jwk(key.public_key()))
            data["alg"] = "ES256"
        return {**data, "kid": kid, "use": "sig"}

    async def serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response({"keys": [self.jwk(kid) for kid in self.published]})

    def token(self, kid: str, *, signer: str | None = None, **claims: Any) -> str:
        key = self.keys[signer or kid]
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        body = {"sub": "user-1", "org": "org-a", "exp": int(time.time()) + 300, **claims}
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


async def start_issuer(aiohttp_server: AiohttpServer, issuer: Issuer) -> str:
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", issuer.serve)
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("/.well-known/jwks.json"))


async def jobs_app(
    aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory, jwks_url: str, **overrides: Any
) -> TestClient[Any, Any]:
    settings = jobs_settings(**{"jwt_jwks_url": jwks_url, "jwt_jwks_refresh_cooldown_s": 0, **overrides})
    return await aiohttp_client(create_app(settings, start_runner=False))


async def status_of(client: TestClient[Any, Any], token: str) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"})
    return resp.status, await resp.json()


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_jwks_token_accepted(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    jobs_settings: JobsSettingsFactory,
    kind: str,
) -> None:
    issuer = Issuer()
    issuer.add("k1", kind)
    client = await jobs_app(aiohttp_client, jobs_settings, await start_issuer(aiohttp_server, issuer))
    status, body = await status_of(client, issuer.token("k1"))
    assert status == 200, body
    resp = await client.post(
        "/v1/jobs",
        json={"type": "inference", "input": {"path": "/v1/models"}},
        headers={"Authorization": f"Bearer {issuer.token('k1')}"},
    )
    assert (await resp.json())["tenant"] == "org-a"
    for _ in range(5):
        assert (await status_of(client, issuer.token("k1")))[0] == 200
    assert issuer.fetches == 1  # the set is cached


async def test_jwks_rotation_needs_no_restart(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory
) -> None:
    issuer = Issuer()
    issuer.add("k1")
    client = await jobs_app(aiohttp_client, jobs_settings, await start_issuer(aiohttp_server, issuer))
    assert (await status_of(client, issuer.token("k1")))[0] == 200
    issuer.add("k2", "ec")
    issuer.published = ["k2"]  # k1 retired
    status, body = await status_of(client, issuer.token("k2"))
    assert status == 200, body
    assert issuer.fetches == 2
    status, body = await status_of(client, issuer.token("k1"))
    assert status == 401 and "k1" in body["error"]["message"]


async def test_jwks_unknown_kid_or_wrong_key_is_401(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory
) -> None:
    issuer = Issuer()
    issuer.add("k1")
    issuer.add("rogue")
    issuer.published = ["k1"]
    url = await start_issuer(aiohttp_server, issuer)
    client = await jobs_app(aiohttp_client, jobs_settings, url, jwt_jwks_refresh_cooldown_s=60)
    status, body = await status_of(client, issuer.token("rogue"))
    assert status == 401 and "unknown key id 'rogue'" in body["error"]["message"]
    # Forged: names k1 but is signed with another key.
    status, body = await status_of(client, issuer.token("k1", signer="rogue"))
    assert status == 401 and "signature" in body["error"]["message"].lower()
    # Expired, with the right key.
    status, _ = await status_of(client, issuer.token("k1", exp=int(time.time()) - 60))
    assert status == 401
    # An HS256 token naming a JWKS key is refused (no algorithm confusion).
    forged = jwt.encode(
        {"sub": "x", "org": "org-a", "exp": int(time.time()) + 60}, "s" * 32, headers={"kid": "k1"}
    )
    status, body = await status_of(client, forged)
    assert status == 401 and "HS256" in body["error"]["message"]
    # Unknown kids fetch again at most once per cooldown: no fetch storm from made-up kids.
    for n in range(5):
        issuer.add(f"made-up-{n}")
        issuer.published = ["k1"]
        assert (await status_of(client, issuer.token(f"made-up-{n}")))[0] == 401
    assert issuer.fetches <= 2


async def test_jwks_unreachable_is_503_without_hanging(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory
) -> None:
    issuer = Issuer()
    issuer.add("k1")
    down = await jobs_app(aiohttp_client, jobs_settings, f"http://127.0.0.1:{free_port()}/jwks.json")
    started = time.monotonic()
    status, body = await status_of(down, issuer.token("k1"))
    assert status == 503 and body["error"]["type"] == "jwks_unavailable"
    assert "JOBS_JWT_JWKS_URL" in body["error"]["message"]
    assert time.monotonic() - started < 2

    issuer.delay_s = 3.0  # an endpoint that accepts but does not answer
    url = await start_issuer(aiohttp_server, issuer)
    slow = await jobs_app(aiohttp_client, jobs_settings, url, jwt_jwks_timeout_s=0.5)
    started = time.monotonic()
    pending = asyncio.ensure_future(status_of(slow, issuer.token("k1")))
    await asyncio.sleep(0.1)
    health = await slow.get("/healthz")  # the event loop is not blocked by the fetch
    assert health.status == 200 and time.monotonic() - started < 0.45
    status, body = await pending
    assert status == 503 and time.monotonic() - started < 2


async def test_jwks_alongside_api_keys(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory
) -> None:
    issuer = Issuer()
    issuer.add("k1")
    url = await start_issuer(aiohttp_server, issuer)
    client = await jobs_app(aiohttp_client, jobs_settings, url, api_keys={"key-a": ApiKey(tenant="org-a")})
    assert (await status_of(client, "key-a"))[0] == 200
    assert (await status_of(client, "wrong"))[0] == 401
    assert (await status_of(client, issuer.token("k1")))[0] == 200
    assert issuer.fetches == 1
