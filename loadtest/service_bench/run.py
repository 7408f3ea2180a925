"""`psad bench service`: closed-loop latency and throughput of a real server on this machine.

Setup (unless --url): a private redis-server on a free port loaded with the data set's profiles,
and `python -m service.cli serve` with the floor endpoint on (POST /bench/floor: /rerank's
parsing, validation and Redis read, then a sort by the given scores, no model).

Requests: list length L of distinct real item ids with descending scores, for real users whose
stored history holds H behaviours (workload.py).

(a) one client, one keep-alive connection: /rerank and /bench/floor alternate request by request,
    so both see the same machine state; p50/p90/p99 of each and the ratio of the p50s.
(b) throughput: C keep-alive connections in one asyncio (uvloop) process, each sending its next
    /rerank as soon as the previous answer arrives, for a fixed duration.

With --shadow-rate R, shadow sampling's cost instead, in one run: two servers of the same model on
the same Redis, at PSAD_SHADOW_SAMPLE_RATE 0 and R; (a) one client alternates them request by
request, (b) their throughput phases alternate (off, on, on, off, three times: a drift of the
host's speed falls on both alike); then the sampling server's record counts, once every answer is
accounted for (written, dropped or failed), the other's (all 0) and the stream's length. The two
servers share the host and Redis, so in (a) the sampling server's writes also load the server at
rate 0, which biases the one-client ratio toward 1; (b) runs one server at a time, without that bias.

The load generator (client.py) runs on the same cores as the server and Redis on a small machine:
the report (report.py) says how many there are. This module starts and stops the processes,
runs both phases and is the command.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis
import typer
from redis.cluster import RedisCluster

from export.contract.errors import reported
from export.contract.shadow import stream_key
from loadtest.service_bench.client import WARMUP_S, Sample, http_request, one_client, run_async, throughput
from loadtest.service_bench.report import BATCH_ROW, Result, ShadowResult, render, render_shadow
from loadtest.service_bench.workload import BenchConfig, plan_workload, request_bodies, top_up
from psad.procs import free_port, start_redis, stop_tree, tree_cpu_s, wait_http
from service.cli import MODEL_REPO, REDIS_URL, apply_overrides
from service.settings import ENV_PREFIX, Settings, load_settings

READY_TIMEOUT_S = 180.0  # a server the benchmark starts: model load and warm-up included
URL_READY_TIMEOUT_S = 10.0  # a server given by --url should be up already
# The throughput phases with --shadow-rate: off, on, on, off, three times, so a drift of the shared
# host's speed, steady or not, falls on both servers alike.
SHADOW_ORDER = ("off", "on", "on", "off") * 3
ACCOUNTED_TIMEOUT_S = 10.0  # how long the sampling server may take to write what it still holds


# The server under test ------------------------------------------------------------------------


def wait_ready(base: str, proc: subprocess.Popen | None, log: Path | None) -> dict:
    """/readyz's body once it answers 200; proc None: a server started by someone else (--url)."""
    if proc is not None:
        return orjson.loads(wait_http(f"{base}/readyz", READY_TIMEOUT_S, proc, log))
    hint = ": start it with `psad serve` (PSAD_ENABLE_FLOOR_ENDPOINT=true), or omit --url"
    return orjson.loads(wait_http(f"{base}/readyz", URL_READY_TIMEOUT_S, hint=hint))


def start_server(
    port: int,
    workers: int,
    redis_url: str,
    model_repo: Path,
    log: Path,
    cluster: bool = False,
    shadow_rate: float | None = None,
) -> subprocess.Popen:
    """`python -m service.cli serve`; shadow_rate None: PSAD_SHADOW_SAMPLE_RATE as this process has it."""
    env = {
        **os.environ,
        f"{ENV_PREFIX}ENABLE_FLOOR_ENDPOINT": "true",
        f"{ENV_PREFIX}REDIS_URL": redis_url,
        f"{ENV_PREFIX}REDIS_CLUSTER": str(cluster).lower(),
        f"{ENV_PREFIX}MODEL_REPO": str(model_repo.resolve()),
        f"{ENV_PREFIX}LOG_LEVEL": "warning",
    }
    if shadow_rate is not None:
        env[f"{ENV_PREFIX}SHADOW_SAMPLE_RATE"] = repr(shadow_rate)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


