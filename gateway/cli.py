"""Command line: `gateway [flags]` runs the gateway, `gateway demo` runs it on two local mocks.

Parses the flags, loads the settings (flags over `GATEWAY_*` environment variables over the YAML
file of `--config` or `GATEWAY_CONFIG_FILE`; see `gateway.config`), and hands them to one
process (`gateway.server`) or to the supervisor of `--workers N` (`gateway.workers.supervisor`).
Configuration errors exit with status 2 and one line; a port that cannot be bound with 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, GatewaySettings, Strategy, load_settings
from gateway.demo import run_demo
from gateway.server import configure_logging, run, serve
from gateway.workers.supervisor import WorkerStartError, supervise


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
        "--first-token-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="time to a stream's first content event per attempt, then retried (default 60)",
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
        ("timeouts", "first_token_s"): args.first_token_timeout,
        ("timeouts", "deadline_s"): args.deadline,
        ("health", "interval_s"): args.health_interval,
        ("retry", "max_attempts"): args.max_attempts,
    }
    out: dict[str, Any] = {k: v for k, v in flat.items() if v is not None}
    for (group, key), value in nested.items():
        if value is not None:
            out.setdefault(group, {})[key] = value
    return out


def run_gateway(settings: GatewaySettings) -> None:
    """Serve in this process, or supervise `settings.workers` processes sharing the port."""
    if settings.workers == 1:
        run(lambda: serve(settings))
        return
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
        if overrides.get("workers", 1) != 1:
            # The demo's mock upstreams live in the gateway's own process.
            print("gateway: demo runs in one process; run without --workers", file=sys.stderr)
            raise SystemExit(2)

        configure_logging(overrides.get("log_level", "info"))
        try:
            run(lambda: run_demo(overrides, config_file))
        except OSError as err:
            print(f"gateway: cannot listen: {err.strerror or err}", file=sys.stderr)
            raise SystemExit(1) from None
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
