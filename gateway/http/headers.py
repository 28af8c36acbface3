"""Header rewriting between client and upstream, and Retry-After parsing.

Hop-by-hop headers (RFC 9110 section 7.6.1: Connection and every header it names, Keep-Alive,
Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-Authenticate, Proxy-Authorization)
never cross the gateway in either direction. Repeated headers (Set-Cookie, Vary) stay repeated.

Fields are handled as the bytes that came off the wire, and each direction is one pass over
them: the common case (no hop-by-hop fields beyond Connection) costs one dict lookup per field.
"""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import parsedate_to_datetime

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
_HOP = frozenset(n.encode() for n in HOP_BY_HOP)

# How each header name is treated; names not listed are forwarded as they are.
_DROP = 0  # the gateway owns it: hop-by-hop, or framing it redoes itself
_CONNECTION = 1  # hop-by-hop, and names further hop-by-hop fields
_CAPTURE = 2  # read by the gateway and sent on in its own form
_KEEP_AND_CAPTURE = 3  # read by the gateway and forwarded unchanged

# Request direction: besides hop-by-hop, Host is set from the upstream URL, the body is already
# read (so a 100-continue handshake would only stall the upstream), and framing is redone.
_REQUEST_KINDS: dict[bytes, int] = {
    **dict.fromkeys(_HOP, _DROP),
    b"connection": _CONNECTION,
    b"transfer-encoding": _CAPTURE,
    b"content-length": _CAPTURE,
    b"host": _CAPTURE,
    b"expect": _DROP,
    b"x-forwarded-for": _CAPTURE,
    b"x-forwarded-proto": _CAPTURE,
    b"x-forwarded-host": _CAPTURE,
    b"x-request-id": _CAPTURE,
}
# Response direction: the gateway frames the body and sets its own tracing headers.
_RESPONSE_KINDS: dict[bytes, int] = {
    **dict.fromkeys(_HOP, _DROP),
    b"connection": _CONNECTION,
    b"content-length": _CAPTURE,
    b"content-type": _KEEP_AND_CAPTURE,
    b"x-request-id": _DROP,
    b"x-gateway-upstream": _DROP,
    b"x-gateway-attempts": _DROP,
    b"x-gateway-model": _DROP,
    b"endpoint-load-metrics": _DROP,  # the engine's load report is for the gateway, as Envoy does
}


_NOT_REMOVABLE = frozenset({b"close", b"keep-alive", b"content-length", b"transfer-encoding"})


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def _line(name: bytes, value: bytes) -> bytes:
    return name + b": " + value + b"\r\n"


class RequestFields:
    """A client's header fields sorted into what the gateway reads and what it forwards."""

    __slots__ = ("captured", "chunked", "content_length", "forward")

    def __init__(self) -> None:
        # (lower-case name, "Name: value\r\n") of every field forwarded unchanged, in order.
        self.forward: list[tuple[bytes, bytes]] = []
        # Values of captured fields by lower-case name; repeated lines joined with ", ".
        self.captured: dict[bytes, bytes] = {}
        self.content_length: int | None = None
        self.chunked = False

    def get(self, name: bytes) -> bytes | None:
        """A captured field's value (`name` in lower case)."""
        return self.captured.get(name)


class RequestFieldReader:
    """Sorts request header fields in one pass; `extra` names are also captured (and forwarded),
    `consume` names are captured and never forwarded (a caller's own credential)."""

    __slots__ = ("_kinds",)

    def __init__(self, extra: Iterable[str] = (), consume: Iterable[str] = ()) -> None:
        self._kinds = dict(_REQUEST_KINDS)
        for name in extra:
            self._kinds.setdefault(name.lower().encode(), _KEEP_AND_CAPTURE)
        for name in consume:
            self._kinds[name.lower().encode()] = _CAPTURE

    def read(self, fields: list[tuple[bytes, bytes]]) -> RequestFields:
        out = RequestFields()
        kinds = self._kinds
        forward = out.forward
        captured = out.captured
        connection: list[bytes] | None = None
        for name, value in fields:
            lname = name.lower()
            kind = kinds.get(lname)
            if kind is None:
                forward.append((lname, name + b": " + value + b"\r\n"))
            elif kind == _CAPTURE or kind == _KEEP_AND_CAPTURE:
                prior = captured.get(lname)
                captured[lname] = value if prior is None else prior + b", " + value
                if kind == _KEEP_AND_CAPTURE:
                    forward.append((lname, _line(name, value)))
            elif kind == _CONNECTION:
                connection = [value] if connection is None else [*connection, value]
        if connection is not None:
            # Framing is never removable: dropping Content-Length because Connection names it
            # would silently drop the body.
            listed = _connection_tokens(connection) - _NOT_REMOVABLE
            if listed:
                out.forward = [f for f in forward if f[0] not in listed]
                for name in listed & captured.keys():
                    del captured[name]
        length = captured.get(b"content-length")
        if length is not None:
            out.content_length = int(length.partition(b",")[0])
        out.chunked = b"transfer-encoding" in captured
        return out


