"""`gateway --workers N`: settings, restart backoff, and real supervisor and worker processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConfigError, load_settings
from gateway.workers.supervisor import WorkerStartError, describe_exit, make_runtime_dir, restart_delay_s
from tests.conftest import MockUpstream, StartMock
from tests.gateway.test_cli import CHAT, SERVING_RE, Proc, clean_env, gateway_cmd, run_gateway

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ONE = {"upstreams": ["http://10.0.0.1:8000"]}

# --- settings -----------------------------------------------------------------------------------


def test_workers_default_is_one_process() -> None:
    assert load_settings(ONE).workers == 1


def test_workers_from_env_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("workers: 3\n", encoding="utf-8")
    assert load_settings(ONE, config).workers == 3
    monkeypatch.setenv("GATEWAY_WORKERS", "4")
    assert load_settings(ONE, config).workers == 4


@pytest.mark.parametrize("value", [0, -2, "0", "two", 1.5, True, ""])
def test_workers_invalid_value_names_the_field(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**ONE, "workers": value})
    message = str(info.value)
    assert message.startswith("invalid configuration: workers: ")
    assert "GATEWAY_WORKERS" in message


def test_workers_invalid_yaml_value_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("workers: many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^invalid configuration: workers: "):
        load_settings(ONE, config)


def test_cli_workers_zero_exits_with_one_line(tmp_path: Path) -> None:
    result = run_gateway("--upstream", "http://127.0.0.1:1", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: invalid configuration: workers: ")
    assert "GATEWAY_WORKERS" in lines[0]


# --- supervision policy -------------------------------------------------------------------------


def test_restart_delay_grows_with_quick_crashes_and_is_capped() -> None:
    delays = [restart_delay_s(n) for n in range(1, 10)]
    assert delays[0] == 0.25
    assert delays[1] == 0.5
    assert delays == sorted(delays)
    assert max(delays) == 10.0


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(None) == "unknown status"


def test_make_runtime_dir_is_private_and_falls_back_to_the_next_parent(tmp_path: Path) -> None:
    made = make_runtime_dir([str(tmp_path / "missing"), str(tmp_path)])
    assert made.parent == tmp_path
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_make_runtime_dir_without_a_usable_parent_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(WorkerStartError, match=r"admin sockets .*missing.*TMPDIR"):
        make_runtime_dir([str(tmp_path / "missing")])


# --- real processes -----------------------------------------------------------------------------


class Gateways:
    """Starts real `gateway --workers` processes in front of mock upstreams."""

    def __init__(self, cwd: Path, tmpdir: Path) -> None:
        self.cwd = cwd
        # The gateways' TMPDIR: short, because a unix socket path must fit in about 100 bytes.
        self.tmpdir = tmpdir
        self.started: list[Proc] = []

    async def start(self, upstreams: Sequence[MockUpstream], *args: str) -> tuple[Proc, int, int]:
        """A gateway that has logged its serving line; returns it, its port and admin port."""
        cmd = gateway_cmd("--port", "0", "--admin-port", "0", "--health-interval", "60", *args)
        cmd += [item for up in upstreams for item in ("--upstream", up.spec)]
        env = clean_env(GATEWAY_ADMIN_TOKEN=TOKEN, GATEWAY_SHUTDOWN_GRACE_S="5", TMPDIR=str(self.tmpdir))
        proc = Proc(cmd, env, self.cwd)
        self.started.append(proc)
        match = await proc.wait_line(SERVING_RE, within_s=30)
        return proc, int(match.group(1)), int(match.group(2))

    def runtime_dirs(self) -> list[Path]:
        """The supervisors' socket directories that still exist."""
        return list(self.tmpdir.glob("gateway-workers-*"))


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    """Gateway processes started by a test, always killed and reaped when it ends."""
    started = Gateways(tmp_path, Path(tempfile.mkdtemp(prefix="gw-")))
    try:
        yield started
    finally:
        for proc in started.started:
            proc.close()
        shutil.rmtree(started.tmpdir, ignore_errors=True)


async def send_fresh(port: int, count: int) -> list[int]:
    """`count` chat requests, each on a new connection so the kernel spreads them over workers."""
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as s:
        for _ in range(count):
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as resp:
                await resp.read()
                statuses.append(resp.status)
    return statuses


