"""What a simulated request answers: its length and its words, from the prompt and a seed [pure].

With `max_tokens` the answer is exactly that long (finish reason "length"). Without it the
length is drawn from a log-normal distribution with median `output_len` and shape
`output_len_sigma` (a long tail), capped by the context window ("length" when capped, else
"stop"). The draw is seeded by the engine's seed and the prompt's tokens, so the same request
gets the same answer on every instance, whatever the arrival order: routing policies compared
on one workload see the same output lengths. Words come from a vocabulary of words of at most
4 characters, so each word (with its leading space) is exactly one token of `tokens.tokenize`
and a conversation that repeats an answer repeats its tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

from gateway.testing.engine.config import EngineConfig
from gateway.testing.engine.tokens import Tokens, token_id

__all__ = ["VOCABULARY", "OutputPlan", "output_seed", "plan_output"]

VOCABULARY: Final = (
    "the", "of", "and", "to", "a", "in", "is", "it", "that", "for", "on", "with", "as", "was",
    "be", "by", "this", "are", "or", "from", "at", "an", "but", "not", "have", "can", "one",
    "all", "will", "more", "we", "they", "some", "so", "if", "then", "time", "data", "node",
    "load", "hit", "fast", "slow", "next", "each", "path", "cost", "key", "tail", "head",
    "page", "disk", "run", "step", "file", "user", "code", "test", "unit", "port", "host",
    "way", "yes", "no",
)  # fmt: skip


@dataclass(frozen=True)
class OutputPlan:
    """The text pieces of an answer (one per token), their token ids, and why it ends."""

    pieces: tuple[str, ...]
    token_ids: Tokens
    finish_reason: str


def output_seed(config: EngineConfig, prompt: Tokens) -> str:
    """The seed of the generator to draw `prompt`'s answer with (the same on every instance)."""
    return f"{config.seed}:{hash(prompt)}"


def plan_output(
    config: EngineConfig, prompt: Tokens, max_tokens: int | None, *, chat: bool, rng: random.Random
) -> OutputPlan:
    """The answer to `prompt`, drawn with `rng` (seeded by `output_seed`); `max_tokens` must fit
    the context window (the caller checks)."""
    limit = max(1, config.max_model_len - len(prompt))
    if max_tokens is not None:
        n, reason = max_tokens, "length"
    else:
        drawn = round(rng.lognormvariate(math.log(config.output_len), config.output_len_sigma))
        n = max(1, min(drawn, limit))
        reason = "length" if drawn >= limit else "stop"
    words = rng.choices(VOCABULARY, k=n)
    # a chat answer starts its content with a bare word; a completion continues the prompt
    pieces = tuple(w if i == 0 and chat else " " + w for i, w in enumerate(words))
    return OutputPlan(pieces, tuple(token_id(p) for p in pieces), reason)
