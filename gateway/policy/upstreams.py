"""The upstream pool: which upstream serves the next attempt, and what each outcome teaches us.

Selection, in order:
  1. Routable upstreams (healthy, not drained, below max_inflight) of the lowest priority tier,
     by the configured strategy. A retry stays in its tier while the tier is not spent: another
     untried upstream of the tier first, else the same ones again (after a backoff, or after a
     short rate-limit cooldown: one ending within `wait_up_to_s`). A tier is spent once it has
     had max(2, its upstreams) attempts of this request; only then does a retry move to the next
     tier, so a blip on the primary does not send traffic to the expensive backup.
  2. Panic mode when none is routable: try the non-drained upstreams anyway, soonest available
     first, since a probably-broken upstream beats a certain error. A request never panics into an
     upstream it already tried, and max_inflight is never exceeded.
Outcomes feed the health state machine (outlier.py) and the peak-EWMA latency estimate. Failures are
folded in as at least FAILURE_PENALTY_S so a fast-failing upstream never looks fast; 429s are not
folded in at all. An upstream that becomes routable again restarts from a neutral estimate (the
median of the others) so it earns traffic instead of carrying a stale failure penalty.
Slow start: an upstream back from ejected, unhealthy or drained has its weight ramped up over
`slow_start_s` (policy/slow_start.py) in every weighted strategy.
Pure: time and randomness come in as arguments; state changes go out through `on_transition`.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

from gateway.config import Continuation, GatewaySettings, Strategy, UpstreamSettings
from gateway.policy.balancer import cost, pick
from gateway.policy.classify import Outcome, is_failure
from gateway.policy.engine import EngineRules, all_saturated, pick_engine
from gateway.policy.ewma import PeakEwma
from gateway.policy.load import EngineLoad
from gateway.policy.outlier import State, Transition, UpstreamHealth
from gateway.policy.redundancy import Member, Redundancy, assess
from gateway.policy.shared import Kind, SharedChange
from gateway.policy.slow_start import ramp

FAILURE_PENALTY_S = 1.0
DEFAULT_STALE_S = 3.0  # how long an ORCA report holds when the upstream has no load_metrics
# Longest Retry-After the gateway suggests for a wait that is not a rate-limit cooldown.
RETRY_AFTER_CAP_S = 2.0
_NO_TIER = 1 << 62
# Coming back from these starts slow start; a 429 cooldown ending does not (it was not unwell).
_RAMPED_AFTER = frozenset({State.EJECTED, State.UNHEALTHY, State.DRAINED})


class Upstream:
    """One upstream's configuration and live state."""

    __slots__ = (
        "base_url",
        "check_problem",
        "continues",
        "effective_weight",
        "engine",
        "ewma",
        "headers",
        "health",
        "health_path",
        "index",
        "inflight",
        "max_context",
        "max_inflight",
        "name",
        "priority",
        "rr_current",
        "sent_since_report",
        "serving_since",
        "stale_s",
        "waiting",
        "weight",
    )

    def __init__(self, index: int, cfg: UpstreamSettings, settings: GatewaySettings, now: float) -> None:
        self.index = index
        self.name = cfg.name
        self.base_url = cfg.url
        self.priority = cfg.priority
        self.weight = cfg.weight
        # The weight selection uses now: `weight` scaled down by slow start while it ramps up.
        self.effective_weight = cfg.weight
        # When slow start began (monotonic); -inf for the upstreams the gateway started with.
        self.serving_since = float("-inf")
        self.max_inflight = cfg.max_inflight
        self.max_context = cfg.max_context
        self.continues = cfg.continuation is Continuation.PREFILL  # can finish a cut stream
        self.headers = tuple(cfg.headers.items())
        self.health_path = cfg.health_path
        # What the latest active check revealed about its own configuration (a wrong path), if anything.
        self.check_problem: str | None = None
        self.health = UpstreamHealth(settings.outlier, settings.health)
        self.ewma = PeakEwma(settings.ewma_decay_s, settings.ewma_default_s, now)
        self.inflight = 0
        # Attempts sent here still waiting for response headers, with their start times (oldest first).
        self.waiting: dict[object, float] = {}
        self.rr_current = 0.0
        # The engine's own latest load report, requests sent since it, and how long it holds.
        self.engine: EngineLoad | None = None
        self.sent_since_report = 0
        self.stale_s = cfg.load_metrics.stale_s if cfg.load_metrics is not None else DEFAULT_STALE_S

    @property
    def latency_s(self) -> float:
        """Current peak-EWMA time-to-headers estimate."""
        return self.ewma.value

    @property
    def measured(self) -> bool:
        """False until the first latency sample after start or recovery."""
        return self.ewma.measured

    def begin_slow_start(self, now: float) -> None:
        """The upstream (re)enters service at `now`: its share ramps up from here."""
        self.serving_since = now

    def refresh_weight(self, now: float, window_s: float, aggression: float) -> float:
        """Recompute `effective_weight` for `now` (policy/slow_start.py) and return it."""
        self.effective_weight = self.weight * ramp(now - self.serving_since, window_s, aggression)
        return self.effective_weight

    def slow_start_ends_at(self, window_s: float) -> float | None:
        """When the ramp ends (monotonic), or None when it is not ramping."""
        end = self.serving_since + window_s
        return end if window_s > 0 and end != float("-inf") else None

    def attempt_started(self, attempt: object, now: float) -> None:
        """An attempt was sent here: in flight, and waiting for its headers."""
        self.inflight += 1
        self.waiting[attempt] = now
        self.sent_since_report += 1

    def load_reported(self, report: EngineLoad) -> None:
        """The engine reported its load; requests sent before it are in its numbers."""
        self.engine = report
        self.sent_since_report = 0

    def attempt_ended(self, attempt: object) -> None:
        """An attempt here is over (answered, failed or abandoned)."""
        self.waiting.pop(attempt, None)
        self.inflight -= 1

    def oldest_wait_s(self, now: float) -> float:
        """How long the oldest attempt still waiting for headers has waited (0 if none)."""
        for started in self.waiting.values():
            return now - started
        return 0.0

    @property
    def has_capacity(self) -> bool:
        """False while max_inflight requests are already in flight here."""
        return self.max_inflight is None or self.inflight < self.max_inflight

    def __repr__(self) -> str:
        return f"Upstream({self.name!r})"


