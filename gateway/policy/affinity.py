"""Affinity: keep a session, or a prompt prefix, on the engine that already holds its KV cache.

The key of a request is, by `affinity.key`:
  session  the value of a caller-chosen header (`affinity.header`, default X-Session-ID), or the
           body's `user` field;
  prefix   the start of the prompt: the system message and the first turns of `messages`, or the
           start of `prompt`, up to `affinity.prefix_chars` characters, without tokenizing (engines
           cache by token blocks, so a shared start is a shared cache);
  none     no key.
Engines are ranked for a key by weighted rendezvous (highest random weight) hashing over names,
so every sidecar ranks them the same with no coordination, and removing an engine moves only
the keys it held. Pure.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

_MAX_HASH = float(1 << 64)


class Named(Protocol):
    """What ranking reads of an upstream."""

    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> float: ...


N = TypeVar("N", bound=Named)


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prefix_key(body: dict[str, Any], limit: int) -> bytes | None:
    """The start of the prompt, up to `limit` characters; None when there is no prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for message in messages:
            role = message.get("role") if isinstance(message, dict) else None
            text = f"{role}\x1f{_message_text(message)}\x1e"
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
        joined = "".join(parts)[:limit]
        return joined.encode("utf-8", "surrogatepass") if joined else None
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt[:limit].encode("utf-8", "surrogatepass")
    return None


def session_key(header: bytes | None, body: dict[str, Any] | None) -> bytes | None:
    """A caller-chosen session: the header's value, else the body's `user`."""
    if header:
        return header
    user = body.get("user") if body is not None else None
    return user.encode("utf-8", "surrogatepass") if isinstance(user, str) and user else None


def _score(key: bytes, name: str, weight: float) -> float:
    digest = hashlib.blake2b(key + b"\x00" + name.encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (_MAX_HASH + 1)  # in (0, 1]
    return -weight / math.log(unit) if unit < 1.0 else math.inf


def rendezvous(key: bytes, cands: Sequence[N]) -> list[N]:
    """`cands` ranked for `key`, best first (weighted highest-random-weight order)."""
    return sorted(cands, key=lambda c: _score(key, c.name, c.weight), reverse=True)
