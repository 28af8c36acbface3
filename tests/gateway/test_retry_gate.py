"""RetryGate: retries within the budget go at once; a burst above it queues FIFO for a short while."""

from __future__ import annotations

import asyncio

import pytest

from gateway.policy.budget import RetryBudget
from gateway.retry_gate import RetryGate

WAIT_S = 0.05  # short waits: these tests run on the real event loop
LONG_S = 5.0  # a wait that must never run out in a passing test


def make_gate(ratio: float = 0.0, min_concurrency: int = 1) -> RetryGate:
    return RetryGate(RetryBudget(ratio=ratio, min_concurrency=min_concurrency))


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def assert_idle(gate: RetryGate) -> None:
    assert (gate.budget.active_requests, gate.budget.active_retries) == (0, 0)
    assert not gate._waiters


class Recorder:
    """Tasks that acquire a slot and note the order in which slots were granted."""

    def __init__(self, gate: RetryGate) -> None:
        self.gate = gate
        self.granted: list[str] = []
        self.results: dict[str, bool] = {}

    async def _acquire(self, name: str, wait_s: float) -> bool:
        ok = await self.gate.acquire(wait_s)
        self.results[name] = ok
        if ok:
            self.granted.append(name)
        return ok

    def start(self, name: str, wait_s: float = LONG_S) -> asyncio.Task[bool]:
        return asyncio.get_running_loop().create_task(self._acquire(name, wait_s), name=name)


# --- immediate grant -----------------------------------------------------------------------


