"""Redundancy level and degraded status from the pool's state (pure)."""

from __future__ import annotations

from gateway.policy.redundancy import Member, assess, level_for, worst


def _fleet(*spec: tuple[int, bool]) -> list[Member]:
    return [Member(f"u{i}", prio, ok) for i, (prio, ok) in enumerate(spec)]


def test_level_counts_routable_primary_upstreams() -> None:
    assert [level_for(n) for n in (0, 1, 2, 3, 7)] == ["none", "single", "dual", "multi", "multi"]
    r = assess(_fleet((0, True), (0, True), (0, False), (1, True)))
    assert (r.level, r.level_value, r.primary_routable, r.primary_configured) == ("dual", 2, 2, 3)


def test_healthy_fleet_with_backup_is_not_degraded() -> None:
    r = assess(_fleet((0, True), (0, True), (1, True)))
    assert not r.degraded and r.reasons == ()
    assert r.to_json()["backup"] == {"routable": 1, "configured": 1}


def test_single_tier_fleet_is_not_degraded_for_having_no_backup() -> None:
    r = assess(_fleet((0, True)))
    assert (r.level, r.degraded) == ("single", False)


def test_primary_tier_is_lowest_configured_priority() -> None:
    r = assess(_fleet((2, True), (5, True)))
    assert (r.primary_tier, r.level, r.degraded) == (2, "single", False)


def test_primary_without_routable_upstream_is_degraded() -> None:
    r = assess(_fleet((0, False), (0, True), (1, True), (1, True)))
    assert not r.degraded  # 3 of 4 routable, the primary still has one
    r = assess(_fleet((0, False), (0, False), (1, True), (1, True)))
    assert r.degraded and r.level == "none" and r.level_value == 0
    assert r.reasons == (
        "the primary tier (priority 0) has no routable upstream; traffic goes to the backups",
    )


def test_fewer_than_half_routable_is_degraded() -> None:
    r = assess(_fleet((0, True), (0, False), (0, False)))
    assert r.degraded
    assert r.reasons == ("only 1 of 3 upstreams are routable (fewer than half)",)
    assert r.unroutable == ("u1", "u2")
    # exactly half is not "fewer than half"
    assert not assess(_fleet((0, True), (0, False))).degraded


def test_no_routable_backup_is_degraded() -> None:
    r = assess(_fleet((0, True), (0, True), (0, True), (1, False)))
    assert r.degraded and r.level == "multi"
    assert r.reasons == ("no backup is routable (0 of 1 in the tiers above priority 0)",)


def test_nothing_routable_gives_every_reason() -> None:
    r = assess(_fleet((0, False), (1, False)))
    assert r.degraded and r.level == "none"
    assert len(r.reasons) == 3
    assert "no upstream is routable" in r.reasons[0]


def test_worst_takes_lowest_level_and_any_degraded() -> None:
    a = assess(_fleet((0, True), (0, True), (1, True))).to_json()
    b = assess(_fleet((0, True), (0, False), (1, False))).to_json()
    level, degraded, reasons = worst([a, b])
    assert (level, degraded) == ("single", True)
    assert reasons == list(b["reasons"])
    assert worst([a, a]) == ("dual", False, [])
    assert worst([]) == ("none", True, ["no process answered"])
