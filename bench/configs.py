"""Config files for nginx (upstream and proxy) and HAProxy, generated into the run's temp dir."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# The fixed body nginx upstreams return (a minimal chat completion).
UPSTREAM_BODY = (
    '{"id":"chatcmpl-bench","object":"chat.completion","model":"bench",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}'
)

_NGINX_COMMON = """\
worker_processes 1;
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
{servers}
}}
"""

_UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location = /v1/chat/completions {{ return 200 '{body}'; }}
        location = /small {{ return 200 '{body}'; }}
        location = /health {{ return 200 '{{"status":"ok"}}'; }}
        location / {{ return 404; }}
    }}
"""

_PROXY_SERVER = """\
    upstream backends {{
{servers}
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # POST is not idempotent, so nginx retries it only with non_idempotent.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 2;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
            # Stream SSE events as they arrive.
            proxy_buffering off;
        }}
    }}
"""

_HAPROXY = """\
global
    nbthread 1
    maxconn 5000

defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
    option http-keep-alive
    http-reuse always
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response response-timeout 502 503
    option http-buffer-request
{no_delay}
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    balance roundrobin
    option httpchk GET /health
    default-server check inter 1s fall 3 rise 2
{servers}
"""


def _host_port(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def nginx_upstream(dir_: Path, name: str, ports: Sequence[int]) -> Path:
    """One nginx worker serving the fixed JSON body on each of `ports`."""
    servers = "".join(_UPSTREAM_SERVER.format(port=p, body=UPSTREAM_BODY) for p in ports)
    path = dir_ / f"{name}.conf"
    path.write_text(_NGINX_COMMON.format(dir=dir_, name=name, servers=servers))
    return path


def nginx_proxy(dir_: Path, name: str, port: int, upstreams: Sequence[str]) -> Path:
    """nginx as a keep-alive reverse proxy retrying the next upstream on error/timeout/502/503."""
    lines = "\n".join(f"        server {_host_port(u)} max_fails=1 fail_timeout=10s;" for u in upstreams)
    servers = _PROXY_SERVER.format(port=port, servers=lines)
    path = dir_ / f"{name}.conf"
    path.write_text(_NGINX_COMMON.format(dir=dir_, name=name, servers=servers))
    return path


def haproxy(dir_: Path, name: str, port: int, upstreams: Sequence[str], *, no_delay: bool) -> Path:
    """HAProxy with L7 retries (retry-on ... 502 503), redispatch and 1 s health checks."""
    servers = "\n".join(f"    server s{i} {_host_port(u)}" for i, u in enumerate(upstreams))
    no_delay_line = "    option http-no-delay\n" if no_delay else ""
    path = dir_ / f"{name}.cfg"
    path.write_text(_HAPROXY.format(port=port, servers=servers, no_delay=no_delay_line))
    return path
