"""Prometheus collectors of the jobs API, on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class JobsMetrics:
    """All jobs API collectors."""

    def __init__(self, registry: CollectorRegistry) -> None:
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
