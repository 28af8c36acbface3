"""The Helm chart: rendered with the real Helm SDK, linted, and validated against Kubernetes schemas."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from tests.deploy.chart import (
    CHART,
    CI_VALUES,
    KUBE_VERSION,
    MINIMAL,
    Manifest,
    by_kind,
    container,
    env,
    load_values,
    one,
    render,
    resolved_env,
)
from tests.deploy.procs import GATEWAY_READY, MOCK_READY, Proc, http_get, http_post, running

SCENARIOS = {p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}
BIN = Path(sys.executable).parent
HARDENED = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def scenario(name: str) -> list[Manifest]:
    return render(load_values(SCENARIOS[name]))


def validate_servicemonitor(doc: Manifest) -> None:
    """The few ServiceMonitor fields the chart sets (kubernetes-validate skips CRDs)."""
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"], "ServiceMonitor needs a selector"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval"}, ep
        assert ep["path"] == "/metrics"


def validate_prometheusrule(doc: Manifest) -> None:
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in ("warning", "critical")


def test_chart_scenarios_exist() -> None:
    assert {"sqlite", "redis", "gateway-only"} <= set(SCENARIOS)


@pytest.mark.parametrize("values_file", ["default", *SCENARIOS])
def test_chart_renders_valid_kubernetes_manifests(values_file: str) -> None:
    values = MINIMAL if values_file == "default" else load_values(SCENARIOS[values_file])
    docs = render(values)
    assert docs
    for doc, version in [(d, v) for d in docs for v in ("1.25.0", KUBE_VERSION, "1.37.0")]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["kind"]
            {"ServiceMonitor": validate_servicemonitor, "PrometheusRule": validate_prometheusrule}[
                doc["kind"]
            ](doc)


@pytest.mark.parametrize("values_file", ["default", *SCENARIOS])
def test_chart_lints_clean(values_file: str) -> None:
    values = MINIMAL if values_file == "default" else load_values(SCENARIOS[values_file])
    report = helm.lint(str(CHART), values, strict=True, namespace="prod", kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and report["messages"] == [], report


def test_chart_defaults_refuse_install_without_upstreams() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"gateway\.upstreams is empty"):
        render({})


def test_chart_defaults_ship_monitoring_crds_off_and_dashboard_on() -> None:
    docs = render(MINIMAL)
    kinds = {d["kind"] for d in docs}
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    assert "HorizontalPodAutoscaler" not in kinds
    dashboard = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboard) == 1
    assert dashboard[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    model = json.loads(dashboard[0]["data"]["failover-gateway.json"])
    assert model["uid"] == "failover-gateway" and model["panels"]


def test_gateway_deployment_probes_security_and_grace() -> None:
    docs = scenario("sqlite")
    deploy = one(docs, "Deployment", "-gateway")
    pod = deploy["spec"]["template"]["spec"]
    gw = container(deploy, "gateway")
    assert gw["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "gw-admin"}
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "gw-admin"}
    assert gw["securityContext"] == HARDENED
    assert pod["securityContext"]["runAsNonRoot"] is True
    e = env(gw)
    assert e["GATEWAY_HOST"] == "0.0.0.0" and e["GATEWAY_ADMIN_HOST"] == "0.0.0.0"
    grace_s = float(e["GATEWAY_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > grace_s + 5  # preStop sleep + drain must fit
    assert deploy["spec"]["replicas"] == 2
    assert one(docs, "PodDisruptionBudget", "-gateway")["spec"]["maxUnavailable"] == 1


def test_gateway_env_from_configmap_and_secrets() -> None:
    docs = scenario("sqlite")
    gw = container(one(docs, "Deployment", "-gateway"), "gateway")
    e = env(gw)
    cm = one(docs, "ConfigMap", "-upstreams")
    assert e["GATEWAY_UPSTREAMS"] == {
        "configMapKeyRef": {"name": cm["metadata"]["name"], "key": "upstreams.json"}
    }
    upstreams = json.loads(cm["data"]["upstreams.json"])
    assert [u["name"] for u in upstreams] == ["vllm-a", "openai"]
    assert e["GATEWAY_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "gateway-admin", "key": "token"}}
    assert e["OPENAI_API_KEY"] == {"secretKeyRef": {"name": "provider-keys", "key": "openai-api-key"}}


def test_gateway_settings_parse_the_rendered_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env the chart renders (with the ConfigMap and Secret resolved) is valid gateway config."""
    from gateway.config import load_settings

    docs = scenario("sqlite")
    gw = container(one(docs, "Deployment", "-gateway"), "gateway")
    upstreams = one(docs, "ConfigMap", "-upstreams")["data"]["upstreams.json"]
    for name, value in env(gw).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_UPSTREAMS", upstreams)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "t0ken")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    settings = load_settings()
    assert settings.host == "0.0.0.0" and settings.admin_port == 9901
    openai = settings.upstreams[1]
    assert openai.headers["Authorization"] == "Bearer sk-test"


