"""`psad bench service`: closed-loop latency and throughput of a real server on this machine.

Setup (unless --url): a private redis-server on a free port loaded with the data set's profiles,
and `python -m service.cli serve` with the floor endpoint on (POST /bench/floor: /rerank's
parsing, validation and Redis read, then a sort by the given scores, no model).

Requests: list length L of distinct real item ids with descending scores, for real users whose
stored history holds H behaviours. Users with at least H behaviours in the data set are used as
they are; when fewer than MIN_USERS have that many, the longest histories are topped up through
POST /events with real item ids (stated in the report).

(a) one client, one keep-alive connection: /rerank and /bench/floor alternate request by request,
    so both see the same machine state; p50/p90/p99 of each and the ratio of the p50s.
(b) throughput: C keep-alive connections in one asyncio (uvloop) process, each sending its next
    /rerank as soon as the previous answer arrives, for a fixed duration.

The load generator is a minimal HTTP/1.1 client on raw asyncio streams (no per-request
allocation beyond the response), so the client side costs little; its latency is still
included in every figure. On a small machine the load generator, the server and Redis share
the cores: the report says how many there are.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import orjson
import typer

from export.contract.errors import reported
from service.cli import MODEL_REPO, REDIS_URL, apply_overrides
from service.settings import ENV_PREFIX, Settings, load_settings

T = TypeVar("T")

MIN_USERS = 20
BENCH_USERS = 200
DISTINCT_REQUESTS = 256
WARMUP_PAIRS = 200
WARMUP_S = 1.0
READY_TIMEOUT_S = 180.0  # a server the benchmark starts: model load and warm-up included
URL_READY_TIMEOUT_S = 10.0  # a server given by --url should be up already

TARGETS = {
    "p50": 2.5,  # ms, one client, rerank
    "p99": 6.0,
    "floor_ratio": 1.5,  # p50(rerank) / p50(floor)
    "rps": 1000.0,
    "rps_p99": 20.0,  # ms
    "degraded_share": 0.001,  # of the answers under load, on a healthy Redis
}


@dataclass
class BenchConfig:
    url: str | None = None
    data: Path = Path("data/demo")
    workers: int = 1
    list_length: int = 100
    history: int = 50
    requests: int = 2000  # per endpoint in the one-client phase
    duration_s: float = 10.0
    concurrency: int = 16
    var: Path = Path("var/bench")
    load_average: float = 0.0  # 1-minute load average at the start: other processes on the cores


# A minimal keep-alive HTTP/1.1 client ----------------------------------------------------------


def http_request(host: str, path: str, body: bytes) -> bytes:
    """One pre-encoded POST, sent as is on every call."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def call(self, request: bytes) -> tuple[int, bytes]:
        """Send one request and read its answer: (status, body)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at < 0:
            raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
        length = int(lower[at + 15 : lower.index(b"\r\n", at)])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Sample:
    """Latencies in ms of one endpoint, and what went wrong."""

    ms: np.ndarray
    errors: int
    degraded: int

    def pct(self, q: float) -> float:
        return float(np.percentile(self.ms, q)) if len(self.ms) else float("nan")


def _sample(ns: list[int], errors: int, degraded: int) -> Sample:
    return Sample(np.asarray(ns, dtype=np.float64) / 1e6, errors, degraded)


async def one_client(host: str, port: int, rerank: list[bytes], floor: list[bytes], n: int) -> tuple[Sample, Sample]:
    """Alternate /rerank and /bench/floor on one connection (the order flips every pair)."""
    conn = await Connection.open(host, port)
    ns: dict[str, list[int]] = {"rerank": [], "floor": []}
    errors = {"rerank": 0, "floor": 0}
    degraded = {"rerank": 0, "floor": 0}
    try:
        for i in range(-WARMUP_PAIRS, n):
            pair = (("rerank", rerank), ("floor", floor))
            for name, reqs in pair if i % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter_ns()
                status, body = await conn.call(reqs[i % len(reqs)])
                elapsed = time.perf_counter_ns() - t0
                if i < 0:
                    continue
                ns[name].append(elapsed)
                errors[name] += status != 200
                degraded[name] += b'"degraded":true' in body
    finally:
        conn.close()
    return (
        _sample(ns["rerank"], errors["rerank"], degraded["rerank"]),
        _sample(ns["floor"], errors["floor"], degraded["floor"]),
    )


async def throughput(
    host: str, port: int, requests: list[bytes], concurrency: int, duration_s: float
) -> tuple[Sample, float]:
    """C closed-loop connections for WARMUP_S + duration_s; returns the measured window's sample and rps."""
    conns = [await Connection.open(host, port) for _ in range(concurrency)]
    start = time.perf_counter() + WARMUP_S
    stop = start + duration_s
    ns: list[int] = []
    errors = degraded = 0

    async def loop(conn: Connection, offset: int) -> None:
        nonlocal errors, degraded
        i = offset
        while (now := time.perf_counter()) < stop:
            t0 = time.perf_counter_ns()
            status, body = await conn.call(requests[i % len(requests)])
            i += 1
            if now >= start:
                ns.append(time.perf_counter_ns() - t0)
                errors += status != 200
                degraded += b'"degraded":true' in body

    try:
        await asyncio.gather(*(loop(c, k * 7) for k, c in enumerate(conns)))
    finally:
        for c in conns:
            c.close()
    return _sample(ns, errors, degraded), len(ns) / duration_s


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop when available: the client should be as cheap as the server's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# Requests -------------------------------------------------------------------------------------


