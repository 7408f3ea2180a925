"""UPN, the User Profile Network: personalises every candidate's representation.

  user vector   u = LN(user features + time-aware attention of the user over its history)
  read-out      r_i = time-aware attention of candidate i over the history
  gate          g = 2 sigmoid(W_g u)                   (personalised gate, starts at 1)
  position      p_i = P[i] * 2 sigmoid(W_p u)           (user-conditioned initial-position code)
  repeats       m_i = W_m [log1p(n_ia) per action a, 1 / (1 + days since the last),
                           1 / (1 + behaviours since the last)]                   (history_match)
  candidate     x_i = LN(c_i * g + r_i + m_i + p_i)

Time-aware attention subtracts softplus(w_h) * log1p(age in days) from each head's logits: a
learned decay of old behaviours (interest dynamics). Both read-outs share one key/value
projection of the history (one memory, two readers with their own queries and decays). A
learned "no history" memory slot is always visible, so an empty or zero-length history reads
out that slot instead of NaN.

The repeat features m_i test item identity: n_ia counts the behaviours of action a on candidate i's
own item. Attention finds a repeat only where training taught an item's key to match its own
query, which an item first seen after training never learns; an equality test needs no learning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from export.contract.schema import OOV, FeatureSchema, ModelInputs
from training.models.config import ModelConfig
from training.models.embeddings import MASKED_LOGIT, ItemEmbedding, UserEmbedding

NEVER = 1e9  # days since the last behaviour on an item the history does not hold


class Memory(NamedTuple):
    """The history as attention memory, projected once and read by both read-outs.

    Keys and values are split into heads; the padding mask and the ages enter as additive
    logit terms. Slot 0 is the always-visible no-history slot."""

    keys_t: torch.Tensor  # [B,h,dh,H+1]: keys, transposed for q @ k^T
    values: torch.Tensor  # [B,h,H+1,dh]
    mask_bias: torch.Tensor  # [B,1,1,H+1]: 0 where visible, MASKED_LOGIT on padding
    log_age: torch.Tensor  # [B,1,1,H+1]: log1p(age in days)


class TimeAwareAttention(nn.Module):
    """Queries attend to the history memory with a learned per-head decay on age."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        init = max(cfg.time_decay_init, 1e-4)
        self.n_heads = cfg.n_heads
        self.scale = 1.0 / math.sqrt(cfg.d_model // cfg.n_heads)
        self.decay = nn.Parameter(torch.full((cfg.n_heads,), math.log(math.expm1(init))))  # softplus^-1
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, query: torch.Tensor, memory: Memory) -> torch.Tensor:
        """query [B,Q,d] -> [B,Q,d]."""
        q = self.q(query).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # [B,h,Q,dh]
        bias = memory.mask_bias - F.softplus(self.decay)[None, :, None, None] * memory.log_age
        weights = self.dropout(F.softmax((q @ memory.keys_t) * self.scale + bias, dim=-1))
        return self.out((weights @ memory.values).transpose(1, 2).flatten(-2))


