"""`psad up`: the whole product on one machine, no Docker.

Redis, then five recorded steps, then the server:

    data      data/demo         MovieLens-100K when its files are found, else the click simulator
    train     runs/demo         configs/small.toml
    export    models/psad/<v>   the ONNX bundle the service loads
    profiles  Redis             users and behaviours of data/demo

Each finished step is recorded in var/up.json with the inputs it was made from. A step is skipped
when its record matches its inputs, its output is still valid and no earlier step ran in this
invocation (a rebuilt data set invalidates the model trained on it); --rebuild redoes them all.

The server samples a share of its answers for shadow evaluation (PSAD_SHADOW_SAMPLE_RATE, the demo's
rate unless the variable is set), and prints how to run `psad shadow run` and `psad shadow report`
next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from export.contract.errors import reported
from psad.procs import port_free, start_redis, stop_tree, wait_http
from service.settings import ENV_PREFIX, Settings, load_settings

DEFAULT_REDIS_PORT = 6379
SYNTHETIC_DEMO = {"lists": 20_000, "users": 2_000, "items": 2_000, "list_length": 20}
CURL_CANDIDATES = 10
# A tenth of the answers: enough lists and clicks for a report after a short locust run, for a tenth
# of the teacher decoding that sampling every answer would ask of the one CPU consumer.
# psad_shadow_lag shows whether it keeps up (docs/shadow.md, "Scaling").
DEMO_SHADOW_SAMPLE_RATE = 0.1


@dataclass
class UpConfig:
    ml100k: Path = Path("../shared/data/ml-100k")
    rebuild: bool = False
    port: int = 8000
    train_config: Path = Path("configs/small.toml")
    root: Path = Path(".")  # data/, runs/, models/ and var/ are made here
    synthetic: dict[str, Any] = field(default_factory=lambda: dict(SYNTHETIC_DEMO))
    serve: bool = True  # False: stop after the steps (tests)
    progress: bool = True

    @property
    def data_dir(self) -> Path:
        return self.root / "data" / "demo"

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / "demo"

    @property
    def repo(self) -> Path:
        return self.root / "models"

    @property
    def var(self) -> Path:
        return self.root / "var"


@dataclass
class Step:
    """One recorded step. `key` is what its output is made from; `valid` re-checks the output
    against its record; `run` does the work (forced: an earlier step ran, so start afresh) and
    returns facts to record beside the key."""

    name: str
    doing: str
    key: dict[str, Any]
    valid: Callable[[dict[str, Any]], bool]
    run: Callable[[bool], dict[str, Any]]


def say(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.CYAN, bold=True)


def read_state(path: Path) -> dict[str, Any]:
    """The record of finished steps; an unreadable record just means every step runs."""
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def is_current(step: Step, record: dict[str, Any] | None, upstream_ran: bool) -> bool:
    """The skip decision: nothing upstream changed, same inputs, output still valid."""
    return not upstream_ran and record is not None and record.get("key") == step.key and step.valid(record)


def run_steps(steps: list[Step], state_file: Path, rebuild: bool) -> list[str]:
    """Run the steps that are not current, in order; returns the names of those that ran."""
    state = read_state(state_file)
    ran: list[str] = []
    for step in steps:
        record = state.get(step.name)
        if is_current(step, record, upstream_ran=rebuild or bool(ran)):
            say(f"[{step.name}] up to date, skipped")
            continue
        say(f"[{step.name}] {step.doing} ...")
        started = time.perf_counter()
        facts = step.run(rebuild or bool(ran))
        state[step.name] = {"key": step.key, **facts}
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=2, sort_keys=True))
        ran.append(step.name)
        say(f"[{step.name}] done in {time.perf_counter() - started:.1f}s")
    return ran


# Redis -------------------------------------------------------------------------------------------


def redis_run_id(url: str) -> str | None:
    """The server's run_id (new at every restart), or None when nothing answers at `url`."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        return str(client.info("server")["run_id"])
    except redis.RedisError:
        return None


def ensure_redis(settings: Settings, var: Path) -> tuple[str, subprocess.Popen | None]:
    """Use PSAD_REDIS_URL when it is set; else a local Redis on 6379, started when none answers."""
    url = settings.redis_url
    if f"{ENV_PREFIX}REDIS_URL" in os.environ:
        if redis_run_id(url) is None:
            raise RuntimeError(f"no Redis answers at {ENV_PREFIX}REDIS_URL={url}; start it or unset the variable")
        say(f"[redis] using {url} ({ENV_PREFIX}REDIS_URL)")
        return url, None
    url = f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0"
    if redis_run_id(url) is not None:
        say(f"[redis] using the Redis already running at {url}")
        return url, None
    started = time.perf_counter()
    proc = start_redis(DEFAULT_REDIS_PORT, var / "redis")
    say(f"[redis] started redis-server (pid {proc.pid}, dir {var / 'redis'}) in {time.perf_counter() - started:.1f}s")
    return url, proc


