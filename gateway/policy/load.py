"""Engine-reported load: what an inference engine says about its own queue and KV cache.

Two sources, both as vLLM writes them:
  ORCA response header `endpoint-load-metrics`, on non-streaming responses to requests that
    carry `endpoint-load-metrics-format: TEXT` (or `JSON`):
      TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=2.0
      JSON {"named_metrics": {"kv_cache_usage_perc": 0.4, "num_requests_waiting": 2.0}}
  The engine's Prometheus text at `/metrics`: `vllm:num_requests_waiting`,
    `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (SGLang: `sglang:num_queue_reqs`,
    `sglang:num_running_reqs`, `sglang:token_usage`); samples of one name are summed over their
    labels (one engine may serve several model names).
Each sidecar sees only its own requests; the engine's numbers are what many sidecars share. A
report older than `stale_s` is ignored. Pure: text and time in, reports out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

ORCA_HEADER = b"endpoint-load-metrics"
ORCA_REQUEST_FIELD = b"Endpoint-Load-Metrics-Format: TEXT\r\n"

DEFAULT_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
DEFAULT_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
DEFAULT_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")

_ORCA_WAITING = ("num_requests_waiting",)
_ORCA_RUNNING = ("num_requests_running",)
_ORCA_KV = ("kv_cache_usage_perc", "kv_cache_utilization", "gpu_cache_usage_perc")
# name{labels} value [timestamp]; label values may hold spaces and escaped quotes.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)')


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One load report of an engine, and when it arrived (monotonic seconds)."""

    at: float
    waiting: float | None = None
    running: float | None = None
    kv: float | None = None  # KV cache usage, 0..1

    @property
    def requests(self) -> float | None:
        """Requests the engine holds (waiting and running), if it said."""
        if self.waiting is None and self.running is None:
            return None
        return (self.waiting or 0.0) + (self.running or 0.0)


class MalformedReport(ValueError):
    """A load report that could not be read."""


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise MalformedReport(f"not a usable load value: {text!r}")
    return value


def _first(values: dict[str, float], names: Sequence[str]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def _report(
    values: dict[str, float], at: float, waiting: Sequence[str], running: Sequence[str], kv: Sequence[str]
) -> EngineLoad:
    report = EngineLoad(at, _first(values, waiting), _first(values, running), _first(values, kv))
    if report.waiting is None and report.running is None and report.kv is None:
        raise MalformedReport("the report has none of the load values")
    if report.kv is not None and report.kv > 1.0:
        report = EngineLoad(at, report.waiting, report.running, report.kv / 100.0)  # given in percent
    return report


def parse_orca(value: str, at: float) -> EngineLoad:
    """An `endpoint-load-metrics` header value; raises MalformedReport."""
    text = value.strip()
    kind, _, rest = text.partition(" ")
    values: dict[str, float] = {}
    try:
        if kind.upper() == "JSON":
            obj = orjson.loads(rest)
            named = obj.get("named_metrics") if isinstance(obj, dict) else None
            if not isinstance(named, dict):
                raise MalformedReport("JSON report without named_metrics")
            values = {str(k): _number(str(v)) for k, v in named.items() if isinstance(v, int | float)}
        else:
            body = rest if kind.upper() == "TEXT" else text
            for item in body.split(","):
                name, sep, number = item.strip().partition("=")
                if not sep:
                    raise MalformedReport(f"not name=value: {item.strip()!r}")
                values[name.strip().removeprefix("named_metrics.")] = _number(number.strip())
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise MalformedReport(str(exc)) from None
    return _report(values, at, _ORCA_WAITING, _ORCA_RUNNING, _ORCA_KV)


@dataclass(frozen=True, slots=True)
class MetricNames:
    """Which Prometheus names carry an engine's load; the first one present is used."""

    waiting: tuple[str, ...] = DEFAULT_WAITING
    running: tuple[str, ...] = DEFAULT_RUNNING
    kv: tuple[str, ...] = DEFAULT_KV


def parse_prometheus(text: str, names: MetricNames, at: float) -> EngineLoad:
    """An engine's Prometheus text exposition; raises MalformedReport."""
    wanted = set(names.waiting) | set(names.running) | set(names.kv)
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name = match.group(1)
        if name in wanted:
            try:
                values[name] = values.get(name, 0.0) + _number(match.group(2))
            except ValueError as exc:
                raise MalformedReport(f"{name}: {exc}") from None
    return _report(values, at, names.waiting, names.running, names.kv)


def fresh(report: EngineLoad | None, now: float, stale_s: float) -> EngineLoad | None:
    """The report if it is recent enough to route on."""
    if report is None or now - report.at > stale_s:
        return None
    return report
