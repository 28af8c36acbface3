"""Who is calling: API keys and JWTs (HS256, RS256, or RS256/ES256 keys of a JWKS endpoint)
turned into a Principal with a tenant.

With JOBS_JWT_JWKS_URL set, a token that names a `kid` (or whose algorithm has no static key) is
verified with that key of the endpoint's set (`jobs_api.jwks`); other tokens with the static keys.

A Principal sees only its own tenant's jobs; the `admin` role sees every tenant's. With no
credential configured the API runs open: every caller is an anonymous principal without a tenant
that sees everything (the app logs a warning at start).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from jobs_api.config import JobsSettings
from jobs_api.errors import Unauthorized
from jobs_api.jwks import JwksKeys
from jobs_api.models import Job

ADMIN_ROLE = "admin"
# Registered date claims (RFC 7519 4.1.4-6): NumericDate values, never strings.
DATE_CLAIMS = ("exp", "nbf", "iat")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: subject, the tenant it acts for (None: no tenant) and its roles."""

    subject: str
    tenant: str | None
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        """Admins see and cancel every tenant's jobs."""
        return ADMIN_ROLE in self.roles

    @property
    def sees_all(self) -> bool:
        """True for admins and for the anonymous caller of an open (unauthenticated) API."""
        return self.is_admin or self.tenant is None

    def can_see(self, job: Job) -> bool:
        """Whether this caller may see (and cancel) `job`."""
        return self.sees_all or job.tenant == self.tenant


ANONYMOUS = Principal(subject="anonymous", tenant=None, roles=frozenset())


def is_numeric_date(value: Any) -> bool:
    """True for a JWT NumericDate: a JSON number (not a string, not a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class AuthConfigError(ValueError):
    """A configured credential cannot be used; the message names the setting."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _load_rs256_key(pem: str) -> RSAPublicKey:
    # Environment variables often carry PEM line breaks as a literal "\n".
    text = pem.replace("\\n", "\n").strip()
    try:
        key = load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise AuthConfigError(
            f"jwt_rs256_public_key: not a PEM public key ({exc}); "
            "give the '-----BEGIN PUBLIC KEY-----' block (set via JOBS_JWT_RS256_PUBLIC_KEY)"
        ) from None
    if not isinstance(key, RSAPublicKey):
        raise AuthConfigError(
            "jwt_rs256_public_key: not an RSA public key (set via JOBS_JWT_RS256_PUBLIC_KEY)"
        )
    return key


