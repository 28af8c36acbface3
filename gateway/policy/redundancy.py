"""How much redundancy the fleet has left, and whether it is degraded.

The primary tier is the lowest `priority` that has any configured upstream; backups are every
upstream of a higher tier. "Routable" is the state machine's `healthy` (not ejected, unhealthy,
cooling down or drained); a full `max_inflight` does not count against it, since that passes.
  level     by the routable upstreams of the primary tier: 0 none, 1 single, 2 dual, 3+ multi.
  degraded  when any of these holds (each adds a reason):
            - the primary tier has no routable upstream (traffic is on backups, or nowhere);
            - fewer than half of all configured upstreams are routable;
            - backups are configured and none of them is routable (the next failure of the
              primary tier has nowhere to go). A fleet with no backup tier is not degraded for
              that: its `level` already says how thin it is.
Pure: the caller passes each upstream's tier and whether it is routable now.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("none", "single", "dual", "multi")


@dataclass(frozen=True, slots=True)
class Member:
    """What redundancy reads of one upstream."""

    name: str
    priority: int
    routable: bool


@dataclass(frozen=True, slots=True)
class Redundancy:
    """The fleet's redundancy at one moment."""

    level: str
    degraded: bool
    reasons: tuple[str, ...]
    primary_tier: int | None
    primary_routable: int
    primary_configured: int
    backup_routable: int
    backup_configured: int
    routable: int
    configured: int
    unroutable: tuple[str, ...] = field(default=())

    @property
    def level_value(self) -> int:
        """The level as the gauge shows it: 0 none, 1 single, 2 dual, 3 multi."""
        return LEVELS.index(self.level)

    def to_json(self) -> dict[str, Any]:
        """As `GET /admin/redundancy` answers."""
        return {
            "level": self.level,
            "level_value": self.level_value,
            "degraded": self.degraded,
            "reasons": list(self.reasons),
            "primary_tier": self.primary_tier,
            "primary": {"routable": self.primary_routable, "configured": self.primary_configured},
            "backup": {"routable": self.backup_routable, "configured": self.backup_configured},
            "routable": self.routable,
            "configured": self.configured,
            "unroutable": list(self.unroutable),
        }


def level_for(routable_in_primary: int) -> str:
    """`none`, `single`, `dual` or `multi` for this many routable primary upstreams."""
    return LEVELS[min(max(routable_in_primary, 0), 3)]


def assess(members: Iterable[Member]) -> Redundancy:
    """The redundancy of a fleet of `members` (see the module docstring for the rules)."""
    members = list(members)
    if not members:
        return Redundancy("none", True, ("no upstream is configured",), None, 0, 0, 0, 0, 0, 0)
    tier = min(m.priority for m in members)
    primary = [m for m in members if m.priority == tier]
    backup = [m for m in members if m.priority != tier]
    p_ok = sum(m.routable for m in primary)
    b_ok = sum(m.routable for m in backup)
    routable = p_ok + b_ok
    reasons: list[str] = []
    if p_ok == 0:
        where = "traffic goes to the backups" if b_ok else "no upstream is routable"
        reasons.append(f"the primary tier (priority {tier}) has no routable upstream; {where}")
    if 2 * routable < len(members):
        reasons.append(f"only {routable} of {len(members)} upstreams are routable (fewer than half)")
    if backup and b_ok == 0:
        reasons.append(f"no backup is routable (0 of {len(backup)} in the tiers above priority {tier})")
    return Redundancy(
        level=level_for(p_ok),
        degraded=bool(reasons),
        reasons=tuple(reasons),
        primary_tier=tier,
        primary_routable=p_ok,
        primary_configured=len(primary),
        backup_routable=b_ok,
        backup_configured=len(backup),
        routable=routable,
        configured=len(members),
        unroutable=tuple(m.name for m in members if not m.routable),
    )


def worst(views: Sequence[dict[str, Any]]) -> tuple[str, bool, list[str]]:
    """The fleet-wide level, degraded flag and reasons from several processes' views.

    The lowest level wins and any degraded view makes the whole degraded: traffic is spread over
    the processes, so the weakest one is what some clients see. Reasons are kept once each, in
    the order first seen.
    """
    if not views:
        return "none", True, ["no process answered"]
    known = [str(v.get("level")) for v in views]
    level = min(known, key=lambda s: LEVELS.index(s) if s in LEVELS else 0)
    level = level if level in LEVELS else "none"
    degraded = any(bool(v.get("degraded", True)) for v in views)
    reasons: list[str] = []
    for v in views:
        for r in v.get("reasons", []):
            if r not in reasons:
                reasons.append(str(r))
    return level, degraded, reasons
