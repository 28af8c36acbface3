"""Figures of the last minute (TTFT, TTFB, outcomes) per upstream, from cumulative counters.

Model: the metrics only ever grow within a process, so what happened during the last `window_s`
is the difference between a snapshot taken now and the newest kept snapshot that is at least
`window_s` old (while the window is still filling, the oldest kept one, and `covered_s` says how
much time the figures cover). Snapshots are kept at least `min_spacing_s` apart, so the number
kept is bounded (about window_s / min_spacing_s + 1) however often the status is read. Quantiles
are interpolated within histogram buckets as Prometheus' histogram_quantile does.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """A histogram's cumulative state: counts at or below each finite bound, sum and count."""

    bounds: tuple[float, ...] = ()
    cumulative: tuple[float, ...] = ()
    sum: float = 0.0
    count: float = 0.0

    def minus(self, earlier: HistogramCounts) -> HistogramCounts:
        """What was observed since `earlier` (a histogram with other bounds counts as empty)."""
        if earlier.bounds != self.bounds:
            earlier = HistogramCounts(self.bounds, (0.0,) * len(self.bounds))
        return HistogramCounts(
            self.bounds,
            tuple(max(0.0, a - b) for a, b in zip(self.cumulative, earlier.cumulative, strict=True)),
            max(0.0, self.sum - earlier.sum),
            max(0.0, self.count - earlier.count),
        )


@dataclass(frozen=True, slots=True)
class UpstreamCounters:
    """The cumulative metrics of one upstream at one moment."""

    ttft: HistogramCounts = HistogramCounts()
    ttfb: HistogramCounts = HistogramCounts()
    outcomes: Mapping[str, float] = field(default_factory=dict)

    def minus(self, earlier: UpstreamCounters) -> UpstreamCounters:
        """What happened to this upstream since `earlier`."""
        outcomes = {k: max(0.0, v - earlier.outcomes.get(k, 0.0)) for k, v in self.outcomes.items()}
        return UpstreamCounters(self.ttft.minus(earlier.ttft), self.ttfb.minus(earlier.ttfb), outcomes)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every upstream's counters at monotonic time `time`."""

    time: float
    upstreams: Mapping[str, UpstreamCounters]


@dataclass(frozen=True, slots=True)
class Recent:
    """What happened during the last `covered_s` seconds, per upstream."""

    covered_s: float
    upstreams: Mapping[str, UpstreamCounters]


def quantile(q: float, h: HistogramCounts) -> float | None:
    """The q-quantile (0-1) of `h`, interpolated in its bucket; None when nothing was observed.

    Values above the highest finite bound are reported as that bound (the +Inf bucket has no
    upper edge to interpolate to), as Prometheus does.
    """
    if h.count <= 0 or not h.bounds:
        return None
    rank = q * h.count
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(h.bounds, h.cumulative, strict=True):
        if count >= rank and count > lower_count:
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return h.bounds[-1]


def mean(h: HistogramCounts) -> float | None:
    """Mean of the observations in `h`; None when there were none."""
    return h.sum / h.count if h.count > 0 else None


class RecentWindow:
    """Keeps spaced snapshots of the last `window_s` and subtracts them; not thread-safe."""

    def __init__(self, window_s: float = 60.0, min_spacing_s: float = 1.0) -> None:
        if not (window_s > 0 and min_spacing_s > 0 and math.isfinite(window_s)):
            raise ValueError("window_s and min_spacing_s must be positive")
        self.window_s = window_s
        self.min_spacing_s = min_spacing_s
        self._kept: deque[Snapshot] = deque()

    def __len__(self) -> int:
        return len(self._kept)

    def record(self, snapshot: Snapshot) -> None:
        """Keep `snapshot` unless the last kept one is under `min_spacing_s` older; drop the stale."""
        if self._kept and snapshot.time < self._kept[-1].time:
            self._kept.clear()  # time went back (a new clock): the old snapshots mean nothing now
        if not self._kept or snapshot.time - self._kept[-1].time >= self.min_spacing_s:
            self._kept.append(snapshot)
        horizon = snapshot.time - self.window_s
        # The newest snapshot at or before the horizon is the baseline; everything older goes.
        while len(self._kept) >= 2 and self._kept[1].time <= horizon:
            self._kept.popleft()

    def baseline(self, now: float) -> Snapshot | None:
        """The snapshot `now`'s figures are measured from, or None when none is older than now."""
        horizon = now - self.window_s
        chosen: Snapshot | None = None
        for s in self._kept:
            if s.time <= horizon or chosen is None:
                chosen = s
            else:
                break
        return chosen if chosen is not None and chosen.time < now else None

    def recent(self, current: Snapshot) -> Recent:
        """What happened between the baseline and `current` (all zero when there is no baseline)."""
        base = self.baseline(current.time)
        if base is None:
            empty = {name: c.minus(c) for name, c in current.upstreams.items()}
            return Recent(0.0, empty)
        before = base.upstreams
        upstreams = {n: c.minus(before.get(n, UpstreamCounters())) for n, c in current.upstreams.items()}
        return Recent(current.time - base.time, upstreams)


def summarize(h: HistogramCounts, quantiles: Sequence[float] = (0.5, 0.95)) -> dict[str, float | None]:
    """Count, mean and quantiles of `h` for JSON (seconds rounded to microseconds)."""
    out: dict[str, float | None] = {"count": h.count, "mean_s": _round(mean(h))}
    for q in quantiles:
        out[f"p{round(q * 100)}_s"] = _round(quantile(q, h))
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
