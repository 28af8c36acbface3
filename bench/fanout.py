"""The fan-out phase: N concurrent SSE streams through one proxy process, delay added per chunk.

One `mock-inference --stamp-chunks` upstream (load CPU) stamps every chunk with its send time; the
client (bench/fanout_client.py, load CPU) records arrival minus send time for every chunk. `direct`
always runs as the baseline, since the issue's number is the delay a proxy adds over it. Systems
start once; repetitions are interleaved. Around each run: the proxy's CPU time, peak RSS (VmHWM,
the process was started for this phase) and RSS once the streams have ended.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from bench.options import Options
from bench.procs import cpu_seconds, nofile_limit, peak_rss_mib, rss_mib
from bench.systems import DIRECT, Launcher, System

Row = dict[str, Any]
RAMP_S = 1.5  # spread the connects so they do not dominate the first chunks
_FDS_PER_STREAM = 2  # a proxy holds the client's socket and the upstream's


def run_fanout_phase(
    launcher: Launcher, opts: Options, names: list[str], say: Callable[[str], None]
) -> list[Row]:
    """Every system in turn, `opts.reps` times: `opts.fanout_streams` concurrent stamped streams."""
    rows: list[Row] = []
    mock_args = ["--stamp-chunks", "--chunks", str(opts.fanout_chunks)]
    mock_args += ["--chunk-interval", f"{opts.fanout_interval_s:g}"]
    mock, url = launcher.mock("fanout", mock_args)
    systems: list[System] = []
    try:
        for name in [DIRECT, *(n for n in names if n != DIRECT)]:
            systems.append(launcher.system(name, [url], "fanout"))
            _check_nofile(systems[-1], opts.fanout_streams, say)
        for rep in range(opts.reps):
            for system in systems:
                row = _measured(launcher, opts, system)
                row.update(rep=rep, system=system.name)
                rows.append(row)
                say(f"[fanout {rep + 1}/{opts.reps}] {system.name:14} {_summary(row)}")
    finally:
        for system in reversed(systems):
            launcher.stop_system(system)
        launcher.procs.stop(mock)
    return rows


def _summary(row: Row) -> str:
    proxy = (
        f"  proxy peak RSS {row['peak_rss_mib']:.0f} MiB, CPU {row['cpu_s']:.2f} s" if "cpu_s" in row else ""
    )
    return (
        f"completed {row['completed']}/{row['streams']} (peak open {row['peak_open']})  chunk delay "
        f"p50 {row['delay_p50_ms']:.2f} p99 {row['delay_p99_ms']:.2f} max {row['delay_max_ms']:.1f} ms  "
        f"errors {row['errors']}{proxy}"
    )


def _check_nofile(system: System, streams: int, say: Callable[[str], None]) -> None:
    if system.process is None:
        return
    limit = nofile_limit(system.process.pid)
    if limit is not None and limit < streams * _FDS_PER_STREAM + 64:
        say(f"bench: warning: {system.name} may run out of file descriptors (open-files limit {limit})")


def _measured(launcher: Launcher, opts: Options, system: System) -> Row:
    """One fan-out run through `system`, with the proxy's CPU time and RSS around it."""
    procs = launcher.procs
    pid = system.process.pid if system.process else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    argv = [*launcher.pinning.load(), sys.executable, "-m", "bench.fanout_client", "--url", system.url]
    argv += ["--streams", str(opts.fanout_streams), "--chunks", str(opts.fanout_chunks)]
    argv += ["--interval", f"{opts.fanout_interval_s:g}", "--ramp", f"{RAMP_S:g}"]
    procs.record(argv)
    bound_s = RAMP_S + opts.fanout_chunks * opts.fanout_interval_s + 90.0  # the client bounds itself first
    done = subprocess.run(argv, capture_output=True, text=True, timeout=bound_s, cwd=procs.cwd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fanout_client failed on {system.name}: {done.stderr[-2000:]}")
    row: Row = json.loads(done.stdout)
    if pid:
        row["cpu_s"] = cpu_seconds(pid) - cpu_before
        row["peak_rss_mib"] = peak_rss_mib(pid)
        row["rss_after_mib"] = rss_mib(pid)
        row["proxy_nofile"] = nofile_limit(pid)
    return row
