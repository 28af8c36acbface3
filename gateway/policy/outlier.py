"""Health state of one upstream: passive ejection, rate-limit cooldown, active checks, drain.

Four independent conditions make an upstream unroutable, and its state is the most severe of them:
  drained      an operator took it out (admin API); only `enable` brings it back.
  unhealthy    `unhealthy_threshold` active checks failed in a row; `healthy_threshold` passing
               checks in a row bring it back.
  ejected      `consecutive_failures` failed attempts in a row; lasts base_ejection_s times the
               ejection count (which decays while the upstream behaves), capped at max_ejection_s
               (Envoy's outlier detection). A successful attempt ends it early; a passing check
               does too only with `uneject_on_health_check`, since inference servers often
               answer their health path while inference fails.
  cooling_down it answered 429; lasts its Retry-After (default and cap from settings).
Time (`now`, monotonic seconds) is passed in. Every method that may change the state returns the
Transition it caused, or None, so the caller can log and count each change exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.config import HealthSettings, OutlierSettings
from gateway.policy.classify import Outcome, is_failure


class State(StrEnum):
    """Visible state of an upstream, most severe condition first."""

    HEALTHY = "healthy"
    COOLING_DOWN = "cooling_down"
    EJECTED = "ejected"
    UNHEALTHY = "unhealthy"
    DRAINED = "drained"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of visible state, with the reason that caused it."""

    before: State
    after: State
    reason: str


