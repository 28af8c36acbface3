"""Processes the benchmark starts: CPU pinning, free ports, readiness, stop by PID, /proc readings.

Every process is started through `Procs`, which records its command line for the report and stops
it (and any children it forked, such as nginx workers) by PID, in reverse start order.
"""

from __future__ import annotations

import os
import resource
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOAD_CPU = 0  # wrk, the stream client, the failover load loop and every upstream
PROXY_CPU = 1  # the system under test
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Pinning:
    """`taskset` prefixes; empty when the machine has fewer than two usable CPUs."""

    enabled: bool
    reason: str

    @classmethod
    def detect(cls) -> Pinning:
        cpus = os.sched_getaffinity(0)
        if {LOAD_CPU, PROXY_CPU} <= cpus and _which("taskset"):
            return cls(
                True, f"proxy under test on CPU {PROXY_CPU}; load, clients, upstreams on CPU {LOAD_CPU}"
            )
        return cls(False, f"not pinned: usable CPUs {sorted(cpus)} (need 0 and 1) or no taskset")

    def load(self) -> list[str]:
        return ["taskset", "-c", str(LOAD_CPU)] if self.enabled else []

    def proxy(self) -> list[str]:
        return ["taskset", "-c", str(PROXY_CPU)] if self.enabled else []

    def pin_self(self) -> None:
        """Keep the orchestrator itself off the proxy's CPU."""
        if self.enabled:
            os.sched_setaffinity(0, {LOAD_CPU})


def _which(name: str) -> bool:
    return any(os.access(Path(d) / name, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


@dataclass
class Started:
    """A process started by the benchmark."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Procs:
    """Starts processes, remembers their commands, and stops them by PID."""

    log_dir: Path
    cwd: Path = Path(__file__).resolve().parent.parent  # so `python -m bench.x` imports
    commands: list[str] = field(default_factory=list)
    running: list[Started] = field(default_factory=list)
    _used_ports: set[int] = field(default_factory=set)

    def record(self, argv: list[str]) -> None:
        line = shlex.join(argv)
        if line not in self.commands:
            self.commands.append(line)

    def free_port(self) -> int:
        """A port free on 127.0.0.1 now and not handed out before in this run."""
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> Started:
        self.record(argv)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it in `finally`
            )
        started = Started(name, argv, popen, log_path)
        self.running.append(started)
        return started

    def stop(self, started: Started, timeout_s: float = 5.0) -> None:
        """SIGTERM the process by PID (SIGKILL after `timeout_s`), then any children left over."""
        if started in self.running:
            self.running.remove(started)
        children = descendants(started.pid)
        if started.popen.poll() is None:
            _signal(started.pid, signal.SIGTERM)
            try:
                started.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal(started.pid, signal.SIGKILL)
                started.popen.wait(timeout_s)
        for pid in children:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)

    def kill9(self, started: Started) -> None:
        """SIGKILL by PID (the kill -9 failover scenario); the process stays registered for `stop`."""
        _signal(started.pid, signal.SIGKILL)
        started.popen.wait(5.0)

    def stop_all(self) -> None:
        for started in reversed(list(self.running)):
            try:
                self.stop(started)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {started.name} (pid {started.pid}): {exc}")


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def descendants(pid: int) -> list[int]:
    """Child PIDs of `pid`, recursively (from /proc/PID/task/*/children)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            found.append(kid)
            found.extend(descendants(kid))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants (all threads), in seconds."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / _CLK_TCK


def _status_mib(pid: int, key: str) -> float:
    """Field `key` (kB) of /proc/PID/status summed over `pid` and its descendants, in MiB."""
    total_kib = 0
    for p in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(key + ":"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def peak_rss_mib(pid: int) -> float:
    """VmHWM of `pid` plus its descendants (nginx master + worker), in MiB."""
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    """VmRSS (resident now) of `pid` plus its descendants, in MiB."""
    return _status_mib(pid, "VmRSS")


def raise_nofile_limit() -> int | None:
    """Raise this process's soft open-files limit to the hard limit; return it (None: unlimited).

    Children inherit it, so the proxies, upstreams and clients the bench starts can each hold
    thousands of sockets (1,000 SSE streams through a proxy take 2,000) where the default soft
    limit is often 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the old limit; the fan-out phase reports each process's limit
    return None if soft == resource.RLIM_INFINITY else soft


def nofile_limit(pid: int) -> int | None:
    """Soft open-files limit of a running process (from /proc/PID/limits), None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    return None


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (steal ticks, all ticks) from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (ticks[7], sum(ticks))
    return out


def steal_pct(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpu: int) -> float:
    """Share of `cpu`'s time the hypervisor gave to someone else between two `cpu_times()`."""
    if cpu not in before or cpu not in after:
        return float("nan")
    steal = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return 100.0 * steal / total if total > 0 else float("nan")


def http_status(url: str, timeout_s: float = 1.0) -> int | None:
    """Status of a GET to `url`, or None when nothing answers."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return None


def post_json(url: str, body: bytes, timeout_s: float = 2.0) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with _NO_PROXY_OPENER.open(request, timeout=timeout_s) as resp:
        return int(resp.status)


def wait_http_ok(url: str, started: Started | None = None, timeout_s: float = 20.0) -> None:
    """Poll `url` until it answers 200; fail early if `started` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if started is not None and started.popen.poll() is not None:
            tail = started.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{started.name} exited with {started.popen.returncode}:\n{tail}")
        if http_status(url) == 200:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")
