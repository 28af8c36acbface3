"""Peak-EWMA latency estimate (as in Finagle and linkerd2-proxy).

A sample above the estimate replaces it at once (peak), so an upstream that turns slow is avoided
immediately; a lower sample pulls it down with weight 1 - exp(-elapsed / decay_s), so a recovered
upstream earns traffic back over about decay_s seconds, however many requests it serves.
"""

from __future__ import annotations

import math


class PeakEwma:
    """A decaying latency estimate in seconds; `now` is monotonic seconds, passed in."""

    __slots__ = ("decay_s", "stamp", "value")

    def __init__(self, decay_s: float, initial_s: float, now: float) -> None:
        self.decay_s = decay_s
        self.value = initial_s
        self.stamp = now

    def observe(self, sample_s: float, now: float) -> None:
        """Fold one latency sample into the estimate."""
        if sample_s >= self.value:
            self.value = sample_s
        else:
            elapsed = now - self.stamp
            weight = math.exp(-elapsed / self.decay_s) if elapsed > 0 else 1.0
            self.value = self.value * weight + sample_s * (1.0 - weight)
        self.stamp = now

    def reset(self, value_s: float, now: float) -> None:
        """Start again from a neutral estimate (new or recovered upstream)."""
        self.value = value_s
        self.stamp = now
