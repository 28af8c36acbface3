"""Failover under load: two fresh mock-inference upstreams per proxy and scenario, one faulted.

The load loop (bench/loadloop.py, on the load CPU) runs 20 workers and injects the fault at
--fault-at seconds: kill -9 of upstream A, or a POST to its /control.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from bench.options import Options
from bench.systems import Launcher

Row = dict[str, Any]

# scenario -> body for upstream A's POST /control (None: kill -9 instead)
CONTROL: dict[str, str | None] = {
    "kill9": None,
    "503": '{"error_rate": 1.0, "error_status": 503}',
    "429": '{"rate_limit_rate": 1.0, "retry_after_s": 2}',
    "hang": '{"hang": true}',
}


def run_failover_phase(
    launcher: Launcher, opts: Options, names: list[str], say: Callable[[str], None]
) -> list[Row]:
    rows: list[Row] = []
    for rep in range(opts.failover_reps):
        for scenario in opts.scenarios:
            for name in names:
                row = _one(launcher, opts, name, scenario, f"{scenario}-{rep}")
                row.update(rep=rep, scenario=scenario, system=name)
                rows.append(row)
                say(
                    f"[failover {rep + 1}/{opts.failover_reps}] {scenario:5} {name:14} "
                    f"requests {row['requests']:>6}  errors {row['errors']:>5} "
                    f"(non-2xx {row['non_2xx']}, transport {row['transport_errors']}, "
                    f"unfinished {row['unfinished']})  max {row['max_latency_ms']:.0f} ms  "
                    f"req/s {row['rps_before_fault']:.0f} -> {row['rps_after_fault']:.0f}"
                )
    return rows


def _one(launcher: Launcher, opts: Options, name: str, scenario: str, tag: str) -> Row:
    procs = launcher.procs
    mock_a, url_a = launcher.mock(f"{tag}-a")
    mock_b, url_b = launcher.mock(f"{tag}-b")
    system = None
    try:
        system = launcher.system(name, [url_a, url_b], f"fo-{tag}")
        argv = [*launcher.pinning.load(), sys.executable, "-m", "bench.loadloop"]
        argv += ["--url", system.url + "/v1/chat/completions", "--duration", f"{opts.failover_duration_s:g}"]
        argv += ["--workers", str(opts.failover_workers), "--fault-at", f"{opts.fault_at_s:g}"]
        control = CONTROL[scenario]
        if control is None:
            argv += ["--kill-pid", str(mock_a.pid)]
        else:
            argv += ["--control-url", url_a + "/control", "--control-body", control]
        procs.record(argv)
        bound_s = opts.failover_duration_s + 30.0
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=bound_s, cwd=procs.cwd, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"loadloop failed on {name}/{scenario}: {done.stderr[-2000:]}")
        result: Row = json.loads(done.stdout)
        return result
    finally:
        if system is not None:
            launcher.stop_system(system)
        procs.stop(mock_b)
        procs.stop(mock_a)