@dataclass
class Workload:
    users: list[str]
    items: list[str]
    actions: tuple[str, ...]
    history: int  # behaviours per bench user's stored profile
    topped_up: int  # users whose history was completed through /events
    max_history: int


def plan_workload(data: Path, history: int, max_history_setting: int) -> tuple[Workload, dict[str, int]]:
    """Bench users and items, and how many behaviours each user still needs (posted via /events)."""

    from training.data.store import check_schema_files, load_schema, read_parquet

    check_schema_files(data)
    schema = load_schema(data)
    cap = max_history_setting or schema.max_history
    effective = min(history, cap)
    counts = read_parquet(data / "behaviours.parquet", columns=["user_id"])["user_id"].value_counts()
    counts = counts.clip(upper=cap)
    rich = counts[counts >= effective]
    chosen = rich if len(rich) >= MIN_USERS else counts.iloc[:MIN_USERS]
    chosen = chosen.iloc[:BENCH_USERS]
    missing = {str(u): int(effective - c) for u, c in chosen.items() if c < effective}
    items = read_parquet(data / "items.parquet", columns=["item_id"])["item_id"]
    item_ids = [str(i) for i in items[items != ""]]
    workload = Workload([str(u) for u in chosen.index], item_ids, schema.actions, effective, len(missing), cap)
    return workload, missing


def request_bodies(workload: Workload, list_length: int, seed: int = 0) -> list[bytes]:
    """DISTINCT_REQUESTS JSON bodies: a bench user and list_length distinct real items, scores descending."""
    if list_length > len(workload.items):
        raise typer.BadParameter(f"--list-length {list_length}: the data set has only {len(workload.items)} items")
    rng = np.random.default_rng(seed)
    bodies = []
    for k in range(DISTINCT_REQUESTS):
        picks = rng.choice(len(workload.items), size=list_length, replace=False)
        scores = np.sort(rng.random(list_length))[::-1]
        body = {
            "user_id": workload.users[k % len(workload.users)],
            "candidates": [
                {"item_id": workload.items[j], "score": round(float(s), 6)} for j, s in zip(picks, scores, strict=True)
            ],
        }
        bodies.append(orjson.dumps(body))
    return bodies


