"""Authentication and tenant isolation: API keys, HS256 and RS256 JWTs, admins, open mode."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from jobs_api.app import create_app
from jobs_api.auth import AuthConfigError
from jobs_api.models import JobStatus
from tests.conftest import AiohttpClient
from tests.jobs_api.conftest import JobsSettingsFactory
from tests.jobs_api.test_routes import JobsHarness, StartJobs, inference, jobs_starter

SECRET = "test-secret-with-enough-entropy-0123456789"
API_KEYS: dict[str, Any] = {
    "key-a": {"tenant": "org-a", "roles": ["user"]},
    "key-b": {"tenant": "org-b"},
    "key-admin": {"tenant": "ops", "roles": ["user", "admin"]},
}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
ADMIN = {"Authorization": "Bearer key-admin"}


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """Start a jobs app: `await start_jobs(start_runner=False, **settings)`."""
    return jobs_starter(aiohttp_client, jobs_settings)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    base = {"sub": "user-1", "exp": int(time.time()) + 300}
    return jwt.encode({**base, **claims}, secret, algorithm="HS256")


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hand_signed_hs256(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token built by hand (PyJWT refuses to use a PEM key as an HMAC secret)."""
    signing_input = b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + b"." + b64url(orjson.dumps(claims))
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64url(signature)).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def listed_ids(jobs: JobsHarness, headers: dict[str, str]) -> set[str]:
    resp = await jobs.client.get("/v1/jobs", headers=headers)
    assert resp.status == 200, await resp.text()
    return {j["id"] for j in (await resp.json())["jobs"]}


async def assert_unauthorized(resp: Any, words: str = "") -> None:
    assert resp.status == 401, await resp.text()
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    error = (await resp.json())["error"]
    assert error["type"] == "unauthorized"
    assert words.lower() in error["message"].lower(), error


async def test_tenants_see_only_their_own_jobs(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, api_keys=API_KEYS)
    job_a = await jobs.submit(inference(), headers=A)
    job_b = await jobs.submit(inference(), headers=B)
    assert job_a["tenant"] == "org-a"
    assert job_b["tenant"] == "org-b"

    base = f"/v1/jobs/{job_a['id']}"
    for method, path in [
        ("GET", base),
        ("GET", f"{base}/result"),
        ("GET", f"{base}/events"),
        ("GET", f"{base}/logs"),
        ("POST", f"{base}/cancel"),
        ("DELETE", base),
    ]:
        resp = await jobs.client.request(method, path, headers=B)
        assert resp.status == 404, (method, path, await resp.text())
        body = await resp.json()
        assert body["error"] == {"type": "not_found", "message": f"job {job_a['id']} not found"}
    assert (await jobs.get(job_a["id"], headers=A))["status"] == "queued"  # B's cancel did nothing

    assert await listed_ids(jobs, A) == {job_a["id"]}
    assert await listed_ids(jobs, B) == {job_b["id"]}


async def test_admin_sees_and_cancels_every_tenants_jobs(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, api_keys=API_KEYS)
    job_a = await jobs.submit(inference(), headers=A)
    job_b = await jobs.submit(inference(), headers=B)
    assert await listed_ids(jobs, ADMIN) == {job_a["id"], job_b["id"]}
    assert (await jobs.get(job_b["id"], headers=ADMIN))["tenant"] == "org-b"
    resp = await jobs.client.post(f"/v1/jobs/{job_a['id']}/cancel", headers=ADMIN)
    assert resp.status == 202
    assert (await jobs.get(job_a["id"], headers=A))["status"] == "cancelled"


async def test_idempotency_keys_are_scoped_per_tenant(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, api_keys=API_KEYS)
    key = {"Idempotency-Key": "same-key"}
    first_a = await jobs.submit(inference(), headers={**A, **key})
    first_b = await jobs.submit(inference(), headers={**B, **key})
    again_a = await jobs.submit(inference(), headers={**A, **key})
    assert first_a["id"] != first_b["id"]
    assert again_a["id"] == first_a["id"]
    assert await jobs.counts() == {JobStatus.QUEUED: 2}


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "missing credentials"),
        ({"Authorization": "Bearer"}, "Bearer"),
        ({"Authorization": "Basic a2V5LWE6"}, "scheme"),
        ({"Authorization": "Bearer key-c"}, "invalid API key"),
        ({"Authorization": "Bearer key-a "}, ""),  # trailing space is stripped: this one passes
        (bearer(hs256({"org": "org-a"}, secret="another-secret-of-the-same-length-0000")), "Signature"),
        (bearer(hs256({"org": "org-a", "exp": int(time.time()) - 3600})), "expired"),
        (bearer(hs256({"org": "org-a", "nbf": int(time.time()) + 3600})), "not yet valid"),
        (bearer(hs256({"org": "org-a", "exp": None})), "exp"),
        (bearer(hs256({"roles": ["user"]})), "'org'"),
        (bearer(hs256({"org": "org-a", "sub": ""})), "sub"),
        (bearer(hs256({"org": "org-a"})[:-4] + "AAAA"), "Signature"),
        (bearer("not.a.jwt"), "invalid token"),
    ],
)
async def test_bad_credentials_are_401_with_www_authenticate(
    start_jobs: StartJobs, headers: dict[str, str], words: str
) -> None:
    jobs = await start_jobs(start_runner=False, api_keys=API_KEYS, jwt_hs256_secret=SECRET)
    resp = await jobs.client.get("/v1/jobs", headers=headers)
    if headers.get("Authorization") == "Bearer key-a ":
        assert resp.status == 200
        return
    await assert_unauthorized(resp, words)
    resp = await jobs.client.post("/v1/jobs", json=inference(), headers=headers)
    await assert_unauthorized(resp)
    assert await jobs.counts() == {}