# The steps ---------------------------------------------------------------------------------------


def data_step(cfg: UpConfig) -> Step:
    from export.contract.schema import SchemaError
    from training.data.store import check_schema_files

    use_ml100k = (cfg.ml100k / "u.data").is_file()
    key: dict[str, Any] = (
        {"source": "ml100k", "path": str(cfg.ml100k.resolve())}
        if use_ml100k
        else {"source": "synthetic", **cfg.synthetic}
    )

    def valid(_: dict[str, Any]) -> bool:
        try:
            check_schema_files(cfg.data_dir)
        except SchemaError:
            return False
        return True

    def run(_: bool) -> dict[str, Any]:
        shutil.rmtree(cfg.data_dir, ignore_errors=True)
        if use_ml100k:
            from training.data.movielens import build_movielens

            stats = build_movielens(
                cfg.ml100k, cfg.data_dir, fmt="ml100k", max_history=50, seed=0, progress=cfg.progress
            )
        else:
            from training.data.synthetic import build_synthetic

            stats = build_synthetic(cfg.data_dir, **cfg.synthetic, max_history=50, seed=0, progress=cfg.progress)
        from training.data.store import format_summary

        typer.echo(format_summary(stats))
        return {}

    doing = f"building {key['source']} into {cfg.data_dir}"
    if not use_ml100k:
        doing += f" (no MovieLens-100K at {cfg.ml100k}; pass --ml100k DIR to use it)"
    return Step("data", doing, key, valid, run)


def train_step(cfg: UpConfig) -> Step:
    from training.checkpoint import RUN_FILES, RunError, load_run
    from training.config import TrainConfig
    from training.models.registry import GENERATOR_ARCHS

    config_text = cfg.train_config.read_text() if cfg.train_config.is_file() else ""
    key = {"config": str(cfg.train_config), "sha256": hashlib.sha256(config_text.encode()).hexdigest()}

    def valid(_: dict[str, Any]) -> bool:
        if not all((cfg.run_dir / name).is_file() for name in RUN_FILES):
            return False
        try:  # weights from an older model code no longer fit: train afresh
            _model, config, _schema = load_run(cfg.run_dir)
            if config.model.arch in GENERATOR_ARCHS:
                load_run(cfg.run_dir, "teacher")
        except RunError:
            return False
        return True

    def run(forced: bool) -> dict[str, Any]:
        from training.train import train

        config = TrainConfig.load(cfg.train_config)
        resumable = not forced and (cfg.run_dir / "state.safetensors").is_file()
        if resumable:
            try:
                train(cfg.data_dir, config, cfg.run_dir, resume=True, progress=cfg.progress)
                return {}
            except RunError as exc:
                typer.echo(f"cannot resume ({exc}); training afresh")
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        train(cfg.data_dir, config, cfg.run_dir, progress=cfg.progress)
        return {}

    return Step("train", f"training {cfg.train_config} into {cfg.run_dir}", key, valid, run)


def export_step(cfg: UpConfig, name: str) -> Step:
    from export.contract.bundle import BundleError, verify_bundle

    def valid(record: dict[str, Any]) -> bool:
        try:
            verify_bundle(cfg.repo / name / str(record.get("version")))
        except BundleError:
            return False
        return True

    def run(_: bool) -> dict[str, Any]:
        from export.exporter import export_run

        bundle = export_run(cfg.run_dir, cfg.repo, name=name, progress=cfg.progress)
        typer.echo(f"bundle: {bundle}")
        return {"version": int(bundle.name)}

    return Step("export", f"exporting {cfg.run_dir} into {cfg.repo / name}", {"name": name}, valid, run)


def profiles_step(cfg: UpConfig, settings: Settings, url: str) -> Step:
    import redis

    from psad.load_profiles import bulk_load
    from service.profiles import history_key, marker_key

    key = {"redis": url, "run_id": redis_run_id(url), "prefix": settings.key_prefix, "data": str(cfg.data_dir)}

    def valid(record: dict[str, Any]) -> bool:
        sample = record.get("sample_user")
        if not isinstance(sample, str):
            return False
        client = redis.Redis.from_url(url)  # the sample user's history, and the load marker (a completed load)
        return client.exists(history_key(settings.key_prefix, sample), marker_key(settings.key_prefix)) == 2

    def run(_: bool) -> dict[str, Any]:
        stats = bulk_load(
            url,
            cfg.data_dir,
            prefix=settings.key_prefix,
            ttl_s=settings.profile_ttl_s,
            history_len=settings.history_len or None,
            progress=cfg.progress,
        )
        typer.echo(f"{stats['users']:,} users, {stats['behaviours']:,} behaviours, {stats['rate']:,.0f} records/s")
        return {"sample_user": demo_request(cfg.data_dir)["user_id"]}

    return Step("profiles", f"loading profiles from {cfg.data_dir} into {url}", key, valid, run)


# Serving -----------------------------------------------------------------------------------------


