"""Stream client: N sequential SSE chat completions; prints time to first byte and total per stream.

Usage: python -m bench.sse_client --url http://127.0.0.1:8080 --streams 20
Output: one JSON object {"ttfb_ms": [...], "total_ms": [...], "events": [...], "errors": [...]}.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import aiohttp
import uvloop

BODY = b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"hello"}]}'


async def one_stream(session: aiohttp.ClientSession, url: str) -> tuple[float, float, int]:
    """(ms to the first body byte, ms to the end, number of `data:` events) of one stream."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    started = time.perf_counter()
    first: float | None = None
    events = 0
    async with session.post(url + "/v1/chat/completions", data=BODY, headers=headers) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_any():
            if first is None:
                first = time.perf_counter()
            events += chunk.count(b"data: ")
    end = time.perf_counter()
    first = end if first is None else first
    return (first - started) * 1e3, (end - started) * 1e3, events


async def run(url: str, streams: int, timeout_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"ttfb_ms": [], "total_ms": [], "events": [], "errors": []}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        await one_stream(session, url)  # warm-up: connection set up, not counted
        for _ in range(streams):
            try:
                ttfb, total, events = await one_stream(session, url)
            except (aiohttp.ClientError, TimeoutError) as exc:
                out["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            out["ttfb_ms"].append(ttfb)
            out["total_ms"].append(total)
            out["events"].append(events)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="sequential SSE streams through one URL")
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=10.0, help="bound per stream, seconds")
    args = parser.parse_args()
    result = uvloop.run(run(args.url.rstrip("/"), args.streams, args.timeout))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
