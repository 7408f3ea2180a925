"""The benchmark's markdown reports: the machine and the setup, both phases, the server's own means,
CPU time per request, and the targets with pass or MISS; for a comparison (--shadow-rate,
--tracing, --baseline-tree), the two servers side by side with their ratios and each block's; for
open-loop load (--rate), latency by rate and where p99 passes its limit."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest.openloop import DRAIN_S, LATE_MS, OpenLoopResult
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

SHADOW_TARGETS = {
    "rps_ratio": 0.90,  # throughput with sampling on / off (issue 17)
    "p50_ratio": 1.05,  # one-client p50 on / off
}

OPEN_LOOP_TARGET = (800.0, 20.0)  # (requests/s, ms): open-loop p99 of /rerank at that rate on 2 cores (issue 19)

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


@dataclass
class Block:
    """Candidate / reference ratios of one block of throughput phases (reference, candidate,
    candidate, reference) and of the matching third of the one-client run: their spread across
    blocks is the run's noise."""

    rps: float
    server_cpu: float  # the server's CPU ms per request
    serving_cpu: float  # the server's and Redis's
    p50: float  # one client


@dataclass
class Paired:
    """Two servers measured in one run: index 0 the reference, index 1 the candidate."""

    names: tuple[str, str]
    one: tuple[Sample, Sample]  # one client, alternating the two servers request by request
    loaded: tuple[Sample, Sample]  # the throughput phases of each server, merged
    rps: tuple[float, float]
    phases: list[tuple[str, float]]  # each throughput phase in the order run: server, requests/s
    cpu_ms: tuple[dict[str, float], dict[str, float]]  # CPU ms per request under load, by process
    blocks: list[Block]

    def ratios(self) -> tuple[float, float]:
        """(throughput candidate / reference, one-client p50 candidate / reference)."""
        return self.rps[1] / max(self.rps[0], 1e-9), self.one[1].pct(50) / max(self.one[0].pct(50), 1e-9)


@dataclass
class ShadowResult:
    """Sampling off (the reference, rate 0) against on (`rate`)."""

    rate: float
    pair: Paired
    records: dict[str, float]  # the sampling server's psad_shadow_records_total, by result
    answered: float  # /rerank answers of the sampling server, warm-ups included
    off_records: dict[str, float]  # the same counters of the server at rate 0: all 0 when it wrote nothing
    stream_len: int  # XLEN of the shared stream at the end: the sampling server's writes, unless trimmed


@dataclass
class TracingResult:
    """Tracing off (the reference) against on, and what the collector received from the traced server."""

    pair: Paired
    received: dict[str, int]  # exports and spans
    answered: float  # /rerank answers of the traced server, warm-ups included


@dataclass
class RatePoint:
    """One open-loop run: an endpoint at a rate, and the CPU each process used meanwhile."""

    path: str
    result: OpenLoopResult
    cores: dict[str, float]  # CPU seconds per second of the run, by process (server, redis, load generator)
    others: float  # the same of every other process on the machine (nan where /proc/stat is missing)


@dataclass
class OpenLoop:
    points: list[RatePoint]  # in the order run


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


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_lines(cfg: BenchConfig, workload: Workload, ready: dict, command: str, server: str) -> list[str]:
    """The command, the machine, the server, the requests and the load generator."""
    cores = usable_cores()
    model = ready.get("model") or {}
    load = cfg.load_average
    users_line = f"{len(workload.users)} real users whose stored history holds {workload.history} behaviours" + (
        f" ({workload.topped_up} of them completed through POST /events)" if workload.topped_up else ""
    )
    return [
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
            if load > 0.5 * cores
            else []
        ),
        "",
    ]


def render(cfg: BenchConfig, workload: Workload, ready: dict, r: Result, command: str, server: str) -> str:
    cores = usable_cores()
    lines = [
        "# Service benchmark",
        "",
        *setup_lines(cfg, workload, ready, command, server),
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
        *cpu_lines(r, cores),
        *target_lines("Targets (one client, list length 100, history 50, CPU; throughput on 2 cores)", checks(r)),
    ]
    return "\n".join(lines) + "\n"


def shadow_checks(r: ShadowResult) -> list[tuple[str, str, str, bool]]:
    """(target, threshold, measured, passed) rows of issue 17's benchmark."""
    rps_ratio, p50_ratio = r.pair.ratios()
    return [
        (
            "throughput on / off",
            f">= {SHADOW_TARGETS['rps_ratio']:.2f}",
            f"{rps_ratio:.3f}",
            rps_ratio >= SHADOW_TARGETS["rps_ratio"],
        ),
        (
            "p50 on / off (one client)",
            f"<= {SHADOW_TARGETS['p50_ratio']:.2f}",
            f"{p50_ratio:.3f}",
            p50_ratio <= SHADOW_TARGETS["p50_ratio"],
        ),
    ]


