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
- MRR: 1 / (1 + rank of the first relevant (rel > 0) candidate), over the whole list; 0 when the
  list has no relevant candidate (as trec_eval's recip_rank), like MAP, so every ranker is
  averaged over the same lists and such a list never changes a paired difference.

Besides sorting by scores, one fixed ranker lives here, as it must run wherever the inputs do:
history_first, the user's own history replayed (the baseline a history-reading reranker must beat).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from export.contract.schema import OOV

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


# The orders computed from the inputs alone, nothing trained: the identity and history_first.
FIXED_RANKERS = ("initial", "history")


def history_first(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The candidates the user interacted with before, most recent interaction first, then the
    others in the ranking stage's order: a permutation [N, L], valid candidates first.

    Reads hist_items, hist_mask, hist_age, cand_items and cand_mask (features.assemble's arrays).
    Recency is the smallest age, the later history slot on equal ages (histories are oldest first).
    Padding and OOV history items match nothing: an unknown item in the history says nothing about
    which unknown candidate it was, and matching them would promote every unknown candidate."""
    hist, hist_mask, age = (np.asarray(inputs[k]) for k in ("hist_items", "hist_mask", "hist_age"))
    cand, cand_mask = np.asarray(inputs["cand_items"]), np.asarray(inputs["cand_mask"], dtype=bool)
    if hist.ndim != 2 or hist.shape != hist_mask.shape or hist.shape != age.shape:
        raise ValueError(
            f"hist_items, hist_mask and hist_age must all be [N, H]; got {hist.shape}, "
            f"{hist_mask.shape} and {age.shape}"
        )
    if cand.ndim != 2 or cand.shape != cand_mask.shape or len(cand) != len(hist):
        raise ValueError(
            f"cand_items and cand_mask must be [N, L] with N = {len(hist)}; got {cand.shape} and {cand_mask.shape}"
        )
    n, h = hist.shape
    usable = np.asarray(hist_mask, dtype=bool) & (hist > OOV)
    bad = usable & ~(np.isfinite(age) & (age >= 0))
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(f"hist_age[{b}, {j}] = {age[b, j]}: ages must be finite and >= 0 (days before the list)")
    # recency[b, j]: 0 for the most recent usable slot of list b; h (never) for padding and OOV
    newest_first = h - 1 - np.argsort(np.where(usable, age, np.inf)[:, ::-1], axis=1, kind="stable")
    recency = np.empty((n, h), dtype=np.int64)
    np.put_along_axis(recency, newest_first, np.arange(h), axis=1)
    recency = np.where(usable, recency, h)
    best = np.empty(cand.shape, dtype=np.int64)
    step = max(1, 2**22 // max(1, cand.shape[1] * h))  # bounded [rows, L, H] match arrays
    for start in range(0, n, step):
        rows = slice(start, start + step)
        match = cand[rows, :, None] == hist[rows, None, :]
        best[rows] = np.where(match, recency[rows, None, :], h).min(axis=2, initial=h)
    order = np.argsort(np.where(cand_mask, best, h), axis=1, kind="stable")  # never-seen keep their order
    return valid_first(order, cand_mask)


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


def mrr(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reciprocal rank of the first relevant (rel > 0) candidate per list, 0 without one: float64 [B]."""
    relevant = _ranked_labels(perm, labels, mask) > 0
    first = np.argmax(relevant, axis=1)
    return np.where(relevant.any(axis=1), 1.0 / (first + 1.0), 0.0)


_METRICS = {"ndcg": ndcg_at_k, "map": map_at_k, "clicks": clicks_at_k}
_WHOLE_LIST_METRICS = {"mrr": mrr}


def per_list_metrics(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The standard metrics per list ({"ndcg@1": [B], ..., "mrr": [B]}), for per-group breakdowns."""
    out = {f"{name}@{k}": _METRICS[name](perm, labels, mask, k) for name, ks in STANDARD_KS.items() for k in ks}
    return out | {name: metric(perm, labels, mask) for name, metric in _WHOLE_LIST_METRICS.items()}


def ranking_metrics(perm: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Means of the standard metrics over the batch: ndcg@{1,3,5,10}, map@{5,10}, clicks@{5,10}, mrr."""
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


def verdict(low: float, high: float, other: str) -> str:
    """What a paired interval of (a ranker - `other`) says: only an interval that excludes 0 separates them."""
    return f"above {other}" if low > 0 else f"below {other}" if high < 0 else f"not distinguishable from {other}"
