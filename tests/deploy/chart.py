"""Render helm/failover-gateway with the real Helm SDK (helm-python-sdk), no helm binary."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "failover-gateway"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"
MINIMAL = {"gateway": {"upstreams": [{"name": "a", "url": "http://vllm-a:8000"}]}}

Manifest = dict[str, Any]


def load_values(path: Path) -> dict[str, Any]:
    """A values file as a mapping."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} must be a mapping"
    return data


def render(values: dict[str, Any] | None = None, *, name: str = "demo") -> list[Manifest]:
    """`helm template` with the CRD API versions present; returns every non-empty document."""
    with helm.Chart.load(str(CHART)) as chart:
        options = {
            "name": name,
            "namespace": "prod",
            "kube_version": f"v{KUBE_VERSION}",
            "api_versions": ["monitoring.coreos.com/v1"],
        }
        # render() does not expose kube_version/api_versions; the C ABI call below does.
        raw = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options))
    out: dict[str, str] = json.loads(raw)
    docs: list[Manifest] = []
    for key, text in sorted(out.items()):
        if key.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    """Documents of one kind."""
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    """The single document of `kind` whose name ends with `name_suffix`."""
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (
        f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def container(deployment: Manifest, name: str) -> dict[str, Any]:
    """A container of a Deployment's pod template, by name."""
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name!r} in {deployment['metadata']['name']}")


def env(c: dict[str, Any]) -> dict[str, Any]:
    """A container's env as name -> value or valueFrom."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def resolved_env(
    c: dict[str, Any], docs: list[Manifest], secrets: dict[str, dict[str, str]] | None = None
) -> dict[str, str]:
    """A container's env as the kubelet would give it: ConfigMap and Secret references resolved.

    References to the chart's own ConfigMaps and Secrets are read from `docs`; `secrets` supplies
    Secrets the chart expects to exist (name -> key -> value). An unresolvable reference fails.
    """
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind(docs, "ConfigMap")}
    owned = {
        d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
        for d in by_kind(docs, "Secret")
    }
    owned.update(secrets or {})
    out: dict[str, str] = {}
    for item in c.get("env", []):
        name, ref = item["name"], item.get("valueFrom")
        if ref is None:
            out[name] = item["value"]
        elif "configMapKeyRef" in ref:
            out[name] = maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            out[name] = owned[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        else:
            raise AssertionError(f"cannot resolve env {name}: {ref}")
    return out
