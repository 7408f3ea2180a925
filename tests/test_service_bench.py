"""`psad bench service` end to end on a tiny data set: it starts Redis and two server processes,
measures both phases and writes a report with every table the docs quote; its comparisons
(shadow sampling, tracing, another source tree) likewise. Also the profile-read micro-benchmark
(`python -m loadtest.resp_bench`) and the process helpers both stand on (psad.procs)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from loadtest.service_bench.report import (
    BATCH_ROW,
    SPANS_PER_RERANK,
    OpenLoop,
    Paired,
    ShadowResult,
    TracingResult,
    crossing,
)
from loadtest.service_bench.run import PAIR_ORDER, bench_service_command, run_bench
from loadtest.service_bench.workload import BenchConfig
from psad.procs import free_port, start_redis, stop_tree, tree_pids
from service.settings import load_settings
from tests.conftest import REPO

COMPARED = ("REDIS_URL", "REDIS_CLUSTER", "INFERENCE_WORKERS", "PROCESSES", "SHADOW_SAMPLE_RATE", "TRACING")


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


def comparison(tiny_data: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch, **mode: object) -> BenchConfig:
    """A comparison run's config on the tiny data set: tiny request counts, two connections."""
    for name in (*COMPARED, "OTLP_ENDPOINT"):
        monkeypatch.delenv(f"PSAD_{name}", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)  # every request traced
    monkeypatch.setenv("PSAD_MODEL_REPO", str(tiny_bundle.parents[1]))
    return BenchConfig(
        data=tiny_data, list_length=10, history=5, requests=20, duration_s=1.0, concurrency=2, var=tmp_path, **mode
    )


def check_pair(pair: Paired, names: tuple[str, str], report: str) -> None:
    """What every comparison measures and reports: both servers, every phase, each block's ratios."""
    assert pair.names == names and [len(s.ms) for s in pair.one] == [20, 20]
    assert [name for name, _ in pair.phases] == [names[k] for k in PAIR_ORDER]
    assert all(s.errors == 0 for s in (*pair.one, *pair.loaded)) and min(pair.rps) > 0
    assert all(cpu["server"] > 0 and cpu["redis"] > 0 for cpu in pair.cpu_ms) and "| server + Redis |" in report
    assert len(pair.blocks) == 3 and all(b.rps > 0 and b.server_cpu > 0 and b.p50 > 0 for b in pair.blocks)
    assert f"| {names[1]} / {names[0]} |" in report and "## Noise" in report and "| 3 |" in report


def test_bench_service_compares_shadow_sampling_on_and_off(
    tiny_data: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch
):
    cfg = comparison(tiny_data, tiny_bundle, tmp_path, monkeypatch, shadow_rate=1.0)
    out = tmp_path / "shadow.md"
    result = run_bench(cfg, load_settings(), out)

    assert isinstance(result, ShadowResult)
    report = out.read_text()
    check_pair(result.pair, ("off", "on"), report)
    # Every answer of the sampling server was recorded (rate 1), and the server at rate 0 wrote nothing:
    # its own counters are 0, and the shared stream holds exactly the sampling server's records.
    assert result.records["written"] == result.answered > len(result.pair.one[1].ms) + len(result.pair.loaded[1].ms)
    assert result.records["dropped"] == result.records["failed"] == 0
    assert result.off_records == {"written": 0, "dropped": 0, "failed": 0}
    assert result.stream_len == result.records["written"]
    assert "--shadow-rate 1" in report and "## Targets (issue 17)" in report
    assert report.count("| pass |") + report.count("| MISS |") == 2
    assert f"{result.records['written']:,.0f} written, 0 dropped, 0 failed" in report
    assert "rate 0: 0 written, 0 dropped, 0 failed" in report and "biases the one-client ratio toward 1" in report


def test_bench_service_compares_tracing_on_and_off(tiny_data: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch):
    cfg = comparison(tiny_data, tiny_bundle, tmp_path, monkeypatch, tracing=True)
    out = tmp_path / "tracing.md"
    result = run_bench(cfg, load_settings(), out)

    assert isinstance(result, TracingResult)
    report = out.read_text()
    check_pair(result.pair, ("off", "on"), report)
    # Every span of every answer of the traced server reached the collector, and the other sent none.
    assert result.answered > len(result.pair.one[1].ms) + len(result.pair.loaded[1].ms)
    assert result.received["spans"] == SPANS_PER_RERANK * result.answered and result.received["exports"] > 0
    assert result.pair.cpu_ms[1]["collector"] > 0 and "collector" not in result.pair.cpu_ms[0]
    assert "--tracing" in report and f"{result.received['spans']:,} in" in report


def test_bench_service_compares_this_checkout_with_another_tree(
    tiny_data: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch
):
    tree = tmp_path / "tree"
    for package in ("service", "export"):  # what `python -m service.cli serve` imports
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = comparison(tiny_data, tiny_bundle, tmp_path, monkeypatch, baseline_tree=tree)
    out = tmp_path / "baseline.md"
    result = run_bench(cfg, load_settings(), out)

    assert isinstance(result, Paired)
    report = out.read_text()
    check_pair(result, ("baseline", "current"), report)
    assert f"--baseline-tree {tree}" in report and f"| baseline ({tree}) |" in report


