"""IntRR-style compact item identifiers: one token per item, its codes assigned from its content.

An item is the sum of one codebook vector per level (L levels of K codes). A recursive assignment
network (RAN) picks the codes: level l reads the item vector and the codebook vector chosen at level
l-1, and makes a straight-through hard choice (the forward pass uses the one-hot argmax, the
backward pass the softmax's gradient), so training scores exactly what serving scores.

The item vector is the item's content (the schema's item_content features) plus, for an item seen in
training, its ID embedding. The ID embedding is a training-time collaborative anchor: it lets items
with the same content take different codes, and the anchor loss pulls an item's code sum toward it
(and it toward the code sum, as VQ-VAE's commitment term). It is withheld with probability
sid_uid_dropout per item and step, and always for items never seen in training, so that the
content-only path a new item takes at serving time is trained as well. None of it is served: a bundle
holds the codebooks, each known item's codes, and the content-only assigner for new items.

Served token of an item: 0 = padding, 1 = OOV (no usable content: the codes of missing content),
2 + the codes read as one mixed-radix number (export.contract.content.sid_tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.contract.schema import N_RESERVED, OOV, PAD, FeatureSchema
from training.models.config import ModelConfig

ANCHOR_COMMITMENT = 0.25  # weight of the ID embedding's pull toward the codes, relative to the codes' pull


class ContentEncoder(nn.Module):
    """Raw content features -> [N, d]: categorical embeddings summed, plus a projection of the
    standardised numerics. The assigner of new items runs it, so it reads raw values."""

    def __init__(self, cfg: ModelConfig, schema: FeatureSchema):
        super().__init__()
        d = cfg.d_model
        self.cats = nn.ModuleList(nn.Embedding(f.cardinality, d, padding_idx=PAD) for f in schema.content_categorical)
        numeric = schema.content_numeric
        self.register_buffer("num_mean", torch.tensor([f.mean for f in numeric], dtype=torch.float32))
        self.register_buffer("num_std", torch.tensor([f.std for f in numeric], dtype=torch.float32))
        self.num_proj = nn.Linear(len(numeric), d) if numeric else None
        self.norm = nn.LayerNorm(d)

    def forward(self, content_cat: torch.Tensor, content_num: torch.Tensor) -> torch.Tensor:
        x = content_num.new_zeros((content_num.shape[0], self.norm.normalized_shape[0]))
        for j, emb in enumerate(self.cats):
            x = x + emb(content_cat[:, j])
        if self.num_proj is not None:
            x = x + self.num_proj((content_num - self.num_mean) / self.num_std)
        return self.norm(x)


class RecursiveAssignment(nn.Module):
    """Item vectors [N, d] -> codes [N, L] and the code sum [N, d] (straight-through while training).

    Level l maps [item vector, code vector chosen at l-1] to a query and scores its K codebook vectors
    by dot product (the nearest code wins, as in residual quantisation): logits from a free linear
    layer instead collapse every item onto one code at initialisation.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, levels, k = cfg.d_model, cfg.sid_levels, cfg.sid_codebook_size
        self.codebooks = nn.Parameter(torch.randn(levels, k, d) / levels**0.5)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d)) for _ in range(levels)
        )
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        previous, total, codes = torch.zeros_like(x), torch.zeros_like(x), []
        for codebook, level in zip(self.codebooks, self.levels, strict=True):
            logits = level(torch.cat([x, previous], dim=-1)) @ codebook.T * self.scale  # the nearest codes win
            code = logits.argmax(-1)
            if self.training:
                soft = logits.softmax(-1)
                choice = F.one_hot(code, soft.shape[-1]).to(soft.dtype) + soft - soft.detach()
                previous = choice @ codebook
            else:
                previous = codebook[code]
            total, codes = total + previous, [*codes, code]
        return torch.stack(codes, dim=-1), total


