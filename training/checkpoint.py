"""A training run on disk, and how to read it back without ever unpickling anything.

A run directory holds:

    config.json          TrainConfig.to_dict() plus "data_dir" (absolute path of the data set)
    schema.json          the data set's FeatureSchema (copied)
    items.safetensors    the item side tables the model was built with (item_cat, item_num)
    model.safetensors    the student's best weights (highest validation student NDCG@10): what export serves
    teacher.safetensors  the teacher's best weights (highest validation teacher NDCG@10; generators only)
    last.safetensors     weights after the last completed epoch
    ema.safetensors      with train.ema > 0: the weight average after the last epoch (for resume)
    state.safetensors    optimiser tensors, RNG states, epoch and step; JSON metadata for the rest
    history.json         per-epoch training losses and validation metrics
    curves.png           the training curves

Every file is safetensors or JSON, written to a temporary name and renamed, so an interrupted
run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from export.contract.schema import FeatureSchema, SchemaError
from training.config import ConfigError, TrainConfig
from training.data.store import load_schema
from training.models.registry import build_model
from training.models.reranker import Reranker

RUN_FILES = ("config.json", "schema.json", "items.safetensors", "model.safetensors")
MODELS = ("student", "teacher")  # each kept at its own best validation epoch
BEST_FILES = {"student": "model.safetensors", "teacher": "teacher.safetensors"}
VALIDATION_METRIC = "ndcg@10"  # what "best" means: the epoch kept per model, and what export reports


class RunError(ValueError):
    """A run directory is missing, incomplete or corrupt; the message names the file."""


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights as safetensors; save_model copes with tied (shared) parameters."""
    tmp = path.with_suffix(".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise RunError(f"{path}: cannot read weights ({exc}); the file is corrupt or from another model") from None
    if missing or unexpected:
        raise RunError(
            f"{path}: weights do not fit the model built from config.json "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); was config.json edited?"
        )


def save_run_files(
    out_dir: Path,
    config: TrainConfig,
    schema: FeatureSchema,
    data_dir: Path,
    item_cat: torch.Tensor,
    item_num: torch.Tensor,
) -> None:
    """The files that describe a run: written once at its start."""
    write_json(out_dir / "config.json", {**config.to_dict(), "data_dir": str(Path(data_dir).resolve())})
    write_json(out_dir / "schema.json", schema.to_dict())
    tmp = out_dir / "items.tmp"
    save_file({"item_cat": item_cat.contiguous(), "item_num": item_num.contiguous()}, str(tmp))
    os.replace(tmp, out_dir / "items.safetensors")


def check_data_matches_run(data_dir: Path, run_dir: Path, schema: FeatureSchema, fix: str) -> None:
    """The data set still encodes items and features as when the run trained: a rebuilt or other data
    set would shift item indices and feature encodings without any error. `fix`: what to do instead."""
    if load_schema(data_dir).to_dict() != schema.to_dict():
        raise SchemaError(f"{data_dir}/schema.json differs from {run_dir}/schema.json: {fix}")


def read_config(run_dir: Path) -> tuple[TrainConfig, Path]:
    """The run's TrainConfig and the data directory it was trained on."""
    path = Path(run_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: not found; is {run_dir} a run directory written by `psad train`?") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or "data_dir" not in raw:
        raise RunError(f"{path}: missing 'data_dir'; re-run `psad train`")
    data_dir = Path(raw.pop("data_dir"))
    try:
        return TrainConfig.from_dict(raw, source=str(path)), data_dir
    except ConfigError as exc:
        raise RunError(str(exc)) from None


def save_state(path: Path, optimizer: torch.optim.Optimizer, epoch: int, step: int, meta: dict[str, Any]) -> None:
    """Optimiser tensors, RNG states, epoch and step as tensors; JSON-able extras in the metadata."""
    opt = optimizer.state_dict()
    tensors = {"epoch": torch.tensor(epoch, dtype=torch.int64), "step": torch.tensor(step, dtype=torch.int64)}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for pid, entries in opt["state"].items():
        for key, value in entries.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{pid}.{key}"] = t.detach().cpu().contiguous()
    metadata = {"param_groups": json.dumps(opt["param_groups"]), "meta": json.dumps(meta)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a training state (early-stopping state, history) without loading tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["meta"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: cannot read the training state ({exc}); start a new run") from None


def predates_per_model_checkpoints(meta: dict[str, Any]) -> bool:
    """A state written before each model was kept at its own best epoch (one best score, a number)."""
    return not isinstance(meta.get("best"), dict)


def load_state(path: Path, optimizer: torch.optim.Optimizer) -> tuple[int, int, dict[str, Any]]:
    """Restore the optimiser and RNG states; returns (epoch, step, meta)."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        param_groups = json.loads(metadata["param_groups"])
        meta = json.loads(metadata["meta"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: cannot read the training state ({exc}); start a new run without --resume") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError) as exc:
        raise RunError(f"{path}: optimiser state does not fit this model ({exc})") from None
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(tensors["epoch"]), int(tensors["step"]), meta


def load_run(run_dir: Path, which: str = "student") -> tuple[Reranker, TrainConfig, FeatureSchema]:
    """Rebuild a trained model (eval mode) from its run directory alone, with the weights of the
    epoch where `which` ("student" or "teacher") was best on validation."""
    if which not in BEST_FILES:
        raise ValueError(f"load_run: which must be one of {list(BEST_FILES)}, got {which!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found; train one with `psad train --out {run_dir}`")
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise RunError(f"{run_dir}: missing {missing}; the run did not finish an epoch, or this is not a run directory")
    config, _ = read_config(run_dir)
    try:
        schema = FeatureSchema.load(run_dir / "schema.json")
    except SchemaError as exc:
        raise RunError(str(exc)) from None
    try:
        items = load_file(str(run_dir / "items.safetensors"))
        item_cat, item_num = items["item_cat"], items["item_num"]
    except (SafetensorError, OSError, KeyError) as exc:
        raise RunError(f"{run_dir / 'items.safetensors'}: cannot read the item tables ({exc})") from None
    weights = run_dir / BEST_FILES[which]
    if not weights.is_file():
        raise RunError(f"{weights}: not found; the run has no {which} (or predates per-model checkpoints: retrain it)")
    model = build_model(config.model, schema, item_cat, item_num)
    load_weights(model, weights)
    return model.eval(), config, schema
