"""The pure stream modules: reading SSE as an answer, and building a continuation."""

from __future__ import annotations

import orjson
import pytest

from gateway.stream.continuation import Transcript, continuation_body, splice
from gateway.stream.events import MAX_EVENT_BYTES, EventScanner, Kind, classify


def chunk(delta: dict[str, object] | None = None, finish: str | None = None, **extra: object) -> bytes:
    choice: dict[str, object] = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    obj = {"id": "c1", "model": "m", "created": 7, "choices": [choice], **extra}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (chunk({"role": "assistant"}), Kind.PRELUDE),
        (chunk({"role": "assistant", "content": ""}), Kind.PRELUDE),
        (chunk({"content": "hi"}), Kind.CONTENT),
        (chunk({"reasoning_content": "hmm"}), Kind.CONTENT),
        (chunk({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}), Kind.CONTENT),
        (chunk({}, "stop"), Kind.FINISH),
        (b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n', Kind.CONTENT),
        (b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n', Kind.PRELUDE),
        (b": keep-alive\n\n", Kind.PRELUDE),
        (b"data: [DONE]\n\n", Kind.DONE),
        (b'data: {"error": {"message": "boom"}}\n\n', Kind.ERROR),
        (b"event: error\ndata: oops\n\n", Kind.ERROR),
        (b'data: {"choices": [\n\n', Kind.MALFORMED),
        (b"data: plain text\n\n", Kind.CONTENT),  # not OpenAI-shaped: the first data is output
        (b'data: {"type": "message_start"}\n\n', Kind.CONTENT),
    ],
)
def test_classify_tells_output_from_preamble_and_failures(raw: bytes, kind: Kind) -> None:
    assert classify(raw, openai=False).kind is kind


def test_once_openai_shaped_plain_data_is_malformed() -> None:
    assert classify(b"data: plain text\n\n", openai=True).kind is Kind.MALFORMED


def test_error_events_carry_the_upstreams_message() -> None:
    assert classify(b'data: {"error": {"message": "boom"}}\n\n', False).error == "boom"


def test_scanner_joins_events_split_across_reads_and_keeps_bytes() -> None:
    scanner = EventScanner()
    raw = chunk({"role": "assistant"}) + chunk({"content": "hi"})
    first = scanner.feed(raw[:30])
    assert first == []
    events = scanner.feed(raw[30:])
    assert [e.kind for e in events] == [Kind.PRELUDE, Kind.CONTENT]
    assert b"".join(e.raw for e in events) == raw
    assert scanner.openai and scanner.pending == b""


def test_scanner_reads_crlf_streams() -> None:
    events = EventScanner().feed(b'data: {"choices": [{"index": 0, "text": "a"}]}\r\n\r\n')
    assert [e.kind for e in events] == [Kind.CONTENT]


def test_scanner_gives_up_on_an_event_that_never_ends() -> None:
    events = EventScanner().feed(b"data: " + b"x" * (MAX_EVENT_BYTES + 1))
    assert [e.kind for e in events] == [Kind.MALFORMED]


def transcript_of(*raws: bytes) -> Transcript:
    t = Transcript()
    scanner = EventScanner()
    for raw in raws:
        for event in scanner.feed(raw):
            t.add(event)
    return t


CHAT = orjson.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True, "max_tokens": 10}
)


def test_continuation_of_a_chat_appends_the_answer_and_lowers_max_tokens() -> None:
    t = transcript_of(chunk({"role": "assistant", "content": "a"}), chunk({"content": " b"}))
    body = continuation_body("/v1/chat/completions", CHAT, t)
    assert body is not None
    sent = orjson.loads(body)
    assert sent["messages"][-1] == {"role": "assistant", "content": "a b"}
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["max_tokens"] == 8


@pytest.mark.parametrize(
    "raws",
    [
        (chunk({"tool_calls": [{"index": 0}]}),),  # tool calls cannot be prefilled
        (chunk({"content": "a"}), chunk({}, "stop")),  # already complete
        (),  # nothing produced yet
    ],
)
def test_some_answers_cannot_be_continued(raws: tuple[bytes, ...]) -> None:
    assert continuation_body("/v1/chat/completions", CHAT, transcript_of(*raws)) is None


def test_no_continuation_when_nothing_would_be_left_to_generate() -> None:
    t = transcript_of(*(chunk({"content": "x"}) for _ in range(10)))
    assert continuation_body("/v1/chat/completions", CHAT, t) is None


def test_spliced_events_carry_the_original_identity_and_whole_usage() -> None:
    t = transcript_of(chunk({"role": "assistant", "content": "a"}))
    scanner = EventScanner()
    other = {"id": "other", "model": "x", "created": 9}
    role, content, final = scanner.feed(
        chunk({"role": "assistant"}).replace(b'"id":"c1","model":"m","created":7', orjson.dumps(other)[1:-1])
        + b"data: "
        + orjson.dumps({**other, "choices": [{"index": 0, "delta": {"content": " b"}}]})
        + b"\n\ndata: "
        + orjson.dumps({"id": "other", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}})
        + b"\n\n"
    )
    assert splice(role, t, 1) is None
    spliced = orjson.loads((splice(content, t, 1) or b"")[6:])
    assert (spliced["id"], spliced["model"], spliced["created"]) == ("c1", "m", 7)
    usage = orjson.loads((splice(final, t, 1) or b"")[6:])["usage"]
    assert usage == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