class Choice(NamedTuple):
    """The upstream for the next attempt, whether it was picked in panic mode, and how long to
    wait before sending (the rest of its rate-limit cooldown)."""

    upstream: Upstream
    panic: bool
    wait_s: float = 0.0
    saturated: bool = False  # engine strategy: every candidate was saturated


TransitionListener = Callable[[Upstream, Transition, float], None]


class Pool:
    """All upstreams of one gateway, and the policy that picks among them."""

    def __init__(
        self,
        settings: GatewaySettings,
        now: float,
        on_transition: TransitionListener | None = None,
    ) -> None:
        self.strategy = settings.strategy
        self.slow_start_s = settings.slow_start_s
        self.slow_start_aggression = settings.slow_start_aggression
        sat = settings.saturation
        self.engine_rules = EngineRules(sat.queue, sat.kv, settings.affinity.slack)
        self._default_latency_s = settings.ewma_default_s
        self.upstreams: tuple[Upstream, ...] = tuple(
            Upstream(i, cfg, settings, now) for i, cfg in enumerate(settings.upstreams)
        )
        self.by_name = {u.name: u for u in self.upstreams}
        self.load_metrics = tuple(cfg.load_metrics for cfg in settings.upstreams)  # polled, if set
        self._on_transition = on_transition
        self.on_load: Callable[[Upstream], None] | None = None  # told of every load report

    def choose(
        self,
        now: float,
        rng: random.Random,
        tried: Sequence[Upstream] = (),
        accept: Callable[[Upstream], bool] | None = None,
        wait_up_to_s: float = 0.0,
        panic: bool = True,
        last: bool = False,
        refused: Collection[Upstream] = (),
        key: bytes | None = None,
    ) -> Choice | None:
        """Pick the upstream for the next attempt, or None when nothing can take it.

        `tried` lists this request's earlier attempts, in order (an upstream once per attempt).
        With `accept`, only upstreams it accepts are candidates (panic mode too); without
        `panic`, there is no panic mode. For the `last` attempt an untried upstream of any tier
        wins over trying one again, and upstreams that `refused` this request's connection are
        not tried again while another can serve: the last chance goes where it can succeed.
        `key` is the request's affinity key, for the engine strategy.
        """
        if tried:
            cands, healthy, wait_s = self._retry_candidates(now, tried, accept, wait_up_to_s, last, refused)
        else:
            cands, healthy = self._candidates(now, accept)
            wait_s = 0.0
        if cands:
            if self.slow_start_s > 0:
                for u in cands:
                    u.refresh_weight(now, self.slow_start_s, self.slow_start_aggression)
            if self.strategy is Strategy.LATENCY:
                for u in cands:
                    u.ewma.decay(now, u.oldest_wait_s(now) if u.waiting else 0.0)
            if self.strategy is Strategy.ENGINE:
                rules = self.engine_rules
                up = pick_engine(cands, key, now, rules, rng)
                return Choice(up, False, wait_s, all_saturated(cands, now, rules))
            return Choice(pick(self.strategy, cands, rng), False, wait_s)
        if healthy or not panic:
            return None  # all healthy ones are full: shed load rather than panic
        return self._panic_choice(now, tried, accept)

    def _candidates(
        self, now: float, accept: Callable[[Upstream], bool] | None
    ) -> tuple[list[Upstream], bool]:
        """Routable upstreams with capacity in the best tier, and whether any is routable.

        One pass over the upstreams, since this runs for every request.
        """
        healthy = False
        best: list[Upstream] = []
        best_tier = _NO_TIER
        for u in self.upstreams:
            if not u.health.routable(now) or (accept is not None and not accept(u)):
                continue
            healthy = True
            if not u.has_capacity:
                continue
            tier = u.priority
            if tier < best_tier:
                best_tier, best = tier, [u]
            elif tier == best_tier:
                best.append(u)
        return best, healthy

    def _retry_candidates(
        self,
        now: float,
        tried: Sequence[Upstream],
        accept: Callable[[Upstream], bool] | None,
        wait_up_to_s: float,
        last: bool,
        refused: Collection[Upstream],
    ) -> tuple[list[Upstream], bool, float]:
        """Candidates for a retry, tier first (see the module docstring), and the wait before it."""
        ready, soon, healthy = self._by_tier(now, accept, wait_up_to_s)
        tiers = sorted(ready.keys() | soon.keys())
        fresh_tiers = tiers if last else ()  # the last attempt: any untried upstream first
        for tier in fresh_tiers:
            fresh = [u for u in ready.get(tier, []) if u not in tried]
            if fresh:
                return fresh, healthy, 0.0
        fallback: tuple[list[Upstream], float] | None = None
        for tier in tiers:
            here = ready.get(tier, [])
            fresh = [u for u in here if u not in tried]
            if fresh:
                return fresh, healthy, 0.0
            waiting = soon.get(tier, [])
            again = self._again([u for u in here if u not in refused], waiting, now)
            if not again[0]:
                continue
            spent = sum(1 for u in tried if u.priority == tier) >= max(2, len(here) + len(waiting))
            if not spent:
                return again[0], healthy, again[1]
            fallback = fallback or again
        if fallback is None:  # only upstreams that refused are left: better than nothing
            return (ready[tiers[0]] if tiers and tiers[0] in ready else []), healthy, 0.0
        return fallback[0], healthy, fallback[1]

    def _by_tier(
        self, now: float, accept: Callable[[Upstream], bool] | None, wait_up_to_s: float
    ) -> tuple[dict[int, list[Upstream]], dict[int, list[Upstream]], bool]:
        """Routable upstreams with capacity, and ones cooling down for at most `wait_up_to_s`, by tier."""
        healthy = False
        ready: dict[int, list[Upstream]] = {}
        soon: dict[int, list[Upstream]] = {}
        for u in self.upstreams:
            if accept is not None and not accept(u):
                continue
            if u.health.routable(now):
                healthy = True
                if u.has_capacity:
                    ready.setdefault(u.priority, []).append(u)
            elif (
                wait_up_to_s > 0
                and u.has_capacity
                and u.health.state(now) is State.COOLING_DOWN
                and u.health.available_at(now) - now <= wait_up_to_s
            ):
                soon.setdefault(u.priority, []).append(u)
        return ready, soon, healthy

    @staticmethod
    def _again(ready: list[Upstream], soon: list[Upstream], now: float) -> tuple[list[Upstream], float]:
        """The tried upstreams of a tier to try again: routable ones, else the soonest cooled down."""
        if ready:
            return ready, 0.0
        if not soon:
            return [], 0.0
        first = min(soon, key=lambda u: u.health.available_at(now))
        return [first], max(0.0, first.health.available_at(now) - now)

    def _panic_choice(
        self, now: float, tried: Sequence[Upstream], accept: Callable[[Upstream], bool] | None
    ) -> Choice | None:
        cands = [
            u
            for u in self.upstreams
            if not u.health.drained and u.has_capacity and u not in tried and (accept is None or accept(u))
        ]
        if not cands:
            return None
        best = min(cands, key=lambda u: (u.health.available_at(now), u.priority, cost(u)))
        return Choice(best, True)

    def record(
        self,
        up: Upstream,
        outcome: Outcome,
        now: float,
        latency_s: float | None,
        retry_after_s: float | None = None,
    ) -> None:
        """Fold one attempt's outcome into the upstream's health and latency estimate.

        `latency_s` None: the sample comes later (`record_latency`), once the body tells it.
        """
        # Health first: if this outcome ends an ejection, the reset to a neutral prior happens
        # before the sample, so the real sample replaces the prior instead of being discarded.
        self._notify(up, up.health.record(outcome, now, retry_after_s), now)
        if outcome is not Outcome.RATE_LIMITED and latency_s is not None:
            sample = max(latency_s, FAILURE_PENALTY_S) if is_failure(outcome) else latency_s
            up.ewma.observe(sample, now)

    def record_latency(self, up: Upstream, sample_s: float, now: float) -> None:
        """A latency sample known only after the response's body (time per output token)."""
        up.ewma.observe(sample_s, now)

    def record_load(self, up: Upstream, report: EngineLoad) -> None:
        """An engine's own load report (ORCA header or polled metrics)."""
        up.load_reported(report)
        if self.on_load is not None:
            self.on_load(up)

    def record_abandoned(self, up: Upstream, elapsed_s: float, now: float) -> None:
        """The client gave up on an attempt after `elapsed_s`: the upstream took at least that."""
        up.ewma.observe_at_least(elapsed_s, now)

    def record_check(self, up: Upstream, ok: bool, now: float) -> None:
        """Fold one active health check into the upstream's health."""
        self._notify(up, up.health.record_check(ok, now), now)

    def adopt(self, up: Upstream, change: SharedChange, now: float) -> None:
        """Apply a state change another worker saw (policy/shared.py)."""
        h = up.health
        if change.kind is Kind.EJECTED:
            self._notify(up, h.adopt_ejection(change.for_s, change.ejection_count, now), now)
        elif change.kind is Kind.COOLDOWN:
            self._notify(up, h.adopt_cooldown(change.for_s, now), now)
        else:
            self._notify(up, h.adopt_unejection(now), now)

    def drain(self, up: Upstream, now: float) -> None:
        """Take `up` out of rotation (operator action)."""
        self._notify(up, up.health.drain(now), now)

    def enable(self, up: Upstream, now: float) -> None:
        """Put a drained upstream back."""
        self._notify(up, up.health.enable(now), now)

    def refresh(self, now: float) -> None:
        """Emit transitions that happened by time alone (ejections and cooldowns ending)."""
        for up in self.upstreams:
            self._notify(up, up.health.refresh(now), now)

    def redundancy(self, now: float) -> Redundancy:
        """The fleet's redundancy level and whether it is degraded (policy/redundancy.py)."""
        return assess(Member(u.name, u.priority, u.health.routable(now)) for u in self.upstreams)

    def serving_tier(self, now: float) -> int | None:
        """The tier normal selection sends traffic to now (lowest with a routable upstream), if any."""
        return min((u.priority for u in self.upstreams if u.health.routable(now)), default=None)

    def routable_count(self, now: float) -> int:
        """How many upstreams normal selection could use now."""
        return sum(1 for u in self.upstreams if u.health.routable(now))

    def retry_after_s(self, now: float) -> float | None:
        """A Retry-After hint: seconds until some upstream is routable again by itself, if known.

        The full wait only when it is a rate-limit cooldown (the upstream said how long); any
        other wait (an ejection) is capped at RETRY_AFTER_CAP_S, since clients that honour
        Retry-After would otherwise stall for the whole ejection while a probe may succeed sooner.
        """
        soonest = min(self.upstreams, key=lambda u: u.health.available_at(now))
        at = soonest.health.available_at(now)
        if at == float("inf"):
            return None
        wait = max(0.0, at - now)
        if soonest.health.state(now) is State.COOLING_DOWN:
            return wait
        return min(wait, RETRY_AFTER_CAP_S)

    def describe_unavailable(self, now: float) -> str:
        """Why no upstream could take a request, for the error message."""
        counts: dict[str, int] = {}
        full = 0
        for u in self.upstreams:
            state = u.health.state(now)
            counts[state] = counts.get(state, 0) + 1
            if state is State.HEALTHY and not u.has_capacity:
                full += 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        if full:
            summary += f"; {full} at max_inflight"
        return f"0 of {len(self.upstreams)} upstreams can take the request ({summary})"

    def _neutral_latency_s(self, exclude: Upstream, now: float) -> float:
        others = [
            u.latency_s for u in self.upstreams if u is not exclude and u.measured and u.health.routable(now)
        ]
        return statistics.median(others) if others else self._default_latency_s

    def _notify(self, up: Upstream, change: Transition | None, now: float) -> None:
        if change is None:
            return
        if change.after is State.HEALTHY:
            up.ewma.reset(self._neutral_latency_s(up, now), now)
            if change.before in _RAMPED_AFTER:
                up.begin_slow_start(now)
        if self._on_transition is not None:
            self._on_transition(up, change, now)
