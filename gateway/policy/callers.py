"""Callers of a shared gateway: who is calling (by key), what model they may use, how fast.

A key is looked up by its SHA-256: the digest, not the key, is what a lookup's timing could
reveal, and a SHA-256 says nothing usable about its preimage (the reason to store only
digests). The match is then confirmed with `hmac.compare_digest`. Limits per caller:
`max_inflight` requests at once, and `requests_per_minute` as a token bucket that holds ten
seconds' worth (at least one request), so a caller can burst briefly but not spend a minute's
allowance at once. Pure: time comes in.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from gateway.config import CallerSettings

BURST_S = 10.0  # a caller's bucket holds this many seconds of its rate


@dataclass(slots=True)
class TokenBucket:
    """`rate_per_s` tokens a second, at most `capacity` saved up."""

    rate_per_s: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take a token: 0.0 if one was there, else how long until one is."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


@dataclass(slots=True)
class Caller:
    """One configured caller and its live counts."""

    name: str
    digest: bytes
    models: frozenset[str] | None
    max_inflight: int | None
    bucket: TokenBucket | None
    inflight: int = field(default=0)

    def may_use(self, asked: str, model: str) -> bool:
        """Whether the caller may ask for `asked` (which resolves to `model`)."""
        return self.models is None or asked in self.models or model in self.models


def _caller(cfg: CallerSettings, now: float) -> Caller:
    if cfg.key is not None:
        digest = hashlib.sha256(cfg.key.get_secret_value().encode()).digest()
    else:
        assert cfg.key_sha256 is not None
        digest = bytes.fromhex(cfg.key_sha256)
    bucket = None
    if cfg.requests_per_minute is not None:
        rate = cfg.requests_per_minute / 60.0
        capacity = max(1.0, rate * BURST_S)
        bucket = TokenBucket(rate, capacity, capacity, now)
    models = frozenset(cfg.models) if cfg.models is not None else None
    return Caller(cfg.name, digest, models, cfg.max_inflight, bucket)


class Callers:
    """The configured callers."""

    __slots__ = ("_by_digest", "by_name", "callers")

    def __init__(self, configured: list[CallerSettings], now: float) -> None:
        self.callers = tuple(_caller(c, now) for c in configured)
        self.by_name = {c.name: c for c in self.callers}
        self._by_digest = {c.digest: c for c in self.callers}

    def identify(self, key: bytes | None) -> Caller | None:
        """The caller whose key this is, or None (one digest and one lookup, however many callers)."""
        if not key:
            return None
        digest = hashlib.sha256(key).digest()
        caller = self._by_digest.get(digest)
        if caller is None or not hmac.compare_digest(digest, caller.digest):
            return None
        return caller

    @staticmethod
    def over_limit(caller: Caller, now: float) -> float | None:
        """None if the caller may start a request now, else seconds to wait (0 for max_inflight).

        A request admitted here must be counted with `caller.inflight += 1` and given back.
        """
        if caller.max_inflight is not None and caller.inflight >= caller.max_inflight:
            return 0.0
        if caller.bucket is not None:
            wait = caller.bucket.take(now)
            if wait > 0:
                return wait
        return None


def presented_key(authorization: bytes | None, api_key: bytes | None) -> bytes | None:
    """The key a request presents: `Authorization: Bearer KEY`, or `api-key: KEY` (Azure's)."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None
