"""`psad bench service` end to end on a tiny data set: it starts Redis and two server processes,
measures both phases and writes a report with every table the docs quote."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from loadtest.service_bench.run import BATCH_ROW, BenchConfig, bench_service_command, run_bench
from service.settings import load_settings


def test_bench_service_measures_and_reports(tiny_data: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch):
    for name in ("REDIS_URL", "REDIS_CLUSTER", "INFERENCE_WORKERS", "PROCESSES"):
        monkeypatch.delenv(f"PSAD_{name}", raising=False)
    monkeypatch.setenv("PSAD_MODEL_REPO", str(tiny_bundle.parents[1]))
    cfg = BenchConfig(
        data=tiny_data, workers=2, list_length=10, history=5, requests=20, duration_s=1.0, concurrency=4, var=tmp_path
    )
    out = tmp_path / "report.md"
    result = run_bench(cfg, load_settings(), out)

    assert len(result.rerank.ms) == len(result.floor.ms) == 20
    assert result.rerank.errors == result.floor.errors == result.loaded.errors == 0
    assert result.rps > 0 and len(result.loaded.ms) > 0
    assert result.server_loaded[BATCH_ROW] >= 1  # lists per model call, from the servers' own histograms
    report = out.read_text()
    for heading in (
        "## (a) One client",
        "## (b) Throughput",
        "## Inside the server",
        "## CPU per request",
        "## Targets",
    ):
        assert heading in report
    assert "`psad serve --workers 2`" in report and f"| {BATCH_ROW} |" in report
    assert report.count("| pass |") + report.count("| MISS |") == 6
    assert f"| degraded answers under load | < 0.1% | {result.loaded.degraded / len(result.loaded.ms):.3%}" in report


@pytest.mark.parametrize("field, value", [("requests", 5), ("concurrency", 0)])
def test_bench_service_rejects_bad_flags(field: str, value: int):
    app = typer.Typer()
    app.command()(bench_service_command)
    result = CliRunner().invoke(app, [f"--{field}", str(value)])
    assert result.exit_code == 2 and f"--{field}" in result.output


def test_a_url_without_a_server_fails_fast_with_a_hint(monkeypatch):
    from loadtest.service_bench import run as bench
    from tests.conftest import free_port

    monkeypatch.setattr(bench, "URL_READY_TIMEOUT_S", 0.5)
    with pytest.raises(RuntimeError, match=r"did not answer 200 within 0.5 s: start it with `psad serve`"):
        bench.wait_ready(f"http://127.0.0.1:{free_port()}", None, None)