def quotient(candidate: float, reference: float) -> str:
    """candidate / reference, blank where the reference is 0 (a process only the candidate has)."""
    return f"{candidate / reference:.3f}" if reference > 0 else ""


def spread(values: list[float]) -> str:
    """Mean and range of a ratio over the blocks."""
    return f"{np.mean(values):.3f} (blocks {min(values):.3f}-{max(values):.3f})"


def pair_lines(cfg: BenchConfig, p: Paired, labels: tuple[str, str]) -> list[str]:
    """The two servers side by side: latency and throughput, the phases, CPU per request, and each
    block's ratios. labels: a description of each server for the table."""
    ref, cand = p.names
    rows = []
    for k in (0, 1):
        one, loaded = p.one[k], p.loaded[k]
        rows.append(
            f"| {labels[k]} | {one.pct(50):.3f} | {one.pct(99):.3f} | {p.rps[k]:,.0f} | {loaded.pct(50):.2f} | "
            f"{loaded.pct(99):.2f} | {one.errors + loaded.errors} | {one.degraded + loaded.degraded} |"
        )

    def ratio(pick: Callable[[int], float]) -> str:
        return quotient(pick(1), pick(0))

    processes = list(dict.fromkeys([*p.cpu_ms[0], *p.cpu_ms[1]]))
    n = len(p.phases) // len(p.blocks)
    return [
        f"(a) one client alternates the two servers request by request, {cfg.requests} requests each after "
        f"{WARMUP_PAIRS} warm-up pairs; (b) {cfg.concurrency} connections, {len(p.phases)} throughput phases of "
        f"{cfg.duration_s / (len(p.phases) // 2):.3g} s (after {WARMUP_S:.0f} s warm-up each), run in the order "
        f"{', '.join(name for name, _ in p.phases)}, so a drift of the host's speed falls on both alike.",
        "",
        "| server | one client p50 ms | one client p99 ms | requests/s | p50 ms under load | p99 ms under load | "
        "errors | degraded |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        f"| {cand} / {ref} | {ratio(lambda k: p.one[k].pct(50))} | {ratio(lambda k: p.one[k].pct(99))} | "
        f"{ratio(lambda k: p.rps[k])} | {ratio(lambda k: p.loaded[k].pct(50))} | "
        f"{ratio(lambda k: p.loaded[k].pct(99))} | | |",
        "",
        f"Throughput phases in the order run (requests/s): {', '.join(f'{x} {rps:,.0f}' for x, rps in p.phases)}.",
        "",
        "CPU ms per request under load (user + system time / requests sent to the server): a server's own "
        "processes over all the phases (what they do while the other server is measured is theirs), Redis and "
        "the load generator over that server's phases. Unlike requests/s it does not move with the CPU the run got.",
        "",
        f"| process | {ref} | {cand} | {cand} / {ref} |",
        "|---|---:|---:|---:|",
        *(
            f"| {k} | {p.cpu_ms[0].get(k, 0.0):.3f} | {p.cpu_ms[1].get(k, 0.0):.3f} | "
            f"{quotient(p.cpu_ms[1].get(k, 0.0), p.cpu_ms[0].get(k, 0.0))} |"
            for k in processes
        ),
        f"| server + Redis | {serving(p.cpu_ms[0]):.3f} | {serving(p.cpu_ms[1]):.3f} | "
        f"{ratio(lambda side: serving(p.cpu_ms[side]))} |",
        "",
        f"## Noise: {cand} / {ref} in each block of {n} throughput phases and its third of the one-client run",
        "",
        "| block | requests/s | server CPU per request | server + Redis CPU per request | one client p50 |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {b + 1} | {x.rps:.3f} | {x.server_cpu:.3f} | {x.serving_cpu:.3f} | {x.p50:.3f} |"
            for b, x in enumerate(p.blocks)
        ),
        "",
        f"Mean over the blocks (range): requests/s {spread([x.rps for x in p.blocks])}, server CPU per request "
        f"{spread([x.server_cpu for x in p.blocks])}, server + Redis CPU {spread([x.serving_cpu for x in p.blocks])}, "
        f"one client p50 {spread([x.p50 for x in p.blocks])}.",
        "",
    ]


def serving(cpu: dict[str, float]) -> float:
    """CPU ms per request of what serves it: the server and Redis."""
    return cpu.get("server", 0.0) + cpu.get("redis", 0.0)


