"""Alerts and the Grafana dashboard against the metrics the gateway and the jobs API really export.

The rules pass `promtool check rules`; every dashboard query parses with Prometheus's own parser;
every metric name they use is exported by a real gateway and jobs API driven with traffic; and a
real Prometheus scraping both answers every dashboard query with data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.chart import CHART
from tests.deploy.procs import (
    GATEWAY_READY,
    JOBS_READY,
    MOCK_READY,
    Proc,
    http_get,
    http_post,
    running,
)

ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
# Generated from @grafana/schema 13.2.3 (npm pack; ts-json-schema-generator --type Dashboard).
GRAFANA_SCHEMA = Path(__file__).with_name("grafana-dashboard.schema.json")
METRIC_NAME = re.compile(r"\b((?:gateway|jobs)_[a-z0-9_]+)\b")
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_MACROS = {
    "$__rate_interval": "30s",
    "$__interval": "15s",
    "$__range": "1h",
    "$upstream": ".*",
    "$namespace": ".*",
    "$pod": ".*",
}
BIN = Path(sys.executable).parent


def require_tool(name: str) -> str:
    """Path of a Prometheus tool; skipped when missing, except in CI where it must be installed."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (apt-get install prometheus); CI=true requires it")
        pytest.skip(f"{name} is not installed (Debian package 'prometheus')")
    return path


def grafana_expand(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expression with Grafana macros substituted) for every panel target."""
    return [
        (f"{panel['title']} / {target['refId']}", grafana_expand(target["expr"]))
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def used_metric_names() -> dict[str, str]:
    """Metric name -> where it is used, across dashboard queries, variables and alert rules."""
    used: dict[str, str] = {}
    sources = [(f"dashboard panel {where}", expr) for where, expr in dashboard_queries()]
    sources += [
        (f"dashboard variable {v['name']}", v["query"]["query"])
        for v in dashboard()["templating"]["list"]
        if v["type"] == "query"
    ]
    sources += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    for where, expr in sources:
        for name in METRIC_NAME.findall(expr):
            used.setdefault(name, where)
    return used


def test_dashboard_model_is_well_formed() -> None:
    model = dashboard()
    panels = model["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("request rate", "error ratio", "latency", "first byte", "retries", "healthy", "ejections"):
        assert topic in titles
    for topic in ("in flight", "jobs queued and running", "jobs finished", "job duration"):
        assert topic in titles


def test_dashboard_matches_grafana_schema() -> None:
    """Grafana's own Dashboard type (@grafana/schema 13.2.3, made into JSON Schema; see the README)."""
    schema = json.loads(GRAFANA_SCHEMA.read_text(encoding="utf-8"))
    errors = [f"{e.json_path}: {e.message}" for e in Draft7Validator(schema).iter_errors(dashboard())]
    assert not errors, "\n".join(errors)


def test_dashboard_json_is_what_the_generator_writes() -> None:
    sys.path.insert(0, str(CHART.parents[1] / "deploy"))
    try:
        import build_dashboard  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    assert build_dashboard.build() == dashboard(), "run: python deploy/build_dashboard.py"