class SidEncoder(nn.Module):
    """Item indices -> code sums [..., d] (training and evaluation), plus what export needs:
    each known item's codes, the content-only assigner and the token lookup the served graph runs."""

    def __init__(self, cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor):
        super().__init__()
        if not schema.item_content:
            raise ValueError(
                'model.item_encoder = "sid" assigns codes from the items\' content, and this data set declares '
                "none (schema.item_content is empty): rebuild it with content features (docs/data.md) or train "
                'with item_encoder = "id"'
            )
        cat_cols = [j for j, f in enumerate(schema.item_categorical) if f.name in schema.item_content]
        num_cols = [j for j, f in enumerate(schema.item_numeric) if f.name in schema.item_content]
        self.cfg = cfg
        self.n_known = schema.n_known_items
        self.levels, self.codebook_size = cfg.sid_levels, cfg.sid_codebook_size
        self.register_buffer("content_cat", item_cat[:, cat_cols].to(torch.long).clone())
        self.register_buffer("content_num", item_num[:, num_cols].to(torch.float32).clone())
        self.content = ContentEncoder(cfg, schema)
        self.uid = nn.Embedding(self.n_known, cfg.d_model, padding_idx=PAD)
        self.assign = RecursiveAssignment(cfg)

    @property
    def codebooks(self) -> nn.Parameter:
        return self.assign.codebooks

    def _vectors(self, items: torch.Tensor, uid_dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Item vectors of unique indices [U] (content + ID when known and not dropped), and the IDs' mask."""
        x = self.content(self.content_cat[items], self.content_num[items])
        known = (items >= N_RESERVED) & (items < self.n_known)
        if uid_dropout:
            known = known & (torch.rand(items.shape, device=items.device) >= uid_dropout)
        uid = self.uid(torch.where(known, items, PAD))
        return x + uid * known[:, None].to(x.dtype), known

    def _assign(self, items: torch.Tensor, uid_dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes [U, L] and code sums [U, d] of the unique items in `items`, and the inverse index."""
        unique, inverse = torch.unique(items, return_inverse=True)
        x, _ = self._vectors(unique, uid_dropout)
        codes, total = self.assign(x)
        return codes, total, inverse

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        _, total, inverse = self._assign(items, self.cfg.sid_uid_dropout if self.training else 0.0)
        return total[inverse]

    def tokens(self, items: torch.Tensor) -> torch.Tensor:
        """The served token of each item index (its codes with its ID when known, as a bundle stores
        them): what the history match compares, so that training matches items as serving does."""
        codes, _, inverse = self._assign(items, 0.0)
        tokens = codes_to_tokens(codes, self.codebook_size)[inverse]
        return torch.where(items < N_RESERVED, items, tokens)  # padding and OOV keep their meaning

    def anchor_loss(self, items: torch.Tensor) -> torch.Tensor:
        """The UID anchor over the known items among `items`: code sum <-> ID embedding."""
        unique = torch.unique(items)
        unique = unique[(unique >= N_RESERVED) & (unique < self.n_known)]
        if not len(unique):
            return self.codebooks.new_zeros(())
        x, _ = self._vectors(unique, 0.0)
        _, total = self.assign(x)
        uid = self.uid(unique)
        return F.mse_loss(total, uid.detach()) + ANCHOR_COMMITMENT * F.mse_loss(uid, total.detach())

    @torch.no_grad()
    def known_codes(self) -> torch.Tensor:
        """int64 [n_known, L]: row 0 padding (zeros), row 1 OOV (the codes of missing content), then
        each item seen in training, with its ID: what a bundle's item_codes.npy holds."""
        was = self.training
        self.eval()
        try:
            x, _ = self._vectors(torch.arange(self.n_known, device=self.content_cat.device), 0.0)
            codes, _ = self.assign(x)
        finally:
            self.train(was)
        codes[PAD] = 0
        return codes

    def assigner(self) -> nn.Module:
        return Assigner(self)

    @torch.no_grad()
    def served_tokens(self, items: torch.Tensor) -> torch.Tensor:
        """What a bundle serves for each item index: a known item's token from its stored codes, a
        later one's (a row >= n_known) from its content through the assigner; padding and OOV as is."""
        known = codes_to_tokens(self.known_codes(), self.codebook_size)
        flat = items.flatten()
        content = codes_to_tokens(self.assigner()(self.content_cat[flat], self.content_num[flat]), self.codebook_size)
        tokens = torch.where(items < self.n_known, known[items.clamp(max=self.n_known - 1)], content.view(items.shape))
        return torch.where(items < N_RESERVED, items, tokens)

    def served(self) -> nn.Module:
        return TokenLookup(self.codebooks.detach(), self.known_codes()[OOV])


class Assigner(nn.Module):
    """Raw content -> codes [N, L], content only (no ID): a new item's codes. Exported as assign.onnx."""

    def __init__(self, sid: SidEncoder):
        super().__init__()
        self.content = sid.content
        self.assign = sid.assign

    def forward(self, content_cat: torch.Tensor, content_num: torch.Tensor) -> torch.Tensor:
        return self.assign(self.content(content_cat, content_num))[0]


class TokenLookup(nn.Module):
    """Served tokens [...] -> code sums [..., d]: the only item state a sid graph holds (the codebooks)."""

    def __init__(self, codebooks: torch.Tensor, oov_codes: torch.Tensor):
        super().__init__()
        levels, k, d = codebooks.shape
        self.codebook_size = k
        self.register_buffer("flat", codebooks.reshape(levels * k, d).clone())
        self.register_buffer("offsets", torch.arange(levels) * k)
        self.register_buffer("radix", k ** torch.arange(levels - 1, -1, -1))
        self.register_buffer("oov_codes", oov_codes.clone())

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] -> codes [..., L]; OOV -> the codes of missing content, padding -> zeros."""
        number = (tokens - N_RESERVED).clamp(min=0)[..., None]
        codes = torch.remainder(torch.div(number, self.radix, rounding_mode="floor"), self.codebook_size)
        return torch.where((tokens == OOV)[..., None], self.oov_codes, codes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Padding is masked wherever items are read, so its vector (that of codes 0) is never zeroed."""
        return F.embedding(self.codes(tokens) + self.offsets, self.flat).sum(-2)

    def identity(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def codes_to_tokens(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """codes [..., L] -> tokens [...]: 2 + the codes as one base-K number (as sid_tokens in numpy)."""
    levels = codes.shape[-1]
    radix = codebook_size ** torch.arange(levels - 1, -1, -1, device=codes.device)
    return N_RESERVED + (codes * radix).sum(-1)


def find_sid(model: nn.Module) -> SidEncoder | None:
    """The model's SidEncoder (one per model: every part shares one ItemEmbedding), or None for "id"."""
    return next((m for m in model.modules() if isinstance(m, SidEncoder)), None)


def with_anchor(model: nn.Module, inputs: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> dict:
    """A model's training losses plus, for "sid", the weighted UID anchor over the batch's items
    (candidates and history), added to "loss" and reported as "anchor"."""
    sid = find_sid(model)
    if sid is None or not sid.cfg.sid_anchor_weight:
        return losses
    items = torch.cat([inputs["cand_items"][inputs["cand_mask"]], inputs["hist_items"][inputs["hist_mask"]]])
    anchor = sid.cfg.sid_anchor_weight * sid.anchor_loss(items)
    return {**losses, "loss": losses["loss"] + anchor, "anchor": anchor}
