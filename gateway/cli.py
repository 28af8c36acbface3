"""Command line: `gateway [flags]` runs the gateway, `gateway demo` runs it on two local mocks.

The only module that reads the process environment (through pydantic-settings), chooses the
event loop and installs signal handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.app import build_gateway, create_admin_app, start_proxy_server
from gateway.config import ConfigError, GatewaySettings, Strategy, load_settings
from gateway.http_server import HttpServer

log = logging.getLogger("gateway")

GC_GEN0_THRESHOLD = 20_000


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not within 0-65535")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `gateway` argument parser; every flag overrides the matching setting."""
    parser = argparse.ArgumentParser(
        prog="gateway",
        description=(
            "Failover reverse proxy for AI inference endpoints. Every flag can also be set "
            "with a GATEWAY_* environment variable or in a YAML file (--config); flags win, "
            "then the environment, then the file."
        ),
        epilog="Run 'gateway demo' to try it on two local mock upstreams (one of them flaky).",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "demo"),
        default="run",
        help="run (default): serve the configured upstreams; demo: two local mocks behind it",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML settings file (also GATEWAY_CONFIG_FILE)",
    )
    parser.add_argument(
        "--upstream",
        action="append",
        metavar="[NAME=]URL",
        help="an upstream base URL, optionally named; repeat for each (GATEWAY_UPSTREAMS)",
    )
    parser.add_argument("--host", help="address to serve the proxy on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, help="proxy port (default 8080; 0 picks a free one)")
    parser.add_argument("--admin-host", help="address of the admin server (default 127.0.0.1)")
    parser.add_argument("--admin-port", type=_port, help="admin port (default 9901)")
    parser.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        help="how to choose among healthy upstreams (default latency)",
    )
    parser.add_argument(
        "--connect-timeout", type=_positive_float, metavar="SECONDS", help="TCP connect (default 2)"
    )
    parser.add_argument(
        "--attempt-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="time to response headers per attempt (default 120)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="longest gap between response chunks (default 60)",
    )
    parser.add_argument(
        "--deadline",
        type=_positive_float,
        metavar="SECONDS",
        help="bound on all attempts before a response starts (default none)",
    )
    parser.add_argument(
        "--health-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="active health check interval (default 10)",
    )
    parser.add_argument(
        "--max-attempts", type=int, metavar="N", help="attempts per request in all (default 3)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="proxy processes sharing the port via SO_REUSEPORT, about one per core (default 1)",
    )
    parser.add_argument("--access-log", action="store_true", default=None, help="JSON line per request")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given on the command line, nested the way GatewaySettings expects."""
    flat = {
        "upstreams": args.upstream,
        "host": args.host,
        "port": args.port,
        "admin_host": args.admin_host,
        "admin_port": args.admin_port,
        "strategy": args.strategy,
        "access_log": args.access_log,
        "log_level": args.log_level,
        "workers": args.workers,
    }
    nested = {
        ("timeouts", "connect_s"): args.connect_timeout,
        ("timeouts", "attempt_s"): args.attempt_timeout,
        ("timeouts", "idle_s"): args.idle_timeout,
        ("timeouts", "deadline_s"): args.deadline,
        ("health", "interval_s"): args.health_interval,
        ("retry", "max_attempts"): args.max_attempts,
    }
    out: dict[str, Any] = {k: v for k, v in flat.items() if v is not None}
    for (group, key), value in nested.items():
        if value is not None:
            out.setdefault(group, {})[key] = value
    return out


def configure_logging(level: str, *, worker: int | None = None) -> None:
    """Plain one-line logs on stderr; access lines are JSON already. Worker lines say which."""
    tag = "" if worker is None else f"worker-{worker} "
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(
    settings: GatewaySettings,
    *,
    on_ready: Callable[[int, int], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    reuse_port: bool = False,
    admin_socket: str | None = None,
    drained: Collection[str] = (),
) -> None:
    """Serve the proxy and admin apps until SIGTERM/SIGINT (or `stop`), then drain gracefully.

    A worker under `--workers` shares the port (`reuse_port`) and serves its admin app on the unix
    socket `admin_socket` instead of the admin port, which its supervisor serves. Upstreams named
    in `drained` are drained before the first request (a replaced worker keeps earlier drains).
    """
    gateway = build_gateway(settings)
    await gateway.start()
    for name in drained:
        if name in gateway.pool.by_name:
            gateway.pool.drain(gateway.pool.by_name[name], gateway.clock())
    admin_runner = web.AppRunner(create_admin_app(gateway), access_log=None, shutdown_timeout=1.0)
    await admin_runner.setup()
    server: HttpServer | None = None
    try:
        server = await start_proxy_server(gateway, reuse_port=reuse_port)
        # The admin site starts after the proxy listens, so an answering admin means serving.
        admin_port = await _start_admin_site(admin_runner, settings, admin_socket)
        port = server.port
        if admin_socket is None:
            log.info(
                "gateway %s serving on http://%s:%d (admin http://%s:%d), %d upstream(s): %s",
                __version__,
                settings.host,
                port,
                settings.admin_host,
                admin_port,
                len(settings.upstreams),
                ", ".join(f"{u.name}={u.url}" for u in settings.upstreams),
            )
        else:
            log.info("pid %d serving on port %d (admin unix:%s)", os.getpid(), port, admin_socket)
        tune_gc()
        if on_ready is not None:
            result = on_ready(port, admin_port)
            if result is not None:
                await result
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info(
            "shutting down: no new connections, %.0f s for in-flight requests", settings.shutdown_grace_s
        )
        gateway.draining = True
    finally:
        # Stops accepting, waits up to the grace period for in-flight requests, then closes.
        if server is not None:
            await server.shutdown(settings.shutdown_grace_s)
        await admin_runner.cleanup()
        await gateway.close()


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running proxy.

    Start-up objects (modules, settings, the app) live forever: freezing them keeps every later
    collection from walking them again. Per-request garbage is almost all freed by reference
    counting, so young-generation collections can run far less often than Python's default of
    every 700 allocations, which profiles showed costing several percent of CPU under load.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def _start_admin_site(
    runner: web.AppRunner, settings: GatewaySettings, admin_socket: str | None
) -> int:
    """Serve the admin app on the admin port, or on `admin_socket`; the bound port (0 for a socket)."""
    if admin_socket is not None:
        await web.UnixSite(runner, admin_socket).start()
        return 0
    await web.TCPSite(runner, settings.admin_host, settings.admin_port).start()
    return _bound_port(runner)


def _bound_port(runner: web.AppRunner) -> int:
    addresses = runner.addresses
    return int(addresses[0][1]) if addresses else 0


def run(coro_factory: Callable[[], Awaitable[None]]) -> None:
    """Run on uvloop where available."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro_factory())  # type: ignore[arg-type]
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro_factory())  # type: ignore[arg-type]