async def test_grant_within_budget_is_immediate() -> None:
    gate = make_gate(ratio=0.2, min_concurrency=2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await gate.acquire(WAIT_S)
    assert await gate.acquire(WAIT_S)
    assert loop.time() - start < WAIT_S / 2
    assert gate.budget.active_retries == 2
    assert not gate._waiters
    gate.release()
    gate.release()
    assert_idle(gate)


async def test_grant_within_budget_needs_no_wait_allowance() -> None:
    gate = make_gate(min_concurrency=1)
    assert await gate.acquire(0.0)
    gate.release()
    assert_idle(gate)


@pytest.mark.parametrize("wait_s", [0.0, -1.0])
async def test_over_budget_without_wait_allowance_refuses_at_once(wait_s: float) -> None:
    gate = make_gate(min_concurrency=1)
    assert await gate.acquire(WAIT_S)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert not await gate.acquire(wait_s)
    assert loop.time() - start < WAIT_S / 2
    assert gate.budget.active_retries == 1
    assert not gate._waiters
    gate.release()
    assert_idle(gate)


async def test_zero_budget_without_traffic_refuses() -> None:
    gate = make_gate(min_concurrency=0)
    assert not await gate.acquire(0.0)
    assert not await gate.acquire(WAIT_S)
    assert_idle(gate)


# --- burst over the floor ------------------------------------------------------------------


async def test_burst_over_floor_waits_and_is_served_fifo() -> None:
    gate = make_gate(min_concurrency=2)
    rec = Recorder(gate)
    tasks = [rec.start(name) for name in ("r1", "r2", "w1", "w2", "w3")]
    await settle()
    assert rec.granted == ["r1", "r2"]  # within the floor: at once
    assert len(gate._waiters) == 3
    assert gate.budget.active_retries == 2

    for expected in (["w1"], ["w1", "w2"], ["w1", "w2", "w3"]):
        gate.release()
        assert gate.budget.active_retries == 2  # the slot moved on, never exceeded the limit
        await settle()
        assert rec.granted[2:] == expected

    assert all(await asyncio.gather(*tasks))
    gate.release()
    gate.release()
    assert_idle(gate)


async def test_newcomer_queues_behind_waiters() -> None:
    gate = make_gate(min_concurrency=1)
    rec = Recorder(gate)
    first = rec.start("holder")
    await settle()
    early = rec.start("early")
    await settle()
    late = rec.start("late")
    await settle()
    gate.release()
    await settle()
    assert rec.granted == ["holder", "early"]
    gate.release()
    await settle()
    assert rec.granted == ["holder", "early", "late"]
    assert list(await asyncio.gather(first, early, late)) == [True, True, True]
    gate.release()
    assert_idle(gate)


async def test_release_without_waiters_just_frees_the_slot() -> None:
    gate = make_gate(min_concurrency=1)
    assert await gate.acquire(WAIT_S)
    gate.release()
    assert gate.budget.active_retries == 0
    assert await gate.acquire(0.0)
    gate.release()
    assert_idle(gate)


# --- timeout -------------------------------------------------------------------------------


async def test_timeout_returns_false_and_leaves_no_waiter() -> None:
    gate = make_gate(min_concurrency=1)
    assert await gate.acquire(WAIT_S)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert not await gate.acquire(WAIT_S)
    assert loop.time() - start >= WAIT_S * 0.9
    assert not gate._waiters
    assert gate.budget.active_retries == 1  # the failed wait took nothing
    gate.release()
    assert gate.budget.active_retries == 0  # nobody was handed the freed slot
    assert await gate.acquire(0.0)  # and the fast path works again
    gate.release()
    assert_idle(gate)


async def test_timed_out_waiter_does_not_block_later_waiters() -> None:
    gate = make_gate(min_concurrency=1)
    rec = Recorder(gate)
    holder = rec.start("holder")
    await settle()
    short = rec.start("short", WAIT_S)
    await settle()
    patient = rec.start("patient")
    await settle()
    assert await short is False
    assert len(gate._waiters) == 1
    gate.release()
    await settle()
    assert rec.granted == ["holder", "patient"]
    assert await holder and await patient
    gate.release()
    assert_idle(gate)


# --- the budget grows with traffic ---------------------------------------------------------


async def test_request_started_wakes_waiter_when_ratio_allows_more() -> None:
    gate = make_gate(ratio=0.5, min_concurrency=1)
    rec = Recorder(gate)
    holder = rec.start("holder")
    await settle()
    waiter = rec.start("waiter")
    await settle()
    assert rec.granted == ["holder"]

    for _ in range(3):  # int(3 * 0.5) = 1: the floor still rules
        gate.request_started()
    await settle()
    assert rec.granted == ["holder"]
    assert len(gate._waiters) == 1

    gate.request_started()  # int(4 * 0.5) = 2
    assert gate.budget.active_retries == 2  # taken on the waiter's behalf at once
    await settle()
    assert rec.granted == ["holder", "waiter"]
    assert await holder and await waiter

    gate.release()
    gate.release()
    for _ in range(4):
        gate.request_finished()
    assert_idle(gate)


async def test_request_started_wakes_only_as_many_as_budget_allows() -> None:
    gate = make_gate(ratio=0.25, min_concurrency=1)
    rec = Recorder(gate)
    tasks = [rec.start(f"t{i}") for i in range(4)]
    await settle()
    assert rec.granted == ["t0"]
    for _ in range(12):  # int(12 * 0.25) = 3
        gate.request_started()
    await settle()
    assert rec.granted == ["t0", "t1", "t2"]
    assert gate.budget.active_retries == 3
    gate.release()
    await settle()
    assert rec.granted == ["t0", "t1", "t2", "t3"]
    assert all(await asyncio.gather(*tasks))
    for _ in range(3):
        gate.release()
    for _ in range(12):
        gate.request_finished()
    assert_idle(gate)


async def test_request_finished_shrinks_budget_without_revoking_slots() -> None:
    gate = make_gate(ratio=0.5, min_concurrency=1)
    for _ in range(4):
        gate.request_started()
    assert await gate.acquire(0.0)
    assert await gate.acquire(0.0)
    for _ in range(4):
        gate.request_finished()
    assert gate.budget.active_retries == 2  # slots already granted stay granted
    assert not await gate.acquire(0.0)
    gate.release()
    assert not await gate.acquire(0.0)  # 1 retry in flight, floor 1
    gate.release()
    assert_idle(gate)


# --- cancellation --------------------------------------------------------------------------


async def test_cancelled_granted_waiter_passes_slot_on() -> None:
    gate = make_gate(min_concurrency=1)
    rec = Recorder(gate)
    holder = rec.start("holder")
    await settle()
    first = rec.start("first")
    await settle()
    second = rec.start("second")
    await settle()

    gate.release()  # hands the slot to `first`...
    first.cancel()  # ...which goes away before it could run
    with pytest.raises(asyncio.CancelledError):
        await first
    await settle()
    assert rec.granted == ["holder", "second"]
    assert gate.budget.active_retries == 1  # second's slot only: nothing leaked
    assert await holder and await second
    gate.release()
    assert_idle(gate)


async def test_cancelled_granted_waiter_with_nobody_behind_frees_slot() -> None:
    gate = make_gate(min_concurrency=1)
    assert await gate.acquire(0.0)
    rec = Recorder(gate)
    waiter = rec.start("waiter")
    await settle()
    gate.release()
    assert gate.budget.active_retries == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert_idle(gate)


async def test_cancelled_waiting_waiter_takes_nothing_and_leaves_queue() -> None:
    gate = make_gate(min_concurrency=1)
    rec = Recorder(gate)
    holder = rec.start("holder")
    await settle()
    gone = rec.start("gone")
    await settle()
    stays = rec.start("stays")
    await settle()

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert len(gate._waiters) == 1
    assert gate.budget.active_retries == 1

    gate.release()
    await settle()
    assert rec.granted == ["holder", "stays"]
    assert await holder and await stays
    gate.release()
    assert_idle(gate)


async def test_slot_handed_over_as_timer_fires_counts_as_granted(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the race the module guards against: the slot is handed over in the same loop
    # iteration in which the wait times out, before the waiting task runs again.
    timeouts: list[asyncio.Timeout] = []
    real_timeout = asyncio.timeout

    def spy(delay: float | None) -> asyncio.Timeout:
        cm = real_timeout(delay)
        timeouts.append(cm)
        return cm

    monkeypatch.setattr(asyncio, "timeout", spy)
    gate = make_gate(min_concurrency=1)
    assert await gate.acquire(0.0)
    rec = Recorder(gate)
    waiter = rec.start("waiter")
    await settle()
    (cm,) = timeouts
    loop = asyncio.get_running_loop()
    when = loop.time() + WAIT_S
    loop.call_at(when, gate.release)  # scheduled first, so it runs first at the same instant
    cm.reschedule(when)

    assert await waiter is True
    assert cm.expired()  # the timer did fire: the grant won the race
    assert gate.budget.active_retries == 1
    gate.release()
    assert_idle(gate)
