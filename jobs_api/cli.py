"""Command line: `jobs-api [serve]` runs the service; submit, status, list and cancel talk to one.

The only jobs_api module that reads the process environment (it builds the JobsSettings every
other module is given, from JOBS_* through pydantic-settings, and reads JOBS_URL and JOBS_API_KEY
for the client commands), chooses the event loop (`run`) and installs signal handlers (`serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from pydantic import ValidationError
from pydantic_settings import SettingsError

from jobs_api.app import create_app
from jobs_api.auth import Authenticator
from jobs_api.client import JobsClient, JobsClientError
from jobs_api.config import JobsSettings
from jobs_api.errors import JobsError
from jobs_api.handlers import HandlerRegistry
from jobs_api.job_types import default_registry
from jobs_api.keys import STOPPING
from jobs_api.progress_display import ProgressDisplay
from jobs_api.server import JobsAppRunner, default_max_connections
from jobs_api.store import open_store, redacted_url

# One entry point runs the service and the client commands, so the client commands import the
# service's modules too (about 0.25 s more start-up); they stay at the top all the same.
log = logging.getLogger("jobs_api")

PROG = "jobs-api"
DEFAULT_URL = "http://127.0.0.1:8081"
CLIENT_COMMANDS = ("submit", "wait", "status", "list", "cancel")
STATUSES = ("queued", "running", "completed", "failed", "cancelled", "timed_out")


def _version() -> str:
    try:
        return metadata.version("failover-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


class UsageError(Exception):
    """Input the operator must fix (bad settings, unreadable job file); exit status 2."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"base URL of the jobs API (JOBS_URL; default {DEFAULT_URL})")
    parser.add_argument("--api-key", help="API key or JWT sent as a Bearer token (JOBS_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    """The `jobs-api` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Durable asynchronous jobs that run long inference operations through the gateway. "
            "Without a command (or with 'serve') it runs the service; settings also come from "
            "JOBS_* environment variables, and flags win."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the jobs API service (the default)")
    serve.add_argument("--host", help="address to listen on (JOBS_HOST; default 127.0.0.1)")
    # Range errors come from the settings, as one line like every other invalid setting.
    serve.add_argument("--port", type=int, help="port (JOBS_PORT; default 8081; 0 picks a free one)")
    serve.add_argument("--gateway-url", help="the gateway jobs run through (default http://127.0.0.1:8080)")
    serve.add_argument("--store", help="job store URL (JOBS_STORE; default sqlite:///./jobs.db)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")

    submit = commands.add_parser("submit", help="submit a job from a JSON file ('-' reads stdin)")
    submit.add_argument("file", metavar="FILE.json")
    submit.add_argument("--wait", action="store_true", help="follow the job; print its final JSON")
    submit.add_argument("--timeout", type=_positive_float, metavar="SECONDS", help="give up waiting after")
    submit.add_argument("--idempotency-key", metavar="KEY", help="submit at most once per key")
    _add_client_flags(submit)

    follow = commands.add_parser("wait", help="follow a job with a progress bar; print its final JSON")
    follow.add_argument("job_id", metavar="ID")
    follow.add_argument("--timeout", type=_positive_float, metavar="SECONDS", help="give up waiting after")
    _add_client_flags(follow)

    status = commands.add_parser("status", help="print a job as JSON")
    status.add_argument("job_id", metavar="ID")
    _add_client_flags(status)

    listing = commands.add_parser("list", help="print the newest jobs as JSON")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--type", dest="job_type", metavar="TYPE")
    listing.add_argument("--limit", type=int, default=20, help="1..100 (default 20)")
    listing.add_argument("--cursor", help="next_cursor of a previous page")
    _add_client_flags(listing)

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id", metavar="ID")
    _add_client_flags(cancel)
    return parser


# --- serve --------------------------------------------------------------------------------------


def describe_settings_error(exc: ValidationError | SettingsError) -> str:
    """One line naming each bad setting (and its environment variable) and what is wrong."""
    if isinstance(exc, SettingsError):
        match = re.search(r'field "([^"]+)"', str(exc))
        field = match.group(1) if match else "settings"
        return f"invalid configuration: {field}: not valid JSON (set via JOBS_{field.upper()})"
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) if loc else "settings"
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown setting"
        env = "JOBS_" + "__".join(p.upper() for p in loc[:1])
        parts.append(f"{field}: {message} (set via {env})")
    return "invalid configuration: " + "; ".join(parts)


