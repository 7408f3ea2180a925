"""The training configuration: one TOML file with a [train] table (this loop) and a [model] table.

Every key is documented in docs/training.md. Loading is strict: unknown keys, wrong types and
out-of-range values are rejected with a message naming the key and what is allowed, so that a
typo never trains a different model than the one asked for.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic.dataclasses import dataclass

from export.contract.bundle import DEVICES
from training.models.config import (
    STRICT,
    ConfigError,
    ModelConfig,
    above,
    at_least,
    build,
    config_errors,
    fraction,
    one_of,
)


@config_errors("train", "train.{key} must be {allowed}, got {value}")
@dataclass(config=STRICT)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    epochs: Annotated[int, at_least(1)] = 20  # passes over the training split
    batch_size: Annotated[int, at_least(1)] = 128  # lists per optimiser step (per process when distributed)
    lr: Annotated[float, above(0.0)] = 1e-3  # AdamW learning rate (constant)
    weight_decay: Annotated[float, at_least(0.0)] = 1e-4  # AdamW decoupled weight decay
    grad_clip: Annotated[float, at_least(0.0, " (0 = no clipping)")] = 1.0  # max global gradient norm
    # epochs in which neither student nor teacher improved validation NDCG@10
    patience: Annotated[int, at_least(0, " (0 = no early stopping)")] = 4
    seed: Annotated[int, at_least(0)] = 0  # seeds weights, dropout and the shuffling order
    device: Annotated[str, one_of(DEVICES)] = "auto"  # auto = CUDA when present
    threads: Annotated[int, at_least(0, " (0 = torch default)")] = 0  # torch CPU threads
    # keep the first max_list candidates of every list
    max_list: Annotated[int, at_least(0, " (0 = keep every candidate)")] = 0
    eval_batch_size: Annotated[int, at_least(1)] = 512  # lists per forward pass in validation and evaluation
    # decay per step of an exponential moving average of the weights, validated and saved
    ema: Annotated[float, fraction(" (0 = off)")] = 0.0

    def validate(self) -> None:
        """Checks the fields again: a config is validated when built, not when a field is assigned."""
        self._from_tables(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout: {"train": {...}, "model": {...}}."""
        train = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        return {"train": train, "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> TrainConfig:
        try:
            return cls._from_tables(raw)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def _from_tables(cls, raw: Any) -> TrainConfig:
        if not isinstance(raw, dict):
            raise ConfigError("expected tables [train] and [model]")
        unknown_tables = sorted(set(raw) - {"train", "model"})
        if unknown_tables:
            raise ConfigError(f"unknown table(s) {unknown_tables}; allowed: ['model', 'train']")
        return build(cls, "train", raw.get("train", {}), model=ModelConfig.from_dict(raw.get("model", {})))

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
