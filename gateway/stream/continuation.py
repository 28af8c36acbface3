"""Continuing a cut answer on another upstream, so the client sees one stream and one answer.

When a committed stream fails, the answer so far (the `Transcript`) is sent to an upstream that
accepts assistant prefill: for chat completions as a final assistant message with vLLM's and
SGLang's `continue_final_message: true, add_generation_prompt: false`, for completions appended
to the prompt; `max_tokens` is lowered by the content chunks already produced (one token per
chunk, as vLLM streams; a lower bound on what was produced otherwise). The continuation's chunks
are rewritten to carry the original stream's `id`, `model` and `created`, its role-only preamble
is dropped, and its usage is made to cover the whole answer: completion tokens include those
produced before the cut, and the prompt tokens exclude them (both estimated by chunk count).
Pure: bytes and events in, bytes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.stream.events import Event, Kind

CHAT_PATH = "/chat/completions"
COMPLETIONS_PATH = "/completions"


@dataclass(slots=True)
class Transcript:
    """What the client has been sent of one streamed answer."""

    id: Any = None
    model: Any = None
    created: Any = None
    text: str = ""  # choice 0's output so far
    chunks: int = 0  # content events sent
    continuable: bool = True  # False once something a prefill cannot reproduce was sent
    finished: bool = False  # a choice finished: the answer is complete
    done: bool = False  # data: [DONE] was sent

    def add(self, event: Event) -> None:
        """Account for one event passed to the client."""
        data = event.data
        if isinstance(data, dict) and self.id is None and "id" in data:
            self.id, self.model, self.created = data.get("id"), data.get("model"), data.get("created")
        if event.kind is Kind.CONTENT:
            self.chunks += 1
            self.text += event.text
            if event.tool_calls or not event.text or _several_choices(data):
                self.continuable = False  # tool calls, reasoning or n > 1: no prefill can resume them
        if event.finished:
            self.finished = True
        elif event.kind is Kind.DONE:
            self.done = True

    @property
    def complete(self) -> bool:
        """The answer ended properly: a finished choice, or [DONE]."""
        return self.finished or self.done


def _several_choices(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    choices = data.get("choices")
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("index", 0) != 0 for c in choices)


def continuation_body(
    path: str, body: bytes | bytearray, transcript: Transcript, model: str | None = None
) -> bytes | None:
    """The request body that continues `transcript`, or None when this answer cannot be continued.

    `model`, if given, is the name the continuing upstream wants for the request's model.
    """
    if not transcript.continuable or not transcript.text or transcript.complete:
        return None
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict) or request.get("n", 1) != 1 or request.get("stream") is not True:
        return None
    if not _lower_max_tokens(request, transcript.chunks):
        return None
    if model is not None:
        request["model"] = model
    if path.endswith(CHAT_PATH):
        messages = request.get("messages")
        if not isinstance(messages, list):
            return None
        request["messages"] = [*messages, {"role": "assistant", "content": transcript.text}]
        request["continue_final_message"] = True
        request["add_generation_prompt"] = False
    elif path.endswith(COMPLETIONS_PATH):
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or request.get("echo"):
            return None
        request["prompt"] = prompt + transcript.text
    else:
        return None
    return orjson.dumps(request)


def _lower_max_tokens(request: dict[str, Any], produced: int) -> bool:
    """Lower the token limits by what was produced; False if nothing would be left."""
    for key in ("max_tokens", "max_completion_tokens"):
        limit = request.get(key)
        if limit is None:
            continue
        if type(limit) is not int:
            return False
        if limit - produced <= 0:
            return False
        request[key] = limit - produced
    return True


def splice(event: Event, transcript: Transcript, produced_before: int) -> bytes | None:
    """The bytes of a continuation's event as the client should see them; None to drop it.

    `produced_before` is the number of content chunks the client had before this continuation.
    """
    if event.kind is Kind.DONE:
        return event.raw
    data = event.data
    if not isinstance(data, dict):
        return event.raw if event.kind is Kind.CONTENT else None
    usage = data.get("usage")
    if event.kind is Kind.PRELUDE and not usage:
        return None  # the continuation's role chunk: the client has had one
    if transcript.id is not None:
        data["id"] = transcript.id
    if transcript.model is not None:
        data["model"] = transcript.model
    if transcript.created is not None:
        data["created"] = transcript.created
    if isinstance(usage, dict):
        _cover_whole_answer(usage, produced_before)
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _cover_whole_answer(usage: dict[str, Any], produced_before: int) -> None:
    completion = usage.get("completion_tokens")
    prompt = usage.get("prompt_tokens")
    if type(completion) is int:
        usage["completion_tokens"] = completion + produced_before
    if type(prompt) is int:
        usage["prompt_tokens"] = max(0, prompt - produced_before)
    if type(completion) is int and type(prompt) is int:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