class HistoryMatch(nn.Module):
    """Per candidate: how often, by action, and how recently the user acted on this very item."""

    def __init__(self, cfg: ModelConfig, schema: FeatureSchema):
        super().__init__()
        self.n_actions = schema.n_actions
        self.proj = nn.Linear(schema.n_actions + 2, cfg.d_model)

    def forward(
        self, inputs: ModelInputs[torch.Tensor], identity: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """identity: what tells items apart (ItemEmbedding.identity); None = the inputs as given (served)."""
        cand, hist = (
            (inputs.cand_items, inputs.hist_items)
            if identity is None
            else map(identity, (inputs.cand_items, inputs.hist_items))
        )
        return self.proj(self.features(cand, hist, inputs.hist_actions, inputs.hist_age, inputs.hist_mask))

    def features(self, cand_items, hist_items, hist_actions, hist_age, hist_mask) -> torch.Tensor:
        """[B,L] candidates against the [B,H] history (oldest first) -> [B,L,A+2]: log1p counts per
        action, 1 / (1 + days since the last) and 1 / (1 + known behaviours since the last). The
        count of behaviours since orders a session's items, whose ages in days all round to about 0.
        OOV and padded behaviours match nothing and are not counted (an item unknown to the bundle
        says nothing about recency among known ones); a candidate never acted on gets zero counts
        and recencies of 1 / (1 + 1e9)."""
        known = hist_mask & (hist_items > OOV)
        same = (cand_items[:, :, None] == hist_items[:, None, :]) & known[:, None, :]  # [B,L,H]
        actions = torch.arange(self.n_actions, device=hist_actions.device)
        by_action = (hist_actions[..., None] == actions).to(hist_age.dtype)  # [B,H,A]
        counts = same.to(hist_age.dtype) @ by_action  # [B,L,A]
        known_f = known.to(hist_age.dtype)
        since = known_f.sum(-1, keepdim=True) - known_f.cumsum(-1)  # [B,H]: known behaviours after slot j
        recency = [
            1.0 / (1.0 + F.pad(torch.where(same, x[:, None, :], NEVER), (0, 1), value=NEVER).amin(dim=-1))
            for x in (hist_age.clamp(min=0.0), since)  # the extra slot keeps an empty history defined
        ]
        return torch.cat([torch.log1p(counts), torch.stack(recency, dim=-1)], dim=-1)


class UPN(nn.Module):
    """The model inputs (ModelInputs order) -> candidate reps x [B,L,d] and user vector u [B,d]."""

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
            self.memory_kv = nn.Linear(d, 2 * d)
            self.user_read = TimeAwareAttention(cfg)
            self.cand_read = TimeAwareAttention(cfg)
            self.user_norm = nn.LayerNorm(d)
            self.gate = nn.Linear(d, d)
            self.position_gate = nn.Linear(d, d)
            for layer in (self.gate, self.position_gate):  # gates start at 2 sigmoid(0) = 1: identity
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.match = HistoryMatch(cfg, schema) if cfg.use_upn and cfg.history_match else None
        self.norm = nn.LayerNorm(d)

    def forward(self, *tensors: torch.Tensor, served: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tensors: the model inputs, positionally; served: ItemEmbedding.served() for inference (the
        inputs then hold what a bundle serves), or None (training)."""
        inputs = ModelInputs(*tensors)
        u = self.user(inputs.user_cat, inputs.user_num)
        x = self.items(inputs.cand_items, inputs.cand_num, served)
        position_scale = 1.0
        if self.cfg.use_upn:
            memory = self._memory(inputs, served)
            u = self.user_norm(u + self.user_read(u[:, None], memory)[:, 0])
            x = x * (2 * torch.sigmoid(self.gate(u)))[:, None] + self.cand_read(x, memory)
            if self.match is not None:
                x = x + self.match(inputs, partial(self.items.identity, served=served))
            position_scale = (2 * torch.sigmoid(self.position_gate(u)))[:, None]
        if self.positions is not None:
            length = inputs.cand_items.shape[1]
            index = torch.arange(length, device=inputs.cand_items.device).clamp(max=self.max_list - 1)
            x = x + self.positions(index)[None] * position_scale
        return self.norm(x), u

    def _memory(self, inputs: ModelInputs[torch.Tensor], served: nn.Module | None) -> Memory:
        h = self.items(inputs.hist_items, served=served) + self.actions(inputs.hist_actions)
        batch, heads = inputs.hist_mask.shape[0], self.cfg.n_heads
        slots = torch.cat([self.no_history.expand(batch, 1, -1), h], dim=1)
        k, v = self.memory_kv(slots).unflatten(-1, (2, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # [B,h,H+1,dh]
        mask = torch.cat([inputs.hist_mask.new_ones(batch, 1), inputs.hist_mask], dim=1)
        age = torch.cat([inputs.hist_age.new_zeros(batch, 1), inputs.hist_age], dim=1)
        mask_bias = torch.where(mask, 0.0, MASKED_LOGIT).to(slots.dtype)[:, None, None, :]
        return Memory(k.transpose(-1, -2), v, mask_bias, torch.log1p(age.clamp(min=0))[:, None, None, :])
