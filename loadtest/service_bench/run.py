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

Open-loop load instead (--rate R1,R2,...): at each rate, /rerank then /bench/floor at a fixed
arrival rate, each latency from the request's scheduled send time (loadtest/openloop.py), with the
CPU each process used; the report gives p50/p99/p99.9 by rate and where p99 passes 20 ms.

A comparison instead measures two servers of the same model on the same Redis, a reference and a
candidate, in one run (measure_pair): (a) one client alternates them request by request, (b) their
throughput phases alternate (reference, candidate, candidate, reference, three times: a drift of
the host's speed falls on both alike), and each block of four phases gives its own candidate /
reference ratios, whose spread is the run's noise. Three comparisons:

- --shadow-rate R: PSAD_SHADOW_SAMPLE_RATE 0 against R; then the sampling server's record counts,
  once every answer is accounted for (written, dropped or failed), the other's (all 0) and the
  stream's length. The sampling server's writes also load the server at rate 0 during (a), which
  biases the one-client ratio toward 1; (b) runs one server at a time, without that bias.
- --tracing: tracing off against on, every span exported over OTLP/HTTP by the SDK's batch
  processor to a collector process that counts and drops them (collector.py); then the spans it
  received against the traced server's answered requests.
- --baseline-tree DIR: a server run from another source tree (`git archive REV | tar -x -C DIR`,
  this interpreter and packages) against this checkout's, both with tracing off (PSAD_TRACING and
  PSAD_OTLP_ENDPOINT unset: a tree from before tracing refuses settings it does not know).

The load generator (client.py) runs on the same cores as the server and Redis on a small machine:
the report (report.py) says how many there are. This module starts and stops the processes,
runs the phases and is the command.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson
import redis
import typer
from redis.cluster import RedisCluster

from export.contract.errors import reported
from export.contract.shadow import stream_key
from loadtest.openloop import run_open_loop
from loadtest.service_bench import collector
from loadtest.service_bench.client import (
    WARMUP_S,
    Connection,
    Sample,
    http_request,
    one_client,
    run_async,
    throughput,
)
from loadtest.service_bench.report import (
    BATCH_ROW,
    Block,
    OpenLoop,
    Paired,
    RatePoint,
    Result,
    ShadowResult,
    TracingResult,
    render,
    render_baseline,
    render_open_loop,
    render_shadow,
    render_tracing,
    serving,
)
from loadtest.service_bench.workload import BenchConfig, plan_workload, request_bodies, top_up
from psad.procs import LOOPBACK, free_port, start_redis, stop_tree, tree_cpu_s, wait_http
from service.cli import MODEL_REPO, REDIS_URL, apply_overrides
from service.settings import ENV_PREFIX, Settings, load_settings

READY_TIMEOUT_S = 180.0  # a server the benchmark starts: model load and warm-up included
URL_READY_TIMEOUT_S = 10.0  # a server given by --url should be up already
# A comparison's throughput phases, 0 the reference server and 1 the candidate: blocks of 0, 1, 1, 0,
# three times, so a drift of the shared host's speed, steady or not, falls on both servers alike.
BLOCK = (0, 1, 1, 0)
PAIR_ORDER = BLOCK * 3
ACCOUNTED_TIMEOUT_S = 10.0  # how long the sampling server may take to write what it still holds


# The server under test ------------------------------------------------------------------------


def wait_ready(base: str, proc: subprocess.Popen | None, log: Path | None) -> dict:
    """/readyz's body once it answers 200; proc None: a server started by someone else (--url)."""
    if proc is not None:
        return orjson.loads(wait_http(f"{base}/readyz", READY_TIMEOUT_S, proc, log))
    hint = ": start it with `psad serve` (PSAD_ENABLE_FLOOR_ENDPOINT=true), or omit --url"
    return orjson.loads(wait_http(f"{base}/readyz", URL_READY_TIMEOUT_S, hint=hint))


@dataclass(frozen=True)
class Variant:
    """How one server of the run is started: PSAD_* settings over this process's environment (a
    value None unsets the variable), and the source tree it runs (None: this one)."""

    env: Mapping[str, str | None] = field(default_factory=dict)
    tree: Path | None = None


