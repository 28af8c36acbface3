"""Hostile and malformed input over real HTTP: raw sockets, the real app and the `jobs-api` process.

Bytes no HTTP client library sends (non-UTF-8 header bytes, broken request lines, half-sent
heads) go over raw loopback sockets; everything else through aiohttp. Every load loop here is
bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web

from jobs_api.app import create_app
from jobs_api.models import JobStatus
from jobs_api.server import default_max_connections, make_room
from tests.conftest import AiohttpClient
from tests.gateway.test_cli import Spawn, open_files_limits
from tests.jobs_api.conftest import JobsSettingsFactory
from tests.jobs_api.test_auth import SECRET, assert_unauthorized, bearer
from tests.jobs_api.test_cli import LISTENING_RE, clean_env, jobs_cmd, spawn, start_jobs_proc
from tests.jobs_api.test_routes import StartJobs, inference, jobs_starter

__all__ = ["spawn"]  # the fixture, imported for the tests here

API_KEYS: dict[str, Any] = {"key-a": {"tenant": "org-a"}}


@pytest.fixture
def start_jobs(aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory) -> StartJobs:
    """Start a jobs app: `await start_jobs(start_runner=False, **settings)`."""
    return jobs_starter(aiohttp_client, jobs_settings)


async def raw_exchange(port: int, data: bytes, *, within_s: float = 5.0) -> bytes:
    """Send `data` on a fresh loopback connection; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within_s)
    finally:
        writer.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.x response with a Content-Length."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body[: int(headers.get("content-length", len(body)))]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# --- item: credentials, event ids and job headers are checked before they can do harm ------------


async def test_authorization_with_non_utf8_bytes_is_401(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, api_keys=API_KEYS)
    port = port_of(jobs.base_url)
    for token in (b"\xff\xfe\xfd", b"key-a\xff", b"\xc3\x28"):
        raw = await raw_exchange(
            port,
            b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n"
            b"Connection: close\r\n\r\n",
        )
        status, headers, body = parse_response(raw)
        assert status == 401, raw
        assert headers["content-type"].startswith("application/json")
        assert headers["www-authenticate"].startswith("Bearer")
        assert orjson.loads(body)["error"]["type"] == "unauthorized"
    resp = await jobs.client.get("/v1/jobs", headers={"Authorization": "Bearer clé"})
    await assert_unauthorized(resp, "printable ASCII")
    assert (await jobs.client.get("/v1/jobs", headers={"Authorization": "Bearer key-a"})).status == 200


@pytest.mark.parametrize(
    "value",
    [
        "18446744073709551616",  # 2**64: past every 64-bit id
        "9223372036854775808",  # 2**63: past SQLite's and Redis's signed ids
        "9" * 400,
        "-1",
        "abc",
        "+5",
        "1_0",
        "\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() says yes
        "1.5",
    ],
)
async def test_bad_last_event_id_is_400_before_the_stream_starts(start_jobs: StartJobs, value: str) -> None:
    jobs = await start_jobs(start_runner=False)
    job = await jobs.submit(inference())
    path = f"/v1/jobs/{job['id']}/events"
    for resp in (
        await jobs.client.get(path, headers={"Last-Event-ID": value}),
        await jobs.client.get(path, params={"last_event_id": value}),
    ):
        assert resp.status == 400, resp.headers  # not a stream: reading it could wait for ever
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request"
        assert "Last-Event-ID" in error["message"]


async def test_largest_last_event_id_is_accepted(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    job = await jobs.submit(inference())
    assert (await jobs.client.post(f"/v1/jobs/{job['id']}/cancel")).status == 202  # ends at once
    resp = await jobs.client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(2**63 - 1)})
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    assert await resp.read() == b""  # nothing after that id; the job has ended


