"""Pick one upstream from candidates that are all equally eligible (same tier, routable).

  latency         power of two choices over cost = peak-EWMA latency x (in-flight + 1) / weight;
                  the two are drawn with probability proportional to weight; costs within
                  TIE_TOLERANCE of each other are a tie, broken at random.
  round_robin     smooth weighted round robin (nginx's algorithm): even spread, weights honoured.
  least_inflight  fewest requests in flight per unit of weight; ties broken at random.
  priority        always the first candidate in configuration order.
Every rule reads the candidate's effective weight: its configured weight scaled by slow start
(policy/slow_start.py) while it ramps up after entering service.
Randomness comes in as `rng`; the candidate objects carry the state these rules read.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from gateway.config import Strategy


class Candidate(Protocol):
    """What selection reads of an upstream."""

    @property
    def effective_weight(self) -> float: ...
    @property
    def inflight(self) -> int: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def measured(self) -> bool: ...

    rr_current: float


C = TypeVar("C", bound=Candidate)

# Costs this close are noise, not signal: pick at random so equally fast upstreams share traffic
# instead of one winning every sequential request on a lucky first sample.
TIE_TOLERANCE = 0.1


def cost(c: Candidate) -> float:
    """Expected wait at this upstream: latency estimate times queue, per unit of weight.

    An upstream with no measurement yet (new or just recovered) costs nothing while it has nothing
    in flight, so it is probed at once; further requests see its prior, so it is not flooded.
    """
    if not c.measured and c.inflight == 0:
        return 0.0
    return c.latency_s * (c.inflight + 1) / c.effective_weight


def _weighted_pair(cands: Sequence[C], rng: random.Random) -> tuple[C, C]:
    first = rng.choices(cands, weights=[c.effective_weight for c in cands])[0]
    rest = [c for c in cands if c is not first]
    second = rng.choices(rest, weights=[c.effective_weight for c in rest])[0]
    return first, second


def _uniform_weights(cands: Sequence[Candidate]) -> bool:
    w = cands[0].effective_weight
    return all(c.effective_weight == w for c in cands)


def pick_p2c(cands: Sequence[C], rng: random.Random) -> C:
    """Power of two choices: sample two, keep the cheaper."""
    if len(cands) == 1:
        return cands[0]
    if len(cands) == 2:
        a, b = cands  # both are "sampled"; weights still count through cost()
    elif _uniform_weights(cands):
        a, b = rng.sample(cands, 2)
    else:
        a, b = _weighted_pair(cands, rng)
    ca, cb = cost(a), cost(b)
    if abs(ca - cb) <= TIE_TOLERANCE * max(ca, cb):
        return a if rng.random() < 0.5 else b
    return a if ca < cb else b


def pick_round_robin(cands: Sequence[C]) -> C:
    """Smooth weighted round robin; mutates each candidate's rr_current."""
    total = 0.0
    best = cands[0]
    for c in cands:
        c.rr_current += c.effective_weight
        total += c.effective_weight
        if c.rr_current > best.rr_current:
            best = c
    best.rr_current -= total
    return best


def pick_least_inflight(cands: Sequence[C], rng: random.Random) -> C:
    """Fewest in-flight requests per weight; a random one among ties."""
    loads = [c.inflight / c.effective_weight for c in cands]
    low = min(loads)
    tied = [c for c, load in zip(cands, loads, strict=True) if load == low]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def pick(strategy: Strategy, cands: Sequence[C], rng: random.Random) -> C:
    """Apply `strategy` to a non-empty candidate list (in configuration order)."""
    if strategy is Strategy.LATENCY:
        return pick_p2c(cands, rng)
    if strategy is Strategy.ROUND_ROBIN:
        return pick_round_robin(cands)
    if strategy is Strategy.LEAST_INFLIGHT or strategy is Strategy.ENGINE:
        return pick_least_inflight(cands, rng)  # the pool picks for `engine` itself (policy/engine.py)
    return cands[0]