def demo_request(data_dir: Path, n: int = CURL_CANDIDATES) -> dict[str, Any]:
    """A real request: the user with the longest history and real item ids with descending scores."""
    from training.data.store import read_parquet

    behaviours = read_parquet(data_dir / "behaviours.parquet", columns=["user_id"])
    user = str(behaviours["user_id"].value_counts().index[0])
    items = read_parquet(data_dir / "items.parquet", columns=["item_id"])["item_id"]
    ids = [str(i) for i in items[items != ""].iloc[:n]]
    candidates = [{"item_id": i, "score": round(1.0 - k / len(ids), 3)} for k, i in enumerate(ids)]
    return {"user_id": user, "candidates": candidates, "top_k": min(5, len(ids))}


def curl_example(port: int, body: dict[str, Any]) -> str:
    return (
        f"curl -s http://127.0.0.1:{port}/rerank -H 'content-type: application/json' \\\n"
        f"  -d '{json.dumps(body, separators=(',', ':'))}'"
    )


def shadow_hint(rate: float, redis_url: str, prefix: str, repo: Path) -> str:
    """How to run the consumer beside the demo server, and the report over what it wrote."""
    if rate == 0:
        return f"shadow sampling is off ({ENV_PREFIX}SHADOW_SAMPLE_RATE=0)"
    return (
        f"shadow: {rate:g} of the answers are sampled; judge the student by its teacher, in another shell:\n"
        f"  psad shadow run --redis-url {redis_url} --prefix {prefix} --model-repo {repo} --out shadow/\n"
        "  psad shadow report --results shadow/ --out reports/shadow.md   # after a locust run"
    )


def announce_when_ready(port: int, body: dict[str, Any], shadow: str, timeout_s: float = 120.0) -> None:
    """Print the curl example and the shadow commands once /readyz answers 200: the model is loaded
    (Redis and the profiles were set up before the server started)."""

    def watch() -> None:
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", timeout_s)
        except RuntimeError:
            say(f"[serve] not ready after {timeout_s:.0f}s: see the log above; curl http://127.0.0.1:{port}/readyz")
            return
        say("[serve] ready. Try it:")
        typer.echo(curl_example(port, body))
        typer.echo(f"metrics: curl -s http://127.0.0.1:{port}/metrics | grep ^psad_")
        typer.echo(shadow)

    threading.Thread(target=watch, name="psad-up-ready", daemon=True).start()


def up(cfg: UpConfig) -> list[str]:
    """Bring everything up (see the module docstring); Ctrl-C stops the server and our Redis.
    Returns the names of the steps that ran."""
    from service.cli import run_server

    settings = load_settings()
    if cfg.serve and not port_free(cfg.port):
        raise typer.BadParameter(f"port {cfg.port} is in use (an earlier `psad up`?): stop it or pass --port")
    if not cfg.train_config.is_file():
        raise typer.BadParameter(f"{cfg.train_config}: training config not found (run from the repository root)")
    url, redis_proc = ensure_redis(settings, cfg.var)
    try:
        steps = [
            data_step(cfg),
            train_step(cfg),
            export_step(cfg, settings.model_name),
            profiles_step(cfg, settings, url),
        ]
        ran = run_steps(steps, cfg.var / "up.json", cfg.rebuild)
        if not cfg.serve:
            return ran
        os.environ[f"{ENV_PREFIX}MODEL_REPO"] = str(cfg.repo.resolve())
        os.environ[f"{ENV_PREFIX}REDIS_URL"] = url
        sampling = f"{ENV_PREFIX}SHADOW_SAMPLE_RATE"
        rate = settings.shadow_sample_rate if sampling in os.environ else DEMO_SHADOW_SAMPLE_RATE
        os.environ[sampling] = str(rate)
        shadow = shadow_hint(rate, settings.shadow_redis_url or url, settings.key_prefix, cfg.repo)
        say(f"[serve] starting on http://127.0.0.1:{cfg.port} (Ctrl-C stops it and the Redis this command started)")
        announce_when_ready(cfg.port, demo_request(cfg.data_dir), shadow)
        # uvicorn re-raises the signal that stopped it; make SIGTERM unwind like Ctrl-C so the
        # `finally` below still stops our Redis.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        run_server("127.0.0.1", cfg.port, 1, settings.log_level)
        return ran
    finally:
        if redis_proc is not None:
            stop_tree(redis_proc)
            say("[redis] stopped")


def up_command(
    ml100k: Path = typer.Option(Path("../shared/data/ml-100k"), help="MovieLens-100K files (else the simulator)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Redo every step even when its output is valid."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to serve on."),
    config: Path = typer.Option(Path("configs/small.toml"), help="Training config of the demo model."),
) -> None:
    """Everything on this machine, no Docker: Redis, demo data, training, export, profiles, serving."""
    with reported():
        up(UpConfig(ml100k=ml100k, rebuild=rebuild, port=port, train_config=config))
