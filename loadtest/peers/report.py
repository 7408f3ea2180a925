"""The markdown report of `psad bench peers`: the setup, each peer's configuration, the table per peer
(one-client latency, the best throughput with p99 under the limit, CPU per request, errors), the
ratios of our service against the best peer, every step of the connection ladder, the open-loop
runs (with --rate) and the targets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loadtest.openloop import LATE_MS, OpenLoopResult
from loadtest.service_bench.client import WARMUP_PAIRS, WARMUP_S, Sample
from loadtest.service_bench.report import crossing, setup_lines, target_lines
from loadtest.service_bench.workload import BenchConfig, Workload

P99_LIMIT_MS = 20.0  # the throughput counted is the highest whose p99 stays under this
TARGETS = {
    "rps_ratio": 2.0,  # our best throughput / the best peer's
    "p50_ratio": 0.6,  # our one-client p50 / the best peer's
}


@dataclass
class Point:
    """One throughput phase of one peer: C closed-loop connections for a fixed time."""

    connections: int
    sample: Sample | None  # None: the phase failed (error says why)
    rps: float
    cpu_ms: dict[str, float]  # CPU ms per request sent, by process ("server", "redis", "load generator")
    error: str = ""

    @property
    def ok(self) -> bool:
        """p99 under the limit, every answer a 200."""
        s = self.sample
        return s is not None and len(s.ms) > 0 and s.errors == 0 and s.pct(99) < P99_LIMIT_MS


@dataclass
class PeerResult:
    name: str
    described: str
    one: Sample  # one client, alternating with our service request by request
    points: list[Point] = field(default_factory=list)
    idle_cpu_ms_per_s: float = 0.0  # its processes' CPU while the other peers were measured
    rates: list[OpenLoopResult] = field(default_factory=list)  # open loop, in the order of the rates

    def best(self) -> Point | None:
        """The highest-throughput phase whose p99 is under the limit."""
        return max((p for p in self.points if p.ok), key=lambda p: p.rps, default=None)

    def errors(self) -> int:
        return self.one.errors + sum(p.sample.errors for p in self.points if p.sample is not None)

    def degraded(self) -> int:
        return self.one.degraded + sum(p.sample.degraded for p in self.points if p.sample is not None)

    def failed(self) -> list[str]:
        return [f"{p.connections} connections: {p.error}" for p in self.points if p.sample is None]


@dataclass
class PeersResult:
    ours: PeerResult
    peers: list[PeerResult]  # the others, in the order given
    inside: dict[str, float] = field(default_factory=dict)  # our service's own means over (a), ms by route and stage

    def best_rps(self) -> PeerResult | None:
        return max(self.peers, key=lambda r: _rps(r), default=None)

    def best_p50(self) -> PeerResult | None:
        return min(self.peers, key=lambda r: r.one.pct(50), default=None)

    def ratios(self) -> tuple[float, float]:
        """(our best throughput / the best peer's, our one-client p50 / the best peer's); nan without peers."""
        by_rps, by_p50 = self.best_rps(), self.best_p50()
        rps = _rps(self.ours) / _rps(by_rps) if by_rps is not None and _rps(by_rps) > 0 else math.nan
        p50 = self.ours.one.pct(50) / by_p50.one.pct(50) if by_p50 is not None else math.nan
        return rps, p50


def _rps(r: PeerResult) -> float:
    best = r.best()
    return best.rps if best is not None else 0.0


def _cell(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "n/a"


def peer_row(r: PeerResult) -> str:
    best = r.best()
    if best is None or best.sample is None:
        load = "| none under the limit | | | | "
    else:
        cpu = best.cpu_ms
        load = (
            f"| {best.rps:,.0f} | {best.connections} | {best.sample.pct(99):.2f} | {cpu.get('server', 0.0):.3f} | "
            f"{cpu.get('redis', 0.0):.3f} "
        )
    return (
        f"| {r.name} | {r.one.pct(50):.3f} | {r.one.pct(99):.3f} {load}| {r.idle_cpu_ms_per_s:.1f} | "
        f"{r.errors()} | {r.degraded()} |"
    )


def ladder_lines(results: list[PeerResult]) -> list[str]:
    """Every throughput phase: requests/s and p99 per peer and connection count."""
    steps = sorted({p.connections for r in results for p in r.points})
    lines = [
        f"| connections | {' | '.join(r.name for r in results)} |",
        f"|---:|{'---:|' * len(results)}",
    ]
    for c in steps:
        cells = []
        for r in results:
            point = next((p for p in r.points if p.connections == c), None)
            if point is None:
                cells.append("")
            elif point.sample is None:
                cells.append("failed")
            else:
                mark = "" if point.ok else " *"
                cells.append(f"{point.rps:,.0f} / {point.sample.pct(99):.1f}{mark}")
        lines.append(f"| {c} | {' | '.join(cells)} |")
    return lines


def inside_lines(inside: dict[str, float]) -> list[str]:
    """Where our service's one-client time goes, from its own histograms (the client's view is longer:
    the loopback, HTTP parsing before the route's timer starts)."""
    rows = [(k, v) for k, v in inside.items() if k == "/rerank" or k.startswith("stage")]
    if not rows:
        return []
    return [
        "Inside our service over (a), means from its own histograms (ms):",
        "",
        "| route or stage | mean ms |",
        "|---|---:|",
        *(f"| {k} | {v:.3f} |" for k, v in rows),
        "",
    ]


