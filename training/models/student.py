"""PSAD-S, the student: the light scorer that serves online (one pass, linear in list length).

score_i = MLP([x_i, u, mean_{valid j} x_j, x_i * u]) with x_i the UPN-personalised candidate
and u the user vector. The masked mean is the only list context, so the head is permutation-
equivariant in the candidates; order information enters only through UPN's position code.
The first layer is split into a per-candidate part on [x_i, x_i * u] and a per-list part on
[u, context] (the same function as one layer on the concatenation), and the per-candidate part
W_a x_i + W_b (x_i * u) is computed as (W_a + W_b diag(u)) x_i: one user-specific d -> hidden
matrix per list, so each candidate costs d x hidden multiply-adds instead of 2d x hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.config import ModelConfig

PAD_SCORE = -1e4  # score of a padded slot: sorts last and keeps the ONNX output finite


class Student(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.item_in = nn.Linear(2 * cfg.d_model, cfg.student_hidden)
        self.list_in = nn.Linear(2 * cfg.d_model, cfg.student_hidden, bias=False)
        self.out = nn.Sequential(nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.student_hidden, 1))

    def forward(self, x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B,L,d], u [B,d], mask bool [B,L] -> scores [B,L] (PAD_SCORE on padded slots)."""
        weight = mask.unsqueeze(-1).to(x.dtype)
        context = (x * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        w_x, w_xu = self.item_in.weight.chunk(2, dim=1)  # [hidden, d] each
        per_user = w_x + w_xu * u[:, None, :]  # [B, hidden, d]
        per_list = self.item_in.bias + self.list_in(torch.cat([u, context], dim=-1))
        hidden = x @ per_user.transpose(1, 2) + per_list[:, None]
        return self.out(hidden).squeeze(-1).masked_fill(~mask, PAD_SCORE)
