"""The `engine` strategy: affinity first, bounded by the engines' own load, then the least loaded.

Load of an engine: the requests it reports holding (waiting and running, from a fresh report)
plus those this gateway sent it since that report (still in flight), or, with no fresh report,
this gateway's own requests in flight there. An engine is saturated when its fresh report shows
more waiting requests than `saturation.queue` or KV usage above `saturation.kv`; it is not
chosen while another candidate is not.
With an affinity key the engines are taken in the key's rendezvous order, and the first whose
load is within (1 + `affinity.slack`) of the candidates' mean (and at most one request above it,
so an idle fleet does not scatter keys) is chosen: a hot prefix overflows to its next engine
instead of locking one engine into a thrash spiral. Without a key, or when every engine is over
the bound, power of two choices by load per weight. Pure: time and randomness come in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from gateway.policy.affinity import rendezvous
from gateway.policy.load import EngineLoad, fresh


class EngineCandidate(Protocol):
    """What the engine strategy reads of an upstream."""

    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> float: ...
    @property
    def inflight(self) -> int: ...
    @property
    def engine(self) -> EngineLoad | None: ...
    @property
    def sent_since_report(self) -> int: ...
    @property
    def stale_s(self) -> float: ...


E = TypeVar("E", bound=EngineCandidate)


@dataclass(frozen=True, slots=True)
class EngineRules:
    """Thresholds of the engine strategy."""

    queue: float = 5.0
    kv: float = 0.9
    slack: float = 0.25


def load_of(c: EngineCandidate, now: float) -> float:
    """Requests the engine is working on or has queued, as best this gateway knows."""
    report = fresh(c.engine, now, c.stale_s)
    held = None if report is None else report.requests
    if held is None:
        return float(c.inflight)
    return held + min(c.sent_since_report, c.inflight)


def saturated(c: EngineCandidate, now: float, rules: EngineRules) -> bool:
    """True when the engine's fresh report shows a long queue or a nearly full KV cache."""
    report = fresh(c.engine, now, c.stale_s)
    if report is None:
        return False
    return (report.waiting or 0.0) > rules.queue or (report.kv or 0.0) > rules.kv


def pick_engine(
    cands: Sequence[E], key: bytes | None, now: float, rules: EngineRules, rng: random.Random
) -> E:
    """Choose among non-empty `cands` (one tier, routable)."""
    if len(cands) == 1:
        return cands[0]
    calm = [c for c in cands if not saturated(c, now, rules)]
    pool = calm or list(cands)
    if len(pool) == 1:
        return pool[0]
    loads = {id(c): load_of(c, now) / c.weight for c in pool}
    if key is not None:
        mean = sum(loads.values()) / len(pool)
        bound = max((1.0 + rules.slack) * mean, mean + 1.0)
        for c in rendezvous(key, pool):
            if loads[id(c)] <= bound:
                return c
    a, b = rng.sample(pool, 2)
    la, lb = loads[id(a)], loads[id(b)]
    if la == lb:
        return a if rng.random() < 0.5 else b
    return a if la < lb else b


def all_saturated(cands: Sequence[EngineCandidate], now: float, rules: EngineRules) -> bool:
    """True when every candidate is saturated (requests should wait rather than pile on)."""
    return bool(cands) and all(saturated(c, now, rules) for c in cands)