async def test_probes_and_metrics_need_no_credentials(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, api_keys=API_KEYS)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await jobs.client.get(path)).status == 200, path
    await assert_unauthorized(await jobs.client.get("/v1/jobs"))


async def test_hs256_jwt_carries_tenant_and_roles(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(
        start_runner=False,
        api_keys=API_KEYS,
        jwt_hs256_secret=SECRET,
        jwt_audience="jobs",
        jwt_issuer="https://issuer.test",
    )
    claims = {"aud": "jobs", "iss": "https://issuer.test"}
    user_a = bearer(hs256({**claims, "org": "org-a", "roles": ["user"]}))
    job = await jobs.submit(inference(), headers=user_a)
    assert job["tenant"] == "org-a"
    # An API key of the same tenant sees the JWT user's job: tenants, not credentials, own jobs.
    assert (await jobs.get(job["id"], headers=A))["id"] == job["id"]
    other = bearer(hs256({**claims, "org": "org-b"}))
    assert (await jobs.client.get(f"/v1/jobs/{job['id']}", headers=other)).status == 404

    admin = bearer(hs256({**claims, "roles": ["admin"]}))  # no org: fine for an admin
    b_job = await jobs.submit(inference(), headers=B)
    assert await listed_ids(jobs, admin) == {job["id"], b_job["id"]}

    wrong_aud = bearer(hs256({"aud": "other", "iss": "https://issuer.test", "org": "org-a"}))
    await assert_unauthorized(await jobs.client.get("/v1/jobs", headers=wrong_aud), "audience")
    wrong_iss = bearer(hs256({"aud": "jobs", "iss": "https://evil.test", "org": "org-a"}))
    await assert_unauthorized(await jobs.client.get("/v1/jobs", headers=wrong_iss), "issuer")
    no_aud = bearer(hs256({"org": "org-a", "iss": "https://issuer.test"}))
    await assert_unauthorized(await jobs.client.get("/v1/jobs", headers=no_aud), "aud")


async def test_rs256_jwt_is_verified_with_the_public_key(
    start_jobs: StartJobs, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = public_pem(rsa_key)
    jobs = await start_jobs(start_runner=False, jwt_rs256_public_key=pem, jwt_tenant_claim="tenant")
    exp = int(time.time()) + 300
    token = jwt.encode({"sub": "svc", "tenant": "org-r", "exp": exp}, rsa_key, algorithm="RS256")
    job = await jobs.submit(inference(), headers=bearer(token))
    assert job["tenant"] == "org-r"
    assert await listed_ids(jobs, bearer(token)) == {job["id"]}

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "svc", "tenant": "org-r", "exp": exp}, stranger, algorithm="RS256")
    await assert_unauthorized(await jobs.client.get("/v1/jobs", headers=bearer(forged)), "Signature")
    # HS256 is not configured: a token "signed" with the public key as an HMAC secret is refused.
    confused = hand_signed_hs256({"sub": "svc", "tenant": "org-r", "exp": exp}, pem.encode())
    await assert_unauthorized(await jobs.client.get("/v1/jobs", headers=bearer(confused)), "HS256")
    claims = b64url(orjson.dumps({"sub": "svc", "tenant": "org-r", "exp": exp}))
    unsigned = (b64url(b'{"alg": "none"}') + b"." + claims + b".").decode()
    await assert_unauthorized(await jobs.client.get("/v1/jobs", headers=bearer(unsigned)), "none")


async def test_rs256_public_key_with_escaped_newlines_is_accepted(
    start_jobs: StartJobs, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = public_pem(rsa_key).replace("\n", "\\n")  # as it often arrives through an env variable
    jobs = await start_jobs(start_runner=False, jwt_rs256_public_key=pem)
    token = jwt.encode({"sub": "s", "org": "o", "exp": int(time.time()) + 60}, rsa_key, algorithm="RS256")
    assert (await jobs.client.get("/v1/jobs", headers=bearer(token))).status == 200


def test_unusable_rs256_key_is_refused_at_start(jobs_settings: JobsSettingsFactory) -> None:
    with pytest.raises(AuthConfigError, match="jwt_rs256_public_key"):
        create_app(jobs_settings(jwt_rs256_public_key="-----BEGIN PUBLIC KEY-----\nnope\n"))


async def test_open_mode_without_credentials_warns_and_sees_everything(
    start_jobs: StartJobs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jobs_api.app")
    jobs = await start_jobs(start_runner=False)
    assert any("open to anyone" in r.getMessage() for r in caplog.records)
    job = await jobs.submit(inference())
    assert job["tenant"] is None
    # Whatever is sent as credentials is ignored in open mode.
    assert (await jobs.get(job["id"], headers={"Authorization": "Bearer whatever"}))["id"] == job["id"]
    assert await listed_ids(jobs, {}) == {job["id"]}


async def test_secured_mode_logs_no_open_warning(
    start_jobs: StartJobs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jobs_api.app")
    await start_jobs(start_runner=False, api_keys=API_KEYS)
    assert not any("open to anyone" in r.getMessage() for r in caplog.records)
