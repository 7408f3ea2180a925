"""Degradation, never a 5xx storm: Redis down or slow, a failing model, hot swaps, bad bundles."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import redis
from onnx import TensorProto, helper

from export.contract.bundle import MANIFEST_FILE, MODEL_FILE
from export.contract.schema import FeatureSchema, model_inputs
from psad.load_profiles import bulk_load
from service.profiles import mark_loaded
from tests.conftest import RedisServer
from tests.test_service_api import metric_samples, request, serve, settings_for

ADMIN = {"Authorization": "Bearer secret"}


@pytest.fixture
def own_redis(tmp_path: Path):
    """A function-scoped redis-server this test may stop and restart (the session one stays up)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def data(tiny_data: Path) -> dict:
    import pandas as pd

    return {
        "users": pd.read_parquet(tiny_data / "users.parquet")["user_id"].tolist(),
        "items": json.loads((tiny_data / "vocab.json").read_text())["items"],
    }


def copy_version(src: Path, repo: Path, version: int, model: onnx.ModelProto | None = None) -> Path:
    """A bundle at <repo>/psad/<version>: a copy of src, optionally with another (real) ONNX graph.

    The manifest is rewritten consistently (version, sha256 and size of the model), so the copy
    passes verification and only what the test changes differs. Like `psad export`, it is assembled
    beside its place and renamed into it, so a polling server never sees it half-written."""
    final = repo / "psad" / str(version)
    dst = repo / "psad" / f".{version}.tmp"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    manifest["version"] = version
    if model is not None:
        onnx.save(model, dst / MODEL_FILE)
        raw = (dst / MODEL_FILE).read_bytes()
        manifest["files"][MODEL_FILE] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest))
    dst.rename(final)
    return final


def failing_graph(schema: FeatureSchema, kind: str) -> onnx.ModelProto:
    """A real ONNX model with the serving inputs whose scores are NaN ("nan") or whose run raises
    for lists whose batch x length is not a multiple of 5 ("raise"; the warm-up shapes are)."""
    dtypes = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "bool": TensorProto.BOOL}
    inputs = [helper.make_tensor_value_info(s.name, dtypes[s.dtype], list(s.dims)) for s in model_inputs(schema)]
    output = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "list"])
    nodes = [helper.make_node("Cast", ["cand_mask"], ["mask"], to=TensorProto.FLOAT)]
    if kind == "nan":
        nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])
        nodes.append(helper.make_node("Mul", ["mask", "nan"], ["scores"]))
        inits = [nan]
    else:
        fives = helper.make_tensor("fives", TensorProto.INT64, [2], [-1, 5])
        nodes += [
            helper.make_node("Reshape", ["mask", "fives"], ["blocks"]),
            helper.make_node("Shape", ["mask"], ["shape"]),
            helper.make_node("Reshape", ["blocks", "shape"], ["scores"]),
        ]
        inits = [fives]
    graph = helper.make_graph(nodes, "failing", inputs, [output], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_redis_down_degrades_and_recovers(tiny_bundle, tiny_data, own_redis, data):
    bulk_load(own_redis.url, tiny_data, prefix="apitest", ttl_s=0, progress=False)
    with serve(settings_for(tiny_bundle.parents[1], own_redis.url)) as c:
        assert c.post("/rerank", json=request(data)).json()["degraded"] is False
        own_redis.stop()
        for _ in range(3):
            r = c.post("/rerank", json=request(data))
            assert r.status_code == 200 and r.json()["degraded_reasons"] == ["redis_unavailable"]
        cold = c.post("/rerank", json=request(data, user="never-seen-user")).json()
        assert [i["item_id"] for i in r.json()["items"]] == [i["item_id"] for i in cold["items"]]  # cold-start
        ev = c.post("/events", json={"user_id": "u", "item_id": "a", "action": "click"})
        assert ev.status_code == 503 and ev.headers["retry-after"] == "1" and "may not be stored" in ev.json()["detail"]
        ready = c.get("/readyz")  # still ready: it answers, degraded; the gauge and its alert say why
        assert ready.status_code == 200 and ready.json()["redis"] == "unreachable"
        assert ready.json()["profiles"] == "unknown"
        samples = metric_samples(c)
        assert samples[("psad_degraded_total", (("reason", "redis_unavailable"),))] >= 3
        assert samples[("psad_redis_up", ())] == 0
        own_redis.start()
        bulk_load(own_redis.url, tiny_data, prefix="apitest", ttl_s=0, progress=False)
        ready = c.get("/readyz")  # checks now: the reloaded store is marked again
        assert ready.status_code == 200 and ready.json()["redis"] == "ok" and ready.json()["profiles"] == "loaded"
        answers = [c.post("/rerank", json=request(data)).json() for _ in range(3)]
        assert answers[-1]["degraded"] is False
        assert metric_samples(c)[("psad_redis_up", ())] == 1


def test_events_recover_after_a_stall_and_a_crash_of_redis_with_a_grown_pool(tiny_bundle, own_redis, data):
    """Every pooled connection is in use when Redis stalls, then Redis dies and comes back: the
    failed writes must hand their connections back, so /events and /readyz recover at once."""
    settings = settings_for(tiny_bundle.parents[1], own_redis.url, redis_pool_size=4, events_timeout_ms=300)
    event = {"user_id": "u", "item_id": "a", "action": "click"}

    def burst(n: int) -> list[int]:
        def send(k: int) -> int:
            return c.post("/events", json={**event, "event_id": f"e{k}"}).status_code

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(send, range(n)))

    with serve(settings) as c:
        slow = subprocess.Popen(["redis-cli", "-p", str(own_redis.port), "DEBUG", "SLEEP", "0.2"])
        time.sleep(0.05)
        assert burst(8) == [200] * 8  # queued behind the sleep: the pool grows to its 4 connections
        slow.wait()
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # a stall: every write times out mid-command
        assert set(burst(8)) == {503}
        os.kill(own_redis.proc.pid, signal.SIGKILL)
        own_redis.proc.wait()
        own_redis.proc = None
        assert set(burst(4)) == {503}  # the outage
        own_redis.start()
        deadline = time.monotonic() + 5
        while c.post("/events", json=event).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert burst(8) == [200] * 8
        assert c.get("/readyz").json()["redis"] == "ok"


