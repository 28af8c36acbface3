"""Peak-EWMA latency estimate (as in Finagle and linkerd2-proxy).

A sample above the estimate replaces it at once (peak), so an upstream that turns slow is avoided
immediately; a lower sample pulls it down with weight 1 - exp(-elapsed / decay_s), so a recovered
upstream earns traffic back over about decay_s seconds, however many requests it serves.
While no sample arrives the estimate also decays toward zero (`decay`, applied when the balancer
reads it), as in tower's PeakEwma: an idle upstream gets cheaper until it wins a request again.
It never decays below the age of a request still waiting for its answer there, so an upstream
that accepts requests and never answers cannot become the cheapest by being silent.
After `reset` the estimate is only a prior: the first real sample replaces it (`measured`).
"""

from __future__ import annotations

import math


class PeakEwma:
    """A decaying latency estimate in seconds; `now` is monotonic seconds, passed in."""

    __slots__ = ("decay_s", "measured", "stamp", "value")

    def __init__(self, decay_s: float, initial_s: float, now: float) -> None:
        self.decay_s = decay_s
        self.value = initial_s
        self.stamp = now
        self.measured = False

    def observe(self, sample_s: float, now: float) -> None:
        """Fold one latency sample into the estimate."""
        if not self.measured or sample_s >= self.value:
            self.measured = True
            self.value = sample_s
        else:
            elapsed = now - self.stamp
            weight = math.exp(-elapsed / self.decay_s) if elapsed > 0 else 1.0
            self.value = self.value * weight + sample_s * (1.0 - weight)
        self.stamp = now

    def decay(self, now: float, floor_s: float = 0.0) -> float:
        """Let the estimate decay toward zero for the time since the last update, never below
        `floor_s` (the age of the oldest request still waiting there); returns it."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.value *= math.exp(-elapsed / self.decay_s)
            self.stamp = now
        if self.value < floor_s:
            self.value = floor_s
        return self.value

    def observe_at_least(self, lower_bound_s: float, now: float) -> None:
        """A request was abandoned after `lower_bound_s`: its latency was at least that."""
        if lower_bound_s > self.value:
            self.observe(lower_bound_s, now)

    def reset(self, value_s: float, now: float) -> None:
        """Start again from a prior (new or recovered upstream) until the next sample."""
        self.value = value_s
        self.stamp = now
        self.measured = False
