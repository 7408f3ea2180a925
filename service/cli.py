"""`psad serve`, `psad profiles load` and `mark`, `psad bench service` and `psad up`.

Settings reach the server as PSAD_* environment variables, so a command-line override is written
into the environment before uvicorn starts: every worker process then reads the same settings.
Heavy modules (the app, onnxruntime, the benchmark) are imported inside the commands.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import typer

from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings

APP_FACTORY = "service.app:create_app"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

MODEL_REPO = typer.Option(None, "--model-repo", help="Model repository (overrides PSAD_MODEL_REPO).")
MODEL_NAME = typer.Option(None, "--model-name", help="Model name in the repository (overrides PSAD_MODEL_NAME).")
REDIS_URL = typer.Option(None, "--redis-url", help="Redis URL (overrides PSAD_REDIS_URL).")


def apply_overrides(**overrides: object) -> Settings:
    """Write non-None overrides to PSAD_* variables and validate the resulting settings."""
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    try:
        return load_settings()
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def fresh_multiproc_dir() -> tuple[Path, bool]:
    """The prometheus multiprocess directory, emptied: PROMETHEUS_MULTIPROC_DIR when set, else a new
    temporary one. Returns it and whether this process created it (and so removes it at exit)."""
    given = os.environ.get(MULTIPROC_ENV)
    if not given:
        return Path(tempfile.mkdtemp(prefix="psad-prometheus-")), True
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # samples of dead workers would otherwise be summed forever
        stale.unlink()
    return path, False


def run_server(host: str, port: int, workers: int, log_level: str) -> None:
    """uvicorn on uvloop + httptools (with the connection limits of service.http), no access log.
    Several workers: one process and one SO_REUSEPORT socket each (service.workers), sharing
    metrics through files."""
    import uvicorn

    from service.http import uvicorn_options
    from service.workers import WorkersError, supervise

    config = {
        "app": APP_FACTORY,
        "factory": True,
        "loop": "uvloop",
        **uvicorn_options(load_settings()),  # the settings the caller validated (PSAD_* variables)
        "access_log": False,
        "log_level": log_level,
    }
    if workers == 1:
        uvicorn.run(**config, host=host, port=port)
        return
    path, ours = fresh_multiproc_dir()
    os.environ[MULTIPROC_ENV] = str(path)
    fleet = Path(tempfile.mkdtemp(prefix="psad-fleet-"))  # where the workers agree on one model version
    os.environ[f"{ENV_PREFIX}FLEET_DIR"] = str(fleet)
    try:
        supervise(config, host, port, workers, fleet)
    except WorkersError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    finally:
        shutil.rmtree(fleet, ignore_errors=True)
        if ours:
            shutil.rmtree(path, ignore_errors=True)


def serve_command(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    workers: int = typer.Option(
        1, min=1, max=64, help="Server processes (one model session and one SO_REUSEPORT socket each)."
    ),
    model_repo: Path | None = MODEL_REPO,
    model_name: str | None = MODEL_NAME,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Serve POST /rerank, /rerank/batch, /events and GET /metrics, /livez, /readyz."""
    from export.runtime import verify_bundle
    from service.model_store import ModelStore

    settings = apply_overrides(model_repo=model_repo, model_name=model_name, redis_url=redis_url, processes=workers)
    with domain_errors():  # a missing or altered bundle: one line here, not a traceback from every worker
        store = ModelStore(settings)
        verify_bundle(store.path(store.target_version()))
    run_server(host, port, workers, settings.log_level)


profiles_app = typer.Typer(help="User profiles in Redis.", no_args_is_help=True)


@profiles_app.command("load")
def profiles_load_command(
    data: Path = typer.Option(..., "--data", help="Data set directory (built by `psad data build`)."),
    redis_url: str | None = REDIS_URL,
    ttl_s: int | None = typer.Option(None, "--ttl-s", min=0, help="Profile TTL (overrides PSAD_PROFILE_TTL_S)."),
) -> None:
    """Write a data set's users and behaviours to Redis as profiles (an idempotent upsert)."""

    from service.profiles import STORE_ERRORS, bulk_load
    from training.data.store import DataError, check_schema_files
    from training.schema import SchemaError

    settings = apply_overrides(redis_url=redis_url, profile_ttl_s=ttl_s)
    try:
        check_schema_files(data)
        stats = bulk_load(
            settings.redis_url,
            data,
            prefix=settings.key_prefix,
            ttl_s=settings.profile_ttl_s,
            history_len=settings.history_len or None,
            progress=True,
            cluster=settings.redis_cluster,
        )
    except (DataError, SchemaError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except STORE_ERRORS as exc:
        typer.echo(f"error: Redis at {settings.redis_url}: {exc}; start redis-server or pass --redis-url", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"loaded {stats['users']:,} users and {stats['behaviours']:,} behaviours into {settings.redis_url} "
        f"in {stats['seconds']:.1f}s ({stats['rate']:,.0f} records/s)"
    )


@profiles_app.command("mark")
def profiles_mark_command(redis_url: str | None = REDIS_URL) -> None:
    """Mark the store as loaded without loading anything: for a store fed only by /events. Run it
    once on the new store; the service flags its answers `profiles_missing` while the marker is gone
    (`profiles load` writes it too)."""
    from service.profiles import STORE_ERRORS, mark_loaded, marker_key

    settings = apply_overrides(redis_url=redis_url)
    try:
        marker = mark_loaded(settings.redis_url, settings.key_prefix, cluster=settings.redis_cluster)
    except STORE_ERRORS as exc:
        typer.echo(f"error: Redis at {settings.redis_url}: {exc}; start redis-server or pass --redis-url", err=True)
        raise typer.Exit(1) from None
    key = marker_key(settings.key_prefix)
    typer.echo(f"marked {settings.redis_url} as loaded: {key} generation {marker['generation']}")


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """The project's errors (bad data, config, run, bundle; Redis or server failing to start) all
    derive from ValueError or RuntimeError and name the file and the fix: print them, exit 1."""
    try:
        yield
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


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
    from service.bench import BenchConfig, run_bench

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
    with domain_errors():
        run_bench(config, settings, out)


def up_command(
    ml100k: Path = typer.Option(Path("../shared/data/ml-100k"), help="MovieLens-100K files (else the simulator)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Redo every step even when its output is valid."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to serve on."),
    config: Path = typer.Option(Path("configs/small.toml"), help="Training config of the demo model."),
) -> None:
    """Everything on this machine, no Docker: Redis, demo data, training, export, profiles, serving."""
    from service.up import UpConfig, up

    with domain_errors():
        up(UpConfig(ml100k=ml100k, rebuild=rebuild, port=port, train_config=config))


if __name__ == "__main__":
    # `python -m service.cli serve|profiles|bench|up`: the service's commands without the training
    # stack's imports (`psad` itself registers the same functions); the benchmark starts servers so.
    cli = typer.Typer(no_args_is_help=True)
    cli.command("serve")(serve_command)
    cli.add_typer(profiles_app, name="profiles")
    cli.command("bench")(bench_service_command)
    cli.command("up")(up_command)
    cli()
