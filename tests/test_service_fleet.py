"""One server, one version: a reload, a pin or a poll reaches every worker of `psad serve
--workers 2`, and a replaced worker joins on the version the others serve."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from export.contract.bundle import MODEL_FILE
from service.fleet import Fleet
from service.model_store import ModelStore
from service.settings import load_settings
from tests.test_service_cli import get, start_serve, stop_serve, wait_for, worker_pids
from tests.test_service_degradation import copy_version

STARTED = "Application startup complete"


def versions_by_worker(port: int, connections: int = 32) -> dict[str, set[str]]:
    """Open `connections` keep-alive connections at once (the kernel spreads them over the workers),
    then one /rerank on each: the model versions each worker answered with."""
    body = json.dumps({"user_id": "u1", "candidates": [{"item_id": "a"}, {"item_id": "b"}]})
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(connections)]
    for conn in conns:
        conn.connect()
    seen: dict[str, set[str]] = {}
    for conn in conns:
        conn.request("POST", "/rerank", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert resp.status == 200, answer
        seen.setdefault(resp.getheader("X-Request-ID")[:16], set()).add(answer["model_version"])
        conn.close()
    return seen


def reload(port: int, version: int | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"version": version}) if version is not None else ""
    conn.request("POST", "/admin/reload", body, {"Authorization": "Bearer secret", "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def served_versions(port: int) -> set[str]:
    """The versions psad_model_info shows as served (value 1) for the whole server."""
    text = get(f"http://127.0.0.1:{port}/metrics")[1].decode()
    return {
        s.labels["version"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "psad_model_info" and s.value == 1
    }


@pytest.fixture
def repo(tiny_bundle: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    copy_version(tiny_bundle, repo, 1)
    return repo


def test_a_reload_reaches_every_worker_and_a_replaced_worker_joins_on_it(repo, redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PSAD_ADMIN_TOKEN", "secret")
    proc, port, log = start_serve(repo / "psad" / "1", redis_server.url, 2, tmp_path)
    try:
        wait_for(lambda: log.read_text().count(STARTED) == 2, "two workers started", proc, log)
        copy_version(repo / "psad" / "1", repo, 2)
        status, answer = reload(port)
        assert status == 200 and answer["result"] in ("loaded", "unchanged") and answer["version"] == 2, answer
        assert [w["version"] for w in answer["workers"]] == [2, 2]
        seen = versions_by_worker(port)
        assert len(seen) == 2 and all(v == {"2"} for v in seen.values()), seen
        assert served_versions(port) == {"2"}

        status, answer = reload(port, 1)  # back to 1 while 2 is the latest in the repository
        assert status == 200 and [w["version"] for w in answer["workers"]] == [1, 1], answer
        victim = min(worker_pids(proc.pid))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: log.read_text().count(STARTED) == 3, "a replacement worker", proc, log)
        seen = versions_by_worker(port)
        assert len(seen) == 2 and all(v == {"1"} for v in seen.values()), seen  # not the latest, 2
        assert served_versions(port) == {"1"}
    finally:
        stop_serve(proc, log)


def test_a_version_one_worker_refuses_is_reported_and_not_served(repo, redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PSAD_ADMIN_TOKEN", "secret")
    proc, port, log = start_serve(repo / "psad" / "1", redis_server.url, 2, tmp_path)
    try:
        wait_for(lambda: log.read_text().count(STARTED) == 2, "two workers started", proc, log)
        bad = copy_version(repo / "psad" / "1", repo, 2)
        (bad / MODEL_FILE).write_bytes(b"not a model")  # its manifest's sha256 no longer matches
        status, answer = reload(port)
        assert status == 409 and answer["result"] == "refused" and "sha256" in answer["detail"], answer
        seen = versions_by_worker(port)
        assert all(v == {"1"} for v in seen.values()), seen
        assert served_versions(port) == {"1"}
    finally:
        stop_serve(proc, log)


def test_a_worker_joins_on_the_latest_when_the_servers_version_is_gone_and_forgets_a_cured_refusal(repo, tmp_path):
    """In-process, one ModelStore as one worker: a target whose files are gone must not stop a
    replacement from starting, and a version refused once and loaded later is followed again."""
    fleet_dir = tmp_path / "fleet"
    fleet_dir.mkdir()
    Fleet(fleet_dir).set_target(9)  # served from memory by the others, deleted from the repository
    store = ModelStore(load_settings(model_repo=repo, device="cpu", fleet_dir=fleet_dir))

    async def scenario() -> None:
        assert (await store.start()).version == 1
        good = repo / "psad" / "2"
        copy_version(repo / "psad" / "1", repo, 2)
        shutil.move(good / MODEL_FILE, tmp_path / MODEL_FILE)  # still being copied: refused
        assert (await store.reload(2)).result == "refused"
        assert 2 in Fleet(fleet_dir).states()[0].refused
        shutil.move(tmp_path / MODEL_FILE, good / MODEL_FILE)
        assert (await store.reload(2)).result == "loaded"
        assert Fleet(fleet_dir).states()[0].refused == {}

    asyncio.run(scenario())
