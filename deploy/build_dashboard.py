"""Write helm/failover-gateway/files/dashboard.json: run `python deploy/build_dashboard.py` after editing.

Panels are listed here so the dashboard stays reviewable; tests check every query against the
metrics the gateway and the jobs API really export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "helm" / "failover-gateway" / "files" / "dashboard.json"
UP = 'upstream=~"$upstream"'
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
                [("{{code}}", f"sum by (code) (rate(gateway_requests_total[{RI}]))")],
                8,
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
                        f"(rate(gateway_request_duration_seconds_bucket[{RI}])))",
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
                [("{{reason}}", f"sum by (reason) (rate(gateway_retries_total[{RI}]))")],
                8,
            ),
            (
                "Retries skipped (budget, body, deadline)",
                "reqps",
                [("{{reason}}", f"sum by (reason) (rate(gateway_retries_skipped_total[{RI}]))")],
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
                    ("panic selections", f"sum(rate(gateway_panic_selections_total[{RI}]))"),
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
                    ("routable upstreams", "min(gateway_routable_upstreams)"),
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
                    ("all requests", "sum(gateway_requests_in_flight)"),
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
                {
                    "name": "upstream",
                    "label": "Upstream",
                    "type": "query",
                    "datasource": ds,
                    "query": {
                        "query": "label_values(gateway_upstream_healthy, upstream)",
                        "refId": "upstream",
                    },
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "hide": 0,
                },
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