def top_up(base: str, workload: Workload, missing: dict[str, int]) -> None:
    """Complete short histories with real items through POST /events (timestamps in the past)."""
    if not missing:
        return
    rng = np.random.default_rng(1)
    past = int(time.time()) - 86_400
    action = workload.actions[0] if workload.actions else "click"
    for uid, n in missing.items():
        events = [
            {
                "user_id": uid,
                "item_id": workload.items[int(j)],
                "action": action,
                "timestamp": past - k,
                "event_id": f"bench-{uid}-{k}",
            }
            for k, j in enumerate(rng.integers(0, len(workload.items), size=n))
        ]
        post_json(f"{base}/events", {"events": events})


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, orjson.dumps(body), {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


# The server under test ------------------------------------------------------------------------


def wait_ready(base: str, proc: subprocess.Popen | None, log: Path | None) -> dict:
    """/readyz's body once it answers 200; proc None: a server started by someone else (--url)."""
    limit = READY_TIMEOUT_S if proc is not None else URL_READY_TIMEOUT_S
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.is_file() else ""
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=1) as resp:
                return orjson.loads(resp.read())
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.2)
    hint = "" if proc is not None else ": start it with `psad serve` (PSAD_ENABLE_FLOOR_ENDPOINT=true), or omit --url"
    raise RuntimeError(f"{base}/readyz did not answer 200 within {limit:g} s{hint}")