def run_gateway(settings: GatewaySettings) -> None:
    """Serve in this process, or supervise `settings.workers` processes sharing the port."""
    if settings.workers == 1:
        run(lambda: serve(settings))
        return
    # Imported here so a single-process gateway never loads multiprocessing.
    from gateway.supervisor import WorkerStartError, supervise

    try:
        run(lambda: supervise(settings))
    except WorkerStartError as err:
        print(f"gateway: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `gateway` command."""
    args = build_parser().parse_args(argv)
    overrides = overrides_from_args(args)
    config_file = args.config
    if config_file is None and os.environ.get("GATEWAY_CONFIG_FILE"):
        config_file = Path(os.environ["GATEWAY_CONFIG_FILE"])
    if args.command == "demo":
        from gateway.demo import run_demo

        if overrides.get("workers", 1) != 1:
            # The demo's mock upstreams live in the gateway's own process.
            print("gateway: demo runs in one process; run without --workers", file=sys.stderr)
            raise SystemExit(2)

        configure_logging(overrides.get("log_level", "info"))
        run(lambda: run_demo(overrides, config_file))
        return
    try:
        settings = load_settings(overrides, config_file)
    except ConfigError as err:
        print(f"gateway: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    try:
        run_gateway(settings)
    except OSError as err:
        # Typically the port is taken or the address does not exist on this host.
        print(f"gateway: cannot listen: {err.strerror or err}", file=sys.stderr)
        raise SystemExit(1) from None