def start_server(
    port: int,
    workers: int,
    redis_url: str,
    model_repo: str | Path,
    log: Path,
    cluster: bool = False,
    variant: Variant = Variant(),
) -> subprocess.Popen:
    """`python -m service.cli serve` of this tree or `variant.tree`, with the variant's settings."""
    repo = str(model_repo)
    env = {
        **os.environ,
        f"{ENV_PREFIX}ENABLE_FLOOR_ENDPOINT": "true",
        f"{ENV_PREFIX}REDIS_URL": redis_url,
        f"{ENV_PREFIX}REDIS_CLUSTER": str(cluster).lower(),
        f"{ENV_PREFIX}MODEL_REPO": repo if "://" in repo else os.path.abspath(repo),  # a URL, or a directory
        f"{ENV_PREFIX}LOG_LEVEL": "warning",
    }
    for name, value in variant.env.items():
        if value is None:
            env.pop(f"{ENV_PREFIX}{name}", None)
        else:
            env[f"{ENV_PREFIX}{name}"] = value
    cwd = None
    if variant.tree is not None:  # its modules first: the working directory and PYTHONPATH
        cwd = variant.tree.resolve()
        env["PYTHONPATH"] = str(cwd)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


TRACING_UNSET = {"TRACING": None, "OTLP_ENDPOINT": None}  # off, the default; and a tree before tracing knows neither


def variants(cfg: BenchConfig, collector_url: str | None) -> dict[str, Variant]:
    """The servers of this run by name: one (the plain benchmark), or a comparison's reference then
    its candidate."""
    if cfg.shadow_rate:
        return {
            "off": Variant({"SHADOW_SAMPLE_RATE": "0.0"}),
            "on": Variant({"SHADOW_SAMPLE_RATE": repr(cfg.shadow_rate)}),
        }
    if cfg.tracing:
        return {"off": Variant(TRACING_UNSET), "on": Variant({"TRACING": "true", "OTLP_ENDPOINT": collector_url})}
    if cfg.baseline_tree is not None:
        return {"baseline": Variant(TRACING_UNSET, cfg.baseline_tree), "current": Variant(TRACING_UNSET)}
    return {"server": Variant()}  # PSAD_SHADOW_SAMPLE_RATE and tracing as this process has them


def comparison_flags(cfg: BenchConfig) -> list[str]:
    """The comparison flags given (at most one is valid)."""
    given = {"--shadow-rate": cfg.shadow_rate > 0, "--tracing": cfg.tracing, "--baseline-tree": bool(cfg.baseline_tree)}
    return [flag for flag, on in given.items() if on]


def check_comparison(cfg: BenchConfig) -> None:
    flags = comparison_flags(cfg)
    if flags and cfg.rates:
        raise typer.BadParameter(f"--rate and {flags[0]}: --rate measures one server; give one of them")
    if len(flags) > 1:
        raise typer.BadParameter(f"{' and '.join(flags)}: each is a comparison of its own; give one of them")
    if flags and cfg.url:
        raise typer.BadParameter(f"{flags[0]} starts its own two servers: omit --url")
    tree = cfg.baseline_tree
    if tree is not None and not (tree / "service" / "cli.py").is_file():
        raise typer.BadParameter(
            f"--baseline-tree {tree}: no service/cli.py in it; export a revision with `git archive REV | tar -x -C DIR`"
        )


def start_collector(var: Path) -> tuple[subprocess.Popen, str]:
    """The OTLP sink (collector.py) on a free port, once it answers; its process and base URL."""
    port = free_port()
    log = var / "collector.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "loadtest.service_bench.collector", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{port}"
    wait_http(f"{url}{collector.SPANS_PATH}", URL_READY_TIMEOUT_S, proc, log)
    return proc, url


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


