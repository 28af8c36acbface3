"""Write helm/failover-gateway/files/dashboard.json: run `python deploy/build_dashboard.py` after editing.

Panels are listed here so the dashboard stays reviewable; tests check every query against the
metrics the gateway and the jobs API really export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "helm" / "failover-gateway" / "files" / "dashboard.json"
# Every gateway query is filtered by the namespace, pod and upstream variables, so a sidecar per
# app pod can be told apart; "All" matches series without the label too.
SCOPE = 'namespace=~"$namespace",pod=~"$pod"'
UP = f'{SCOPE},upstream=~"$upstream"'
RI = "$__rate_interval"

# (title, unit, [(legend, expr)], width)
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], int]]]] = [
    (
        "Traffic",
        [
            (
                "Request rate by upstream",
                "reqps",
                [
                    (
                        "{{upstream}}",
                        f"sum by (upstream) (rate(gateway_upstream_requests_total{{{UP}}}[{RI}]))",
                    )
                ],
                8,
            ),
            (
                "Error ratio by upstream",
                "percentunit",
                [
                    (
                        "{{upstream}}",
                        # Client-abandoned attempts and 4xx are not the upstream's errors.
                        f"sum by (upstream) (rate(gateway_upstream_requests_total"
                        f'{{{UP},outcome!~"success|http_4xx|abandoned"}}[{RI}]))'
                        f" / sum by (upstream) (rate(gateway_upstream_requests_total{{{UP}}}[{RI}]))",
                    )
                ],
                8,
            ),
            (
                "Client responses by status code",
                "reqps",
                [("{{code}}", f"sum by (code) (rate(gateway_requests_total{{{SCOPE}}}[{RI}]))")],
                8,
            ),
        ],
    ),
    (
        "Inference",
        [
            (
                "Time to first token p95 by upstream",
                "s",
                [
                    (
                        "{{upstream}}",
                        "histogram_quantile(0.95, sum by (le, upstream) "
                        f"(rate(gateway_upstream_ttft_seconds_bucket{{{UP}}}[{RI}])))",
                    )
                ],
                8,
            ),
            (
                "Time to first token p95 by model",
                "s",
                [
                    (
                        "{{model}}",
                        "histogram_quantile(0.95, sum by (le, model) "
                        f"(rate(gateway_model_ttft_seconds_bucket{{{SCOPE}}}[{RI}])))",
                    )
                ],
                8,
            ),
            (
                "Gap between tokens p50 / p95 (streams)",
                "s",
                [
                    (
                        f"p{q} {{{{upstream}}}}",
                        f"histogram_quantile(0.{q}, sum by (le, upstream) "
                        f"(rate(gateway_stream_chunk_gap_seconds_bucket{{{UP}}}[{RI}])))",
                    )
                    for q in ("50", "95")
                ],
                8,
            ),
            (
                "Tokens in the last hour by caller and model",
                "short",
                [
                    (
                        "{{caller}} {{model}} {{kind}}",
                        f"sum by (caller, model, kind) (increase(gateway_tokens_total{{{UP}}}[1h]))",
                    )
                ],
                8,
            ),
            (
                "Tokens per second by upstream",
                "short",
                [
                    (
                        "{{upstream}} {{kind}}",
                        f"sum by (upstream, kind) (rate(gateway_tokens_total{{{UP}}}[{RI}]))",
                    )
                ],
                8,
            ),
            (
                "Gateway's own time per request p50 / p99 (is it us?)",
                "s",
                [
                    (
                        f"p{q}",
                        f"histogram_quantile(0.{q}, sum by (le) "
                        f"(rate(gateway_overhead_seconds_bucket{{{SCOPE}}}[{RI}])))",
                    )
                    for q in ("50", "99")
                ],
                8,
            ),
            (
                "Errors by whose fault (client, upstream, gateway)",
                "reqps",
                [("{{fault}}", f"sum by (fault) (rate(gateway_errors_total{{{SCOPE}}}[{RI}]))")],
                24,
            ),
        ],
    ),
    (
        "Latency",
        [
            (
                "Request latency percentiles",
                "s",
                [
                    (
                        f"p{q}",
                        f"histogram_quantile(0.{q}, sum by (le) "
                        f"(rate(gateway_request_duration_seconds_bucket{{{SCOPE}}}[{RI}])))",
                    )
                    for q in ("50", "95", "99")
                ],
                12,
            ),
            (
                "Time to first byte p95 by upstream",
                "s",
                [
                    (
                        "{{upstream}}",
                        "histogram_quantile(0.95, sum by (le, upstream) "
                        f"(rate(gateway_upstream_ttfb_seconds_bucket{{{UP}}}[{RI}])))",
                    )
                ],
                12,
            ),
        ],
    ),
    (
        "Retries and failover",
        [
            (
                "Retries by cause",
                "reqps",
                [("{{reason}}", f"sum by (reason) (rate(gateway_retries_total{{{SCOPE}}}[{RI}]))")],
                8,
            ),
            (
                "Retries skipped (budget, body, deadline)",
                "reqps",
                [("{{reason}}", f"sum by (reason) (rate(gateway_retries_skipped_total{{{SCOPE}}}[{RI}]))")],
                8,
            ),
            (
                "Attempt outcomes (failovers)",
                "reqps",
                [
                    (
                        "{{upstream}} {{outcome}}",
                        f"sum by (upstream, outcome) (rate(gateway_upstream_requests_total"
                        f'{{{UP},outcome!="success"}}[{RI}]))',
                    ),
                    ("panic selections", f"sum(rate(gateway_panic_selections_total{{{SCOPE}}}[{RI}]))"),
                ],
                8,
            ),
        ],
    ),
    (
        "Upstream health",
        [
            (
                "Upstream healthy (1 = routable)",
                "short",
                [
                    ("{{upstream}}", f"max by (upstream) (gateway_upstream_healthy{{{UP}}})"),
                    ("routable upstreams", f"min(gateway_routable_upstreams{{{SCOPE}}})"),
                ],
                8,
            ),
            (
                "Upstream state",
                "short",
                [
                    (
                        "{{upstream}} {{state}}",
                        f"max by (upstream, state) (gateway_upstream_state{{{UP}}}) == 1",
                    )
                ],
                8,
            ),
            (
                "Ejections",
                "short",
                [
                    (
                        "{{upstream}} {{reason}}",
                        f"sum by (upstream, reason) "
                        f"(increase(gateway_upstream_ejections_total{{{UP}}}[{RI}]))",
                    )
                ],
                8,
            ),
            (
                "In flight",
                "short",
                [
                    ("{{upstream}}", f"sum by (upstream) (gateway_upstream_inflight{{{UP}}})"),
                    ("all requests", f"sum(gateway_requests_in_flight{{{SCOPE}}})"),
                ],
                12,
            ),
            (
                "Latency estimate (EWMA) by upstream",
                "s",
                [("{{upstream}}", f"max by (upstream) (gateway_upstream_latency_ewma_seconds{{{UP}}})")],
                12,
            ),
        ],
    ),
    (
        "Jobs",
        [
            (
                "Jobs queued and running",
                "short",
                [("queued", "max(jobs_queued)"), ("running", "sum(jobs_running)")],
                8,
            ),
            (
                "Jobs finished by status",
                "short",
                [("{{type}} {{status}}", f"sum by (type, status) (increase(jobs_finished_total[{RI}]))")],
                8,
            ),
            (
                "Job submissions and attempts",
                "short",
                [
                    ("submitted {{type}}", f"sum by (type) (increase(jobs_submitted_total[{RI}]))"),
                    ("attempt {{outcome}}", f"sum by (outcome) (increase(jobs_attempts_total[{RI}]))"),
                ],
                8,
            ),
            (
                "Job duration percentiles",
                "s",
                [
                    (
                        f"p{q} {{{{type}}}}",
                        f"histogram_quantile(0.{q}, sum by (le, type) "
                        f"(rate(jobs_duration_seconds_bucket[{RI}])))",
                    )
                    for q in ("50", "95")
                ],
                24,
            ),
        ],
    ),
]


def _variable(name: str, label: str, query: str, ds: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": ds,
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "hide": 0,
    }


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels: list[dict[str, Any]] = []
    y = 0
    pid = 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "type": "row",
                "title": row_title,
                "id": pid,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        pid += 1
        y += 1
        x = 0
        for title, unit, targets, width in row_panels:
            if x + width > 24:
                x = 0
                y += 8
            panels.append(
                {
                    "type": "timeseries",
                    "title": title,
                    "id": pid,
                    "datasource": ds,
                    "gridPos": {"h": 8, "w": width, "x": x, "y": y},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
                    "targets": [
                        {"refId": chr(ord("A") + i), "datasource": ds, "expr": expr, "legendFormat": legend}
                        for i, (legend, expr) in enumerate(targets)
                    ],
                }
            )
            pid += 1
            x += width
        y += 8
    return {
        "uid": "failover-gateway",
        "title": "Failover gateway and jobs API",
        "tags": ["failover-gateway", "inference"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "hide": 0,
                    "current": {"text": "default", "value": "default"},
                },
                _variable("namespace", "Namespace", "label_values(gateway_build_info, namespace)", ds),
                _variable("pod", "Pod", 'label_values(gateway_build_info{namespace=~"$namespace"}, pod)', ds),
                _variable(
                    "upstream",
                    "Upstream",
                    f"label_values(gateway_upstream_healthy{{{SCOPE}}}, upstream)",
                    ds,
                ),
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
