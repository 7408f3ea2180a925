"""Builds a reranker from its config: PSAD or one of the baselines, all trained by one loop.

Every model takes the same inputs (export/contract/schema.py: ModelInputs) and is a Reranker
(training/models/reranker.py): forward(inputs, labels, step) -> scalar losses, rank_scores(inputs),
serving_module(). Generators also offer teacher_decode(inputs) -> [B, L] permutation and decode_steps(L).
"""

from __future__ import annotations

import torch

from export.contract.schema import FeatureSchema
from training.models.config import ModelConfig
from training.models.reranker import Reranker

GENERATOR_ARCHS = frozenset({"psad"})  # archs whose models offer teacher_decode (and keep a teacher checkpoint)


def build_model(cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor) -> Reranker:
    cfg.validate()
    if cfg.arch == "psad":
        from training.models.psad import PSAD

        return PSAD(cfg, schema, item_cat, item_num)
    from training.models.baselines import BASELINES

    return BASELINES[cfg.arch](cfg, schema, item_cat, item_num)
