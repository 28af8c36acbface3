"""The real command lines, run as subprocesses on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from tests.conftest import StartMock

CHAT: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}
SERVING_RE = re.compile(r"serving on http://127\.0\.0\.1:(\d+) \(admin http://127\.0\.0\.1:(\d+)\)")
MOCK_RE = re.compile(r"mock-inference (\S+) listening on http://127\.0\.0\.1:(\d+)")
NO_HEALTH_CHECKS = ["--health-interval", "60"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process environment without any GATEWAY_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A subprocess whose stdout and stderr lines are collected by reader threads."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self.args = list(args)
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            text=True,
            bufsize=1,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    async def wait_line(
        self, pattern: re.Pattern[str], *, stream: str = "stderr", within_s: float = 10
    ) -> re.Match[str]:
        """The first line of `stream` matching `pattern`, waiting up to `within_s` seconds."""
        lines = self.stderr if stream == "stderr" else self.stdout
        deadline = time.monotonic() + within_s
        seen = 0
        while True:
            while seen < len(lines):
                match = pattern.search(lines[seen])
                seen += 1
                if match:
                    return match
            if self.popen.poll() is not None:
                await asyncio.sleep(0.05)  # let the readers catch up with the last lines
                if seen == len(lines):
                    raise AssertionError(f"{self.args} exited ({self.popen.returncode}): {self.output()}")
                continue
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern.pattern!r} in {within_s} s: {self.output()}")
            await asyncio.sleep(0.02)

    async def wait_exit(self, within_s: float = 10) -> int:
        deadline = time.monotonic() + within_s
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.args} still running after {within_s} s: {self.output()}")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def output(self) -> str:
        return f"stdout={''.join(self.stdout)!r} stderr={''.join(self.stderr)!r}"

    def close(self) -> None:
        """Kill the process if it still runs, reap it and close its pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