class Authenticator:
    """Turns an `Authorization` header into a Principal; safe to share across requests."""

    def __init__(self, settings: JobsSettings) -> None:
        self.enabled = settings.auth_enabled
        # Keys are compared by digest so every comparison takes the same time whatever the length.
        self._keys = [
            (_digest(key), grant.tenant, frozenset(grant.roles)) for key, grant in settings.api_keys.items()
        ]
        self._jwt_keys: dict[str, Any] = {}
        if settings.jwt_hs256_secret is not None:
            secret = settings.jwt_hs256_secret.get_secret_value()
            if not secret:
                raise AuthConfigError("jwt_hs256_secret: empty secret (set via JOBS_JWT_HS256_SECRET)")
            self._jwt_keys["HS256"] = secret
        if settings.jwt_rs256_public_key:
            self._jwt_keys["RS256"] = _load_rs256_key(settings.jwt_rs256_public_key)
        self._jwks = (
            JwksKeys(
                settings.jwt_jwks_url,
                timeout_s=settings.jwt_jwks_timeout_s,
                cache_s=settings.jwt_jwks_cache_s,
                refresh_cooldown_s=settings.jwt_jwks_refresh_cooldown_s,
            )
            if settings.jwt_jwks_url
            else None
        )
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._tenant_claim = settings.jwt_tenant_claim
        self._roles_claim = settings.jwt_roles_claim
        self._leeway_s = settings.jwt_leeway_s

    async def authenticate_request(self, authorization: str | None) -> Principal:
        """`authenticate`, and tokens signed with a JWKS key (which may need fetching the set).

        Raises Unauthorized, or JwksUnavailable while the JWKS endpoint cannot be read.
        """
        if self._jwks is not None and self.enabled:
            token = self._bearer(authorization)
            if self._api_key(token) is None and token.count(".") == 2:
                header = self._header(token)
                alg, kid = header.get("alg"), header.get("kid")
                if isinstance(kid, str) or alg not in self._jwt_keys:
                    if not isinstance(kid, str) or not isinstance(alg, str):
                        raise Unauthorized("invalid token: a JWKS-signed token needs 'kid' and 'alg' headers")
                    key = await self._jwks.key(kid, alg)
                    return self._decode(token, key.key, alg)
        return self.authenticate(authorization)

    def _bearer(self, authorization: str | None) -> str:
        if not authorization:
            raise Unauthorized("missing credentials: send Authorization: Bearer <API key or JWT>")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "unsupported Authorization scheme: send Authorization: Bearer <API key or JWT>"
            )
        # Header bytes that are not UTF-8 arrive as surrogates; a token (RFC 6750 b64token) is
        # printable ASCII, so anything else is refused before it is hashed or parsed.
        if not (token.isascii() and token.isprintable()):
            raise Unauthorized("malformed credentials: a Bearer token is printable ASCII")
        return token

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an `Authorization: Bearer ...` header (API key or a JWT with a static
        key); raises Unauthorized."""
        if not self.enabled:
            return ANONYMOUS
        token = self._bearer(authorization)
        principal = self._api_key(token)
        if principal is not None:
            return principal
        if self._jwt_keys and token.count(".") == 2:
            return self._jwt(token)
        raise Unauthorized("invalid API key")

    def _api_key(self, token: str) -> Principal | None:
        given = _digest(token)
        found: Principal | None = None
        for digest, tenant, roles in self._keys:
            # No early exit: the time taken does not depend on which key matched.
            if hmac.compare_digest(given, digest):
                found = Principal(subject=f"key:{tenant}", tenant=tenant, roles=roles)
        return found

    @staticmethod
    def _header(token: str) -> dict[str, Any]:
        try:
            return jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None

    def _jwt(self, token: str) -> Principal:
        header = self._header(token)
        alg = header.get("alg")
        key = self._jwt_keys.get(alg) if isinstance(alg, str) else None
        if key is None or not isinstance(alg, str):
            raise Unauthorized(
                f"invalid token: algorithm {alg!r} is not accepted ({', '.join(self._jwt_keys)})"
            )
        return self._decode(token, key, alg)

    def _decode(self, token: str, key: Any, alg: str) -> Principal:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],  # exactly one, matching the key: no algorithm confusion
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        for name in DATE_CLAIMS:
            # PyJWT would read "exp": "1700000000" as a date; RFC 7519 dates are JSON numbers.
            if name in claims and not is_numeric_date(claims[name]):
                raise Unauthorized(f"invalid token: {name!r} must be a number (seconds since the epoch)")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("invalid token: 'sub' must be a non-empty string")
        roles_claim = claims.get(self._roles_claim, [])
        if isinstance(roles_claim, str):
            roles_claim = roles_claim.split()
        if not isinstance(roles_claim, list) or not all(isinstance(r, str) for r in roles_claim):
            raise Unauthorized(f"invalid token: {self._roles_claim!r} must be a list of strings")
        roles = frozenset(roles_claim)
        tenant = claims.get(self._tenant_claim)
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise Unauthorized(f"invalid token: {self._tenant_claim!r} must be a non-empty string")
        if tenant is None and ADMIN_ROLE not in roles:
            # A tenant-less non-admin would otherwise see every tenant's jobs.
            raise Unauthorized(f"invalid token: no {self._tenant_claim!r} (tenant) claim")
        return Principal(subject=subject, tenant=tenant, roles=roles)