def render_shadow(cfg: BenchConfig, workload: Workload, ready: dict, r: ShadowResult, command: str, server: str) -> str:
    accounted = sum(r.records.values())
    lines = [
        "# Service benchmark: shadow sampling on against off",
        "",
        *setup_lines(cfg, workload, ready, command, server),
        "Two servers of the same model on the same Redis (profiles and the shadow stream alike), one with "
        f"`PSAD_SHADOW_SAMPLE_RATE=0` (off), one with `{r.rate:g}` (on).",
        "",
        "Both servers share this host and its Redis. In (a) the sampling server's writes (its flusher's CPU, "
        "Redis's XADDs) run while the client waits on the server at rate 0, so they load that server too: this "
        "biases the one-client ratio toward 1. The throughput phases (b) run one server at a time and do not "
        "share that bias.",
        "",
        *pair_lines(cfg, r.pair, ("off (rate 0)", f"on (rate {r.rate:g})")),
        f"Shadow records of the sampling server: {r.records.get('written', 0):,.0f} written, "
        f"{r.records.get('dropped', 0):,.0f} dropped, {r.records.get('failed', 0):,.0f} failed "
        f"({accounted:,.0f} of {r.answered:,.0f} answered /rerank requests, warm-ups included). The server at "
        f"rate 0: {r.off_records.get('written', 0):,.0f} written, {r.off_records.get('dropped', 0):,.0f} dropped, "
        f"{r.off_records.get('failed', 0):,.0f} failed. The shared stream holds {r.stream_len:,} entries at the "
        "end (trimmed to about `PSAD_SHADOW_STREAM_MAXLEN`).",
        "",
        *target_lines("Targets (issue 17)", shadow_checks(r)),
    ]
    return "\n".join(lines) + "\n"


SPANS_PER_RERANK = 5  # the server span and its stages: profile_read, feature_assembly, inference, response


