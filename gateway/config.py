"""Gateway settings: one frozen value object built once at the edge (CLI) and passed in.

Sources, highest precedence first: CLI flags (init kwargs), `GATEWAY_*` environment variables
(nested with `__`, e.g. `GATEWAY_RETRY__MAX_ATTEMPTS=2`), an optional YAML file, defaults.
Validation errors name the field; `describe_validation_error` turns them into one line.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from yarl import URL

from gateway.http.egress import DIRECT, parse_proxy_url, select_proxy

MIB = 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_NAMED_URL_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,62})=(.+)$")
_ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Strategy(StrEnum):
    """How an upstream is chosen within the best priority tier."""

    LATENCY = "latency"
    ROUND_ROBIN = "round_robin"
    LEAST_INFLIGHT = "least_inflight"
    PRIORITY = "priority"
    ENGINE = "engine"  # affinity bounded by the engines' own load (gateway/policy/engine.py)


class LoadReport(StrEnum):
    """Whether the gateway asks an upstream for a per-response load report."""

    NONE = "none"
    ORCA = "orca"  # vLLM's endpoint-load-metrics header on non-streaming responses


class AffinityKey(StrEnum):
    """What keeps requests on the same engine."""

    PREFIX = "prefix"
    SESSION = "session"
    NONE = "none"


class Continuation(StrEnum):
    """Whether an upstream can finish an answer another upstream started."""

    NONE = "none"
    PREFILL = "prefill"


class WebhookEvent(StrEnum):
    """A fleet state change a webhook can subscribe to (gateway/policy/webhooks.py)."""

    EJECTED = "ejected"
    RECOVERED = "recovered"
    DRAINED = "drained"
    DEGRADED = "degraded"
    FAILOVER = "failover"


WEBHOOK_SECRET_PREFIX = "whsec_"


def load_webhook_secret(text: str) -> bytes:
    """The key of a `whsec_<base64>` secret (Standard Webhooks); ValueError saying what is wrong."""
    if not text.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError("the secret must look like whsec_<base64> (Standard Webhooks format)")
    encoded = text[len(WEBHOOK_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part of the secret after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("the secret's key must be at least 16 bytes (24 base64 characters)")
    return key


class ConfigError(Exception):
    """Configuration that cannot be loaded; the message is one line for the operator."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoadMetricNames(_Frozen):
    """Prometheus names of an engine's load; the first one present is used."""

    waiting: tuple[str, ...] = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
    running: tuple[str, ...] = ("vllm:num_requests_running", "sglang:num_running_reqs")
    kv: tuple[str, ...] = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")


class LoadMetricsSettings(_Frozen):
    """Polling an engine's Prometheus text for its load."""

    path: str = "/metrics"
    interval_s: float = Field(1.0, gt=0)
    # A report older than this is ignored (also for ORCA headers).
    stale_s: float = Field(3.0, gt=0)
    names: LoadMetricNames = LoadMetricNames()


