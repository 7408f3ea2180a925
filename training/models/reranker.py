"""What every reranker offers the training loop, evaluation and export (registry.build_model builds one).

The model inputs arrive two ways: training and evaluation pass a batch keyed by name (it may hold
more, e.g. psad.SHOWN), the serving module takes the tensors positionally, in ModelInputs order
(export/contract/schema.py), as the ONNX graph does.
"""

from __future__ import annotations

import torch
from torch import nn

from export.contract.schema import ModelInputs
from training.models.embeddings import ItemEmbedding


class Reranker(nn.Module):
    """A base for PSAD and the baselines; it holds no parameters, so checkpoints keep their names."""

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """Scalar losses; "loss" is the one to minimise."""
        raise NotImplementedError

    def rank_scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [B,L], higher first; padded slots get student.PAD_SCORE."""
        raise NotImplementedError

    def serving_module(self) -> nn.Module:
        """A module whose forward(*tensors) scores the model inputs positionally: what export writes to ONNX."""
        raise NotImplementedError


def served_inputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A batch of data-set item indices as a bundle of `model` serves it, positionally (serving_module's
    inputs): items the training period never saw as OOV ("id") or by their content's codes ("sid")."""
    items = next(m for m in model.modules() if isinstance(m, ItemEmbedding))
    batch = ModelInputs.from_batch(inputs)
    return list(
        batch._replace(cand_items=items.served_items(batch.cand_items), hist_items=items.served_items(batch.hist_items))
    )
