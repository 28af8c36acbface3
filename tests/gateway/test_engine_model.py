"""The engine simulator's pure model: tokens, KV cache with prefix caching, scheduler, outputs.

No event loop and no sockets: the scheduler runs on a simulated clock advanced by each step's
duration, so every time asserted here is exact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest

from gateway.testing.engine.config import EngineConfig
from gateway.testing.engine.kv_cache import KVCache, block_hash
from gateway.testing.engine.orca import orca_header
from gateway.testing.engine.outputs import output_seed, plan_output
from gateway.testing.engine.protocol import BadRequest, parse_request
from gateway.testing.engine.scheduler import Histogram, Output, Scheduler
from gateway.testing.engine.tokens import render_chat, tokenize

SYSTEM = "You are a careful assistant who answers questions about routing. " * 40


def toks(n: int, salt: int = 0) -> tuple[int, ...]:
    return tuple(1000 * salt + i for i in range(n))


@dataclass
class Run:
    """A simulated engine run: when each request got its first and last token."""

    first: dict[str, float] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[Output]] = field(default_factory=dict)
    now: float = 0.0


def run(sched: Scheduler, run_: Run | None = None, max_steps: int = 100_000) -> Run:
    """Step the scheduler on a simulated clock until it is idle."""
    r = run_ or Run()
    for _ in range(max_steps):
        step = sched.schedule(r.now)
        if step is None:
            return r
        r.now += step.duration_s
        for out in sched.complete(step, r.now):
            r.outputs.setdefault(out.request_id, []).append(out)
            if out.first:
                r.first[out.request_id] = r.now
            if out.finish_reason is not None:
                r.done[out.request_id] = r.now
    raise AssertionError("the scheduler did not go idle")


def config(**kw: object) -> EngineConfig:
    base: dict[str, object] = {
        "num_gpu_blocks": 1024,
        "max_model_len": 8192,
        "step_time_s": 0.01,
        "step_time_per_seq_s": 0.001,
        "prefill_time_per_token_s": 0.0001,
    }
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


# --- tokens -------------------------------------------------------------------------------


def test_tokenize_is_deterministic_and_prefix_stable() -> None:
    a = tokenize(SYSTEM + "What is a load balancer?")
    b = tokenize(SYSTEM + "Tell me about caches.")
    assert a == tokenize(SYSTEM + "What is a load balancer?")
    common = len(tokenize(SYSTEM)) - 1  # the last token may merge with what follows
    assert a[:common] == b[:common] and a != b
    assert 0.2 < len(tokenize(SYSTEM)) / len(SYSTEM) < 0.35  # about one token per 4 characters


def test_follow_up_turn_starts_with_previous_prompt_and_answer() -> None:
    cfg = EngineConfig()
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello there"}]
    prompt1 = tokenize(render_chat(turn1))
    plan = plan_output(cfg, prompt1, 20, chat=True, rng=random.Random(output_seed(cfg, prompt1)))
    answer = "".join(plan.pieces)
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    prompt2 = tokenize(render_chat(turn2))
    known = prompt1 + plan.token_ids
    assert prompt2[: len(known)] == known


def test_render_chat_accepts_content_parts_and_refuses_bad_messages() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]
    assert render_chat(parts) == "<|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(ValueError, match="role"):
        render_chat([{"content": "x"}])
    with pytest.raises(ValueError, match="content"):
        render_chat([{"role": "user", "content": 3}])


# --- outputs ------------------------------------------------------------------------------


def test_output_plan_is_the_same_for_the_same_prompt_and_follows_max_tokens() -> None:
    cfg = EngineConfig(output_len=64, output_len_sigma=1.0)
    prompt = tokenize("a prompt")

    def plan(max_tokens: int | None, seed_cfg: EngineConfig = cfg) -> tuple[tuple[int, ...], str]:
        rng = random.Random(output_seed(seed_cfg, prompt))
        p = plan_output(seed_cfg, prompt, max_tokens, chat=False, rng=rng)
        assert tokenize("".join(p.pieces)) == p.token_ids  # every piece is one token
        return p.token_ids, p.finish_reason

    assert plan(None) == plan(None)
    assert plan(7)[0].__len__() == 7 and plan(7)[1] == "length"
    assert plan(None)[1] == "stop"
    other = EngineConfig(output_len=64, output_len_sigma=1.0, seed=5)
    assert plan(None) != plan(None, other)


def test_output_lengths_have_the_configured_median_and_a_long_tail() -> None:
    cfg = EngineConfig(output_len=100, output_len_sigma=1.0)
    lengths = sorted(
        len(plan_output(cfg, (i,), None, chat=True, rng=random.Random(output_seed(cfg, (i,)))).pieces)
        for i in range(2000)
    )
    assert 85 <= lengths[1000] <= 115
    assert lengths[1980] > 5 * lengths[1000]  # p99 far above the median


# --- KV cache -----------------------------------------------------------------------------


def test_kv_cache_shares_hit_blocks_and_counts_references() -> None:
    cache = KVCache(num_blocks=8, block_size=4)
    blocks = cache.allocate(2)
    h0 = block_hash(0, (1, 2, 3, 4))
    h1 = block_hash(h0, (5, 6, 7, 8))
    cache.cache(blocks[0], h0)
    cache.cache(blocks[1], h1)
    hits = cache.lookup([h0, h1, 123])
    assert hits == blocks
    cache.touch(hits)
    assert [b.ref_count for b in blocks] == [2, 2]
    assert cache.usage() == 2 / 8
    cache.free(blocks)
    cache.free(blocks)
    assert cache.usage() == 0.0 and cache.num_free == 8
    assert cache.lookup([h0, h1]) == blocks  # unreferenced, but still cached


def test_kv_cache_evicts_least_recently_freed_tail_first() -> None:
    cache = KVCache(num_blocks=4, block_size=1)
    a = cache.allocate(2)
    b = cache.allocate(2)
    hashes = [block_hash(0, (i,)) for i in range(4)]
    for block, h in zip(a + b, hashes, strict=True):
        cache.cache(block, h)
    cache.free(a)  # freed first: evicted first, its tail block before its head block
    cache.free(b)
    first = cache.allocate(1)
    assert first[0] is a[1] and cache.lookup(hashes[:1]) == [a[0]] and cache.evictions == 1
    assert cache.lookup([hashes[1]]) == []
    cache.touch(cache.lookup([hashes[2]]))  # a hit takes b[0] out of the free queue
    assert cache.allocate(2) == [a[0], b[1]]
    assert not cache.can_allocate(1)


def test_kv_cache_refuses_to_allocate_more_than_free() -> None:
    cache = KVCache(num_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="2 free"):
        cache.allocate(3)


# --- scheduler ----------------------------------------------------------------------------


def test_prefix_hit_skips_prefill_of_cached_blocks() -> None:
    sched = Scheduler(config())
    prefix = toks(1600)
    sched.add("a", prefix + toks(10, 1), toks(4, 9), "length", 0.0)
    r = run(sched)
    sched.add("b", prefix + toks(10, 2), toks(4, 9), "length", r.now)
    start_b = r.now
    run(sched, r)
    sched.add("c", toks(1610, 3), toks(4, 9), "length", r.now)
    start_c = r.now
    run(sched, r)
    ttft_a, ttft_b, ttft_c = r.first["a"], r.first["b"] - start_b, r.first["c"] - start_c
    assert ttft_b < ttft_a / 5 and ttft_c == pytest.approx(ttft_a)
    stats = sched.stats
    assert stats.prefix_cache_hits == 1600  # 100 full blocks of the shared prefix
    assert stats.prefix_cache_queries == 3 * 1610
    assert stats.prefill_tokens_computed == 1610 + 10 + 1610


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    sched = Scheduler(config())
    prompt = toks(64)  # exactly 4 blocks
    sched.add("a", prompt, toks(2, 9), "length", 0.0)
    r = run(sched)
    sched.add("b", prompt, toks(2, 9), "length", r.now)
    run(sched, r)
    assert sched.stats.prefix_cache_hits == 48  # 3 blocks: the 4th holds the token to compute


def test_chunked_prefill_spreads_a_long_prompt_over_budgeted_steps() -> None:
    sched = Scheduler(config(max_num_batched_tokens=512))
    sched.add("a", toks(1500), toks(3, 9), "length", 0.0)
    steps = []
    while (step := sched.schedule(0.0)) is not None:
        steps.append(step)
        sched.complete(step, 0.0)
    assert [s.num_prefill_tokens for s in steps] == [512, 512, 476, 0, 0]
    assert [s.num_decode for s in steps] == [0, 0, 0, 1, 1]


def test_decode_steps_slow_down_as_the_batch_grows() -> None:
    cfg = config(prefill_time_per_token_s=0.0)
    assert cfg.step_duration_s(64, 0) > cfg.step_duration_s(1, 0)
    assert cfg.step_duration_s(1, 0) == pytest.approx(0.011)
    slow = config(speed=0.5, time_scale=0.1)
    assert slow.step_duration_s(1, 100) == pytest.approx((0.01 + 0.001 + 0.01) * 0.1 / 0.5)


def test_batch_is_capped_by_max_num_seqs_and_the_queue_waits() -> None:
    sched = Scheduler(config(max_num_seqs=2))
    for i in range(5):
        sched.add(f"r{i}", toks(20, i), toks(10, 9), "length", 0.0)
    step = sched.schedule(0.0)
    assert step is not None and len(step.scheduled) == 2
    assert sched.num_running == 2 and sched.num_waiting == 3
    sched.complete(step, step.duration_s)
    r = run(sched, Run(now=step.duration_s))
    firsts = [r.first.get(f"r{i}", 0.0) for i in range(5)]
    firsts[0] = firsts[1] = step.duration_s
    assert firsts == sorted(firsts) and firsts[4] > 3 * firsts[0]  # TTFT grows with the queue
    assert sched.stats.completed == 5


def test_full_cache_preempts_and_every_request_still_completes_in_order() -> None:
    # 40 blocks of 16 = 640 tokens; four requests that grow to 300 tokens each cannot all fit.
    sched = Scheduler(config(num_gpu_blocks=40, max_model_len=640))
    for i in range(4):
        sched.add(f"r{i}", toks(100, i), toks(200, 9), "length", 0.0)
    r = run(sched)
    assert sched.stats.preemptions > 0 and sched.stats.completed == 4
    for i in range(4):
        outs = r.outputs[f"r{i}"]
        assert [o.index for o in outs] == list(range(200))  # no token lost or repeated
        assert outs[-1].finish_reason == "length" and outs[0].first
    assert sched.cache.usage() == 0.0
    # recomputation went through the prefix cache or the prefill again, never skipped
    assert sched.stats.prefill_tokens_computed >= 400


def test_abort_frees_the_seat_and_blocks() -> None:
    sched = Scheduler(config(max_num_seqs=1))
    sched.add("a", toks(100), toks(50, 9), "length", 0.0)
    sched.add("b", toks(100, 1), toks(5, 9), "length", 0.0)
    step = sched.schedule(0.0)
    assert step is not None and sched.cache.usage() > 0
    assert sched.abort("a") and not sched.abort("a")
    assert sched.complete(step, 1.0) == []  # the aborted request's step output is dropped
    r = run(sched, Run(now=1.0))
    assert set(r.done) == {"b"} and sched.stats.aborted == 1 and sched.cache.usage() == 0.0


def test_add_refuses_duplicates_and_requests_longer_than_the_context() -> None:
    sched = Scheduler(config(max_model_len=256, num_gpu_blocks=16))
    sched.add("a", toks(10), toks(5), "length", 0.0)
    with pytest.raises(ValueError, match="already"):
        sched.add("a", toks(10), toks(5), "length", 0.0)
    with pytest.raises(ValueError, match="max_model_len 256"):
        sched.add("b", toks(200), toks(100), "length", 0.0)


def test_config_errors_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--speed must be above 0"):
        EngineConfig(speed=0)
    with pytest.raises(ValueError, match="--max-model-len 9999 exceeds the KV cache"):
        EngineConfig(num_gpu_blocks=10, max_model_len=9999)
    with pytest.raises(ValueError, match="--max-num-seqs must be at least 1"):
        EngineConfig(max_num_seqs=0)


def test_histogram_quantiles_use_nearest_rank() -> None:
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.5, 3.0, 4.0):
        h.observe(v)
    assert h.counts == [1, 1, 2] and h.quantile(0.5) == 1.5 and h.quantile(0.99) == 4.0


# --- ORCA and request parsing ---------------------------------------------------------------


def test_orca_header_formats_as_vllm() -> None:
    named = [("num_requests_waiting", 3.0), ("kv_cache_usage_perc", 0.25)]
    assert orca_header("TEXT", named) == (
        "TEXT named_metrics.num_requests_waiting=3.0, named_metrics.kv_cache_usage_perc=0.25"
    )
    value = orca_header("json", named)
    assert value is not None and value.startswith("JSON ")
    assert json.loads(value[5:]) == {"named_metrics": dict(named)}
    assert orca_header("", named) is None and orca_header("proto", named) is None


def test_parse_request_validates_fields() -> None:
    body: dict[str, object] = {
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 9,
    }
    req = parse_request(body, chat=True)
    assert req.stream and req.include_usage and req.max_tokens == 9
    assert parse_request({"prompt": ["one"]}, chat=False).prompt_text == "one"
    cases: list[tuple[object, bool, str | None]] = [
        ([], True, None),
        ({"messages": []}, True, "messages"),
        ({"prompt": 5}, False, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, False, "max_tokens"),
        ({"prompt": "x", "stream": "yes"}, False, "stream"),
        ({"prompt": "x", "n": 2}, False, "n"),
    ]
    for bad, chat, param in cases:
        with pytest.raises(BadRequest) as info:
            parse_request(bad, chat=chat)
        assert info.value.param == param
