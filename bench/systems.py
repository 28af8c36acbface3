"""Starting the upstreams and the systems under test on 127.0.0.1, each on free ports.

Upstreams run on the load CPU; proxies on the proxy CPU. `direct` is no process at all: the client
talks to the first upstream.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import configs
from bench.procs import Pinning, Procs, Started, rss_mib, wait_http_ok

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

DIRECT = "direct"
GATEWAY = "gateway"
PLAIN = "plain-aiohttp"
NGINX = "nginx"
HAPROXY = "haproxy"
HAPROXY_DELAY = "haproxy (no http-no-delay)"  # only in the SSE workload
ALL_SYSTEMS = (DIRECT, GATEWAY, PLAIN, NGINX, HAPROXY)
PROXIES = (GATEWAY, PLAIN, NGINX, HAPROXY)

NOTES = {
    DIRECT: "client straight to the first upstream",
    GATEWAY: "gateway CLI, defaults except --health-interval 1",
    PLAIN: "bench/plain_proxy.py: aiohttp + uvloop, keep-alive, limit=0, one retry on connect error/5xx",
    NGINX: "worker_processes 1, keepalive 256, proxy_next_upstream error timeout http_502 http_503 "
    "non_idempotent, max_fails=1 fail_timeout=10s, proxy_buffering off",
    HAPROXY: "nbthread 1, http-reuse always, retries 2 + redispatch, retry-on conn-failure empty-response "
    "response-timeout 502 503, httpchk every 1 s, option http-no-delay",
    HAPROXY_DELAY: "as haproxy but without option http-no-delay (HAProxy's default batching)",
}


@dataclass(frozen=True)
class System:
    """A system under test: where clients send requests and which process to measure."""

    name: str
    url: str
    process: Started | None  # None for direct
    idle_rss_mib: float | None = None  # VmRSS (with children) once it answered, before any load


def available(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split requested systems into those whose binaries exist and notes about the missing ones."""
    keep: list[str] = []
    missing: list[str] = []
    for name in names:
        binary = {NGINX: "nginx", HAPROXY: "haproxy", HAPROXY_DELAY: "haproxy"}.get(name)
        if binary and shutil.which(binary) is None:
            missing.append(f"{name}: `{binary}` not installed, skipped")
        else:
            keep.append(name)
    return keep, missing


def _clean_env() -> dict[str, str]:
    """The environment without GATEWAY_* settings, so only our flags configure the gateway."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


@dataclass
class Launcher:
    """Starts upstreams and systems through `procs`, with the run's pinning and temp dir."""

    procs: Procs
    pinning: Pinning
    tmp: Path
    idle_rss: list[dict[str, Any]] = field(default_factory=list)  # one row per proxy started

    def _nginx_argv(self, pin: list[str], conf: Path) -> list[str]:
        """nginx with `conf`, its prefix and error log in the run's temp dir, under `pin` (taskset)."""
        return [*pin, "nginx", "-p", str(self.tmp), "-e", str(self.tmp / "nginx-e.log"), "-c", str(conf)]

    def nginx_upstreams(self, tag: str, count: int = 2) -> tuple[Started, list[str]]:
        """One nginx worker on the load CPU serving the fixed JSON body on `count` ports."""
        ports = [self.procs.free_port() for _ in range(count)]
        conf = configs.nginx_upstream(self.tmp, f"upstream-nginx-{tag}", ports)
        started = self.procs.start(f"upstream-nginx-{tag}", self._nginx_argv(self.pinning.load(), conf))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:
            wait_http_ok(url + "/health", started)
        return started, urls

    def mock(self, tag: str, extra: Sequence[str] = ()) -> tuple[Started, str]:
        """One mock-inference upstream on the load CPU."""
        port = self.procs.free_port()
        argv = [
            *self.pinning.load(),
            str(VENV_BIN / "mock-inference"),
            "--port",
            str(port),
            "--name",
            tag,
            *extra,
        ]
        started = self.procs.start(f"mock-{tag}", argv)
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(url + "/health", started)
        return started, url

    def system(self, name: str, upstreams: Sequence[str], tag: str) -> System:
        """Start system `name` in front of `upstreams` and wait until it forwards requests."""
        if name == DIRECT:
            return System(name, upstreams[0], None)
        port = self.procs.free_port()
        label = f"{name.split()[0]}-{tag}" if name != HAPROXY_DELAY else f"haproxy-delay-{tag}"
        if name == GATEWAY:
            started = self._gateway(label, port, upstreams)
        elif name == PLAIN:
            argv = [*self.pinning.proxy(), sys.executable, "-m", "bench.plain_proxy", "--port", str(port)]
            argv += [arg for u in upstreams for arg in ("--upstream", u)]
            started = self.procs.start(label, argv)
        elif name == NGINX:
            conf = configs.nginx_proxy(self.tmp, label, port, upstreams)
            started = self.procs.start(label, self._nginx_argv(self.pinning.proxy(), conf))
        elif name in (HAPROXY, HAPROXY_DELAY):
            cfg = configs.haproxy(self.tmp, label, port, upstreams, no_delay=name == HAPROXY)
            started = self.procs.start(label, [*self.pinning.proxy(), "haproxy", "-db", "-f", str(cfg)])
        else:
            raise ValueError(f"unknown system {name!r}")
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(url + "/health", started)
        # Read here, between the readiness probe and the first load: a /proc read, no extra wait.
        idle = rss_mib(started.pid)
        self.idle_rss.append({"system": name, "tag": tag, "idle_rss_mib": idle})
        return System(name, url, started, idle)

    def gateway_with_config(self, label: str, config: Path) -> System:
        """The gateway CLI with a YAML config file (upstreams in it), as `system` starts it otherwise."""
        port = self.procs.free_port()
        started = self._gateway(label, port, [], config)
        return System(label, f"http://127.0.0.1:{port}", started)

    def _gateway(
        self, label: str, port: int, upstreams: Sequence[str], config: Path | None = None
    ) -> Started:
        admin_port = self.procs.free_port()
        argv = [*self.pinning.proxy(), str(VENV_BIN / "gateway"), "--port", str(port)]
        argv += ["--admin-port", str(admin_port), "--health-interval", "1"]
        argv += [arg for i, u in enumerate(upstreams) for arg in ("--upstream", f"u{i}={u}")]
        if config is not None:
            argv += ["--config", str(config)]
        started = self.procs.start(label, argv, env=_clean_env())
        wait_http_ok(f"http://127.0.0.1:{admin_port}/readyz", started)
        return started

    def stop_system(self, system: System) -> None:
        if system.process is not None:
            self.procs.stop(system.process)
