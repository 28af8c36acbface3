"""Verdicts on active health check answers, and the once-per-change misconfiguration report (pure)."""

from __future__ import annotations

from gateway.policy.checks import MisconfigurationLatch, Verdict, judge

DEFAULT = frozenset(range(200, 300))
URL = "http://10.0.0.5:8000/health"


def test_expected_statuses_pass_and_others_fail() -> None:
    assert judge(200, DEFAULT, URL) == Verdict(True)
    assert judge(204, DEFAULT, URL).ok
    assert judge(503, DEFAULT, URL) == Verdict(False)
    assert judge(None, DEFAULT, URL) == Verdict(False)
    assert not judge(301, DEFAULT, URL).ok
    assert judge(503, {503}, URL).ok


def test_401_403_404_are_a_misconfiguration_naming_url_and_status() -> None:
    for status in (401, 403, 404):
        verdict = judge(status, DEFAULT, URL)
        assert not verdict.ok
        assert verdict.misconfiguration is not None
        assert f"GET {URL} answered {status}" in verdict.misconfiguration
        assert "health path is wrong for this server" in verdict.misconfiguration
    # An operator who expects 401 (a path behind auth) is not told it is wrong.
    assert judge(401, DEFAULT | {401}, URL) == Verdict(True)


def test_latch_reports_once_until_the_answer_changes() -> None:
    latch = MisconfigurationLatch()
    not_found = judge(404, DEFAULT, URL)
    forbidden = judge(403, DEFAULT, URL)
    reported = [latch.update(v) for v in (not_found, not_found, not_found, forbidden, forbidden)]
    assert [r is not None for r in reported] == [True, False, False, True, False]
    assert latch.current == forbidden.misconfiguration
    assert latch.update(judge(200, DEFAULT, URL)) is None and latch.current is None
    assert latch.update(not_found) is not None  # it came back: said again
