"""`gateway demo`: two local mock inference upstreams, one steady and one flaky, behind the gateway."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.config import ConfigError, load_settings
from gateway.server import serve
from gateway.testing.mock_inference import MockBehaviour, create_mock_app

CHAT_BODY = '{"model":"mock-model","messages":[{"role":"user","content":"hello"}]}'


async def _start_mock(behaviour: MockBehaviour) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(create_mock_app(behaviour), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def run_demo(overrides: dict[str, Any], config_file: Path | None) -> None:
    """Start the mocks, then the gateway in front of them, until interrupted."""
    steady, steady_port = await _start_mock(
        MockBehaviour(name="steady", latency_s=0.02, chunk_interval_s=0.05)
    )
    flaky, flaky_port = await _start_mock(
        MockBehaviour(name="flaky", latency_s=0.005, chunk_interval_s=0.05, error_rate=0.3)
    )
    demo = {
        # Local mocks: never through an HTTP_PROXY the shell may have set.
        "upstreams": [
            {"name": "steady", "url": f"http://127.0.0.1:{steady_port}", "proxy": "none"},
            {"name": "flaky", "url": f"http://127.0.0.1:{flaky_port}", "proxy": "none"},
        ],
        "health": {"interval_s": 2.0},
    }
    try:
        settings = load_settings({**demo, **overrides}, config_file)
    except ConfigError as err:
        print(f"gateway: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    def announce(port: int, admin_port: int) -> None:
        base = f"http://127.0.0.1:{port}"
        print(
            "\nDemo running: upstream 'steady' and upstream 'flaky' (30% of its answers are 503).\n"
            "Try it (every call succeeds; X-Gateway-Attempts shows the retries):\n"
            f"  curl -si {base}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{CHAT_BODY}'\n"
            "Stream tokens:\n"
            f"  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{CHAT_BODY[:-1]},\"stream\":true}}'\n"
            f"Upstream state: curl -s http://127.0.0.1:{admin_port}/admin/upstreams\n"
            f"Metrics:        curl -s http://127.0.0.1:{admin_port}/metrics\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )

    try:
        await serve(settings, on_ready=announce)
    finally:
        await steady.cleanup()
        await flaky.cleanup()
