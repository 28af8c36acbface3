"""What a 4xx error body says: the prompt is too long for this model, or a content policy refused it.

A context-window error is worth another upstream with a larger context (or the next tier); a
content-filter or policy rejection is final everywhere; any other 4xx is the caller's mistake.
Read from OpenAI's error shape (`error.code`, `error.type`, `error.message`), Azure OpenAI's
(`innererror.code`), vLLM's and SGLang's (OpenAI's shape with their own messages) and TGI's
(`{"error": "...", "error_type": "validation"}`). Pure: bytes in, a verdict out.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

import orjson

_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length", "context_window_exceeded"})
_POLICY_CODES = frozenset(
    {"content_filter", "content_policy_violation", "responsibleaipolicyviolation", "safety", "moderation"}
)
_CONTEXT_MESSAGE = re.compile(
    r"maximum context length|context length|context window|max_model_len|prompt is too long"
    r"|input is too long|tokens \+ `max_new_tokens` must be <=",
    re.IGNORECASE,
)
_POLICY_MESSAGE = re.compile(r"content management policy|content filter|content policy|safety system", re.I)


class Rejection(StrEnum):
    """What kind of refusal a 4xx body is."""

    CONTEXT_LENGTH = "context_length"
    CONTENT_POLICY = "content_policy"
    OTHER = "other"


def _strings(err: dict[str, Any]) -> tuple[set[str], str]:
    """The lower-cased codes and types of an error object, and its message."""
    codes: set[str] = set()
    for key in ("code", "type", "error_type"):
        value = err.get(key)
        if isinstance(value, str):
            codes.add(value.lower())
    inner = err.get("innererror")
    if isinstance(inner, dict) and isinstance(inner.get("code"), str):
        codes.add(inner["code"].lower())
    message = err.get("message")
    return codes, message if isinstance(message, str) else ""


def classify_rejection(body: bytes) -> Rejection:
    """Read a 4xx response body."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Rejection.OTHER
    if not isinstance(parsed, dict):
        return Rejection.OTHER
    err = parsed.get("error")
    if isinstance(err, str):  # TGI
        codes, message = _strings(parsed)
        message = err
    elif isinstance(err, dict):
        codes, message = _strings(err)
    else:  # older vLLM: {"object": "error", "message": ..., "type": ...}
        codes, message = _strings(parsed)
    if codes & _POLICY_CODES or _POLICY_MESSAGE.search(message):
        return Rejection.CONTENT_POLICY
    if codes & _CONTEXT_CODES or _CONTEXT_MESSAGE.search(message):
        return Rejection.CONTEXT_LENGTH
    return Rejection.OTHER
