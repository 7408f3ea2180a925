"""Ranking metrics over padded batches (numpy only, so the service and reports can use them).

Conventions: a batch is B lists padded to length L; ``mask[b, i]`` marks real candidates;
``perm[b, r]`` is the index of the candidate shown at rank r. Padded candidates never count:
they are moved behind every real one before ranks are assigned, whatever ``perm`` says.

Definitions (LibRerank's, see docs/simulator.md):
- NDCG@k: gain 2^rel - 1, discount log2(rank + 2); the ideal is the list's own labels sorted;
  a list whose ideal DCG is 0 scores 0 (as sklearn.metrics.ndcg_score does).
- MAP@k: average precision with binary relevance (rel > 0), normalised by min(k, #relevant);
  0 when the list has no relevant candidate.
- CLICKS@k: the number of relevant (rel > 0) candidates in the top k.
"""

from __future__ import annotations

import numpy as np

STANDARD_KS = {"ndcg": (1, 3, 5, 10), "map": (5, 10), "clicks": (5, 10)}


def _check_batch(labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if labels.ndim != 2 or labels.shape != mask.shape:
        raise ValueError(f"labels and mask must both be [B, L]; got {labels.shape} and {mask.shape}")
    bad = mask & ~(np.isfinite(labels) & (labels >= 0))
    if bad.any():
        b, i = np.argwhere(bad)[0]
        raise ValueError(f"labels[{b}, {i}] = {labels[b, i]}: labels must be finite and >= 0")
    return labels, mask


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def valid_first(perm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``perm`` with padded candidates moved (stably) behind the real ones; checks it is a permutation."""
    perm = np.asarray(perm)
    mask = np.asarray(mask, dtype=bool)
    if perm.shape != mask.shape or perm.ndim != 2:
        raise ValueError(f"perm must be [B, L] like mask {mask.shape}, got {perm.shape}")
    if not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(f"perm must hold integer candidate indices, got dtype {perm.dtype}")
    length = perm.shape[1]
    if not (np.sort(perm, axis=1) == np.arange(length)).all():
        b = int(np.argmax((np.sort(perm, axis=1) != np.arange(length)).any(axis=1)))
        raise ValueError(f"perm[{b}] is not a permutation of 0..{length - 1}: {perm[b].tolist()}")
    perm = perm.astype(np.int64, copy=False)
    padded_at_rank = ~np.take_along_axis(mask, perm, axis=1)
    return np.take_along_axis(perm, np.argsort(padded_at_rank, axis=1, kind="stable"), axis=1)


def ranking_from_scores(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sort each list by descending score; ties keep the original order; padded candidates go last."""
    scores = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if scores.ndim != 2 or scores.shape != mask.shape:
        raise ValueError(f"scores and mask must both be [B, L]; got {scores.shape} and {mask.shape}")
    bad = mask & np.isnan(scores)
    if bad.any():
        b, i = np.argwhere(bad)[0]
        raise ValueError(f"scores[{b}, {i}] is NaN: a model produced an invalid score")
    by_score = np.argsort(-scores, axis=1, kind="stable")
    return valid_first(by_score, mask)


def _ranked_labels(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Labels in display order, padded candidates zeroed and placed last: float64 [B, L]."""
    labels, mask = _check_batch(labels, mask)
    perm = valid_first(perm, mask)
    return np.take_along_axis(np.where(mask, labels, 0.0), perm, axis=1)


def _discounts(length: int, k: int) -> np.ndarray:
    ranks = np.arange(length)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def ndcg_at_k(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k per list, float64 [B]."""
    k = _check_k(k)
    ranked = _ranked_labels(perm, labels, mask)
    gains = np.exp2(ranked) - 1.0
    disc = _discounts(ranked.shape[1], k)
    dcg = gains @ disc
    ideal = -np.sort(-gains, axis=1) @ disc
    return np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)


def map_at_k(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Average precision at k per list (binary relevance rel > 0), float64 [B]."""
    k = _check_k(k)
    rel = (_ranked_labels(perm, labels, mask) > 0)[:, :k].astype(np.float64)
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    n_relevant = (np.asarray(labels) > 0) & np.asarray(mask, dtype=bool)
    norm = np.minimum(k, n_relevant.sum(axis=1)).astype(np.float64)
    total = (precision * rel).sum(axis=1)
    return np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)


def clicks_at_k(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Number of relevant (rel > 0) candidates in the top k per list, float64 [B]."""
    k = _check_k(k)
    return (_ranked_labels(perm, labels, mask)[:, :k] > 0).sum(axis=1).astype(np.float64)


_METRICS = {"ndcg": ndcg_at_k, "map": map_at_k, "clicks": clicks_at_k}


def per_list_metrics(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The standard metrics per list ({"ndcg@1": [B], ...}), for per-group breakdowns."""
    return {f"{name}@{k}": _METRICS[name](perm, labels, mask, k) for name, ks in STANDARD_KS.items() for k in ks}


def ranking_metrics(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Means of the standard metrics over the batch: ndcg@{1,3,5,10}, map@{5,10}, clicks@{5,10}."""
    if len(perm) == 0:
        raise ValueError("ranking_metrics: the batch is empty (no lists to evaluate)")
    return {name: float(values.mean()) for name, values in per_list_metrics(perm, labels, mask).items()}


def paired_bootstrap(
    diff: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Confidence interval of mean(diff), diff[i] = metric of ranker A minus ranker B on list i.

    Lists are resampled with replacement, and the two rankers are always compared on the same
    lists (paired), which is far tighter than two separate intervals. Seeded: reproducible."""
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 1 or len(diff) == 0:
        raise ValueError(f"paired_bootstrap: diff must be a non-empty 1-d array, got shape {diff.shape}")
    means = np.empty(resamples)
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, 256):  # bounded memory for large splits
        rows = rng.integers(0, len(diff), size=(min(256, resamples - start), len(diff)))
        means[start : start + len(rows)] = diff[rows].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
