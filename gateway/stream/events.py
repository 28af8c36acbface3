"""Server-Sent Events read as an inference answer: where the output starts, ends, or went wrong.

The proxy holds a stream's response until its first *content* event (the commit point), so it
must tell output from preamble: an OpenAI-style chunk carries output when a choice has non-empty
`delta.content`, `delta.reasoning_content`, `delta.tool_calls` or `text`; a role-only chunk, an
empty delta, a usage-only chunk and comments do not. A stream that is not OpenAI-shaped (its data
is not a JSON object with `choices`) has output in its first `data:` event. An `event: error`, or
data holding an `error` object, is a failure even with HTTP 200; data that looks like JSON but is
not, or any non-JSON data once the stream has proved OpenAI-shaped, is malformed.

Events are split at blank lines. Each event keeps its raw bytes, so what the client receives is
what the upstream sent (CRLF line ends become LF); only whole events are passed on, so a
malformed one can be withheld. Pure: bytes in, events out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

# An event longer than this without its blank line is not an SSE stream we can follow.
MAX_EVENT_BYTES = 1024 * 1024


class Kind(Enum):
    """What one event means for the answer."""

    PRELUDE = "prelude"  # no output: a comment, a role-only or empty chunk, usage alone
    CONTENT = "content"  # carries output
    FINISH = "finish"  # a choice finished without new output
    DONE = "done"  # data: [DONE]
    ERROR = "error"  # an error reported in the stream
    MALFORMED = "malformed"


@dataclass(slots=True)
class Event:
    """One event: its meaning, its bytes as received, and what an answer needs from it."""

    kind: Kind
    raw: bytes
    data: Any = None  # the parsed JSON data, if it was JSON
    text: str = ""  # output text of choice 0 (`delta.content` or `text`)
    finished: bool = False  # some choice has a finish_reason
    tool_calls: bool = False  # some choice streams tool calls
    error: str = ""  # for ERROR and MALFORMED: what went wrong


def _json_error_message(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        message = err.get("message")
        return str(message) if message else orjson.dumps(err).decode()
    return str(err)


def _fields(raw: bytes) -> tuple[bytes, list[bytes]]:
    """The event type and data lines of one event."""
    event_type = b""
    data_lines: list[bytes] = []
    for line in raw.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data_lines.append(value)
        elif name == b"event":
            event_type = value
    return event_type, data_lines


def _error_event(raw: bytes, data: bytes) -> Event:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        return Event(Kind.ERROR, raw, parsed, error=_json_error_message(parsed))
    return Event(Kind.ERROR, raw, parsed, error=data.decode("utf-8", "replace") or "error event")


def classify(raw: bytes, openai: bool) -> Event:
    """The meaning of one complete event (`raw` includes its blank line).

    `openai` says whether the stream already showed OpenAI-shaped chunks; then non-JSON data is
    malformed instead of being output of some other format.
    """
    event_type, data_lines = _fields(raw)
    data = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
    if event_type == b"error":
        return _error_event(raw, data)
    if not data_lines:
        return Event(Kind.PRELUDE, raw)
    if data == b"[DONE]":
        return Event(Kind.DONE, raw)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if openai or data[:1] in (b"{", b"["):
            return Event(Kind.MALFORMED, raw, error=f"malformed event data ({exc})")
        return Event(Kind.CONTENT, raw)  # a stream of plain data events: any data is output
    if not isinstance(obj, dict):
        if openai:
            return Event(Kind.MALFORMED, raw, error="event data is not a JSON object")
        return Event(Kind.CONTENT, raw, obj)
    choices = obj.get("choices")
    if "error" in obj and not choices:
        return Event(Kind.ERROR, raw, obj, error=_json_error_message(obj))
    if not isinstance(choices, list):
        # Not OpenAI-shaped: the first data event is output. In an OpenAI stream (a usage chunk
        # some servers send without `choices`), it is not.
        return Event(Kind.PRELUDE if openai else Kind.CONTENT, raw, obj)
    return _classify_chunk(raw, obj, choices)


def _classify_chunk(raw: bytes, obj: dict[str, Any], choices: list[Any]) -> Event:
    event = Event(Kind.PRELUDE, raw, obj)
    output = False
    for choice in choices:
        if not isinstance(choice, dict):
            return Event(Kind.MALFORMED, raw, obj, error="a choice is not a JSON object")
        if choice.get("finish_reason") is not None:
            event.finished = True
        text, other_output, tool_calls = _choice_output(choice)
        event.tool_calls = event.tool_calls or tool_calls
        output = output or other_output or bool(text)
        if text and choice.get("index", 0) == 0:
            event.text += text
    if output:
        event.kind = Kind.CONTENT
    elif event.finished:
        event.kind = Kind.FINISH
    return event


def _choice_output(choice: dict[str, Any]) -> tuple[str, bool, bool]:
    """A choice's output text, whether it has output other than text, and whether tool calls."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        tool_calls = bool(delta.get("tool_calls"))
        other = tool_calls or bool(delta.get("reasoning_content") or delta.get("reasoning"))
        return (content if isinstance(content, str) else ""), other, tool_calls
    text = choice.get("text")
    return (text if isinstance(text, str) else ""), False, False


class EventScanner:
    """Splits a byte stream into complete events, keeping any incomplete tail for the next feed."""

    __slots__ = ("_pending", "openai")

    def __init__(self) -> None:
        self._pending = b""
        self.openai = False  # the stream has shown an OpenAI-shaped chunk

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not ended yet."""
        return self._pending

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by `data`. An overlong unterminated event comes back MALFORMED."""
        buf = self._pending + data if self._pending else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events: list[Event] = []
        start = 0
        while (end := buf.find(b"\n\n", start)) != -1:
            raw = buf[start : end + 2]
            start = end + 2
            if not raw.strip(b"\n"):
                events.append(Event(Kind.PRELUDE, raw))  # stray blank lines
                continue
            event = classify(raw, self.openai)
            if not self.openai and isinstance(event.data, dict):
                self.openai = isinstance(event.data.get("choices"), list)
            events.append(event)
        self._pending = buf[start:] if start < len(buf) else b""
        if len(self._pending) > MAX_EVENT_BYTES:
            tail, self._pending = self._pending, b""
            events.append(Event(Kind.MALFORMED, tail, error=f"an event passed {MAX_EVENT_BYTES} bytes"))
        return events
