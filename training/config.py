"""The training configuration: one TOML file with a [train] table (this loop) and a [model] table.

Every key is documented in docs/training.md. Loading is strict: unknown keys, wrong types and
out-of-range values are rejected with a message naming the key and what is allowed, so that a
typo never trains a different model than the one asked for.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.contract.bundle import DEVICES
from export.contract.schema import ANNOTATED_TYPES, typed
from training.models.config import ModelConfig


class ConfigError(ValueError):
    """A training configuration is invalid; the message names the key and the allowed values."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 20  # passes over the training split
    batch_size: int = 128  # lists per optimiser step (per process when distributed)
    lr: float = 1e-3  # AdamW learning rate (constant)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    patience: int = 4  # epochs in which neither student nor teacher improved validation NDCG@10; 0 = never stop
    seed: int = 0  # seeds weights, dropout and the shuffling order
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch's default
    max_list: int = 0  # keep the first max_list candidates of every list; 0 = keep all
    eval_batch_size: int = 512  # lists per forward pass in validation and evaluation
    ema: float = 0.0  # decay per step of an exponential moving average of the weights, validated and saved; 0 = off

    def validate(self) -> None:
        def need(ok: bool, key: str, allowed: str, value: Any) -> None:
            if not ok:
                raise ConfigError(f"train.{key} must be {allowed}, got {value!r}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value), f.name, "a finite number", value)
        need(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        need(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        need(self.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1", self.eval_batch_size)
        need(self.lr > 0, "lr", "a number > 0", self.lr)
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        need(self.grad_clip >= 0, "grad_clip", "a number >= 0 (0 = no clipping)", self.grad_clip)
        need(self.patience >= 0, "patience", "an integer >= 0 (0 = no early stopping)", self.patience)
        need(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        need(self.device in DEVICES, "device", f"one of {list(DEVICES)}", self.device)
        need(self.threads >= 0, "threads", "an integer >= 0 (0 = torch default)", self.threads)
        need(0 <= self.ema < 1, "ema", "a number in [0, 1) (0 = off)", self.ema)
        need(self.max_list >= 0, "max_list", "an integer >= 0 (0 = keep every candidate)", self.max_list)
        try:
            self.model.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout: {"train": {...}, "model": {...}}."""
        train = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        return {"train": train, "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> TrainConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected tables [train] and [model]")
        unknown_tables = sorted(set(raw) - {"train", "model"})
        if unknown_tables:
            raise ConfigError(f"{source}: unknown table(s) {unknown_tables}; allowed: ['model', 'train']")
        train = raw.get("train", {})
        if not isinstance(train, dict):
            raise ConfigError(f"{source}: [train] must be a table")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "model"}
        unknown = sorted(set(train) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) train.{unknown}; allowed: {sorted(fields)}")
        values = {
            name: typed(train[name], ANNOTATED_TYPES[fields[name].type], f"{source}: train.{name}", ConfigError)
            for name in train
        }
        try:
            model = ModelConfig.from_dict(raw.get("model", {}))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
        config = cls(model=model, **values)
        try:
            config.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return config

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_dict(read_toml(Path(path)), source=str(path))

    @classmethod
    def small_for_tests(cls) -> TrainConfig:
        """Tiny dimensions and two epochs: trains on the test fixtures' data in a few seconds."""
        model = ModelConfig(d_model=16, n_heads=2, teacher_layers=1, student_hidden=16, dropout=0.0, block_size=2)
        return cls(model=model, epochs=2, batch_size=64, lr=3e-3, patience=0, threads=1, eval_batch_size=256)


def read_toml(path: Path, extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config at `path` as a dict. `extends = "other.toml"` (relative to this file) takes every
    key this file does not set from the other one, section by section: a variant states only what
    it changes, and cannot drift from its base."""
    if not path.is_file():
        where = f" (extended by {extended_by[-1]})" if extended_by else ""
        raise ConfigError(f"{path}: config file not found{where}; pass --config (see configs/psad.toml)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f'{path}: extends = {base!r}: expected a file name such as "psad.toml"')
    parent = (path.parent / base).resolve()
    if parent in (*extended_by, path.resolve()):
        raise ConfigError(f"{path}: extends = {base!r} makes a cycle; a config cannot extend itself")
    merged = read_toml(parent, (*extended_by, path.resolve()))
    for key, value in raw.items():
        below = merged.get(key)
        merged[key] = {**below, **value} if isinstance(value, dict) and isinstance(below, dict) else value
    return merged
