"""State one worker learned that the other workers of `--workers N` should know at once.

Shared: an ejection (by failed requests, with its remaining time and ejection count), a 429
cooldown (its remaining time) and an ejection ended early by a successful request. Drains are
already applied to every worker by the supervisor's admin API. Active-check state is not shared:
every worker checks for itself. A change adopted from another worker is never shared again, so
nothing echoes. Times travel as "seconds from now", so no clock needs to agree.
Pure: `now` is passed in; the I/O (long-poll, relay) is in gateway/workers/shared_state.py.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Final

from gateway.policy.outlier import State, Transition, UpstreamHealth

KEPT: Final = 256  # changes a worker keeps for the relay; it reads them within milliseconds


class Kind(StrEnum):
    """What kind of state is shared."""

    EJECTED = "ejected"
    COOLDOWN = "cooldown"
    UNEJECTED = "unejected"


@dataclass(frozen=True, slots=True)
class SharedChange:
    """One change as it travels between workers."""

    upstream: str
    kind: Kind
    for_s: float = 0.0
    ejection_count: int = 0
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        """As sent."""
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_json(cls, data: Any) -> SharedChange:
        """As received; ValueError for anything else."""
        try:
            return cls(
                upstream=str(data["upstream"]),
                kind=Kind(data["kind"]),
                for_s=max(0.0, float(data.get("for_s", 0.0))),
                ejection_count=max(0, int(data.get("ejection_count", 0))),
                seq=int(data.get("seq", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a shared change: {exc}") from None


def to_share(upstream: str, health: UpstreamHealth, change: Transition, now: float) -> SharedChange | None:
    """What a local state change tells the other workers, if anything."""
    if change.after is State.EJECTED and health.ejected_until is not None:
        return SharedChange(upstream, Kind.EJECTED, health.ejected_until - now, health.ejection_count)
    if change.after is State.COOLING_DOWN and health.cooldown_until is not None:
        return SharedChange(upstream, Kind.COOLDOWN, health.cooldown_until - now)
    if change.before is State.EJECTED and change.after is State.HEALTHY and health.ejected_until is None:
        return SharedChange(upstream, Kind.UNEJECTED)
    return None


class SharedLog:
    """The latest changes of one worker, numbered, for the supervisor to read after a number."""

    def __init__(self, epoch: str, kept: int = KEPT) -> None:
        self.epoch = epoch  # tells a replaced worker's numbering from its predecessor's
        self.seq = 0
        self._changes: deque[SharedChange] = deque(maxlen=kept)

    def add(self, change: SharedChange) -> SharedChange:
        """Number and keep `change`."""
        self.seq += 1
        numbered = SharedChange(change.upstream, change.kind, change.for_s, change.ejection_count, self.seq)
        self._changes.append(numbered)
        return numbered

    def since(self, epoch: str, after: int) -> list[SharedChange]:
        """Changes numbered above `after` (all kept ones when `epoch` is not this log's)."""
        if epoch != self.epoch:
            after = 0
        return [c for c in self._changes if c.seq > after]