def load_settings(args: argparse.Namespace) -> JobsSettings:
    """Settings from flags over JOBS_* variables over defaults; UsageError with one line if invalid."""
    flags = {
        "host": args.host,
        "port": args.port,
        "gateway_url": args.gateway_url,
        "store": args.store,
        "log_level": args.log_level,
    }
    try:
        return JobsSettings(**{k: v for k, v in flags.items() if v is not None})
    except (ValidationError, SettingsError) as exc:
        raise UsageError(describe_settings_error(exc)) from None


def check_settings(settings: JobsSettings) -> HandlerRegistry:
    """Fail fast on what pydantic cannot check: store URL, credentials, handler modules."""
    try:
        open_store(settings.store, prefix=settings.redis_prefix)
    except ValueError as exc:
        raise UsageError(f"invalid configuration: store: {exc} (set via JOBS_STORE)") from None
    try:
        Authenticator(settings)
    except ValueError as exc:
        raise UsageError(f"invalid configuration: {exc}") from None
    try:
        return default_registry(settings.handlers)
    except ValueError as exc:
        raise UsageError(f"invalid configuration: handlers: {exc} (set via JOBS_HANDLERS)") from None


def raise_open_files_limit() -> int | None:
    """Raise the soft open-files limit to the hard one (as the gateway does); the new soft limit.

    Each client connection holds a descriptor: with the soft limit of many systems (1024), a few
    hundred slow clients would otherwise starve the listening socket. None: no limit.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return None if soft == resource.RLIM_INFINITY else soft


def configure_logging(level: str) -> None:
    """Plain one-line logs on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(
    settings: JobsSettings,
    registry: HandlerRegistry,
    *,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    open_files: int | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then stop accepting and drain for shutdown_grace_s.

    Without `max_connections` in the settings, the connection cap follows from `open_files` (the
    process's open-files limit; None: no cap).
    """
    app = create_app(settings, registry=registry)
    runner = JobsAppRunner(
        app,
        header_timeout_s=settings.client_header_timeout_s,
        max_connections=settings.max_connections or default_max_connections(open_files),
        access_log=None,
        handler_cancellation=True,  # a client that leaves must not keep its handler running
        shutdown_timeout=settings.shutdown_grace_s,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        addresses = runner.addresses
        port = int(addresses[0][1]) if addresses else settings.port
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        # On stdout, flushed: scripts and tests read the bound port (--port 0) from this line.
        print(f"{PROG} listening on http://{host}:{port}", flush=True)
        log.info(
            "%s %s serving on http://%s:%d, store %s, gateway %s",
            PROG,
            _version(),
            host,
            port,
            redacted_url(settings.store),
            settings.gateway_url,
        )
        if on_ready is not None:
            on_ready(port)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info(
            "shutting down: no new connections, %.0f s for in-flight requests", settings.shutdown_grace_s
        )
        app[STOPPING].set()
    finally:
        # Stops accepting, ends event streams, waits for in-flight handlers, then stops the runner
        # (which hands running jobs back to the queue) and closes the store.
        await runner.cleanup()


def run(coro_factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run on uvloop where available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro_factory())  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_factory())  # type: ignore[arg-type]


def run_service(args: argparse.Namespace) -> int:
    """`jobs-api serve`."""
    settings = load_settings(args)
    registry = check_settings(settings)
    configure_logging(settings.log_level)
    open_files = raise_open_files_limit()
    try:
        run(lambda: serve(settings, registry, open_files=open_files))
    except OSError as exc:
        # Typically the port is taken or the address does not exist on this host.
        print(
            f"{PROG}: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except JobsError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return 1
    return 0


# --- client commands ----------------------------------------------------------------------------


def read_job_file(name: str) -> dict[str, Any]:
    """The job description in FILE.json ('-' for stdin); UsageError if unreadable."""
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(job, dict):
        raise UsageError(f"{name} must hold a JSON object with 'type' and 'input'")
    return job


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


async def _submit(jobs: JobsClient, args: argparse.Namespace) -> int:
    job = await jobs.submit(read_job_file(args.file), idempotency_key=args.idempotency_key)
    if not args.wait:
        print(job["id"], flush=True)
        return 0
    print(f"job {job['id']} submitted", file=sys.stderr, flush=True)
    return await _follow(jobs, args, job)


async def _follow(jobs: JobsClient, args: argparse.Namespace, job: dict[str, Any]) -> int:
    """Show the job's progress on stderr until it ends; its final JSON on stdout."""
    args.following = job["id"]  # for the Ctrl-C hint of run_client
    display = ProgressDisplay(sys.stderr)
    try:
        display.update(job)
        try:
            final = await jobs.wait(job["id"], args.timeout, on_update=display.update)
        except TimeoutError:
            display.close()
            print(f"{PROG}: job {job['id']} did not finish within {args.timeout:g} s", file=sys.stderr)
            return 1
        display.update(final)
    finally:
        display.close()
    args.following = None
    _print_json(final)
    return 0 if final.get("status") == "completed" else 1


def follow_hint(job_id: str, url: str, api_key_given: bool) -> str:
    """What Ctrl-C while following prints: the job goes on, and the command to follow it again."""
    command = f"{PROG} wait {job_id}"
    if url != DEFAULT_URL:
        command += f" --url {url}"
    key = " (with your API key: --api-key or JOBS_API_KEY)" if api_key_given else ""
    return f"{PROG}: stopped following; job {job_id} keeps running. Follow it again with: {command}{key}"


async def client_command(args: argparse.Namespace) -> int:
    """Run one client command against the API; the exit status."""
    url = args.url or os.environ.get("JOBS_URL") or DEFAULT_URL
    api_key = args.api_key or os.environ.get("JOBS_API_KEY") or None
    async with JobsClient(url, api_key=api_key) as jobs:
        if args.command == "submit":
            return await _submit(jobs, args)
        if args.command == "wait":
            return await _follow(jobs, args, await jobs.get(args.job_id))
        if args.command == "status":
            _print_json(await jobs.get(args.job_id))
        elif args.command == "cancel":
            _print_json(await jobs.cancel(args.job_id))
        else:
            filters = {
                "status": args.status,
                "type": args.job_type,
                "limit": args.limit,
                "cursor": args.cursor,
            }
            _print_json(await jobs.list(**filters))
        return 0


def run_client(args: argparse.Namespace) -> int:
    """A client command with errors as one line on stderr: 1 for API or network errors."""
    url = args.url or os.environ.get("JOBS_URL") or DEFAULT_URL
    try:
        status: int = run(lambda: client_command(args))
    except KeyboardInterrupt:
        following = getattr(args, "following", None)
        if following:
            api_key_given = bool(args.api_key or os.environ.get("JOBS_API_KEY"))
            print("\n" + follow_hint(following, url.rstrip("/"), api_key_given), file=sys.stderr, flush=True)
        return 130
    except JobsClientError as exc:
        print(f"{PROG}: {exc.status} {exc.type}: {exc.message}", file=sys.stderr)
        return 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        print(f"{PROG}: cannot reach {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    return status


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `jobs-api` command."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in (*CLIENT_COMMANDS, "serve", "-h", "--help", "--version"):
        arguments.insert(0, "serve")
    args = build_parser().parse_args(arguments)
    try:
        if args.command == "serve":
            status = run_service(args)
        else:
            status = run_client(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        status = 130
    raise SystemExit(status)
