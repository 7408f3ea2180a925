"""Shared building blocks: item and user embeddings, and masked attention that never yields NaN.

PSAD and the baselines embed items and users the same way, so their comparisons measure the
reranking architecture, not the feature handling. Item side tables are persistent buffers: they
travel in the state dict and are baked into the ONNX graph, so the service only sends indices.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from export.contract.schema import OOV, FeatureSchema, NumericFeature
from training.models.config import ModelConfig
from training.models.sid import SidEncoder

MASKED_LOGIT = -1e4  # finite: a row with every key masked stays finite, then reads out zeros


def _standardiser(module: nn.Module, prefix: str, feats: tuple[NumericFeature, ...]) -> None:
    module.register_buffer(f"{prefix}_mean", torch.tensor([f.mean for f in feats], dtype=torch.float32))
    module.register_buffer(f"{prefix}_std", torch.tensor([f.std for f in feats], dtype=torch.float32))


def _projection(n_in: int, d: int) -> nn.Linear | None:
    """A linear map from n_in numerics to d, or None when there are none (no zero-width layers)."""
    return nn.Linear(n_in, d) if n_in else None


class ItemEmbedding(nn.Module):
    """Item index (+ per-impression candidate numerics) -> [.., d_model].

    model.item_encoder = "id": the sum of an id embedding, one embedding per item categorical feature
    (looked up in the baked item table), a projection of the standardised item numerics, and, for
    candidates, a projection of the standardised candidate numerics (e.g. the ranking stage's score).
    An item row the training period never saw (schema.known_items) is looked up as OOV, as a bundle,
    which knows only those items, serves it.
    model.item_encoder = "sid": the sum of the item's codes (sid.py), assigned from its content, plus
    the candidate numerics; other item side features are not read (a bundle holds no per-item table).

    model.item_ids = False drops the id embedding. Where many candidates at test time never appear
    in a training list (new hotels on trivago: docs/data.md), their ids keep their random initial
    embedding: noise on top of the features that do generalise, which docs/model.md measures.
    Without item side tables every item then embeds alike, and only candidate numerics and
    UPN's identity test (history_match) tell candidates apart.

    Served graphs read items through served() (a precomputed table, or the sid token lookup): the
    `served` argument of forward() and identity().
    """

    def __init__(self, cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor):
        super().__init__()
        d, n = cfg.d_model, schema.n_items
        n_cat, n_num = len(schema.item_categorical), len(schema.item_numeric)
        if tuple(item_cat.shape) != (n, n_cat):
            raise ValueError(f"item_cat has shape {tuple(item_cat.shape)}, expected (n_items={n}, {n_cat})")
        if tuple(item_num.shape) != (n, n_num):
            raise ValueError(f"item_num has shape {tuple(item_num.shape)}, expected (n_items={n}, {n_num})")
        for j, f in enumerate(schema.item_categorical):
            col = item_cat[:, j]
            if int(col.min()) < 0 or int(col.max()) >= f.cardinality:
                raise ValueError(f"item_cat column {f.name!r} has values outside [0, {f.cardinality})")
        if not torch.isfinite(item_num).all():
            raise ValueError("item_num has NaN or infinite values: fix the items table")
        self.d_model = d
        self.n_known = schema.n_known_items
        self.sid = SidEncoder(cfg, schema, item_cat, item_num) if cfg.item_encoder == "sid" else None
        side = self.sid is None
        self.ids = nn.Embedding(self.n_known, d, padding_idx=0) if side and cfg.item_ids else None
        self.cats = nn.ModuleList(
            nn.Embedding(f.cardinality, d, padding_idx=0) for f in (schema.item_categorical if side else ())
        )
        item_numeric = schema.item_numeric if side else ()
        mean = torch.tensor([f.mean for f in item_numeric], dtype=torch.float32)
        std = torch.tensor([f.std for f in item_numeric], dtype=torch.float32)
        self.register_buffer("item_cat", item_cat.to(torch.long).clone() if side else item_cat.new_zeros((n, 0)))
        self.register_buffer("item_num", ((item_num.to(torch.float32)[:, : len(mean)] - mean) / std).clone())
        self.item_num_proj = _projection(len(item_numeric), d)
        _standardiser(self, "cand_num", schema.candidate_numeric)
        self.cand_num_proj = _projection(len(schema.candidate_numeric), d)
        self.norm = nn.LayerNorm(d)

    def forward(
        self, items: torch.Tensor, cand_num: torch.Tensor | None = None, served: nn.Module | None = None
    ) -> torch.Tensor:
        """items: int64 [...] (indices; tokens when `served` is a sid lookup); cand_num: float32
        [..., n_candidate_numeric] or None (history items); served: served() for inference, or None."""
        x = served(items) if served is not None else self.lookup(items)
        if cand_num is not None and self.cand_num_proj is not None:
            x = x + self.cand_num_proj((cand_num - self.cand_num_mean) / self.cand_num_std)
        return self.norm(x)

    def lookup(self, items: torch.Tensor) -> torch.Tensor:
        """The per-item part (id + side tables, or the code sum), before candidate numerics and normalisation."""
        if self.sid is not None:
            return self.sid(items)
        items = self.known(items)
        x = self.ids(items) if self.ids is not None else self.item_num.new_zeros((*items.shape, self.d_model))
        if len(self.cats):
            cat = self.item_cat[items]
            for j, emb in enumerate(self.cats):
                x = x + emb(cat[..., j])
        if self.item_num_proj is not None:
            x = x + self.item_num_proj(self.item_num[items])
        return x

    def known(self, items: torch.Tensor) -> torch.Tensor:
        """Indices with the rows the training period never saw replaced by OOV."""
        return torch.where(items < self.n_known, items, OOV)

    def identity(self, items: torch.Tensor, served: nn.Module | None = None) -> torch.Tensor:
        """What tells two items apart as served: the index (unseen rows as OOV) or the sid token."""
        if served is not None:
            return served.identity(items)
        return self.sid.tokens(items) if self.sid is not None else self.known(items)

    def served_items(self, items: torch.Tensor) -> torch.Tensor:
        """Item indices of a data set -> what a bundle of this model serves for them (served()'s inputs)."""
        return self.sid.served_tokens(items) if self.sid is not None else self.known(items)

    def table(self) -> torch.Tensor:
        """lookup() of every known item [n_known, d]: what an "id" served graph gathers from."""
        return self.lookup(torch.arange(self.n_known, device=self.item_cat.device))

    def served(self) -> nn.Module:
        """The item lookup of a served graph, taken now (after training): the items' table, or the sid
        token lookup."""
        if self.sid is not None:
            return self.sid.served()
        with torch.no_grad():
            return TableLookup(self.table())


class TableLookup(nn.Module):
    """Item indices -> rows of a precomputed item table: one gather instead of one per side table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.clone())

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return F.embedding(items, self.table)

    def identity(self, items: torch.Tensor) -> torch.Tensor:
        return items


class UserEmbedding(nn.Module):
    """Static user features -> [batch, d_model]: a learned base vector + categorical embeddings
    + a projection of the standardised numerics.

    All categorical features share one table, each at its own offset, so the lookup is one
    gather and one sum whatever the number of features. Index 0 (missing) of every feature has
    a learned row: a cold-start user gets base + the missing rows, one learned vector.
    """

    def __init__(self, cfg: ModelConfig, schema: FeatureSchema):
        super().__init__()
        d = cfg.d_model
        sizes = [f.cardinality for f in schema.user_categorical]
        self.base = nn.Parameter(torch.randn(d) * 0.02)
        self.cats = nn.Embedding(sum(sizes), d) if sizes else None
        offsets = list(itertools.accumulate(sizes, initial=0))[:-1]  # where each feature's rows start
        self.register_buffer("cat_offsets", torch.tensor(offsets, dtype=torch.long))
        _standardiser(self, "user_num", schema.user_numeric)
        self.num_proj = _projection(len(schema.user_numeric), d)
        self.norm = nn.LayerNorm(d)

    def forward(self, user_cat: torch.Tensor, user_num: torch.Tensor) -> torch.Tensor:
        x = self.base.expand(user_cat.shape[0], -1)
        if self.cats is not None:
            x = x + self.cats(user_cat + self.cat_offsets).sum(1)
        if self.num_proj is not None:
            x = x + self.num_proj((user_num - self.user_num_mean) / self.user_num_std)
        return self.norm(x)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a boolean key mask and an optional additive logit bias.

    Masked keys get a finite logit and zero weight, so a query whose keys are all masked (or a
    zero-length key set) reads out zeros instead of NaN: padding never leaks and never poisons.
    mask=None is the fast path for callers whose bias already masks (MASKED_LOGIT) and whose
    every query sees at least one key (UPN's always-visible no-history slot): two ops fewer.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.scale = 1.0 / math.sqrt(d_model // n_heads)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query [B,Q,d], keys [B,K,d], mask bool [B,K] or [B,Q,K] (True = visible) or None,
        bias broadcastable to [B,heads,Q,K] -> [B,Q,d]."""
        h = self.n_heads
        q = self.q(query).unflatten(-1, (h, -1)).transpose(1, 2)  # [B,h,Q,dh]
        k, v = self.kv(keys).unflatten(-1, (2, h, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # [B,h,K,dh] each
        logits = (q @ k.transpose(-1, -2)) * self.scale
        if bias is not None:
            logits = logits + bias
        if mask is None:
            weights = F.softmax(logits, dim=-1)
        else:
            visible = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]).to(logits.dtype)
            weights = F.softmax(logits.masked_fill(visible == 0, MASKED_LOGIT), dim=-1) * visible
        return self.out((self.dropout(weights) @ v).transpose(1, 2).flatten(-2))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block over a padded set: x + attn(LN x), then x + FFN(LN x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, mask)
        return x + self.ffn(self.norm2(x))
