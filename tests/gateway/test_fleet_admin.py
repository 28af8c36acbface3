"""The supervisor's merges of worker answers, on plain values: no sockets, no processes."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.policy.redundancy import Member, assess
from gateway.workers.fleet_admin import (
    WorkerAnswer,
    merge_events,
    merge_metrics,
    merge_mutation,
    merge_readiness,
    merge_redundancy,
    merge_upstreams,
    mutation_path,
)


def scrape(requests: int, inflight: int, durations: list[float]) -> str:
    """A worker's exposition, rendered the way the worker's /metrics renders it."""
    registry = CollectorRegistry()
    counter = Counter(
        "gateway_requests", 'Requests answered, by "code".\nSecond line.', ["code"], registry=registry
    )
    counter.labels("200").inc(requests)
    Gauge("gateway_requests_in_flight", "Requests being served now.", registry=registry).set(inflight)
    histogram = Histogram(
        "gateway_request_duration_seconds", "Durations.", buckets=(0.1, 1.0), registry=registry
    )
    for d in durations:
        histogram.observe(d)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_merge_metrics_labels_every_sample_with_its_worker() -> None:
    merged = merge_metrics({0: scrape(3, 1, [0.05]), 1: scrape(5, 0, [0.5, 2.0])})
    values = samples(merged)
    assert values[("gateway_requests_total", frozenset({("code", "200"), ("worker", "0")}))] == 3
    assert values[("gateway_requests_total", frozenset({("code", "200"), ("worker", "1")}))] == 5
    assert values[("gateway_requests_in_flight", frozenset({("worker", "0")}))] == 1
    assert values[("gateway_request_duration_seconds_count", frozenset({("worker", "1")}))] == 2
    bucket = ("gateway_request_duration_seconds_bucket", frozenset({("le", "1.0"), ("worker", "1")}))
    assert values[bucket] == 1
    assert values[("gateway_worker_up", frozenset({("worker", "0")}))] == 1
    assert values[("gateway_worker_up", frozenset({("worker", "1")}))] == 1
    every = [s for s in values if s[0] != "gateway_worker_up"]
    assert all(("worker", "0") in labels or ("worker", "1") in labels for _, labels in every)


def test_merge_metrics_help_and_type_once_per_family() -> None:
    merged = merge_metrics({0: scrape(1, 0, []), 1: scrape(1, 0, []), 2: scrape(1, 0, [])})
    lines = merged.splitlines()
    meta = [line for line in lines if line.startswith("#")]
    assert len(meta) == len(set(meta))
    assert meta.count("# TYPE gateway_requests_total counter") == 1
    assert meta.count("# TYPE gateway_request_duration_seconds histogram") == 1
    # Every sample of a family sits under its one TYPE line (the text format requires grouping).
    families = list(text_string_to_metric_families(merged))
    assert len({f.name for f in families}) == len(families)
    requests = next(f for f in families if f.name == "gateway_requests")
    assert requests.type == "counter"
    assert requests.documentation == 'Requests answered, by "code".\nSecond line.'
    assert len([s for s in requests.samples if s.name == "gateway_requests_total"]) == 3


def test_merge_metrics_output_parses_again_with_every_family_and_type() -> None:
    worker = scrape(2, 0, [0.2])
    merged = merge_metrics({0: worker, 1: scrape(4, 0, [])})
    before = {f.name: f.type for f in text_string_to_metric_families(worker)}
    after = {f.name: f.type for f in text_string_to_metric_families(merged)}
    assert after == {**before, "gateway_worker_up": "gauge"}
    # Each worker's series is the worker's own series plus the label: nothing lost, nothing added.
    own = {(name, labels | {("worker", "0")}) for name, labels in samples(worker)}
    assert own <= samples(merged).keys()


def test_merge_metrics_worker_without_answer_is_only_down() -> None:
    merged = merge_metrics({0: scrape(7, 0, []), 1: None})
    values = samples(merged)
    assert values[("gateway_worker_up", frozenset({("worker", "1")}))] == 0
    assert values[("gateway_worker_up", frozenset({("worker", "0")}))] == 1
    assert not any(("worker", "1") in labels for name, labels in values if name != "gateway_worker_up")


def test_merge_metrics_rejects_text_that_is_not_exposition() -> None:
    with pytest.raises(ValueError):
        merge_metrics({0: "this is { not prometheus\n"})


def view(name: str, drained: bool = False) -> dict[str, Any]:
    return {"name": name, "state": "drained" if drained else "healthy", "drained": drained}


def test_merge_upstreams_keeps_worker_zero_shape_and_adds_workers() -> None:
    answers = [
        WorkerAnswer(0, 100, 200, {"strategy": "latency", "upstreams": [view("a"), view("b")]}),
        WorkerAnswer(1, 101, 200, {"strategy": "latency", "upstreams": [view("a", True), view("b")]}),
    ]
    merged = merge_upstreams(answers)
    assert merged is not None
    assert merged["strategy"] == "latency"
    assert merged["upstreams"] == [view("a"), view("b")]
    assert merged["workers"] == [
        {"worker": 0, "pid": 100, "upstreams": [view("a"), view("b")]},
        {"worker": 1, "pid": 101, "upstreams": [view("a", True), view("b")]},
    ]


def test_merge_upstreams_uses_first_answering_worker_and_reports_the_others() -> None:
    answers = [
        WorkerAnswer(0, None, error="not running (being replaced)"),
        WorkerAnswer(1, 101, 200, {"strategy": "priority", "upstreams": [view("a")]}),
    ]
    merged = merge_upstreams(answers)
    assert merged is not None
    assert merged["strategy"] == "priority"
    assert merged["workers"][0] == {"worker": 0, "pid": None, "error": "not running (being replaced)"}
    assert merge_upstreams([WorkerAnswer(0, 1, error="no answer")]) is None


def test_merge_events_tags_worker_and_sorts_by_time() -> None:
    answers = [
        WorkerAnswer(
            0, 100, 200, {"events": [{"time": 1.0, "upstream": "a"}, {"time": 5.0, "upstream": "b"}]}
        ),
        WorkerAnswer(1, 101, 200, {"events": [{"time": 3.0, "upstream": "a"}]}),
        WorkerAnswer(2, 102, error="no answer"),
    ]
    merged = merge_events(answers)
    assert [(e["time"], e["worker"]) for e in merged["events"]] == [(1.0, 0), (3.0, 1), (5.0, 0)]
    assert merged["unavailable_workers"] == [2]


def test_merge_readiness_ready_only_when_every_worker_is() -> None:
    ready = {"status": "ready", "routable_upstreams": 2}
    status, body = merge_readiness([WorkerAnswer(0, 100, 200, ready), WorkerAnswer(1, 101, 200, ready)])
    assert status == 200
    assert body["status"] == "ready"
    assert body["routable_upstreams"] == 2

    partly = {"status": "no_routable_upstream", "routable_upstreams": 0}
    status, body = merge_readiness([WorkerAnswer(0, 100, 200, ready), WorkerAnswer(1, 101, 503, partly)])
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["routable_upstreams"] == 0
    assert body["workers"][1] == {"worker": 1, "pid": 101, **partly}

    status, body = merge_readiness([WorkerAnswer(0, 100, 200, ready), WorkerAnswer(1, None, error="gone")])
    assert status == 503
    assert body["workers"][1]["status"] == "unavailable"


def test_merge_mutation_answers_like_worker_zero_when_all_agree() -> None:
    answers = [WorkerAnswer(0, 100, 200, view("a", True)), WorkerAnswer(1, 101, 200, view("a", True))]
    status, body = merge_mutation(answers)
    assert status == 200
    assert body["name"] == "a" and body["drained"] is True
    assert [(w["worker"], w["status"]) for w in body["workers"]] == [(0, 200), (1, 200)]


def test_merge_mutation_unknown_upstream_stays_404() -> None:
    missing = {"error": {"type": "not_found", "message": "no upstream named 'z'"}}
    status, body = merge_mutation([WorkerAnswer(0, 100, 404, missing), WorkerAnswer(1, 101, 404, missing)])
    assert status == 404
    assert body["error"]["type"] == "not_found"


def test_merge_mutation_partial_application_is_502() -> None:
    answers = [WorkerAnswer(0, 100, 200, view("a", True)), WorkerAnswer(1, None, error="not running")]
    status, body = merge_mutation(answers)
    assert status == 502
    assert body["error"]["type"] == "workers_disagree"
    assert "1 of 2" in body["error"]["message"]


def test_mutation_path_quotes_the_name() -> None:
    assert mutation_path("vllm-a", True) == "/admin/upstreams/vllm-a/drain"
    assert mutation_path("a/b", False) == "/admin/upstreams/a%2Fb/enable"


def test_merge_redundancy_is_the_worst_worker_with_each_view() -> None:
    good = assess([Member("a", 0, True), Member("b", 0, True)]).to_json()
    thin = assess([Member("a", 0, True), Member("b", 0, False)]).to_json()
    merged = merge_redundancy([WorkerAnswer(0, 10, 200, good), WorkerAnswer(1, 11, 200, thin)])
    assert (merged["level"], merged["level_value"], merged["degraded"]) == ("single", 1, False)
    assert [w["level"] for w in merged["workers"]] == ["dual", "single"]
    assert merged["workers"][1]["pid"] == 11


def test_merge_redundancy_silent_worker_makes_the_fleet_degraded() -> None:
    good = assess([Member("a", 0, True), Member("b", 0, True)]).to_json()
    merged = merge_redundancy([WorkerAnswer(0, 10, 200, good), WorkerAnswer(1, 11, error="no answer")])
    assert merged["degraded"] and merged["level"] == "dual"
    assert merged["reasons"] == ["worker(s) 1 did not answer"]
    assert merged["workers"][1] == {"worker": 1, "pid": 11, "error": "no answer"}
    nobody = merge_redundancy([WorkerAnswer(0, 10, error="down")])
    assert (nobody["level"], nobody["degraded"]) == ("none", True)
