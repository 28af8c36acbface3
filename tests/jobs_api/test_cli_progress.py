"""The CLI's progress display in a real terminal (tmux, read back with capture-pane), and plain."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from jobs_api.app import create_app
from jobs_api.handlers import HandlerRegistry, JobContext
from jobs_api.progress_display import plain_line, snapshot_detail
from tests.conftest import AiohttpServer, free_port
from tests.jobs_api.conftest import JobsSettingsFactory
from tests.jobs_api.test_cli import clean_env, jobs_cmd, run_cli

TMUX = shutil.which("tmux")
LONG_MESSAGE = "embedding the documents of a rather long corpus, one chunk at a time"


async def slow(ctx: JobContext) -> dict[str, Any]:
    """Reports progress for as long as it runs (until cancelled or `steps` are done)."""
    steps = int(ctx.input.get("steps", 400))
    for n in range(steps):
        await ctx.progress(min(99.0, n * 100 / steps), f"{LONG_MESSAGE} ({n})", phase="retrieve")
        await asyncio.sleep(0.05)
    return {"done": steps}


@pytest.fixture
async def jobs_url(aiohttp_server: AiohttpServer, jobs_settings: JobsSettingsFactory) -> str:
    registry = HandlerRegistry()
    registry.register("slow", slow)
    settings = jobs_settings(gateway_url=f"http://127.0.0.1:{free_port()}")
    server = await aiohttp_server(create_app(settings, registry=registry))
    return str(server.make_url("")).rstrip("/")


Tmux = Callable[..., Awaitable[str]]


@pytest.fixture
async def tmux(tmp_path: Path) -> AsyncIterator[Callable[[list[str]], Awaitable[str]]]:
    """`await tmux([...])`: run a tmux command on a server of this test's own (own socket)."""
    if TMUX is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    socket = f"jobs-test-{uuid.uuid4().hex[:8]}"

    async def run(args: list[str]) -> str:
        proc = await asyncio.create_subprocess_exec(
            TMUX, "-L", socket, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    try:
        yield run
    finally:
        kill = await asyncio.create_subprocess_exec(
            TMUX, "-L", socket, "kill-server", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await kill.wait()


async def status(url: str, job_id: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/jobs/{job_id}") as resp:
        data: dict[str, Any] = await resp.json()
        return str(data["status"])


async def screen_until(tmux: Callable[[list[str]], Awaitable[str]], text: str, within_s: float = 15) -> str:
    """The pane (wrapped lines joined, so a wrapped line shows as one longer line) once it shows `text`."""
    deadline = time.monotonic() + within_s
    while True:
        screen = await tmux(["capture-pane", "-p", "-J", "-t", "cli"])
        if text in screen:
            return screen
        assert time.monotonic() < deadline, f"{text!r} not on screen:\n{screen}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("columns", [50, 120])
async def test_progress_in_a_terminal_fits_and_ctrl_c_says_how_to_follow(
    jobs_url: str, tmux: Callable[[list[str]], Awaitable[str]], tmp_path: Path, columns: int
) -> None:
    job_file = tmp_path / "job.json"
    job_file.write_bytes(orjson.dumps({"type": "slow", "input": {}}))
    out = tmp_path / "out.json"
    env = " ".join(
        f"{k}={shlex.quote(v)}" for k, v in clean_env(TERM="xterm-256color").items() if k != "TMUX"
    )
    command = shlex.join([*jobs_cmd("submit", str(job_file), "--wait", "--url", jobs_url)])
    # stdout to a file: the pane shows stderr only, as it would next to `> final.json`.
    shell = f"env -i {env} {command} > {shlex.quote(str(out))}; echo EXIT=$?; sleep 30"
    await tmux(["new-session", "-d", "-s", "cli", "-x", str(columns), "-y", "12", shell])
    screen = await screen_until(tmux, "retrieve")
    await asyncio.sleep(0.6)  # a few redraws
    screen = await screen_until(tmux, "retrieve")
    lines = [line for line in screen.splitlines() if line.strip()]
    assert all(len(line) <= columns for line in lines), "\n".join(lines)
    bar = next(line for line in lines if "%" in line)
    assert "running" in bar and "retrieve" in bar  # status and phase
    assert bar.lstrip().startswith("0:00:0")  # elapsed time
    if columns == 120:
        assert "embedding the documents" in bar  # the message, when there is room
    else:
        assert "…" in bar  # cut, not wrapped
    job_id = screen.split("job ", 1)[1].split()[0]

    await tmux(["send-keys", "-t", "cli", "C-c"])
    screen = await screen_until(tmux, "EXIT=")
    assert "EXIT=130" in screen
    joined = " ".join(screen.split())
    assert f"job {job_id} keeps running" in joined
    assert f"jobs-api wait {job_id} --url {jobs_url}" in joined
    assert "Traceback" not in screen
    assert await status(jobs_url, job_id) in ("running", "queued")


async def test_progress_plain_lines_when_stderr_is_not_a_terminal(jobs_url: str, tmp_path: Path) -> None:
    job_file = tmp_path / "job.json"
    job_file.write_bytes(orjson.dumps({"type": "slow", "input": {"steps": 5}}))
    code, out, err = await run_cli("submit", str(job_file), "--wait", "--url", jobs_url)
    assert code == 0, err
    assert orjson.loads(out)["status"] == "completed"
    assert "\r" not in err and "\x1b" not in err  # no redraws, no colours
    lines = err.splitlines()
    assert lines[0].startswith("job ") and lines[0].endswith(" submitted")
    assert any("retrieve" in line and "%" in line for line in lines)
    assert "100.0%  completed" in lines[-1]
    # `wait` follows a job that exists already, the same way.
    code, out, err = await run_cli("wait", orjson.loads(out)["id"], "--url", jobs_url)
    assert code == 0 and orjson.loads(out)["result"] == {"done": 5}
    assert "100.0%  completed" in err


def test_plain_line_and_detail() -> None:
    snapshot = {
        "status": "running",
        "attempts": 2,
        "progress": {"percent": 50, "phase": "p", "message": "a\nb"},
    }
    assert snapshot_detail(snapshot) == "running  attempt 2  p  a b"
    assert (
        plain_line(snapshot, 3725) == "1:02:05  [############------------]  50.0%  running  attempt 2  p  a b"
    )
    assert plain_line({"status": "completed"}, 0).startswith("0:00:00  [" + "#" * 24 + "] 100.0%")
