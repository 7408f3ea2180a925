"""`psad train` and `psad evaluate`; also runnable as `python -m training.commands` (what torchrun launches)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from export.contract.bundle import DEVICES
from export.contract.errors import fail
from training.data.store import SPLITS
from training.models.config import ARCHS, DISTILL_LOSSES


def train_command(
    data: Path = typer.Option(..., "--data", help="Data set directory built by `psad data build`."),
    config: Path = typer.Option(Path("configs/psad.toml"), "--config", help="TOML config (docs/training.md)."),
    out: Path = typer.Option(Path("runs/psad"), "--out", help="Run directory (checkpoints, history, curves)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last epoch."),
    arch: str = typer.Option(None, "--arch", help=f"Override model.arch: one of {'|'.join(ARCHS)}."),
    distill: str = typer.Option(None, "--distill", help=f"Override model.distill: one of {'|'.join(DISTILL_LOSSES)}."),
    block_size: int = typer.Option(None, "--block-size", min=1, help="Override model.block_size (B >= 1)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Override train.epochs."),
    seed: int = typer.Option(None, "--seed", min=0, help="Override train.seed."),
    device: str = typer.Option(None, "--device", help=f"Override train.device: one of {'|'.join(DEVICES)}."),
) -> None:
    """Train teacher and student jointly; under torchrun, data-parallel across processes."""
    from export.contract.schema import SchemaError
    from training.checkpoint import RunError
    from training.config import ConfigError, TrainConfig
    from training.data.store import DataError
    from training.train import train

    choices = (("--arch", arch, ARCHS), ("--distill", distill, DISTILL_LOSSES), ("--device", device, DEVICES))
    for flag, value, allowed in choices:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"must be one of {list(allowed)}, got {value!r}", param_hint=flag)
    overrides = {
        "train": {"epochs": epochs, "seed": seed, "device": device},
        "model": {"arch": arch, "distill": distill, "block_size": block_size},
    }
    try:
        tables = TrainConfig.load(config).to_dict()
        for table, values in overrides.items():
            tables[table].update({key: value for key, value in values.items() if value is not None})
        cfg = TrainConfig.from_dict(tables, source=f"{config} with the command-line overrides")
        started = time.perf_counter()
        run = train(data, cfg, out, resume=resume)
    except (ConfigError, DataError, SchemaError, RunError) as exc:
        raise fail(exc) from None
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"run written to {run} in {time.perf_counter() - started:.1f}s; evaluate: psad evaluate --run {run}")


def evaluate_command(
    run: Path = typer.Option(..., "--run", help="Run directory written by `psad train`."),
    split: str = typer.Option("test", "--split", help=f"One of {'|'.join(SPLITS)}."),
    data: Path = typer.Option(None, "--data", help="Data set directory (default: the one the run was trained on)."),
    json_path: Path = typer.Option(None, "--json", help="Where to write the metrics (default: RUN/eval_SPLIT.json)."),
) -> None:
    """Student, teacher and initial order on one split: overall and per user-activity group."""
    from export.contract.schema import SchemaError
    from training.checkpoint import RunError
    from training.data.store import DataError
    from training.evaluate import evaluate_run, format_table

    if split not in SPLITS:
        raise typer.BadParameter(f"must be one of {list(SPLITS)}, got {split!r}", param_hint="--split")
    try:
        result = evaluate_run(run, split, data)
    except (DataError, SchemaError, RunError) as exc:
        raise fail(exc) from None
    path = json_path or run / f"eval_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    typer.echo(format_table(result))
    typer.echo(f"metrics written to {path}")


app = typer.Typer(help="Training and evaluation (the same commands as `psad train` / `psad evaluate`).")
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)

if __name__ == "__main__":
    app()