def test_alert_rules_pass_promtool() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_alert_rules_fire_on_unit_series(tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires on made-up series that should trigger it."""
    promtool = require_tool("promtool")
    shutil.copy(ALERTS, tmp_path / "alerts.yaml")
    shutil.copy(Path(__file__).with_name("alerts_test.yaml"), tmp_path / "alerts_test.yaml")
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": expr}
                    for i, (_, expr) in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass
class Stack:
    """A real gateway (two mock upstreams, one flaky) and a jobs API that ran a job through it."""

    admin_port: int
    jobs_port: int
    models_admin_port: int  # a second gateway, routing by model
    exported: set[str]


def drive_traffic(gateway_port: int, jobs_port: int) -> None:
    base = f"http://127.0.0.1:{gateway_port}"
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there"}]}).encode()
    for _ in range(20):
        http_post(f"{base}/v1/completions", b"{}")  # within the replay limit: failures are retried
    for _ in range(20):
        http_post(f"{base}/v1/chat/completions", body)  # over the replay limit: failures are not retried
    job = {
        "type": "inference",
        "input": {"method": "POST", "path": "/v1/chat/completions", "body": json.loads(body)},
    }
    status, text = http_post(f"http://127.0.0.1:{jobs_port}/v1/jobs", json.dumps(job).encode())
    assert status == 202, text
    job_url = f"http://127.0.0.1:{jobs_port}/v1/jobs/{json.loads(text)['id']}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, text = http_get(job_url)
        if json.loads(text)["status"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert json.loads(text)["status"] == "completed", text


def drive_model_traffic(gateway_port: int) -> None:
    """Requests routed by model, streams among them: per-model TTFT, chunk gaps, stream usage."""
    base = f"http://127.0.0.1:{gateway_port}"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    for body in [chat] * 5 + [stream] * 5:
        http_post(f"{base}/v1/chat/completions", json.dumps(body).encode())


def scrape(url: str) -> set[str]:
    status, text = http_get(url)
    assert status == 200, text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    procs: list[Proc] = []
    with running(procs):
        mocks = []
        for name, flags in (
            ("a", []),
            ("b", ["--error-rate", "0.5", "--error-status", "503", "--seed", "1"]),
        ):
            procs.append(
                Proc([str(BIN / "mock-inference"), "--port", "0", "--name", name, *flags], tmp / name)
            )
            mocks.append(f"{name}=http://127.0.0.1:{procs[-1].wait_for(MOCK_READY).group(1)}")
        gateway_argv = [str(BIN / "gateway"), "--port", "0", "--admin-port", "0", "--strategy", "round_robin"]
        for spec in mocks:
            gateway_argv += ["--upstream", spec]
        procs.append(
            Proc(
                gateway_argv,
                tmp / "gateway.log",
                {
                    # Tiny replay limit: larger bodies are not retried (gateway_retries_skipped_total);
                    # no ejection, so the flaky upstream keeps failing attempts.
                    "GATEWAY_RETRY__REPLAY_BUFFER_BYTES": "16",
                    "GATEWAY_OUTLIER__CONSECUTIVE_FAILURES": "1000",
                },
            )
        )
        match = procs[-1].wait_for(GATEWAY_READY)
        gateway_port, admin_port = int(match.group(1)), int(match.group(2))
        # A second gateway in front of the same upstreams, routing by model.
        upstreams = [{"name": n, "url": u, "models": ["m"]} for n, u in (m.split("=", 1) for m in mocks)]
        procs.append(
            Proc(
                [str(BIN / "gateway"), "--port", "0", "--admin-port", "0"],
                tmp / "gateway-models.log",
                {"GATEWAY_UPSTREAMS": json.dumps(upstreams), "GATEWAY_OUTLIER__CONSECUTIVE_FAILURES": "1000"},
            )
        )
        match = procs[-1].wait_for(GATEWAY_READY)
        models_port, models_admin_port = int(match.group(1)), int(match.group(2))
        jobs_argv = [str(BIN / "jobs-api"), "serve", "--port", "0"]
        jobs_argv += ["--gateway-url", f"http://127.0.0.1:{gateway_port}"]
        jobs_argv += ["--store", f"sqlite:///{tmp / 'jobs.db'}"]
        procs.append(Proc(jobs_argv, tmp / "jobs.log"))
        jobs_port = int(procs[-1].wait_for(JOBS_READY).group(1))
        drive_traffic(gateway_port, jobs_port)
        drive_model_traffic(models_port)
        exported = scrape(f"http://127.0.0.1:{admin_port}/metrics")
        exported |= scrape(f"http://127.0.0.1:{models_admin_port}/metrics")
        exported |= scrape(f"http://127.0.0.1:{jobs_port}/metrics")
        yield Stack(admin_port, jobs_port, models_admin_port, exported)


def test_queries_use_only_exported_metric_names(stack: Stack) -> None:
    used = used_metric_names()
    assert used, "no metric names found in the dashboard and alerts"
    unknown = {name: where for name, where in used.items() if name not in stack.exported}
    assert not unknown, f"not exported by the gateway or jobs API: {unknown}"
    # The signals the alerts are about, under their real names.
    for name in (
        "gateway_routable_upstreams",
        "gateway_upstream_state",
        "gateway_retries_skipped_total",
        "jobs_finished_total",
        "jobs_queued",
    ):
        assert name in used and name in stack.exported


def prometheus_query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    status, text = http_get(url)
    assert status == 200, f"{expr}: {status} {text}"
    body = json.loads(text)
    assert body["status"] == "success", f"{expr}: {text}"
    result = body["data"]["result"]
    assert isinstance(result, list)
    return result


def test_dashboard_queries_return_data_from_live_prometheus(stack: Stack, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "failover-gateway",
                "static_configs": [
                    {
                        "targets": [
                            f"127.0.0.1:{stack.admin_port}",
                            f"127.0.0.1:{stack.models_admin_port}",
                            f"127.0.0.1:{stack.jobs_port}",
                        ]
                    }
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    argv = [
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        "--web.listen-address=127.0.0.1:0",
        "--log.level=info",
    ]
    procs = [Proc(argv, tmp_path / "prometheus.log")]
    with running(procs):
        match = procs[0].wait_for(re.compile(r'msg="Listening on" address=127\.0\.0\.1:(\d+)'))
        base = f"http://127.0.0.1:{match.group(1)}"
        # The web server listens before the TSDB is open; until then the API answers 503 in text.
        deadline = time.monotonic() + 15
        while http_get(f"{base}/-/ready")[0] != 200:
            assert time.monotonic() < deadline, f"Prometheus not ready:\n{procs[0].output()}"
            time.sleep(0.1)
        pending = dict(dashboard_queries())
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for where, expr in list(pending.items()):
                if prometheus_query(base, expr):
                    del pending[where]
            time.sleep(0.5)
        assert not pending, f"dashboard queries with no data after 30 s: {pending}"
