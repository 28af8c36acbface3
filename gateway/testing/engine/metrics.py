"""vLLM's Prometheus metrics, read from the simulated engine at scrape time.

Names, help texts and labels (`model_name`, `engine`) are vLLM v1's (vllm/v1/metrics/loggers.py);
counters get `_total` on the wire as prometheus_client writes them.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.testing.engine.scheduler import Histogram, Scheduler

__all__ = ["EngineCollector"]

_LABELS = ("model_name", "engine")


class EngineCollector(Collector):
    """Exposes one engine's gauges, counters and latency histograms."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterable[Metric]:
        """Yield the current values (called by the registry on every scrape)."""
        sched = self._scheduler
        stats = sched.stats
        values = [sched.config.model_name, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=_LABELS)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=_LABELS)
            c.add_metric(values, value)
            return c

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", sched.num_running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", sched.num_waiting
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", sched.cache.usage()
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        )
        yield counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", stats.preemptions
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=(*_LABELS, "finished_reason"),
        )
        for reason in ("stop", "length", "abort"):
            count = stats.aborted if reason == "abort" else stats.success_by_reason.get(reason, 0)
            success.add_metric([*values, reason], count)
        yield success
        yield _histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            values,
            stats.ttft,
        )
        yield _histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            values,
            stats.e2e,
        )


def _histogram(name: str, doc: str, values: list[str], hist: Histogram) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=_LABELS)
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*hist.buckets, float("inf")), hist.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    h.add_metric(values, buckets, hist.total)
    return h