def test_jobs_sqlite_single_replica_on_pvc_with_gateway_sidecar() -> None:
    docs = scenario("sqlite")
    deploy = one(docs, "Deployment", "-jobs-api")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    jobs = container(deploy, "jobs-api")
    sidecar = container(deploy, "gateway")
    e = env(jobs)
    assert e["JOBS_HOST"] == "0.0.0.0"
    assert e["JOBS_STORE"] == "sqlite:////data/jobs.db"
    assert e["JOBS_GATEWAY_URL"] == "http://127.0.0.1:8080"
    assert env(sidecar)["GATEWAY_HOST"] == "127.0.0.1"  # reachable only from inside the pod
    assert {"name": "data", "mountPath": "/data"} in jobs["volumeMounts"]
    pvc = one(docs, "PersistentVolumeClaim", "-jobs-api")
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert jobs["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert jobs["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert jobs["securityContext"] == HARDENED and sidecar["securityContext"] == HARDENED
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    # Jobs are accepted and queued while no upstream is routable: the sidecar does not gate readiness.
    assert "readinessProbe" not in sidecar and sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8081"


def test_pod_annotations_can_be_turned_off() -> None:
    docs = scenario("gateway-only")
    annotations = one(docs, "Deployment", "-gateway")["spec"]["template"]["metadata"]["annotations"]
    assert not any(k.startswith("prometheus.io/") for k in annotations)
    assert "checksum/upstreams" in annotations  # a changed upstream list rolls the pods
    assert (
        env(container(one(docs, "Deployment", "-gateway"), "gateway"))["GATEWAY_RETRY__MAX_ATTEMPTS"] == "2"
    )


def test_jobs_sqlite_refuses_more_than_one_replica() -> None:
    with pytest.raises(helm.HelmRenderError, match="sqlite store allows exactly 1 replica"):
        render({**MINIMAL, "jobsApi": {"replicaCount": 3}})
    with pytest.raises(helm.HelmRenderError, match="needs jobsApi.store.type=redis"):
        render({**MINIMAL, "jobsApi": {"autoscaling": {"enabled": True}}})


def test_jobs_redis_url_from_secret_any_replicas() -> None:
    docs = scenario("redis")
    deploy = one(docs, "Deployment", "-jobs-api")
    assert "replicas" not in deploy["spec"]  # the HPA owns it
    hpa = one(docs, "HorizontalPodAutoscaler", "-jobs-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    e = env(container(deploy, "jobs-api"))
    assert e["JOBS_STORE"] == {"secretKeyRef": {"name": "jobs-redis", "key": "url"}}
    assert not by_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"] for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert "data" not in volumes


def test_jobs_redis_inline_url_and_replicas() -> None:
    values: dict[str, Any] = {
        **MINIMAL,
        "jobsApi": {"replicaCount": 4, "store": {"type": "redis", "redis": {"url": "redis://r:6379/0"}}},
    }
    deploy = one(render(values), "Deployment", "-jobs-api")
    assert deploy["spec"]["replicas"] == 4
    assert env(container(deploy, "jobs-api"))["JOBS_STORE"] == "redis://r:6379/0"
    with pytest.raises(helm.HelmRenderError, match=r"redis\.url or jobsApi\.store\.redis\.existingSecret"):
        render({**MINIMAL, "jobsApi": {"store": {"type": "redis"}}})


def test_monitoring_scenario_servicemonitor_and_alerts() -> None:
    docs = scenario("redis")
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    ports = {ep["port"] for ep in sm["spec"]["endpoints"]}
    service_ports = {p["name"] for s in by_kind(docs, "Service") for p in s["spec"]["ports"]}
    assert ports <= service_ports
    # The proxy port is never scraped: /metrics there would be forwarded to an upstream.
    assert "proxy" not in ports
    rules = one(docs, "PrometheusRule")
    alerts = {r["alert"] for g in rules["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "GatewayNoRoutableUpstream",
        "GatewayUpstreamEjectedLong",
        "GatewayUpstreamErrorRatioHigh",
        "GatewayErrorRatioHigh",
        "GatewayRetryBudgetExhausted",
        "GatewayTimeToFirstTokenHigh",
        "JobsFailureRatioHigh",
        "JobsQueuedTooLong",
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"replicaCount": 0}}, "/gateway/replicaCount"),
        ({"gatway": {}}, "additional properties 'gatway' not allowed"),
        ({"jobsApi": {"store": {"type": "postgres"}}}, "/jobsApi/store/type"),
        ({"gateway": {"upstreams": [{"name": "a"}]}}, "missing property 'url'"),
        ({"gateway": {"upstreams": [{"url": "ftp://x"}]}}, "/gateway/upstreams/0/url"),
        ({"gateway": {"extraEnv": {"RETRY": "2"}}}, "'RETRY' does not match pattern '^GATEWAY_"),
        ({"gateway": {"callers": [{"name": "a"}]}}, "/gateway/callers/0"),
        ({"gateway": {"callers": [{"name": "a", "key": "k", "key_sha256": "0" * 64}]}}, "/gateway/callers/0"),
        ({"gateway": {"callers": [{"name": "a", "key": "k", "limit": 1}]}}, "additional properties 'limit'"),
        (
            {"gateway": {"upstreams": [{"url": "http://a", "models": "gpt-4o"}]}},
            "/gateway/upstreams/0/models",
        ),
        ({"gateway": {"modelFallbacks": {"gpt-4o": "gpt-4o-mini"}}}, "/gateway/modelFallbacks/gpt-4o"),
        ({"gateway": {"networkPolicy": {"clientLabels": {"a": 1}}}}, "/gateway/networkPolicy/clientLabels/a"),
        ({"gateway": {"networkPolicy": {"clientNamespaces": ["Not_A_Name"]}}}, "/gateway/networkPolicy"),
    ],
)
def test_values_schema_rejects_bad_values_clearly(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert message in str(err.value)


def render_app_with_sidecar(tmp_path: Path, extra_params: str = "") -> Manifest:
    """An application chart that depends on this one and includes the sidecar; its Deployment."""
    app = tmp_path / "app"
    (app / "templates").mkdir(parents=True)
    (app / "charts").mkdir()
    (app / "Chart.yaml").write_text("apiVersion: v2\nname: app\nversion: 1.0.0\n")
    (app / "values.yaml").write_text(
        "failoverGateway:\n"
        "  upstreams:\n    - {name: a, url: 'http://vllm-a:8000'}\n"
        "  providerKeys: {existingSecret: keys, env: {OPENAI_API_KEY: openai}}\n"
        "  shutdownGraceSeconds: 20\n  preStopSleepSeconds: 5\n"
        "  probes: {readiness: {periodSeconds: 7}}\n"
        # The parent chart disables the subchart's own workloads.
        "failover-gateway:\n  gateway: {enabled: false}\n  jobsApi: {enabled: false}\n"
        "  grafana: {dashboard: {enabled: false}}\n"
    )
    (app / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app\nspec:\n"
        "  selector: {matchLabels: {app: app}}\n  template:\n    metadata: {labels: {app: app}}\n"
        "    spec:\n      terminationGracePeriodSeconds: 35\n      containers:\n"
        "        - name: app\n          image: app:1\n"
        # As in the README: the include may span lines.
        '        {{- include "failover-gateway.sidecar" (dict "gateway" .Values.failoverGateway\n'
        f'              "image" "ghcr.io/example/failover-gateway:0.1.0"{extra_params}) | nindent 8 }}}}\n'
    )
    packaged = Path(helm.package(str(CHART), destination=str(tmp_path)))
    shutil.copy(packaged, app / "charts" / packaged.name)
    with helm.Chart.load(str(app)) as chart:
        out = chart.render({}, name="shop", namespace="prod", is_install=True)
    docs = [d for k, t in out.items() if not k.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    deploy = one(docs, "Deployment", "app")
    kubernetes_validate.validate(deploy, KUBE_VERSION, strict=True)
    return deploy


def test_sidecar_template_in_another_chart(tmp_path: Path) -> None:
    """An application chart that depends on this one puts the gateway next to its container."""
    gw = container(render_app_with_sidecar(tmp_path), "gateway")
    e = env(gw)
    assert e["GATEWAY_HOST"] == "127.0.0.1"
    assert json.loads(e["GATEWAY_UPSTREAMS"]) == [{"name": "a", "url": "http://vllm-a:8000"}]
    assert e["OPENAI_API_KEY"] == {"secretKeyRef": {"name": "keys", "key": "openai"}}
    assert gw["securityContext"] == HARDENED
    # No readiness probe by default: /readyz fails during an inference outage, which would take
    # the application's pod out of its Service. Liveness stays on.
    assert "readinessProbe" not in gw
    assert gw["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "gw-admin"}


def test_sidecar_readiness_probe_can_be_turned_on(tmp_path: Path) -> None:
    gw = container(render_app_with_sidecar(tmp_path, ' "readiness" true'), "gateway")
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "gw-admin"}
    assert gw["readinessProbe"]["periodSeconds"] == 7
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_gateway_proxy_env_reaches_both_gateway_containers() -> None:
    values = {
        "gateway": {
            "upstreams": [
                {"name": "openai", "url": "https://api.openai.com"},
                {"name": "vllm", "url": "http://vllm:8000", "proxy": "none"},
            ],
            "proxyEnv": {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": ".svc,10.0.0.0/8"},
        }
    }
    docs = render(values)
    for deploy in (one(docs, "Deployment", "-gateway"), one(docs, "Deployment", "-jobs-api")):
        e = env(container(deploy, "gateway"))
        assert e["HTTPS_PROXY"] == "http://proxy.corp:3128" and e["NO_PROXY"] == ".svc,10.0.0.0/8"
        kubernetes_validate.validate(deploy, KUBE_VERSION, strict=True)
    upstreams = json.loads(one(docs, "ConfigMap", "-upstreams")["data"]["upstreams.json"])
    assert upstreams[1]["proxy"] == "none"
    with pytest.raises(helm.HelmValuesError) as err:
        render({"gateway": {**MINIMAL["gateway"], "proxyEnv": {"ALL_PROXY": "socks5://p:1"}}})
    assert "invalid propertyName 'ALL_PROXY'" in str(err.value)


# --- NetworkPolicy ------------------------------------------------------------------------------


def proxy_and_admin_rules(policy: Manifest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ingress rule of the proxy port and the rules of the admin port."""
    rules = policy["spec"]["ingress"]
    proxy = [r for r in rules if r["ports"] == [{"port": "gw-http", "protocol": "TCP"}]]
    admin = [r for r in rules if r["ports"] == [{"port": "gw-admin", "protocol": "TCP"}]]
    assert len(proxy) == 1 and len(proxy) + len(admin) == len(rules), rules
    return proxy[0], admin


def test_network_policy_on_by_default_for_the_shared_gateway() -> None:
    docs = render(MINIMAL)
    policy = one(docs, "NetworkPolicy", "-gateway")
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    deploy = one(docs, "Deployment", "-gateway")
    # It selects exactly the shared gateway's pods, and only restricts ingress.
    assert policy["spec"]["podSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in container(deploy, "gateway")["ports"]}
    assert ports == {"gw-http": 8080, "gw-admin": 9901}  # the named ports the rules use
    proxy, admin = proxy_and_admin_rules(policy)
    # No namespaceSelector: labelled pods of the release's namespace only.
    assert proxy["from"] == [{"podSelector": {"matchLabels": {"failover-gateway-client": "true"}}}]
    assert len(admin) == 1
    assert admin[0]["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]
    # The jobs API pod (sidecar on localhost) is not selected.
    jobs = one(docs, "Deployment", "-jobs-api")["spec"]["template"]["metadata"]["labels"]
    assert not set(policy["spec"]["podSelector"]["matchLabels"].items()) <= set(jobs.items())


def test_network_policy_client_namespaces_and_admin_peers() -> None:
    docs = scenario("gateway-only")
    policy = one(docs, "NetworkPolicy", "-gateway")
    proxy, admin = proxy_and_admin_rules(policy)
    # One peer: namespace AND pod labels, not either.
    assert proxy["from"] == [
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["search", "batch"]}
                ]
            },
            "podSelector": {"matchLabels": {"inference-client": "yes"}},
        }
    ]
    assert admin[0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    # adminFrom empty: nothing may reach the admin port (the kubelet's probes come from the node).
    closed = one(
        render({"gateway": {**MINIMAL["gateway"], "networkPolicy": {"adminFrom": []}}}), "NetworkPolicy"
    )
    kubernetes_validate.validate(closed, KUBE_VERSION, strict=True)
    assert proxy_and_admin_rules(closed)[1] == []
    # Labels given replace the default label rather than add to it; none at all means the default.
    unset_labels: tuple[dict[str, str] | None, ...] = ({}, None)
    for labels in unset_labels:
        unset = one(
            render({"gateway": {**MINIMAL["gateway"], "networkPolicy": {"clientLabels": labels}}}),
            "NetworkPolicy",
        )
        assert proxy_and_admin_rules(unset)[0]["from"] == [
            {"podSelector": {"matchLabels": {"failover-gateway-client": "true"}}}
        ]


@pytest.mark.parametrize(
    "values",
    [
        {"gateway": {**MINIMAL["gateway"], "networkPolicy": {"enabled": False}}},
        {"gateway": {**MINIMAL["gateway"], "enabled": False}},  # jobs API and its sidecar only
    ],
    ids=["disabled", "no-shared-gateway"],
)
def test_network_policy_absent_when_disabled_or_without_the_shared_gateway(values: dict[str, Any]) -> None:
    assert not by_kind(render(values), "NetworkPolicy")


def test_sidecar_template_renders_no_network_policy(tmp_path: Path) -> None:
    render_app_with_sidecar(tmp_path)  # builds tmp_path/app, which includes the sidecar
    with helm.Chart.load(str(tmp_path / "app")) as chart:
        out = chart.render({}, name="shop", namespace="prod", is_install=True)
    kinds = {d["kind"] for text in out.values() for d in yaml.safe_load_all(text) if isinstance(d, dict)}
    assert "Deployment" in kinds and "NetworkPolicy" not in kinds


# --- models and callers -------------------------------------------------------------------------

ALICE_KEY = "sk-alice-chart-0123456789"
BOB_KEY = "sk-bob-chart-9876543210"


def callers_values(url: str = "http://vllm-a:8000") -> dict[str, Any]:
    """A shared gateway with models, an alias, a fallback and two callers (one key from a Secret)."""
    return {
        "gateway": {
            "upstreams": [
                {
                    "name": "vllm",
                    "url": url,
                    "health_path": None,
                    "models": {"llama-3-70b": "meta-llama/L3-70B"},
                },
            ],
            "modelAliases": {"llama": "llama-3-70b"},
            "callers": [
                {"name": "alice", "key": "${ALICE_CALLER_KEY}", "max_inflight": 8},
                {
                    "name": "bob",
                    "key_sha256": hashlib.sha256(BOB_KEY.encode()).hexdigest(),
                    "models": ["llama-3-8b"],
                },
            ],
            "providerKeys": {"existingSecret": "caller-keys", "env": {"ALICE_CALLER_KEY": "alice"}},
        }
    }


def test_callers_go_into_a_secret_read_by_secret_key_ref_never_a_config_map() -> None:
    values = callers_values()
    values["gateway"]["callers"][0]["key"] = ALICE_KEY  # a literal key must stay in the Secret too
    docs = render(values)
    secret = one(docs, "Secret", "-callers")
    kubernetes_validate.validate(secret, KUBE_VERSION, strict=True)
    assert json.loads(base64.b64decode(secret["data"]["callers.json"])) == values["gateway"]["callers"]
    deploy = one(docs, "Deployment", "-gateway")
    e = env(container(deploy, "gateway"))
    assert e["GATEWAY_CALLERS"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "callers.json"}
    }
    # The key is nowhere but in the Secret: not in a ConfigMap, an env value or an annotation.
    for doc in docs:
        if doc["kind"] != "Secret":
            assert ALICE_KEY not in json.dumps(doc), doc["metadata"]["name"]
    assert "callers" not in json.dumps([d["data"] for d in by_kind(docs, "ConfigMap")][0])
    # A changed caller list rolls the pods.
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    values["gateway"]["callers"][1]["max_inflight"] = 3
    other = one(render(values), "Deployment", "-gateway")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/callers"] != other["checksum/callers"]
    # The jobs API's sidecar (localhost only) does not ask its jobs for a key.
    assert "GATEWAY_CALLERS" not in env(container(one(docs, "Deployment", "-jobs-api"), "gateway"))


def test_existing_callers_secret_is_referenced_and_nothing_rendered() -> None:
    docs = scenario("gateway-only")
    assert not by_kind(docs, "Secret")
    deploy = one(docs, "Deployment", "-gateway")
    e = env(container(deploy, "gateway"))
    assert e["GATEWAY_CALLERS"] == {"secretKeyRef": {"name": "gateway-callers", "key": "callers.json"}}
    assert "checksum/callers" not in deploy["spec"]["template"]["metadata"]["annotations"]
    assert "GATEWAY_CALLERS" not in env(container(one(render(MINIMAL), "Deployment", "-gateway"), "gateway"))
    both = {
        "gateway": {
            **MINIMAL["gateway"],
            "callers": [{"name": "a", "key": "k"}],
            "existingCallersSecret": {"name": "mine"},
        }
    }
    with pytest.raises(
        helm.HelmRenderError, match="callers and gateway.existingCallersSecret.name are both set"
    ):
        render(both)


def test_models_aliases_and_fallbacks_reach_the_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import load_settings

    docs = scenario("sqlite")
    gw = container(one(docs, "Deployment", "-gateway"), "gateway")
    e = env(gw)
    assert json.loads(e["GATEWAY_MODEL_ALIASES"]) == {"llama": "llama-3-70b"}
    assert json.loads(e["GATEWAY_MODEL_FALLBACKS"]) == {"llama-3-70b": ["gpt-4o-mini"]}
    resolved = resolved_env(
        gw,
        docs,
        {"gateway-admin": {"token": "t0ken"}, "provider-keys": {"openai-api-key": "sk-test"}},
    )
    for name, value in resolved.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.upstreams[0].models == {"llama-3-70b": "llama-3-70b"}
    assert settings.model_aliases == {"llama": "llama-3-70b"}
    assert settings.model_fallbacks == {"llama-3-70b": ["gpt-4o-mini"]}
    [search] = settings.callers
    assert search.name == "search" and search.models == ["llama"] and search.requests_per_minute == 600


def test_rendered_gateway_starts_and_asks_for_caller_keys(tmp_path: Path) -> None:
    """The real `gateway` process, run with exactly the env the chart renders, in front of a mock."""
    procs: list[Proc] = []
    with running(procs):
        procs.append(
            Proc([str(BIN / "mock-inference"), "--port", "0", "--name", "vllm"], tmp_path / "mock.log")
        )
        mock = f"http://127.0.0.1:{procs[-1].wait_for(MOCK_READY).group(1)}"
        docs = render(callers_values(mock))
        gw = container(one(docs, "Deployment", "-gateway"), "gateway")
        rendered = resolved_env(gw, docs, {"caller-keys": {"alice": ALICE_KEY}})
        # Loopback and free ports instead of 0.0.0.0:8080/9901; everything else as rendered.
        rendered |= {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_ADMIN_HOST": "127.0.0.1"}
        rendered |= {"GATEWAY_PORT": "0", "GATEWAY_ADMIN_PORT": "0"}
        argv = [str(BIN / gw["args"][0]), *gw["args"][1:]]
        procs.append(Proc(argv, tmp_path / "gateway.log", rendered))
        port = procs[-1].wait_for(GATEWAY_READY).group(1)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}).encode()

        status, answer = http_post(url, body)
        assert status == 401 and json.loads(answer)["error"]["type"] == "unauthorized"
        status, answer = http_post(url, body, headers={"Authorization": "Bearer sk-wrong"})
        assert status == 401
        status, answer = http_post(url, body, headers={"Authorization": f"Bearer {ALICE_KEY}"})
        assert status == 200, answer
        # Bob may use llama-3-8b only; his key is known (by its digest), the model is not his.
        status, answer = http_post(url, body, headers={"api-key": BOB_KEY})
        assert status == 403 and json.loads(answer)["error"]["type"] == "model_not_allowed"
        _, stats = http_get(f"{mock}/stats")
        seen = json.loads(stats)
        assert seen["requests"] == 1  # refusals never reach the upstream
        # The alias resolved and the upstream's own name written into the body; no caller key sent.
        assert json.loads(seen["last_body"])["model"] == "meta-llama/L3-70B"
        assert ALICE_KEY not in json.dumps(seen["last_headers"])
