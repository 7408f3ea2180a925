"""`psad bench peers`: our service and the servers a user would otherwise build or adopt, side by side in one run.

Setup: a private redis-server (unless PSAD_REDIS_URL is set) loaded with the data set's profiles, the
latest bundle of the model repository, and every peer of registry.PEERS asked for, each on its own
port with the same worker count; the framework peers from their own virtualenvs (venvs.py, built
with --build). Requests are service_bench's (workload.py): the same bodies for every peer.

(a) one client: for each peer in turn, service_bench's one_client alternates our service and that
    peer request by request, in three rounds, so each pair sees the same machine state.
(b) throughput: service_bench's closed-loop client at each connection count of the ladder, every
    peer once per count before the next count (the order rotating by count, so a drift of the
    host falls on all alike). A peer stops climbing once its p99 was at or over the limit twice in
    a row; its throughput is its best phase under the limit. CPU per request comes from each peer's
    process tree and Redis over its phase (psad.procs.tree_cpu_s). After each phase the peer is left
    to work off any backlog (settle) before the next peer's phase starts.
(c) open loop, with --rate R1,R2,...: at each rate, every peer in turn (the order rotating by rate)
    gets requests at that fixed arrival rate, each latency from its scheduled send time
    (loadtest/openloop.py, as `psad bench service --rate`).

The load generator shares the cores with the servers and Redis, as in `psad bench service`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import typer

from export.contract.bundle import latest_version
from export.contract.errors import reported
from loadtest.openloop import OpenLoopResult, run_open_loop
from loadtest.peers import venvs
from loadtest.peers.registry import PEERS, PSAD, start_peer
from loadtest.peers.report import PeerResult, PeersResult, Point, render
from loadtest.peers.work import PeerConfig
from loadtest.service_bench.client import (
    WARMUP_S,
    Connection,
    Sample,
    http_request,
    one_client,
    run_async,
    throughput,
)
from loadtest.service_bench.run import parse_rates, phase_means, server_totals, wait_ready
from loadtest.service_bench.workload import BenchConfig, plan_workload, request_bodies, top_up
from psad.procs import LOOPBACK, free_port, start_redis, stop_tree, tree_cpu_s, tree_pids
from service.cli import MODEL_REPO, REDIS_URL, apply_overrides
from service.settings import ENV_PREFIX, Settings

READY_TIMEOUT_S = 300.0  # a peer's start: Ray's cluster and the model's load and warm-up included
ROUNDS = 3  # of the one-client phase
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
OVER_LIMIT_STOP = 2  # phases in a row at or over the p99 limit that end a peer's climb
SETTLED_CORES = 0.2  # a peer is idle again below this CPU use (Ray's own idle use is about half of it)
SETTLE_TIMEOUT_S = 30.0


@dataclass
class PeersConfig:
    bench: BenchConfig  # data, workers, list length, history, one-client requests, phase length, var
    peers: tuple[str, ...] = tuple(PEERS)
    ladder: tuple[int, ...] = LADDER
    build: bool = False  # build the framework peers' virtualenvs that are missing


def check_peers(cfg: PeersConfig) -> None:
    unknown = [name for name in cfg.peers if name not in PEERS]
    if unknown:
        raise typer.BadParameter(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if PSAD not in cfg.peers or len(set(cfg.peers)) < 2:
        raise typer.BadParameter(f"--peers {','.join(cfg.peers)}: name {PSAD} and at least one other peer")
    for name in cfg.peers:
        peer = PEERS[name]
        if not venvs.built(peer) and not cfg.build:
            raise typer.BadParameter(
                f"--peers {name}: its virtualenv {venvs.venv_dir(peer)} is not built; add --build, or run "
                f"`{venvs.build_hint(peer)}`"
            )


def ensure_venvs(cfg: PeersConfig) -> None:
    for name in cfg.peers:
        peer = PEERS[name]
        if not venvs.built(peer):
            log = cfg.bench.var / f"{name}-install.log"
            typer.echo(f"building the {name} peer's virtualenv in {venvs.venv_dir(peer)} (log {log}) ...")
            typer.echo(f"built in {venvs.build(peer, log):.0f} s")


def bundle_path(settings: Settings) -> tuple[Path, Path]:
    """The model repository (a directory) and the version directory every peer serves."""
    repo, pinned = Path(settings.model_repo), settings.model_version
    version = latest_version(repo, settings.model_name) if pinned == "latest" else int(pinned)
    if "://" in settings.model_repo or version is None or not (repo / settings.model_name / str(version)).is_dir():
        raise typer.BadParameter(
            f"--model-repo {settings.model_repo}: no local bundle of {settings.model_name} there; "
            "export one with `psad export` (or run `psad up`)"
        )
    return repo, repo / settings.model_name / str(version)


def stop_peer(proc: subprocess.Popen) -> None:
    """stop_tree, then SIGKILL whatever of its tree outlived it: a framework's workers forked from
    its main process (LitServe's) may be left running when the main process exits on SIGTERM."""
    tree = tree_pids(proc.pid)
    stop_tree(proc)
    for pid in tree[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_answer(port: int, body: bytes, proc: subprocess.Popen, log: Path) -> None:
    """Until a POST /rerank of `body` answers 200: the peer's model and Redis client are up."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{port}/rerank", body, {"Content-Type": "application/json"}, method="POST"
    )
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log.is_file() else ""
            raise RuntimeError(f"the peer exited with {proc.returncode}; see {log}:\n{tail}")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                resp.read()
                return
        except OSError:  # not listening yet, or answering 5xx while it starts
            time.sleep(0.5)
    raise RuntimeError(f"the peer on port {port} did not answer POST /rerank within {READY_TIMEOUT_S:g} s; see {log}")


def settle(pid: int) -> None:
    """Until the peer's process tree uses under SETTLED_CORES, at most SETTLE_TIMEOUT_S: an overloaded
    peer works off its backlog after its phase, which would otherwise run into the next peer's."""
    deadline, step = time.monotonic() + SETTLE_TIMEOUT_S, 0.5
    before = tree_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = tree_cpu_s(pid)
        if now - before < SETTLED_CORES * step:
            return
        before = now


def one_client_rounds(ports: dict[str, int], requests: list[bytes], n: int) -> dict[str, Sample]:
    """Our service against each peer in turn, alternating request by request, ROUNDS times."""
    parts: dict[str, list[Sample]] = {name: [] for name in ports}
    per_round = max(1, n // ROUNDS)
    for _ in range(ROUNDS):
        for name, port in ports.items():
            if name == PSAD:
                continue
            ours, theirs = run_async(one_client(LOOPBACK, (ports[PSAD], requests), (port, requests), per_round))
            parts[PSAD].append(ours)
            parts[name].append(theirs)
    return {name: Sample.merged(samples) for name, samples in parts.items()}


def phase(port: int, requests: list[bytes], connections: int, duration_s: float, pids: dict[str, int]) -> Point:
    """One closed-loop throughput phase and the CPU its processes used per request sent."""
    cpu0 = {label: tree_cpu_s(pid) for label, pid in pids.items()} | {"load generator": time.process_time()}
    try:
        sample, rps = run_async(throughput(LOOPBACK, port, requests, connections, duration_s))
    except (OSError, EOFError, RuntimeError) as exc:  # reset, closed, an answer without Content-Length
        return Point(connections, None, 0.0, {}, f"{type(exc).__name__}: {exc}")
    cpu1 = {label: tree_cpu_s(pid) for label, pid in pids.items()} | {"load generator": time.process_time()}
    sent = max(1.0, len(sample.ms) * (WARMUP_S + duration_s) / duration_s)  # the warm-up second included
    return Point(connections, sample, rps, {k: 1000 * (cpu1[k] - cpu0[k]) / sent for k in cpu1})


def ladder(
    ports: dict[str, int], pids: dict[str, int], redis_pid: int | None, requests: list[bytes], cfg: PeersConfig
) -> tuple[dict[str, list[Point]], dict[str, float]]:
    """Every peer's throughput phases, and each one's idle CPU (ms per second) while the others ran."""
    points: dict[str, list[Point]] = {name: [] for name in ports}
    over = dict.fromkeys(ports, 0)
    idle_cpu, idle_s = dict.fromkeys(ports, 0.0), dict.fromkeys(ports, 0.0)
    for step, connections in enumerate(cfg.ladder):
        climbing = [name for name in ports if over[name] < OVER_LIMIT_STOP]
        if not climbing:
            break
        order = rotated(climbing, step)
        typer.echo(f"(b) {connections} connections: {', '.join(order)} ...")
        for name in order:
            watched = {"server": pids[name]} | ({"redis": redis_pid} if redis_pid else {})
            others = {other: tree_cpu_s(pids[other]) for other in ports if other != name}
            t0 = time.monotonic()
            point = phase(ports[name], requests, connections, cfg.bench.duration_s, watched)
            settle(pids[name])
            elapsed = time.monotonic() - t0
            for other, before in others.items():
                idle_cpu[other] += tree_cpu_s(pids[other]) - before
                idle_s[other] += elapsed
            points[name].append(point)
            over[name] = 0 if point.ok else over[name] + 1
    return points, {name: 1000 * idle_cpu[name] / max(idle_s[name], 1e-9) for name in ports}


def rotated(names: list[str], step: int) -> list[str]:
    k = step % len(names)
    return names[k:] + names[:k]


def open_loop(
    ports: dict[str, int], pids: dict[str, int], requests: list[bytes], b: BenchConfig
) -> dict[str, list[OpenLoopResult]]:
    """Every peer at each of b.rates, in turn, each left to settle before the next."""
    runs: dict[str, list[OpenLoopResult]] = {name: [] for name in ports}
    for step, rate in enumerate(b.rates):
        for name in rotated(list(ports), step):
            port = ports[name]
            typer.echo(f"(c) open loop: {rate:g} requests/s to {name} for {WARMUP_S:g} + {b.duration_s:g} s ...")

            async def connect(port: int = port) -> Connection:
                return await Connection.open(LOOPBACK, port)

            run = run_open_loop(
                connect,
                requests,
                rate,
                b.duration_s,
                warmup_s=WARMUP_S,
                connections=b.concurrency,
                max_connections=b.max_connections,
                seed=b.poisson_seed,
            )
            runs[name].append(run_async(run))
            settle(pids[name])
    return runs


def command_line(cfg: PeersConfig, out: Path | None) -> str:
    b = cfg.bench
    args = ["psad", "bench", "peers", "--data", str(b.data), "--peers", ",".join(cfg.peers)]
    args += ["--workers", str(b.workers), "--list-length", str(b.list_length), "--history", str(b.history)]
    args += ["--requests", str(b.requests), "--duration-s", f"{b.duration_s:g}"]
    args += ["--connections", ",".join(map(str, cfg.ladder))]
    args += ["--rate", ",".join(f"{r:g}" for r in b.rates)] if b.rates else []
    return shlex.join(args + (["--out", str(out)] if out else []))


def run_peers(cfg: PeersConfig, settings: Settings, out: Path | None) -> PeersResult:
    """Set up, measure every peer, print the report and write it when `out` is given."""
    from psad.load_profiles import bulk_load

    check_peers(cfg)
    ensure_venvs(cfg)
    b = cfg.bench
    b.load_average = os.getloadavg()[0]
    repo, bundle = bundle_path(settings)
    workload, missing = plan_workload(b.data, b.history, settings.history_len)
    bodies = request_bodies(workload, b.list_length)
    requests = [http_request(LOOPBACK, "/rerank", body) for body in bodies]
    with ExitStack() as stack:  # stops what it started, last started first
        redis_url, redis_pid = settings.redis_url, None
        if f"{ENV_PREFIX}REDIS_URL" not in os.environ:
            redis_port = free_port()
            redis_proc = start_redis(redis_port, b.var / "redis")
            stack.callback(stop_tree, redis_proc)
            redis_url, redis_pid = f"redis://{LOOPBACK}:{redis_port}/0", redis_proc.pid
        typer.echo(f"loading profiles from {b.data} into {redis_url} ...")
        history_len = settings.history_len or None
        bulk_load(redis_url, b.data, prefix=settings.key_prefix, ttl_s=settings.profile_ttl_s, history_len=history_len)
        config = PeerConfig(bundle, redis_url, settings.key_prefix, settings.threads, b.workers)
        procs: dict[str, subprocess.Popen] = {}
        ports: dict[str, int] = {}
        for name in cfg.peers:
            peer, ports[name] = PEERS[name], free_port()
            log = b.var / f"peer-{name}.log"
            procs[name] = start_peer(peer, ports[name], config, repo, venvs.bin_dir(peer), log)
            stack.callback(stop_peer, procs[name])
        ready = wait_ready(f"http://{LOOPBACK}:{ports[PSAD]}", procs[PSAD], b.var / f"peer-{PSAD}.log")
        top_up(f"http://{LOOPBACK}:{ports[PSAD]}", workload, missing)  # one Redis: every peer reads them
        for name in cfg.peers:
            typer.echo(f"waiting for {name} on port {ports[name]} ...")
            wait_answer(ports[name], bodies[0], procs[name], b.var / f"peer-{name}.log")
        typer.echo(f"(a) one client: {b.requests} requests per peer, alternating with {PSAD} ...")
        base = f"http://{LOOPBACK}:{ports[PSAD]}"
        before = server_totals(base)
        one = one_client_rounds(ports, requests, b.requests)
        inside = phase_means(before, server_totals(base))
        pids = {n: p.pid for n, p in procs.items()}
        points, idle = ladder(ports, pids, redis_pid, requests, cfg)
        rates = open_loop(ports, pids, requests, b)
    results = {
        name: PeerResult(name, PEERS[name].describe(b.workers), one[name], points[name], idle[name], rates[name])
        for name in cfg.peers
    }
    result = PeersResult(results[PSAD], [r for name, r in results.items() if name != PSAD], inside)
    report = render(b, workload, ready, result, command_line(cfg, out), list(cfg.ladder))
    typer.echo(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        typer.echo(f"wrote {out}")
    return result


def counts(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1 or list(values) != sorted(set(values)):
        raise typer.BadParameter(f"{option} {text!r}: give increasing whole numbers >= 1, comma-separated (1,2,4,8)")
    return values


def bench_peers_command(
    data: Path = typer.Option(Path("data/demo"), help="Data set whose users and items make the requests."),
    model_repo: Path | None = MODEL_REPO,
    redis_url: str | None = REDIS_URL,
    peers: str = typer.Option(",".join(PeersConfig.peers), help=f"Peers to run, comma-separated: {', '.join(PEERS)}."),
    build: bool = typer.Option(False, "--build", help="Build the framework peers' missing virtualenvs (var/peers)."),
    workers: int = typer.Option(2, min=1, max=64, help="Worker processes (or replicas) of every peer."),
    list_length: int = typer.Option(100, min=1, max=10_000, help="Candidates per request."),
    history: int = typer.Option(50, min=0, max=10_000, help="Behaviours per bench user's profile."),
    requests: int = typer.Option(3000, min=10, max=1_000_000, help="One-client requests per peer."),
    duration_s: float = typer.Option(5.0, min=0.5, max=600.0, help="Length of each throughput phase."),
    connections: str = typer.Option(",".join(map(str, LADDER)), help="Connection counts of the throughput ladder."),
    rate: str | None = typer.Option(
        None, help="Also open-loop load at these arrival rates (requests/s, comma-separated), every peer at each."
    ),
    out: Path | None = typer.Option(None, help="Also write the report as markdown."),
) -> None:
    """Our service against an idiomatic FastAPI app, BentoML, Ray Serve (and LitServe) on the same work."""
    settings = apply_overrides(model_repo=model_repo, redis_url=redis_url)
    bench = BenchConfig(
        data=data,
        workers=workers,
        list_length=list_length,
        history=history,
        requests=requests,
        duration_s=duration_s,
        rates=parse_rates(rate),
        var=Path("var/bench/peers"),
    )
    names = tuple(p.strip() for p in peers.split(",") if p.strip())
    config = PeersConfig(bench, names, counts(connections, "--connections"), build)
    with reported():
        run_peers(config, settings, out)
