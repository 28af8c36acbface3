"""A vLLM-like inference engine simulator, faithful enough to rank routing policies on.

`mock-inference --engine` serves it. The model, in simulated seconds (a real step lasts its
time * `time_scale` / `speed`):

* Continuous batching (scheduler.py): each engine step computes, for at most `max_num_seqs`
  sequences and at most `max_num_batched_tokens` tokens, one decode token per running sequence
  and chunks of prompts still to prefill (chunked prefill). A step lasts `step_time` +
  `step_time_per_seq` * sequences + `prefill_time_per_token` * prefill tokens, so decoding slows
  as the batch grows and a long uncached prompt costs time for everyone in its steps.
* KV cache (kv_cache.py): `num_gpu_blocks` blocks of `block_size` (16) tokens, automatic prefix
  caching by a hash chain per full block, shared ref-counted blocks, LRU eviction of unreferenced
  cached blocks, preemption by recomputation of the newest running sequence when a running one
  needs a block and none is free. Only the uncached part of a prompt is prefilled.
* Tokens (tokens.py): no tokenizer; text is cut into pieces of up to 4 characters, ids are
  CRC-32s, chats are rendered with a fixed template, so equal prefixes give equal tokens.
* Answers (outputs.py): `max_tokens` long when given, else a seeded log-normal length (median
  `output_len`, shape `output_len_sigma`) drawn from the prompt, so every instance answers a
  request alike.
* HTTP (server.py): /v1/chat/completions and /v1/completions (SSE headers at admission, first
  content after prefill, `usage` with cached tokens), vLLM's /metrics names, the ORCA
  `endpoint-load-metrics` header (orca.py), /health, /v1/models and /stats.
"""

from gateway.testing.engine.config import EngineConfig
from gateway.testing.engine.server import ENGINE, create_engine_app

__all__ = ["ENGINE", "EngineConfig", "create_engine_app"]
