"""Request targets that would leave an upstream's path prefix.

An upstream URL may carry a path prefix (`https://host/openai`) that the request path is put
behind. A `..` segment, raw or percent-encoded (`%2e%2e`, `..%2f`), would let a request reach
paths outside that prefix on an upstream that normalises paths, so such a target is refused
(400, as nginx does for a `..` above the root). Only the path is checked, not the query.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

_DOT_DOT = b".."


def escapes_prefix(target: bytes) -> bool:
    """True when the path of `target` has a `..` segment, however it is encoded."""
    path = target.partition(b"?")[0]
    if b"." not in path and b"%" not in path:
        return False  # the common case, decided without decoding
    for segment in path.split(b"/"):
        if segment == _DOT_DOT:
            return True
        if b"%" in segment:
            decoded = unquote_to_bytes(segment)
            # An encoded slash or backslash may be decoded into a separator by the upstream.
            for part in decoded.replace(b"\\", b"/").split(b"/"):
                if part == _DOT_DOT:
                    return True
        elif b"\\" in segment and _DOT_DOT in segment.split(b"\\"):
            return True
    return False
