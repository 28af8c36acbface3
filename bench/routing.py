"""`python -m bench routing`: routing policies compared on simulated vLLM-like engines.

Three `mock-inference --engine` instances (the third `--speed 0.7`, 30% slower), started fresh
for every system so each begins with cold caches, serve one seeded open-loop workload: sessions
and one-off prompts arrive as a Poisson process at `--rate` per second for `--duration` s.
Sessions belong to tenants with long system prompts and run several turns (each turn repeats the
conversation, so it can hit the prefix cache of the engine that served the previous one), with
seeded think times; one-off prompts share nothing. Most requests stream; most leave `max_tokens`
out, so the engines' long-tailed output lengths apply. Systems: `direct-round-robin` (the client
spreads requests over the engines in turn) and the gateway with `--strategy round_robin`,
`least_inflight` and `latency`. Reported per system: TTFT p50/p90/p99, end-to-end p50/p99,
output tokens/s, prefix-cache hit rate (from the engines' /stats), preemptions and failures.
Everything is on 127.0.0.1; a run is bounded by `--duration` plus `--drain`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.procs import Procs, Started, wait_http_ok

VENV_BIN = Path(sys.executable).parent
SYSTEMS = ("direct-round-robin", "gateway-round_robin", "gateway-least_inflight", "gateway-latency")
SPEEDS = (1.0, 1.0, 0.7)
_WORDS = "route cache token block queue batch prefix tenant session model engine stream load".split()


@dataclass(frozen=True)
class Turn:
    """One request of a session: the user's words, streaming or not, and an optional max_tokens."""

    user: str
    stream: bool
    max_tokens: int | None
    think_s: float  # pause after the previous answer


@dataclass(frozen=True)
class Arrival:
    """A session (or a one-off prompt: one turn, no tenant) starting at `at_s`."""

    at_s: float
    system: str | None
    turns: tuple[Turn, ...]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) + str(rng.randrange(1000)) for _ in range(words))


def build_workload(seed: int, rate: float, duration_s: float, tenants: int = 4) -> list[Arrival]:
    """The seeded arrivals of a run: the same list for every system compared."""
    rng = random.Random(seed)
    # long system prompts: 800-1600 words, so 2,000-5,000 tokens
    prompts = [f"Tenant {t} policy. " + _text(rng, rng.randrange(800, 1600)) for t in range(tenants)]
    weights = [1.0 / (t + 1) for t in range(tenants)]  # a few big tenants, some small
    out: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        if rng.random() < 0.7:
            system: str | None = rng.choices(prompts, weights)[0]
            n_turns = rng.randint(1, 4)
        else:
            system, n_turns = None, 1
        turns = tuple(
            Turn(
                user=_text(rng, rng.randrange(10, 60 if system else 400)),
                stream=rng.random() < 0.9,
                max_tokens=rng.choice((64, 256)) if rng.random() < 0.2 else None,
                think_s=0.0 if i == 0 else rng.uniform(0.2, 1.5),
            )
            for i in range(n_turns)
        )
        out.append(Arrival(t, system, turns))
        t += rng.expovariate(rate)
    return out


@dataclass
class Sample:
    """The outcome of one request."""

    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Targets:
    """Where requests go: one URL, or several in turn (client-side round robin)."""

    urls: Sequence[str]
    _next: int = field(default=0)

    def pick(self) -> str:
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        return url


async def _request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[Sample, str]:
    start = time.perf_counter()
    text = ""
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return Sample(False, error=f"HTTP {resp.status}"), ""
            if not body["stream"]:
                data = await resp.json()
                e2e = time.perf_counter() - start
                text = data["choices"][0]["message"]["content"]
                return Sample(True, e2e, e2e, data["usage"]["completion_tokens"]), text
            ttft = None
            tokens = 0
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                event = orjson.loads(line[6:])
                if "error" in event:
                    return Sample(False, error="error event"), ""
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", ()):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        text += piece
            return Sample(ttft is not None, ttft, time.perf_counter() - start, tokens), text
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
        return Sample(False, error=type(exc).__name__), ""


async def _session(
    arrival: Arrival, t0: float, targets: Targets, session: aiohttp.ClientSession, samples: list[Sample]
) -> None:
    await asyncio.sleep(max(0.0, t0 + arrival.at_s - time.perf_counter()))
    messages: list[dict[str, str]] = []
    if arrival.system is not None:
        messages.append({"role": "system", "content": arrival.system})
    for turn in arrival.turns:
        await asyncio.sleep(turn.think_s)
        messages.append({"role": "user", "content": turn.user})
        body: dict[str, Any] = {"model": "mock-model", "messages": messages, "stream": turn.stream}
        if turn.stream:
            body["stream_options"] = {"include_usage": True}
        if turn.max_tokens is not None:
            body["max_tokens"] = turn.max_tokens
        sample, text = await _request(session, targets.pick(), body)
        samples.append(sample)
        if not sample.ok:
            return
        messages.append({"role": "assistant", "content": text})