def test_bench_service_open_loop_measures_each_rate_and_endpoint(
    tiny_data: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch
):
    """--rate: each rate against /rerank and the floor on a real server, every request due answered,
    latencies from the scheduled send times, the CPU of each process, and the 800 req/s target row."""
    cfg = comparison(tiny_data, tiny_bundle, tmp_path, monkeypatch, rates=(40.0, 800.0), poisson_seed=1)
    out = tmp_path / "openloop.md"
    result = run_bench(cfg, load_settings(), out)

    assert isinstance(result, OpenLoop)
    assert [(p.result.rate, p.path) for p in result.points] == [
        (rate, path) for rate in (40.0, 800.0) for path in ("/rerank", "/bench/floor")
    ]
    for point in result.points:
        r = point.result
        assert r.scheduled > 0 and r.errors == r.unfinished == 0 and len(r.latency_ms) == r.scheduled
        # A latency includes its request's send lag, so the longest latency is at least the longest lag.
        assert len(r.send_lag_ms) == r.scheduled and r.pct(100) >= np.max(r.send_lag_ms)
        assert point.cores["server"] > 0 and point.cores["load generator"] > 0 and "redis" in point.cores
        assert point.others >= 0
    report = out.read_text()
    assert "--rate 40,800 --max-connections 256 --poisson-seed 1" in report
    assert "a Poisson process of rate R (seed 1)" in report
    assert report.count("| /rerank |") == report.count("| /bench/floor |") == 2
    assert "- /rerank: p99 passes 20 ms" in report and "## Target (issue 19, on 2 cores)" in report
    assert report.count("| pass |") + report.count("| MISS |") == 1


def test_the_rate_where_p99_passes_its_limit_is_interpolated_between_measured_rates():
    assert crossing([(1000.0, 30.0), (400.0, 5.0), (800.0, 10.0)], 20.0).startswith("at about 900 req/s")
    assert crossing([(400.0, 25.0), (800.0, 40.0)], 20.0).startswith("below 400 req/s")
    assert crossing([(400.0, 5.0), (800.0, 19.0)], 20.0).startswith("above 800 req/s")
    noisy = crossing([(400.0, 52.0), (800.0, 9.0), (1000.0, 86.0)], 20.0)
    assert noisy.startswith("below 400 req/s") and noisy.endswith(
        "back under it at 800 req/s: not monotonic in the rate, a noisy run"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rate", "400,x"], "--rate 400,x: expected requests/s separated by commas"),
        (["--rate", "400,0"], "--rate 400,0: each rate must be > 0"),
        (["--rate", "400", "--tracing"], "--rate and --tracing: --rate measures one server"),
        (["--shadow-rate", "1", "--url", "http://127.0.0.1:1"], "--shadow-rate starts its own two servers"),
        (["--tracing", "--url", "http://127.0.0.1:1"], "--tracing starts its own two servers"),
        (["--tracing", "--shadow-rate", "0.5"], "--shadow-rate and --tracing: each is a comparison of its own"),
        (["--baseline-tree", "."], "--baseline-tree .: no service/cli.py in it"),
    ],
)
def test_bench_service_comparisons_need_their_own_servers_and_come_one_at_a_time(
    args: list[str], message: str, tmp_path: Path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command()(bench_service_command)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_bench_service_shadow_rate_is_a_fraction():
    app = typer.Typer()
    app.command()(bench_service_command)
    assert CliRunner().invoke(app, ["--shadow-rate", "1.5"]).exit_code == 2


@pytest.mark.parametrize("field, value", [("requests", 5), ("concurrency", 0)])
def test_bench_service_rejects_bad_flags(field: str, value: int):
    app = typer.Typer()
    app.command()(bench_service_command)
    result = CliRunner().invoke(app, [f"--{field}", str(value)])
    assert result.exit_code == 2 and f"--{field}" in result.output


def test_a_url_without_a_server_fails_fast_with_a_hint(monkeypatch):
    from loadtest.service_bench import run as bench

    monkeypatch.setattr(bench, "URL_READY_TIMEOUT_S", 0.5)
    with pytest.raises(RuntimeError, match=r"did not answer 200 within 0.5 s: start it with `psad serve`"):
        bench.wait_ready(f"http://127.0.0.1:{free_port()}", None, None)


def test_resp_bench_starts_its_redis_and_prints_both_readers(tmp_path: Path):
    """`python -m loadtest.resp_bench` on a few profiles: its own redis-server (stopped at the end),
    both readers checked against each other before timing, one row each and the ratio."""
    from loadtest.resp_bench import main

    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, ["--profiles", "20", "--history", "5", "--reads", "100", "--var", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| RespClient (service/resp.py) | 100 |" in result.output
    assert "| redis-py (RedisPyReader) | 100 |" in result.output
    assert "| ratio redis-py / RespClient | |" in result.output
    assert "ready to exit" in (tmp_path / "redis" / "redis.log").read_text()  # and stopped it


# psad.procs: how the benchmarks (and psad up, and the tests) start and stop their processes.


def test_start_redis_refuses_a_port_that_another_redis_serves(redis_server, tmp_path: Path):
    """The port was free when chosen, but another Redis took it: fail, rather than hand over its data."""
    with pytest.raises(RuntimeError, match=rf"port {redis_server.port} is taken by another redis-server"):
        start_redis(redis_server.port, tmp_path)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict; empty once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def ignores_sigterm(pid: int) -> bool:
    return bool(int(proc_status(pid).get("SigIgn", "0"), 16) & (1 << (signal.SIGTERM - 1)))


def test_stop_tree_kills_a_tree_that_ignores_sigterm():
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    parent = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {ignore!r}]); {ignore}"
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 30
    while not (len(tree := tree_pids(proc.pid)) == 2 and all(ignores_sigterm(p) for p in tree)):
        assert time.monotonic() < deadline, "the two processes did not start"
        time.sleep(0.05)
    stop_tree(proc, timeout_s=0.5)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while proc_status(tree[1]).get("State", "Z").startswith(("R", "S", "D", "T")):  # a zombie is dead
        assert time.monotonic() < deadline, "the child outlived stop_tree"
        time.sleep(0.05)
