"""Every Prometheus collector of the gateway, on an injected registry.

Per-upstream children are bound once at start-up so the request path never looks up labels.
Gauges that mirror pool state (healthy, in flight, EWMA, state) are read at scrape time by a
custom collector instead of being updated on every request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.policy.classify import Outcome
from gateway.policy.load import fresh
from gateway.policy.outlier import State
from gateway.policy.upstreams import Pool
from gateway.policy.webhooks import Result

# Our own overhead is microseconds to milliseconds; gaps between tokens are milliseconds to seconds.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
GAP_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
FAULTS = ("client", "upstream", "gateway")
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# How a continuation of a cut stream on this upstream went.
CONTINUATION_RESULTS = ("continued", "refused", "failed")
# Transitions into these states count as an ejection, labelled by what caused it.
EJECTION_REASONS = {
    State.EJECTED: "consecutive_failures",
    State.UNHEALTHY: "health_check",
    State.COOLING_DOWN: "rate_limited",
    State.DRAINED: "drained",
}


def gateway_version() -> str:
    """The installed package's version."""
    try:
        return version("failover-gateway")
    except PackageNotFoundError:
        return "unknown"


class UpstreamMetrics:
    """Label children of one upstream, bound once."""

    __slots__ = (
        "chunk_gap",
        "shared_ejections",
        "checks",
        "continuations",
        "ejections",
        "load_reports",
        "outcomes",
        "stream_aborts",
        "ttfb",
        "ttft",
    )

    def __init__(self, m: GatewayMetrics, name: str) -> None:
        self.outcomes = {o: m.upstream_requests.labels(name, o.value) for o in Outcome}
        self.ttfb = m.upstream_ttfb.labels(name)
        self.ttft = m.upstream_ttft.labels(name)
        self.chunk_gap = m.chunk_gap.labels(name)
        self.continuations = {r: m.continuations.labels(name, r) for r in CONTINUATION_RESULTS}
        self.load_reports = {
            (source, result): m.load_reports.labels(name, source, result)
            for source in ("orca", "metrics")
            for result in ("ok", "malformed", "error")
        }
        self.stream_aborts = m.stream_aborts.labels(name)
        self.ejections = {s: m.ejections.labels(name, r) for s, r in EJECTION_REASONS.items()}
        # Ejections and cooldowns adopted from another worker (--workers), so sums count each once.
        self.shared_ejections = m.ejections.labels(name, "shared")
        self.checks = {ok: m.health_checks.labels(name, "pass" if ok else "fail") for ok in (1, 0)}


