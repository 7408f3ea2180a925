"""The peers of `psad bench peers`: what each is, the virtualenv it runs in and the command that starts it.

Every peer serves POST /rerank on 127.0.0.1:PORT with the same bundle, Redis and worker count; the
framework peers run from their own virtualenvs (venvs.py builds them) so that their pins never touch
the project's, and import this checkout's code from there (installed with `pip install -e --no-deps`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from loadtest.peers.work import PeerConfig
from loadtest.service_bench.run import TRACING_UNSET, Variant, start_server
from psad.procs import LOOPBACK

REPO = Path(__file__).resolve().parents[2]
PSAD = "psad"


@dataclass(frozen=True)
class Peer:
    name: str
    framework: tuple[str, ...]  # what its virtualenv installs besides the shared pins; () runs in this interpreter
    describe: Callable[[int], str]  # its configuration in the report, given the worker count
    # (the venv's bin directory, port, workers) -> argv; None: our service, started by service_bench's start_server
    command: Callable[[Path, int, int], list[str]] | None
    gc_freeze: bool = False  # PeerConfig.gc_freeze


def _uvicorn(bin_dir: Path, port: int, workers: int) -> list[str]:
    app, address = "loadtest.peers.fastapi_app:app", ("--host", LOOPBACK, "--port", str(port))
    quiet = ("--no-access-log", "--log-level", "warning")
    return [str(bin_dir / "python"), "-m", "uvicorn", app, *address, "--workers", str(workers), *quiet]


def _bentoml(bin_dir: Path, port: int, workers: int) -> list[str]:
    service = "loadtest.peers.bento_service:PeerReranker"  # workers: @bentoml.service(workers=...)
    return [str(bin_dir / "bentoml"), "serve", service, "--host", LOOPBACK, "--port", str(port)]


def _ray(bin_dir: Path, port: int, workers: int) -> list[str]:
    return [str(bin_dir / "python"), "-m", "loadtest.peers.ray_app", "--port", str(port)]


def _litserve(bin_dir: Path, port: int, workers: int) -> list[str]:
    return [str(bin_dir / "python"), "-m", "loadtest.peers.litserve_app", "--port", str(port)]


UVLOOP = ("uvloop", "httptools")  # the event loop and HTTP parser our service and uvicorn[standard] use

PEERS = {
    PSAD: Peer(
        PSAD,
        (),
        lambda w: (
            f"`psad serve --workers {w}` (this service: uvloop, httptools, its RESP reader, micro-batching "
            "on, shadow sampling and tracing off)"
        ),
        None,
    ),
    "fastapi": Peer(
        "fastapi",
        (),
        lambda w: (
            f"`uvicorn loadtest.peers.fastapi_app:app --workers {w} --no-access-log` (FastAPI with pydantic "
            "request and response models, redis-py asyncio + hiredis, the model inline; uvloop, httptools)"
        ),
        _uvicorn,
    ),
    "fastapi-gc": Peer(
        "fastapi-gc",
        (),
        lambda w: (
            f"the fastapi peer with the startup heap frozen out of the garbage collector (`gc.collect(); "
            f"gc.freeze()` in its lifespan, as our service does), `--workers {w}`"
        ),
        _uvicorn,
        gc_freeze=True,
    ),
    "bentoml": Peer(
        "bentoml",
        ("bentoml", *UVLOOP),
        lambda w: (
            f"`bentoml serve loadtest.peers.bento_service:PeerReranker`, `@bentoml.service(workers={w})`, "
            "typed API parameters (pydantic), access log off, redis-py asyncio + hiredis"
        ),
        _bentoml,
    ),
    "ray": Peer(
        "ray",
        ("ray[serve]",),
        lambda w: (
            f"Ray Serve, {w} replicas of 1 CPU on a local Ray of {w} CPUs, through its HTTP proxy, access log off; "
            "Starlette request, JSONResponse, redis-py asyncio + hiredis"
        ),
        _ray,
    ),
    "litserve": Peer(
        "litserve",
        ("litserve", *UVLOOP),
        lambda w: f"LitServe, `workers_per_device={w}` on the CPU, async LitAPI, redis-py asyncio + hiredis",
        _litserve,
    ),
}


def start_peer(
    peer: Peer, port: int, config: PeerConfig, model_repo: Path, bin_dir: Path, log: Path
) -> subprocess.Popen:
    """Start `peer` on `port` (our service through service_bench's start_server, the others from
    `bin_dir`), its output in `log`."""
    if peer.command is None:
        variant = Variant({**TRACING_UNSET, "SHADOW_SAMPLE_RATE": "0.0", "THREADS": str(config.threads)})
        return start_server(port, config.workers, config.redis_url, model_repo, log, variant=variant)
    env = {**os.environ, **replace(config, gc_freeze=peer.gc_freeze).env(), "PYTHONPATH": str(REPO)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            peer.command(bin_dir, port, config.workers), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