# What the server and the processes measured -----------------------------------------------------


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: each given process tree, and this process (the load generator)."""
    out = {name: tree_cpu_s(pid) for name, pid in pids.items()} if Path("/proc").is_dir() else {}
    out["load generator"] = time.process_time()
    return out


SERVER_FAMILIES = ("psad_request_duration_seconds", "psad_stage_duration_seconds", "psad_batch_size")


def scrape(base: str) -> list[Any]:
    """The server's metric families (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        return list(text_string_to_metric_families(resp.read().decode()))


def server_totals(base: str) -> dict[str, tuple[float, float]]:
    """(sum, count) per route, per stage (seconds) and of batch sizes from the server's histograms."""
    totals: dict[str, list[float]] = {}
    for family in scrape(base):
        if family.name not in SERVER_FAMILIES:
            continue
        for s in family.samples:
            label = s.labels.get("route") or (f"stage {s.labels['stage']}" if "stage" in s.labels else BATCH_ROW)
            entry = totals.setdefault(label, [0.0, 0.0])
            if s.name.endswith("_sum"):
                entry[0] = s.value
            elif s.name.endswith("_count"):
                entry[1] = s.value
    return {k: (v[0], v[1]) for k, v in totals.items()}


def phase_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Means over what was served between two snapshots: ms per route and stage, lists per model call."""
    out = {}
    for label, (total, count) in sorted(after.items()):
        t0, c0 = before.get(label, (0.0, 0.0))
        if count > c0:
            out[label] = (1 if label == BATCH_ROW else 1000) * (total - t0) / (count - c0)
    return out


# Orchestration --------------------------------------------------------------------------------


def measure(base: str, cfg: BenchConfig, bodies: list[bytes], pids: dict[str, int] | None = None) -> Result:
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise typer.BadParameter(f"--url {base}: the benchmark runs over loopback only (127.0.0.1)")
    rerank = [http_request(host, "/rerank", b) for b in bodies]
    floor = [http_request(host, "/bench/floor", b) for b in bodies]
    typer.echo(f"(a) one client: {cfg.requests} x /rerank and /bench/floor, alternating ...")
    snapshots = [server_totals(base)]
    one_rerank, one_floor = run_async(one_client(host, (port, rerank), (port, floor), cfg.requests))
    snapshots.append(server_totals(base))
    typer.echo(f"(b) throughput: {cfg.concurrency} connections for {cfg.duration_s:.0f} s ...")
    cpu0 = cpu_snapshot(pids or {})
    loaded, rps = run_async(throughput(host, port, rerank, cfg.concurrency, cfg.duration_s))
    cpu1 = cpu_snapshot(pids or {})
    snapshots.append(server_totals(base))
    means = [phase_means(a, b) for a, b in zip(snapshots, snapshots[1:], strict=False)]
    # The whole phase, warm-up second included: divide by every request sent, not only the measured ones.
    sent = max(1, round(len(loaded.ms) * (WARMUP_S + cfg.duration_s) / cfg.duration_s))
    cpu = {k: 1000 * (cpu1[k] - cpu0[k]) / sent for k in cpu1}
    return Result(one_rerank, one_floor, loaded, rps, means[0], means[1], cpu)


def shadow_counts(base: str) -> tuple[dict[str, float], float]:
    """psad_shadow_records_total by result, and the /rerank requests answered 200."""
    records: dict[str, float] = {}
    answered = 0.0
    for family in scrape(base):
        for s in family.samples:
            if s.name == "psad_shadow_records_total":
                records[s.labels["result"]] = s.value
            elif s.name == "psad_requests_total" and s.labels == {"route": "/rerank", "status": "200"}:
                answered = s.value
    return records, answered


def stream_length(redis_url: str, cluster: bool, prefix: str) -> int:
    """XLEN of the shadow stream both servers would write to."""
    client = (RedisCluster if cluster else redis.Redis).from_url(redis_url)
    try:
        return int(client.xlen(stream_key(prefix)))
    finally:
        client.close()


def measure_shadow(
    bases: dict[str, str], cfg: BenchConfig, bodies: list[bytes], pids: dict[str, int], stream: Callable[[], int]
) -> ShadowResult:
    """(a) and (b) against the servers "off" and "on", then both servers' record counts and the
    stream's length. pids: each server's and Redis's, for the CPU each phase took per request."""
    ports = {name: urlsplit(base).port or 80 for name, base in bases.items()}
    host = "127.0.0.1"
    rerank = [http_request(host, "/rerank", b) for b in bodies]
    typer.echo(f"(a) one client: {cfg.requests} x /rerank to each server, alternating ...")
    one = run_async(one_client(host, (ports["off"], rerank), (ports["on"], rerank), cfg.requests))
    phase_s = cfg.duration_s / SHADOW_ORDER.count("on")
    loaded: dict[str, list[Sample]] = {"off": [], "on": []}
    cpu_s: dict[str, dict[str, float]] = {"off": {}, "on": {}}  # CPU seconds by process, over the phases
    sent = {"off": 0.0, "on": 0.0}
    phases = []
    for name in SHADOW_ORDER:
        typer.echo(f"(b) throughput, sampling {name}: {cfg.concurrency} connections for {phase_s:g} s ...")
        watched = {"server": pids[name], **({"redis": pids["redis"]} if "redis" in pids else {})}
        cpu0 = cpu_snapshot(watched)
        sample, rps = run_async(throughput(host, ports[name], rerank, cfg.concurrency, phase_s))
        cpu1 = cpu_snapshot(watched)
        for k in cpu1:
            cpu_s[name][k] = cpu_s[name].get(k, 0.0) + cpu1[k] - cpu0[k]
        sent[name] += len(sample.ms) * (WARMUP_S + phase_s) / phase_s  # the warm-up second included
        loaded[name].append(sample)
        phases.append((name, rps))
    merged = (Sample.merged(loaded["off"]), Sample.merged(loaded["on"]))
    rates = (len(merged[0].ms) / cfg.duration_s, len(merged[1].ms) / cfg.duration_s)
    cpu_ms = tuple({k: 1000 * v / max(1.0, sent[name]) for k, v in cpu_s[name].items()} for name in ("off", "on"))
    deadline = time.monotonic() + ACCOUNTED_TIMEOUT_S
    records, answered = shadow_counts(bases["on"])
    while cfg.shadow_rate >= 1.0 and sum(records.values()) < answered and time.monotonic() < deadline:
        time.sleep(0.1)  # every answer sampled: wait until the server has written (or counted) them all
        records, answered = shadow_counts(bases["on"])
    off_records, _ = shadow_counts(bases["off"])
    return ShadowResult(
        cfg.shadow_rate, one, merged, rates, phases, records, answered, (cpu_ms[0], cpu_ms[1]), off_records, stream()
    )


