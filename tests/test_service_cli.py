"""Operations: `profiles load`, `serve` as a real process, `up`'s reuse of finished steps, and the
Grafana dashboard against the metrics the service really exports."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import redis
import typer
import yaml
from click.testing import Result
from prometheus_client.metrics import MetricWrapperBase
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from psad.cli import profiles_app
from psad.procs import free_port
from psad.up import Step, UpConfig, run_steps, up
from service import metrics
from service.profiles import history_key
from tests.conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The commands write their overrides to PSAD_* variables: restore them after each test. Each is
    set before it is deleted, so monkeypatch records it and removes what a command wrote."""
    for name in ("REDIS_URL", "MODEL_REPO", "MODEL_NAME", "PROFILE_TTL_S", "KEY_PREFIX"):
        monkeypatch.setenv(f"PSAD_{name}", "")
        monkeypatch.delenv(f"PSAD_{name}")
    return monkeypatch


def psad_profiles(*args: str) -> Result:
    """`psad profiles ...` as the root app mounts it (a one-command Typer alone would flatten)."""
    root = typer.Typer()
    root.add_typer(profiles_app, name="profiles")
    return CliRunner().invoke(root, ["profiles", *args])


def stored_history_lengths(url: str, prefix: str, users: list[str]) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    return {u: int(client.zcard(history_key(prefix, u))) for u in users}


def test_profiles_load_writes_every_user_and_behaviour(tiny_data: Path, redis_server, clean_env) -> None:
    clean_env.setenv("PSAD_KEY_PREFIX", "clitest")
    cap = json.loads((tiny_data / "schema.json").read_text())["max_history"]
    per_user = pd.read_parquet(tiny_data / "behaviours.parquet")["user_id"].value_counts()
    expected = {str(u): min(int(n), cap) for u, n in per_user.items()}
    n_users = len(pd.read_parquet(tiny_data / "users.parquet"))

    for _ in range(2):  # a reload is an upsert: same counts, nothing stored twice
        result = psad_profiles("load", "--data", str(tiny_data), "--redis-url", redis_server.url)
        assert result.exit_code == 0, result.output
        assert f"loaded {n_users:,} users and {sum(expected.values()):,} behaviours" in result.output
        assert stored_history_lengths(redis_server.url, "clitest", list(expected)) == expected


def test_profiles_load_names_a_missing_data_set(tmp_path: Path, redis_server, clean_env) -> None:
    result = psad_profiles("load", "--data", str(tmp_path), "--redis-url", redis_server.url)
    assert result.exit_code == 2  # the input is wrong (export.contract.errors)
    assert "schema.json missing" in result.output


