"""The mock inference server's fault catalogue, chosen per request by the `X-Mock-Fault` header.

The header holds comma-separated faults, each `name[=arg][@mock]`; with `@mock` the fault applies
only on the mock of that `--name`, so one request through the gateway can break the primary and
leave the fallback whole. Faults ending in `-once` apply to the first matching request a mock
sees (per fault text). The catalogue:

  status=N            answer HTTP N (an OpenAI-style error body)
  status-once=N       the same, once
  rate-limit          429 without Retry-After
  rate-limit-once=S   429 with `Retry-After: S`, once
  reset               reset the connection before any response
  no-response         read the request and never answer
  first-token-delay=S stream: headers and the role chunk at once, the first token after S seconds
  cut=K               stream: reset the connection after K content chunks
  stall=K[:S]         stream: after K content chunks stall S seconds (forever without S)
  malformed=K         stream: a malformed chunk after K content chunks, then the rest
  error-event=K       stream: an error event after K content chunks, then the end
  empty               stream: the role chunk, then [DONE], with no content
  no-done             stream: the finished chunk but no `data: [DONE]`
  context-length      400 context_length_exceeded (OpenAI's shape, vLLM's message)
  content-filter      400 content_filter (Azure OpenAI's shape)
  no-prefill          400 for a request that asks to continue an assistant message
"""

from __future__ import annotations

from dataclasses import dataclass, field

HEADER = "X-Mock-Fault"


@dataclass(slots=True)
class Faults:
    """The faults one request asked of this mock."""

    status: int | None = None
    retry_after_s: float | None = None  # with status 429
    reset: bool = False
    no_response: bool = False
    error_kind: str | None = None  # context-length, content-filter, no-prefill
    first_token_delay_s: float = 0.0
    cut_after: int | None = None
    stall_after: int | None = None
    stall_s: float | None = None  # None: forever
    malformed_after: int | None = None
    error_event_after: int | None = None
    empty: bool = False
    no_done: bool = False
    unknown: list[str] = field(default_factory=list)


def _count(arg: str) -> int:
    value = int(arg)
    if value < 0:
        raise ValueError("a count must be >= 0")
    return value


def _seconds(arg: str) -> float:
    value = float(arg)
    if not value >= 0:
        raise ValueError("seconds must be >= 0")
    return value


def parse(header: str, mock_name: str, seen_once: set[str]) -> Faults:
    """The faults in `header` addressed to the mock `mock_name`; `-once` ones are noted in `seen_once`."""
    faults = Faults()
    for token in header.split(","):
        token = token.strip()
        if not token:
            continue
        spec, _, target = token.partition("@")
        if target and target != mock_name:
            continue
        name, _, arg = spec.partition("=")
        if name.endswith("-once"):
            if token in seen_once:
                continue
            seen_once.add(token)
            name = name[: -len("-once")]
        try:
            _apply(faults, name, arg)
        except ValueError:
            faults.unknown.append(token)
    return faults


def _apply(faults: Faults, name: str, arg: str) -> None:  # noqa: C901 - one branch per fault
    if name == "status":
        faults.status = int(arg)
    elif name == "rate-limit":
        faults.status = 429
        faults.retry_after_s = _seconds(arg) if arg else None
    elif name == "reset":
        faults.reset = True
    elif name == "no-response":
        faults.no_response = True
    elif name in ("context-length", "content-filter", "no-prefill"):
        faults.error_kind = name
    elif name == "first-token-delay":
        faults.first_token_delay_s = _seconds(arg)
    elif name == "cut":
        faults.cut_after = _count(arg)
    elif name == "stall":
        after, _, seconds = arg.partition(":")
        faults.stall_after = _count(after)
        faults.stall_s = _seconds(seconds) if seconds else None
    elif name == "malformed":
        faults.malformed_after = _count(arg)
    elif name == "error-event":
        faults.error_event_after = _count(arg)
    elif name == "empty":
        faults.empty = True
    elif name == "no-done":
        faults.no_done = True
    else:
        raise ValueError(name)
