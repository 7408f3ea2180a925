"""`psad bench peers`: every peer does the same work as our service (the same order and scores for the
same request, against a real Redis, real servers and real ONNX Runtime), the runner measures and
reports on tiny counts, and the table's rules (best throughput under the p99 limit, ratios against
the best peer) and the option checks hold."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import orjson
import pytest
import typer

from loadtest.peers import venvs
from loadtest.peers.registry import PEERS, PSAD, start_peer
from loadtest.peers.report import P99_LIMIT_MS, PeerResult, PeersResult, Point
from loadtest.peers.run import PeersConfig, check_peers, counts, run_peers, stop_peer, wait_answer
from loadtest.peers.work import PeerConfig
from loadtest.service_bench.client import Sample
from loadtest.service_bench.run import wait_ready
from loadtest.service_bench.workload import BenchConfig, plan_workload, request_bodies
from psad.load_profiles import bulk_load
from psad.procs import LOOPBACK, free_port
from service.settings import load_settings
from tests.conftest import RedisServer

FRAMEWORKS = [name for name, peer in PEERS.items() if peer.framework]
UNSET = ("REDIS_URL", "REDIS_CLUSTER", "INFERENCE_WORKERS", "PROCESSES", "SHADOW_SAMPLE_RATE", "TRACING", "THREADS")


def post(port: int, body: bytes) -> dict:
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}/rerank", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        return orjson.loads(resp.read())


@dataclass
class Reference:
    """Our service's answers to the bodies, and what a peer needs to serve the same."""

    config: PeerConfig
    repo: Path
    bodies: list[bytes]
    answers: list[dict]
    var: Path


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """A real Redis with the tiny data set's profiles and our service's answers to the benchmark's bodies
    (and to one with top_k)."""
    var = tmp_path_factory.mktemp("peers")
    redis = RedisServer(var / "redis")
    redis.start()
    with ExitStack() as stack, pytest.MonkeyPatch.context() as env:
        stack.callback(redis.stop)
        for name in UNSET:
            env.delenv(f"PSAD_{name}", raising=False)
        bulk_load(redis.url, tiny_data, prefix="psad", ttl_s=0, progress=False)
        workload, _ = plan_workload(tiny_data, 5, 0)
        bodies = request_bodies(workload, 10)[:12]
        bodies.append(orjson.dumps({**orjson.loads(bodies[0]), "top_k": 3, "request_id": "cut-3"}))
        config = PeerConfig(tiny_bundle, redis.url, workers=1)
        repo = tiny_bundle.parents[1]
        port = free_port()
        ours = start_peer(PEERS[PSAD], port, config, repo, venvs.bin_dir(PEERS[PSAD]), var / "psad.log")
        stack.callback(stop_peer, ours)
        wait_ready(f"http://{LOOPBACK}:{port}", ours, var / "psad.log")
        answers = [post(port, body) for body in bodies]
        yield Reference(config, repo, bodies, answers, var)


def peer_answers(name: str, ref: Reference) -> list[dict]:
    peer = PEERS[name]
    port, log = free_port(), ref.var / f"{name}.log"
    proc: subprocess.Popen = start_peer(peer, port, ref.config, ref.repo, venvs.bin_dir(peer), log)
    try:
        wait_answer(port, ref.bodies[0], proc, log)
        return [post(port, body) for body in ref.bodies]
    finally:
        stop_peer(proc)


def check_same_work(answers: list[dict], ref: Reference) -> None:
    for got, want in zip(answers, ref.answers, strict=True):
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in want["items"]]
        # each request is scored at its own time: behaviours' ages differ by the milliseconds between the two
        got_scores, want_scores = [i["score"] for i in got["items"]], [i["score"] for i in want["items"]]
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-5)
        assert got["model_version"] == want["model_version"] and got["degraded"] is want["degraded"] is False
        scores = [i["score"] for i in got["items"]]
        assert scores == sorted(scores, reverse=True)
    assert len(answers[-1]["items"]) == 3 and answers[-1]["request_id"] == "cut-3"
    # the model reorders: an answer that kept the given (descending) order would prove nothing
    assert any(
        [i["item_id"] for i in a["items"]] != _given_order(b) for a, b in zip(ref.answers, ref.bodies, strict=True)
    )


def _given_order(body: bytes) -> list[str]:
    return [c["item_id"] for c in orjson.loads(body)["candidates"]]


@pytest.mark.parametrize("name", ["fastapi", "fastapi-gc"])
def test_fastapi_peer_answers_as_our_service_does(name: str, reference: Reference):
    check_same_work(peer_answers(name, reference), reference)


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_framework_peer_answers_as_our_service_does(name: str, reference: Reference):
    if not venvs.built(PEERS[name]):
        pytest.skip(f"the {name} peer's virtualenv is not built: run `{venvs.build_hint(PEERS[name])}`")
    check_same_work(peer_answers(name, reference), reference)


