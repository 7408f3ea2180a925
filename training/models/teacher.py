"""PSAD-G, the semi-autoregressive teacher: fills the list B slots per decoding step.

A transformer encoder reads the candidate set. The decoder has one query per slot (rank r):
rank embedding + slot-in-block embedding + user, refined by attention over the items placed
in *earlier blocks* (each carrying the rank it was placed at); a pointer head scores every
candidate still available. Slot r of block t = r // B sees exactly the items of ranks < t*B.

Training runs all slots in one pass on the prefix of the teacher's own greedy permutation (the
placed set of every block is known from it, so the visibility mask above is block-causal): each
slot learns to pick a remaining clicked item in the states decoding actually reaches. Forcing the
label-sorted permutation instead places only clicked items before every supervised slot, a state
greedy decoding never reaches, and the decoded list fell below the initial order. Greedy
decoding runs ceil(L/B) network steps; inside a step slot j takes the best item not placed
before and not taken by slots < j of the same step (masking only, no extra network pass).
B = 1 is autoregressive, B >= L non-autoregressive, anything between semi-autoregressive.

With model.teacher_target = "shown" the same network is trained as a context-aware click model
instead: on the order each list was displayed in, slot r's pointer logit of the item shown at r is
its click logit given the items shown in earlier blocks (sigmoid cross-entropy on the logged
click). Clicks in an exploration log happened in that context, which the teacher's own lists never
were; greedy decoding then places, slot by slot, the item the learned click model rates highest
after what is already placed: the greedy oracle's rule, with learned instead of true effects.
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

    def pointer_keys(self, enc: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What every decoding step reuses: the scaled pointer keys [B,d,L] and the user term [B,1,d]."""
        return self.pointer_k(enc).transpose(1, 2) * self.pointer_scale, self.user(u)[:, None]

    def pointer_logits(
        self,
        enc: torch.Tensor,
        keys: tuple[torch.Tensor, torch.Tensor],
        item_rank: torch.Tensor,
        query_ranks: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [B,Q,L] of the slots at query_ranks [Q] over all candidates.

        keys: pointer_keys(enc, u). item_rank [B,L]: the rank each candidate is placed at (any
        value >= L if not placed); a slot of block t sees the candidates placed at ranks < t*B.
        """
        pointer_keys, user = keys
        block_start = torch.div(query_ranks, self.block_size, rounding_mode="floor") * self.block_size
        slot = (query_ranks - block_start).clamp(max=self.slot.num_embeddings - 1)
        q = self.rank(query_ranks.clamp(max=self.max_list - 1)) + self.slot(slot)
        q = q[None] + user  # [B,Q,d]
        placed = enc + self.rank(item_rank.clamp(max=self.max_list - 1))
        visible = item_rank[:, None, :] < block_start[None, :, None]  # [B,Q,L]
        q = q + self.context(self.context_norm(q), placed, visible)
        q = q + self.ffn(self.ffn_norm(q))
        return self.pointer_q(q) @ pointer_keys

    def loss(
        self, enc: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, prefix: torch.Tensor
    ) -> torch.Tensor:
        """Pointer loss of every slot that can still pick a relevant item, given what `prefix` placed.

        prefix [B,L] is the teacher's own greedy permutation (gradient stopped), so training sees the
        states decoding reaches. Slot r is right to pick any remaining candidate of the best remaining
        label: its loss is -log of their summed probability. Slots after the last positive item
        carry no loss: their only possible target is the initial order, and learning it teaches the
        teacher to copy the ranking stage. Mean over the supervised slots; 0 for lists without positives.
        """
        n, length = mask.shape
        ranks = torch.arange(length, device=mask.device)
        item_rank = torch.empty_like(prefix).scatter_(1, prefix, ranks.expand(n, -1))
        logits = self.pointer_logits(enc, self.pointer_keys(enc, u), item_rank, ranks)
        available = mask[:, None, :] & (item_rank[:, None, :] >= ranks[None, :, None])  # [B,slot,item]
        log_p = torch.log_softmax(logits.masked_fill(~available, UNAVAILABLE), dim=-1)
        best = torch.where(available, labels[:, None, :], -math.inf).amax(-1, keepdim=True)  # [B,slot,1]
        accepted = available & (labels[:, None, :] == best)
        nll = -torch.logsumexp(log_p.masked_fill(~accepted, UNAVAILABLE), dim=-1)
        supervised = best[..., 0] > 0
        return torch.where(supervised, nll, 0.0).sum() / supervised.sum().clamp(min=1)

    def click_logits(self, enc: torch.Tensor, u: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
        """[B,L]: slot r's logit for the item displayed at r, given the items displayed in earlier
        blocks (the click model of teacher_target "shown"). shown [B,L] is the candidate index at
        each displayed rank, padded candidates last."""
        n, length = shown.shape
        ranks = torch.arange(length, device=shown.device)
        item_rank = torch.empty_like(shown).scatter_(1, shown, ranks.expand(n, -1))
        logits = self.pointer_logits(enc, self.pointer_keys(enc, u), item_rank, ranks)  # [B,slot,item]
        return logits.gather(2, shown[..., None])[..., 0].clamp(-LOGIT_BOUND, LOGIT_BOUND)

    def click_loss(
        self, enc: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, shown: torch.Tensor
    ) -> torch.Tensor:
        """Sigmoid cross-entropy of click_logits against whether each displayed item was clicked;
        mean over valid slots."""
        logit = self.click_logits(enc, u, shown)
        clicked = (labels.gather(1, shown) > 0).to(logit.dtype)
        valid = mask.gather(1, shown)
        loss = F.binary_cross_entropy_with_logits(logit, clicked, reduction="none")
        return torch.where(valid, loss, 0.0).sum() / valid.sum().clamp(min=1)

    @torch.no_grad()
    def decode(self, enc: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Greedy block decoding -> perm [B,L] (valid candidates first, padded ones last)."""
        n, length = mask.shape
        keys = self.pointer_keys(enc, u)
        perm = torch.zeros(n, length, dtype=torch.long, device=mask.device)
        item_rank = torch.full((n, length), length, dtype=torch.long, device=mask.device)  # length = unplaced
        taken = torch.zeros(n, length, dtype=torch.bool, device=mask.device)
        self.last_decode_steps = 0
        for step in range(decode_steps(length, self.block_size)):
            start, end = step * self.block_size, min((step + 1) * self.block_size, length)
            ranks = torch.arange(start, end, device=mask.device)
            logits = self.pointer_logits(enc, keys, item_rank, ranks).clamp(-LOGIT_BOUND, LOGIT_BOUND)
            logits = logits.masked_fill(~mask[:, None, :], PADDED_PICK)
            picks = []
            for j in range(end - start):
                choice = logits[:, j].masked_fill(taken, -math.inf).argmax(-1, keepdim=True)  # [B,1]
                taken = taken.scatter(1, choice, True)
                picks.append(choice)
            block = torch.cat(picks, dim=1)  # [B, end - start]
            perm[:, start:end] = block
            item_rank.scatter_(1, block, ranks.expand(n, -1))
            self.last_decode_steps += 1
        return perm
