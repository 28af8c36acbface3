"""What one active health check's answer means.

A check passes when the status is one of `health.expected_statuses` (200-299 by default).
A failing 401, 403 or 404 is not a sick server but a wrong health path (or a path that needs
credentials): the gateway says so once per upstream, until the status changes, so a
misconfiguration is not mistaken for an outage. Statuses the operator listed as expected are
never called a misconfiguration.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

MISCONFIGURED_STATUSES: Final = frozenset({401, 403, 404})
HINT: Final = (
    "the health path is wrong for this server: vLLM, TGI, SGLang and llama.cpp serve /health, "
    "LiteLLM /health/liveliness; for a hosted API set health_path: null"
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check's result: passed, and the misconfiguration it reveals (None if none)."""

    ok: bool
    misconfiguration: str | None = None


def judge(status: int | None, expected: Collection[int], url: str) -> Verdict:
    """The verdict on an answer with `status` (None: no answer) from `url`."""
    if status is None:
        return Verdict(False)
    if status in expected:
        return Verdict(True)
    if status in MISCONFIGURED_STATUSES:
        return Verdict(False, f"GET {url} answered {status}: {HINT}")
    return Verdict(False)


class MisconfigurationLatch:
    """Remembers the last misconfiguration reported for one upstream, so it is logged once."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: str | None = None

    def update(self, verdict: Verdict) -> str | None:
        """The message to log now: a new misconfiguration, or None (the same one, or none)."""
        previous, self.current = self.current, verdict.misconfiguration
        if verdict.misconfiguration is not None and verdict.misconfiguration != previous:
            return verdict.misconfiguration
        return None