def test_runner_measures_and_reports(tiny_data: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch):
    for name in UNSET:
        monkeypatch.delenv(f"PSAD_{name}", raising=False)
    monkeypatch.setenv("PSAD_MODEL_REPO", str(tiny_bundle.parents[1]))
    bench = BenchConfig(
        data=tiny_data, workers=1, list_length=10, history=5, requests=30, duration_s=0.5, rates=(40.0,), var=tmp_path
    )
    out = tmp_path / "peers.md"
    result = run_peers(PeersConfig(bench, (PSAD, "fastapi"), (1, 2)), load_settings(), out)

    for r in (result.ours, *result.peers):
        assert len(r.one.ms) == 30 and r.errors() == 0 and [p.connections for p in r.points] == [1, 2]
        assert (
            all(p.rps > 0 and p.cpu_ms["server"] > 0 for p in r.points) and sum(p.cpu_ms["redis"] for p in r.points) > 0
        )
        (run,) = r.rates
        assert run.rate == 40.0 and run.scheduled == 20 and len(run.latency_ms) == 20 and run.errors == 0
    assert [r.name for r in result.peers] == ["fastapi"]
    assert result.inside["/rerank"] > 0 and result.inside["stage inference"] > 0  # our service's own histograms
    report = out.read_text()
    assert "| psad |" in report and "| fastapi |" in report and "## Every throughput phase" in report
    assert "| stage inference |" in report
    assert "## Open loop" in report and "| 40 | fastapi |" in report and "- psad: p99 passes 20 ms" in report
    assert report.count("| pass |") + report.count("| MISS |") == 2


def sample(ms: list[float], errors: int = 0) -> Sample:
    return Sample(np.asarray(ms), errors, 0)


def test_best_throughput_is_under_the_p99_limit_and_ratios_take_the_best_peer():
    fast, slow = [1.0] * 99, [P99_LIMIT_MS + 5] * 99

    def result(name: str, p50: float, points: list[Point]) -> PeerResult:
        return PeerResult(name, name, sample([p50] * 10), points)

    ours = result(PSAD, 1.0, [Point(1, sample(fast), 500.0, {}), Point(4, sample(fast), 900.0, {})])
    a = result("a", 2.0, [Point(1, sample(fast), 300.0, {}), Point(4, sample(slow), 1000.0, {})])  # p99 over
    b = result("b", 4.0, [Point(1, sample(fast, errors=1), 800.0, {}), Point(2, sample(fast), 450.0, {})])  # errors
    c = result("c", 5.0, [Point(8, None, 0.0, {}, "ConnectionResetError")])  # failed
    peers = PeersResult(ours, [a, b, c])

    assert ours.best().rps == 900.0 and a.best().rps == 300.0 and b.best().rps == 450.0 and c.best() is None
    assert peers.best_rps() is b and peers.best_p50() is a
    assert peers.ratios() == pytest.approx((2.0, 0.5))
    assert c.failed() == ["8 connections: ConnectionResetError"] and b.errors() == 1


def test_options_are_checked(tmp_path: Path, monkeypatch):
    assert counts("1,2,8", "--connections") == (1, 2, 8)
    for bad in ("8,2", "0,1", "1,1", "a"):
        with pytest.raises(typer.BadParameter, match="increasing whole numbers"):
            counts(bad, "--connections")
    bench = BenchConfig()
    with pytest.raises(typer.BadParameter, match="unknown nginx"):
        check_peers(PeersConfig(bench, (PSAD, "nginx")))
    with pytest.raises(typer.BadParameter, match="name psad and at least one other"):
        check_peers(PeersConfig(bench, ("fastapi", "bentoml")))
    monkeypatch.setattr(venvs, "ROOT", tmp_path)  # nothing built there
    with pytest.raises(typer.BadParameter, match=r"not built; add --build, or run `psad bench peers --peers psad,ray"):
        check_peers(PeersConfig(bench, (PSAD, "ray")))
    check_peers(PeersConfig(bench, (PSAD, "ray"), build=True))  # --build: built when the run starts


def test_framework_virtualenvs_pin_the_project_runtime():
    peer = PEERS["bentoml"]
    make, install, project = venvs.install_commands(peer)
    assert make[1:4] == ["-m", "venv", "--clear"] and "--system-site-packages" not in make
    assert "bentoml" in install and f"onnxruntime=={version('onnxruntime')}" in install
    assert f"numpy=={version('numpy')}" in install and f"redis=={version('redis')}" in install
    assert project[-3:] == ["--no-deps", "-e", str(venvs.REPO)]