async def test_an_error_inside_a_started_stream_drops_the_connection_without_a_second_response(
    aiohttp_client: AiohttpClient, jobs_settings: JobsSettingsFactory
) -> None:
    app = create_app(jobs_settings(), start_runner=False)

    async def breaks_mid_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"id: 1\nevent: state\ndata: {}\n\n")
        raise RuntimeError("store went away mid-stream")

    app.router.add_get("/stream-that-breaks", breaks_mid_stream)
    client = await aiohttp_client(app)
    raw = await raw_exchange(
        port_of(str(client.server.make_url(""))), b"GET /stream-that-breaks HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.count(b"HTTP/1.") == 1, raw  # no error response written into the stream
    assert b"500" not in raw
    assert not raw.endswith(b"0\r\n\r\n")  # not a clean end: the client knows the stream broke


BAD_HEADERS: dict[str, dict[str, str]] = {
    "crlf": {"X-Trace": "a\r\nX-Injected: 1"},
    "lf": {"X-Trace": "a\nb"},
    "cr": {"X-Trace": "a\rb"},
    "nul": {"X-Trace": "a\x00b"},
    "del": {"X-Trace": "a\x7fb"},
    "escape": {"X-Trace": "\x1b[31m"},
    "crlf_in_name": {"X-Trace\r\nX-Injected": "1"},
    "space_in_name": {"X Trace": "1"},
    "colon_in_name": {"X-Trace:": "1"},
    "empty_name": {"": "1"},
    "beyond_latin1": {"X-Trace": "\u20ac"},
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
async def test_control_characters_in_job_headers_are_refused_at_submission(
    start_jobs: StartJobs, case: str
) -> None:
    jobs = await start_jobs(start_runner=False)
    headers = BAD_HEADERS[case]
    job = inference()
    job["input"]["headers"] = headers
    resp = await jobs.client.post("/v1/jobs", json=job)
    assert resp.status == 422, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == "validation_error"
    assert "input.headers" in error["message"]
    item = {"path": "/v1/chat/completions", "body": {}, "headers": headers}
    resp = await jobs.client.post("/v1/batches", json={"items": [item]})
    assert resp.status == 422, await resp.text()
    assert "headers" in (await resp.json())["error"]["message"]
    assert await jobs.counts() == {}


async def test_ordinary_job_headers_are_kept(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    job = inference()
    job["input"]["headers"] = {"X-Trace": "a\tb c", "X-Org": "café", "x_custom-1": ""}
    data = await jobs.submit(job)
    assert data["input"]["headers"] == job["input"]["headers"]
    assert await jobs.counts() == {JobStatus.QUEUED: 1}


# --- item: JWT dates are numbers, and the clock-skew leeway is a setting ------------------------


def token(**claims: Any) -> str:
    return jwt.encode({"sub": "user-1", "org": "org-a", **claims}, SECRET, algorithm="HS256")


async def test_jwt_leeway_is_the_setting_and_defaults_to_5_s(start_jobs: StartJobs) -> None:
    now = int(time.time())
    jobs = await start_jobs(start_runner=False, jwt_hs256_secret=SECRET)
    just_expired = bearer(token(exp=now - 2))
    assert (await jobs.client.get("/v1/jobs", headers=just_expired)).status == 200  # within 5 s
    await assert_unauthorized(
        await jobs.client.get("/v1/jobs", headers=bearer(token(exp=now - 20))), "expired"
    )
    await assert_unauthorized(
        await jobs.client.get("/v1/jobs", headers=bearer(token(exp=now + 300, nbf=now + 20))), "not yet valid"
    )

    strict = await start_jobs(start_runner=False, jwt_hs256_secret=SECRET, jwt_leeway_s=0)
    await assert_unauthorized(await strict.client.get("/v1/jobs", headers=just_expired), "expired")
    wide = await start_jobs(start_runner=False, jwt_hs256_secret=SECRET, jwt_leeway_s=60)
    assert (await wide.client.get("/v1/jobs", headers=bearer(token(exp=now - 20)))).status == 200


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_jwt_dates_given_as_strings_are_401(start_jobs: StartJobs, claim: str) -> None:
    now = int(time.time())
    jobs = await start_jobs(start_runner=False, jwt_hs256_secret=SECRET)
    claims: dict[str, Any] = {"exp": now + 300, "nbf": now - 10, "iat": now - 10}
    assert (await jobs.client.get("/v1/jobs", headers=bearer(token(**claims)))).status == 200
    claims[claim] = str(claims[claim])
    resp = await jobs.client.get("/v1/jobs", headers=bearer(token(**claims)))
    await assert_unauthorized(resp, claim)
    claims[claim] = True
    await assert_unauthorized(await jobs.client.get("/v1/jobs", headers=bearer(token(**claims))), claim)


def test_cli_refuses_a_negative_jwt_leeway_with_one_line() -> None:
    result = subprocess.run(
        jobs_cmd("serve"),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env=clean_env(JOBS_JWT_LEEWAY_S="-1"),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "jwt_leeway_s" in lines[0]
    assert "JOBS_JWT_LEEWAY_S" in lines[0]


# --- item: malformed HTTP is a JSON 400, logged at info -----------------------------------------

MALFORMED = {
    "bad_header_line": b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "tls_hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "garbage_method": b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad_version": b"GET /healthz HTTP/9.9.9\r\nHost: x\r\n\r\n",
    "request_line_too_long": b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad_content_length": b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n",
    "bad_chunk": b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nzz\r\n",
}


async def test_malformed_http_is_a_json_400_logged_at_info_without_traceback(
    spawn: Spawn, tmp_path: Any
) -> None:
    proc, base = await start_jobs_proc(
        spawn, "--store", f"sqlite:///{tmp_path / 'jobs.db'}", env=clean_env(JOBS_LOG_LEVEL="info")
    )
    port = port_of(base)
    for name, data in MALFORMED.items():
        raw = await raw_exchange(port, data)
        status, headers, body = parse_response(raw)
        assert status == 400, (name, raw)
        assert headers["content-type"].startswith("application/json"), (name, raw)
        error = orjson.loads(body)["error"]
        assert error["type"] == "invalid_request", (name, error)
        assert error["message"].startswith("malformed HTTP request"), (name, error)
        assert "Traceback" not in error["message"]
    # Still serving, and the log says what happened at info without a traceback.
    raw = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert parse_response(raw)[0] == 200
    deadline = time.monotonic() + 5
    while proc.output().count("INFO jobs_api.server: malformed") < len(MALFORMED):
        assert time.monotonic() < deadline, proc.output()
        await asyncio.sleep(0.05)  # the reader threads catch up with the log
    output = proc.output()
    assert "Traceback" not in output
    assert " ERROR " not in output
    assert output.count("INFO jobs_api.server: malformed HTTP request") == len(MALFORMED), output


# --- item: writes must be JSON, so a web page cannot submit through a browser (CSRF) -------------

SUBMISSION = orjson.dumps(inference())
NOT_JSON = [
    "text/plain",  # what a cross-site <form enctype="text/plain"> or a plain fetch sends
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonx",
    "application/octet-stream",
    "",
]


@pytest.mark.parametrize("mode", ["open", "api_key"])
async def test_writes_with_a_body_that_is_not_declared_json_are_415(start_jobs: StartJobs, mode: str) -> None:
    auth = {"Authorization": "Bearer key-a"} if mode == "api_key" else {}
    keys = API_KEYS if mode == "api_key" else {}
    jobs = await start_jobs(start_runner=False, api_keys=keys)
    for content_type in NOT_JSON:
        for path in ("/v1/jobs", "/v1/batches"):
            resp = await jobs.client.post(
                path, data=SUBMISSION, headers={**auth, "Content-Type": content_type}
            )
            assert resp.status == 415, (content_type, path, await resp.text())
            assert resp.content_type == "application/json"
            error = (await resp.json())["error"]
            assert error["type"] == "unsupported_media_type"
            assert "application/json" in error["message"]
    job = await jobs.submit(inference(), headers=auth)
    for method in ("DELETE", "PUT", "PATCH", "POST"):
        path = f"/v1/jobs/{job['id']}" + ("/cancel" if method == "POST" else "")
        resp = await jobs.client.request(
            method, path, data=b"x=1", headers={**auth, "Content-Type": "application/x-www-form-urlencoded"}
        )
        assert resp.status == 415, (method, await resp.text())
    # A body without any Content-Type at all (aiohttp would add one, so a raw request).
    raw = await raw_exchange(
        port_of(jobs.base_url),
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in auth.items())
        + b"Content-Length: %d\r\n\r\n" % len(SUBMISSION)
        + SUBMISSION,
    )
    assert parse_response(raw)[0] == 415, raw
    assert await jobs.counts() == {JobStatus.QUEUED: 1}  # only the JSON submission
    assert (await jobs.get(job["id"], headers=auth))["status"] == "queued"


async def test_json_writes_with_parameters_and_bodiless_writes_are_served(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False)
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        resp = await jobs.client.post("/v1/jobs", data=SUBMISSION, headers={"Content-Type": content_type})
        assert resp.status == 202, (content_type, await resp.text())

    async def chunks() -> Any:
        yield SUBMISSION[:10]
        yield SUBMISSION[10:]

    resp = await jobs.client.post("/v1/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 202, await resp.text()
    resp = await jobs.client.post("/v1/jobs", data=chunks(), headers={"Content-Type": "text/plain"})
    assert resp.status == 415, await resp.text()
    # A cancel has no body: it needs no Content-Type (and aiohttp's octet-stream label is fine).
    job = await jobs.submit(inference())
    assert (await jobs.client.post(f"/v1/jobs/{job['id']}/cancel")).status == 202
    raw = await raw_exchange(
        port_of(jobs.base_url),
        f"DELETE /v1/jobs/{job['id']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert parse_response(raw)[0] == 409, raw  # already cancelled: the request itself was served
    assert await jobs.counts() == {JobStatus.QUEUED: 4, JobStatus.CANCELLED: 1}


# --- item: read timeouts and a connection cap -----------------------------------------------------


@dataclass
class FakeConnection:
    """Stands in for a connection in the pure cap decision (not a network layer: no I/O at all)."""

    name: str
    idle: bool
    last_active: float
    closing: bool = False


def test_make_room_closes_the_longest_idle_other_connection_or_refuses() -> None:
    busy = [FakeConnection(f"busy{i}", False, float(i)) for i in range(3)]
    new = FakeConnection("new", True, 10.0)
    assert make_room([*busy, new], new, None) == (True, None)
    assert make_room([*busy, new], new, 4) == (True, None)
    assert make_room([*busy, new], new, 3) == (False, None)  # the newcomer itself is never the victim
    old_idle = FakeConnection("old", True, 1.0)
    young_idle = FakeConnection("young", True, 5.0)
    assert make_room([*busy, young_idle, old_idle, new], new, 5) == (True, old_idle)
    # Connections already closing do not count against the cap.
    closing = [FakeConnection(f"closing{i}", True, 0.0, closing=True) for i in range(5)]
    assert make_room([*closing, *busy, new], new, 4) == (True, None)


def test_default_max_connections_follows_the_open_files_limit() -> None:
    assert default_max_connections(None) is None
    assert default_max_connections(256) == 78
    assert default_max_connections(1024) == 462
    assert default_max_connections(100) == 16  # never below the minimum


async def test_a_silent_request_body_is_408_and_a_slow_steady_one_is_fine(start_jobs: StartJobs) -> None:
    jobs = await start_jobs(start_runner=False, client_body_timeout_s=0.3)
    port = port_of(jobs.base_url)
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(head % len(SUBMISSION) + SUBMISSION[:5])  # and then nothing
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        assert time.monotonic() - started < 3
        rest = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
        assert b'"request_timeout"' in rest
        assert b"JOBS_CLIENT_BODY_TIMEOUT_S" in rest
    finally:
        writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head % len(SUBMISSION))
        for i in range(0, len(SUBMISSION), 20):  # slower in total than the timeout, never silent
            writer.write(SUBMISSION[i : i + 20])
            await writer.drain()
            await asyncio.sleep(0.05)
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.startswith(b"HTTP/1.1 202"), status_line
    finally:
        writer.close()
    assert await jobs.counts() == {JobStatus.QUEUED: 1}


LOW_FD_LIMIT = (200, 256)  # soft, hard: a container's small limit
HALF_OPEN = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # the head never ends


def limited_jobs_cmd(*args: str) -> list[str]:
    """`jobs-api` under a small open-files limit (set in the child before it becomes the service)."""
    soft, hard = LOW_FD_LIMIT
    code = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "sys.argv = ['jobs-api', *sys.argv[1:]]; runpy.run_module('jobs_api', run_name='__main__')"
    )
    return [sys.executable, "-c", code, *args]


async def healthz_status(port: int) -> int | None:
    """The status of GET /healthz on a fresh connection, or None if the connection failed."""
    try:
        raw = await raw_exchange(
            port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", within_s=2
        )
        return parse_response(raw)[0] if raw else None
    except (OSError, TimeoutError):
        return None


async def drain_until_closed(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """What the server sends before it closes the connection ('' for a reset)."""
    try:
        return await asyncio.wait_for(reader.read(), within_s)
    except ConnectionResetError:
        return b""


@pytest.fixture
def many_sockets() -> None:
    """The test process itself holds over a thousand sockets: make sure its own limit allows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2000:
        if hard != resource.RLIM_INFINITY and hard < 2000:
            pytest.skip(f"the open-files limit ({hard}) is too small for this test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2000, hard))


async def test_cli_half_open_requests_do_not_stop_healthz_under_a_low_fd_limit(
    spawn: Spawn, tmp_path: Path, many_sockets: None
) -> None:
    header_timeout_s = 1.0
    proc = spawn(
        limited_jobs_cmd("--port", "0", "--store", f"sqlite:///{tmp_path / 'jobs.db'}"),
        clean_env(JOBS_CLIENT_HEADER_TIMEOUT_S=str(header_timeout_s)),
    )
    port = int((await proc.wait_line(LISTENING_RE, stream="stdout")).group(1))
    assert open_files_limits(proc.popen.pid) == (LOW_FD_LIMIT[1], LOW_FD_LIMIT[1])  # soft raised to hard
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    total, batch, time_limit = 1100, 100, 20.0
    started = time.monotonic()
    try:

        async def half_open() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            except (OSError, TimeoutError):
                return None  # the backlog was full for a moment: that is the server defending itself
            writer.write(HALF_OPEN)
            return reader, writer

        while len(conns) < total and time.monotonic() - started < time_limit:
            opened = await asyncio.gather(*(half_open() for _ in range(batch)))
            conns.extend(c for c in opened if c is not None)
        assert len(conns) >= total * 0.9, len(conns)
        flooded = time.monotonic()

        # /healthz answers within a couple of seconds of the flood: the half-open requests time out.
        deadline = flooded + header_timeout_s + 3.0
        status = None
        while status != 200:
            assert time.monotonic() < deadline, f"/healthz did not answer: last {status}; {proc.output()}"
            status = await healthz_status(port)
            if status != 200:
                await asyncio.sleep(0.05)

        # Every half-open request got its answer (408 when it was served, 503 when over the cap)
        # or was closed, within the timeout and linger time; none is held open.
        answers = await asyncio.gather(
            *(drain_until_closed(reader, header_timeout_s + 5.0) for reader, _ in conns)
        )
        timed_out = sum(a.startswith(b"HTTP/1.1 408") for a in answers)
        refused = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
        assert timed_out >= 16, (timed_out, refused)
        assert all(a == b"" or a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503")) for a in answers)
    finally:
        for _, writer in conns:
            writer.close()
    assert await healthz_status(port) == 200
    assert proc.popen.poll() is None
    output = proc.output()
    assert "Traceback" not in output
    assert "Too many open files" not in output


async def test_cli_connection_cap_closes_the_oldest_idle_or_refuses_with_503(
    spawn: Spawn, tmp_path: Path
) -> None:
    proc, base = await start_jobs_proc(
        spawn,
        "--store",
        f"sqlite:///{tmp_path / 'jobs.db'}",
        env=clean_env(JOBS_MAX_CONNECTIONS="4", JOBS_CLIENT_HEADER_TIMEOUT_S="30"),
    )
    port = port_of(base)
    busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    try:
        for _, writer in busy:
            writer.write(HALF_OPEN)  # in the middle of a request: not idle
        await asyncio.sleep(0.2)
        raw = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = parse_response(raw)
        assert status == 503, raw
        error = orjson.loads(body)["error"]
        assert error["type"] == "too_many_connections"
        assert "JOBS_MAX_CONNECTIONS" in error["message"]
    finally:
        for _, writer in busy:
            writer.close()
    await asyncio.sleep(0.2)

    idle = []
    for _ in range(4):  # idle keep-alive connections, oldest first
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 5)
        assert answer.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.05)
        idle.append((reader, writer))
    try:
        raw = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert parse_response(raw)[0] == 200, raw  # served: the oldest idle one made room
        oldest = idle[0][0]
        await asyncio.wait_for(oldest.read(), 5)  # ... and was closed
        assert oldest.at_eof()
        for reader, writer in idle[1:]:  # the others still serve
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 5)
            assert answer.startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in idle:
            writer.close()
    assert "Traceback" not in proc.output(), "".join(proc.stderr)


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"JOBS_CLIENT_HEADER_TIMEOUT_S": "0"}, "client_header_timeout_s"),
        ({"JOBS_CLIENT_BODY_TIMEOUT_S": "-1"}, "client_body_timeout_s"),
        ({"JOBS_MAX_CONNECTIONS": "0"}, "max_connections"),
    ],
)
def test_cli_refuses_bad_connection_limits_with_one_line(env: dict[str, str], field: str) -> None:
    result = subprocess.run(
        jobs_cmd("serve"),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env=clean_env(**env),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert field in lines[0]
    assert f"JOBS_{field.upper()}" in lines[0]
