"""The engine simulator's parameters, validated once [pure]."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Final

__all__ = ["FLAGS", "EngineConfig"]

# field -> command-line flag, so an error names what the user typed
FLAGS: Final = {
    "model_name": "--model",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "num_gpu_blocks": "--num-gpu-blocks",
    "block_size": "--block-size",
    "max_model_len": "--max-model-len",
    "step_time_s": "--step-time",
    "step_time_per_seq_s": "--step-time-per-seq",
    "prefill_time_per_token_s": "--prefill-time-per-token",
    "output_len": "--output-len",
    "output_len_sigma": "--output-len-sigma",
    "speed": "--speed",
    "time_scale": "--time-scale",
    "seed": "--seed",
}


@dataclass(frozen=True)
class EngineConfig:
    """What the simulated engine is: its batch and cache sizes, its speed, its output lengths.

    Times are seconds of the simulated GPU at `speed` 1 and `time_scale` 1; a step really takes
    (its time) * time_scale / speed.
    """

    model_name: str = "mock-model"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    num_gpu_blocks: int = 8192
    block_size: int = 16
    max_model_len: int = 32768
    step_time_s: float = 0.010
    step_time_per_seq_s: float = 0.0002
    prefill_time_per_token_s: float = 0.00005
    output_len: int = 128
    output_len_sigma: float = 1.0
    speed: float = 1.0
    time_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            flag = FLAGS[f.name]
            if f.name == "model_name":
                if not isinstance(value, str) or not value:
                    raise ValueError(f"{flag} must be a non-empty string")
            elif f.type == "int":
                if type(value) is not int:
                    raise ValueError(f"{flag} must be an integer")
                if f.name != "seed" and value < 1:
                    raise ValueError(f"{flag} must be at least 1")
            else:
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ValueError(f"{flag} must be a finite number")
                positive = f.name in ("speed", "time_scale")
                if value < 0 or (positive and value == 0):
                    raise ValueError(f"{flag} must be {'above' if positive else 'at least'} 0")
        if self.max_model_len > self.capacity_tokens:
            raise ValueError(
                f"--max-model-len {self.max_model_len} exceeds the KV cache "
                f"({self.num_gpu_blocks} blocks of {self.block_size} = {self.capacity_tokens} tokens)"
            )

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.num_gpu_blocks * self.block_size

    def step_duration_s(self, num_seqs: int, prefill_tokens: int) -> float:
        """Real seconds one engine step takes with `num_seqs` sequences and that many prefill tokens."""
        simulated = (
            self.step_time_s
            + self.step_time_per_seq_s * num_seqs
            + self.prefill_time_per_token_s * prefill_tokens
        )
        return simulated * self.time_scale / self.speed