class GatewayMetrics:
    """All gateway collectors, registered on `registry`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        pool: Pool,
        clock: Callable[[], float],
        requests_in_flight: Callable[[], int],
    ) -> None:
        # _created series double the series count for nothing a dashboard uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        ProcessCollector(registry=registry)  # process_*: RSS, CPU seconds, open fds
        build = Gauge(
            "gateway_build_info", "Always 1; the gateway's version.", ["version"], registry=registry
        )
        build.labels(gateway_version()).set(1)
        self.requests = Counter(
            "gateway_requests", "Requests answered, by status code.", ["code"], registry=registry
        )
        self.errors = Counter(
            "gateway_errors",
            "Non-2xx answers (status 400 and up) by whose fault: client (a bad request, caller "
            "limits, a client that left or whose own deadline passed), upstream (what upstreams "
            "did), gateway (no upstream could be chosen).",
            ["fault"],
            registry=registry,
        )
        self.error_faults = {f: self.errors.labels(f) for f in FAULTS}
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time each request spent in the gateway itself: its total time minus the time spent "
            "waiting on upstreams, on the client taking the response, and on deliberate waits "
            "(retry backoff, Retry-After, the retry budget, saturated engines).",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.chunk_gap = Histogram(
            "gateway_stream_chunk_gap_seconds",
            "Time between content events of a stream, as the gateway receives them (inter-token "
            "latency; events that arrive together count as 0).",
            ["upstream"],
            buckets=GAP_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens reported in the usage of responses (JSON bodies and the final chunk of "
            "streams), by upstream, model (configured names; empty when not routed by model), "
            "caller (configured callers; empty without callers) and kind (prompt, completion).",
            ["upstream", "model", "caller", "kind"],
            registry=registry,
        )
        self._token_children: dict[tuple[str, str, str, str], Counter] = {}
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request received to response complete.",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.upstream_requests = Counter(
            "gateway_upstream_requests",
            "Attempts sent to upstreams, by how they ended.",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.upstream_ttfb = Histogram(
            "gateway_upstream_ttfb_seconds",
            "Time from attempt start to upstream response headers.",
            ["upstream"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self.upstream_ttft = Histogram(
            "gateway_upstream_ttft_seconds",
            "Time from attempt start to the first content event of a stream, or to the response "
            "headers of a response that is not a stream (there the headers come after the whole "
            "generation).",
            ["upstream"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self.model_ttft = Histogram(
            "gateway_model_ttft_seconds",
            "Time to first token as gateway_upstream_ttft_seconds, by model (configured names and "
            "aliases, 'other' for the rest); only for requests routed by model.",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self._model_ttft: dict[str, Histogram] = {}
        self.continuations = Counter(
            "gateway_stream_continuations",
            "Cut streams sent to this upstream to be finished, by result (continued: it answered; "
            "refused: it rejected the continuation; failed: it failed before any output).",
            ["upstream", "result"],
            registry=registry,
        )
        self.load_reports = Counter(
            "gateway_load_reports",
            "Engine load reports read, by source (orca header, polled metrics) and result (ok, "
            "malformed: ignored, error: the poll failed).",
            ["upstream", "source", "result"],
            registry=registry,
        )
        self.saturation_waits = Counter(
            "gateway_saturation_waits",
            "Requests that waited because every engine was saturated, by result (admitted, "
            "rejected: answered 429).",
            ["result"],
            registry=registry,
        )
        self.retries = Counter(
            "gateway_retries",
            "Retries started, by the outcome that caused them.",
            ["reason"],
            registry=registry,
        )
        self.retries_skipped = Counter(
            "gateway_retries_skipped",
            "Retryable failures not retried, by why (budget_exhausted, body_not_replayable, ...).",
            ["reason"],
            registry=registry,
        )
        self.ejections = Counter(
            "gateway_upstream_ejections",
            "Times an upstream was taken out of rotation, by cause (shared: adopted from another "
            "worker under --workers, counted where it happened first).",
            ["upstream", "reason"],
            registry=registry,
        )
        self.stream_aborts = Counter(
            "gateway_stream_aborts",
            "Responses cut off after they started because the upstream failed mid-body.",
            ["upstream"],
            registry=registry,
        )
        self.health_checks = Counter(
            "gateway_health_checks",
            "Active health checks, by result (pass or fail).",
            ["upstream", "result"],
            registry=registry,
        )
        self.panic = Counter(
            "gateway_panic_selections",
            "Attempts sent to an unroutable upstream because no upstream was routable.",
            registry=registry,
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects",
            "Requests abandoned by the client before the response was complete.",
            registry=registry,
        )
        self.model_requests = Counter(
            "gateway_model_requests",
            "Requests answered when models or callers are configured, by model (configured names "
            "and aliases; 'other' for the rest; empty when not routed by model), caller and code.",
            ["model", "caller", "code"],
            registry=registry,
        )
        self.model_fallbacks = Counter(
            "gateway_model_fallbacks",
            "Requests moved on to a fallback model, by the model and the fallback.",
            ["model", "fallback"],
            registry=registry,
        )
        self.webhook_deliveries = Counter(
            "gateway_webhook_deliveries",
            "Webhook delivery attempts by result: delivered, retried (will be tried again), failed "
            "(given up, or refused by the receiver), dropped (the queue was full).",
            ["result"],
            registry=registry,
        )
        self._webhook_results = {r: self.webhook_deliveries.labels(r.value) for r in Result}
        self.per_upstream = {u.name: UpstreamMetrics(self, u.name) for u in pool.upstreams}
        self._codes: dict[int, Counter] = {}
        self._model_codes: dict[tuple[str, str, int], Counter] = {}
        registry.register(PoolCollector(pool, clock, requests_in_flight))

    def count_request(self, status: int, duration_s: float) -> None:
        """Count one answered request."""
        child = self._codes.get(status)
        if child is None:
            child = self._codes[status] = self.requests.labels(str(status))
        child.inc()
        self.request_duration.observe(duration_s)

    def count_webhook(self, result: Result) -> None:
        """Count one webhook delivery attempt (or drop)."""
        self._webhook_results[result].inc()

    def count_tokens(self, upstream: str, model: str, caller: str, prompt: int, completion: int) -> None:
        """Count the tokens one response reported."""
        for kind, n in (("prompt", prompt), ("completion", completion)):
            if n <= 0:
                continue
            key = (upstream, model, caller, kind)
            child = self._token_children.get(key)
            if child is None:
                child = self._token_children[key] = self.tokens.labels(upstream, model, caller, kind)
            child.inc(n)

    def observe_model_ttft(self, model: str, seconds: float) -> None:
        """One TTFT sample of a request routed by model."""
        child = self._model_ttft.get(model)
        if child is None:
            child = self._model_ttft[model] = self.model_ttft.labels(model)
        child.observe(seconds)

    def count_model_request(self, model: str, caller: str, status: int) -> None:
        """Count one answered request by its (bounded) model and caller labels."""
        key = (model, caller, status)
        child = self._model_codes.get(key)
        if child is None:
            child = self._model_codes[key] = self.model_requests.labels(model, caller, str(status))
        child.inc()


def _fresh_gauges() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "gateway_upstream_engine_waiting",
            "Requests waiting in the engine, as its latest fresh load report says.",
            labels=["upstream"],
        ),
        GaugeMetricFamily(
            "gateway_upstream_engine_running",
            "Requests running in the engine, as its latest fresh load report says.",
            labels=["upstream"],
        ),
        GaugeMetricFamily(
            "gateway_upstream_engine_kv_usage",
            "KV cache usage of the engine (0..1), as its latest fresh load report says.",
            labels=["upstream"],
        ),
    )


class PoolCollector(Collector):
    """Pool state read at scrape time."""

    def __init__(self, pool: Pool, clock: Callable[[], float], requests_in_flight: Callable[[], int]) -> None:
        self._pool = pool
        self._clock = clock
        self._requests_in_flight = requests_in_flight

    def collect(self) -> Iterator[Metric]:
        """Yield the live gauges of every upstream."""
        # Scrapes run on the event loop thread, so reading pool state here is consistent.
        now = self._clock()
        healthy = GaugeMetricFamily(
            "gateway_upstream_healthy", "1 while the upstream is routable.", labels=["upstream"]
        )
        inflight = GaugeMetricFamily(
            "gateway_upstream_inflight", "Requests in flight to the upstream.", labels=["upstream"]
        )
        ewma = GaugeMetricFamily(
            "gateway_upstream_latency_ewma_seconds",
            "Peak-EWMA time-to-headers estimate used for selection.",
            labels=["upstream"],
        )
        state = GaugeMetricFamily(
            "gateway_upstream_state",
            "1 for the upstream's current state, 0 for the others.",
            labels=["upstream", "state"],
        )
        routable = 0
        for up in self._pool.upstreams:
            current = up.health.state(now)
            routable += current is State.HEALTHY
            healthy.add_metric([up.name], 1.0 if current is State.HEALTHY else 0.0)
            inflight.add_metric([up.name], up.inflight)
            ewma.add_metric([up.name], up.latency_s)
            for s in State:
                state.add_metric([up.name, s.value], 1.0 if s is current else 0.0)
        yield from self._engine_gauges(now)
        yield from self._redundancy_gauges(now)
        total = GaugeMetricFamily("gateway_routable_upstreams", "Upstreams normal selection can use now.")
        total.add_metric([], routable)
        active = GaugeMetricFamily("gateway_requests_in_flight", "Requests being served now.")
        active.add_metric([], self._requests_in_flight())
        yield from (healthy, inflight, ewma, state, total, active)

    def _redundancy_gauges(self, now: float) -> Iterator[Metric]:
        r = self._pool.redundancy(now)
        level = GaugeMetricFamily(
            "gateway_redundancy_level",
            "Routable upstreams of the primary tier: 0 none, 1 single, 2 dual, 3 multi (3 or more).",
        )
        level.add_metric([], r.level_value)
        degraded = GaugeMetricFamily(
            "gateway_degraded",
            "1 while the fleet is degraded (see GET /admin/redundancy for the reasons).",
        )
        degraded.add_metric([], 1.0 if r.degraded else 0.0)
        yield from (level, degraded)

    def _engine_gauges(self, now: float) -> Iterator[Metric]:
        waiting, running, kv = _fresh_gauges()
        for up in self._pool.upstreams:
            report = fresh(up.engine, now, up.stale_s)
            if report is None:
                continue
            if report.waiting is not None:
                waiting.add_metric([up.name], report.waiting)
            if report.running is not None:
                running.add_metric([up.name], report.running)
            if report.kv is not None:
                kv.add_metric([up.name], report.kv)
        yield from (waiting, running, kv)
