"""Baseline rerankers that PSAD is compared with: DNN (pointwise), PRM (transformer), DLCM (GRU),
SetRank (permutation-invariant self-attention).

Same inputs as PSAD, so the comparison is about the architecture, not the features:
every baseline embeds candidates with the shared ItemEmbedding (item id, item side tables,
candidate numerics such as the ranking stage's score), adds a learned embedding of the
candidate's initial position (all but SetRank), and builds a personal vector u from the shared
UserEmbedding plus a mean-pooled history (the history items' embeddings averaged over hist_mask).
That is the user information PSAD-S reads through UPN without its time decay, actions, attention
read-out and gates; PRM's paper uses a pre-trained personalised vector, which the pooled history
stands in for.
With model.history_match, each candidate also gets UPN's repeat features (upn.HistoryMatch: counts
by action and recency of the user's behaviours on this very item), so a history-reading input
stays the same for every architecture. Otherwise hist_actions and hist_age are accepted (one
serving signature for every model) but not read.

  dnn   pointwise MLP([x_i, u, x_i * u]), sigmoid cross-entropy on labels / max_label
  prm   Linear([x_i, u]) + position -> transformer encoder (teacher_layers blocks) -> Linear;
        listwise softmax cross-entropy (the PRM paper's loss)
  dlcm  GRU over [x_i, u] in the initial order; the final state s (last real candidate) scores
        every output: v . (o_i * tanh(W s)) (DLCM's local ranking function); listwise softmax CE.
        The GRU always runs schema.max_list steps (the list is zero-padded to it): the ONNX exporter
        unrolls recurrences, and a fixed length keeps the list axis dynamic (L <= max_list).
  setrank  PRM without the initial position (Pang et al., SIGIR 2020): self-attention blocks over the
        candidate SET, so permuting the candidates permutes the scores; listwise softmax CE (SetRank's
        attention rank loss with linear gains). The ranking-stage score still enters as a numeric.
        Induced set attention (SetRank's IMSAB, m inducing points to cut the O(L^2) attention to
        O(L m)) is left out: the plain self-attention stack (MSAB) keeps the model one PRM flag away.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from export.contract.schema import FeatureSchema, ModelInputs
from training.models import losses
from training.models.config import ModelConfig
from training.models.embeddings import EncoderBlock, ItemEmbedding, UserEmbedding
from training.models.reranker import Reranker
from training.models.sid import with_anchor
from training.models.student import PAD_SCORE
from training.models.upn import HistoryMatch


class PersonalCandidates(nn.Module):
    """The baselines' shared input: candidate reps x [B,L,d] (with the initial position when
    `positional`) and u [B,d]."""

    def __init__(
        self,
        cfg: ModelConfig,
        schema: FeatureSchema,
        item_cat: torch.Tensor,
        item_num: torch.Tensor,
        positional: bool = True,
    ):
        super().__init__()
        d = cfg.d_model
        self.max_list = schema.max_list
        self.items = ItemEmbedding(cfg, schema, item_cat, item_num)
        self.user = UserEmbedding(cfg, schema)
        self.history = nn.Linear(d, d)
        self.user_norm = nn.LayerNorm(d)
        self.positions = nn.Embedding(schema.max_list, d) if positional else None
        self.match = HistoryMatch(cfg, schema) if cfg.history_match else None

    def forward(
        self, inputs: ModelInputs[torch.Tensor], served: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """served: ItemEmbedding.served() for inference (the inputs hold what a bundle serves), or None."""
        weight = inputs.hist_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.items(inputs.hist_items, served=served) * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        u = self.user_norm(self.user(inputs.user_cat, inputs.user_num) + self.history(pooled))
        x = self.items(inputs.cand_items, inputs.cand_num, served)
        if self.match is not None:
            x = x + self.match(inputs, partial(self.items.identity, served=served))
        if self.positions is None:
            return x, u
        length = inputs.cand_items.shape[1]
        index = torch.arange(length, device=inputs.cand_items.device).clamp(max=self.max_list - 1)
        return x + self.positions(index)[None], u


class Baseline(Reranker):
    """A scorer: subclasses define `head(x, u, mask) -> raw scores [B,L]` and `label_loss`, and
    set `positional = False` to be blind to the initial order."""

    positional = True

    def __init__(self, cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.max_label = schema.max_label
        self.inputs = PersonalCandidates(cfg, schema, item_cat, item_num, self.positional)

    def head(self, x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def label_loss(self, scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return losses.listwise_softmax_loss(scores, labels, mask)

    def score(self, inputs: ModelInputs[torch.Tensor], served: nn.Module | None = None) -> torch.Tensor:
        """Scores [B,L] (PAD_SCORE on padded slots); served: as PersonalCandidates.forward."""
        x, u = self.inputs(inputs, served)
        return self.head(x, u, inputs.cand_mask).masked_fill(~inputs.cand_mask, PAD_SCORE)

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        return with_anchor(
            self, inputs, {"loss": self.label_loss(self.rank_scores(inputs), labels, inputs["cand_mask"])}
        )

    def rank_scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.score(ModelInputs.from_batch(inputs))

    def serving_module(self) -> nn.Module:
        return Serving(self)


class Serving(nn.Module):
    """Positional inputs (ModelInputs order) -> scores: what export writes to ONNX; shares parameters,
    plus a snapshot of the served item lookup (build it after training)."""

    def __init__(self, model: Baseline):
        super().__init__()
        self.model = model
        self.items = model.inputs.items.served()

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model.score(ModelInputs(*tensors), self.items)


class DNN(Baseline):
    def __init__(self, cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor):
        super().__init__(cfg, schema, item_cat, item_num)
        self.mlp = nn.Sequential(
            nn.Linear(3 * cfg.d_model, cfg.student_hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.student_hidden, 1),
        )

    def head(self, x, u, mask):
        user = u[:, None].expand_as(x)
        return self.mlp(torch.cat([x, user, x * user], dim=-1)).squeeze(-1)

    def label_loss(self, scores, labels, mask):
        return losses.bce_loss(scores, labels / self.max_label, mask)


class PRM(Baseline):
    def __init__(self, cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor):
        super().__init__(cfg, schema, item_cat, item_num)
        d = cfg.d_model
        self.join = nn.Linear(2 * d, d)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(max(cfg.teacher_layers, 1)))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 1)

    def head(self, x, u, mask):
        h = self.join(torch.cat([x, u[:, None].expand_as(x)], dim=-1))
        for block in self.blocks:
            h = block(h, mask)
        return self.out(self.norm(h)).squeeze(-1)


class DLCM(Baseline):
    def __init__(self, cfg: ModelConfig, schema: FeatureSchema, item_cat: torch.Tensor, item_num: torch.Tensor):
        super().__init__(cfg, schema, item_cat, item_num)
        d = cfg.d_model
        self.max_list = schema.max_list
        self.gru = nn.GRU(2 * d, d, batch_first=True)
        self.state = nn.Linear(d, d)
        self.v = nn.Linear(d, 1, bias=False)

    def head(self, x, u, mask):
        length = x.shape[1]
        steps = F.pad(torch.cat([x, u[:, None].expand_as(x)], dim=-1), (0, 0, 0, self.max_list - length))
        outputs, _ = self.gru(steps)  # causal: padding (at the end) never reaches a real candidate
        outputs = outputs[:, :length]
        last = (mask.sum(1) - 1).clamp(min=0)
        s = outputs.gather(1, last[:, None, None].expand(-1, 1, outputs.shape[-1]))  # [B,1,d]
        return self.v(outputs * torch.tanh(self.state(s))).squeeze(-1)


class SetRank(PRM):
    """PRM's encoder over the candidates as a set: no initial position anywhere (see the module doc)."""

    positional = False


BASELINES: dict[str, type[Baseline]] = {"dnn": DNN, "prm": PRM, "dlcm": DLCM, "setrank": SetRank}
