"""Fan-out client: N concurrent SSE streams, ramped up, and the delivery delay of every chunk.

The upstream (`mock-inference --stamp-chunks`) writes `"sent_ns": time.monotonic_ns()` first in
every JSON chunk. CLOCK_MONOTONIC is one clock for all processes of a Linux machine, so arrival
minus `sent_ns` is how long a chunk took from the upstream's write to this client's read, through
the system under test. One aiohttp session with no connection limit (aiohttp's default of 100
would queue 900 of 1,000 streams); the open-files soft limit is raised to the hard limit first.

Usage: python -m bench.fanout_client --url URL --streams 1000 --chunks 20 --interval 0.25 --ramp 1.5
Output: one JSON object: stream counts, errors, chunk counts, chunk delay percentiles and time to
first byte percentiles (request sent to the first body bytes; through the gateway that is the first
content event, since it holds a stream until then) in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop

from bench.procs import raise_nofile_limit

BODY = b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"hello"}]}'
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
_STAMP = b'data: {"sent_ns":'
_DONE = b"data: [DONE]"


@dataclass
class Tally:
    """What all streams saw, shared by the stream tasks (one event loop, no locks needed)."""

    delays_ns: list[int] = field(default_factory=list)
    ttfb_ns: list[int] = field(default_factory=list)  # request sent to the first body bytes, per stream
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    completed: int = 0
    open_now: int = 0
    peak_open: int = 0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(detail)


def take_events(buffer: bytearray, arrived_ns: int, delays_ns: list[int]) -> bool:
    """Consume the complete events in `buffer`, recording stamped ones; True if `[DONE]` was seen."""
    done = False
    start = 0
    while (end := buffer.find(b"\n\n", start)) >= 0:
        event = buffer[start:end]
        start = end + 2
        if event.startswith(_STAMP):
            # Only the integer is parsed, not the JSON: 20,000+ chunks share one CPU with the upstream.
            comma = event.index(b",", len(_STAMP))
            delays_ns.append(arrived_ns - int(event[len(_STAMP) : comma]))
        elif event == _DONE:
            done = True
    del buffer[:start]
    return done


async def one_stream(session: aiohttp.ClientSession, url: str, start_at: float, tally: Tally) -> None:
    """Wait for this stream's slot in the ramp, then read one stream to its end."""
    await asyncio.sleep(max(0.0, start_at - asyncio.get_running_loop().time()))
    buffer = bytearray()
    done = False
    sent_ns = time.monotonic_ns()
    first = True
    try:
        async with session.post(url, data=BODY, headers=HEADERS) as resp:
            if resp.status != 200:
                tally.error(f"status {resp.status}", (await resp.text())[:200])
                return
            tally.open_now += 1
            tally.peak_open = max(tally.peak_open, tally.open_now)
            try:
                async for data in resp.content.iter_any():
                    arrived_ns = time.monotonic_ns()
                    if first:
                        tally.ttfb_ns.append(arrived_ns - sent_ns)
                        first = False
                    buffer += data
                    done = take_events(buffer, arrived_ns, tally.delays_ns) or done
            finally:
                tally.open_now -= 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(type(exc).__name__, f"{type(exc).__name__}: {exc}")
        return
    if done:
        tally.completed += 1
    else:
        tally.error("ended without [DONE]", "stream ended without [DONE]")


def percentile_ms(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile (0 < q <= 1) of sorted nanosecond values, in ms; NaN when empty."""
    if not sorted_ns:
        return math.nan
    return sorted_ns[min(len(sorted_ns) - 1, max(0, math.ceil(q * len(sorted_ns)) - 1))] / 1e6


async def run(url: str, streams: int, chunks: int, interval_s: float, ramp_s: float) -> dict[str, Any]:
    """Open `streams` streams spread evenly over `ramp_s`; every stream and the whole run are bounded."""
    tally = Tally()
    stream_s = chunks * interval_s
    timeout = aiohttp.ClientTimeout(total=stream_s + 30.0, sock_connect=5.0)
    connector = aiohttp.TCPConnector(limit=0)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        t0 = loop.time()
        tasks = [
            asyncio.create_task(one_stream(session, url, t0 + ramp_s * i / streams, tally))
            for i in range(streams)
        ]
        _, pending = await asyncio.wait(tasks, timeout=ramp_s + stream_s + 45.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed_s = loop.time() - t0
    delays = sorted(tally.delays_ns)
    ttfb = sorted(tally.ttfb_ns)
    return {
        "streams": streams,
        "completed": tally.completed,
        "unfinished": len(pending),
        "errors": sum(tally.errors.values()) + len(pending),
        "error_kinds": dict(tally.errors),
        "error_samples": tally.error_samples,
        "peak_open": tally.peak_open,
        "chunks": len(delays),
        "chunks_expected": streams * (chunks + 1),  # content chunks and the finish chunk
        "elapsed_s": elapsed_s,
        "delay_p50_ms": percentile_ms(delays, 0.50),
        "delay_p90_ms": percentile_ms(delays, 0.90),
        "delay_p99_ms": percentile_ms(delays, 0.99),
        "delay_p999_ms": percentile_ms(delays, 0.999),
        "delay_max_ms": delays[-1] / 1e6 if delays else math.nan,
        "delay_mean_ms": sum(delays) / len(delays) / 1e6 if delays else math.nan,
        "ttfb_p50_ms": percentile_ms(ttfb, 0.50),
        "ttfb_p99_ms": percentile_ms(ttfb, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="concurrent SSE streams with per-chunk delivery delay")
    parser.add_argument("--url", required=True, help="base URL of the system (127.0.0.1)")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks the upstream sends")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between chunks")
    parser.add_argument("--ramp", type=float, default=1.5, help="seconds over which streams open")
    args = parser.parse_args()
    nofile = raise_nofile_limit()
    url = args.url.rstrip("/") + "/v1/chat/completions"
    result = uvloop.run(run(url, args.streams, args.chunks, args.interval, args.ramp))
    result["client_nofile"] = nofile
    print(json.dumps(result))


if __name__ == "__main__":
    main()