def start_server(
    port: int, workers: int, redis_url: str, model_repo: Path, log: Path, cluster: bool = False
) -> subprocess.Popen:
    env = {
        **os.environ,
        f"{ENV_PREFIX}ENABLE_FLOOR_ENDPOINT": "true",
        f"{ENV_PREFIX}REDIS_URL": redis_url,
        f"{ENV_PREFIX}REDIS_CLUSTER": str(cluster).lower(),
        f"{ENV_PREFIX}MODEL_REPO": str(model_repo.resolve()),
        f"{ENV_PREFIX}LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Report ---------------------------------------------------------------------------------------


@dataclass
class Result:
    rerank: Sample
    floor: Sample
    loaded: Sample
    rps: float
    server_one: dict[str, float]  # means inside the server by route, stage and batch size, phase (a)
    server_loaded: dict[str, float]  # the same, phase (b)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU ms per request in phase (b), by process


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its live descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += [c for c, (parent, _) in stats.items() if parent == p]
    return total


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: each given process tree, and this process (the load generator)."""
    out = {name: tree_cpu_s(pid) for name, pid in pids.items()} if Path("/proc").is_dir() else {}
    out["load generator"] = time.process_time()
    return out


BATCH_ROW = "lists per model call"
SERVER_FAMILIES = ("psad_request_duration_seconds", "psad_stage_duration_seconds", "psad_batch_size")


def server_totals(base: str) -> dict[str, tuple[float, float]]:
    """(sum, count) per route, per stage (seconds) and of batch sizes from the server's histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
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


def checks(r: Result) -> list[tuple[str, str, str, bool]]:
    """(target, threshold, measured, passed) rows."""
    p50, p99, floor50 = r.rerank.pct(50), r.rerank.pct(99), r.floor.pct(50)
    ratio = p50 / floor50 if floor50 > 0 else float("inf")
    lp99 = r.loaded.pct(99)
    share = r.loaded.degraded / max(1, len(r.loaded.ms))
    return [
        ("one client p50 (rerank)", f"<= {TARGETS['p50']} ms", f"{p50:.3f} ms", p50 <= TARGETS["p50"]),
        ("one client p99 (rerank)", f"<= {TARGETS['p99']} ms", f"{p99:.3f} ms", p99 <= TARGETS["p99"]),
        ("p50 rerank / p50 floor", f"<= {TARGETS['floor_ratio']}x", f"{ratio:.2f}x", ratio <= TARGETS["floor_ratio"]),
        ("throughput", f">= {TARGETS['rps']:.0f} req/s", f"{r.rps:,.0f} req/s", r.rps >= TARGETS["rps"]),
        ("p99 under load", f"< {TARGETS['rps_p99']} ms", f"{lp99:.2f} ms", lp99 < TARGETS["rps_p99"]),
        (
            "degraded answers under load",
            f"< {TARGETS['degraded_share']:.1%}",
            f"{share:.3%} ({r.loaded.degraded:,} of {len(r.loaded.ms):,})",
            share < TARGETS["degraded_share"],
        ),
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_lines(r: Result, cores: int) -> list[str]:
    """CPU time per request in phase (b), by process, and the rate it allows on idle cores: on a
    shared machine the measured rate says how much CPU the run got; this says what it needed."""
    if not r.cpu_ms:
        return []
    total = sum(r.cpu_ms.values())
    lines = [
        "## CPU per request under load (phase (b); user + system time of each process / requests sent)",
        "",
        "| process | CPU ms per request |",
        "|---|---:|",
        *(f"| {name} | {ms:.3f} |" for name, ms in r.cpu_ms.items()),
        f"| all | {total:.3f} |",
        "",
        f"During (b) these processes kept {total * r.rps / 1000:.2f} of the {cores} cores busy on average (the "
        "rest was idle or went to other processes). At this cost per request, "
        f"{cores} otherwise idle cores would sustain at most {1000 * cores / total:,.0f} requests/s "
        f"(the server alone: {1000 * cores / max(r.cpu_ms.get('server', total), 1e-9):,.0f}); the measured rate is "
        f"{r.rps:,.0f}.",
        "",
    ]
    return lines


def render(cfg: BenchConfig, workload: Workload, ready: dict, r: Result, command: str, server: str) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = ready.get("model") or {}
    load = cfg.load_average
    users_line = f"{len(workload.users)} real users whose stored history holds {workload.history} behaviours" + (
        f" ({workload.topped_up} of them completed through POST /events)" if workload.topped_up else ""
    )
    lines = [
        "# Service benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"- machine: {cpu_model()}, {cores} cores usable, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; load average {load:.2f} when the run started",
        f"- server: {server}; model {model.get('name')}/{model.get('version')} on {model.get('provider')}",
        f"- requests: list length {cfg.list_length}, {users_line}, {DISTINCT_REQUESTS} distinct bodies "
        f"(data set `{cfg.data}`)",
        "- load generator: one Python process, raw asyncio (uvloop) HTTP/1.1 keep-alive client, "
        f"on the same {cores} cores as the server and Redis (they compete for CPU; latencies include the client)",
        *(
            [
                f"- **the cores were busy**: load average {load:.2f} on {cores} cores before the run; other processes "
                "took CPU time from the server and the client, so these figures are pessimistic"
            ]
            if cores and load > 0.5 * cores
            else []
        ),
        "",
        f"## (a) One client, {cfg.requests} requests per endpoint, alternating (after {WARMUP_PAIRS} warm-up pairs)",
        "",
        "| endpoint | p50 ms | p90 ms | p99 ms | max ms | errors | degraded |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("POST /rerank", r.rerank), ("POST /bench/floor", r.floor)):
        lines.append(
            f"| {name} | {s.pct(50):.3f} | {s.pct(90):.3f} | {s.pct(99):.3f} | {s.ms.max():.3f} | {s.errors} | "
            f"{s.degraded} |"
        )
    lines += [
        "",
        f"## (b) Throughput: {cfg.concurrency} connections, {cfg.duration_s:.0f} s (after {WARMUP_S:.0f} s warm-up)",
        "",
        "| requests/s | p50 ms | p90 ms | p99 ms | requests | errors | degraded |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r.rps:,.0f} | {r.loaded.pct(50):.2f} | {r.loaded.pct(90):.2f} | {r.loaded.pct(99):.2f} | "
        f"{len(r.loaded.ms):,} | {r.loaded.errors} | {r.loaded.degraded} |",
        "",
        "## Inside the server: means from its own histograms (ms per route and stage; lists per model call)",
        "",
        "| route or stage | (a) one client, warm-up included | (b) under load |",
        "|---|---:|---:|",
        *(
            f"| {k} | {r.server_one.get(k, float('nan')):.3f} | {r.server_loaded.get(k, float('nan')):.3f} |"
            for k in sorted(set(r.server_one) | set(r.server_loaded))
            if k.startswith(("/rerank", "/bench", "stage", BATCH_ROW))
        ),
        "",
        *cpu_lines(r, cores or 1),
        "## Targets (one client, list length 100, history 50, CPU; throughput on 2 cores)",
        "",
        "| target | threshold | measured | result |",
        "|---|---|---|---|",
    ]
    for name, threshold, measured, ok in checks(r):
        lines.append(f"| {name} | {threshold} | {measured} | {'pass' if ok else 'MISS'} |")
    return "\n".join(lines) + "\n"


# Orchestration --------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(base: str, cfg: BenchConfig, bodies: list[bytes], pids: dict[str, int] | None = None) -> Result:
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise typer.BadParameter(f"--url {base}: the benchmark runs over loopback only (127.0.0.1)")
    rerank = [http_request(host, "/rerank", b) for b in bodies]
    floor = [http_request(host, "/bench/floor", b) for b in bodies]
    typer.echo(f"(a) one client: {cfg.requests} x /rerank and /bench/floor, alternating ...")
    snapshots = [server_totals(base)]
    one_rerank, one_floor = run_async(one_client(host, port, rerank, floor, cfg.requests))
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


def command_line(cfg: BenchConfig, out: Path | None) -> str:
    """The command that reproduces this run, every option spelled out."""
    args = ["psad", "bench", "service", "--data", str(cfg.data), "--list-length", str(cfg.list_length)]
    args += ["--history", str(cfg.history), "--requests", str(cfg.requests), "--duration-s", f"{cfg.duration_s:g}"]
    args += ["--concurrency", str(cfg.concurrency)]
    args += ["--url", cfg.url] if cfg.url else ["--workers", str(cfg.workers)]
    return shlex.join(args + (["--out", str(out)] if out else []))


def run_bench(cfg: BenchConfig, settings: Settings, out: Path | None) -> Result:
    """Set up (or use --url), measure, print the report, and write it when `out` is given."""
    from psad.load_profiles import bulk_load
    from psad.up import start_redis

    cfg.load_average = os.getloadavg()[0]
    workload, missing = plan_workload(cfg.data, cfg.history, settings.history_len)
    bodies = request_bodies(workload, cfg.list_length)
    redis_proc = server = None
    try:
        if cfg.url:
            base, described = cfg.url.rstrip("/"), f"given by --url {cfg.url}"
        else:
            redis_url, cluster = settings.redis_url, settings.redis_cluster
            if f"{ENV_PREFIX}REDIS_URL" not in os.environ:
                redis_port = free_port()
                redis_proc = start_redis(cfg.var, port=redis_port)
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
            port = free_port()
            log = cfg.var / "server.log"
            server = start_server(port, cfg.workers, redis_url, settings.model_repo, log, cluster=cluster)
            base = f"http://127.0.0.1:{port}"
            threads = load_settings(processes=cfg.workers).inference_workers  # what each server process reads
            described = (
                f"`psad serve --workers {cfg.workers}` (uvloop, httptools), Redis on loopback"
                f"{' (cluster)' if cluster else ''}; inference threads {threads} per process, "
                f"micro-batching {'up to ' + str(settings.microbatch_max_size) if settings.microbatching else 'off'}, "
                f"Redis budget {settings.redis_budget_ms:g} ms"
            )
        ready = wait_ready(base, server, cfg.var / "server.log")
        top_up(base, workload, missing)
        pids = {"server": server.pid} if server is not None else {}
        if redis_proc is not None:
            pids["redis"] = redis_proc.pid
        result = measure(base, cfg, bodies, pids)
    finally:
        stop(server)
        stop(redis_proc)
    report = render(cfg, workload, ready, result, command_line(cfg, out), described)
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
    )
    with reported():
        run_bench(config, settings, out)