class UpstreamHealth:
    """The health state machine of one upstream; pure, not safe across threads."""

    __slots__ = (
        "_health",
        "_outlier",
        "_state",
        "check_failures",
        "check_successes",
        "consecutive_failures",
        "cooldown_until",
        "drained",
        "ejected_until",
        "ejection_count",
        "last_ejection_end",
        "probe_healthy",
    )

    def __init__(self, outlier: OutlierSettings, health: HealthSettings) -> None:
        self._outlier = outlier
        self._health = health
        self.consecutive_failures = 0
        self.ejection_count = 0
        self.ejected_until: float | None = None
        self.last_ejection_end = 0.0
        self.cooldown_until: float | None = None
        # Optimistic start: a sidecar that refuses traffic until the first check passes turns a
        # slow health endpoint into an outage. Failing checks remove it within a few intervals.
        self.probe_healthy = True
        self.check_failures = 0
        self.check_successes = 0
        self.drained = False
        self._state = State.HEALTHY

    def state(self, now: float) -> State:
        """The most severe condition in force at `now`."""
        if self.drained:
            return State.DRAINED
        if not self.probe_healthy:
            return State.UNHEALTHY
        if self.ejected_until is not None and now < self.ejected_until:
            return State.EJECTED
        if self.cooldown_until is not None and now < self.cooldown_until:
            return State.COOLING_DOWN
        return State.HEALTHY

    def routable(self, now: float) -> bool:
        """True when normal selection may send traffic here."""
        return self.state(now) is State.HEALTHY

    def available_at(self, now: float) -> float:
        """When this upstream becomes routable again by itself (now if routable; inf if never)."""
        state = self.state(now)
        if state is State.HEALTHY:
            return now
        if state in (State.DRAINED, State.UNHEALTHY):
            return float("inf")
        ends = [t for t in (self.ejected_until, self.cooldown_until) if t is not None and t > now]
        return max(ends) if ends else now

    def record(self, outcome: Outcome, now: float, retry_after_s: float | None = None) -> Transition | None:
        """Account one attempt's outcome."""
        if outcome is Outcome.RATE_LIMITED:
            wanted = self._outlier.rate_limit_cooldown_s if retry_after_s is None else retry_after_s
            wait = min(max(wanted, 0.0), self._outlier.max_rate_limit_cooldown_s)
            self.cooldown_until = max(self.cooldown_until or 0.0, now + wait)
            return self._settle(now, "rate limited (429)")
        if not is_failure(outcome):
            self.consecutive_failures = 0
            reason = "request succeeded"
            if self.ejected_until is not None and now < self.ejected_until:
                self._end_ejection(now)
                reason = "request succeeded while ejected"
            if outcome is Outcome.SUCCESS:
                self.cooldown_until = None
            return self._settle(now, reason)
        if self.ejected_until is not None and now < self.ejected_until:
            # Already out (panic-mode traffic): failures now must not pre-load the next ejection.
            return self._settle(now, f"failure while ejected ({outcome})")
        self.consecutive_failures += 1
        if self.consecutive_failures >= self._outlier.consecutive_failures:
            self._eject(now)
            return self._settle(now, f"{self._outlier.consecutive_failures} consecutive failures ({outcome})")
        return self._settle(now, f"failure ({outcome})")

    def record_check(self, ok: bool, now: float) -> Transition | None:
        """Account one active health check."""
        if ok:
            self.check_failures = 0
            self.check_successes += 1
            reason = "health check passed"
            if not self.probe_healthy and self.check_successes >= self._health.healthy_threshold:
                self.probe_healthy = True
                reason = f"{self.check_successes} health checks passed"
            ejected = self.ejected_until is not None and now < self.ejected_until
            if ejected and self._outlier.uneject_on_health_check:
                self._end_ejection(now)
                reason = "health check passed while ejected"
            return self._settle(now, reason)
        self.check_successes = 0
        self.check_failures += 1
        if self.probe_healthy and self.check_failures >= self._health.unhealthy_threshold:
            self.probe_healthy = False
            return self._settle(now, f"{self.check_failures} health checks failed")
        return self._settle(now, "health check failed")

    def adopt_ejection(self, for_s: float, ejection_count: int, now: float) -> Transition | None:
        """Another worker ejected this upstream for `for_s` more seconds: do the same here."""
        until = now + max(0.0, for_s)
        if self.ejected_until is None or self.ejected_until < until:
            self.ejected_until = until
            self.last_ejection_end = until
        self.ejection_count = max(self.ejection_count, ejection_count)
        self.consecutive_failures = 0
        return self._settle(now, "ejected by another worker")

    def adopt_cooldown(self, for_s: float, now: float) -> Transition | None:
        """Another worker got a 429 from this upstream: cool down for the rest of its wait too."""
        self.cooldown_until = max(self.cooldown_until or 0.0, now + max(0.0, for_s))
        return self._settle(now, "rate limited (429) at another worker")

    def adopt_unejection(self, now: float) -> Transition | None:
        """Another worker's request succeeded while the upstream was ejected: end it here too."""
        if self.ejected_until is not None and now < self.ejected_until:
            self._end_ejection(now)
        return self._settle(now, "request succeeded at another worker")

    def drain(self, now: float) -> Transition | None:
        """Take the upstream out of rotation until `enable`."""
        self.drained = True
        return self._settle(now, "drained by operator")

    def enable(self, now: float) -> Transition | None:
        """Undo `drain`."""
        self.drained = False
        return self._settle(now, "enabled by operator")

    def refresh(self, now: float) -> Transition | None:
        """Notice a state that changed by time alone (an ejection or cooldown that ran out)."""
        return self._settle(now, "ejection or cooldown ended")

    def _eject(self, now: float) -> None:
        # The multiplier decays by one for each base period the upstream stayed in service, so a
        # long-healthy upstream starts again from the base time.
        quiet = max(0.0, now - self.last_ejection_end)
        decayed = max(0, self.ejection_count - int(quiet // self._outlier.base_ejection_s))
        self.ejection_count = decayed + 1
        duration = min(self._outlier.base_ejection_s * self.ejection_count, self._outlier.max_ejection_s)
        self.ejected_until = now + duration
        self.last_ejection_end = self.ejected_until
        self.consecutive_failures = 0

    def _end_ejection(self, now: float) -> None:
        self.ejected_until = None
        self.last_ejection_end = now

    def _settle(self, now: float, reason: str) -> Transition | None:
        after = self.state(now)
        if after is self._state:
            return None
        before, self._state = self._state, after
        return Transition(before, after, reason)
