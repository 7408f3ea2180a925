"""The benchmark's markdown report: the machine and the setup, both phases, the server's own means,
CPU time per request, and the targets with pass or MISS."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.service_bench.client import WARMUP_PAIRS, WARMUP_S, Sample
from loadtest.service_bench.workload import DISTINCT_REQUESTS, BenchConfig, Workload

TARGETS = {
    "p50": 2.5,  # ms, one client, rerank
    "p99": 6.0,
    "floor_ratio": 1.5,  # p50(rerank) / p50(floor)
    "rps": 1000.0,
    "rps_p99": 20.0,  # ms
    "degraded_share": 0.001,  # of the answers under load, on a healthy Redis
}

BATCH_ROW = "lists per model call"


@dataclass
class Result:
    rerank: Sample
    floor: Sample
    loaded: Sample
    rps: float
    server_one: dict[str, float]  # means inside the server by route, stage and batch size, phase (a)
    server_loaded: dict[str, float]  # the same, phase (b)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU ms per request in phase (b), by process


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