class StaticFields:
    """An upstream's configured headers, which replace client and forwarding fields of that name."""

    __slots__ = ("block", "names")

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        pairs = list(pairs)
        self.names = frozenset(n.lower().encode() for n, _ in pairs)
        self.block = b"".join(_line(n.encode(), v.encode()) for n, v in pairs)


NO_STATIC = StaticFields(())


def upstream_request_fields(
    request: RequestFields,
    *,
    client_ip: str | None,
    scheme: bytes,
    host: bytes | None,
    request_id: bytes,
    static: StaticFields = NO_STATIC,
) -> bytes:
    """The header block to send upstream (without Host and body framing, which the client adds).

    The client's fields minus hop-by-hop ones, then X-Forwarded-For/-Proto/-Host with this hop
    appended to any chain the client sent, X-Request-ID, and the upstream's static fields.
    """
    names = static.names
    if names:
        parts = [line for lname, line in request.forward if lname not in names]
    else:
        parts = [line for _, line in request.forward]
    captured = request.captured
    forwarded = (
        (b"x-forwarded-for", b"X-Forwarded-For", client_ip.encode() if client_ip else None),
        (b"x-forwarded-proto", b"X-Forwarded-Proto", scheme),
        (b"x-forwarded-host", b"X-Forwarded-Host", host),
    )
    for lname, name, hop in forwarded:
        if lname in names:
            continue
        prior = captured.get(lname)
        value = hop if prior is None else (prior + b", " + hop if hop else prior)
        if value:
            parts.append(_line(name, value))
    if b"x-request-id" not in names:
        parts.append(_line(b"X-Request-ID", request_id))
    parts.append(static.block)
    return b"".join(parts)


class ResponseFields:
    """An upstream response's header block for the client, and the values the gateway reads."""

    __slots__ = ("block", "content_length", "content_type")

    def __init__(self, block: bytes, content_length: int | None, content_type: bytes | None) -> None:
        self.block = block
        self.content_length = content_length
        self.content_type = content_type


def client_response_fields(fields: list[tuple[bytes, bytes]]) -> ResponseFields:
    """The upstream's fields minus hop-by-hop ones, framing and the gateway's own tracing headers."""
    kinds = _RESPONSE_KINDS
    lines: list[tuple[bytes, bytes]] = []
    captured: dict[bytes, bytes] = {}
    connection: list[bytes] | None = None
    for name, value in fields:
        lname = name.lower()
        kind = kinds.get(lname)
        if kind is None:
            lines.append((lname, name + b": " + value + b"\r\n"))
        elif kind == _KEEP_AND_CAPTURE:
            captured.setdefault(lname, value)
            lines.append((lname, _line(name, value)))
        elif kind == _CAPTURE:
            captured.setdefault(lname, value)
        elif kind == _CONNECTION:
            connection = [value] if connection is None else [*connection, value]
    if connection is not None:
        listed = _connection_tokens(connection)
        lines = [f for f in lines if f[0] not in listed]
    length = captured.get(b"content-length")
    return ResponseFields(
        b"".join(line for _, line in lines),
        int(length.partition(b",")[0]) if length is not None else None,
        captured.get(b"content-type"),
    )


def field_value(fields: list[tuple[bytes, bytes]], lname: bytes) -> str | None:
    """The first value of a header field (`lname` in lower case), as text; None if absent."""
    for name, value in fields:
        if name.lower() == lname:
            return value.decode("latin-1")
    return None


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