def loopback(base: str) -> tuple[str, int]:
    """The host and port of a server on this machine."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise typer.BadParameter(f"--url {base}: the benchmark runs over loopback only (127.0.0.1)")
    return host, port


def measure(base: str, cfg: BenchConfig, bodies: list[bytes], pids: dict[str, int] | None = None) -> Result:
    host, port = loopback(base)
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


OPEN_LOOP_PATHS = ("/rerank", "/bench/floor")


def machine_busy_s() -> float:
    """CPU seconds every process on this machine has used since boot (/proc/stat; nan without it)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure_rates(base: str, cfg: BenchConfig, bodies: list[bytes], pids: dict[str, int]) -> OpenLoop:
    """Open-loop load at each of cfg.rates: /rerank, then the floor, each with the CPU (seconds per
    second) of the server, Redis and the load generator meanwhile, and of the machine's other
    processes (the cores are shared)."""
    host, port = loopback(base)

    async def connect() -> Connection:
        return await Connection.open(host, port)

    points = []
    for rate in cfg.rates:
        for path in OPEN_LOOP_PATHS:
            typer.echo(f"open loop: {rate:g} requests/s to {path} for {WARMUP_S:g} + {cfg.duration_s:g} s ...")
            requests = [http_request(host, path, b) for b in bodies]
            cpu0, busy0, wall0 = cpu_snapshot(pids), machine_busy_s(), time.perf_counter()
            result = run_async(
                run_open_loop(
                    connect,
                    requests,
                    rate,
                    cfg.duration_s,
                    warmup_s=WARMUP_S,
                    connections=cfg.concurrency,
                    max_connections=cfg.max_connections,
                    seed=cfg.poisson_seed,
                )
            )
            cpu1, busy1, wall = cpu_snapshot(pids), machine_busy_s(), time.perf_counter() - wall0
            cores = {k: (cpu1[k] - cpu0[k]) / wall for k in cpu1}
            points.append(RatePoint(path, result, cores, max(0.0, (busy1 - busy0) / wall - sum(cores.values()))))
    return OpenLoop(points)


def parse_rates(text: str | None) -> tuple[float, ...]:
    """--rate's comma-separated arrival rates."""
    if not text:
        return ()
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--rate {text}: expected requests/s separated by commas, e.g. 400,800") from None
    if not all(0 < r <= 100_000 for r in rates):
        raise typer.BadParameter(f"--rate {text}: each rate must be > 0 and at most 100000 requests/s")
    return rates


def server_counts(base: str) -> tuple[dict[str, float], float]:
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


Snapshot = tuple[list[dict[str, float]], dict[str, float]]  # CPU s of each server's processes; of the shared ones


def snapshot(owned: list[dict[str, int]], shared: dict[str, int]) -> Snapshot:
    return [{label: tree_cpu_s(pid) for label, pid in mine.items()} for mine in owned], cpu_snapshot(shared)


def pair_cpu_ms(snaps: list[Snapshot], sent: list[float], phases: range) -> tuple[dict[str, float], dict[str, float]]:
    """CPU ms per request sent to each server over `phases` (indices into PAIR_ORDER): a server's
    own processes over all of them (what they do while the other server is measured, e.g. exporting
    queued spans, is theirs), the shared ones (Redis, the load generator) over its own phases."""
    out = []
    for k in (0, 1):
        mine = [i for i in phases if PAIR_ORDER[i] == k]
        n = max(1.0, sum(sent[i] for i in mine))
        first, last = snaps[phases[0]], snaps[phases[-1] + 1]
        cpu = {label: last[0][k][label] - first[0][k][label] for label in first[0][k]}
        for label in first[1]:
            cpu[label] = sum(snaps[i + 1][1][label] - snaps[i][1][label] for i in mine)
        out.append({label: 1000 * v / n for label, v in cpu.items()})
    return out[0], out[1]


