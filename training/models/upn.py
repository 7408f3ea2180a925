"""UPN, the User Profile Network: personalises every candidate's representation.

  user vector   u = LN(user features + time-aware attention of the user over its history)
  read-out      r_i = time-aware attention of candidate i over the history
  gate          g = 2 sigmoid(W_g u)                   (personalised gate, starts at 1)
  position      p_i = P[i] * 2 sigmoid(W_p u)           (user-conditioned initial-position code)
  candidate     x_i = LN(c_i * g + r_i + p_i)

Time-aware attention subtracts softplus(w_h) * log1p(age in days) from each head's logits: a
learned decay of old behaviours (interest dynamics). A learned "no history" memory slot is
always visible, so an empty or zero-length history reads out that slot instead of NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.models.config import ModelConfig
from training.models.embeddings import ItemEmbedding, MultiHeadAttention, UserEmbedding
from training.schema import FeatureSchema


class TimeAwareAttention(nn.Module):
    """Queries attend to [no-history slot; behaviours] with a learned per-head decay on age."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        init = max(cfg.time_decay_init, 1e-4)
        self.decay = nn.Parameter(torch.full((cfg.n_heads,), math.log(math.expm1(init))))  # softplus^-1
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, age: torch.Tensor):
        """query [B,Q,d]; memory [B,H+1,d]; mask bool [B,H+1]; age float [B,H+1] days."""
        bias = -F.softplus(self.decay)[None, :, None, None] * torch.log1p(age.clamp(min=0))[:, None, None, :]
        return self.attn(query, memory, mask, bias)


class UPN(nn.Module):
    """(the 9 model inputs) -> candidate reps x [B,L,d] and user vector u [B,d]."""

    def __init__(self, cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.max_list = schema.max_list
        self.items = ItemEmbedding(cfg, schema, item_cat, item_num)
        self.user = UserEmbedding(cfg, schema)
        self.positions = nn.Embedding(schema.max_list, d) if cfg.position_encoding else None
        if cfg.use_upn:
            self.actions = nn.Embedding(schema.n_actions, d, padding_idx=0)
            self.no_history = nn.Parameter(torch.randn(d) * 0.02)
            self.user_read = TimeAwareAttention(cfg)
            self.cand_read = TimeAwareAttention(cfg)
            self.user_norm = nn.LayerNorm(d)
            self.gate = nn.Linear(d, d)
            self.position_gate = nn.Linear(d, d)
            for layer in (self.gate, self.position_gate):  # gates start at 2 sigmoid(0) = 1: identity
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.norm = nn.LayerNorm(d)

    def forward(
        self,
        user_cat: torch.Tensor,
        user_num: torch.Tensor,
        hist_items: torch.Tensor,
        hist_actions: torch.Tensor,
        hist_age: torch.Tensor,
        hist_mask: torch.Tensor,
        cand_items: torch.Tensor,
        cand_num: torch.Tensor,
        cand_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.user(user_cat, user_num)
        x = self.items(cand_items, cand_num)
        position_scale = 1.0
        if self.cfg.use_upn:
            memory, mask, age = self._memory(hist_items, hist_actions, hist_age, hist_mask)
            u = self.user_norm(u + self.user_read(u[:, None], memory, mask, age)[:, 0])
            x = x * (2 * torch.sigmoid(self.gate(u)))[:, None] + self.cand_read(x, memory, mask, age)
            position_scale = (2 * torch.sigmoid(self.position_gate(u)))[:, None]
        if self.positions is not None:
            index = torch.arange(cand_items.shape[1], device=cand_items.device).clamp(max=self.max_list - 1)
            x = x + self.positions(index)[None] * position_scale
        return self.norm(x), u

    def _memory(self, hist_items, hist_actions, hist_age, hist_mask):
        """History as attention memory, with the always-visible no-history slot prepended."""
        h = self.items(hist_items) + self.actions(hist_actions)
        batch = hist_mask.shape[0]
        memory = torch.cat([self.no_history.expand(batch, 1, -1), h], dim=1)
        mask = torch.cat([hist_mask.new_ones(batch, 1), hist_mask], dim=1)
        age = torch.cat([hist_age.new_zeros(batch, 1), hist_age], dim=1)
        return memory, mask, age
