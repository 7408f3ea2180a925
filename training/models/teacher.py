"""PSAD-G, the semi-autoregressive teacher: fills the list B slots per decoding step.

A transformer encoder reads the candidate set. The decoder has one query per slot (rank r):
rank embedding + slot-in-block embedding + user, refined by attention over the items placed
in *earlier blocks* (each carrying the rank it was placed at); a pointer head scores every
candidate still available. Slot r of block t = r // B sees exactly the items of ranks < t*B.

Training (teacher forcing) runs all slots in one pass: the placed set of every block is known
from the target permutation, so the visibility mask above is a block-causal mask. Greedy
decoding runs ceil(L/B) network steps; inside a step slot j takes the best item not placed
before and not taken by slots < j of the same step (masking only, no extra network pass).
B = 1 is autoregressive, B >= L non-autoregressive, anything between semi-autoregressive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.models.config import ModelConfig
from training.models.embeddings import EncoderBlock, FeedForward, MultiHeadAttention

UNAVAILABLE = -1e9  # pointer logit of an item that may not be picked (finite: CE stays finite)
PADDED_PICK = -1e8  # padded candidates are placed only after every valid one
LOGIT_BOUND = 1e6  # real logits are clamped inside this, so a valid item always beats a padded one


def decode_steps(list_length: int, block_size: int) -> int:
    """Network passes of greedy decoding: ceil(L / B)."""
    return -(-list_length // block_size)


def label_permutation(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The teacher-forcing target: valid candidates by label descending, ties by initial
    position, then padded slots in index order. [B,L] -> perm[b, r] = candidate at rank r."""
    key = torch.where(mask, -labels, torch.full_like(labels, math.inf))
    return torch.sort(key, dim=-1, stable=True).indices


class Teacher(nn.Module):
    def __init__(self, cfg: ModelConfig, max_list: int):
        super().__init__()
        d = cfg.d_model
        self.block_size = cfg.block_size
        self.max_list = max_list
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.teacher_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.rank = nn.Embedding(max_list, d)
        self.slot = nn.Embedding(min(cfg.block_size, max_list), d)
        self.user = nn.Linear(d, d)
        self.context_norm = nn.LayerNorm(d)
        self.context = MultiHeadAttention(d, cfg.n_heads)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d)
        self.pointer_q = nn.Linear(d, d)
        self.pointer_k = nn.Linear(d, d)
        self.pointer_scale = 1.0 / math.sqrt(d)
        self.last_decode_steps = 0  # network passes of the latest decode() (tests and benchmarks read it)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.encoder_norm(x)

    def pointer_logits(
        self, enc: torch.Tensor, u: torch.Tensor, item_rank: torch.Tensor, query_ranks: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B,Q,L] of the slots at query_ranks [Q] over all candidates.

        item_rank [B,L]: the rank each candidate is placed at (any value >= L if not placed);
        a slot of block t sees the candidates placed at ranks < t*B.
        """
        block_start = torch.div(query_ranks, self.block_size, rounding_mode="floor") * self.block_size
        slot = (query_ranks - block_start).clamp(max=self.slot.num_embeddings - 1)
        q = self.rank(query_ranks.clamp(max=self.max_list - 1)) + self.slot(slot)
        q = q[None] + self.user(u)[:, None]  # [B,Q,d]
        placed = enc + self.rank(item_rank.clamp(max=self.max_list - 1))
        visible = item_rank[:, None, :] < block_start[None, :, None]  # [B,Q,L]
        q = q + self.context(self.context_norm(q), placed, visible)
        q = q + self.ffn(self.ffn_norm(q))
        return self.pointer_q(q) @ self.pointer_k(enc).transpose(1, 2) * self.pointer_scale

    def loss(
        self, enc: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, n_relevant: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced pointer cross-entropy over the slots that hold a relevant item.

        n_relevant [B,1]: the number of candidates with a positive label. The slots after them are
        not supervised: their target order is only the initial order (ties), and learning it would
        teach the teacher to copy the ranking stage instead of finding what the user clicks.
        """
        n, length = mask.shape
        ranks = torch.arange(length, device=mask.device)
        item_rank = torch.empty_like(target).scatter_(1, target, ranks.expand(n, -1))
        logits = self.pointer_logits(enc, u, item_rank, ranks)
        available = mask[:, None, :] & (item_rank[:, None, :] >= ranks[None, :, None])
        logits = logits.masked_fill(~available, UNAVAILABLE)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(n, length)
        valid_slot = ranks[None, :] < n_relevant
        return torch.where(valid_slot, ce, 0.0).sum() / valid_slot.sum().clamp(min=1)

    @torch.no_grad()
    def decode(self, enc: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Greedy block decoding -> perm [B,L] (valid candidates first, padded ones last)."""
        n, length = mask.shape
        perm = torch.zeros(n, length, dtype=torch.long, device=mask.device)
        item_rank = torch.full((n, length), length, dtype=torch.long, device=mask.device)  # length = unplaced
        rows = torch.arange(n, device=mask.device)
        self.last_decode_steps = 0
        for step in range(decode_steps(length, self.block_size)):
            ranks = torch.arange(step * self.block_size, min((step + 1) * self.block_size, length), device=mask.device)
            logits = self.pointer_logits(enc, u, item_rank, ranks).clamp(-LOGIT_BOUND, LOGIT_BOUND)
            logits = logits.masked_fill(~mask[:, None, :], PADDED_PICK)
            for j, rank in enumerate(ranks.tolist()):
                choice = logits[:, j].masked_fill(item_rank < length, -math.inf).argmax(-1)
                perm[:, rank] = choice
                item_rank[rows, choice] = rank
            self.last_decode_steps += 1
        return perm
