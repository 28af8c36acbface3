"""A vLLM-v1-like continuous-batching scheduler over simulated time [pure].

Each `schedule(now)` plans one engine step within a token budget (`max_num_batched_tokens`):
running sequences first, in order (a decode is 1 token, an unfinished prefill takes what the
budget leaves: chunked prefill), then waiting ones in arrival order while fewer than
`max_num_seqs` run. A waiting sequence starts after its longest cached prefix (whole blocks, at
least its last token computed). A running sequence that needs a block when none is free preempts
the most recently started one (recompute: its blocks are freed, it goes back to the head of the
queue with its output so far, and is prefilled again, partly from the cache). `complete(step,
now)` applies the step: a sequence whose known tokens are all computed samples one token; full
blocks join the prefix cache; finished sequences free their blocks. The step's length is
`EngineConfig.step_duration_s`. The caller owns the clock: it passes `now` in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from gateway.testing.engine.config import EngineConfig
from gateway.testing.engine.kv_cache import ROOT_HASH, Block, KVCache, block_hash
from gateway.testing.engine.tokens import Tokens

__all__ = [
    "E2E_BUCKETS",
    "TTFT_BUCKETS",
    "EngineStats",
    "Histogram",
    "Output",
    "RequestState",
    "Scheduler",
    "SimRequest",
    "Step",
]

# vLLM's buckets for vllm:time_to_first_token_seconds and vllm:e2e_request_latency_seconds
TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS: Final = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_WINDOW: Final = 10_000  # recent samples kept for quantiles


class RequestState(StrEnum):
    """Where a request is in the engine."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SimRequest:
    """A sequence in the engine: its prompt, the output it will produce, and its progress."""

    request_id: str
    prompt: Tokens
    output: Tokens  # every token it will sample, in order
    finish_reason: str  # reported after the last output token ("length" or "stop")
    arrival_s: float
    state: RequestState = RequestState.WAITING
    num_computed: int = 0  # tokens whose KV is in `blocks`
    num_output: int = 0  # output tokens sampled so far
    blocks: list[Block] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hash chain of its full blocks so far
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    num_preemptions: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    first_token_s: float | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: the prompt and the output sampled."""
        return len(self.prompt) + self.num_output

    def block_tokens(self, index: int, block_size: int) -> Tokens:
        """The token ids of block `index` (it must be within the known tokens)."""
        start, end = index * block_size, (index + 1) * block_size
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        out = self.output[max(0, start - n) : end - n]
        return self.prompt[start:n] + out if start < n else out


@dataclass(frozen=True)
class Step:
    """One planned engine step: which sequences compute how many tokens, and for how long."""

    scheduled: tuple[tuple[SimRequest, int], ...]
    num_decode: int
    num_prefill_tokens: int
    duration_s: float
    preempted: tuple[str, ...] = ()


@dataclass(frozen=True)
class Output:
    """A token a request sampled in a step (`index` in its output); `finish_reason` on its last."""

    request_id: str
    index: int
    first: bool
    finish_reason: str | None


class Histogram:
    """Counts per upper bound (Prometheus style, not cumulative here), a sum, and recent samples."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0
        self.recent: deque[float] = deque(maxlen=_WINDOW)

    def observe(self, value: float) -> None:
        """Record one sample."""
        i = 0
        while i < len(self.buckets) and value > self.buckets[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.count += 1
        self.recent.append(value)

    def quantile(self, q: float) -> float | None:
        """The `q` quantile (0..1, nearest rank) of the recent samples; None without samples."""
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class EngineStats:
    """Cumulative counters, named like vLLM's metrics where it has one."""

    completed: int = 0
    aborted: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up (first scheduling only, as vLLM)
    prefix_cache_hits: int = 0  # of those, tokens found cached
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefill_tokens_computed: int = 0  # prompt tokens really computed, recomputation included
    steps: int = 0
    busy_s: float = 0.0
    success_by_reason: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits over queries (0 before any)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class Scheduler:
    """The engine core: waiting queue, running batch, KV cache and counters."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.cache = KVCache(config.num_gpu_blocks, config.block_size)
        self.stats = EngineStats()
        self._requests: dict[str, SimRequest] = {}
        self._waiting: deque[SimRequest] = deque()
        self._running: list[SimRequest] = []

    @property
    def num_running(self) -> int:
        """Requests in the batch (vllm:num_requests_running)."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued or preempted (vllm:num_requests_waiting)."""
        return len(self._waiting)

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._running or self._waiting)

    def add(
        self, request_id: str, prompt: Tokens, output: Tokens, finish_reason: str, now: float
    ) -> SimRequest:
        """Queue a request; ValueError if its id is in use or it could never fit in the cache."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if not prompt or not output:
            raise ValueError("a request needs at least one prompt token and one output token")
        total = len(prompt) + len(output)
        if total > self.config.max_model_len:
            raise ValueError(
                f"{len(prompt)} prompt tokens + {len(output)} output tokens exceed "
                f"max_model_len {self.config.max_model_len}"
            )
        req = SimRequest(request_id, prompt, output, finish_reason, now)
        self._requests[request_id] = req
        self._waiting.append(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Drop a request (its client left); False if it is not in the engine."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req.state is RequestState.WAITING:
            self._waiting.remove(req)
        else:
            self._running.remove(req)
        self._release(req)
        self.stats.aborted += 1
        return True

    def schedule(self, now: float) -> Step | None:
        """Plan the next step; None when there is nothing to compute."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        preempted: list[str] = []
        i = 0
        while i < len(self._running) and budget > 0:
            req = self._running[i]
            num_new = min(req.num_tokens - req.num_computed, budget)
            while not self._grow(req, num_new):
                victim = self._running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.state is not RequestState.RUNNING:
                break
            scheduled.append((req, num_new))
            budget -= num_new
            i += 1
        if not preempted or not scheduled:  # as vLLM: no new admissions in a step that preempted
            budget = self._admit(scheduled, budget)
        if not scheduled:
            return None
        num_decode = sum(1 for req, n in scheduled if n == 1 and req.num_computed >= len(req.prompt))
        num_tokens = self.config.max_num_batched_tokens - budget
        prefill = num_tokens - num_decode
        duration = self.config.step_duration_s(len(scheduled), prefill)
        return Step(tuple(scheduled), num_decode, prefill, duration, tuple(preempted))

    def complete(self, step: Step, now: float) -> list[Output]:
        """Apply a finished step at `now`: tokens sampled, blocks cached, requests finished."""
        outputs: list[Output] = []
        stats = self.stats
        stats.steps += 1
        stats.busy_s += step.duration_s
        bs = self.config.block_size
        for req, n in step.scheduled:
            if req.state is not RequestState.RUNNING:  # aborted while the step ran
                continue
            if req.num_computed < len(req.prompt) + max(0, req.num_output - 1):
                stats.prefill_tokens_computed += n
            req.num_computed += n
            if req.num_computed // bs > req.num_cached_blocks:
                self._cache_blocks(req)
            if req.num_computed < req.num_tokens:
                continue  # a prefill chunk that is not the last
            index = req.num_output
            req.num_output += 1
            stats.generation_tokens += 1
            first = index == 0
            if first:
                req.first_token_s = now
                stats.prompt_tokens += len(req.prompt)
                stats.ttft.observe(now - req.arrival_s)
            done = req.num_output >= len(req.output)
            outputs.append(Output(req.request_id, index, first, req.finish_reason if done else None))
            if done:
                self._finish(req, now)
        return outputs

    def _admit(self, scheduled: list[tuple[SimRequest, int]], budget: int) -> int:
        """Start waiting requests in order while seats, budget and blocks allow; return the budget left."""
        bs = self.config.block_size
        while self._waiting and len(self._running) < self.config.max_num_seqs and budget > 0:
            req = self._waiting[0]
            # at least the last known token is computed, so the step samples from it
            limit = (req.num_tokens - 1) // bs
            self._extend_hashes(req, limit)
            hits = self.cache.lookup(req.hashes[:limit])
            computed = len(hits) * bs
            num_new = min(req.num_tokens - computed, budget)
            needed = -(-(computed + num_new) // bs) - len(hits)
            if not self.cache.can_allocate(needed, hits):
                break
            self.cache.touch(hits)
            req.blocks = hits + self.cache.allocate(needed)
            req.num_computed = computed
            req.num_cached_blocks = len(hits)
            if req.num_preemptions == 0:
                req.cached_prompt_tokens = computed
                self.stats.prefix_cache_queries += req.num_tokens
                self.stats.prefix_cache_hits += computed
            self._waiting.popleft()
            req.state = RequestState.RUNNING
            self._running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new
        return budget

    def _grow(self, req: SimRequest, num_new: int) -> bool:
        """Give `req` the blocks for `num_new` more tokens; False if there are not enough free."""
        needed = -(-(req.num_computed + num_new) // self.config.block_size) - len(req.blocks)
        if needed <= 0:
            return True
        if not self.cache.can_allocate(needed):
            return False
        req.blocks.extend(self.cache.allocate(needed))
        return True

    def _preempt(self, req: SimRequest) -> None:
        self._release(req)
        req.state = RequestState.WAITING
        req.num_preemptions += 1
        self.stats.preemptions += 1
        self._waiting.appendleft(req)

    def _release(self, req: SimRequest) -> None:
        self.cache.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_cached_blocks = 0
        req.state = RequestState.FINISHED

    def _finish(self, req: SimRequest, now: float) -> None:
        self._running.remove(req)
        del self._requests[req.request_id]
        self._release(req)
        stats = self.stats
        stats.completed += 1
        stats.success_by_reason[req.finish_reason] = stats.success_by_reason.get(req.finish_reason, 0) + 1
        stats.e2e.observe(now - req.arrival_s)

    def _extend_hashes(self, req: SimRequest, num_blocks: int) -> None:
        bs = self.config.block_size
        hashes = req.hashes
        while len(hashes) < num_blocks:
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(block_hash(parent, req.block_tokens(len(hashes), bs)))

    def _cache_blocks(self, req: SimRequest) -> None:
        full = min(req.num_computed // self.config.block_size, len(req.blocks))
        self._extend_hashes(req, full)
        for j in range(req.num_cached_blocks, full):
            self.cache.cache(req.blocks[j], req.hashes[j])
        req.num_cached_blocks = full
