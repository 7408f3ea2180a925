"""ModelConfig: every architecture and loss knob of a reranker, validated before a model is built.

One flat dataclass (nanoGPT style) shared by PSAD and the baselines; the training config embeds
it and a run saves it as JSON, so `from_dict` rejects unknown keys instead of ignoring typos.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ARCHS = ("psad", "dnn", "prm", "dlcm", "setrank")
STUDENT_LOSSES = ("listwise", "bce")
DISTILL_LOSSES = ("listwise", "rd", "none")
TEACHER_TARGETS = ("own", "shown")


@dataclass
class ModelConfig:
    arch: str = "psad"  # "psad" or a baseline: "dnn", "prm", "dlcm", "setrank"
    d_model: int = 32  # width of every item, user and candidate representation
    n_heads: int = 2  # attention heads (UPN read-outs, teacher encoder)
    teacher_layers: int = 2  # transformer blocks in the teacher's candidate-set encoder
    student_hidden: int = 128  # hidden width of the student's per-candidate MLP
    dropout: float = 0.1
    item_ids: bool = True  # False: items are known by their features only, no per-item id embedding (embeddings.py)
    block_size: int = 4  # B: slots the teacher fills per decoding step; 1 = AR, >= list length = NAR
    student_loss: str = "listwise"  # student label loss: "listwise" (softmax CE) or "bce" (pointwise)
    distill: str = "listwise"  # teacher -> student: "listwise" (position-weighted Plackett-Luce), "rd", "none"
    # teacher objective: "own" = pick a clicked item on the prefix of its own greedy list; "shown" = a
    # click model of each slot given the earlier blocks of the order the list was displayed in
    # (needs the data set's shown_position, teacher.py)
    teacher_target: str = "own"
    distill_weight: float = 1.0  # lambda in  loss = teacher + student + lambda * distill
    distill_top_k: int = 0  # listwise distillation: ranks scored (0 = the whole list)
    rd_k: int = 10  # RD: teacher's top-K items used as weighted positives
    rd_lambda: float = 1.0  # RD: static weight temperature, w_r ~ exp(-r / lambda)
    rd_alpha: float = 1.0  # RD: weight of the teacher term
    rd_dynamic: bool = True  # RD: multiply by the dynamic weight max(0, tanh(mu (rank_student - r)))
    rd_mu: float = 0.1  # RD: slope of the dynamic weight
    rd_warmup_steps: int = 200  # RD: optimiser steps before the dynamic weight switches on
    use_upn: bool = True  # False = ablation: user features only, no history, gates or personalised positions
    history_match: bool = False  # test each candidate against the history by item identity (upn.HistoryMatch)
    position_encoding: bool = True  # encode each candidate's initial position (the ranking stage's order)
    time_decay_init: float = 0.5  # initial decay per log1p(age in days) of the history attention

    def validate(self) -> None:
        def need(cond: bool, field: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"model.{field} = {getattr(self, field)!r} is invalid: allowed {allowed}")

        for f in fields(self):
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value), f.name, "a finite number")
        need(self.arch in ARCHS, "arch", f"one of {list(ARCHS)}")
        need(self.student_loss in STUDENT_LOSSES, "student_loss", f"one of {list(STUDENT_LOSSES)}")
        need(self.distill in DISTILL_LOSSES, "distill", f"one of {list(DISTILL_LOSSES)}")
        need(self.teacher_target in TEACHER_TARGETS, "teacher_target", f"one of {list(TEACHER_TARGETS)}")
        need(self.d_model >= 1, "d_model", "an integer >= 1")
        need(self.n_heads >= 1, "n_heads", "an integer >= 1")
        need(self.d_model % self.n_heads == 0, "d_model", f"a multiple of n_heads ({self.n_heads})")
        need(self.teacher_layers >= 0, "teacher_layers", "an integer >= 0")
        need(self.student_hidden >= 1, "student_hidden", "an integer >= 1")
        need(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)")
        need(self.block_size >= 1, "block_size", "an integer >= 1 (1 = autoregressive)")
        need(self.distill_weight >= 0.0, "distill_weight", "a float >= 0")
        need(self.distill_top_k >= 0, "distill_top_k", "an integer >= 0 (0 = whole list)")
        need(self.rd_k >= 1, "rd_k", "an integer >= 1")
        need(self.rd_lambda > 0.0, "rd_lambda", "a float > 0")
        need(self.rd_alpha >= 0.0, "rd_alpha", "a float >= 0")
        need(self.rd_mu > 0.0, "rd_mu", "a float > 0")
        need(self.rd_warmup_steps >= 0, "rd_warmup_steps", "an integer >= 0")
        need(self.time_decay_init >= 0.0, "time_decay_init", "a float >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"model config: expected a mapping, got {type(raw).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}; allowed: {allowed}")
        cfg, defaults = cls(**raw), cls()
        for f in fields(cls):
            value, want = getattr(cfg, f.name), type(getattr(defaults, f.name))
            ok = isinstance(value, want) or (want is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok or (want is int and isinstance(value, bool)):
                raise ValueError(f"model.{f.name} = {value!r}: expected {want.__name__}")
            if want is float:
                setattr(cfg, f.name, float(value))
        cfg.validate()
        return cfg
