"""Failover load loop: W concurrent workers for D seconds, every status and latency recorded.

At --fault-at seconds it injects the fault itself, so the fault time is exact on the same clock:
SIGKILL to --kill-pid, or a POST of --control-body to --control-url (mock-inference /control).
After D seconds no request starts; requests still in flight after --grace seconds are cancelled
and counted as unfinished (their age counts as their latency).

Usage: python -m bench.loadloop --url URL --duration 20 --workers 20 --fault-at 5 --kill-pid PID
Output: one JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop

BODY = b'{"model":"bench","messages":[{"role":"user","content":"hello"}],"max_tokens":8}'
_STALL_S = 1.0


@dataclass
class Record:
    """Everything the clients saw."""

    t0: float
    done: list[tuple[float, float, str]] = field(default_factory=list)  # (start, latency, result)
    inflight: dict[int, float] = field(default_factory=dict)  # worker -> start
    fault_t: float | None = None
    fault_error: str | None = None


async def worker(n: int, session: aiohttp.ClientSession, url: str, stop_at: float, rec: Record) -> None:
    headers = {"Content-Type": "application/json"}
    while (start := time.monotonic()) < stop_at:
        rec.inflight[n] = start
        try:
            async with session.post(url, data=BODY, headers=headers) as resp:
                await resp.read()
                result = str(resp.status)
        except aiohttp.ClientError as exc:
            result = type(exc).__name__
        finally:
            rec.inflight.pop(n, None)
        rec.done.append((start - rec.t0, time.monotonic() - start, result))


async def inject(args: argparse.Namespace, session: aiohttp.ClientSession, rec: Record) -> None:
    await asyncio.sleep(args.fault_at)
    rec.fault_t = time.monotonic() - rec.t0
    try:
        if args.kill_pid:
            os.kill(args.kill_pid, signal.SIGKILL)
        elif args.control_url:
            body = args.control_body.encode()
            async with session.post(args.control_url, data=body) as resp:
                if resp.status != 200:
                    rec.fault_error = f"control answered {resp.status}: {await resp.text()}"
    except (OSError, aiohttp.ClientError) as exc:
        rec.fault_error = f"{type(exc).__name__}: {exc}"


def summarize(rec: Record, duration_s: float, fault_at: float, unfinished: list[float]) -> dict[str, Any]:
    """Counts, latencies and per-second timeline; `unfinished` holds the ages of cancelled requests."""
    results = Counter(r for _, _, r in rec.done)
    latencies = sorted([lat for _, lat, _ in rec.done] + unfinished)
    after = [lat for s, lat, _ in rec.done if s + lat >= fault_at]
    timeline_ok = [0] * (int(duration_s) + 1)
    timeline_bad = [0] * (int(duration_s) + 1)
    for s, _, r in rec.done:
        bucket = min(int(s), int(duration_s))
        (timeline_ok if r.startswith("2") else timeline_bad)[bucket] += 1
    pre = [1 for s, _, _ in rec.done if 1.0 <= s < fault_at]
    post = [1 for s, _, _ in rec.done if fault_at + 1.0 <= s < duration_s]

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3 if latencies else 0.0

    non_2xx = {k: v for k, v in results.items() if k.isdigit() and not k.startswith("2")}
    transport = {k: v for k, v in results.items() if not k.isdigit()}
    return {
        "requests": len(rec.done),
        "ok": sum(v for k, v in results.items() if k.startswith("2")),
        "non_2xx": non_2xx,
        "transport_errors": transport,
        "unfinished": len(unfinished),
        "errors": sum(non_2xx.values()) + sum(transport.values()) + len(unfinished),
        "max_latency_ms": latencies[-1] * 1e3 if latencies else 0.0,
        "max_latency_after_fault_ms": max(after + unfinished, default=0.0) * 1e3,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "stalls_over_1s": sum(1 for lat in latencies if lat > _STALL_S),
        "rps_before_fault": len(pre) / max(fault_at - 1.0, 1e-9),
        "rps_after_fault": len(post) / max(duration_s - fault_at - 1.0, 1e-9),
        "fault_at_s": rec.fault_t,
        "fault_error": rec.fault_error,
        "timeline_ok_per_s": timeline_ok,
        "timeline_bad_per_s": timeline_bad,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        rec = Record(time.monotonic())
        stop_at = rec.t0 + args.duration
        tasks = [asyncio.create_task(worker(n, session, args.url, stop_at, rec)) for n in range(args.workers)]
        fault = asyncio.create_task(inject(args, session, rec))
        _, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        end = time.monotonic()
        unfinished = [end - start for start in rec.inflight.values()]
        for task in [*pending, fault]:
            task.cancel()
        await asyncio.gather(*pending, fault, return_exceptions=True)
        return summarize(rec, args.duration, args.fault_at, unfinished)


def main() -> None:
    parser = argparse.ArgumentParser(description="bounded failover load loop")
    parser.add_argument("--url", required=True, help="full URL to POST to")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument("--fault-at", type=float, default=5.0)
    parser.add_argument("--kill-pid", type=int)
    parser.add_argument("--control-url")
    parser.add_argument("--control-body", default="{}")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
