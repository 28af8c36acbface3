"""The real `jobs-api` command: subprocesses in front of a real gateway and mock upstream."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from jobs_api.app import create_app
from tests.conftest import AiohttpServer
from tests.gateway.test_cli import Proc, Spawn, start_gateway_proc, start_mock_proc
from tests.jobs_api.conftest import JobsSettingsFactory
from tests.jobs_api.test_routes import CHAT, inference

LISTENING_RE = re.compile(r"jobs-api listening on http://127\.0\.0\.1:(\d+)")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process environment without GATEWAY_* or JOBS_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "JOBS_"))}
    env.update(extra)
    return env


def jobs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs_api", *args]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start subprocesses that are always killed and reaped when the test ends."""
    procs: list[Proc] = []

    def start(args: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        proc = Proc(args, clean_env() if env is None else env, tmp_path)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.close()


async def start_jobs_proc(spawn: Spawn, *args: str, env: Mapping[str, str] | None = None) -> tuple[Proc, str]:
    proc = spawn(jobs_cmd(*args, "--port", "0"), env)
    match = await proc.wait_line(LISTENING_RE, stream="stdout")
    return proc, f"http://127.0.0.1:{match.group(1)}"


async def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(method, url, json=body) as resp,
    ):
        return resp.status, await resp.json()