class UpstreamSettings(_Frozen):
    """One upstream inference endpoint."""

    name: str = ""
    url: str
    priority: int = Field(0, ge=0, description="0 is the primary tier")
    weight: float = Field(1.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    health_path: str | None = "/health"
    max_inflight: int | None = Field(None, ge=1)
    # `prefill`: accepts an assistant message to continue (vLLM's and SGLang's
    # continue_final_message), so a stream cut elsewhere can be finished here.
    continuation: Continuation = Continuation.NONE
    # Context window in tokens: a request another upstream refused as too long is retried on an
    # upstream with a larger one (or on the next tier).
    max_context: int | None = Field(None, ge=1)
    # Forward proxy: unset follows HTTPS_PROXY/HTTP_PROXY/NO_PROXY, "none" connects directly,
    # http://[user:password@]host:port always uses that proxy (see gateway/http/egress.py).
    proxy: str | None = None
    # PEM CA bundle that verifies this https upstream, instead of the system's CAs.
    tls_ca_file: str | None = None
    # `orca`: ask for vLLM's endpoint-load-metrics header on non-streaming responses and read it.
    load_report: LoadReport = LoadReport.NONE
    # Poll the engine's /metrics for its queue and KV usage.
    load_metrics: LoadMetricsSettings | None = None
    # Models served: a list of names, or a map from the name clients ask for to the name this
    # upstream wants (an Azure deployment, say). Unset: every model.
    models: dict[str, str] | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_map(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [m for m in value.split(",") if m.strip()]
        if isinstance(value, list):
            if not all(isinstance(m, str) for m in value):
                raise ValueError("give model names as strings, or a map of client name: upstream name")
            value = {m.strip(): m.strip() for m in value}
        if isinstance(value, dict):
            for client, upstream in value.items():
                if not isinstance(client, str) or not client or not isinstance(upstream, str) or not upstream:
                    raise ValueError(f"model names must be non-empty strings, got {client!r}: {upstream!r}")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{value!r} is not a URL ({exc}); use http://host:port[/prefix]") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{value!r} is not an http(s) URL; use http://host:port[/prefix]")
        if url.query_string or url.fragment:
            raise ValueError(f"{value!r} has a query or fragment; give only scheme, host and path")
        return str(url).rstrip("/")

    @field_validator("health_path")
    @classmethod
    def _check_health_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/' (or be null to disable active checks)")
        return value

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() == DIRECT:
            return None if value is None else DIRECT
        value = expand_env_refs(value.strip(), os.environ)  # credentials may stay in the environment
        parse_proxy_url(value)
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _check_ca_file(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ssl.create_default_context(cafile=value)
            except (OSError, ssl.SSLError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ValueError(f"cannot load CA file {value!r}: {reason}") from None
        return value

    @field_validator("headers")
    @classmethod
    def _expand_env(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, raw in value.items():
            check_header_name(name)
            expanded = expand_env_refs(raw, os.environ)
            # A Secret with a trailing newline would otherwise split the request's headers.
            check_header_value(name, expanded)
            out[name] = expanded
        return out

    @model_validator(mode="after")
    def _default_name(self) -> UpstreamSettings:
        if self.tls_ca_file is not None and not self.url.startswith("https:"):
            raise ValueError(f"tls_ca_file is set but {self.url!r} is not an https URL")
        if not self.name:
            url = URL(self.url)
            object.__setattr__(self, "name", f"{url.host}:{url.port}")
        elif not _NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r} must be 1-63 letters, digits, '_', '.', ':' or '-'")
        return self


def check_header_name(name: str) -> str:
    """Raise ValueError unless `name` is an HTTP field name (an RFC 9110 token)."""
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"header name {name!r} is not a valid HTTP field name (letters, digits, -, _ ...)")
    return name


def check_header_value(name: str, value: str) -> str:
    """Raise ValueError if `value` holds a control character (CR, LF, NUL ...) or is not Latin-1."""
    bad = next((c for c in value if (c < " " and c != "\t") or c == "\x7f"), None)
    if bad is not None:
        raise ValueError(
            f"header {name!r} has a control character {bad!r} in its value "
            "(a trailing newline in a secret?); remove it"
        )
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"header {name!r} has characters outside Latin-1 in its value") from None
    return value


def expand_env_refs(value: str, env: Mapping[str, str]) -> str:
    """Replace `${VAR}` with the variable's value so secrets stay in the environment."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ValueError(f"environment variable {name} is not set (referenced as ${{{name}}})")
        return env[name]

    return _ENV_REF_RE.sub(sub, value)


def parse_upstream_spec(spec: str) -> dict[str, Any]:
    """Parse `[NAME=]URL` as given to `--upstream` or in a comma-separated list."""
    spec = spec.strip()
    match = _NAMED_URL_RE.match(spec)
    if match and "://" in match.group(2):
        return {"name": match.group(1), "url": match.group(2)}
    return {"url": spec}


class TimeoutSettings(_Frozen):
    """Timeouts of one proxied request. No total timeout: streams may run as long as they flow."""

    # A refused or blackholed upstream should fail over fast; a healthy one connects in ms.
    connect_s: float = Field(2.0, gt=0)
    # Time to response headers per attempt. A non-streaming completion sends headers only after
    # the whole generation, so this must cover a long generation on a busy server.
    attempt_s: float = Field(120.0, gt=0)
    # Longest silence between two response chunks once the response has started.
    idle_s: float = Field(60.0, gt=0)
    # Streams: from sending the request to the first content event, per attempt. Past it the
    # attempt is abandoned and retried, since the client has seen nothing yet.
    first_token_s: float = Field(60.0, gt=0)
    # Optional bound on everything before the response starts (all attempts and backoff).
    deadline_s: float | None = Field(None, gt=0)
    # Clients may lower the deadline per request with this header (seconds).
    deadline_header: str = "X-Gateway-Timeout"

    @field_validator("deadline_header")
    @classmethod
    def _check_deadline_header(cls, value: str) -> str:
        return check_header_name(value)


class StreamCommit(StrEnum):
    """When a streamed (SSE) response is committed to the client, ending failover before it."""

    FIRST_EVENT = "first_event"  # at the first event that carries output
    HEADERS = "headers"  # at the upstream's response headers


class StreamSettings(_Frozen):
    """How Server-Sent Event responses are relayed."""

    commit: StreamCommit = StreamCommit.FIRST_EVENT
    # Most bytes held before the first content event; past it the stream is committed anyway.
    max_held_bytes: int = Field(65536, ge=1024)


class SaturationSettings(_Frozen):
    """When an engine is too busy to be sent more (engine strategy)."""

    queue: float = Field(5.0, ge=0)  # waiting requests it reports
    kv: float = Field(0.9, gt=0, le=1)  # KV cache usage it reports
    # With every engine saturated, a request waits this long for one to calm down, then 429.
    max_wait_s: float = Field(2.0, ge=0)
    # Most requests waiting so; more get 429 at once.
    max_waiting: int = Field(1024, ge=0)
    # Waiting requests go first by this header (higher first), then in arrival order.
    priority_header: str = "X-Gateway-Priority"

    @field_validator("priority_header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        return check_header_name(value)


class AffinitySettings(_Frozen):
    """Keeping prompts near their cached prefixes (engine strategy)."""

    key: AffinityKey = AffinityKey.PREFIX
    header: str = "X-Session-ID"
    prefix_chars: int = Field(4096, ge=1)
    slack: float = Field(0.25, ge=0)

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        return check_header_name(value)


class UsageSettings(_Frozen):
    """Token usage of streams."""

    # Ask streaming chat requests for usage (stream_options.include_usage) when the client did
    # not, so their tokens are counted; the extra usage chunk is not passed to such a client.
    include_usage_injection: bool = False


class JobsFrontDoorSettings(_Frozen):
    """The async front door: `Prefer: respond-async` requests become jobs of this jobs API."""

    url: str | None = None
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{value!r} is not an http(s) URL of the jobs API")
        return str(url).rstrip("/")


class TracingSettings(_Frozen):
    """Opt-in OpenTelemetry traces, sent over OTLP/HTTP."""

    otlp_endpoint: str | None = None  # e.g. http://127.0.0.1:4318/v1/traces; unset: off
    sample_ratio: float = Field(1.0, ge=0, le=1)
    service_name: str = Field("failover-gateway", min_length=1)
    export_timeout_s: float = Field(10.0, gt=0)

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{value!r} is not an http(s) URL of an OTLP/HTTP traces endpoint")
        return value


class RetrySettings(_Frozen):
    """When and how often a failed attempt is tried again on another upstream."""

    max_attempts: int = Field(3, ge=1, le=10)
    on_statuses: Annotated[frozenset[int], NoDecode] = frozenset({429, 500, 502, 503, 504})
    # Retries may be at most this share of requests in flight (Envoy's retry budget) ...
    budget_ratio: float = Field(0.2, ge=0, le=1)
    # ... but this many concurrent retries are always allowed.
    budget_min_concurrency: int = Field(3, ge=0)
    # A retry over budget waits this long for a slot before the request gives up (see retry_gate.py).
    budget_wait_s: float = Field(1.0, ge=0)
    # A 429 whose Retry-After is at most this is waited out and retried in the same tier.
    max_retry_after_wait_s: float = Field(2.0, ge=0)
    # A body up to this size is buffered so it can be replayed; larger ones stream once.
    replay_buffer_bytes: int = Field(16 * MIB, ge=0)
    # Cap on all buffered bodies together, so a burst of large prompts cannot exhaust memory.
    total_replay_buffer_bytes: int = Field(256 * MIB, ge=0)

    @field_validator("on_statuses", mode="before")
    @classmethod
    def _split_statuses(cls, value: Any) -> Any:
        # GATEWAY_RETRY__ON_STATUSES=429,503 as well as a JSON list or a YAML list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return orjson.loads(text)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"not valid JSON: {exc}") from None
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("on_statuses")
    @classmethod
    def _check_statuses(cls, value: frozenset[int]) -> frozenset[int]:
        bad = sorted(s for s in value if not 400 <= s <= 599)
        if bad:
            raise ValueError(f"only 4xx/5xx statuses can be retried, got {bad}")
        return value


def _split_list(value: Any) -> Any:
    """A comma-separated string (as an environment variable gives it) or a JSON list, as a list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def parse_status_ranges(items: Any) -> frozenset[int]:
    """HTTP statuses from ints and `"LOW-HIGH"` ranges (inclusive); ValueError naming a bad item."""
    if isinstance(items, int | str):
        items = [items]
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{item!r} is not an HTTP status")
        low: int | None = None
        high: int | None = None
        if isinstance(item, int):
            low = high = item
        elif isinstance(item, str):
            first, sep, last = item.strip().partition("-")
            if first.strip().isdigit() and (not sep or last.strip().isdigit()):
                low = int(first)
                high = int(last) if sep else low
        if low is None or high is None:
            raise ValueError(f"{item!r} is not a status or a range such as 200-299")
        if not (100 <= low <= high <= 599):
            raise ValueError(f"{item!r} must be statuses within 100-599, low to high")
        out.update(range(low, high + 1))
    if not out:
        raise ValueError("give at least one status, e.g. 200-299")
    return frozenset(out)


class HealthSettings(_Frozen):
    """Active health checks: a cheap GET of each upstream's health path."""

    interval_s: float = Field(10.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    jitter_ratio: float = Field(0.1, ge=0, le=1)
    unhealthy_threshold: int = Field(3, ge=1)
    healthy_threshold: int = Field(2, ge=1)
    # Statuses that pass a check: ints and "LOW-HIGH" ranges (GATEWAY_HEALTH__EXPECTED_STATUSES=200-299,401).
    expected_statuses: Annotated[frozenset[int], NoDecode] = frozenset(range(200, 300))

    @field_validator("expected_statuses", mode="before")
    @classmethod
    def _parse_statuses(cls, value: Any) -> Any:
        return parse_status_ranges(_split_list(value))


class OutlierSettings(_Frozen):
    """Passive ejection on consecutive failures, and cooldown after 429 (Envoy's scheme)."""

    consecutive_failures: int = Field(3, ge=1)
    base_ejection_s: float = Field(30.0, gt=0)
    max_ejection_s: float = Field(300.0, gt=0)
    rate_limit_cooldown_s: float = Field(5.0, ge=0)
    max_rate_limit_cooldown_s: float = Field(60.0, ge=0)
    # Off: only a successful request (or the ejection running out) ends an ejection, since an
    # inference server often answers /health while its inference fails. On: a passing check too.
    uneject_on_health_check: bool = False


class CallerSettings(_Frozen):
    """One caller of a shared gateway: its key and what it may spend."""

    name: str = Field(min_length=1)
    # The key itself (`${VAR}` is expanded from the environment), or its SHA-256 in hex, so the
    # configuration need not hold the secret.
    key: SecretStr | None = None
    key_sha256: str | None = None
    # Client-facing model names (or aliases) it may ask for; unset: every model.
    models: list[str] | None = None
    max_inflight: int | None = Field(None, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)

    @field_validator("key", mode="before")
    @classmethod
    def _expand_key(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = expand_env_refs(value, os.environ)
            if not value:
                raise ValueError("the key is empty (an unset ${VAR}?)")
        return value

    @field_validator("key_sha256")
    @classmethod
    def _check_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hex digits (the SHA-256 of the key)")
        return None if value is None else value.lower()

    @model_validator(mode="after")
    def _one_key(self) -> CallerSettings:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"caller {self.name!r}: give exactly one of key or key_sha256")
        return self


class WebhookSettings(_Frozen):
    """One receiver of fleet state changes."""

    url: str
    events: frozenset[WebhookEvent] = frozenset(WebhookEvent)
    # whsec_<base64>; `${VAR}` is expanded from the environment so the secret stays out of files.
    secret: SecretStr

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except (ValueError, TypeError):
            raise ValueError(f"{value[:200]!r} is not a URL; use http(s)://host[:port]/path") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{value[:200]!r} is not an http(s) URL")
        if url.user is not None or url.password is not None:
            raise ValueError("must not carry credentials (user:password@); deliveries are signed instead")
        return value

    @field_validator("events")
    @classmethod
    def _some_events(cls, value: frozenset[WebhookEvent]) -> frozenset[WebhookEvent]:
        if not value:
            raise ValueError(f"give at least one of {', '.join(e.value for e in WebhookEvent)}")
        return value

    @field_validator("secret", mode="before")
    @classmethod
    def _expand_secret(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            value = expand_env_refs(value.strip(), os.environ)
            load_webhook_secret(value)
        return value


def _parse_upstreams(value: Any) -> Any:
    """Accept a JSON list, a comma-separated `[NAME=]URL` list, or a list of either."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        else:
            value = [part for part in text.split(",") if part.strip()]
    if isinstance(value, list):
        return [parse_upstream_spec(v) if isinstance(v, str) else v for v in value]
    return value


class GatewaySettings(BaseSettings):
    """Everything the gateway needs to run; frozen once built."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    upstreams: Annotated[list[UpstreamSettings], NoDecode] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(9901, ge=0, le=65535)
    strategy: Strategy = Strategy.LATENCY
    timeouts: TimeoutSettings = TimeoutSettings()
    stream: StreamSettings = StreamSettings()
    saturation: SaturationSettings = SaturationSettings()
    usage: UsageSettings = UsageSettings()
    jobs: JobsFrontDoorSettings = JobsFrontDoorSettings()
    tracing: TracingSettings = TracingSettings()
    affinity: AffinitySettings = AffinitySettings()
    retry: RetrySettings = RetrySettings()
    health: HealthSettings = HealthSettings()
    outlier: OutlierSettings = OutlierSettings()
    # A new or recovered upstream's weight ramps up over this long (0: off), as Envoy's slow start;
    # aggression 1 is linear, higher climbs faster early (policy/slow_start.py).
    slow_start_s: float = Field(30.0, ge=0)
    slow_start_aggression: float = Field(1.0, gt=0)
    # Peak-EWMA decay window and the estimate a new or recovered upstream starts from.
    ewma_decay_s: float = Field(10.0, gt=0)
    ewma_default_s: float = Field(0.05, gt=0)
    admin_token: SecretStr | None = None
    access_log: bool = False
    log_level: str = "info"
    # SIGTERM: stop accepting, then give in-flight requests this long to finish.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Idle keep-alive connections to upstreams are closed after this long; below the common 5 s
    # server keep-alive (uvicorn, vLLM), so we rarely reuse a connection the server is closing.
    upstream_keepalive_s: float = Field(4.0, ge=0)
    # Largest request line plus header fields the gateway accepts; larger requests get 431.
    max_header_bytes: int = Field(32768, ge=1024)
    # Largest status line plus header fields accepted from an upstream; larger is a bad response.
    max_upstream_header_bytes: int = Field(65536, ge=1024)
    # A client must send its request headers within this long of their first byte (408) ...
    client_header_timeout_s: float = Field(60.0, gt=0)
    # ... and may not go silent longer than this while its body is read (408).
    client_body_timeout_s: float = Field(60.0, gt=0)
    # Client connections served at once; by default derived from the open-files limit.
    max_connections: int | None = Field(None, ge=1)
    events_kept: int = Field(200, ge=1)
    # Names clients may use for a model: {alias: model}, resolved before routing.
    model_aliases: dict[str, str] = Field(default_factory=dict)
    # Models to try, in order, when no upstream of the requested one can serve it.
    model_fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    # Callers of a shared gateway; when set, every proxied request must carry a caller's key.
    callers: Annotated[list[CallerSettings], NoDecode] = Field(default_factory=list)
    # Receivers of fleet state changes (gateway/policy/webhooks.py); JSON in GATEWAY_WEBHOOKS.
    webhooks: Annotated[list[WebhookSettings], NoDecode] = Field(default_factory=list)
    # Proxy processes sharing the port (SO_REUSEPORT); above 1 the `gateway` process supervises
    # them. Checks, EWMA and the retry budget are then per worker; ejections are shared (README).
    workers: int = Field(1, ge=1)

    @field_validator("upstreams", mode="before")
    @classmethod
    def _split_upstreams(cls, value: Any) -> Any:
        return _parse_upstreams(value)

    @field_validator("callers", "webhooks", mode="before")
    @classmethod
    def _callers_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _no_bool_workers(cls, value: Any) -> Any:
        # YAML reads `workers: yes` as True, which pydantic would quietly take as 1.
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number of worker processes; give an integer >= 1")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"{value!r} is not one of debug, info, warning, error")
        return value.lower()

    @model_validator(mode="after")
    def _check_whole(self) -> GatewaySettings:
        if not self.upstreams:
            raise ValueError(
                "no upstreams configured; pass --upstream URL (repeatable) or set GATEWAY_UPSTREAMS"
            )
        seen: set[str] = set()
        for up in self.upstreams:
            if up.name in seen:
                raise ValueError(f"duplicate upstream name {up.name!r}; give each a unique name (NAME=URL)")
            seen.add(up.name)
            # A bad HTTPS_PROXY/HTTP_PROXY is reported now, naming the variable, not at first use.
            try:
                select_proxy(up.url, up.proxy, os.environ)
            except ValueError as exc:
                raise ValueError(f"upstream {up.name!r}: {exc}") from None
        if self.outlier.max_ejection_s < self.outlier.base_ejection_s:
            raise ValueError("outlier.max_ejection_s must be >= outlier.base_ejection_s")
        self._check_models()
        self._check_callers()
        return self

    def _check_models(self) -> None:
        declared = [up for up in self.upstreams if up.models is not None]
        if not declared and (self.model_aliases or self.model_fallbacks):
            raise ValueError("model_aliases and model_fallbacks need upstreams that declare their models")
        served = {m for up in declared for m in up.models or {}}
        everything = len(declared) < len(self.upstreams)  # some upstream serves every model
        for alias, target in self.model_aliases.items():
            if alias in served:
                raise ValueError(f"model_aliases.{alias}: {alias!r} is already a model an upstream serves")
            if target in self.model_aliases:
                raise ValueError(f"model_aliases.{alias}: {target!r} is itself an alias; name the model")
            if target not in served and not everything:
                raise ValueError(f"model_aliases.{alias}: no upstream serves {target!r}")
        for model, fallbacks in self.model_fallbacks.items():
            for fallback in fallbacks:
                if fallback not in served and not everything:
                    raise ValueError(f"model_fallbacks.{model}: no upstream serves {fallback!r}")

    def _check_callers(self) -> None:
        names: set[str] = set()
        for caller in self.callers:
            if caller.name in names:
                raise ValueError(f"callers: duplicate caller name {caller.name!r}")
            names.add(caller.name)


class _YamlSource(PydanticBaseSettingsSource):
    """Settings from a YAML mapping, below environment variables in precedence."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def read_yaml_config(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, or raise ConfigError with a one-line reason."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"config file {path}: not valid YAML: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of settings")
    return data


def load_settings(
    overrides: dict[str, Any] | None = None, config_file: Path | None = None
) -> GatewaySettings:
    """Build settings from overrides (CLI), environment and YAML; raise ConfigError if invalid."""
    yaml_data = read_yaml_config(config_file) if config_file else {}

    class _Settings(GatewaySettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _YamlSource(settings_cls, yaml_data))

    try:
        built = _Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except SettingsError as exc:
        # An environment variable pydantic-settings could not decode (e.g. malformed JSON).
        reason = " ".join(str(exc.__cause__ or exc).split())
        raise ConfigError(f"invalid configuration: {exc}: {reason}") from None
    # Return the plain class so the object compares and pickles like any other settings.
    return GatewaySettings.model_construct(**dict(built))


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field (as its env variable too) and what is wrong."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) if loc else "settings"
        message = str(err["msg"]).removeprefix("Value error, ")
        hint = ""
        if err["type"] == "extra_forbidden":
            message = "unknown setting; check its spelling against `gateway --help` and the README"
        elif loc and not loc[0].isdigit() and loc[0] != "upstreams":
            env = "GATEWAY_" + "__".join(p.upper() for p in loc if not p.isdigit())
            hint = f" (set via {env})"
        parts.append(f"{field}: {message}{hint}" if loc else message)
    return "invalid configuration: " + "; ".join(parts)
