"""Shared fixtures: a real redis-server on a free port (psad.procs, as the tools start theirs), and
small real data sets."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from psad.procs import free_port, start_redis, stop_tree

# One torch thread per test process: on shared 2-core machines torch's default thread pool
# oversubscribes the cores and slows small-model tests tenfold.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the serving-only install has no torch
    pass

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(__import__("os").environ.get("PSAD_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))


class RedisServer:
    """A real redis-server process that tests may stop and restart on the same port. `args` are
    extra redis-server options, after (so overriding) the defaults: no persistence."""

    def __init__(self, workdir: Path, args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.port = free_port()
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        try:
            self.proc = start_redis(self.port, self.workdir, self.args)
        except FileNotFoundError as exc:
            pytest.fail(str(exc))

    def stop(self) -> None:
        stop_tree(self.proc)
        self.proc = None


def predate_per_model_checkpoints(run_dir: Path) -> None:
    """Rewrite a run's training state as the earlier version saved it: one best score, a number."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = run_dir / "state.safetensors"
    tensors = load_file(str(state))
    with safe_open(str(state), framework="pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata["meta"])
    meta["best"] = 0.6
    save_file(tensors, str(state), metadata={**metadata, "meta": json.dumps(meta)})


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ml100k_dir() -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {ML100K} (set PSAD_ML100K); licence forbids shipping it")
    return ML100K


# Small real artefacts, built once per session and shared by the tests downstream of them:
# data set -> training run -> exported bundle. Each is built by the real code path.


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("data") / "tiny"
    build_synthetic(out, lists=1200, users=80, items=150, list_length=10, max_history=20, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.config import TrainConfig
    from training.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = TrainConfig.small_for_tests()
    train(tiny_data, config, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import export_run

    repo = tmp_path_factory.mktemp("models")
    return export_run(tiny_run, repo, name="psad", version=1)


# The same chain on a cold-item split: items with content vectors, 20% of them first seen after the
# training period; a sid run and bundle (item_encoder "sid"), and an id bundle of the same data.


@pytest.fixture(scope="session")
def cold_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data.synthetic import SimulatorConfig, build_synthetic

    out = tmp_path_factory.mktemp("data") / "cold"
    config = SimulatorConfig(content_dim=8, cold_items=0.2)
    build_synthetic(
        out, lists=1200, users=80, items=150, list_length=10, max_history=20, seed=0, progress=False, config=config
    )
    return out


def train_encoder(data: Path, out: Path, encoder: str) -> Path:
    from training.config import TrainConfig
    from training.train import train

    config = TrainConfig.small_for_tests()
    config.model.item_encoder = encoder
    train(data, config, out, progress=False)
    return out


@pytest.fixture(scope="session")
def sid_run(cold_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_encoder(cold_data, tmp_path_factory.mktemp("runs") / "sid", "sid")


@pytest.fixture(scope="session")
def sid_bundle(sid_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import export_run

    return export_run(sid_run, tmp_path_factory.mktemp("models"), name="psad", version=1)


@pytest.fixture(scope="session")
def cold_id_bundle(cold_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import export_run

    run = train_encoder(cold_data, tmp_path_factory.mktemp("runs") / "id", "id")
    return export_run(run, tmp_path_factory.mktemp("models"), name="id", version=1)
