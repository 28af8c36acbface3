"""`python -m bench [--quick]`: run every phase, stop everything started, write the report."""

from __future__ import annotations

import shlex
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.failover import run_failover_phase
from bench.fanout import RAMP_S, run_fanout_phase
from bench.machine import machine, versions
from bench.models import models_medians, run_models_phase
from bench.options import Options, parse_args
from bench.procs import Pinning, Procs, raise_nofile_limit
from bench.systems import HAPROXY, HAPROXY_DELAY, NOTES, PROXIES, Launcher, available
from bench.workloads import run_sse_phase, run_wrk_phase


def _say(line: str) -> None:
    print(line, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # run the `finally` blocks that stop everything


def _notes(opts: Options, pinning: Pinning, missing: list[str], nofile: int | None) -> list[str]:
    notes = [
        pinning.reason,
        "The orchestrator pins itself to the load CPU; other services on this machine were left running.",
        "wrk, throughput/latency: two nginx upstream ports served by one nginx worker (return 200 with a "
        "fixed JSON body); `direct` is wrk to the first port.",
        "CPU µs per request: utime+stime of the proxy process and its children (/proc/PID/stat, "
        "10 ms ticks) over the run / requests. Peak RSS: VmHWM summed over the process and its children.",
        "wrk latency percentiles come from its done() hook; wrk 4.1 adds corrected samples after long "
        "responses, so p99 is sensitive to a few stalls. Medians are robust.",
        "Failover upstreams are fresh for every system and scenario; the load loop counts every response.",
        "Timeouts before response headers: gateway 120 s (default attempt timeout), nginx "
        "proxy_read_timeout 60 s, HAProxy timeout server 60 s, plain-aiohttp none; so `hang` shows "
        "who avoids a silent upstream.",
        "nginx retries only error, timeout, 502 and 503 (as asked), not 429; HAProxy likewise.",
        "HAProxy runs with `option http-no-delay`; without it (see the SSE table) it batches "
        "streamed events.",
        "Open-files limit: the orchestrator raises its soft RLIMIT_NOFILE to the hard limit "
        f"({'unlimited' if nofile is None else nofile}) before starting anything, so every proxy, "
        "upstream and client inherits it (1,000 streams through a proxy take 2,000 sockets).",
    ]
    if "fanout" in opts.phases:
        notes.append(
            f"Fan-out: one mock-inference --stamp-chunks upstream; streams opened evenly over {RAMP_S:g} s; "
            "`direct` always runs as the baseline; each proxy is started for this phase, so its VmHWM "
            "is the phase's peak."
        )
    if opts.quick:
        notes.append("--quick: short runs and one repetition; use the default run for numbers to quote.")
    return notes + missing


def _config_samples(tmp: Path) -> dict[str, str]:
    """One generated file of each kind (they live in a temp dir that is about to go)."""
    samples: dict[str, str] = {}
    kinds = ("upstream-nginx-wrk.conf", "nginx-wrk.conf", "haproxy-wrk.cfg", "wrk-post50.lua")
    for pattern in (*kinds, "gateway-models-callers.yaml"):
        path = tmp / pattern
        if path.exists():
            samples[pattern] = path.read_text()
    return samples


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["routing"]:  # routing policies on simulated engines (bench/routing.py)
        from bench.routing import main as routing_main

        return routing_main(args[1:])
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    pinning = Pinning.detect()
    machine_info = machine()  # before pinning ourselves, so nproc is the machine's
    pinning.pin_self()
    nofile = raise_nofile_limit()  # inherited by everything started below
    names, missing = available(opts.systems)
    proxies = [n for n in names if n in PROXIES]
    started_at = datetime.now()
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    t0 = time.monotonic()
    _say(f"bench: {pinning.reason}; systems {', '.join(names)}")
    for note in missing:
        _say(f"bench: {note}")
    data: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "argv": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "machine": machine_info,
        "versions": versions(),
        "pinning": pinning.reason,
        "systems_run": names,
        "system_notes": {
            n: NOTES[n] for n in NOTES if n in names or (n == HAPROXY_DELAY and HAPROXY in names)
        },
        "wrk_runs": [],
        "models_runs": [],
        "sse_runs": [],
        "fanout_runs": [],
        "failover_runs": [],
        "idle_rss_runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        procs = Procs(Path(tmp))
        launcher = Launcher(procs, pinning, Path(tmp))
        try:
            if "wrk" in opts.phases:
                data["wrk_runs"] = run_wrk_phase(launcher, opts, names, _say)
            if "models" in opts.phases:
                data["models_runs"] = run_models_phase(launcher, opts, _say)
            if "sse" in opts.phases:
                data["sse_runs"] = run_sse_phase(launcher, opts, names, _say)
            if "fanout" in opts.phases:
                data["fanout_runs"] = run_fanout_phase(launcher, opts, names, _say)
            if "failover" in opts.phases and proxies:
                data["failover_runs"] = run_failover_phase(launcher, opts, proxies, _say)
        except KeyboardInterrupt:
            _say("bench: interrupted; stopping everything it started")
            return 130
        finally:
            procs.stop_all()
            data["commands"] = procs.commands
            data["idle_rss_runs"] = launcher.idle_rss
            data["config_files"] = _config_samples(Path(tmp))
    data["elapsed_s"] = time.monotonic() - t0
    data["wrk_medians"] = report.wrk_medians(data["wrk_runs"])
    data["sse_medians"] = report.sse_medians(data["sse_runs"])
    data["models_medians"] = models_medians(data["models_runs"])
    data["fanout_medians"] = report.fanout_medians(data["fanout_runs"])
    data["fanout_added"] = report.fanout_added(data["fanout_medians"])
    data["idle_rss_medians"] = report.idle_rss_medians(data["idle_rss_runs"])
    data["ratios"] = report.ratios(
        data["wrk_medians"], data["sse_medians"], data["fanout_medians"], data["idle_rss_medians"]
    )
    data["notes"] = _notes(opts, pinning, missing, nofile)
    md, _ = report.write(data, opts.out_dir, stamp)
    _say(f"\nReport: {md}\n")
    _say(report.main_table(data))
    _say("".join(f"{k}: {v}\n" for k, v in data["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
