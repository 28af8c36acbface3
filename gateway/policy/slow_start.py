"""Slow start: a new or recovered upstream's weight ramps up instead of jumping to full share.

As Envoy's slow start: for `window_s` after the upstream (re)entered service its weight is
scaled by max(MIN_FACTOR, (elapsed / window_s) ** (1 / aggression)). Aggression 1 is a linear
ramp; above 1 the weight climbs faster early on, below 1 slower. MIN_FACTOR (Envoy's default
min_weight_percent, 10%) keeps the first seconds from sending nothing, so the upstream is still
measured. A window of 0 turns slow start off. Pure: `elapsed_s` is passed in.
"""

from __future__ import annotations

from typing import Final

MIN_FACTOR: Final = 0.1


def ramp(elapsed_s: float, window_s: float, aggression: float = 1.0) -> float:
    """The weight factor, in [MIN_FACTOR, 1], `elapsed_s` after the upstream entered service."""
    if window_s <= 0 or elapsed_s >= window_s:
        return 1.0
    progress = max(elapsed_s, 0.0) / window_s
    factor: float = progress ** (1.0 / aggression)
    return max(MIN_FACTOR, factor)
