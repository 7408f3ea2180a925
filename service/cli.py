"""`psad serve` and `psad profiles mark`, also runnable without the offline code as
`python -m service.cli serve` (or `psad-serve`: what the serving image runs).

Settings reach the server as PSAD_* environment variables, so a command-line override is written
into the environment before uvicorn starts: every worker process then reads the same settings.
Heavy modules (the app, onnxruntime) are imported inside the commands.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import typer

from export.contract.bundle import verify_bundle
from export.contract.errors import FAILED, fail, reported
from service import logs
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings

APP_FACTORY = "service.app:create_app"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

MODEL_REPO = typer.Option(
    None, "--model-repo", help="Model repository: a directory or an fsspec URL (overrides PSAD_MODEL_REPO)."
)
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
        raise fail(exc) from None


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
    """uvicorn on uvloop + httptools (with the connection limits of service.http), no access log,
    every log line JSON (service.logs). Several workers: one process and one SO_REUSEPORT socket
    each (service.workers), sharing metrics through files."""
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
        "log_config": logs.log_config(log_level),
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
        raise fail(exc, FAILED) from None
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
    model_repo: str | None = MODEL_REPO,
    model_name: str | None = MODEL_NAME,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Serve POST /rerank, /rerank/batch, /events and GET /metrics, /livez, /readyz."""
    from service.model_store import ModelStore

    settings = apply_overrides(model_repo=model_repo, model_name=model_name, redis_url=redis_url, processes=workers)
    with reported():  # a missing or altered bundle: one line here, not a traceback from every worker
        store = ModelStore(settings)
        verify_bundle(store.path(store.target_version()))
    run_server(host, port, workers, settings.log_level)


def profiles_mark_command(redis_url: str | None = REDIS_URL) -> None:
    """Mark the store as loaded without loading anything: for a store fed only by /events. Run it
    once on the new store; the service flags its answers `profiles_missing` while the marker is gone
    (`profiles load` writes it too)."""
    from service.profiles import STORE_ERRORS, mark_loaded, marker_key

    settings = apply_overrides(redis_url=redis_url)
    try:
        marker = mark_loaded(settings.redis_url, settings.key_prefix, cluster=settings.redis_cluster)
    except STORE_ERRORS as exc:
        raise fail(f"Redis at {settings.redis_url}: {exc}; start redis-server or pass --redis-url", FAILED) from None
    key = marker_key(settings.key_prefix)
    typer.echo(f"marked {settings.redis_url} as loaded: {key} generation {marker['generation']}")


app = typer.Typer(help="The PSAD reranking service.", no_args_is_help=True)
app.command("serve")(serve_command)
profiles_app = typer.Typer(help="User profiles in Redis.", no_args_is_help=True)
profiles_app.command("mark")(profiles_mark_command)
app.add_typer(profiles_app, name="profiles")

if __name__ == "__main__":
    app()
