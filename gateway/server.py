"""One gateway process's life: logging, the uvloop runner, the proxy and admin servers, the drain.

`serve` builds the gateway, serves the proxy on its port and the admin app on the admin port (or,
for a worker under `--workers`, on a unix socket), installs the SIGTERM/SIGINT handlers, and on a
signal drains: readiness turns 503, no new connections, in-flight requests get the grace period.
The supervisor of `--workers N` (`gateway.workers.supervisor`) runs one `serve` per worker.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web

from gateway import __version__
from gateway.admin import create_admin_app
from gateway.app import build_gateway, start_proxy_server
from gateway.config import GatewaySettings
from gateway.http.server import HttpServer

log = logging.getLogger("gateway")

GC_GEN0_THRESHOLD = 20_000
# File descriptors kept back from client connections: listening sockets, the admin port and its
# clients, health checks, logs. The rest is split between client connections and the upstream
# connection each may hold.
FD_RESERVE = 100
MIN_CONNECTIONS = 16


def raise_open_files_limit() -> int | None:
    """Raise the soft open-files limit to the hard one (as nginx's worker_rlimit_nofile); the new soft."""
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


def default_max_connections(open_files: int | None) -> int | None:
    """Client connections that fit in `open_files` descriptors with room for upstreams and admin."""
    if open_files is None:
        return None
    return max(MIN_CONNECTIONS, (open_files - FD_RESERVE) // 2)


def configure_logging(level: str, *, worker: int | None = None) -> None:
    """Plain one-line logs on stderr; access lines are JSON already. Worker lines say which."""
    tag = "" if worker is None else f"worker-{worker} "
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Access lines are pure JSON, one per line, for log shippers: no time/level/logger prefix.
    access = logging.getLogger("gateway.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False


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
    for name in drained:
        if name in gateway.pool.by_name:
            gateway.pool.drain(gateway.pool.by_name[name], gateway.clock())
    admin_app = create_admin_app(gateway)
    if admin_socket is not None:
        from gateway.workers.shared_state import add_worker_routes  # workers only; it imports the app

        add_worker_routes(admin_app)
    admin_runner = web.AppRunner(admin_app, access_log=None, shutdown_timeout=1.0)
    await admin_runner.setup()
    server: HttpServer | None = None
    try:
        open_files = raise_open_files_limit()
        server = await start_proxy_server(
            gateway, reuse_port=reuse_port, max_connections=default_max_connections(open_files)
        )
        # The admin site starts after the proxy listens, so an answering admin means serving.
        admin_port = await _start_admin_site(admin_runner, settings, admin_socket)
        # Health checks start once both ports are ours: a port in use fails before any check.
        await gateway.start()
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