async def run_workload(
    workload: Sequence[Arrival], targets: Targets, duration_s: float, drain_s: float
) -> tuple[list[Sample], int, float]:
    """Play the workload; the samples, the requests cut at the deadline, and the wall time."""
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(_session(a, t0, targets, session, samples)) for a in workload]
        _, pending = await asyncio.wait(tasks, timeout=duration_s + drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return samples, len(pending), time.perf_counter() - t0


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def summarize(
    samples: Sequence[Sample], cut: int, wall_s: float, engines: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """One row of the report."""
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    e2e = [s.e2e_s for s in ok if s.e2e_s is not None]
    queries = sum(e["prefix_cache"]["queries"] for e in engines)
    hits = sum(e["prefix_cache"]["hits"] for e in engines)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "failures": len(samples) - len(ok) + cut,
        "ttft_p50_s": _quantile(ttft, 0.5),
        "ttft_p90_s": _quantile(ttft, 0.9),
        "ttft_p99_s": _quantile(ttft, 0.99),
        "e2e_p50_s": _quantile(e2e, 0.5),
        "e2e_p99_s": _quantile(e2e, 0.99),
        "output_tokens_per_s": sum(s.output_tokens for s in ok) / wall_s if wall_s else 0.0,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "preemptions": sum(e["preemptions"] for e in engines),
        # engine-side TTFT (arrival in the engine to first token): the client's minus the network and proxy
        "engine_ttft_p99_s": max((e["ttft_s"]["p99"] or 0.0 for e in engines), default=None),
        "completed_by_engine": [e["completed"] for e in engines],
    }


def _engines(procs: Procs, extra: Sequence[str]) -> tuple[list[Started], list[str]]:
    started, urls = [], []
    for i, speed in enumerate(SPEEDS):
        port = procs.free_port()
        argv = [str(VENV_BIN / "mock-inference"), "--engine", "--port", str(port), "--name", f"e{i}"]
        argv += ["--speed", str(speed), *extra]
        proc = procs.start(f"engine-e{i}", argv)
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(url + "/health", proc)
        started.append(proc)
        urls.append(url)
    return started, urls


def _gateway(procs: Procs, strategy: str, urls: Sequence[str]) -> tuple[Started, str]:
    port, admin = procs.free_port(), procs.free_port()
    argv = [str(VENV_BIN / "gateway"), "--port", str(port), "--admin-port", str(admin)]
    argv += ["--strategy", strategy, "--health-interval", "1"]
    argv += [arg for i, u in enumerate(urls) for arg in ("--upstream", f"e{i}={u}")]
    proc = procs.start(f"gateway-{strategy}", argv)
    wait_http_ok(f"http://127.0.0.1:{admin}/readyz", proc)
    return proc, f"http://127.0.0.1:{port}"


async def _engine_stats(urls: Sequence[str]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        out = []
        for url in urls:
            async with session.get(url + "/stats") as resp:
                out.append(await resp.json())
        return out


def run_system(
    name: str, opts: argparse.Namespace, workload: Sequence[Arrival], procs: Procs
) -> dict[str, Any]:
    """Start fresh engines (and the gateway), play the workload, stop them; the summary row."""
    engine_args = ["--time-scale", str(opts.time_scale), "--seed", str(opts.seed)]
    engines, urls = _engines(procs, engine_args)
    gateway: Started | None = None
    try:
        if name == "direct-round-robin":
            targets = Targets(urls)
        else:
            gateway, url = _gateway(procs, name.split("-", 1)[1], urls)
            targets = Targets([url])
        samples, cut, wall = asyncio.run(run_workload(workload, targets, opts.duration, opts.drain))
        row = summarize(samples, cut, wall, asyncio.run(_engine_stats(urls)))
    finally:
        if gateway is not None:
            procs.stop(gateway)
        for proc in engines:
            procs.stop(proc)
    return {"system": name, **row}


def _fmt(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def render(rows: Sequence[dict[str, Any]], opts: argparse.Namespace, arrivals: int) -> str:
    """The Markdown report."""
    lines = [
        f"# Routing on simulated engines (seed {opts.seed}, {opts.rate:g} sessions/s for "
        f"{opts.duration:g} s, {arrivals} sessions, time scale {opts.time_scale:g}, "
        f"engine speeds {', '.join(map(str, SPEEDS))})",
        "",
        "| system | requests | failures | TTFT p50 ms | p90 | p99 | e2e p50 ms | p99 | output tok/s "
        "| prefix hit rate | preemptions | completed per engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['requests']} | {r['failures']} | {_fmt(r['ttft_p50_s'], 1e3)} "
            f"| {_fmt(r['ttft_p90_s'], 1e3)} | {_fmt(r['ttft_p99_s'], 1e3)} | {_fmt(r['e2e_p50_s'], 1e3)} "
            f"| {_fmt(r['e2e_p99_s'], 1e3)} | {_fmt(r['output_tokens_per_s'])} "
            f"| {_fmt(r['prefix_cache_hit_rate'], 100, 1)}% | {r['preemptions']} "
            f"| {' / '.join(map(str, r['completed_by_engine']))} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench routing", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=1.5, help="sessions and one-off prompts per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--drain", type=float, default=30.0, help="seconds to let requests finish after that")
    p.add_argument("--seed", type=int, default=1, help="seed of the workload and the engines")
    p.add_argument("--time-scale", type=float, default=1.0, help="the engines' --time-scale")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="directory of the report")
    p.add_argument("--quick", action="store_true", help="10 s of arrivals, 15 s of drain")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.duration, opts.drain = 10.0, 15.0
    bad = [s for s in opts.systems.split(",") if s not in SYSTEMS]
    if bad or opts.rate <= 0 or opts.duration <= 0 or opts.time_scale <= 0:
        p.error(f"unknown systems {bad}" if bad else "--rate, --duration and --time-scale must be above 0")
    return opts


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    workload = build_workload(opts.seed, opts.rate, opts.duration)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        procs = Procs(Path(tmp))
        try:
            for name in opts.systems.split(","):
                print(f"bench routing: {name} ...", flush=True)
                rows.append(run_system(name, opts, workload, procs))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            procs.stop_all()
    report = render(rows, opts, len(workload))
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (opts.out / f"routing-{stamp}.md").write_text(report)
    data = {"options": vars(opts) | {"out": str(opts.out)}, "rows": rows}
    (opts.out / f"routing-{stamp}.json").write_text(json.dumps(data, indent=2))
    print(report)
    return 0
