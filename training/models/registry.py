"""Builds a reranker from its config: PSAD or one of the baselines, all trained by one loop.

Every model takes the same inputs (export/contract/schema.py) and offers:
  forward(inputs, labels, step) -> dict of scalar losses, "loss" being the one to minimise;
  rank_scores(inputs) -> [B, L] scores, higher first (the student for PSAD);
  serving_module() -> nn.Module scoring the positional model inputs (what export writes to ONNX).
Generators also offer teacher_decode(inputs) -> [B, L] permutation and decode_steps(L).
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.config import ModelConfig
from export.contract.schema import FeatureSchema

GENERATOR_ARCHS = frozenset({"psad"})  # archs whose models offer teacher_decode (and keep a teacher checkpoint)


def build_model(cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor) -> nn.Module:
    cfg.validate()
    if cfg.arch == "psad":
        from training.models.psad import PSAD

        return PSAD(cfg, schema, item_cat, item_num)
    from training.models.baselines import BASELINES

    return BASELINES[cfg.arch](cfg, schema, item_cat, item_num)
