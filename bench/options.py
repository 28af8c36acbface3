"""Command-line options of `python -m bench`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.systems import ALL_SYSTEMS

PHASES = ("wrk", "models", "sse", "fanout", "failover")
SCENARIOS = ("kill9", "503", "429", "hang")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Options:
    """Durations, repetitions and what to run."""

    quick: bool
    duration_s: float
    reps: int
    warmup_s: float
    wrk_threads: int
    sse_streams: int
    failover_duration_s: float
    fault_at_s: float
    failover_workers: int
    failover_reps: int
    fanout_streams: int
    fanout_chunks: int
    fanout_interval_s: float
    systems: tuple[str, ...]
    scenarios: tuple[str, ...]
    phases: tuple[str, ...]
    out_dir: Path


def _csv(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the gateway against direct, a plain aiohttp proxy, nginx and HAProxy "
        "on 127.0.0.1, and write bench/results/report-<timestamp>.md and .json.",
    )
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 repetition, 8 s failover runs")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 10; quick 3)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 3; quick 1)")
    p.add_argument(
        "--warmup", type=float, help="seconds of unrecorded warm-up per system (default 2; quick 1)"
    )
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: wrk has one CPU)")
    p.add_argument("--sse-streams", type=int, default=20, help="sequential SSE streams per system and rep")
    p.add_argument("--failover-duration", type=float, help="seconds per failover run (default 20; quick 8)")
    p.add_argument("--fault-at", type=float, default=5.0, help="second at which the fault starts (default 5)")
    p.add_argument(
        "--failover-workers", type=int, default=20, help="concurrent failover clients (default 20)"
    )
    p.add_argument(
        "--failover-reps", type=int, help="interleaved repetitions of each failover run (default 3; quick 1)"
    )
    p.add_argument(
        "--fanout-streams",
        type=int,
        help="concurrent SSE streams in the fan-out phase (default 1000; quick 200)",
    )
    p.add_argument("--fanout-chunks", type=int, default=20, help="chunks per fan-out stream (default 20)")
    p.add_argument(
        "--fanout-interval", type=float, default=0.25, help="seconds between fan-out chunks (default 0.25)"
    )
    p.add_argument("--systems", type=_csv(ALL_SYSTEMS), default=ALL_SYSTEMS, help="comma list (default all)")
    p.add_argument("--scenarios", type=_csv(SCENARIOS), default=SCENARIOS, help="comma list (default all)")
    p.add_argument("--phases", type=_csv(PHASES), default=PHASES, help="comma list of " + ",".join(PHASES))
    p.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR, help="where reports go (default bench/results)"
    )
    a = p.parse_args(argv)
    failover_s = a.failover_duration or (8.0 if a.quick else 20.0)
    if not 0 < a.fault_at < failover_s:
        p.error("--fault-at must fall inside the failover run")
    fanout_streams = a.fanout_streams or (200 if a.quick else 1000)
    if fanout_streams < 1 or a.fanout_chunks < 1 or not 0 < a.fanout_interval <= 10:
        p.error("--fanout-streams and --fanout-chunks must be >= 1, --fanout-interval within (0, 10] s")
    return Options(
        quick=a.quick,
        duration_s=a.duration or (3.0 if a.quick else 10.0),
        reps=a.reps or (1 if a.quick else 3),
        warmup_s=a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0),
        wrk_threads=a.wrk_threads,
        sse_streams=a.sse_streams,
        failover_duration_s=failover_s,
        fault_at_s=a.fault_at,
        failover_workers=a.failover_workers,
        failover_reps=a.failover_reps or (1 if a.quick else 3),
        fanout_streams=fanout_streams,
        fanout_chunks=a.fanout_chunks,
        fanout_interval_s=a.fanout_interval,
        systems=a.systems,
        scenarios=a.scenarios,
        phases=a.phases,
        out_dir=a.out_dir,
    )
