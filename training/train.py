"""The one training loop: teacher and student trained jointly, the model returning one loss.

Each epoch shuffles the training lists with a generator seeded by (seed, epoch), takes AdamW
steps on the model's joint loss, then measures the student (and, for generators, the teacher)
on the validation split. Each model is kept at its own best validation NDCG@10: the student's
epoch as model.safetensors (what export serves), the teacher's as teacher.safetensors (offline
shadow evaluation); training stops when neither has improved for `patience` epochs, so a teacher
that learns more slowly than its student is not cut short. The last epoch is kept as
last.safetensors + state.safetensors, from which `resume=True` continues exactly.

Distributed: under torchrun (WORLD_SIZE > 1) every process trains on its own shard of each
epoch's order with DistributedDataParallel (gloo on CPU, nccl on CUDA); validation is sharded
and its sums all-reduced; only rank 0 writes files and prints.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.checkpoint import (
    BEST_FILES,
    MODELS,
    VALIDATION_METRIC,
    RunError,
    load_state,
    load_weights,
    predates_per_model_checkpoints,
    read_config,
    save_run_files,
    save_state,
    save_weights,
    write_json,
)
from training.config import TrainConfig
from training.data.store import ListData, check_schema_files, load_items, load_schema
from training.evaluate import list_metrics, load_lists, rank_lists, to_tensors
from training.models.psad import SHOWN
from training.models.registry import GENERATOR_ARCHS, build_model
from training.plots import plot_history

# Keys that may change when resuming: they do not alter what the finished epochs computed.
EMA_FILE = "ema.safetensors"  # the moving average of the weights, for --resume
RESULT_NEUTRAL = {"device", "threads", "eval_batch_size"}  # settings that do not change what a run learns
RESUMABLE_CHANGES = {"epochs", "patience", *RESULT_NEUTRAL}


@dataclass
class Cluster:
    """Where this process runs: its rank among world_size processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but torch sees no CUDA device; use device = 'cpu' or 'auto'")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_cluster(device: str) -> Cluster:
    """Join the torchrun process group when WORLD_SIZE > 1, else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Cluster(rank=rank, world_size=world_size, device=dev)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, cluster: Cluster) -> list[np.ndarray]:
    """This process's batches of list indices: a seeded shuffle, cut into equal shards per rank."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // cluster.world_size
    mine = order[cluster.rank * per_rank : (cluster.rank + 1) * per_rank]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def validate(model: nn.Module, data: ListData, config: TrainConfig, cluster: Cluster) -> dict[str, dict[str, float]]:
    """Mean validation metrics per ranker; each rank scores a slice, the sums are all-reduced."""
    shard = np.array_split(np.arange(len(data)), cluster.world_size)[cluster.rank]
    mine = data.take(shard)
    metrics = list_metrics(rank_lists(model, mine, cluster.device, config.eval_batch_size), mine)
    keys = [(ranker, name) for ranker, m in metrics.items() for name in m]
    sums = torch.tensor([metrics[r][m].sum() for r, m in keys] + [len(shard)], dtype=torch.float64)
    if cluster.distributed:
        sums = sums.to(cluster.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    count = max(float(sums[-1]), 1.0)
    out: dict[str, dict[str, float]] = {}
    for (ranker, name), total in zip(keys, sums[:-1].tolist(), strict=True):
        out.setdefault(ranker, {})[name] = total / count
    return out


def changed_settings(out_dir: Path, config: TrainConfig, data_dir: Path, may_change: set[str]) -> list[str]:
    """The settings (and --data) that differ between the run in out_dir and `config`, except may_change."""
    saved, saved_data = read_config(out_dir)
    changed = [] if saved_data == data_dir.resolve() else [f"--data (the run used {saved_data})"]
    old, new = saved.to_dict(), config.to_dict()
    changed += [f"model.{k}" for k in new["model"] if new["model"][k] != old["model"].get(k)]
    changed += [f"train.{k}" for k in new["train"] if k not in may_change and new["train"][k] != old["train"].get(k)]
    return changed


def check_resume(out_dir: Path, config: TrainConfig, data_dir: Path) -> None:
    """Resuming is only exact with the same data and the same training-defining settings."""
    if not (out_dir / "state.safetensors").is_file():
        raise RunError(f"{out_dir}: nothing to resume (no state.safetensors); train without --resume")
    changed = changed_settings(out_dir, config, data_dir, RESUMABLE_CHANGES)
    if changed:
        raise RunError(
            f"{out_dir}: cannot resume with changed settings {changed}; only {sorted(RESUMABLE_CHANGES)} may change"
        )


def check_fresh(out_dir: Path) -> None:
    if (out_dir / "state.safetensors").is_file():
        raise RunError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")


def train(data_dir: Path, config: TrainConfig, out_dir: Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Train a reranker on a data set built by `psad data build`; returns out_dir (the run)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    config.validate()
    check_schema_files(data_dir)
    if resume:
        check_resume(out_dir, config, data_dir)
    else:
        check_fresh(out_dir)
    cluster = start_cluster(config.device)
    try:
        return _train(data_dir, config, out_dir, cluster, resume=resume, progress=progress and cluster.main)
    finally:
        if cluster.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    data_dir: Path, config: TrainConfig, out_dir: Path, cluster: Cluster, *, resume: bool, progress: bool
) -> Path:
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    schema = load_schema(data_dir)
    train_data = load_lists(data_dir, "train", schema, config.max_list)
    val_data = load_lists(data_dir, "val", schema, config.max_list)
    needs_shown = config.model.arch in GENERATOR_ARCHS and config.model.teacher_target == "shown"
    shown = torch.from_numpy(train_data.shown_order()) if needs_shown else None
    if len(train_data) < cluster.world_size:
        raise RunError(f"{data_dir}: {len(train_data)} training lists cannot feed {cluster.world_size} processes")
    item_cat, item_num = (torch.from_numpy(np.array(a)) for a in load_items(data_dir, schema))
    model = build_model(config.model, schema, item_cat, item_num).to(cluster.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    averaged = copy.deepcopy(model).requires_grad_(False) if config.ema else model  # validated and saved

    epoch, step, meta = 0, 0, {"best": {}, "bad_epochs": 0, "history": []}
    if resume:
        load_weights(model, out_dir / "last.safetensors")
        if config.ema:
            load_weights(averaged, out_dir / EMA_FILE)
        epoch, step, meta = load_state(out_dir / "state.safetensors", optimizer)
        if predates_per_model_checkpoints(meta):
            raise RunError(
                f"{out_dir}: written by an earlier version of `psad train`; start a new run without --resume"
            )
    elif cluster.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_run_files(out_dir, config, schema, data_dir, item_cat, item_num)

    wrapped = DistributedDataParallel(model, find_unused_parameters=True) if cluster.distributed else model
    inputs = to_tensors(train_data.inputs, torch.device("cpu"))
    if shown is not None:
        inputs[SHOWN] = shown
    labels = torch.from_numpy(train_data.labels)
    while epoch < config.epochs and not (config.patience and meta["bad_epochs"] >= config.patience):
        started = time.perf_counter()
        batches = epoch_batches(len(train_data), config.batch_size, config.seed, epoch, cluster)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        sums: dict[str, float] = {}
        wrapped.train()
        for i, idx in enumerate(bar, 1):
            rows = torch.from_numpy(idx)
            batch = {k: v[rows].to(cluster.device) for k, v in inputs.items()}
            losses = wrapped(batch, labels[rows].to(cluster.device), step=step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if config.ema:
                update_average(averaged, model, config.ema)
            step += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if not math.isfinite(sums["loss"]):  # nothing of this epoch is saved: the last checkpoint stays good
                raise RunError(
                    f"the training loss became {sums['loss']} at epoch {epoch + 1}, step {step}: training diverged. "
                    f"Lower train.lr (now {config.lr:g}), keep train.grad_clip on (now {config.grad_clip:g}), "
                    "or look for extreme values in the data set's numeric features"
                )
            bar.set_postfix({k: f"{v / i:.4f}" for k, v in sums.items()}, refresh=False)
        bar.close()
        epoch += 1
        val = validate(averaged, val_data, config, cluster)
        improved = record_best(meta, val)
        meta["history"].append(
            {
                "epoch": epoch,
                "step": step,
                "seconds": round(time.perf_counter() - started, 3),
                "train": {k: v / max(len(batches), 1) for k, v in sums.items()},
                "val": val,
            }
        )
        if cluster.main:
            save_epoch(out_dir, model, averaged, optimizer, epoch, step, meta, improved)
            if progress:
                tqdm.write(epoch_line(meta["history"][-1], improved))
    if progress and config.patience and meta["bad_epochs"] >= config.patience:
        tqdm.write(f"early stop: no better validation {VALIDATION_METRIC} for {config.patience} epoch(s)")
    if cluster.distributed:
        dist.barrier()  # rank 0 has finished writing before any process leaves
    return out_dir


def record_best(meta: dict, val: dict[str, dict[str, float]]) -> list[str]:
    """The models (student, teacher) whose validation metric beat their best so far; updates meta's
    best scores, and its count of epochs in which no model improved (what early stopping reads)."""
    improved = [m for m in MODELS if m in val and val[m][VALIDATION_METRIC] > meta["best"].get(m, -math.inf)]
    for m in improved:
        meta["best"][m] = val[m][VALIDATION_METRIC]
    meta["bad_epochs"] = 0 if improved else meta["bad_epochs"] + 1
    return improved


@torch.no_grad()  # the average is no part of the autograd graph
def update_average(averaged: nn.Module, model: nn.Module, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(averaged.parameters()), list(model.parameters()), 1.0 - decay)


def save_epoch(
    out_dir: Path,
    model: nn.Module,
    averaged: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
    meta: dict,
    improved: list[str],
) -> None:
    """Checkpoint after an epoch: each improved model's weights, the last weights, training state,
    history, curves."""
    for m in improved:
        save_weights(averaged, out_dir / BEST_FILES[m])
    save_weights(model, out_dir / "last.safetensors")
    if averaged is not model:
        save_weights(averaged, out_dir / EMA_FILE)
    save_state(out_dir / "state.safetensors", optimizer, epoch, step, meta)
    write_json(out_dir / "history.json", meta["history"])
    plot_history(meta["history"], out_dir / "curves.png", VALIDATION_METRIC)


def epoch_line(entry: dict, improved: list[str]) -> str:
    losses = " ".join(f"{k} {v:.4f}" for k, v in entry["train"].items())
    val = " ".join(
        f"{ranker} {m[VALIDATION_METRIC]:.4f}{'*' if ranker in improved else ''}" for ranker, m in entry["val"].items()
    )
    return (
        f"epoch {entry['epoch']:>3}  {entry['seconds']:.1f}s  train: {losses}  val {VALIDATION_METRIC} (* best): {val}"
    )
