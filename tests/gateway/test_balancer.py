"""Selection within one tier: latency P2C, smooth weighted round robin, least in-flight, priority."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from gateway.config import Strategy
from gateway.policy.balancer import cost, pick, pick_least_inflight, pick_p2c, pick_round_robin

N = 2000


@dataclass(eq=False)
class Cand:
    name: str
    weight: float = 1.0
    inflight: int = 0
    latency_s: float = 0.1
    rr_current: float = 0.0
    measured: bool = True
    ramp: float = 1.0  # the slow-start factor

    @property
    def effective_weight(self) -> float:
        return self.weight * self.ramp


def names(seq: list[Cand]) -> str:
    return "".join(c.name for c in seq)


# --- cost ----------------------------------------------------------------------------------


def test_cost_is_latency_times_queue_per_weight() -> None:
    assert cost(Cand("a", weight=2.0, inflight=3, latency_s=0.5)) == pytest.approx(1.0)
    assert cost(Cand("b", weight=1.0, inflight=0, latency_s=0.2)) == pytest.approx(0.2)


def test_cost_of_unmeasured_idle_upstream_is_zero() -> None:
    assert cost(Cand("new", measured=False, inflight=0, latency_s=5.0)) == 0.0


def test_cost_of_unmeasured_busy_upstream_uses_its_prior() -> None:
    # Once the probe is in flight, further requests see the prior, so it is not flooded.
    new = Cand("new", measured=False, inflight=1, latency_s=0.5, weight=2.0)
    assert cost(new) == pytest.approx(0.5)
    new.inflight = 3
    assert cost(new) == pytest.approx(1.0)


def test_cost_of_measured_idle_upstream_is_its_latency() -> None:
    assert cost(Cand("m", measured=True, inflight=0, latency_s=0.3)) == pytest.approx(0.3)


# --- latency (P2C) -------------------------------------------------------------------------


def test_p2c_single_candidate_returned_without_randomness() -> None:
    a = Cand("a")
    rng = random.Random(0)
    state = rng.getstate()
    assert pick_p2c([a], rng) is a
    assert rng.getstate() == state


def test_p2c_two_candidates_cheaper_always_wins() -> None:
    fast, slow = Cand("fast", latency_s=0.1), Cand("slow", latency_s=0.5)
    rng = random.Random(0)
    wins = Counter(pick_p2c([slow, fast], rng).name for _ in range(N))
    assert wins["fast"] == N


def test_p2c_cheaper_upstream_wins_most_picks() -> None:
    cands = [Cand("fast", latency_s=0.05)] + [Cand(f"s{i}", latency_s=0.5) for i in range(2)]
    rng = random.Random(0)
    wins = Counter(pick_p2c(cands, rng).name for _ in range(N))
    # The cheapest wins whenever it is one of the two drawn: 2 of 3 pairs.
    assert wins["fast"] / N > 0.6
    assert wins["fast"] > wins["s0"] + wins["s1"]


def test_p2c_most_expensive_candidate_never_wins() -> None:
    cands = [Cand(str(i), latency_s=0.1 * (i + 1)) for i in range(5)]
    rng = random.Random(0)
    wins = Counter(pick_p2c(cands, rng).name for _ in range(N))
    assert wins["4"] == 0
    # and the ranking follows cost
    assert wins["0"] > wins["1"] > wins["2"] > wins["3"]


def test_p2c_all_candidates_reachable_when_costs_equal() -> None:
    cands = [Cand(str(i)) for i in range(4)]
    rng = random.Random(0)
    wins = Counter(pick_p2c(cands, rng).name for _ in range(N))
    assert set(wins) == {"0", "1", "2", "3"}
    for n in wins.values():
        assert 0.2 < n / N < 0.3


def test_p2c_tie_between_two_is_broken_at_random() -> None:
    a, b = Cand("a"), Cand("b")
    rng = random.Random(0)
    wins = Counter(pick_p2c([a, b], rng).name for _ in range(N))
    assert 0.45 < wins["a"] / N < 0.55


@pytest.mark.parametrize(
    ("la", "lb"),
    [(0.100, 0.105), (1.0, 0.9), (10.0, 10.9), (0.0011, 0.001)],
)
def test_p2c_costs_within_tolerance_are_a_random_tie(la: float, lb: float) -> None:
    a, b = Cand("a", latency_s=la), Cand("b", latency_s=lb)
    rng = random.Random(0)
    wins = Counter(pick_p2c([a, b], rng).name for _ in range(N))
    assert 0.45 < wins["a"] / N < 0.55


@pytest.mark.parametrize(
    ("cheap", "dear"),
    [(0.89, 1.0), (0.001, 0.0012), (8.9, 10.0), (0.1, 0.5)],
)
def test_p2c_costs_beyond_tolerance_cheaper_always_wins(cheap: float, dear: float) -> None:
    a, b = Cand("dear", latency_s=dear), Cand("cheap", latency_s=cheap)
    rng = random.Random(0)
    assert all(pick_p2c([a, b], rng) is b for _ in range(500))


def test_p2c_tolerance_is_relative_to_cost_not_latency() -> None:
    # Same latency, but a queue makes one cost twice the other: not a tie.
    busy, idle = Cand("busy", latency_s=0.1, inflight=1), Cand("idle", latency_s=0.1)
    rng = random.Random(0)
    assert all(pick_p2c([busy, idle], rng) is idle for _ in range(500))


def test_p2c_candidates_within_tolerance_share_picks_evenly() -> None:
    # Three candidates within 10% of each other: each wins about a third.
    cands = [Cand("a", latency_s=0.100), Cand("b", latency_s=0.103), Cand("c", latency_s=0.106)]
    rng = random.Random(0)
    wins = Counter(pick_p2c(cands, rng).name for _ in range(N * 3))
    for n in wins.values():
        assert 0.28 < n / (N * 3) < 0.39


def test_p2c_unmeasured_idle_upstream_always_wins() -> None:
    fast = Cand("fast", latency_s=0.001)
    new = Cand("new", latency_s=10.0, measured=False)
    rng = random.Random(0)
    assert all(pick_p2c([fast, new], rng) is new for _ in range(500))


def test_p2c_unmeasured_upstream_with_request_in_flight_competes_on_prior() -> None:
    fast = Cand("fast", latency_s=0.01)
    new = Cand("new", latency_s=0.5, measured=False, inflight=1)  # cost 1.0
    rng = random.Random(0)
    assert all(pick_p2c([fast, new], rng) is fast for _ in range(500))


def test_p2c_two_unmeasured_idle_upstreams_tie_at_random() -> None:
    a = Cand("a", latency_s=0.1, measured=False)
    b = Cand("b", latency_s=5.0, measured=False)
    rng = random.Random(0)
    wins = Counter(pick_p2c([a, b], rng).name for _ in range(N))
    assert 0.45 < wins["a"] / N < 0.55


def test_p2c_inflight_raises_cost() -> None:
    busy = Cand("busy", latency_s=0.1, inflight=4)  # cost 0.5
    idle = Cand("idle", latency_s=0.3, inflight=0)  # cost 0.3
    rng = random.Random(0)
    assert all(pick_p2c([busy, idle], rng) is idle for _ in range(200))
    busy.inflight = 1  # cost 0.2
    assert all(pick_p2c([busy, idle], rng) is busy for _ in range(200))


def test_p2c_weight_lowers_cost() -> None:
    heavy = Cand("heavy", latency_s=0.3, weight=4.0)  # cost 0.075
    light = Cand("light", latency_s=0.1, weight=1.0)  # cost 0.1
    rng = random.Random(0)
    assert all(pick_p2c([light, heavy], rng) is heavy for _ in range(200))


def test_p2c_draws_candidates_in_proportion_to_weight() -> None:
    # Equal cost, so whichever is drawn first in a tie decides half the time; weight governs
    # how often each is drawn at all.
    heavy = Cand("heavy", weight=8.0, latency_s=0.8)
    lights = [Cand(f"l{i}", weight=1.0, latency_s=0.1) for i in range(3)]
    rng = random.Random(0)
    wins = Counter(pick_p2c([heavy, *lights], rng).name for _ in range(N))
    # P(heavy in pair) = 8/11 + 3/11 * 8/10 = 0.945; it then wins half the ties.
    assert 0.40 < wins["heavy"] / N < 0.55
    assert all(wins[c.name] < wins["heavy"] for c in lights)


def test_p2c_weighted_cheap_candidate_wins_most_picks() -> None:
    heavy = Cand("heavy", weight=4.0)
    lights = [Cand(f"l{i}") for i in range(2)]
    rng = random.Random(0)
    wins = Counter(pick_p2c([*lights, heavy], rng).name for _ in range(N))
    # heavy is cheapest (cost / 4) and drawn in the pair ~93% of the time
    assert wins["heavy"] / N > 0.85


def test_p2c_deterministic_for_seed() -> None:
    cands = [Cand(str(i), latency_s=0.1 * (i % 3 + 1)) for i in range(6)]
    r1, r2 = random.Random(0), random.Random(0)
    seq1 = [pick_p2c(cands, r1).name for _ in range(100)]
    seq2 = [pick_p2c(cands, r2).name for _ in range(100)]
    assert seq1 == seq2
    assert len(set(seq1)) > 1


# --- round robin ---------------------------------------------------------------------------


def test_round_robin_equal_weights_rotate_in_order() -> None:
    cands = [Cand("a"), Cand("b"), Cand("c")]
    assert names([pick_round_robin(cands) for _ in range(9)]) == "abcabcabc"


def test_round_robin_smooth_weighted_sequence_matches_nginx() -> None:
    cands = [Cand("a", weight=5.0), Cand("b", weight=1.0), Cand("c", weight=1.0)]
    assert names([pick_round_robin(cands) for _ in range(7)]) == "aabacaa"
    assert all(c.rr_current == 0.0 for c in cands)  # state returns to zero after a cycle


@pytest.mark.parametrize(
    "weights",
    [(5.0, 1.0, 1.0), (3.0, 2.0), (1.0, 1.0, 1.0, 1.0), (4.0, 3.0, 2.0, 1.0), (1.5, 0.5)],
)
def test_round_robin_weights_respected_exactly_over_full_cycle(
    weights: tuple[float, ...],
) -> None:
    cands = [Cand(str(i), weight=w) for i, w in enumerate(weights)]
    scale = 2 if any(w != int(w) for w in weights) else 1
    cycle = int(sum(weights) * scale)
    for _ in range(3):  # several consecutive cycles, each exact
        counts = Counter(pick_round_robin(cands).name for _ in range(cycle))
        assert [counts[str(i)] for i in range(len(weights))] == [int(w * scale) for w in weights]


def test_round_robin_spreads_heavy_upstream_smoothly() -> None:
    cands = [Cand("a", weight=2.0), Cand("b", weight=2.0), Cand("c", weight=1.0)]
    seq = names([pick_round_robin(cands) for _ in range(50)])
    assert "aaa" not in seq and "bbb" not in seq
    assert Counter(seq) == {"a": 20, "b": 20, "c": 10}


def test_round_robin_ignores_rng_and_latency() -> None:
    cands = [Cand("a", latency_s=9.0, inflight=50), Cand("b", latency_s=0.001)]
    rng = random.Random(0)
    seq = names([pick(Strategy.ROUND_ROBIN, cands, rng) for _ in range(6)])
    assert seq == "ababab"


# --- least in-flight -----------------------------------------------------------------------


def test_least_inflight_picks_fewest_in_flight() -> None:
    cands = [Cand("a", inflight=3), Cand("b", inflight=1), Cand("c", inflight=2)]
    assert pick_least_inflight(cands, random.Random(0)).name == "b"


def test_least_inflight_divides_by_weight() -> None:
    a = Cand("a", inflight=2, weight=1.0)  # load 2
    b = Cand("b", inflight=3, weight=2.0)  # load 1.5
    assert pick_least_inflight([a, b], random.Random(0)) is b


def test_least_inflight_ignores_latency() -> None:
    a = Cand("a", inflight=0, latency_s=5.0)
    b = Cand("b", inflight=1, latency_s=0.01)
    assert pick_least_inflight([b, a], random.Random(0)) is a


def test_least_inflight_ties_broken_at_random() -> None:
    cands = [Cand("a", inflight=1), Cand("b", inflight=1), Cand("c", inflight=2)]
    rng = random.Random(0)
    wins = Counter(pick_least_inflight(cands, rng).name for _ in range(N))
    assert wins["c"] == 0
    assert 0.45 < wins["a"] / N < 0.55


# --- priority and dispatch -----------------------------------------------------------------


def test_priority_strategy_always_first_candidate() -> None:
    cands = [
        Cand("first", latency_s=10.0, inflight=100),
        Cand("second", latency_s=0.001),
    ]
    rng = random.Random(0)
    assert all(pick(Strategy.PRIORITY, cands, rng).name == "first" for _ in range(50))


def test_pick_latency_strategy_uses_p2c() -> None:
    cands = [Cand("slow", latency_s=1.0), Cand("fast", latency_s=0.01)]
    rng = random.Random(0)
    assert all(pick(Strategy.LATENCY, cands, rng).name == "fast" for _ in range(50))


def test_pick_latency_strategy_probes_unmeasured_upstream() -> None:
    cands = [Cand("fast", latency_s=0.01), Cand("new", latency_s=1.0, measured=False)]
    rng = random.Random(0)
    assert all(pick(Strategy.LATENCY, cands, rng).name == "new" for _ in range(50))


@pytest.mark.parametrize("strategy", [Strategy.ROUND_ROBIN, Strategy.LEAST_INFLIGHT, Strategy.PRIORITY])
def test_pick_other_strategies_ignore_measured(strategy: Strategy) -> None:
    a = Cand("a", inflight=0)
    b = Cand("b", inflight=1, measured=False)
    rng = random.Random(0)
    if strategy is Strategy.ROUND_ROBIN:
        assert names([pick(strategy, [b, a], rng) for _ in range(4)]) == "baba"
    else:
        assert pick(strategy, [a, b], rng) is a


def test_pick_least_inflight_strategy_uses_inflight() -> None:
    cands = [Cand("busy", inflight=5, latency_s=0.01), Cand("idle", latency_s=1.0)]
    rng = random.Random(0)
    assert all(pick(Strategy.LEAST_INFLIGHT, cands, rng).name == "idle" for _ in range(50))


@pytest.mark.parametrize("strategy", list(Strategy))
def test_pick_single_candidate_for_every_strategy(strategy: Strategy) -> None:
    only = Cand("only")
    assert pick(strategy, [only], random.Random(0)) is only
