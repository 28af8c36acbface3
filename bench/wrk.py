"""wrk runs: a generated Lua script per workload whose done() prints the results as one JSON line."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Pinning, Procs

_MARK = "BENCH_JSON "

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%.1f,"mean":%.1f,"max":%.1f,"stdev":%.1f,' ..
    '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f}}\\n',
    "BENCH_JSON ", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


def json_body(size: int) -> bytes:
    """A chat completion request of exactly `size` bytes."""
    head = b'{"model":"bench","messages":[{"role":"user","content":"'
    tail = b'"}],"max_tokens":8}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@dataclass(frozen=True)
class Workload:
    """One wrk workload: method, path, body and connection count."""

    key: str
    title: str
    method: str
    path: str
    connections: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    def script(self) -> str:
        lines = [f'wrk.method = "{self.method}"']
        if self.body:
            lines.append(f"wrk.body = [[{self.body.decode()}]]")
            lines.append('wrk.headers["Content-Type"] = "application/json"')
        lines.extend(f'wrk.headers["{name}"] = "{value}"' for name, value in self.headers)
        return "\n".join(lines) + "\n" + _DONE


POST_BODY = json_body(1024)
WORKLOADS = (
    Workload("post50", "POST 1 KiB, 50 conns", "POST", "/v1/chat/completions", 50, POST_BODY),
    Workload("get50", "GET small, 50 conns", "GET", "/small", 50),
    Workload("post1", "POST 1 KiB, 1 conn", "POST", "/v1/chat/completions", 1, POST_BODY),
    Workload("post10", "POST 1 KiB, 10 conns", "POST", "/v1/chat/completions", 10, POST_BODY),
)


def run_wrk(
    procs: Procs,
    pinning: Pinning,
    tmp: Path,
    workload: Workload,
    base_url: str,
    duration_s: float,
    threads: int,
) -> dict[str, Any]:
    """Run wrk for `duration_s` (bounded by a hard timeout) and return its JSON summary plus req/s."""
    script = tmp / f"wrk-{workload.key}.lua"
    if not script.exists():
        script.write_text(workload.script())
    argv = [
        *pinning.load(),
        "wrk",
        f"-t{min(threads, workload.connections)}",
        f"-c{workload.connections}",
        f"-d{max(1, round(duration_s))}s",  # wrk takes whole seconds
        "--timeout",
        "5s",
        "-s",
        str(script),
        base_url + workload.path,
    ]
    procs.record(argv)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            result: dict[str, Any] = json.loads(line[len(_MARK) :])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            result["errors_total"] = sum(result["errors"].values())
            return result
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): {done.stderr or done.stdout}")
