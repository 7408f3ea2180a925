"""How far the student's order S agrees with the teacher's order T on one list (docs/shadow.md).

S and T are permutations of the n candidates (candidate indices, best first). The teacher is the
reference: NDCG grades the student's top k against relevances the teacher's order gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Agreement:
    kendall_tau: float
    topk_overlap: float
    ndcg: float
    first_agree: bool


def order_by_scores(scores: np.ndarray) -> np.ndarray:
    """Candidate indices by descending score; ties keep request order (a stable sort, as the service ranks)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").astype(np.int32)


def ranks(order: np.ndarray) -> np.ndarray:
    """0-based rank of each candidate in `order` (the inverse permutation)."""
    out = np.empty(len(order), dtype=np.int64)
    out[np.asarray(order)] = np.arange(len(order))
    return out


def kendall_tau(s: np.ndarray, t: np.ndarray) -> float:
    """(concordant - discordant) / (n(n-1)/2) over all pairs (no ties in a permutation); 1.0 for n = 1."""
    n = len(s)
    if n < 2:
        return 1.0
    seq = ranks(t)[np.asarray(s)]  # the teacher's rank of each item, in the student's order
    discordant = int(np.count_nonzero(np.triu(seq[:, None] > seq[None, :], 1)))
    pairs = n * (n - 1) // 2
    return (pairs - 2 * discordant) / pairs


def topk_overlap(s: np.ndarray, t: np.ndarray, k: int) -> float:
    """|S[:k] ∩ T[:k]| / k."""
    return len(np.intersect1d(s[:k], t[:k])) / k


def ndcg(s: np.ndarray, t: np.ndarray, k: int) -> float:
    """NDCG@k of S, an item's relevance being k - its 0-based rank in T when that is < k, else 0."""
    relevance = np.maximum(k - ranks(t), 0)
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    ideal = float((k - np.arange(k)) @ discount)
    return float(relevance[np.asarray(s[:k])] @ discount) / ideal


def agreement(s: np.ndarray, t: np.ndarray, k: int) -> Agreement:
    """All four measures; k is clipped to the list's length."""
    if len(s) != len(t) or len(s) == 0 or k < 1:
        raise ValueError(f"agreement: orders of {len(s)} and {len(t)} candidates with k={k}; expected n >= 1, k >= 1")
    k = min(k, len(s))
    return Agreement(kendall_tau(s, t), topk_overlap(s, t, k), ndcg(s, t, k), bool(s[0] == t[0]))
