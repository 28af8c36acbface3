"""Signing keys of JWTs from a JWKS endpoint (JOBS_JWT_JWKS_URL), so the issuer can rotate them.

PyJWT's `PyJWKClient` fetches and caches the key set (for `cache_s`); a token whose `kid` is not
in the cached set makes it fetch again (at most once per `refresh_cooldown_s`), so a key the
issuer adds is accepted without a restart. Keys found in the cached set are looked up on the
event loop; a fetch (blocking urllib, bounded by `timeout_s`) runs in a thread, one at a time.
An endpoint that cannot be reached, or answers no usable key set, is JwksUnavailable (503): the
token may well be valid, so the caller is told to retry rather than that its credentials are bad.
"""

from __future__ import annotations

import asyncio

import jwt
from jwt import PyJWK, PyJWKClient

from jobs_api.errors import JwksUnavailable, Unauthorized

# Algorithms a JWKS key may sign with: RSA and P-256 ECDSA (never HS*: a public set has no secret).
JWKS_ALGORITHMS = frozenset({"RS256", "ES256"})


class JwksKeys:
    """The signing keys of one JWKS endpoint; safe to share across requests of one event loop."""

    def __init__(self, url: str, *, timeout_s: float, cache_s: float, refresh_cooldown_s: float) -> None:
        self.url = url
        self._client = PyJWKClient(
            url,
            cache_jwk_set=True,
            lifespan=cache_s,
            cache_keys=False,
            timeout=timeout_s,
            cooldown_duration=refresh_cooldown_s,
        )
        self._fetching = asyncio.Lock()

    def _cached(self, kid: str) -> PyJWK | None:
        cache = self._client.jwk_set_cache
        jwk_set = cache.get() if cache is not None else None
        if jwk_set is None:
            return None
        return next((key for key in jwk_set.keys if key.key_id == kid), None)

    async def key(self, kid: str, alg: str) -> PyJWK:
        """The key `kid` that may verify a token signed with `alg`; Unauthorized or JwksUnavailable."""
        if alg not in JWKS_ALGORITHMS:
            accepted = ", ".join(sorted(JWKS_ALGORITHMS))
            raise Unauthorized(f"invalid token: algorithm {alg!r} is not accepted for JWKS keys ({accepted})")
        key = self._cached(kid)
        if key is None:
            async with self._fetching:  # one fetch at a time; the others then find its keys cached
                key = self._cached(kid)
                if key is None:
                    key = await self._fetch(kid)
        if key.algorithm_name != alg:
            raise Unauthorized(f"invalid token: key {kid!r} does not sign with {alg}")
        return key

    async def _fetch(self, kid: str) -> PyJWK:
        try:
            return await asyncio.to_thread(self._client.get_signing_key, kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise JwksUnavailable(f"cannot fetch the JWKS (JOBS_JWT_JWKS_URL): {exc}") from None
        except jwt.PyJWKClientError as exc:
            if "Unable to find a signing key" in str(exc):
                raise Unauthorized(f"invalid token: unknown key id {kid!r}") from None
            raise JwksUnavailable(f"the JWKS (JOBS_JWT_JWKS_URL) has no usable keys: {exc}") from None
        except jwt.PyJWTError as exc:
            raise JwksUnavailable(f"the JWKS (JOBS_JWT_JWKS_URL) has no usable keys: {exc}") from None
