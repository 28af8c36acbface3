"""Prometheus collectors of the jobs API, on an injected registry."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def _version() -> str:
    try:
        return version("failover-gateway")
    except PackageNotFoundError:
        return "unknown"


class JobsMetrics:
    """All jobs API collectors."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # _created series double the series count for nothing a dashboard uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        ProcessCollector(registry=registry)  # process_*: RSS, CPU seconds, open fds
        build = Gauge("jobs_build_info", "Always 1; the jobs API's version.", ["version"], registry=registry)
        build.labels(_version()).set(1)
        self.submitted = Counter("jobs_submitted", "Jobs accepted, by type.", ["type"], registry=registry)
        self.finished = Counter(
            "jobs_finished", "Jobs that reached a terminal state.", ["type", "status"], registry=registry
        )
        self.running = Gauge("jobs_running", "Jobs running in this process.", registry=registry)
        self.queued = Gauge("jobs_queued", "Jobs waiting in the store's queue.", registry=registry)
        self.duration = Histogram(
            "jobs_duration_seconds",
            "Time from submission to terminal state.",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.attempts = Counter(
            "jobs_attempts",
            "Attempts run, by how they ended (success, retry, failed, cancelled, timed_out, lost).",
            ["type", "outcome"],
            registry=registry,
        )
