"""`python -m loadtest.supervisors`: `psad serve --workers N` of two source trees side by side,
for the choice of what runs the worker processes (docs/benchmarks.md, "Worker supervisors").

The baseline is a git revision (exported with `git archive`), the other side a source tree (this
checkout by default); both run with this interpreter and its packages, on one private
redis-server (marked loaded: no answer is degraded) and the same model repository. Rounds
alternate the sides. Per side and round:

- split: `--connections` keep-alive connections opened together, then one /rerank on each; how
  many the least loaded worker answered (workers told apart by their request-id prefix), median
  and worst over `--splits` tries;
- throughput: `--concurrency` closed-loop keep-alive connections on POST /rerank (one body, the
  same for both sides) for `--duration-s` after a second's warm-up;
- restart: one worker SIGKILLed under probes that each open a fresh connection (so the kernel's
  choice of socket is made anew): seconds until an answer comes from a new worker, the probes that
  failed, and the slowest probe;
- startup failure: a copy of the model whose model.onnx is not a model (its manifest agreeing, so
  only loading it shows): exit code, seconds to exit, the last line of the output.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import orjson
import typer

from export.contract.bundle import MODEL_FILE, latest_version, sha256
from loadtest.service_bench.client import Connection, http_request
from psad.procs import free_port, start_redis, stop_tree, tree_pids
from service.profiles import mark_loaded

BASELINE = "d52a112"  # the code before issue 16 (the supervisor, uvicorn's plain-text logs)
STARTED = "Application startup complete"
START_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 60.0
PROBES = 4  # concurrent restart probes
WARMUP_S = 1.0


@dataclass(frozen=True)
class Side:
    label: str
    tree: Path


@dataclass
class Row:
    side: str
    round: int
    split: str = ""
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    restart_s: float = float("nan")
    restart_failed: int = 0
    restart_slowest_s: float = 0.0
    startup: str = ""
    startup_line: str = ""


def export_tree(rev: str, into: Path) -> Path:
    """The source tree of `rev` (read from git, nothing in the checkout changes)."""
    archive = subprocess.run(["git", "archive", rev], capture_output=True, check=False)
    if archive.returncode != 0:
        raise typer.BadParameter(
            f"--baseline {rev}: {archive.stderr.decode().strip()}; give a commit of this repository"
        )
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server on a free port, with the profile load marker written."""
    port = free_port()
    proc = start_redis(port, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        mark_loaded(url)
        yield url
    finally:
        stop_tree(proc)


def serve(side: Side, port: int, repo: Path, redis_url: str, workers: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers)]
    cmd += ["--model-repo", str(repo), "--redis-url", redis_url]
    env = {**os.environ, "PYTHONPATH": str(side.tree), "PSAD_LOG_LEVEL": "info", "TMPDIR": str(log.parent)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=side.tree, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_started(proc: subprocess.Popen, log: Path, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while log.read_text().count(STARTED) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not start; server output:\n{log.read_text()}")
        time.sleep(0.1)


def worker_pids(pid: int) -> set[int]:
    """The server's worker processes: its descendants but multiprocessing's resource tracker."""
    pids = set()
    for child in tree_pids(pid)[1:]:
        try:
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.add(child)
        except OSError:  # gone since the process table was read
            pass
    return pids


# The client: raw HTTP/1.1 on asyncio streams, answers identified by worker --------------------


def rerank_request(repo: Path, list_length: int) -> bytes:
    """One POST /rerank of `list_length` real item ids of the served model, for every request."""
    bundle = repo / "psad" / str(latest_version(repo, "psad"))
    items = list(json.loads((bundle / "vocab.json").read_text())["items"])[:list_length]
    body = json.dumps({"user_id": "u1", "candidates": [{"item_id": str(i)} for i in items]}).encode()
    return http_request("psad", "/rerank", body)


async def worker_call(conn: Connection, request: bytes) -> tuple[int, str]:
    """One request: its status and the answering worker (its request id's per-process prefix)."""
    status, body = await conn.call(request)
    return status, str(orjson.loads(body).get("request_id", ""))[:16] if status == 200 else ""


async def split(port: int, request: bytes, connections: int) -> Counter[str]:
    conns = [await Connection.open("127.0.0.1", port) for _ in range(connections)]
    answered: Counter[str] = Counter()
    for conn in conns:
        status, worker = await worker_call(conn, request)
        answered[worker if status == 200 else "error"] += 1
        conn.close()
    return answered


async def throughput(port: int, request: bytes, concurrency: int, duration_s: float) -> tuple[list[float], int]:
    """Latencies (s) of the answers in the measured window, and the failed requests."""
    conns = [await Connection.open("127.0.0.1", port) for _ in range(concurrency)]
    start = time.perf_counter() + WARMUP_S
    end = start + duration_s
    latencies: list[float] = []
    errors = 0

    async def loop(conn: Connection) -> None:
        nonlocal errors
        while (sent := time.perf_counter()) < end:
            status, _ = await conn.call(request)
            if sent >= start:
                latencies.append(time.perf_counter() - sent)
                errors += status != 200

    try:
        await asyncio.gather(*(loop(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    return latencies, errors


async def restart(port: int, request: bytes, victim: int, known: set[str]) -> tuple[float, int, float]:
    """Kill `victim` under fresh-connection probes: (seconds until a new worker answers, failed
    probes, slowest probe in seconds)."""
    failed, slowest, answered_new = 0, 0.0, asyncio.Event()

    async def probe() -> None:
        nonlocal failed, slowest
        while not answered_new.is_set():
            sent = time.perf_counter()
            try:
                conn = await Connection.open("127.0.0.1", port)
                try:
                    status, worker = await asyncio.wait_for(worker_call(conn, request), RESTART_TIMEOUT_S)
                finally:
                    conn.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                status, worker = 0, ""
            slowest = max(slowest, time.perf_counter() - sent)
            failed += status != 200
            if status == 200 and worker not in known:
                answered_new.set()

    killed = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    probes = asyncio.gather(*(probe() for _ in range(PROBES)))
    try:
        await asyncio.wait_for(answered_new.wait(), RESTART_TIMEOUT_S)
        seconds = time.perf_counter() - killed
    except TimeoutError:
        seconds = float("nan")
    answered_new.set()
    await probes
    return seconds, failed, slowest


# One side, one round ----------------------------------------------------------------------------


def broken_copy(repo: Path, into: Path) -> Path:
    """The served model's repository copied, with a model.onnx that is not a model and a manifest
    that agrees with it: it passes the checks made before the workers start, not loading."""
    version = latest_version(repo, "psad")
    bundle = Path(shutil.copytree(repo / "psad" / str(version), into / "psad" / str(version)))
    (bundle / MODEL_FILE).write_bytes(b"not a model")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][MODEL_FILE] = {"sha256": sha256(bundle / MODEL_FILE), "bytes": len(b"not a model")}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return into


def measure(side: Side, rnd: int, cfg: Config, redis_url: str, work: Path) -> Row:
    row = Row(side.label, rnd)
    work.mkdir(parents=True)
    request = rerank_request(cfg.model_repo, cfg.list_length)
    port, log = free_port(), work / "serve.log"
    proc = serve(side, port, cfg.model_repo, redis_url, cfg.workers, log)
    try:
        wait_started(proc, log, cfg.workers)
        fewest = []
        for _ in range(cfg.splits):
            answered = asyncio.run(split(port, request, cfg.connections))
            counts = [answered[w] for w in answered if w != "error"]
            fewest.append(min(counts) if len(counts) == cfg.workers else 0)
            row.errors += answered["error"]
        row.split = f"{statistics.median(fewest):g} / {min(fewest)}"
        latencies, errors = asyncio.run(throughput(port, request, cfg.concurrency, cfg.duration_s))
        row.errors += errors
        row.rps = len(latencies) / cfg.duration_s
        cuts = statistics.quantiles(latencies, n=100)
        row.p50_ms, row.p99_ms = cuts[49] * 1000, cuts[98] * 1000
        known = set(asyncio.run(split(port, request, cfg.connections)))
        victim = min(worker_pids(proc.pid))
        row.restart_s, row.restart_failed, row.restart_slowest_s = asyncio.run(restart(port, request, victim, known))
    finally:
        stop_tree(proc, timeout_s=60)
    broken = broken_copy(cfg.model_repo, work / "broken")
    started = time.monotonic()
    proc = serve(side, free_port(), broken, redis_url, cfg.workers, work / "broken.log")
    try:
        rc = proc.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    row.startup = f"{rc}, {time.monotonic() - started:.1f} s"
    lines = (work / "broken.log").read_text().strip().splitlines()
    row.startup_line = lines[-1] if lines else ""
    return row


@dataclass(frozen=True)
class Config:
    model_repo: Path
    workers: int
    connections: int
    splits: int
    concurrency: int
    duration_s: float
    list_length: int


def render(rows: list[Row], cfg: Config, command: str, sides: list[Side], load: float) -> str:
    out = [
        "## Worker supervisors side by side",
        "",
        f"Command: `{command}`",
        "",
        f"- {os.cpu_count()} logical cores, 1-minute load average {load:.2f} at the start; {cfg.workers} workers",
        *(f"- {s.label}: {s.tree}" for s in sides),
        f"- split: {cfg.connections} connections opened together, one /rerank each, {cfg.splits} tries; "
        "the least loaded worker's count, median / worst",
        f"- throughput: {cfg.concurrency} keep-alive connections, {cfg.duration_s:g} s, "
        f"POST /rerank of {cfg.list_length} candidates",
        f"- restart: one worker SIGKILLed under {PROBES} probes on fresh connections",
        "",
        "| side | round | split of "
        f"{cfg.connections} | req/s | p50 ms | p99 ms | errors | restart s | failed probes | slowest probe s "
        "| startup failure: exit, time | its last line |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        line = r.startup_line.replace("|", "\\|")
        out.append(
            f"| {r.side} | {r.round} | {r.split} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} "
            f"| {r.restart_s:.2f} | {r.restart_failed} | {r.restart_slowest_s:.2f} | {r.startup} | `{line}` |"
        )
    return "\n".join(out) + "\n"


def main(
    baseline: Annotated[str, typer.Option(help="Git revision of one side (its tree is exported).")] = BASELINE,
    tree: Annotated[Path, typer.Option(help="Source tree of the other side.")] = Path("."),
    model_repo: Annotated[Path, typer.Option(help="Model repository (NAME psad) both sides serve.")] = Path("models"),
    workers: Annotated[int, typer.Option(min=2, help="Server processes.")] = 2,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; each runs both sides, alternating.")] = 2,
    connections: Annotated[int, typer.Option(min=2, help="Connections per split try.")] = 32,
    splits: Annotated[int, typer.Option(min=1, help="Split tries.")] = 10,
    concurrency: Annotated[int, typer.Option(min=1, help="Throughput connections.")] = 16,
    duration_s: Annotated[float, typer.Option(min=1.0, help="Throughput window (s).")] = 10.0,
    list_length: Annotated[int, typer.Option(min=1, help="Candidates per /rerank.")] = 20,
    out: Annotated[Path | None, typer.Option(help="Also write the report here.")] = None,
) -> None:
    """Connection split, throughput, restart and startup failure of two builds of `psad serve`."""
    cfg = Config(model_repo.resolve(), workers, connections, splits, concurrency, duration_s, list_length)
    if latest_version(cfg.model_repo, "psad") is None:
        raise typer.BadParameter(f"--model-repo {model_repo}: no psad/<version> in it; run `psad up` first")
    command = shlex.join(["python", "-m", "loadtest.supervisors", *sys.argv[1:]])
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="psad-supervisors-") as tmp:
        work = Path(tmp)
        sides = [Side(baseline, export_tree(baseline, work / "baseline")), Side(str(tree), tree.resolve())]
        rows: list[Row] = []
        with redis_server(work) as redis_url:
            for rnd in range(1, rounds + 1):
                for side in sides:
                    typer.echo(f"round {rnd}: {side.label}", err=True)
                    rows.append(measure(side, rnd, cfg, redis_url, work / f"{rnd}-{len(rows)}"))
    report = render(rows, cfg, command, sides, load)
    typer.echo(report)
    if out is not None:
        out.write_text(report)


if __name__ == "__main__":
    typer.run(main)
