"""The throughput/latency phase (wrk against nginx upstreams) and the SSE phase (mock-inference).

Each phase starts its upstreams and every system once, runs repetitions interleaved
(for each repetition, for each workload, every system in turn) and stops what it started.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from bench.options import Options
from bench.procs import LOAD_CPU, PROXY_CPU, cpu_seconds, cpu_times, peak_rss_mib, steal_pct
from bench.systems import HAPROXY, HAPROXY_DELAY, Launcher, System
from bench.wrk import WORKLOADS, Workload, run_wrk

Row = dict[str, Any]
SSE_MOCK_ARGS = ("--chunks", "50", "--chunk-interval", "0.02")


def _start_all(launcher: Launcher, names: list[str], upstreams: list[str], tag: str) -> list[System]:
    systems: list[System] = []
    for name in names:
        systems.append(launcher.system(name, upstreams, tag))
    return systems


def run_wrk_phase(
    launcher: Launcher, opts: Options, names: list[str], say: Callable[[str], None]
) -> list[Row]:
    """wrk workloads against every system; CPU time and peak RSS of each proxy around each run."""
    rows: list[Row] = []
    upstream, urls = launcher.nginx_upstreams("wrk")
    systems: list[System] = []
    try:
        systems = _start_all(launcher, names, urls, "wrk")
        if opts.warmup_s > 0:
            for system in systems:
                run_wrk(
                    launcher.procs, launcher.pinning, launcher.tmp, WORKLOADS[0], system.url, opts.warmup_s, 1
                )
        for rep in range(opts.reps):
            for workload in WORKLOADS:
                for system in systems:
                    row = measured_wrk(launcher, opts, workload, system)
                    row["rep"] = rep
                    rows.append(row)
                    say(
                        f"[wrk {rep + 1}/{opts.reps}] {workload.key:7} {system.name:14} "
                        f"{row['rps']:>10,.0f} req/s  p50 {row['p50_ms']:.3f} ms  "
                        f"p99 {row['p99_ms']:.3f} ms  errors {row['errors']}  "
                        f"steal {row['steal_pct_load_cpu']:.0f}% / {row['steal_pct_proxy_cpu']:.0f}%"
                    )
    finally:
        for system in reversed(systems):
            launcher.stop_system(system)
        launcher.procs.stop(upstream)
    return rows


def measured_wrk(launcher: Launcher, opts: Options, workload: Workload, system: System) -> Row:
    """One wrk run, with the proxy's CPU time and peak RSS and the hypervisor's steal around it."""
    pid = system.process.pid if system.process else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    ticks_before = cpu_times()
    result = run_wrk(
        launcher.procs,
        launcher.pinning,
        launcher.tmp,
        workload,
        system.url,
        opts.duration_s,
        opts.wrk_threads,
    )
    ticks_after = cpu_times()
    row: Row = {"workload": workload.key, "system": system.name, **_wrk_row(result)}
    row["steal_pct_load_cpu"] = steal_pct(ticks_before, ticks_after, LOAD_CPU)
    row["steal_pct_proxy_cpu"] = steal_pct(ticks_before, ticks_after, PROXY_CPU)
    if pid:
        cpu_s = cpu_seconds(pid) - cpu_before
        row["cpu_s"] = cpu_s
        row["cpu_us_per_req"] = cpu_s * 1e6 / max(result["requests"], 1)
        row["peak_rss_mib"] = peak_rss_mib(pid)
    return row


def _wrk_row(result: dict[str, Any]) -> Row:
    lat = result["latency_us"]
    return {
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "requests": result["requests"],
        "p50_ms": lat["p50"] / 1e3,
        "p90_ms": lat["p90"] / 1e3,
        "p99_ms": lat["p99"] / 1e3,
        "max_ms": lat["max"] / 1e3,
        "errors": result["errors_total"],
        "wrk_errors": result["errors"],
    }


def run_sse_phase(
    launcher: Launcher, opts: Options, names: list[str], say: Callable[[str], None]
) -> list[Row]:
    """Sequential SSE streams (50 events, 20 ms apart) through every system."""
    rows: list[Row] = []
    procs, pinning = launcher.procs, launcher.pinning
    sse_names = [*names, HAPROXY_DELAY] if HAPROXY in names else list(names)
    # One upstream for every system: `direct` can only use one, and with two each mock would sit
    # idle half the time and answer its first byte later (colder), charging that to the proxies.
    mock, url = launcher.mock("sse", SSE_MOCK_ARGS)
    systems: list[System] = []
    try:
        systems = _start_all(launcher, sse_names, [url], "sse")
        for rep in range(opts.reps):
            for system in systems:
                argv = [*pinning.load(), sys.executable, "-m", "bench.sse_client", "--url", system.url]
                argv += ["--streams", str(opts.sse_streams)]
                procs.record(argv)
                bound_s = 15.0 + opts.sse_streams * 3.0
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=bound_s, cwd=procs.cwd, check=False
                )
                if done.returncode != 0:
                    raise RuntimeError(f"sse_client failed on {system.name}: {done.stderr[-2000:]}")
                out = json.loads(done.stdout)
                row = _sse_row(out)
                row.update(rep=rep, system=system.name)
                rows.append(row)
                say(
                    f"[sse {rep + 1}/{opts.reps}] {system.name:26} first byte {row['ttfb_ms']:.2f} ms  "
                    f"total {row['total_ms']:.1f} ms  events {row['events']}  errors {row['errors']}"
                )
    finally:
        for system in reversed(systems):
            launcher.stop_system(system)
        procs.stop(mock)
    return rows


def _sse_row(out: dict[str, Any]) -> Row:
    ttfb, total = out["ttfb_ms"], out["total_ms"]
    return {
        "ttfb_ms": statistics.median(ttfb) if ttfb else float("nan"),
        "ttfb_max_ms": max(ttfb, default=float("nan")),
        "total_ms": statistics.median(total) if total else float("nan"),
        "events": statistics.median(out["events"]) if out["events"] else 0,
        "streams": len(ttfb),
        "errors": len(out["errors"]),
        "error_samples": out["errors"][:3],
    }