def test_events_after_a_redis_restart_reconnect_instead_of_failing(tiny_bundle, own_redis, data):
    """A restart closes every pooled connection: each must reconnect on its next use, not answer
    one 503 per stale connection while Redis is up."""
    settings = settings_for(tiny_bundle.parents[1], own_redis.url, redis_pool_size=4)

    def burst(tag: str) -> list[int]:
        def send(k: int) -> int:
            event = {"user_id": f"u{k}", "item_id": "a", "action": "click", "event_id": f"{tag}{k}"}
            return c.post("/events", json=event).status_code

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(send, range(8)))

    with serve(settings) as c:
        slow = subprocess.Popen(["redis-cli", "-p", str(own_redis.port), "DEBUG", "SLEEP", "0.2"])
        time.sleep(0.05)
        assert burst("a") == [200] * 8  # queued behind the sleep: the pool grows to its 4 connections
        slow.wait()
        own_redis.stop()
        own_redis.start()
        assert burst("b") == [200] * 8


def test_slow_redis_exceeds_the_budget(tiny_bundle, own_redis, data):
    mark_loaded(own_redis.url, "apitest")  # a loaded store (whose users have no profiles)
    with serve(settings_for(tiny_bundle.parents[1], own_redis.url, redis_budget_ms=20)) as c:
        assert c.post("/rerank", json=request(data)).json()["degraded"] is False
        redis.Redis.from_url(own_redis.url).execute_command("CLIENT", "PAUSE", 1000)  # Redis answers nobody for 1 s
        r = c.post("/rerank", json=request(data))
        assert r.status_code == 200 and r.json()["degraded_reasons"] == ["redis_timeout"]


