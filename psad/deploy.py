"""The PrometheusRule of deploy/k8s/monitoring from deploy/alerts.yml, the one source of the alerts.

A PrometheusRule cannot include a file and kustomize cannot wrap one, so the manifest is generated
and tests/test_deploy_k8s.py fails when it is stale. Regenerate: `python -m psad.deploy`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "alerts.yml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "monitoring" / "prometheusrule.yaml"
HEADER = "# Generated from deploy/alerts.yml by `python -m psad.deploy`: edit alerts.yml, then regenerate.\n"


def prometheus_rule(alerts: Path = ALERTS) -> str:
    """The PrometheusRule manifest (YAML text) holding the rule groups of `alerts`."""
    groups = yaml.safe_load(alerts.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "psad", "labels": {"app.kubernetes.io/name": "psad"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=120)


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule())
