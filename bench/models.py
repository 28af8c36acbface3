"""The cost of models and callers: the gateway's CPU µs per request with them configured vs without.

Two gateway processes in front of the same two nginx upstreams: `plain` (upstreams only) and
`models+callers` (every upstream declares `models` with a rename, so each body is parsed and its
`model` rewritten; an alias; 20 callers, so each key is compared against 20 digests; limits that
never bite). Both get identical requests, `Authorization: Bearer` included, POST at 10
connections with a 1 KiB and a 100 KiB JSON body. Repetitions are interleaved (for each rep, for
each body, both systems) and the report gives medians and their difference and ratio.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from bench.options import Options
from bench.systems import Launcher, System
from bench.workloads import measured_wrk
from bench.wrk import Workload, json_body, run_wrk

Row = dict[str, Any]
PLAIN = "plain"
MODELS = "models+callers"
CALLERS = 20
KEY = "sk-bench-caller-19-0123456789abcdef"  # the last caller's: every digest is compared anyway
TARGET_1K_US = 15.0  # the budget: at most this much more CPU per 1 KiB request
_AUTH = (("Authorization", f"Bearer {KEY}"),)
MODEL_WORKLOADS = (
    Workload("m-post1k", "POST 1 KiB, 10 conns", "POST", "/v1/chat/completions", 10, json_body(1024), _AUTH),
    Workload(
        "m-post100k", "POST 100 KiB, 10 conns", "POST", "/v1/chat/completions", 10, json_body(102400), _AUTH
    ),
)


def gateway_configs(urls: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The two configurations: the same upstreams, with and without models and callers."""
    plain = [{"name": f"u{i}", "url": u} for i, u in enumerate(urls)]
    with_models = [{**u, "models": {"bench": "bench-served", "other": "other"}} for u in plain]
    callers = [
        {
            "name": f"caller-{i}",
            "key_sha256": hashlib.sha256(f"sk-bench-caller-{i}-0123456789abcdef".encode()).hexdigest(),
            "max_inflight": 10_000,
            "requests_per_minute": 1e9,
        }
        for i in range(CALLERS)
    ]
    return {
        PLAIN: {"upstreams": plain},
        MODELS: {"upstreams": with_models, "model_aliases": {"bench-alias": "bench"}, "callers": callers},
    }


def run_models_phase(launcher: Launcher, opts: Options, say: Callable[[str], None]) -> list[Row]:
    """Both gateways under both bodies, interleaved; CPU µs per request of each run."""
    rows: list[Row] = []
    upstream, urls = launcher.nginx_upstreams("models")
    systems: list[System] = []
    try:
        for name, config in gateway_configs(urls).items():
            path = launcher.tmp / f"gateway-{name.replace('+', '-')}.yaml"
            path.write_text(yaml.safe_dump(config))
            systems.append(launcher.gateway_with_config(f"gateway-{name.replace('+', '-')}", path))
        if opts.warmup_s > 0:
            for system in systems:
                for workload in MODEL_WORKLOADS:
                    run_wrk(
                        launcher.procs, launcher.pinning, launcher.tmp, workload, system.url, opts.warmup_s, 1
                    )
        for rep in range(opts.reps):
            for workload in MODEL_WORKLOADS:
                for name, system in zip(gateway_configs(urls), systems, strict=True):
                    row = measured_wrk(launcher, opts, workload, system)
                    row.update(rep=rep, system=name)
                    rows.append(row)
                    say(
                        f"[models {rep + 1}/{opts.reps}] {workload.key:10} {name:15} "
                        f"{row['rps']:>8,.0f} req/s  {row['cpu_us_per_req']:.1f} CPU µs/req  "
                        f"errors {row['errors']}"
                    )
    finally:
        for system in reversed(systems):
            launcher.stop_system(system)
        launcher.procs.stop(upstream)
    return rows


def models_medians(rows: Sequence[Row]) -> list[Row]:
    """Per body: median CPU µs/req and req/s of each system, the difference and the ratio."""
    out: list[Row] = []
    for workload in MODEL_WORKLOADS:
        by_system: dict[str, list[Row]] = {}
        for row in rows:
            if row["workload"] == workload.key:
                by_system.setdefault(row["system"], []).append(row)
        if PLAIN not in by_system or MODELS not in by_system:
            continue
        plain = statistics.median(r["cpu_us_per_req"] for r in by_system[PLAIN])
        models = statistics.median(r["cpu_us_per_req"] for r in by_system[MODELS])
        out.append(
            {
                "workload": workload.key,
                "title": workload.title,
                "reps": len(by_system[PLAIN]),
                "plain_cpu_us": plain,
                "models_cpu_us": models,
                "added_cpu_us": models - plain,
                "ratio": models / plain if plain else float("nan"),
                "plain_rps": statistics.median(r["rps"] for r in by_system[PLAIN]),
                "models_rps": statistics.median(r["rps"] for r in by_system[MODELS]),
                "errors": sum(r["errors"] for rs in by_system.values() for r in rs),
            }
        )
    return out


def render_models(medians: Sequence[Row]) -> str:
    """The report's section: a table and the 1 KiB target line."""
    if not medians:
        return "(not run)\n"
    lines = [
        "| body | reps | plain CPU µs/req | models+callers CPU µs/req | added µs | ratio "
        "| req/s plain / models | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in medians:
        lines.append(
            f"| {m['title']} | {m['reps']} | {m['plain_cpu_us']:.1f} | {m['models_cpu_us']:.1f} | "
            f"{m['added_cpu_us']:+.1f} | {m['ratio']:.2f} | {m['plain_rps']:,.0f} / {m['models_rps']:,.0f} | "
            f"{m['errors']} |"
        )
    one_k = next((m for m in medians if m["workload"] == "m-post1k"), None)
    if one_k is not None:
        verdict = "met" if one_k["added_cpu_us"] <= TARGET_1K_US else "NOT met"
        lines.append(
            f"\nTarget (at most {TARGET_1K_US:g} µs more per 1 KiB request): {verdict} "
            f"({one_k['added_cpu_us']:+.1f} µs, medians of {one_k['reps']} interleaved repetitions)."
        )
    return "\n".join(lines) + "\n"
