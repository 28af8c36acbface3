"""The last-minute figures of the status page, on plain values: no loop, no sockets, no clock."""

from __future__ import annotations

import pytest

from gateway.policy.recent import (
    HistogramCounts,
    RecentWindow,
    Snapshot,
    UpstreamCounters,
    mean,
    quantile,
    summarize,
)

BOUNDS = (0.1, 0.5, 1.0)


def hist(cumulative: tuple[float, ...], total_sum: float, count: float) -> HistogramCounts:
    return HistogramCounts(BOUNDS, cumulative, total_sum, count)


def snap(t: float, successes: float, errors: float = 0.0, ttft: HistogramCounts | None = None) -> Snapshot:
    counters = UpstreamCounters(
        ttft or HistogramCounts(),
        HistogramCounts(),
        {"success": successes, "http_5xx": errors},
    )
    return Snapshot(t, {"a": counters})


def test_quantile_interpolates_within_the_bucket() -> None:
    # 10 observations: 2 up to 0.1 s, 8 more up to 0.5 s.
    h = hist((2, 10, 10), 3.0, 10)
    assert quantile(0.1, h) == pytest.approx(0.05)
    assert quantile(0.5, h) == pytest.approx(0.1 + 0.4 * 3 / 8)
    assert quantile(1.0, h) == pytest.approx(0.5)


def test_quantile_above_the_last_bound_is_that_bound() -> None:
    h = hist((0, 0, 1), 10.0, 4)  # three observations in +Inf
    assert quantile(0.95, h) == 1.0


def test_quantile_and_mean_of_nothing_are_none() -> None:
    assert quantile(0.5, hist((0, 0, 0), 0.0, 0)) is None
    assert mean(hist((0, 0, 0), 0.0, 0)) is None
    assert summarize(HistogramCounts()) == {"count": 0.0, "mean_s": None, "p50_s": None, "p95_s": None}


def test_histogram_minus_is_what_was_observed_since() -> None:
    earlier = hist((1, 2, 2), 0.6, 2)
    later = hist((1, 5, 6), 2.6, 6)
    since = later.minus(earlier)
    assert (since.cumulative, since.count) == ((0, 3, 4), 4)
    assert since.sum == pytest.approx(2.0)
    assert mean(since) == pytest.approx(0.5)


def test_window_without_baseline_reports_nothing() -> None:
    w = RecentWindow(60.0)
    now = snap(100.0, 5)
    w.record(now)
    recent = w.recent(now)
    assert recent.covered_s == 0.0
    assert recent.upstreams["a"].outcomes == {"success": 0.0, "http_5xx": 0.0}


def test_window_measures_from_the_newest_snapshot_a_window_old() -> None:
    w = RecentWindow(60.0, min_spacing_s=1.0)
    for t, ok, bad in [(0.0, 0, 0), (30.0, 10, 1), (45.0, 20, 2), (70.0, 30, 5)]:
        w.record(snap(t, ok, bad))
    recent = w.recent(snap(100.0, 50, 6))
    # 100 - 60 = 40: the snapshot at 30 s is the newest at or before it.
    assert recent.covered_s == 70.0
    assert recent.upstreams["a"].outcomes == {"success": 40.0, "http_5xx": 5.0}


def test_window_while_filling_uses_the_oldest_snapshot() -> None:
    w = RecentWindow(60.0)
    w.record(snap(10.0, 3, ttft=hist((1, 1, 1), 0.05, 1)))
    recent = w.recent(snap(25.0, 7, ttft=hist((1, 3, 3), 0.65, 3)))
    assert recent.covered_s == 15.0
    assert recent.upstreams["a"].outcomes["success"] == 4.0
    assert mean(recent.upstreams["a"].ttft) == pytest.approx(0.3)


def test_window_keeps_snapshots_spaced_and_bounded() -> None:
    w = RecentWindow(10.0, min_spacing_s=1.0)
    for i in range(1000):
        w.record(snap(i * 0.25, i))
    # 250 s of snapshots four times a second: one a second over the last 10 s, plus the baseline.
    assert len(w) <= 12
    base = w.baseline(1000 * 0.25)
    assert base is not None and base.time <= 250.0 - 10.0


def test_window_starts_over_when_time_goes_back() -> None:
    w = RecentWindow(60.0)
    w.record(snap(500.0, 100))
    w.record(snap(1.0, 2))
    assert len(w) == 1
    assert w.recent(snap(3.0, 4)).upstreams["a"].outcomes["success"] == 2.0


def test_window_new_upstream_counts_from_zero() -> None:
    w = RecentWindow(60.0)
    w.record(Snapshot(0.0, {}))
    recent = w.recent(snap(5.0, 3))
    assert recent.upstreams["a"].outcomes["success"] == 3.0


def test_window_rejects_a_non_positive_window() -> None:
    with pytest.raises(ValueError, match="positive"):
        RecentWindow(0.0)