def command_line(cfg: BenchConfig, out: Path | None) -> str:
    """The command that reproduces this run, every option spelled out."""
    args = ["psad", "bench", "service", "--data", str(cfg.data), "--list-length", str(cfg.list_length)]
    args += ["--history", str(cfg.history), "--requests", str(cfg.requests), "--duration-s", f"{cfg.duration_s:g}"]
    args += ["--concurrency", str(cfg.concurrency)]
    args += ["--url", cfg.url] if cfg.url else ["--workers", str(cfg.workers)]
    args += ["--shadow-rate", f"{cfg.shadow_rate:g}"] if cfg.shadow_rate else []
    return shlex.join(args + (["--out", str(out)] if out else []))


def run_bench(cfg: BenchConfig, settings: Settings, out: Path | None) -> Result | ShadowResult:
    """Set up (or use --url), measure, print the report, and write it when `out` is given."""
    from psad.load_profiles import bulk_load

    if cfg.shadow_rate and cfg.url:
        raise typer.BadParameter("--shadow-rate starts its own two servers: omit --url")
    cfg.load_average = os.getloadavg()[0]
    workload, missing = plan_workload(cfg.data, cfg.history, settings.history_len)
    bodies = request_bodies(workload, cfg.list_length)
    redis_proc = None
    servers: dict[str, subprocess.Popen] = {}
    bases: dict[str, str] = {}
    result: Result | ShadowResult
    try:
        if cfg.url:
            bases["server"], described = cfg.url.rstrip("/"), f"given by --url {cfg.url}"
        else:
            redis_url, cluster = settings.redis_url, settings.redis_cluster
            if f"{ENV_PREFIX}REDIS_URL" not in os.environ:
                redis_port = free_port()
                redis_proc = start_redis(redis_port, cfg.var / "redis")
                redis_url, cluster = f"redis://127.0.0.1:{redis_port}/0", False
            typer.echo(f"loading profiles from {cfg.data} into {redis_url} ...")
            bulk_load(
                redis_url,
                cfg.data,
                prefix=settings.key_prefix,
                ttl_s=settings.profile_ttl_s,
                history_len=settings.history_len or None,
                progress=True,
                cluster=cluster,
            )
            rates = {"off": 0.0, "on": cfg.shadow_rate} if cfg.shadow_rate else {"server": None}
            for name, rate in rates.items():
                port = free_port()
                log = cfg.var / f"{name}.log"
                servers[name] = start_server(port, cfg.workers, redis_url, settings.model_repo, log, cluster, rate)
                bases[name] = f"http://127.0.0.1:{port}"
            threads = load_settings(processes=cfg.workers).inference_workers  # what each server process reads
            described = (
                f"`psad serve --workers {cfg.workers}` (uvloop, httptools), Redis on loopback"
                f"{' (cluster)' if cluster else ''}; inference threads {threads} per process, "
                f"micro-batching {'up to ' + str(settings.microbatch_max_size) if settings.microbatching else 'off'}, "
                f"Redis budget {settings.redis_budget_ms:g} ms"
            )
        readies = {name: wait_ready(base, servers.get(name), cfg.var / f"{name}.log") for name, base in bases.items()}
        top_up(next(iter(bases.values())), workload, missing)  # one Redis: the servers share the profiles
        pids = {name: proc.pid for name, proc in servers.items()}
        if redis_proc is not None:
            pids["redis"] = redis_proc.pid
        if cfg.shadow_rate:
            prefix = settings.key_prefix
            result = measure_shadow(bases, cfg, bodies, pids, lambda: stream_length(redis_url, cluster, prefix))
        else:
            result = measure(bases["server"], cfg, bodies, pids)
    finally:
        for proc in servers.values():
            stop_tree(proc)
        stop_tree(redis_proc)
    ready, command = next(iter(readies.values())), command_line(cfg, out)
    if isinstance(result, ShadowResult):
        report = render_shadow(cfg, workload, ready, result, command, described)
    else:
        report = render(cfg, workload, ready, result, command, described)
    typer.echo(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        typer.echo(f"wrote {out}")
    return result


def bench_service_command(
    url: str | None = typer.Option(None, help="Benchmark a running server (its floor endpoint enabled)."),
    data: Path = typer.Option(Path("data/demo"), help="Data set whose users and items make the requests."),
    model_repo: Path | None = MODEL_REPO,
    redis_url: str | None = REDIS_URL,
    workers: int = typer.Option(1, min=1, max=64, help="Server workers (when the benchmark starts the server)."),
    list_length: int = typer.Option(100, min=1, max=10_000, help="Candidates per request."),
    history: int = typer.Option(50, min=0, max=10_000, help="Behaviours per bench user's profile."),
    requests: int = typer.Option(2000, min=10, max=1_000_000, help="Requests per endpoint, one client."),
    duration_s: float = typer.Option(10.0, min=1.0, max=600.0, help="Length of the throughput phase."),
    concurrency: int = typer.Option(16, min=1, max=1024, help="Connections of the throughput phase."),
    shadow_rate: float = typer.Option(
        0.0,
        min=0.0,
        max=1.0,
        help="Measure shadow sampling instead: a server at this PSAD_SHADOW_SAMPLE_RATE against one at 0.",
    ),
    out: Path | None = typer.Option(None, help="Also write the report as markdown (docs/benchmarks-service.md)."),
) -> None:
    """Closed-loop latency (rerank vs the no-model floor) and throughput on this machine."""
    settings = apply_overrides(model_repo=model_repo, redis_url=redis_url)
    config = BenchConfig(
        url=url,
        data=data,
        workers=workers,
        list_length=list_length,
        history=history,
        requests=requests,
        duration_s=duration_s,
        concurrency=concurrency,
        shadow_rate=shadow_rate,
    )
    with reported():
        run_bench(config, settings, out)