def test_profiles_load_names_a_corrupt_table(tiny_data: Path, tmp_path: Path, redis_server, clean_env) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    table = data / "behaviours.parquet"
    table.write_bytes(table.read_bytes()[:100])  # a truncated copy
    result = psad_profiles("load", "--data", str(data), "--redis-url", redis_server.url)
    assert result.exit_code == 2
    assert "behaviours.parquet: cannot be read" in result.output and "Traceback" not in result.output


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_serve(bundle: Path, redis_url: str, workers: int, tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """`psad serve` as a real process, its output in a file; returns it, its port and the log."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers)]
    cmd += ["--model-repo", str(bundle.parent.parent), "--redis-url", redis_url]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the multiprocess metrics directory goes
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.setdefault("PSAD_REDIS_BUDGET_MS", "1000")  # as settings_for: 5 ms degrades reads on a loaded CI machine
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, port, log


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen; server output:\n{log.read_text()}")


def ready(port: int) -> bool:
    try:
        return get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    except OSError:
        return False


def stop_serve(proc: subprocess.Popen, log: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    text = log.read_text()
    # uvicorn finishes the lifespan shutdown, then re-raises the signal it caught (exit by SIGTERM)
    assert rc in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    return text


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_becomes_ready_and_stops_on_sigterm(tiny_bundle: Path, redis_server, workers: int, tmp_path: Path):
    proc, port, log = start_serve(tiny_bundle, redis_server.url, workers, tmp_path)
    try:
        wait_for(lambda: ready(port), "readyz 200", proc, log)
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        assert json.loads(body)["model"]["version"] == int(tiny_bundle.name)
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"psad_model_info" in text
        assert len(list(tmp_path.glob("psad-prometheus-*"))) == (workers > 1)
    finally:
        stop_serve(proc, log)
    assert list(tmp_path.glob("psad-prometheus-*")) == []  # the metrics directory of several workers is removed


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_exits_when_no_model_loads(tiny_bundle: Path, redis_server, workers: int, tmp_path: Path):
    """Nothing to serve: the server stops with an error instead of restarting workers forever. The
    bundle passes the checks made before the workers start (its files match its manifest), but its
    graph does not run on its schema's inputs, which only loading it shows."""
    from tests.test_runtime import graph_disagrees_with_schema

    bundle = tmp_path / "repo" / tiny_bundle.parent.name / tiny_bundle.name
    shutil.copytree(tiny_bundle, bundle)
    graph_disagrees_with_schema(bundle)
    proc, _, log = start_serve(bundle, redis_server.url, workers, tmp_path)
    rc = proc.wait(timeout=90)
    assert rc not in (0, None), log.read_text()
    assert "the graph does not fit the schema" in log.read_text()
    if workers > 1:
        assert "failed at startup" in log.read_text()


def test_serve_names_a_missing_model_in_one_line(redis_server, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    proc, _, log = start_serve(tmp_path / "empty" / "psad" / "1", redis_server.url, 2, tmp_path)
    assert proc.wait(timeout=60) == 2
    assert log.read_text().startswith("error: ") and "no model version found" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_serve_refuses_a_port_in_use(tiny_bundle: Path, redis_server, tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "2"]
        cmd += ["--model-repo", str(tiny_bundle.parents[1])]  # a model to serve: the port is the only problem
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def connections_per_process(port: int, connections: int = 32) -> list[int]:
    """Open `connections` keep-alive connections at once, then one /rerank on each: how many each
    server process answered (told apart by their per-process request-id prefixes), ascending."""
    body = json.dumps({"user_id": "u1", "candidates": [{"item_id": "a"}, {"item_id": "b"}]})
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(connections)]
    for conn in conns:
        conn.connect()
    answered: Counter[str] = Counter()
    for conn in conns:
        conn.request("POST", "/rerank", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        answered[resp.getheader("X-Request-ID")[:16]] += 1
        conn.close()
    return sorted(answered.values())


def worker_pids(pid: int) -> set[int]:
    """The server processes a supervisor started (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids = set()
    for p in out.split():
        try:
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.add(int(p))
        except OSError:  # it exited between pgrep and here
            pass
    return pids


def test_workers_share_connections_and_a_dead_worker_is_replaced(tiny_bundle: Path, redis_server, tmp_path: Path):
    """Connections opened together spread over both processes, and a killed worker is replaced while
    the other serves. With one SO_REUSEPORT socket per process the split of 32 connections is
    binomial: a process gets fewer than 5 with probability 2e-5. With uvicorn's shared socket one
    process took 28 or more in 6 of 10 tries."""
    proc, port, log = start_serve(tiny_bundle, redis_server.url, 2, tmp_path)
    started = "Application startup complete"
    try:
        wait_for(lambda: log.read_text().count(started) == 2, "two workers started", proc, log)
        assert connections_per_process(port)[0] >= 5
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        noticed = f'"msg":"worker exited; starting another","pid":{victim}'
        wait_for(lambda: noticed in log.read_text(), "the supervisor noticing", proc, log)
        assert connections_per_process(port) == [32]  # the survivor answers meanwhile
        wait_for(lambda: log.read_text().count(started) == 3, "a replacement worker", proc, log)
        assert len(worker_pids(proc.pid) - {victim}) == 2
        assert connections_per_process(port)[0] >= 5
    finally:
        stop_serve(proc, log)


def test_workers_that_keep_dying_stop_the_server(tiny_bundle: Path, redis_server, tmp_path: Path):
    """A crash loop is not served forever: past MAX_RESTARTS deaths within a minute the supervisor
    stops the other worker and exits with an error."""
    from service.workers import MAX_RESTARTS

    proc, _, log = start_serve(tiny_bundle, redis_server.url, 2, tmp_path)
    killed: set[int] = set()
    try:
        while proc.poll() is None and len(killed) <= MAX_RESTARTS:
            fresh = worker_pids(proc.pid) - killed
            if fresh:
                victim = min(fresh)
                os.kill(victim, signal.SIGKILL)
                killed.add(victim)
            time.sleep(0.05)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 1, log.read_text()
    assert f"{MAX_RESTARTS} workers died within 60 s; stopping" in log.read_text()
    assert worker_pids(proc.pid) == set()


def file_step(name: str, out: Path, key: dict, log: list[str]) -> Step:
    """A step whose output is one file holding its key."""

    def run(forced: bool) -> dict:
        out.write_text(json.dumps(key))
        log.append(name)
        return {"forced": forced}

    return Step(name, f"writing {out.name}", key, lambda record: out.is_file(), run)


def test_run_steps_skips_current_steps_and_redoes_what_follows_a_change(tmp_path: Path) -> None:
    state = tmp_path / "var" / "up.json"
    a, b = tmp_path / "a", tmp_path / "b"

    def steps(key_a: dict, log: list[str]) -> list[Step]:
        return [file_step("a", a, key_a, log), file_step("b", b, {}, log)]

    assert run_steps(steps({"v": 1}, []), state, rebuild=False) == ["a", "b"]
    assert run_steps(steps({"v": 1}, []), state, rebuild=False) == []
    b.unlink()  # an output gone: only that step
    assert run_steps(steps({"v": 1}, []), state, rebuild=False) == ["b"]
    assert run_steps(steps({"v": 2}, []), state, rebuild=False) == ["a", "b"]  # new inputs force what follows
    assert json.loads(state.read_text())["b"]["forced"] is True
    assert run_steps(steps({"v": 2}, []), state, rebuild=True) == ["a", "b"]
    state.write_text("not json")  # an unreadable record: everything runs again
    assert run_steps(steps({"v": 2}, []), state, rebuild=False) == ["a", "b"]


SMALL_TOML = """
[train]
epochs = 1
batch_size = 64
lr = 3e-3
patience = 0
threads = 1
device = "cpu"

[model]
d_model = 16
n_heads = 2
teacher_layers = 1
student_hidden = 16
dropout = 0.0
block_size = 2
"""


@pytest.mark.slow
def test_up_runs_every_step_once_then_reuses_them(tmp_path: Path, redis_server, clean_env) -> None:
    clean_env.setenv("PSAD_REDIS_URL", redis_server.url)
    clean_env.setenv("PSAD_KEY_PREFIX", "uptest")
    config = tmp_path / "small.toml"
    config.write_text(SMALL_TOML)
    cfg = UpConfig(
        ml100k=tmp_path / "absent",
        root=tmp_path,
        train_config=config,
        synthetic={"lists": 600, "users": 40, "items": 60, "list_length": 8},
        serve=False,
        progress=False,
    )
    assert up(cfg) == ["data", "train", "export", "profiles"]
    assert (tmp_path / "models" / "psad" / "1" / "manifest.json").is_file()
    assert up(cfg) == []
    redis.Redis.from_url(redis_server.url).flushdb()  # profiles gone (e.g. Redis restarted): reload only them
    assert up(cfg) == ["profiles"]
    for name in ("model.safetensors", "last.safetensors"):  # as written by an older model code: retrain
        weights = load_file(cfg.run_dir / name)
        weights["an.old.parameter.name"] = weights.pop(sorted(weights)[0])
        save_file(weights, cfg.run_dir / name)
    assert up(cfg) == ["train", "export", "profiles"]


def exported_names() -> set[str]:
    """Every sample name the service's and the shadow consumer's collectors expose (counter _total,
    histogram series)."""
    from psad.shadow.consumer import Metrics

    collectors = [o for o in vars(metrics).values() if isinstance(o, MetricWrapperBase)]
    families = [m for c in collectors for m in c.collect()] + list(Metrics().registry.collect())
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {m.name + s for m in families for s in suffixes.get(m.type, [""])}


def dashboard_panels() -> list[dict]:
    """The panels that query (a row only groups the panels below it)."""
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_dashboard_queries_only_metrics_the_service_exports() -> None:
    panels = dashboard_panels()
    datasource = yaml.safe_load((DASHBOARD.parent / "datasource.yml").read_text())["datasources"][0]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\bpsad_[a-z_]+", e)}
    core = {"psad_request_duration_seconds_bucket", "psad_requests_total", "psad_stage_duration_seconds_bucket"}
    assert queried >= core
    assert queried <= exported_names(), queried - exported_names()
    uids = {p["datasource"]["uid"] for p in panels}
    assert uids == {datasource["uid"]}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_dashboard_expressions_parse_as_promql(tmp_path: Path) -> None:
    def concrete(expr: str) -> str:  # Grafana's variables, as Grafana substitutes them
        return expr.replace("$__rate_interval", "1m").replace("$route", ".*")

    targets = [(p["id"], t) for p in dashboard_panels() for t in p["targets"]]
    rules = [{"record": f"check_{pid}_{t['refId']}", "expr": concrete(t["expr"])} for pid, t in targets]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    prometheus_yml = str(REPO / "deploy" / "prometheus.yml")
    config = subprocess.run(["promtool", "check", "config", prometheus_yml], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def run_rule_test(tmp_path: Path, series: list[dict], expected: list[dict], interval: str = "30s") -> None:
    """promtool's rule unit test of deploy/alerts.yml: input series sampled every `interval`, alert expectations."""
    case = {
        "rule_files": [str(REPO / "deploy" / "alerts.yml")],
        "evaluation_interval": interval,
        "tests": [{"interval": interval, "input_series": series, "alert_rule_test": expected}],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(case))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def paging(alert: str, at: str, summary: str, description: str) -> dict:
    """A promtool expectation: `alert` pages at `at` with these annotations."""
    annotations = {"summary": summary, "description": description}
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [{"exp_labels": {"severity": "page"}, "exp_annotations": annotations}],
    }


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_the_redis_alert_fires_when_one_worker_loses_redis_and_not_before(tmp_path: Path) -> None:
    """promtool's rule unit test on deploy/alerts.yml: two workers, one of which loses Redis."""
    series = [
        {"series": 'psad_redis_up{pid="1"}', "values": "1 1 0 0 0 0 0"},
        {"series": 'psad_redis_up{pid="2"}', "values": "1 1 1 1 1 1 1"},
    ]
    expected = [
        {"eval_time": "1m", "alertname": "PsadRedisDown", "exp_alerts": []},  # down for 0 s
        paging(
            "PsadRedisDown",
            "3m",
            "PSAD cannot reach its Redis profile store",
            (
                "Answers are degraded to cold-start profiles "
                '(psad_degraded_total{reason="redis_unavailable"}) and /events answers 503 '
                "until Redis is back."
            ),
        ),
    ]
    run_rule_test(tmp_path, series, expected)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_the_profiles_alert_fires_when_one_worker_finds_the_store_emptied_and_not_during_an_outage(
    tmp_path: Path,
) -> None:
    """promtool's rule unit test on deploy/alerts.yml: a Redis outage (the marker state unknown:
    psad_profiles_missing stays 0, PsadRedisDown pages) and then Redis back empty, seen by one
    worker first (psad_profiles_missing 1) until the profiles are loaded again."""
    series = [
        {"series": 'psad_redis_up{pid="1"}', "values": "1 0 0 0 1 1 1 1 1 1 1"},
        {"series": 'psad_profiles_missing{pid="1"}', "values": "0 0 0 0 1 1 1 1 0 0 0"},
        {"series": 'psad_profiles_missing{pid="2"}', "values": "0 0 0 0 0 1 1 1 0 0 0"},
    ]
    expected = [
        {"eval_time": "1m30s", "alertname": "PsadProfilesMissing", "exp_alerts": []},  # the outage
        {"eval_time": "2m", "alertname": "PsadProfilesMissing", "exp_alerts": []},  # missing for 0 s
        paging(
            "PsadProfilesMissing",
            "3m30s",
            "PSAD's Redis profile store has lost its profiles",
            (
                "Redis answers without the profile load marker (restarted empty, flushed): "
                'answers, mostly cold starts, are flagged psad_degraded_total{reason="'
                'profiles_missing"} until `psad profiles load` (or `psad profiles mark` for a '
                "store fed only by /events) runs again."
            ),
        ),
        {"eval_time": "5m", "alertname": "PsadProfilesMissing", "exp_alerts": []},  # reloaded
    ]
    run_rule_test(tmp_path, series, expected)