def open_loop_lines(cfg: BenchConfig, results: list[PeerResult]) -> list[str]:
    """Each peer at each rate: latency from the scheduled send time, and where its p99 passes the limit."""
    if not cfg.rates:
        return []
    arrivals = "evenly spaced" if cfg.poisson_seed is None else f"Poisson arrivals (seed {cfg.poisson_seed})"
    lines = [
        "## Open loop: latency from each request's scheduled send time",
        "",
        f"At each rate, every peer in turn: {WARMUP_S:g} s warm-up then {cfg.duration_s:g} s of {arrivals}, sent on an "
        f"idle keep-alive connection or a new one ({cfg.concurrency} opened first, at most {cfg.max_connections}); "
        f"late: sent over {LATE_MS:g} ms after it was due. Percentiles by nearest rank over the 200 answers.",
        "",
        "| rate req/s | peer | answered req/s | p50 ms | p99 ms | p99.9 ms | errors | late | unfinished |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, rate in enumerate(cfg.rates):
        for r in results:
            o = r.rates[k]
            lines.append(
                f"| {rate:,.0f} | {r.name} | {o.achieved_rate:,.0f} | {o.pct(50):.2f} | {o.pct(99):.2f} | "
                f"{o.pct(99.9):.2f} | {o.errors} | {o.late} | {o.unfinished} |"
            )
    lines.append("")
    for r in results:
        p99s = [(o.rate, o.pct(99)) for o in r.rates]
        lines.append(f"- {r.name}: p99 passes {P99_LIMIT_MS:g} ms {crossing(p99s, P99_LIMIT_MS)}")
    return [*lines, ""]


def checks(result: PeersResult) -> list[tuple[str, str, str, bool]]:
    rps, p50 = result.ratios()
    by_rps, by_p50 = result.best_rps(), result.best_p50()
    return [
        (
            f"throughput at p99 < {P99_LIMIT_MS:g} ms against the best peer ({by_rps.name if by_rps else 'none'})",
            f">= {TARGETS['rps_ratio']:g}x",
            f"{_cell(rps, '.2f')}x",
            rps >= TARGETS["rps_ratio"],
        ),
        (
            f"one-client p50 against the best peer ({by_p50.name if by_p50 else 'none'})",
            f"<= {TARGETS['p50_ratio']:g}x",
            f"{_cell(p50, '.2f')}x",
            p50 <= TARGETS["p50_ratio"],
        ),
    ]


def render(
    cfg: BenchConfig, workload: Workload, ready: dict, result: PeersResult, command: str, ladder: list[int]
) -> str:
    everyone = [result.ours, *result.peers]
    rps, p50 = result.ratios()
    failures = [f"- {r.name}, {line}" for r in everyone for line in r.failed()]
    lines = [
        "# Peers: the same reranking behind other servers",
        "",
        *setup_lines(cfg, workload, ready, command, result.ours.described),
        "Every peer reads the same Redis profiles, scores the same bundle with ONNX Runtime "
        "(`loadtest/peers/work.py`: the project's profile encoding and input assembly, the service's session "
        f"settings) and answers the same request bodies, each with {cfg.workers} worker processes:",
        "",
        *(f"- **{r.name}**: {r.described}" for r in everyone),
        "",
        f"(a) one client: our service and each peer in turn alternate request by request on one connection each "
        f"({cfg.requests} requests per peer in three rounds, after {WARMUP_PAIRS} warm-up pairs per round). "
        f"(b) throughput: closed-loop keep-alive connections from one load-generator process, "
        f"{cfg.duration_s:g} s per phase after {WARMUP_S:g} s warm-up, connection counts "
        f"{', '.join(map(str, ladder))}, every peer at one count before the next count (the order rotating), a "
        f"peer's climb ending once p99 stayed at or over {P99_LIMIT_MS:g} ms twice in a row. CPU per request is "
        "user + system time of the peer's whole process tree (and Redis's) over its phase, divided by the "
        "requests sent, warm-up included; idle CPU is the peer's while the others were measured.",
        "",
        f"| peer | one client p50 ms | one client p99 ms | best requests/s (p99 < {P99_LIMIT_MS:g} ms) | at "
        "connections | p99 ms there | server CPU ms per request | Redis CPU ms per request | idle CPU ms/s | "
        "errors | degraded |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(peer_row(r) for r in everyone),
        "",
        f"Our service against the best peer: throughput {_cell(rps, '.2f')}x, one-client p50 {_cell(p50, '.2f')}x.",
        "",
        *inside_lines(result.inside),
        f"## Every throughput phase: requests/s / p99 ms (* p99 at or over {P99_LIMIT_MS:g} ms, or errors)",
        "",
        *ladder_lines(everyone),
        "",
        *(["Failed phases:", "", *failures, ""] if failures else []),
        *open_loop_lines(cfg, everyone),
        *target_lines("Targets (issue 19)", checks(result)),
    ]
    return "\n".join(lines) + "\n"
