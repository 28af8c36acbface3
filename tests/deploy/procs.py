"""Start the real CLI processes on 127.0.0.1 and read their bound ports from their logs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

GATEWAY_READY = re.compile(r"serving on http://[\d.]+:(\d+) \(admin http://[\d.]+:(\d+)\)")
JOBS_READY = re.compile(r"jobs-api listening on http://[\d.]+:(\d+)")
MOCK_READY = re.compile(r"mock-inference \S+ listening on http://[\d.]+:(\d+)")


class Proc:
    """A child process whose stdout and stderr go to one log file."""

    def __init__(self, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "JOBS_"))}
        full_env.update(env or {})
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env
            )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float = 20.0) -> re.Match[str]:
        """Wait until the log matches `pattern`; fail with the log if the process dies first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = pattern.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.argv[0]} exited {self.popen.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.argv[0]}: no {pattern.pattern!r} within {timeout_s} s:\n{self.output()}")

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop every process started into `procs`, even when the body fails."""
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """GET a URL; returns (status, body) for any HTTP status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def http_post(
    url: str, body: bytes, timeout_s: float = 10.0, headers: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """POST a JSON body; returns (status, body) for any HTTP status."""
    fields = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=body, method="POST", headers=fields)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
