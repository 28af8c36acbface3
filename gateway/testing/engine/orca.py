"""ORCA load reports in vLLM's `endpoint-load-metrics` response header format [pure].

A request carrying `endpoint-load-metrics-format: TEXT` (or `JSON`, any case) gets
`endpoint-load-metrics: TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.25`
(or `JSON {"named_metrics": {...}}`) on a non-streaming response, as vLLM's
entrypoints/openai/orca_metrics.py writes it: values are Python floats, JSON by `json.dumps`.
Another format, or an empty one, gets no header.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

__all__ = ["REQUEST_HEADER", "RESPONSE_HEADER", "orca_header"]

REQUEST_HEADER: Final = "endpoint-load-metrics-format"
RESPONSE_HEADER: Final = "endpoint-load-metrics"


def orca_header(metrics_format: str, named_metrics: Sequence[tuple[str, float]]) -> str | None:
    """The header value for `metrics_format` ("TEXT" or "JSON"), or None for any other format."""
    fmt = metrics_format.lower()
    if fmt == "text":
        return "TEXT " + ", ".join(f"named_metrics.{name}={float(v)}" for name, v in named_metrics)
    if fmt == "json":
        return "JSON " + json.dumps({"named_metrics": {name: float(v) for name, v in named_metrics}})
    return None