async def wait_status(base: str, job_id: str, statuses: set[str], within_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        status, job = await http("GET", f"{base}/v1/jobs/{job_id}")
        assert status == 200, job
        if job["status"] in statuses:
            return dict(job)
        assert time.monotonic() < deadline, f"still {job['status']} after {within_s} s: {job}"
        await asyncio.sleep(0.05)


async def run_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    """Run `jobs-api ARGS` without blocking the event loop (the test may serve it)."""
    proc = await asyncio.create_subprocess_exec(
        *jobs_cmd(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(clean_env() if env is None else env),
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- restart recovery ---------------------------------------------------------------------------


async def test_cli_restart_finishes_a_job_whose_process_was_killed(spawn: Spawn, tmp_path: Path) -> None:
    # A streamed answer of 12 chunks 0.25 s apart: the job runs for about 3 s.
    _, mock_url = await start_mock_proc(spawn, "slow", "--chunk-interval", "0.25", "--chunks", "12")
    _, gateway_port, _ = await start_gateway_proc(
        spawn, "--upstream", f"slow={mock_url}", "--health-interval", "60"
    )
    args = [
        "--gateway-url",
        f"http://127.0.0.1:{gateway_port}",
        "--store",
        f"sqlite:///{tmp_path / 'jobs.db'}",
    ]
    env = clean_env(JOBS_LEASE_S="2", JOBS_POLL_INTERVAL_S="0.1")
    first, base = await start_jobs_proc(spawn, *args, env=env)

    status, job = await http("POST", f"{base}/v1/jobs", inference(body={**CHAT, "stream": True}))
    assert status == 202, job
    await wait_status(base, job["id"], {"running"}, within_s=10)
    await asyncio.sleep(0.3)  # mid-stream
    first.popen.send_signal(signal.SIGKILL)
    assert await first.wait_exit() == -signal.SIGKILL

    second, base = await start_jobs_proc(spawn, "serve", *args, env=env)
    done = await wait_status(base, job["id"], {"completed", "failed", "cancelled", "timed_out"}, within_s=30)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    assert done["result"]["status"] == 200
    assert "[DONE]" in done["result"]["body"]

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}/v1/jobs/{job['id']}/events") as resp,
    ):
        text = await resp.text()
    states = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [(s["status"], s["attempts"]) for s in states] == [
        ("queued", 0),
        ("running", 1),
        ("queued", 1),  # the lease of the killed process expired
        ("running", 2),
        ("completed", 2),
    ]
    assert states[2]["error"]["type"] == "worker_lost"

    second.popen.send_signal(signal.SIGTERM)
    assert await second.wait_exit(within_s=15) == 0, second.output()
    assert "Traceback" not in "".join(second.stderr)
    assert any("shutting down" in line for line in second.stderr)


# --- client commands ----------------------------------------------------------------------------


async def test_cli_submit_wait_prints_final_json_and_exits_0(
    aiohttp_server: AiohttpServer, jobs_settings: JobsSettingsFactory, gateway_url: str, tmp_path: Path
) -> None:
    server = await aiohttp_server(create_app(jobs_settings(gateway_url=gateway_url)))
    url = str(server.make_url("")).rstrip("/")
    job_file = tmp_path / "job.json"
    job_file.write_bytes(orjson.dumps(inference(metadata={"from": "cli"})))

    code, out, err = await run_cli("submit", str(job_file), "--wait", "--url", url)
    assert code == 0, err
    final = orjson.loads(out)
    assert final["status"] == "completed"
    assert final["metadata"] == {"from": "cli"}
    assert final["result"]["upstream"] == "a"
    assert "100.0%" in err and "completed" in err
    assert "Traceback" not in err

    # Without --wait: only the id. JOBS_URL stands in for --url.
    code, out, err = await run_cli("submit", str(job_file), env=clean_env(JOBS_URL=url))
    assert code == 0, err
    job_id = out.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", job_id)

    code, out, _ = await run_cli("status", job_id, "--url", url)
    assert code == 0
    assert orjson.loads(out)["id"] == job_id

    code, out, _ = await run_cli("list", "--status", "completed", "--url", url)
    assert code == 0
    assert final["id"] in [j["id"] for j in orjson.loads(out)["jobs"]]


async def test_cli_submit_wait_exits_1_when_the_job_fails(
    aiohttp_server: AiohttpServer, jobs_settings: JobsSettingsFactory, gateway_url: str, tmp_path: Path
) -> None:
    server = await aiohttp_server(create_app(jobs_settings(gateway_url=gateway_url)))
    url = str(server.make_url("")).rstrip("/")
    job_file = tmp_path / "job.json"
    job_file.write_bytes(orjson.dumps(inference(body=["not", "a", "chat"])))
    code, out, err = await run_cli("submit", str(job_file), "--wait", "--url", url)
    assert code == 1, err
    assert orjson.loads(out)["status"] == "failed"

    # Cancelling a finished job: the API's 409 as one line on stderr.
    code, out, err = await run_cli("cancel", orjson.loads(out)["id"], "--url", url)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("jobs-api: 409 conflict: ")


async def test_cli_client_commands_need_the_api_key(
    aiohttp_server: AiohttpServer, jobs_settings: JobsSettingsFactory, tmp_path: Path
) -> None:
    settings = jobs_settings(api_keys={"sekrit": {"tenant": "t"}})
    server = await aiohttp_server(create_app(settings, start_runner=False))
    url = str(server.make_url("")).rstrip("/")
    code, _, err = await run_cli("list", "--url", url)
    assert code == 1
    assert err.startswith("jobs-api: 401 unauthorized: ")
    code, out, err = await run_cli("list", env=clean_env(JOBS_URL=url, JOBS_API_KEY="sekrit"))
    assert code == 0, err
    assert orjson.loads(out) == {"jobs": [], "next_cursor": None}


async def test_cli_client_errors_are_one_line(refused_url: str, tmp_path: Path) -> None:
    code, out, err = await run_cli("status", "3f1c1d2e-1111-4222-8333-944444444444", "--url", refused_url)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith(f"jobs-api: cannot reach {refused_url}")

    code, _, err = await run_cli("submit", str(tmp_path / "missing.json"), "--url", refused_url)
    assert code == 2
    assert err.count("\n") == 1 and "missing.json" in err
    (tmp_path / "bad.json").write_text("{nope", encoding="utf-8")
    code, _, err = await run_cli("submit", str(tmp_path / "bad.json"), "--url", refused_url)
    assert code == 2
    assert err.count("\n") == 1 and "not valid JSON" in err


# --- settings errors ----------------------------------------------------------------------------

BAD_SETTINGS: dict[str, tuple[list[str], dict[str, str], tuple[str, ...]]] = {
    # id: (args, env, words the one stderr line must contain)
    "concurrency_zero": ([], {"JOBS_CONCURRENCY": "0"}, ("concurrency", "JOBS_CONCURRENCY")),
    "port_out_of_range": (["--port", "70000"], {}, ("port", "65535")),
    "gateway_url_not_http": (["--gateway-url", "ftp://x"], {}, ("gateway_url", "ftp://x")),
    "store_scheme": (["serve", "--store", "mysql://db/jobs"], {}, ("store", "mysql", "JOBS_STORE")),
    "api_keys_not_json": ([], {"JOBS_API_KEYS": "{bad"}, ("api_keys", "JOBS_API_KEYS")),
    "api_key_without_tenant": ([], {"JOBS_API_KEYS": '{"k": {"tenant": ""}}'}, ("api_keys.k.tenant",)),
    "rs256_key_not_pem": ([], {"JOBS_JWT_RS256_PUBLIC_KEY": "nope"}, ("jwt_rs256_public_key",)),
    "handlers_not_importable": ([], {"JOBS_HANDLERS": "no_such_module.jobs"}, ("handlers", "no_such_module")),
    "negative_lease": ([], {"JOBS_LEASE_S": "-1"}, ("lease_s", "greater than 0")),
    "sse_keepalive_zero": ([], {"JOBS_SSE_KEEPALIVE_S": "0"}, ("sse_keepalive_s", "JOBS_SSE_KEEPALIVE_S")),
    "redis_pool_of_one": (
        [],
        {"JOBS_REDIS_MAX_CONNECTIONS": "1"},
        ("redis_max_connections", "JOBS_REDIS_MAX_CONNECTIONS"),
    ),
    "redis_pool_timeout_zero": (
        [],
        {"JOBS_REDIS_POOL_TIMEOUT_S": "0"},
        ("redis_pool_timeout_s", "JOBS_REDIS_POOL_TIMEOUT_S"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_cli_invalid_settings_exit_2_with_one_line(case: str, tmp_path: Path) -> None:
    args, env, words = BAD_SETTINGS[case]
    result = subprocess.run(
        jobs_cmd(*args),
        env=clean_env(**env),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jobs-api: invalid configuration: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""


def test_cli_help_lists_commands_and_serve_flags() -> None:
    result = subprocess.run(jobs_cmd("--help"), capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 0
    for command in ("serve", "submit", "status", "list", "cancel"):
        assert command in result.stdout
    result = subprocess.run(
        jobs_cmd("serve", "--help"), capture_output=True, text=True, timeout=30, env=clean_env()
    )
    assert result.returncode == 0
    for flag in ("--host", "--port", "--gateway-url", "--store"):
        assert flag in result.stdout