class Spawn(Protocol):
    def __call__(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> Proc: ...


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


def gateway_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def mock_cmd(name: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gateway.testing.mock_inference",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--name",
        name,
        *args,
    ]


async def start_gateway_proc(
    spawn: Spawn, *args: str, env: Mapping[str, str] | None = None
) -> tuple[Proc, int, int]:
    proc = spawn(gateway_cmd("--port", "0", "--admin-port", "0", *args), env)
    match = await proc.wait_line(SERVING_RE)
    return proc, int(match.group(1)), int(match.group(2))


async def start_mock_proc(spawn: Spawn, name: str, *args: str) -> tuple[Proc, str]:
    proc = spawn(mock_cmd(name, *args))
    match = await proc.wait_line(MOCK_RE, stream="stdout")
    return proc, f"http://127.0.0.1:{match.group(2)}"


async def admin_upstreams(admin_port: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/admin/upstreams") as resp,
    ):
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


def run_gateway(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_cmd(*args),
        env=dict(clean_env() if env is None else env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


# --- help and configuration errors --------------------------------------------------------------


def test_cli_help_lists_every_flag() -> None:
    result = run_gateway("--help")
    assert result.returncode == 0, result.stderr
    for flag in (
        "--upstream",
        "--host",
        "--port",
        "--admin-port",
        "--strategy",
        "--connect-timeout",
        "--attempt-timeout",
        "--idle-timeout",
        "--health-interval",
        "--max-attempts",
        "--config",
    ):
        assert flag in result.stdout, flag
    for strategy in ("latency", "round_robin", "least_inflight", "priority"):
        assert strategy in result.stdout
    assert "demo" in result.stdout


def test_cli_demo_refuses_workers() -> None:
    result = run_gateway("demo", "--workers", "2")
    assert result.returncode == 2
    assert result.stderr.strip() == "gateway: demo runs in one process; run without --workers"


def test_cli_version_prints_package_version() -> None:
    from gateway import __version__

    result = run_gateway("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"gateway {__version__}"


def _bad_yaml(tmp_path: Path) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams: [a\nstrategy: {\n", encoding="utf-8")
    return ["--config", str(path)]


BAD_CONFIGS: dict[str, tuple[list[str], dict[str, str], tuple[str, ...]]] = {
    # id: (args, env, words the one stderr line must contain)
    "no_upstreams": ([], {}, ("no upstreams", "--upstream", "GATEWAY_UPSTREAMS")),
    "ftp_url": (["--upstream", "ftp://x"], {}, ("upstreams.0.url", "ftp://x", "http")),
    "duplicate_names": (
        ["--upstream", "a=http://127.0.0.1:1", "--upstream", "a=http://127.0.0.1:2"],
        {},
        ("duplicate", "'a'"),
    ),
    "unknown_strategy_env": (
        ["--upstream", "http://127.0.0.1:1"],
        {"GATEWAY_STRATEGY": "fastest"},
        ("strategy", "GATEWAY_STRATEGY", "latency"),
    ),
    "negative_timeout_env": (
        ["--upstream", "http://127.0.0.1:1"],
        {"GATEWAY_TIMEOUTS__CONNECT_S": "-1"},
        ("timeouts.connect_s", "greater than 0", "GATEWAY_TIMEOUTS__CONNECT_S"),
    ),
    "missing_config_file": (
        ["--upstream", "http://127.0.0.1:1", "--config", "does-not-exist.yaml"],
        {},
        ("config file", "does-not-exist.yaml", "No such file"),
    ),
    "missing_config_file_env": (
        ["--upstream", "http://127.0.0.1:1"],
        {"GATEWAY_CONFIG_FILE": "nope.yaml"},
        ("config file", "nope.yaml"),
    ),
    "invalid_yaml": ([], {}, ("config file", "bad.yaml", "not valid YAML")),
    "json_upstreams_bad_url": (
        [],
        {"GATEWAY_UPSTREAMS": '[{"name": "a", "url": "ftp://nope"}, "http://127.0.0.1:1"]'},
        ("upstreams.0.url", "ftp://nope", "http"),
    ),
    "json_upstreams_not_json": ([], {"GATEWAY_UPSTREAMS": "[{"}, ("upstreams", "not valid JSON")),
    "max_attempts_zero": (
        ["--upstream", "http://127.0.0.1:1", "--max-attempts", "0"],
        {},
        ("retry.max_attempts", "GATEWAY_RETRY__MAX_ATTEMPTS"),
    ),
    "header_secret_with_newline": (
        [],
        {
            "PROVIDER_KEY": "sk-123\n",
            "GATEWAY_UPSTREAMS": (
                '[{"url": "http://127.0.0.1:1", "headers": {"Authorization": "Bearer ${PROVIDER_KEY}"}}]'
            ),
        },
        ("upstreams.0.headers", "Authorization", "control character"),
    ),
    "header_name_not_a_token": (
        [],
        {"GATEWAY_UPSTREAMS": '[{"url": "http://127.0.0.1:1", "headers": {"X Bad": "v"}}]'},
        ("upstreams.0.headers", "X Bad", "field name"),
    ),
    "deadline_header_with_space": (
        ["--upstream", "http://127.0.0.1:1"],
        {"GATEWAY_TIMEOUTS__DEADLINE_HEADER": "X Timeout"},
        ("timeouts.deadline_header", "field name"),
    ),
    "retry_statuses_not_numbers": (
        ["--upstream", "http://127.0.0.1:1"],
        {"GATEWAY_RETRY__ON_STATUSES": "429,soon"},
        ("retry.on_statuses", "GATEWAY_RETRY__ON_STATUSES"),
    ),
    "nested_env_not_json": (
        ["--upstream", "http://127.0.0.1:1"],
        {"GATEWAY_TIMEOUTS": "{connect_s: 1"},
        ("timeouts", "invalid configuration"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_cli_bad_config_exits_with_one_line(case: str, tmp_path: Path) -> None:
    args, env, words = BAD_CONFIGS[case]
    if case == "invalid_yaml":
        args = _bad_yaml(tmp_path)
    result = run_gateway(*args, env=clean_env(**env), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("gateway: ")
    for word in words:
        assert word in line, (word, line)
    assert result.stdout == ""


def test_cli_negative_timeout_flag_is_an_argparse_error() -> None:
    result = run_gateway("--upstream", "http://127.0.0.1:1", "--connect-timeout", "-1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert "--connect-timeout" in last
    assert "greater than 0" in last


def test_cli_non_utf8_config_file_exits_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"upstreams: ['http://127.0.0.1:1']  # caf\xe9\n")
    result = run_gateway("--config", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: config file ")
    assert "latin1.yaml" in lines[0]
    assert "UTF-8" in lines[0]


def test_cli_demo_port_in_use_exits_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_gateway("demo", "--port", str(port), "--admin-port", "0", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("gateway: ")]
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0] and "in use" in lines[0]
    assert "Traceback" not in result.stdout


def test_cli_retry_statuses_take_a_comma_list(tmp_path: Path) -> None:
    """GATEWAY_RETRY__ON_STATUSES=429,503 is read like GATEWAY_UPSTREAMS, not as JSON only."""
    env = clean_env(GATEWAY_RETRY__ON_STATUSES="429,503", GATEWAY_PORT="99999")
    result = run_gateway("--upstream", "http://127.0.0.1:1", env=env, cwd=tmp_path)
    # The statuses parse; the only complaint is the port, on one line.
    assert "on_statuses" not in result.stderr
    assert "port" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("which", ["--port", "--admin-port"])
def test_cli_port_in_use_exits_with_one_line(which: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--port": "0", "--admin-port": "0", which: str(port)}
        args = [item for flag, value in ports.items() for item in (flag, value)]
        result = run_gateway("--upstream", "http://127.0.0.1:1", *args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: ")
    assert str(port) in lines[0]
    assert "in use" in lines[0]


# --- configuration sources ----------------------------------------------------------------------


async def test_cli_yaml_config_file_is_honoured(spawn: Spawn, tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "\n".join(
            [
                "strategy: round_robin",
                "port: 0",
                "admin_port: 0",
                "health: {interval_s: 60}",
                "upstreams:",
                f"  - {{name: primary, url: 'http://127.0.0.1:{p1}', priority: 0}}",
                f"  - {{name: backup, url: 'http://127.0.0.1:{p2}/v1/', priority: 1, weight: 2}}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    proc = spawn(gateway_cmd("--config", str(config)))
    match = await proc.wait_line(SERVING_RE)
    data = await admin_upstreams(int(match.group(2)))
    assert data["strategy"] == "round_robin"
    views = data["upstreams"]
    assert [(u["name"], u["url"], u["priority"], u["weight"]) for u in views] == [
        ("primary", f"http://127.0.0.1:{p1}", 0, 1.0),
        ("backup", f"http://127.0.0.1:{p2}/v1", 1, 2.0),
    ]


async def test_cli_flags_beat_env_beat_yaml(spawn: Spawn, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "strategy: round_robin\nupstreams: ['yaml=http://127.0.0.1:1']\nhealth: {interval_s: 60}\n",
        encoding="utf-8",
    )
    env = clean_env(
        GATEWAY_CONFIG_FILE=str(config),
        GATEWAY_STRATEGY="least_inflight",
        GATEWAY_UPSTREAMS="env=http://127.0.0.1:2",
    )
    _, _, admin = await start_gateway_proc(spawn, "--strategy", "priority", env=env)
    data = await admin_upstreams(admin)
    assert data["strategy"] == "priority"  # flag over env over file
    assert [u["name"] for u in data["upstreams"]] == ["env"]  # env over file


async def test_cli_upstreams_from_env_list(spawn: Spawn, start_mock: StartMock) -> None:
    a = await start_mock("a")
    b = await start_mock("b")
    env = clean_env(GATEWAY_UPSTREAMS=f"a={a.url},b={b.url}", GATEWAY_STRATEGY="round_robin")
    _, port, admin = await start_gateway_proc(spawn, *NO_HEALTH_CHECKS, env=env)
    data = await admin_upstreams(admin)
    assert [(u["name"], u["url"]) for u in data["upstreams"]] == [("a", a.url), ("b", b.url)]
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                await resp.read()
    assert a.stats.requests == 2
    assert b.stats.requests == 2


# --- file descriptors ---------------------------------------------------------------------------

LOW_FD_LIMIT = (200, 256)  # soft, hard: a container's small limit


def limited_gateway_cmd(*args: str) -> list[str]:
    """The gateway under a small open-files limit (set in the child before it becomes the gateway)."""
    soft, hard = LOW_FD_LIMIT
    code = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "sys.argv = ['gateway', *sys.argv[1:]]; runpy.run_module('gateway', run_name='__main__')"
    )
    return [sys.executable, "-c", code, *args]


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


async def test_cli_idle_connections_never_lock_out_new_clients_under_a_low_fd_limit(
    spawn: Spawn, start_mock: StartMock
) -> None:
    a = await start_mock("a")
    proc = spawn(
        limited_gateway_cmd("--upstream", a.spec, "--port", "0", "--admin-port", "0", *NO_HEALTH_CHECKS)
    )
    match = await proc.wait_line(SERVING_RE)
    port, admin = int(match.group(1)), int(match.group(2))
    assert open_files_limits(proc.popen.pid) == (LOW_FD_LIMIT[1], LOW_FD_LIMIT[1])  # soft raised to hard
    idle: list[asyncio.StreamWriter] = []
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        for _ in range(300):  # more idle keep-alive clients than the process has descriptors
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            idle.append(writer)
            writer.write(request)
            status_line = await asyncio.wait_for(reader.readline(), 5)
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                    assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{admin}/healthz") as resp:
                assert resp.status == 200
    finally:
        for writer in idle:
            writer.close()
    assert "Traceback" not in proc.output()


# --- the "done means" scenario ------------------------------------------------------------------


async def test_cli_survives_upstream_sigkill_under_load(spawn: Spawn) -> None:
    mock_a, url_a = await start_mock_proc(spawn, "a", "--latency", "0.005")
    mock_b, url_b = await start_mock_proc(spawn, "b", "--latency", "0.005")
    _, port, admin = await start_gateway_proc(
        spawn, "--upstream", f"a={url_a}", "--upstream", f"b={url_b}", "--health-interval", "1"
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    total, kill_at, time_limit = 600, 200, 8.0
    statuses: list[int] = []
    failures: list[str] = []
    served_by: dict[str, int] = {}
    issued = 0
    killed = False
    started = time.monotonic()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued, killed
        while issued < total and time.monotonic() - started < time_limit:
            issued += 1
            try:
                async with session.post(url, json=CHAT) as resp:
                    body = await resp.read()
                    statuses.append(resp.status)
                    upstream = resp.headers.get("X-Gateway-Upstream", "?")
                    served_by[upstream] = served_by.get(upstream, 0) + 1
                    if resp.status != 200:
                        failures.append(f"{resp.status} {body[:300]!r}")
            except aiohttp.ClientError as exc:
                statuses.append(0)
                failures.append(repr(exc))
            if len(statuses) >= kill_at and not killed:
                killed = True
                mock_b.popen.send_signal(signal.SIGKILL)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(worker(session) for _ in range(10)))
    assert killed
    assert len(statuses) >= 300, (len(statuses), time.monotonic() - started)
    assert served_by.get("a", 0) > 0 and served_by.get("b", 0) > 0
    assert await mock_b.wait_exit() == -signal.SIGKILL
    assert mock_a.popen.poll() is None

    # Passive ejection or three failed checks (1 s apart) take the dead upstream out.
    deadline = time.monotonic() + 6
    while True:
        views = {u["name"]: u for u in (await admin_upstreams(admin))["upstreams"]}
        if views["b"]["state"] != "healthy" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert views["b"]["state"] in ("ejected", "unhealthy"), views["b"]
    assert views["b"]["routable"] is False
    assert views["a"]["state"] == "healthy"

    if failures or any(s != 200 for s in statuses):
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{admin}/metrics") as m:
            retries = [line for line in (await m.text()).splitlines() if line.startswith("gateway_retries")]
        pytest.fail(f"{len(failures)} of {len(statuses)} requests failed: {failures}; {retries}")


async def test_cli_demo_serves_and_stops_on_sigint(spawn: Spawn) -> None:
    proc = spawn(gateway_cmd("demo", "--port", "0", "--admin-port", "0"))
    match = await proc.wait_line(
        re.compile(r"curl -si (http://127\.0\.0\.1:\d+)/v1/chat/completions"), stream="stdout"
    )
    base = match.group(1)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/chat/completions", json=CHAT) as resp,
    ):
        assert resp.status == 200
        data = await resp.json()
        assert data["object"] == "chat.completion"
    proc.popen.send_signal(signal.SIGINT)
    assert await proc.wait_exit() == 0, proc.output()
    assert "Traceback" not in "".join(proc.stderr)


# --- graceful shutdown --------------------------------------------------------------------------


async def test_cli_sigterm_finishes_stream_and_refuses_new_connections(spawn: Spawn) -> None:
    _, mock_url = await start_mock_proc(spawn, "slow", "--chunk-interval", "0.2", "--chunks", "10")
    gw, port, admin = await start_gateway_proc(spawn, "--upstream", f"slow={mock_url}", *NO_HEALTH_CHECKS)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.post(url, json={**CHAT, "stream": True}) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            gw.popen.send_signal(signal.SIGTERM)
            await gw.wait_line(re.compile("shutting down"))

            # New connections are not served any more.
            fresh = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(
                connector=fresh, timeout=aiohttp.ClientTimeout(total=3)
            ) as other:
                with pytest.raises((aiohttp.ClientConnectionError, asyncio.TimeoutError)):
                    async with other.post(url, json=CHAT) as refused:
                        await refused.read()

            rest = await resp.content.read()
    body = first + rest
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 10 + 2  # ten tokens, the final chunk, [DONE]
    assert b"error" not in body
    assert await gw.wait_exit(within_s=15) == 0, gw.output()
    assert "Traceback" not in "".join(gw.stderr)
    with pytest.raises(aiohttp.ClientConnectionError):
        await admin_upstreams(admin)