def measure_pair(
    bases: dict[str, str],
    cfg: BenchConfig,
    bodies: list[bytes],
    owned: dict[str, dict[str, int]],
    shared: dict[str, int],
) -> Paired:
    """(a) and (b) against the reference and the candidate server (`bases` in that order). owned: each
    server's processes by label ("server", its collector); shared: the processes both use ("redis")."""
    names = list(bases)
    ports = [urlsplit(bases[name]).port or 80 for name in names]
    rerank = [http_request(LOOPBACK, "/rerank", b) for b in bodies]
    typer.echo(f"(a) one client: {cfg.requests} x /rerank to each server, alternating ...")
    one = run_async(one_client(LOOPBACK, (ports[0], rerank), (ports[1], rerank), cfg.requests))
    phase_s = cfg.duration_s / PAIR_ORDER.count(1)
    mine = [owned[name] for name in names]
    snaps = [snapshot(mine, shared)]
    samples: list[Sample] = []
    phases = []
    for k in PAIR_ORDER:
        typer.echo(f"(b) throughput, {names[k]}: {cfg.concurrency} connections for {phase_s:g} s ...")
        sample, rps = run_async(throughput(LOOPBACK, ports[k], rerank, cfg.concurrency, phase_s))
        snaps.append(snapshot(mine, shared))
        samples.append(sample)
        phases.append((names[k], rps))
    sent = [len(s.ms) * (WARMUP_S + phase_s) / phase_s for s in samples]  # the warm-up second included
    merged = tuple(Sample.merged([s for s, k in zip(samples, PAIR_ORDER, strict=True) if k == side]) for side in (0, 1))
    chunks = [np.array_split(s.ms, len(PAIR_ORDER) // len(BLOCK)) for s in one]
    blocks = []
    for b, (ref_ms, cand_ms) in enumerate(zip(*chunks, strict=True)):
        span = range(b * len(BLOCK), (b + 1) * len(BLOCK))
        means = [float(np.mean([phases[i][1] for i in span if PAIR_ORDER[i] == side])) for side in (0, 1)]
        cpu = pair_cpu_ms(snaps, sent, span)
        blocks.append(
            Block(
                rps=means[1] / max(means[0], 1e-9),
                server_cpu=cpu[1]["server"] / max(cpu[0]["server"], 1e-9),
                serving_cpu=serving(cpu[1]) / max(serving(cpu[0]), 1e-9),
                p50=float(np.percentile(cand_ms, 50) / max(np.percentile(ref_ms, 50), 1e-9)),
            )
        )
    return Paired(
        names=(names[0], names[1]),
        one=one,
        loaded=(merged[0], merged[1]),
        rps=(len(merged[0].ms) / cfg.duration_s, len(merged[1].ms) / cfg.duration_s),
        phases=phases,
        cpu_ms=pair_cpu_ms(snaps, sent, range(len(PAIR_ORDER))),
        blocks=blocks,
    )


def shadow_accounting(pair: Paired, cfg: BenchConfig, bases: dict[str, str], stream: Callable[[], int]) -> ShadowResult:
    """Both servers' record counts, once the sampling server has accounted for every answer (rate
    1), and the stream's length."""
    deadline = time.monotonic() + ACCOUNTED_TIMEOUT_S
    records, answered = server_counts(bases["on"])
    while cfg.shadow_rate >= 1.0 and sum(records.values()) < answered and time.monotonic() < deadline:
        time.sleep(0.1)  # every answer sampled: wait until the server has written (or counted) them all
        records, answered = server_counts(bases["on"])
    off_records, _ = server_counts(bases["off"])
    return ShadowResult(cfg.shadow_rate, pair, records, answered, off_records, stream())


def collector_counts(url: str) -> dict[str, int]:
    """What the collector received: exports and spans."""
    with urllib.request.urlopen(f"{url}{collector.SPANS_PATH}", timeout=5) as resp:
        return orjson.loads(resp.read())


def command_line(cfg: BenchConfig, out: Path | None) -> str:
    """The command that reproduces this run, every option spelled out."""
    args = ["psad", "bench", "service", "--data", str(cfg.data), "--list-length", str(cfg.list_length)]
    args += ["--history", str(cfg.history), "--requests", str(cfg.requests), "--duration-s", f"{cfg.duration_s:g}"]
    args += ["--concurrency", str(cfg.concurrency)]
    args += ["--url", cfg.url] if cfg.url else ["--workers", str(cfg.workers)]
    args += ["--shadow-rate", f"{cfg.shadow_rate:g}"] if cfg.shadow_rate else []
    args += ["--tracing"] if cfg.tracing else []
    args += ["--baseline-tree", str(cfg.baseline_tree)] if cfg.baseline_tree else []
    if cfg.rates:
        args += ["--rate", ",".join(f"{r:g}" for r in cfg.rates), "--max-connections", str(cfg.max_connections)]
        args += ["--poisson-seed", str(cfg.poisson_seed)] if cfg.poisson_seed is not None else []
    return shlex.join(args + (["--out", str(out)] if out else []))


Outcome = Result | ShadowResult | TracingResult | Paired | OpenLoop


def run_bench(cfg: BenchConfig, settings: Settings, out: Path | None) -> Outcome:
    """Set up (or use --url), measure, print the report, and write it when `out` is given."""
    from psad.load_profiles import bulk_load

    check_comparison(cfg)
    cfg.load_average = os.getloadavg()[0]
    workload, missing = plan_workload(cfg.data, cfg.history, settings.history_len)
    bodies = request_bodies(workload, cfg.list_length)
    servers: dict[str, subprocess.Popen] = {}
    bases: dict[str, str] = {}
    shared: dict[str, int] = {}
    sink, collector_url = None, ""  # the OTLP collector, with --tracing
    result: Outcome
    with ExitStack() as stack:  # stops what it started, last started first
        if cfg.url:
            bases["server"], described = cfg.url.rstrip("/"), f"given by --url {cfg.url}"
        else:
            redis_url, cluster = settings.redis_url, settings.redis_cluster
            if f"{ENV_PREFIX}REDIS_URL" not in os.environ:
                redis_port = free_port()
                redis_proc = start_redis(redis_port, cfg.var / "redis")
                stack.callback(stop_tree, redis_proc)
                shared["redis"] = redis_proc.pid
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
            if cfg.tracing:
                sink, collector_url = start_collector(cfg.var)
                stack.callback(stop_tree, sink)
            for name, variant in variants(cfg, collector_url or None).items():
                port = free_port()
                log = cfg.var / f"{name}.log"
                servers[name] = start_server(port, cfg.workers, redis_url, settings.model_repo, log, cluster, variant)
                stack.callback(stop_tree, servers[name])
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
        if not comparison_flags(cfg):
            pids = {"server": servers["server"].pid, **shared} if servers else {}
            if cfg.rates:
                result = measure_rates(bases["server"], cfg, bodies, pids)
            else:
                result = measure(bases["server"], cfg, bodies, pids)
        else:
            owned = {name: {"server": proc.pid} for name, proc in servers.items()}
            if sink is not None:
                owned["on"]["collector"] = sink.pid
            pair = measure_pair(bases, cfg, bodies, owned, shared)
            if cfg.shadow_rate:
                prefix = settings.key_prefix
                result = shadow_accounting(pair, cfg, bases, lambda: stream_length(redis_url, cluster, prefix))
            elif sink is not None:
                _, answered = server_counts(bases["on"])
                stop_tree(servers["on"])  # its shutdown exports the spans still queued
                result = TracingResult(pair, collector_counts(collector_url), answered)
            else:
                result = pair
    ready, command = next(iter(readies.values())), command_line(cfg, out)
    if isinstance(result, ShadowResult):
        report = render_shadow(cfg, workload, ready, result, command, described)
    elif isinstance(result, TracingResult):
        report = render_tracing(cfg, workload, ready, result, command, described)
    elif isinstance(result, Paired):
        report = render_baseline(cfg, workload, ready, result, command, described)
    elif isinstance(result, OpenLoop):
        report = render_open_loop(cfg, workload, ready, result, command, described)
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
    concurrency: int = typer.Option(
        16, min=1, max=1024, help="Connections of the throughput phase (with --rate: opened before the first send)."
    ),
    shadow_rate: float = typer.Option(
        0.0,
        min=0.0,
        max=1.0,
        help="Measure shadow sampling instead: a server at this PSAD_SHADOW_SAMPLE_RATE against one at 0.",
    ),
    tracing: bool = typer.Option(
        False, "--tracing", help="Measure tracing instead: a server exporting every span over OTLP against one off."
    ),
    baseline_tree: Path | None = typer.Option(
        None, help="Measure this checkout against a server run from this source tree (e.g. `git archive REV`'s)."
    ),
    rate: str | None = typer.Option(
        None,
        help="Open-loop load instead: requests/s, comma-separated (e.g. 400,800,1000,1200), --duration-s at each.",
    ),
    max_connections: int = typer.Option(
        256, min=1, max=4096, help="With --rate: the most connections open, new ones opened while all are busy."
    ),
    poisson_seed: int | None = typer.Option(
        None, min=0, help="With --rate: Poisson arrivals drawn from this seed instead of evenly spaced ones."
    ),
    out: Path | None = typer.Option(None, help="Also write the report as markdown (docs/benchmarks-service.md)."),
) -> None:
    """Closed-loop latency (rerank vs the no-model floor) and throughput on this machine; with --rate,
    open-loop latency by arrival rate."""
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
        tracing=tracing,
        baseline_tree=baseline_tree,
        rates=parse_rates(rate),
        max_connections=max_connections,
        poisson_seed=poisson_seed,
    )
    with reported():
        run_bench(config, settings, out)
