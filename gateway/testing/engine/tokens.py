r"""Deterministic pseudo-tokens for the engine simulator (no real tokenizer) [pure].

A token is a newline on its own, or up to 4 non-space characters with the spaces before them
(`\n|[^\S\n]*\S{1,4}|[^\S\n]+`), so "Hello world" is "Hell", "o", " wor", "ld": about one token
per 4 characters, like BPE on English. Its id is the CRC-32 of its UTF-8 text. Identical text
prefixes give identical token prefixes (up to the token the prefixes end in). Chat messages are
rendered as `<|role|>\n` + content + `\n` and the prompt ends with `<|assistant|>\n`, so a
follow-up turn that repeats the conversation starts with the previous prompt and its answer.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["GENERATION_PROMPT", "Tokens", "render_chat", "render_message", "token_id", "tokenize"]

GENERATION_PROMPT: Final = "<|assistant|>\n"
_TOKEN_RE: Final = re.compile(r"\n|[^\S\n]*\S{1,4}|[^\S\n]+")

Tokens = tuple[int, ...]


def token_id(piece: str) -> int:
    """The id of one token's text (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(piece.encode("utf-8", "surrogatepass"))


def tokenize(text: str) -> Tokens:
    """The token ids of `text`."""
    return tuple(token_id(m.group()) for m in _TOKEN_RE.finditer(text))


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of an OpenAI content-part list."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                return None
            text = part.get("text")
            if part["type"] == "text":
                if not isinstance(text, str):
                    return None
                parts.append(text)
        return "".join(parts)
    return None


def render_message(message: Any) -> str:
    """One chat message as prompt text; ValueError says what is wrong with it."""
    if not isinstance(message, dict):
        raise ValueError("each message must be an object")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ValueError("each message needs a string 'role'")
    text = _content_text(message.get("content"))
    if text is None:
        raise ValueError("message 'content' must be a string or a list of content parts")
    return f"<|{role}|>\n{text}\n"


def render_chat(messages: Sequence[Any]) -> str:
    """The prompt text of a chat: every message, then the assistant's generation prompt."""
    return "".join(render_message(m) for m in messages) + GENERATION_PROMPT
