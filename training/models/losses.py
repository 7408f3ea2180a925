"""Loss functions of PSAD: pure functions of scores, labels, permutations and masks.

Every function takes a bool mask [B,L] (True = real candidate) and ignores padded slots, and
stays finite on lists without positives or with a single candidate. Formulas: docs/model.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1e9  # logit of a padded slot inside a softmax (finite, so 0 * NEG stays 0)


def masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(scores.masked_fill(~mask, NEG), dim=-1)


def listwise_softmax_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy against the target p_i = y_i / sum_j y_j over valid candidates.

    Averaged over the lists that have a positive; a list without one contributes 0.
    """
    gains = torch.where(mask, labels.clamp(min=0), 0.0)
    total = gains.sum(-1, keepdim=True)
    per_list = -(gains / total.clamp(min=1e-12) * masked_log_softmax(scores, mask)).sum(-1)
    return per_list.sum() / (total > 0).sum().clamp(min=1)


def bce_loss(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pointwise sigmoid cross-entropy, targets in [0, 1], averaged over valid candidates."""
    per_item = F.binary_cross_entropy_with_logits(scores, targets.clamp(0, 1), reduction="none")
    return torch.where(mask, per_item, 0.0).sum() / mask.sum().clamp(min=1)


def position_weights(length: int, top_k: int, device: torch.device | None = None) -> torch.Tensor:
    """w_r = 1 / log2(r + 2) for ranks r = 0..length-1 (DCG discount), 0 beyond top_k if top_k > 0."""
    r = torch.arange(length, device=device, dtype=torch.float32)
    w = 1.0 / torch.log2(r + 2.0)
    return torch.where(r < top_k, w, 0.0) if top_k > 0 else w


def listwise_distill_loss(scores: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """Position-weighted Plackett-Luce negative log-likelihood of the teacher's permutation.

    term_r = logsumexp_{r' >= r} s_{pi_r'} - s_{pi_r}: choosing the teacher's item at rank r
    among those it had not placed yet. Weighted by position_weights, normalised per list,
    averaged over lists. `perm` must list valid candidates first (teacher decoding does).
    """
    s = scores.gather(1, perm)
    valid = mask.gather(1, perm)
    s = s.masked_fill(~valid, NEG)
    remaining = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    w = torch.where(valid, position_weights(perm.shape[1], top_k, perm.device), 0.0)
    per_list = (w * (remaining - s)).sum(-1) / w.sum(-1).clamp(min=1e-12)
    return per_list.mean()


def rd_static_weights(k: int, lam: float, device: torch.device | None = None) -> torch.Tensor:
    """RD's static weights w_r = exp(-r/lambda) / sum_{r'=1..K} exp(-r'/lambda), r = 1..K."""
    w = torch.exp(-torch.arange(1, k + 1, device=device, dtype=torch.float32) / lam)
    return w / w.sum()


def student_ranks(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based rank of each candidate in the student's order among the valid ones [B,L]."""
    above = (scores[:, None, :] > scores[:, :, None]) & mask[:, None, :]
    return above.sum(-1) + 1


def rd_weights(
    scores: torch.Tensor,
    perm: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    lam: float,
    mu: float | None = None,
) -> torch.Tensor:
    """Detached weights [B,K'] (K' = min(K, L)) of the teacher's top-K items.

    Static RD weights, zero on padded ranks; with mu, times the dynamic weight
    max(0, tanh(mu (rank_student(pi_r) - r))) and renormalised to sum 1 per list, so items the
    student already ranks high stop pulling and the teacher term keeps its scale.
    """
    top = perm[:, : min(k, perm.shape[1])]
    w = rd_static_weights(k, lam, scores.device)[: top.shape[1]] * mask.gather(1, top)
    if mu is not None:
        r = torch.arange(1, top.shape[1] + 1, device=scores.device)
        rank = student_ranks(scores.detach(), mask).gather(1, top)
        w = w * torch.tanh(mu * (rank - r)).clamp(min=0)
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return w.detach()


def rd_distill_loss(scores: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """RD's teacher term alpha * sum_r w_r (-log sigmoid(s_{pi_r})), averaged over lists.

    RD's label part (-log sigmoid on positives, -log(1 - sigmoid) on negatives) is the student
    label loss with student_loss="bce"; the two together are the full RD loss.
    """
    s = scores.gather(1, perm[:, : weights.shape[1]])
    return alpha * (weights * F.softplus(-s)).sum(-1).mean()
