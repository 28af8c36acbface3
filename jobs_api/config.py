"""Jobs API settings: one frozen value object built once at the edge (CLI) and passed in."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobs_api.models import MAX_JSON_DEPTH
from jobs_api.webhooks import load_secret, parse_allowed_host


class ApiKey(BaseModel):
    """What an API key grants: the tenant it acts for and its roles."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str = Field(min_length=1)
    roles: tuple[str, ...] = ("user",)


class JobsSettings(BaseSettings):
    """Everything the jobs API needs; env prefix JOBS_ (e.g. JOBS_CONCURRENCY=32)."""

    model_config = SettingsConfigDict(
        env_prefix="JOBS_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    gateway_url: str = "http://127.0.0.1:8080"
    store: str = "sqlite:///./jobs.db"
    # Start of every Redis key (redis:// stores), so several deployments can share one Redis.
    redis_prefix: str = Field("jobs:", min_length=1, max_length=64)
    # Connections to Redis per process (one is held by the event listener); a store call waits
    # up to redis_pool_timeout_s for a free one instead of failing, then answers 503.
    redis_max_connections: int = Field(100, ge=2, le=100_000)
    redis_pool_timeout_s: float = Field(5.0, gt=0)
    concurrency: int = Field(16, ge=1, le=1024)
    # Import paths of modules that register custom job types (comma-separated in the env).
    # NoDecode: the env value is "a.b,c.d" (or a JSON list), not JSON that pydantic-settings decodes.
    handlers: Annotated[tuple[str, ...], NoDecode] = ()
    # A client must send a complete request head within this long of connecting (or of the first
    # byte of a later request on a keep-alive connection), else 408 and the connection closes ...
    client_header_timeout_s: float = Field(60.0, gt=0)
    # ... and may not go silent for longer than this while its body is read (408).
    client_body_timeout_s: float = Field(60.0, gt=0)
    # Client connections served at once; by default derived from the open-files limit.
    max_connections: int | None = Field(None, ge=1)
    # Largest accepted request body on submission, in bytes.
    max_input_bytes: int = Field(1024 * 1024, ge=1024)
    # Deepest nesting of lists and objects accepted in a submission's input and metadata.
    max_input_depth: int = Field(64, ge=1, le=MAX_JSON_DEPTH)
    # Highest priority a caller may give a job (higher is refused with 422); the lowest is -1000.
    max_priority: int = Field(10, ge=0, le=1000)
    # A listing page ends before its JSON would pass this many bytes (next_cursor goes on from there).
    max_list_bytes: int = Field(1024 * 1024, ge=1024)
    retention_s: float = Field(7 * 24 * 3600.0, gt=0)
    lease_s: float = Field(30.0, gt=0)
    # How often a worker polls an empty queue (a submission in this process wakes it at once).
    poll_interval_s: float = Field(0.5, gt=0)
    default_max_attempts: int = Field(5, ge=1, le=100)
    default_timeout_s: float = Field(900.0, gt=0)
    max_timeout_s: float = Field(24 * 3600.0, gt=0)
    # Exponential backoff with full jitter between attempts; Retry-After wins when larger.
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    # Per-attempt timeout of one gateway call (the job's own timeout_s bounds the whole job).
    request_timeout_s: float = Field(600.0, gt=0)
    # Bounded excerpt of an upstream error body kept in a failed job.
    error_excerpt_bytes: int = Field(2048, ge=64)
    api_keys: dict[str, ApiKey] = Field(default_factory=dict)
    jwt_hs256_secret: SecretStr | None = None
    jwt_rs256_public_key: str | None = None
    # JWKS endpoint of the token issuer (RS256/ES256 keys by `kid`, refetched for an unknown kid).
    jwt_jwks_url: str | None = None
    jwt_jwks_timeout_s: float = Field(5.0, gt=0, le=60)
    jwt_jwks_cache_s: float = Field(300.0, gt=0)
    jwt_jwks_refresh_cooldown_s: float = Field(10.0, ge=0)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Claims read from a JWT: subject, organisation (tenant) and roles.
    jwt_tenant_claim: str = "org"
    jwt_roles_claim: str = "roles"
    # Clock skew allowed between the token issuer and this service when checking exp, nbf and iat.
    jwt_leeway_s: float = Field(5.0, ge=0, le=300)
    # Webhooks on completion (jobs_api.webhooks): the secret signs every call; only URLs whose host
    # (or host:port) is listed may be called, and the list is empty by default.
    webhook_secret: SecretStr | None = None
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # One attempt's limit, and how many calls run at once per process (never on a job worker).
    webhook_timeout_s: float = Field(10.0, gt=0, le=300)
    webhook_concurrency: int = Field(8, ge=1, le=1024)
    # Retries: webhook_retry_base_s, doubling, at most webhook_retry_max_s apart, for webhook_retry_for_s.
    webhook_retry_base_s: float = Field(5.0, gt=0)
    webhook_retry_max_s: float = Field(3600.0, gt=0)
    webhook_retry_for_s: float = Field(24 * 3600.0, gt=0)
    # How often the store is asked for deliveries that are due.
    webhook_poll_s: float = Field(1.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Event streams: a comment line this often keeps proxies and clients from closing an idle one,
    # and events written by another process are noticed within sse_poll_s (this process's at once).
    sse_keepalive_s: float = Field(15.0, gt=0)
    sse_poll_s: float = Field(1.0, gt=0)
    log_level: str = "info"

    @field_validator("handlers", mode="before")
    @classmethod
    def _split_handlers(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            load_secret(value.get_secret_value())
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for entry in value:
            parse_allowed_host(entry)
        if value and info.data.get("webhook_secret") is None:
            raise ValueError("webhooks need a signing secret: set JOBS_WEBHOOK_SECRET=whsec_<base64>")
        return value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _check_jwks_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"{value!r} is not an http(s) URL, e.g. https://issuer.example/.well-known/jwks.json"
            )
        return value

    @field_validator("gateway_url")
    @classmethod
    def _check_gateway_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL, e.g. http://127.0.0.1:8080")
        return value.rstrip("/")

    @property
    def auth_enabled(self) -> bool:
        """True when any credential is configured; otherwise the API runs open."""
        return (
            bool(self.api_keys)
            or self.jwt_hs256_secret is not None
            or bool(self.jwt_rs256_public_key)
            or bool(self.jwt_jwks_url)
        )
