"""`gateway --workers N`: N gateway processes share the proxy port under one supervisor.

The supervisor reserves the port (SO_REUSEPORT, bound but never listening), spawns the workers,
and lets the kernel spread new connections over them. It serves the merged admin API on the admin
port (`gateway.workers.fleet_admin`), asking each worker over a unix socket in a private 0700 directory.
A worker that exits is replaced after a backoff; SIGTERM/SIGINT stops every worker within the
grace period. Each worker is a whole gateway: health checks, EWMA and retry budget are per worker;
ejections and 429 cooldowns are relayed to every worker (gateway.workers.shared_state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from gateway import __version__
from gateway.config import GatewaySettings
from gateway.server import configure_logging, run, serve
from gateway.workers.fleet_admin import WorkerRef, ask, bearer, create_supervisor_admin_app, mutation_path
from gateway.workers.shared_state import SharedStateRelay

log = logging.getLogger(__name__)

# A worker imports the package and binds in well under a second; this bounds a stuck start.
START_TIMEOUT_S = 60.0
READY_POLL_S = 0.05
# Beyond the workers' own grace period, before stragglers are killed.
KILL_MARGIN_S = 5.0
# A worker that lived this long before exiting was not crash-looping: its backoff starts over.
STABLE_S = 30.0
FIRST_RESTART_DELAY_S = 0.25
MAX_RESTART_DELAY_S = 10.0


class WorkerStartError(RuntimeError):
    """A worker exited or never answered while the gateway was starting."""


def restart_delay_s(quick_crashes: int) -> float:
    """Wait before replacing a worker: 0.25 s after its first quick exit, doubling up to 10 s."""
    if quick_crashes <= 1:
        return FIRST_RESTART_DELAY_S
    return min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2.0 ** (quick_crashes - 1))


def describe_exit(exitcode: int | None) -> str:
    """`exit code 1` or `signal SIGKILL`, for logs."""
    if exitcode is None:
        return "unknown status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to host:port with SO_REUSEPORT.

    Workers bind the same port next to it. It makes a taken port fail here, with one clear error,
    and keeps a port picked with 0 ours while workers come and go. A bound socket that never
    listens receives no connections.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # As asyncio's create_server does, so the workers' sockets match this one.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def make_runtime_dir(parents: Sequence[str | None] = (None, "/dev/shm")) -> Path:
    """A new private (0700) directory for the workers' admin sockets, in the first usable parent.

    None is the system temporary directory (TMPDIR, then /tmp, ...). /dev/shm comes next because
    a container with a read-only root file system (the Helm chart's default) still has it writable.
    """
    reasons: list[str] = []
    for parent in parents:
        try:
            return Path(tempfile.mkdtemp(prefix="gateway-workers-", dir=parent))
        except OSError as err:
            reasons.append(f"{parent or 'temporary directory'}: {err.strerror or err}")
    raise WorkerStartError(
        f"no writable directory for the workers' admin sockets ({'; '.join(reasons)}); "
        "set TMPDIR to a writable directory"
    )


# --- the worker process -------------------------------------------------------------------------


def run_worker(
    settings: GatewaySettings, index: int, port: int, admin_socket: str, drained: frozenset[str]
) -> None:
    """Entry point of a spawned worker: the normal gateway on the shared port."""
    configure_logging(settings.log_level, worker=index)
    # Ejections are shared, so worker 0 sees the whole fleet's changes: it alone sends webhooks,
    # rather than every worker sending the same event.
    update: dict[str, Any] = {"port": port, "workers": 1}
    if index != 0:
        update["webhooks"] = []
    worker_settings = settings.model_copy(update=update)
    try:
        run(lambda: _serve_worker(worker_settings, admin_socket, drained))
    except OSError as err:
        print(f"gateway: worker {index} cannot listen: {err.strerror or err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        # Normally the supervisor removes the directory; after a SIGKILL the last worker out does.
        socket_path = Path(admin_socket)
        socket_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            socket_path.parent.rmdir()


async def _serve_worker(settings: GatewaySettings, admin_socket: str, drained: frozenset[str]) -> None:
    stop = asyncio.Event()
    _stop_when_supervisor_exits(stop)
    await serve(settings, stop=stop, reuse_port=True, admin_socket=admin_socket, drained=drained)


def _stop_when_supervisor_exits(stop: asyncio.Event) -> None:
    # A supervisor killed with SIGKILL cannot stop its workers; they must not serve on unsupervised.
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    loop = asyncio.get_running_loop()

    def on_exit() -> None:
        loop.remove_reader(parent.sentinel)
        log.warning("supervisor (pid %s) is gone; shutting down", parent.pid)
        stop.set()

    loop.add_reader(parent.sentinel, on_exit)


# --- the supervisor -----------------------------------------------------------------------------


class WorkerSlot:
    """One worker position: a fixed index and admin socket, and the process filling it now."""

    def __init__(self, index: int, socket_path: Path, session: aiohttp.ClientSession) -> None:
        self.index = index
        self.socket_path = socket_path
        self.session = session
        self.process: BaseProcess | None = None
        self.started_at = 0.0
        self.quick_crashes = 0
        self.last_exitcode: int | None = None
        self.drained_at_start: frozenset[str] = frozenset()  # the drains the process was started with
        self.exited = asyncio.Event()  # set when the current process has exited and been reaped

    @property
    def pid(self) -> int | None:
        """PID of the current process, if any."""
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        """A process fills this slot and has not exited."""
        return self.process is not None and self.process.is_alive()


class Supervisor:
    """Starts, watches, replaces and stops the worker processes; the admin app's `Fleet`."""

    def __init__(
        self,
        settings: GatewaySettings,
        port: int,
        runtime_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.port = port
        self.admin_token: SecretStr | None = settings.admin_token
        self._runtime_dir = runtime_dir
        self._clock = clock
        self._context = multiprocessing.get_context("spawn")
        self._stack = AsyncExitStack()
        self._slots: list[WorkerSlot] = []
        self._drained: set[str] = set()
        self._replacing: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopping = False
        self.stop_requested = asyncio.Event()
        self.relay = SharedStateRelay(self.workers, clock=clock)
        self._relaying: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Supervisor:
        for index in range(self.settings.workers):
            path = self._runtime_dir / f"worker-{index}.sock"
            # No keep-alive: a pooled connection would outlive a replaced worker.
            connector = aiohttp.UnixConnector(path=str(path), force_close=True)
            session = await self._stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            self._slots.append(WorkerSlot(index, path, session))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_all()
        await self._stack.aclose()

    # The Fleet protocol of gateway.workers.fleet_admin.

    @property
    def stopping(self) -> bool:
        """True once shutdown has begun."""
        return self._stopping

    def workers(self) -> list[WorkerRef]:
        """Every worker slot, in index order."""
        return [WorkerRef(s.index, s.pid, s.alive, s.session) for s in self._slots]

    def remember(self, upstream: str, drained: bool) -> None:
        """Record a drain or enable so replacement workers get it too."""
        if drained:
            self._drained.add(upstream)
        else:
            self._drained.discard(upstream)

    def request_stop(self) -> None:
        """Begin shutdown (signal handler): no more replacements, readiness turns 503."""
        self._stopping = True
        self.stop_requested.set()

    # Lifecycle.

    async def start_all(self) -> None:
        """Start every worker and wait until each serves; raise WorkerStartError if one cannot."""
        for slot in self._slots:
            self._spawn(slot)
        for slot in self._slots:
            if not await self._wait_ready(slot, START_TIMEOUT_S) and not self._stopping:
                code = slot.last_exitcode if slot.process is None else slot.process.exitcode
                why = "no answer" if slot.alive else describe_exit(code)
                raise WorkerStartError(f"worker {slot.index} did not start ({why}); see its log above")
        self._started = True
        self._relaying = [
            asyncio.create_task(self.relay.follow(s.index), name=f"shared-state:{s.index}")
            for s in self._slots
        ]

    async def stop_all(self) -> None:
        """SIGTERM every worker, wait out their grace period, then kill stragglers."""
        self._stopping = True
        for task in [*self._replacing, *self._relaying]:
            task.cancel()
        await asyncio.gather(*self._replacing, *self._relaying, return_exceptions=True)
        for slot in self._slots:
            if slot.process is not None and slot.alive:
                slot.process.terminate()
        exits = [s.exited.wait() for s in self._slots if s.process is not None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_grace_s + KILL_MARGIN_S):
                await asyncio.gather(*exits)
        for slot in self._slots:
            if slot.process is not None and slot.alive:
                log.warning("worker %d did not stop within the grace period; killing it", slot.index)
                slot.process.kill()
            self._release(slot)

    def _spawn(self, slot: WorkerSlot) -> None:
        # A dead worker's socket file would stop the replacement from binding its path.
        slot.socket_path.unlink(missing_ok=True)
        slot.drained_at_start = frozenset(self._drained)
        process = self._context.Process(
            target=run_worker,
            args=(self.settings, slot.index, self.port, str(slot.socket_path), slot.drained_at_start),
            name=f"gateway-worker-{slot.index}",
        )
        process.start()
        slot.process = process
        slot.exited.clear()
        slot.started_at = self._clock()
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_exit, slot, process)
        log.debug("worker %d started: pid %s", slot.index, process.pid)

    def _release(self, slot: WorkerSlot) -> int | None:
        """Reap the slot's exited process and free its file descriptors; its exit code."""
        process = slot.process
        if process is None:
            return None
        asyncio.get_running_loop().remove_reader(process.sentinel)
        process.join(timeout=5)
        exitcode = slot.last_exitcode = process.exitcode
        if exitcode is not None:
            process.close()
        slot.process = None
        return exitcode

    def _on_exit(self, slot: WorkerSlot, process: BaseProcess) -> None:
        if slot.process is not process:
            return
        pid = process.pid
        exitcode = self._release(slot)
        slot.exited.set()
        if self._stopping or not self._started:
            return
        lived_s = self._clock() - slot.started_at
        slot.quick_crashes = slot.quick_crashes + 1 if lived_s < STABLE_S else 1
        delay = restart_delay_s(slot.quick_crashes)
        log.warning(
            "worker %d (pid %s) exited with %s after %.1f s; starting a replacement in %.2f s",
            slot.index,
            pid,
            describe_exit(exitcode),
            lived_s,
            delay,
        )
        task = asyncio.create_task(self._replace(slot, delay))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, slot: WorkerSlot, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if self._stopping:
            return
        self._spawn(slot)
        if await self._wait_ready(slot, START_TIMEOUT_S):
            await self._catch_up_drains(slot)
            await self.relay.catch_up(WorkerRef(slot.index, slot.pid, slot.alive, slot.session))
            log.info("worker %d replaced: pid %s serving on port %d", slot.index, slot.pid, self.port)

    async def _wait_ready(self, slot: WorkerSlot, timeout_s: float) -> bool:
        """Until the worker's admin socket answers (it listens on the port before that)."""
        deadline = self._clock() + timeout_s
        while not self._stopping and self._clock() < deadline:
            ref = WorkerRef(slot.index, None, slot.alive, slot.session)
            if not ref.alive:
                return False
            answer = await ask(ref, "GET", "/healthz", timeout_s=1.0)
            if answer.ok:
                return True
            await asyncio.sleep(READY_POLL_S)
        return False

    async def _catch_up_drains(self, slot: WorkerSlot) -> None:
        # Drains and enables made through the admin port while this worker was starting missed it.
        if self.admin_token is None:
            return
        now_drained = frozenset(self._drained)
        changes = [(n, True) for n in now_drained - slot.drained_at_start]
        changes += [(n, False) for n in slot.drained_at_start - now_drained]
        ref = WorkerRef(slot.index, slot.pid, slot.alive, slot.session)
        for name, drain in sorted(changes):
            path = mutation_path(name, drain)
            answer = await ask(ref, "POST", path, timeout_s=5.0, headers=bearer(self.admin_token))
            if not answer.ok:
                log.warning("worker %d: could not apply %s: %s", slot.index, path, answer)

    def pids(self) -> list[int]:
        """PIDs of the running workers."""
        return [s.pid for s in self._slots if s.pid is not None]


def _warn_if_oversubscribed(workers: int) -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > cpus:
        log.warning("%d workers on %d CPUs: workers beyond one per CPU only add contention", workers, cpus)


async def supervise(settings: GatewaySettings) -> None:
    """Run `settings.workers` gateway processes on one port until SIGTERM/SIGINT."""
    _warn_if_oversubscribed(settings.workers)
    runtime_dir = make_runtime_dir()
    try:
        with reserve_port(settings.host, settings.port) as reserved:
            port = int(reserved.getsockname()[1])
            async with Supervisor(settings, port, runtime_dir) as supervisor:
                await _serve_admin_and_wait(supervisor)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


async def _serve_admin_and_wait(supervisor: Supervisor) -> None:
    s = supervisor.settings
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.request_stop)
    runner = web.AppRunner(create_supervisor_admin_app(supervisor), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        # The admin port first: if it is taken, fail before any worker starts.
        await web.TCPSite(runner, s.admin_host, s.admin_port).start()
        await supervisor.start_all()
        if not supervisor.stopping:
            admin_port = int(runner.addresses[0][1])
            log.info(
                "gateway %s serving on http://%s:%d (admin http://%s:%d), %d upstream(s): %s; "
                "%d workers (pids %s)",
                __version__,
                s.host,
                supervisor.port,
                s.admin_host,
                admin_port,
                len(s.upstreams),
                ", ".join(f"{u.name}={u.url}" for u in s.upstreams),
                s.workers,
                ", ".join(str(p) for p in supervisor.pids()),
            )
        await supervisor.stop_requested.wait()
        log.info(
            "shutting down: stopping %d workers, %.0f s for in-flight requests",
            s.workers,
            s.shutdown_grace_s,
        )
        # Readiness answers 503 while the workers drain, as a single process does.
        await supervisor.stop_all()
    finally:
        await runner.cleanup()