async def admin(
    admin_port: int, method: str, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{admin_port}{path}", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def metrics_text(admin_port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.text()


def served_by_worker(text: str) -> dict[str, float]:
    """gateway_requests_total summed over codes, per worker label."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gateway_requests_total":
                totals[s.labels["worker"]] = totals.get(s.labels["worker"], 0.0) + s.value
    return totals


def gone(pid: int) -> bool:
    """The process has exited with all its threads (so its sockets are closed), reaped or not.

    A zombie group leader alone is not enough: its other threads may still be exiting and holding
    the process's files, including the listening socket.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (OSError, IndexError):
        return True


async def wait_for(what: str, check: Any, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within_s} s")
        await asyncio.sleep(0.05)


async def worker_pids(admin_port: int) -> list[int]:
    status, data = await admin(admin_port, "GET", "/admin/upstreams")
    assert status == 200, data
    return [w["pid"] for w in data["workers"]]


async def test_workers_share_port_and_admin_answers_for_all(
    gateways: Gateways, start_mock: StartMock
) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    _, port, admin_port = await gateways.start([a, b], "--workers", "2")

    assert await send_fresh(port, 40) == [200] * 40
    text = await metrics_text(admin_port)
    served = served_by_worker(text)
    assert set(served) == {"0", "1"} and all(v > 0 for v in served.values()), served
    assert sum(served.values()) == 40
    assert len([line for line in text.splitlines() if line.startswith("# TYPE gateway_requests_total ")]) == 1

    status, data = await admin(admin_port, "GET", "/admin/upstreams")
    assert status == 200
    assert [u["name"] for u in data["upstreams"]] == ["a", "b"]
    assert [w["worker"] for w in data["workers"]] == [0, 1]
    assert len({w["pid"] for w in data["workers"]}) == 2
    assert (await admin(admin_port, "GET", "/healthz"))[0] == 200
    status, ready = await admin(admin_port, "GET", "/readyz")
    assert status == 200 and [w["status"] for w in ready["workers"]] == ["ready", "ready"]

    # A drain through the supervisor reaches every worker; then only b serves.
    assert (await admin(admin_port, "POST", "/admin/upstreams/a/drain"))[0] == 401
    status, body = await admin(admin_port, "POST", "/admin/upstreams/a/drain", AUTH)
    assert status == 200, body
    assert body["drained"] is True and [w["status"] for w in body["workers"]] == [200, 200]
    status, data = await admin(admin_port, "GET", "/admin/upstreams")
    for worker in data["workers"]:
        assert {u["name"]: u["drained"] for u in worker["upstreams"]} == {"a": True, "b": False}
    a_before = a.stats.requests
    assert await send_fresh(port, 10) == [200] * 10
    assert a.stats.requests == a_before
    status, redundancy = await admin(admin_port, "GET", "/admin/redundancy")
    assert status == 200 and (redundancy["level"], redundancy["degraded"]) == ("single", False)
    assert [(w["worker"], w["level"]) for w in redundancy["workers"]] == [(0, "single"), (1, "single")]
    status, events = await admin(admin_port, "GET", "/admin/events")
    drained = [(e["worker"], e["upstream"], e["to"]) for e in events["events"]]
    assert sorted(drained) == [(0, "a", "drained"), (1, "a", "drained")]
    status, body = await admin(admin_port, "POST", "/admin/upstreams/nope/drain", AUTH)
    assert status == 404 and body["error"]["type"] == "not_found"


async def test_workers_replace_a_killed_worker_and_stop_on_sigterm(
    gateways: Gateways, start_mock: StartMock
) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    gw, port, admin_port = await gateways.start([a, b], "--workers", "2")
    assert (await admin(admin_port, "POST", "/admin/upstreams/a/drain", AUTH))[0] == 200
    old = await worker_pids(admin_port)

    os.kill(old[1], signal.SIGKILL)

    async def killed_is_gone() -> bool:
        return gone(old[1])

    await wait_for("killed worker reaped", killed_is_gone, 5)
    # The survivor takes every new connection meanwhile.
    assert await send_fresh(port, 20) == [200] * 20

    async def replaced_and_ready() -> bool:
        status, data = await admin(admin_port, "GET", "/readyz")
        return status == 200 and data["workers"][1]["pid"] not in (None, old[1])

    await wait_for("replacement ready", replaced_and_ready, 15)
    new = await worker_pids(admin_port)
    assert new[0] == old[0] and new[1] != old[1]
    # The replacement got the drain made before it started.
    _, data = await admin(admin_port, "GET", "/admin/upstreams")
    assert {u["name"]: u["drained"] for u in data["workers"][1]["upstreams"]} == {"a": True, "b": False}

    assert await send_fresh(port, 40) == [200] * 40
    served = served_by_worker(await metrics_text(admin_port))
    assert served.get("1", 0) > 0, served  # the new process counts from zero
    assert any("worker 1 (pid" in line and "SIGKILL" in line for line in gw.stderr), gw.output()

    gw.popen.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(within_s=15) == 0, gw.output()
    assert all(gone(pid) for pid in new), new
    assert gateways.runtime_dirs() == []
    assert "Traceback" not in "".join(gw.stderr), gw.output()


async def test_workers_stop_when_the_supervisor_is_killed(gateways: Gateways, start_mock: StartMock) -> None:
    a = await start_mock("a")
    gw, _, admin_port = await gateways.start([a], "--workers", "2")
    pids = await worker_pids(admin_port)
    gw.popen.kill()

    async def workers_gone() -> bool:
        return all(gone(pid) for pid in pids)

    await wait_for("orphaned workers exit", workers_gone, 10)
    assert gateways.runtime_dirs() == []  # the last worker out removed the socket directory


def test_cli_workers_port_in_use_exits_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["--upstream", "http://127.0.0.1:1", "--workers", "2", "--admin-port", "0"]
        result = run_gateway(*args, "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: cannot listen: ") and "in use" in lines[0]


async def test_workers_share_an_ejection_within_100_ms(gateways: Gateways, start_mock: StartMock) -> None:
    a = await start_mock("a", error_rate=1.0, error_status=500)
    b = await start_mock("b")
    _, port, admin_port = await gateways.start([a, b], "--workers", "3", "--strategy", "priority")

    async def a_ejected_in() -> list[int]:
        _, events = await admin(admin_port, "GET", "/admin/events")
        return sorted(
            {e["worker"] for e in events["events"] if e["upstream"] == "a" and e["to"] == "ejected"}
        )

    # Every request tries a first (priority) and is answered by b; a worker's third failure ejects a.
    for _ in range(12):
        assert await send_fresh(port, 1) == [200]
        if await a_ejected_in():
            break
    await wait_for("every worker has a ejected", lambda: _all(a_ejected_in), within_s=2)
    _, events = await admin(admin_port, "GET", "/admin/events")
    ejected = [e for e in events["events"] if e["upstream"] == "a" and e["to"] == "ejected"]
    own = [e for e in ejected if e["reason"].startswith("3 consecutive failures")]
    adopted = [e for e in ejected if e["reason"] == "ejected by another worker"]
    assert len(own) == 1 and len(adopted) == 2, ejected
    lag_s = max(e["time"] for e in adopted) - own[0]["time"]
    print(f"ejection reached the other 2 workers {lag_s * 1000:.1f} ms after the first")
    assert 0 <= lag_s < 0.1
    # Fewer than 3 x 3 failures: the first ejection stopped the others from trying a any more.
    failures = a.stats.requests
    print(f"failed attempts on a before every worker stopped: {failures}")
    assert failures < 3 * 3
    assert await send_fresh(port, 20) == [200] * 20
    assert a.stats.requests == failures

    # A replacement worker starts with the ejections still in force.
    old_pid = (await worker_pids(admin_port))[1]
    os.kill(old_pid, signal.SIGKILL)

    async def replaced_and_caught_up() -> bool:
        status, data = await admin(admin_port, "GET", "/admin/upstreams")
        if status != 200 or "upstreams" not in data["workers"][1] or data["workers"][1]["pid"] == old_pid:
            return False
        return bool({u["name"]: u["state"] for u in data["workers"][1]["upstreams"]}["a"] == "ejected")

    await wait_for("the replacement has a ejected", replaced_and_caught_up, within_s=10)


async def _all(check: Any) -> bool:
    return bool(await check() == [0, 1, 2])
