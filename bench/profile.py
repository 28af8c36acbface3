"""CPU profile of the gateway under wrk POST 1 KiB / 50 connections (or --workload), with py-spy.

Usage: python -m bench.profile [--duration 15] [--native] [--system plain-aiohttp] [--workload get50]
Starts the nginx upstreams and the gateway (pinned like the benchmark), runs wrk, attaches
`py-spy record --format speedscope` (on the load CPU) for `duration` seconds, writes the profile to
bench/results/profile-<timestamp>.speedscope.json and prints the top functions by own time.
Needs py-spy: .venv/bin/pip install py-spy
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.options import RESULTS_DIR
from bench.procs import Pinning, Procs
from bench.systems import GATEWAY, PLAIN, VENV_BIN, Launcher
from bench.wrk import WORKLOADS, run_wrk


def top_functions(speedscope: dict[str, Any], n: int) -> tuple[float, list[tuple[str, float, float]]]:
    """(seconds sampled, [(function, own s, total s)]) over all threads, by own time."""
    frames = speedscope["shared"]["frames"]
    own: Counter[int] = Counter()
    total: Counter[int] = Counter()
    samples = 0.0
    for profile in speedscope["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            samples += weight
            if stack:
                own[stack[-1]] += weight  # stacks run from the root to the leaf
            for index in set(stack):
                total[index] += weight

    def label(i: int) -> str:
        f = frames[i]
        where = f.get("file", "")
        where = where.split("site-packages/")[-1].replace(str(Path.cwd()) + "/", "")
        return f"{f['name']} ({where}:{f.get('line', '?')})"

    return samples, [(label(i), c, total[i]) for i, c in own.most_common(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description="py-spy profile of the gateway under POST 1 KiB, 50 conns")
    parser.add_argument("--duration", type=int, default=15, help="seconds of sampling")
    parser.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--system", choices=(GATEWAY, PLAIN), default=GATEWAY, help="what to profile")
    parser.add_argument("--lines", action="store_true", help="per line rather than per function")
    parser.add_argument("--workload", choices=[w.key for w in WORKLOADS], default="post50")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    pinning = Pinning.detect()
    pinning.pin_self()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(exist_ok=True)
    workload = next(w for w in WORKLOADS if w.key == args.workload)
    suffix = f"-{workload.key}" + ("-plain" if args.system == PLAIN else "")
    suffix += ("-native" if args.native else "") + ("-lines" if args.lines else "")
    out = RESULTS_DIR / f"profile-{stamp}{suffix}.speedscope.json"
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        procs = Procs(Path(tmp))
        launcher = Launcher(procs, pinning, Path(tmp))
        try:
            _, urls = launcher.nginx_upstreams("profile")
            target = launcher.system(args.system, urls, "profile")
            assert target.process is not None
            run_wrk(procs, pinning, Path(tmp), workload, target.url, 2, 1)  # warm-up, writes the script
            wrk = [
                *pinning.load(),
                "wrk",
                "-t1",
                f"-c{workload.connections}",
                f"-d{args.duration + 4}s",
                "-s",
            ]
            wrk += [str(Path(tmp) / f"wrk-{workload.key}.lua"), target.url + workload.path]
            load = procs.start("wrk-profile", wrk)
            time.sleep(1.0)
            spy = [
                *pinning.load(),
                py_spy,
                "record",
                "-p",
                str(target.process.pid),
                "-d",
                str(args.duration),
            ]
            spy += ["-r", "200", "--format", "speedscope", "-o", str(out)]
            spy += [] if args.lines else ["--function"]
            spy += ["--native"] if args.native else []
            procs.record(spy)
            subprocess.run(spy, check=True, timeout=args.duration + 60, capture_output=True)
            procs.stop(load)
        finally:
            procs.stop_all()
    samples, top = top_functions(json.loads(out.read_text()), args.top)
    print("commands:\n  " + "\n  ".join(procs.commands))
    print(f"\nprofile: {out} ({samples:.1f} s of samples, idle excluded)\n")
    print("| own % | total % | function |\n|---|---|---|")
    for name, own, total in top:
        print(f"| {own * 100 / samples:.1f} | {total * 100 / samples:.1f} | {name} |")


if __name__ == "__main__":
    main()
