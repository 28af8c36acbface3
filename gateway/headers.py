"""Header rewriting between client and upstream, and Retry-After parsing.

Hop-by-hop headers (RFC 9110 section 7.6.1: Connection and every header it names, Keep-Alive,
Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-Authenticate, Proxy-Authorization)
never cross the gateway in either direction. Repeated headers (Set-Cookie, Vary) stay repeated.
"""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import parsedate_to_datetime

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Not hop-by-hop, but the gateway owns them on the way up: aiohttp sets Host from the upstream URL,
# and the body is already read, so a 100-continue handshake would only stall the upstream.
_REQUEST_OWNED = HOP_BY_HOP | frozenset({"host", "expect"})
# The gateway's own response framing decides these.
_RESPONSE_OWNED = HOP_BY_HOP | frozenset({"content-length"})


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def _without(headers: CIMultiDictProxy[str], owned: frozenset[str]) -> CIMultiDict[str]:
    """A copy of `headers` without `owned` names and those the Connection header lists.

    Copy-then-delete runs in multidict's C code; most messages carry none of these names, so
    this is much cheaper than filtering every header in Python.
    """
    out = CIMultiDict(headers)
    drop = owned | _connection_tokens(headers) if "Connection" in headers else owned
    for name in drop:
        if name in out:
            del out[name]
    return out


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    # Repeated lines of one header are one comma-separated list (RFC 9110 5.3); keep them all.
    prior = ", ".join(headers.getall(name, ()))
    headers[name] = f"{prior}, {value}" if prior else value


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    host: str | None,
    request_id: str,
    static: Iterable[tuple[str, str]],
) -> CIMultiDict[str]:
    """Headers to send upstream: the client's minus hop-by-hop, plus forwarding and static ones."""
    out = _without(incoming, _REQUEST_OWNED)
    if client_ip:
        _append(out, "X-Forwarded-For", client_ip)
    _append(out, "X-Forwarded-Proto", scheme)
    if host:
        _append(out, "X-Forwarded-Host", host)
    out["X-Request-ID"] = request_id
    for name, value in static:
        out[name] = value
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to send back to the client: the upstream's minus hop-by-hop and framing."""
    return _without(upstream, _RESPONSE_OWNED)


def parse_retry_after(value: str | None, now_wall_s: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_wall_s)
