"""Webhooks on completion, as pure decisions: who may be called, what is sent, when to try again.

A submission's `"webhook": {"url"}` must name an http(s) URL whose host (or host:port) the
operator allowed (JOBS_WEBHOOK_ALLOWED_HOSTS; empty by default, so nothing is ever called). When
the job ends (any terminal status) the store records a `Delivery` in the same write that ended
it, so a crash cannot lose it. Each attempt POSTs the same JSON body, signed the Standard Webhooks
way: `webhook-id` (the job id), `webhook-timestamp` (the attempt's Unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the secret of
JOBS_WEBHOOK_SECRET (`whsec_<base64>`). A 2xx ends it as delivered; a 4xx other than 408 and
429 (and a 3xx: redirects are not followed) ends it as failed; anything else (5xx, 408, 429, no
answer) is retried after `RetryPolicy.delay_s` until `give_up_s` after the first attempt.
Pure: `now` (wall-clock seconds) is passed in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from jobs_api.models import Job

SECRET_PREFIX: Final = "whsec_"
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# Statuses of 4xx that say "try again later" rather than "never".
RETRYABLE_4XX: Final = frozenset({408, 429})


class WebhookSpec(BaseModel):
    """The `webhook` field of a submission."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: str = Field(min_length=1, max_length=2048)


def parse_allowed_host(entry: str) -> tuple[str, int | None]:
    """`host` or `host:port` (IPv6 in brackets) as (lowercase host, port or None: any port)."""
    text = entry.strip().lower()
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        raise ValueError(f"{entry!r} is not a host or host:port") from None
    host = parts.hostname
    if not host or parts.username is not None or parts.path or parts.query or parts.fragment:
        raise ValueError(f"{entry!r} is not a host or host:port (e.g. hooks.example.com:8443)")
    return host, port


def check_url(url: str, allowed: tuple[str, ...]) -> str:
    """The URL if it may be called; ValueError saying why not (naming the setting to change)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{url[:200]!r} is not a valid URL") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@); the body is signed instead")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError("must not contain whitespace or control characters")
    host = parts.hostname.lower()
    port = port if port is not None else DEFAULT_PORTS[parts.scheme]
    if not allowed:
        raise ValueError("webhooks are off: no host is allowed (set JOBS_WEBHOOK_ALLOWED_HOSTS)")
    for entry in allowed:
        allowed_host, allowed_port = parse_allowed_host(entry)
        if allowed_host == host and allowed_port in (None, port):
            return url
    shown = f"[{host}]" if ":" in host else host
    raise ValueError(f"host {shown}:{port} is not in JOBS_WEBHOOK_ALLOWED_HOSTS")


def load_secret(text: str) -> bytes:
    """The key of a `whsec_<base64>` secret; ValueError if it is not one."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError("must look like whsec_<base64> (Standard Webhooks secret format)")
    encoded = text[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("the key must be at least 16 bytes (24 base64 characters)")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt."""
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def payload(job: Job) -> str:
    """The JSON body announcing that `job` ended: `{"type": "job.<status>", "timestamp", "data"}`."""
    base = f"/v1/jobs/{job.id}"
    data: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "job_type": job.type,
        "tenant": job.tenant,
        "attempts": job.attempts,
        "finished_at": _rfc3339(job.finished_at or job.updated_at),
        "links": {"self": base, "result": f"{base}/result"},
    }
    if job.error is not None:
        data["error"] = {"type": job.error.type, "message": job.error.message}
    ended = _rfc3339(job.finished_at or job.updated_at)
    body = {"type": f"job.{job.status.value}", "timestamp": ended, "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A pending webhook call of one job: where, what, how many attempts so far, when next."""

    job_id: str
    url: str
    body: str
    created_at: float
    next_at: float
    attempts: int = 0
    first_attempt_at: float | None = None

    def to_json(self) -> str:
        """As stored."""
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Delivery:
        """As read back from the store."""
        return cls(**json.loads(text))


def delivery_for(before: Job | None, after: Job) -> Delivery | None:
    """The delivery a change produces: one, when a job with a webhook reaches a terminal status."""
    if after.webhook_url is None or not after.status.terminal:
        return None
    if before is not None and before.status.terminal:
        return None
    return Delivery(
        job_id=after.id,
        url=after.webhook_url,
        body=payload(after),
        created_at=after.updated_at,
        next_at=after.updated_at,
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: base_s, 2*base_s, 4*base_s ... capped at max_s, for give_up_s in all."""

    base_s: float = 5.0
    max_s: float = 3600.0
    give_up_s: float = 24 * 3600.0

    def delay_s(self, attempts: int) -> float:
        """Wait after the `attempts`-th failed attempt (1 for the first)."""
        return float(min(self.max_s, self.base_s * 2 ** min(max(attempts - 1, 0), 62)))


class Verdict(StrEnum):
    """How one attempt ended."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


def classify(status: int | None) -> Verdict:
    """An attempt's verdict from the receiver's status (None: no answer, a timeout, a refused connection)."""
    if status is None or status >= 500 or status in RETRYABLE_4XX:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.DELIVERED
    return Verdict.FAILED


@dataclass(frozen=True, slots=True)
class Step:
    """What follows an attempt: the delivery to keep (with its next attempt time), or None: done."""

    verdict: Verdict
    keep: Delivery | None
    note: str


def decide(
    delivery: Delivery, status: int | None, error: str | None, now: float, policy: RetryPolicy
) -> Step:
    """After an attempt that started at `now` answered `status` (or failed with `error`): next step."""
    attempts = delivery.attempts + 1
    first = delivery.first_attempt_at if delivery.first_attempt_at is not None else now
    what = f"HTTP {status}" if status is not None else (error or "no answer")
    verdict = classify(status)
    if verdict is Verdict.DELIVERED:
        return Step(verdict, None, f"webhook attempt {attempts}: {what}; delivered")
    if verdict is Verdict.FAILED:
        reason = "redirects are not followed" if status is not None and status < 400 else "not retried"
        return Step(verdict, None, f"webhook attempt {attempts}: {what}; failed ({reason})")
    delay = policy.delay_s(attempts)
    next_at = now + delay
    if next_at > first + policy.give_up_s:
        note = f"webhook attempt {attempts}: {what}; failed (gave up after {policy.give_up_s:g} s)"
        return Step(Verdict.FAILED, None, note)
    kept = replace(delivery, attempts=attempts, first_attempt_at=first, next_at=next_at)
    return Step(verdict, kept, f"webhook attempt {attempts}: {what}; retrying in {delay:g} s")
