"""What the benchmark ran on: CPU, kernel and the versions of every piece measured."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path


def machine() -> dict[str, str | int]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "os": _os_name(),
    }


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return platform.system()
    found = re.search(r'^PRETTY_NAME="?([^"\n]*)', text, re.M)
    return found.group(1) if found else platform.system()


def _tool_version(argv: list[str], pattern: str) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "unknown"


def versions() -> dict[str, str]:
    def pkg(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "aiohttp": pkg("aiohttp"),
        "uvloop": pkg("uvloop"),
        "failover-gateway": pkg("failover-gateway"),
        "nginx": _tool_version(["nginx", "-v"], r"nginx/(\S+)"),
        "haproxy": _tool_version(["haproxy", "-v"], r"version (\S+)"),
        "wrk": _tool_version(["wrk", "-v"], r"wrk (\S+)"),
    }