def sampler() -> str:
    """The trace sampler the traced server reads from the environment (OTEL_TRACES_SAMPLER[_ARG])."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    arg = os.environ.get("OTEL_TRACES_SAMPLER_ARG")
    return f"`{name}`" + (f" (argument `{arg}`)" if arg else "")


def render_tracing(
    cfg: BenchConfig, workload: Workload, ready: dict, r: TracingResult, command: str, server: str
) -> str:
    spans = r.received.get("spans", 0)
    lines = [
        "# Service benchmark: tracing on against off",
        "",
        *setup_lines(cfg, workload, ready, command, server),
        "Two servers of the same model on the same Redis, one with tracing off (`PSAD_TRACING` unset), one with "
        f"`PSAD_TRACING=true` and `PSAD_OTLP_ENDPOINT` set, sampler {sampler()} (`OTEL_TRACES_SAMPLER`; the "
        "default traces every request), every recorded span exported by the SDK's BatchSpanProcessor and "
        "OTLP/HTTP exporter (protobuf) to a collector process on this host that counts the spans and drops them "
        "(`loadtest/service_bench/collector.py`; its CPU is the collector row, not counted in server + Redis).",
        "",
        *pair_lines(cfg, r.pair, ("off", "on")),
        f"Spans received by the collector: {spans:,} in {r.received.get('exports', 0):,} exports, for "
        f"{r.answered:,.0f} /rerank requests answered by the traced server (warm-ups included): "
        f"{spans / max(r.answered, 1):.3f} per request, of {SPANS_PER_RERANK} made (a server span and its four "
        "stages) for each sampled request; with every request sampled, fewer means the batch processor's queue "
        "overflowed and dropped some.",
        "",
    ]
    return "\n".join(lines) + "\n"


def render_baseline(cfg: BenchConfig, workload: Workload, ready: dict, r: Paired, command: str, server: str) -> str:
    lines = [
        f"# Service benchmark: this checkout against {cfg.baseline_tree}",
        "",
        *setup_lines(cfg, workload, ready, command, server),
        f"Two servers of the same model on the same Redis, with this interpreter and its packages: `{r.names[0]}` "
        f"runs the source tree `{cfg.baseline_tree}`, `{r.names[1]}` this checkout; tracing is off on both "
        "(`PSAD_TRACING` and `PSAD_OTLP_ENDPOINT` unset).",
        "",
        *pair_lines(cfg, r, (f"{r.names[0]} ({cfg.baseline_tree})", f"{r.names[1]} (this checkout)")),
    ]
    return "\n".join(lines) + "\n"


def target_lines(title: str, checks: list[tuple[str, str, str, bool]]) -> list[str]:
    """A section of the report: each target, its threshold, what was measured and pass or MISS."""
    lines = [f"## {title}", "", "| target | threshold | measured | result |", "|---|---|---|---|"]
    return lines + [
        f"| {name} | {threshold} | {measured} | {'pass' if ok else 'MISS'} |"
        for name, threshold, measured, ok in checks
    ]


def crossing(points: list[tuple[float, float]], limit: float) -> str:
    """Where p99 first passes `limit` ms, from (rate, p99) pairs: interpolated linearly between the
    two measured rates around it, or said to lie outside the measured ones; flagged when a higher
    rate is back under the limit (p99 not monotonic in the rate: the host was noisy)."""
    pts = sorted(points)
    over = next((i for i, (_, p99) in enumerate(pts) if p99 > limit), len(pts))
    if over == len(pts):
        return f"above {pts[-1][0]:,.0f} req/s, the highest rate measured (p99 {pts[-1][1]:.1f} ms there)"
    rate, p99 = pts[over]
    if over == 0:
        text = f"below {rate:,.0f} req/s, the lowest rate measured (p99 {p99:.1f} ms there)"
    else:
        r0, p0 = pts[over - 1]
        at = r0 + (limit - p0) * (rate - r0) / (p99 - p0)
        text = (
            f"at about {at:,.0f} req/s (interpolated linearly between {r0:,.0f} req/s, p99 {p0:.1f} ms, and "
            f"{rate:,.0f} req/s, p99 {p99:.1f} ms)"
        )
    back = [f"{r:,.0f}" for r, p in pts[over + 1 :] if p <= limit]
    if back:
        text += f"; but p99 is back under it at {', '.join(back)} req/s: not monotonic in the rate, a noisy run"
    return text


def open_loop_row(point: RatePoint) -> str:
    r, cores = point.result, point.cores
    generator = cores.get("load generator", 0.0)
    busy = ", ".join(f"{name} {value:.2f}" for name, value in cores.items())
    return (
        f"| {r.rate:,.0f} | {point.path} | {r.achieved_rate:,.0f} | {r.pct(50):.2f} | {r.pct(99):.2f} | "
        f"{r.pct(99.9):.2f} | {r.pct(100):.2f} | {r.errors} | {r.late} | {r.waited} | {r.unfinished} | "
        f"{r.peak_connections} | {np.percentile(r.send_lag_ms, 99) if len(r.send_lag_ms) else float('nan'):.2f} | "
        f"{busy} | {point.others:.2f} | {generator / max(sum(cores.values()), 1e-9):.0%} |"
    )


def render_open_loop(cfg: BenchConfig, workload: Workload, ready: dict, r: OpenLoop, command: str, server: str) -> str:
    arrivals = (
        "evenly spaced (request k due at t0 + k / R)"
        if cfg.poisson_seed is None
        else f"a Poisson process of rate R (seed {cfg.poisson_seed})"
    )
    limit_rate, limit_ms = OPEN_LOOP_TARGET
    by_path: dict[str, list[tuple[float, float]]] = {}
    for point in r.points:
        by_path.setdefault(point.path, []).append((point.result.rate, point.result.pct(99)))
    target = [p for p in r.points if p.path == "/rerank" and p.result.rate == limit_rate]
    lines = [
        "# Service benchmark: open-loop latency",
        "",
        *setup_lines(cfg, workload, ready, command, server),
        f"At each rate R, after {WARMUP_S:.0f} s of warm-up (sent, not counted), for {cfg.duration_s:g} s: requests "
        f"are due {arrivals} whatever the answers do, each sent on an idle keep-alive connection or on a new one "
        f"when all are busy ({cfg.concurrency} opened first, at most {cfg.max_connections}). A latency runs from "
        "the request's scheduled send time to its answer, so time spent waiting for a connection, for the load "
        "generator's event loop or in the server's queue is counted (no coordinated omission). Each rate runs "
        "/rerank then /bench/floor. Percentiles by nearest rank over the answers with status 200.",
        "",
        f"Late: sent more than {LATE_MS:g} ms after it was due; waited: found every connection busy at the cap; "
        f"unfinished: no answer {DRAIN_S:g} s after the last send; CPU: seconds of CPU per second of the run, by "
        "process, of every other process on the machine (the cores are shared), and the load generator's share "
        "of the CPU the run's own processes used.",
        "",
        "| rate req/s | endpoint | answered req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | late sends | "
        "waited | unfinished | connections | send lag p99 ms | CPU cores busy | other processes | "
        "load generator share |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        *(open_loop_row(point) for point in r.points),
        "",
        *(f"- {path}: p99 passes {limit_ms:g} ms {crossing(points, limit_ms)}" for path, points in by_path.items()),
        "",
    ]
    if target:
        p99 = target[0].result.pct(99)
        row = (
            f"open-loop p99 at {limit_rate:,.0f} req/s (rerank)",
            f"<= {limit_ms:g} ms",
            f"{p99:.2f} ms",
            p99 <= limit_ms,
        )
        lines += target_lines("Target (issue 19, on 2 cores)", [row])
    else:
        lines.append(f"Target (issue 19): open-loop p99 at {limit_rate:,.0f} req/s: not measured (add it to --rate).")
    return "\n".join(lines) + "\n"
