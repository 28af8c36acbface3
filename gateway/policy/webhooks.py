"""Webhooks for fleet state changes, as pure decisions: which event, what is sent, when to retry.

Events: `ejected` (an upstream went ejected or unhealthy), `recovered` (back to healthy from
ejected, unhealthy or drained), `drained` (an operator drained it), `degraded` (the fleet's
degraded flag changed either way, policy/redundancy.py) and `failover` (the tier serving
traffic changed: to a backup, back to the primary, or to none). A 429 cooldown sends nothing.
Each delivery POSTs `{"type", "timestamp", "data"}` signed the Standard Webhooks way:
`webhook-id`, `webhook-timestamp` (the attempt's Unix seconds) and `webhook-signature:
v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the `whsec_<base64>` secret. A 2xx
delivers; a 3xx or a 4xx other than 408/429 fails for good; anything else is retried after
1, 2, 4 ... s (at most 300 s apart) until an hour after the first attempt. The queue holds
MAX_QUEUED deliveries; when full, the oldest is dropped. Pure: times are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections import deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from gateway.config import WebhookEvent, load_webhook_secret
from gateway.policy.outlier import State, Transition
from gateway.policy.redundancy import Redundancy

MAX_QUEUED: Final = 1000
RETRYABLE_4XX: Final = frozenset({408, 429})


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one attempt."""
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


_OUT = frozenset({State.EJECTED, State.UNHEALTHY})
_BACK_FROM = frozenset({State.EJECTED, State.UNHEALTHY, State.DRAINED})


def upstream_event(change: Transition) -> WebhookEvent | None:
    """The event one upstream's state change makes, if any."""
    if change.after is State.DRAINED:
        return WebhookEvent.DRAINED
    if change.after in _OUT and change.before not in _OUT:
        return WebhookEvent.EJECTED
    if change.after is State.HEALTHY and change.before in _BACK_FROM:
        return WebhookEvent.RECOVERED
    return None


class FleetWatch:
    """Turns successive fleet views into `degraded` and `failover` events (each change once)."""

    def __init__(self, redundancy: Redundancy, serving_tier: int | None) -> None:
        self.degraded = redundancy.degraded
        self.serving_tier = serving_tier

    def observe(
        self, redundancy: Redundancy, serving_tier: int | None
    ) -> list[tuple[WebhookEvent, dict[str, Any]]]:
        """The events since the last view."""
        out: list[tuple[WebhookEvent, dict[str, Any]]] = []
        if serving_tier != self.serving_tier:
            data: dict[str, Any] = {"from_tier": self.serving_tier, "to_tier": serving_tier}
            out.append((WebhookEvent.FAILOVER, data))
            self.serving_tier = serving_tier
        if redundancy.degraded != self.degraded:
            data = {
                "degraded": redundancy.degraded,
                "level": redundancy.level,
                "reasons": list(redundancy.reasons),
            }
            out.append((WebhookEvent.DEGRADED, data))
            self.degraded = redundancy.degraded
        return out


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload(event: WebhookEvent, data: dict[str, Any], wall_time: float) -> bytes:
    """The JSON body of an event."""
    body = {"type": event.value, "timestamp": _rfc3339(wall_time), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event on its way to one webhook."""

    hook: int  # index into the configured webhooks
    msg_id: str
    body: bytes
    next_at: float  # monotonic
    attempts: int = 0
    first_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: base_s, 2*base_s ... at most max_s apart, for give_up_s in all."""

    base_s: float = 1.0
    max_s: float = 300.0
    give_up_s: float = 3600.0

    def delay_s(self, attempts: int) -> float:
        """Wait after the `attempts`-th failed attempt (1 for the first)."""
        return float(min(self.max_s, self.base_s * 2 ** min(max(attempts - 1, 0), 40)))


class Result(StrEnum):
    """How an attempt ended (the `result` label of gateway_webhook_deliveries_total)."""

    DELIVERED = "delivered"
    RETRIED = "retried"
    FAILED = "failed"
    DROPPED = "dropped"


def decide(
    delivery: Delivery, status: int | None, now: float, policy: RetryPolicy
) -> tuple[Result, Delivery | None]:
    """After an attempt started at `now` answered `status` (None: no answer): the result and what to keep."""
    if status is not None and 200 <= status < 300:
        return Result.DELIVERED, None
    if status is not None and status < 500 and status not in RETRYABLE_4XX:
        return Result.FAILED, None
    attempts = delivery.attempts + 1
    first = delivery.first_attempt_at if delivery.first_attempt_at is not None else now
    next_at = now + policy.delay_s(attempts)
    if next_at > first + policy.give_up_s:
        return Result.FAILED, None
    return Result.RETRIED, replace(delivery, attempts=attempts, first_attempt_at=first, next_at=next_at)


class Outbox:
    """Deliveries waiting to be sent, at most `limit`; adding to a full one drops the oldest."""

    def __init__(self, limit: int = MAX_QUEUED) -> None:
        self.limit = limit
        self._items: deque[Delivery] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, delivery: Delivery) -> Delivery | None:
        """Queue `delivery`; the one dropped to make room, if any."""
        dropped = self._items.popleft() if len(self._items) >= self.limit else None
        self._items.append(delivery)
        return dropped

    def take_due(self, now: float, most: int) -> list[Delivery]:
        """Remove and return up to `most` deliveries due by `now`, oldest first."""
        due = [d for d in self._items if d.next_at <= now][:most]
        for d in due:
            self._items.remove(d)
        return due

    def next_due(self) -> float | None:
        """When the soonest delivery is due (None when empty)."""
        return min((d.next_at for d in self._items), default=None)


__all__ = ["WebhookEvent", "load_webhook_secret"]
