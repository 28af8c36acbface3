"""OpenAI-compatible request parsing and response bodies, shaped as vLLM answers [pure]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.testing.engine.tokens import render_chat

__all__ = [
    "BadRequest",
    "GenerationRequest",
    "chat_chunk",
    "completion_chunk",
    "full_response",
    "parse_request",
    "usage",
]


class BadRequest(ValueError):
    """A request the engine refuses with 400; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerationRequest:
    """What a completion request asks for."""

    chat: bool
    model: str | None
    prompt_text: str
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _flag(payload: dict[str, Any], key: str) -> bool:
    value = payload.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be a boolean", key)
    return value


def _max_tokens(payload: dict[str, Any], chat: bool) -> int | None:
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for key in keys:
        value = payload.get(key)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise BadRequest(f"'{key}' must be an integer of at least 1", key)
        return value
    return None


def parse_request(payload: Any, *, chat: bool) -> GenerationRequest:
    """Validate a /v1/chat/completions (`chat`) or /v1/completions body; BadRequest says why not."""
    if not isinstance(payload, dict):
        raise BadRequest("Request body must be a JSON object")
    if chat:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list", "messages")
        try:
            text = render_chat(messages)
        except ValueError as exc:
            raise BadRequest(str(exc), "messages") from None
    else:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        text = prompt
    n = payload.get("n", 1)
    if n is not None and n != 1:
        raise BadRequest("only 'n': 1 is supported", "n")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    stream = _flag(payload, "stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    include_usage = bool(options) and _flag(options or {}, "include_usage")
    return GenerationRequest(chat, model or None, text, stream, include_usage, _max_tokens(payload, chat))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """The `usage` object, with the prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_chunk(base: dict[str, Any], delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    """One `chat.completion.chunk` event."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**base, "object": "chat.completion.chunk", "choices": [choice]}


def completion_chunk(base: dict[str, Any], text: str, finish_reason: str | None) -> dict[str, Any]:
    """One streamed `text_completion` event."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
    return {**base, "object": "text_completion", "choices": [choice]}


def full_response(
    base: dict[str, Any], chat: bool, text: str, finish_reason: str, usage_obj: dict[str, Any]
) -> dict[str, Any]:
    """A non-streaming `chat.completion` or `text_completion` body."""
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        kind = "text_completion"
    return {**base, "object": kind, "choices": [choice], "usage": usage_obj}