@pytest.mark.parametrize("kind, reason", [("nan", "model_nonfinite"), ("raise", "model_error")])
def test_model_failure_answers_in_the_ranking_stage_order(tiny_bundle, redis_server, tmp_path, data, kind, reason):
    from export.runtime import load_bundle

    schema = load_bundle(tiny_bundle, device="cpu", warmup=False).schema
    copy_version(tiny_bundle, tmp_path, 1, failing_graph(schema, kind))
    with serve(settings_for(tmp_path, redis_server.url)) as c:
        body = request(data, n=3)
        r = c.post("/rerank", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["degraded"] is True and reason in out["degraded_reasons"]
        assert [i["item_id"] for i in out["items"]] == [x["item_id"] for x in body["candidates"]]
        assert [i["score"] for i in out["items"]] == pytest.approx([x["score"] for x in body["candidates"]])


def test_hot_swap_under_load_and_bad_bundle_refused(tiny_bundle, redis_server, tmp_path, data):
    repo = tmp_path / "repo"
    copy_version(tiny_bundle, repo, 1)
    settings = settings_for(repo, redis_server.url, admin_token="secret", microbatch_max_size=8)
    with serve(settings) as c:
        stop = threading.Event()

        def fire(k: int) -> list[tuple[int, str]]:
            seen = []
            with httpx.Client(base_url=c.base_url, timeout=30) as own:
                while not stop.is_set():
                    r = own.post("/rerank", json=request(data, user=data["users"][k % len(data["users"])]))
                    seen.append((r.status_code, r.json().get("model_version")))
            return seen

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(fire, k) for k in range(4)]
            time.sleep(0.3)
            copy_version(tiny_bundle, repo, 2)
            reload = c.post("/admin/reload", headers=ADMIN)
            time.sleep(0.3)
            stop.set()
            seen = [x for f in futures for x in f.result()]
        assert reload.status_code == 200
        assert reload.json() == {"result": "loaded", "version": 2, "detail": "", "workers": []}
        assert {status for status, _ in seen} == {200}
        versions = [v for _, v in seen]
        assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
        assert c.post("/rerank", json=request(data)).json()["model_version"] == "2"

        bad = copy_version(tiny_bundle, repo, 3)
        (bad / MODEL_FILE).write_bytes((bad / MODEL_FILE).read_bytes()[:1000])  # truncated: sha256 mismatch
        refused = c.post("/admin/reload", headers=ADMIN)
        assert refused.status_code == 409 and refused.json()["result"] == "refused"
        assert "sha256" in refused.json()["detail"] and refused.json()["version"] == 2
        assert c.post("/rerank", json=request(data)).json()["model_version"] == "2"
        assert metric_samples(c)[("psad_model_reload_total", (("result", "refused"),))] >= 1


def test_polling_follows_new_versions(tiny_bundle, redis_server, tmp_path, data):
    repo = tmp_path / "repo"
    copy_version(tiny_bundle, repo, 1)
    with serve(settings_for(repo, redis_server.url, poll_interval_s=0.05)) as c:
        copy_version(tiny_bundle, repo, 2)
        versions = set()
        for _ in range(400):  # the poller picks version 2 up within a few intervals
            versions.add(c.post("/rerank", json=request(data)).json()["model_version"])
            if "2" in versions:
                break
            time.sleep(0.05)
        assert "2" in versions
        assert c.get("/readyz").json()["model"]["version"] == 2


def test_a_reload_of_a_missing_version_does_not_stop_polling_for_it(tiny_bundle, redis_server, tmp_path, data):
    """A missing version is not a broken one: refused now (409), loaded by polling once it appears."""
    repo = tmp_path / "repo"
    copy_version(tiny_bundle, repo, 1)
    with serve(settings_for(repo, redis_server.url, poll_interval_s=0.05, admin_token="secret")) as c:
        early = c.post("/admin/reload", json={"version": 2}, headers=ADMIN)
        assert early.status_code == 409 and "no such bundle directory" in early.json()["detail"]
        copy_version(tiny_bundle, repo, 2)
        for _ in range(400):
            if c.get("/readyz").json()["model"]["version"] == 2:
                break
            time.sleep(0.05)
        assert c.get("/readyz").json()["model"]["version"] == 2


def test_stand_in_scores_keep_the_ranking_stage_order_on_failure(tiny_bundle, redis_server, tmp_path, data):
    """Without ranking-stage scores a failed model answers in the given order, scores descending."""
    from export.runtime import load_bundle

    schema = load_bundle(tiny_bundle, device="cpu", warmup=False).schema
    copy_version(tiny_bundle, tmp_path, 1, failing_graph(schema, "nan"))
    with serve(settings_for(tmp_path, redis_server.url)) as c:
        cands = [{"item_id": f"x{k}"} for k in range(4)]
        out = c.post("/rerank", json={"user_id": "u", "candidates": cands}).json()
        assert [i["item_id"] for i in out["items"]] == ["x0", "x1", "x2", "x3"]
        scores = np.array([i["score"] for i in out["items"]])
        assert (np.diff(scores) < 0).all()
