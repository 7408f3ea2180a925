"""Ranking metrics: NDCG against sklearn, MAP against a plain-Python reference, CLICKS by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from training.metrics import (
    clicks_at_k,
    map_at_k,
    ndcg_at_k,
    paired_bootstrap,
    per_list_metrics,
    ranking_from_scores,
    ranking_metrics,
)


def random_batch(rng: np.random.Generator, batch: int = 64, length: int = 12, graded: bool = True):
    """Distinct scores (sklearn averages over ties), padded tails of random length, sparse labels."""
    scores = rng.permutation(batch * length).reshape(batch, length).astype(np.float64)
    lengths = rng.integers(2, length + 1, size=batch)
    mask = np.arange(length) < lengths[:, None]
    labels = rng.integers(0, 4 if graded else 2, size=(batch, length)).astype(np.float64)
    labels *= rng.random((batch, length)) < 0.4
    labels[~mask] = rng.integers(1, 4, size=(~mask).sum())  # padded labels must never count
    return scores, labels, mask


def reference_ap(ranked_rel: list[float], n_relevant: int, k: int) -> float:
    hits, total = 0, 0.0
    for r, rel in enumerate(ranked_rel[:k]):
        if rel > 0:
            hits += 1
            total += hits / (r + 1)
    return total / min(k, n_relevant) if n_relevant else 0.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 5, 10, 50])
def test_ndcg_matches_sklearn(seed: int, k: int) -> None:
    scores, labels, mask = random_batch(np.random.default_rng(seed))
    ours = ndcg_at_k(ranking_from_scores(scores, mask), labels, mask, k)
    for b in range(len(scores)):
        valid = mask[b]
        gains = np.exp2(labels[b, valid]) - 1  # sklearn's gain is the label itself
        expected = ndcg_score(gains[None], scores[b, valid][None], k=k)
        assert ours[b] == pytest.approx(expected, abs=1e-12), (b, k)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, 10])
def test_map_matches_reference(seed: int, k: int) -> None:
    scores, labels, mask = random_batch(np.random.default_rng(100 + seed), graded=seed % 2 == 0)
    ours = map_at_k(ranking_from_scores(scores, mask), labels, mask, k)
    for b in range(len(scores)):
        valid = np.flatnonzero(mask[b])
        order = valid[np.argsort(-scores[b, valid])]
        expected = reference_ap(labels[b, order].tolist(), int((labels[b, valid] > 0).sum()), k)
        assert ours[b] == pytest.approx(expected, abs=1e-12), (b, k)


def test_hand_computed_values() -> None:
    # list 0: ranks show labels [0, 2, 1, pad]; list 1: nothing relevant
    perm = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    labels = np.array([[0.0, 2.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    dcg = 3 / np.log2(3) + 1 / np.log2(4)
    idcg = 3 / np.log2(2) + 1 / np.log2(3)
    np.testing.assert_allclose(ndcg_at_k(perm, labels, mask, 3), [dcg / idcg, 0.0])
    np.testing.assert_allclose(map_at_k(perm, labels, mask, 3), [(1 / 2 + 2 / 3) / 2, 0.0])
    np.testing.assert_allclose(map_at_k(perm, labels, mask, 1), [0.0, 0.0])
    np.testing.assert_array_equal(clicks_at_k(perm, labels, mask, 1), [0, 0])
    np.testing.assert_array_equal(clicks_at_k(perm, labels, mask, 2), [1, 0])
    np.testing.assert_array_equal(clicks_at_k(perm, labels, mask, 10), [2, 0])


def test_padded_candidates_never_count_even_when_ranked_first() -> None:
    labels = np.array([[1.0, 0.0, 3.0]])
    mask = np.array([[True, True, False]])
    perm = np.array([[2, 1, 0]])  # the padded candidate 2 is "shown" first
    assert clicks_at_k(perm, labels, mask, 1)[0] == 0  # rank 0 is candidate 1 once padding moves last
    assert clicks_at_k(perm, labels, mask, 2)[0] == 1
    assert ndcg_at_k(perm, labels, mask, 2)[0] == pytest.approx(1 / np.log2(3))


def test_ranking_from_scores_is_stable_and_puts_padding_last() -> None:
    scores = np.array([[1.0, 5.0, 5.0, 9.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = np.array([[True, True, True, False, True], [False, True, True, True, False]])
    perm = ranking_from_scores(scores, mask)
    assert perm.dtype == np.int64
    np.testing.assert_array_equal(perm, [[1, 2, 4, 0, 3], [1, 2, 3, 0, 4]])


def test_ranking_metrics_means_and_per_list_keys() -> None:
    scores, labels, mask = random_batch(np.random.default_rng(7))
    perm = ranking_from_scores(scores, mask)
    per_list = per_list_metrics(perm, labels, mask)
    means = ranking_metrics(perm, labels, mask)
    assert list(means) == ["ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "map@5", "map@10", "clicks@5", "clicks@10"]
    for name, values in per_list.items():
        assert values.shape == (len(scores),)
        assert means[name] == pytest.approx(values.mean())
    ideal = per_list_metrics(ranking_from_scores(np.where(mask, labels, 0), mask), labels, mask)
    has_relevant = ((labels > 0) & mask).any(axis=1)
    for name in ("ndcg@1", "ndcg@5", "ndcg@10", "map@10"):
        np.testing.assert_allclose(ideal[name], has_relevant.astype(float), err_msg=name)
        assert (per_list[name] <= ideal[name] + 1e-12).all()


@pytest.mark.parametrize(
    ("perm", "labels", "k", "message"),
    [
        ([[0, 0, 1]], [[1.0, 0.0, 0.0]], 3, "not a permutation"),
        ([[0, 1, 2]], [[1.0, -1.0, 0.0]], 3, "must be finite and >= 0"),
        ([[0, 1, 2]], [[1.0, np.nan, 0.0]], 3, "must be finite and >= 0"),
        ([[0, 1, 2]], [[1.0, 0.0, 0.0]], 0, "k must be a positive integer"),
        ([[0, 1]], [[1.0, 0.0, 0.0]], 3, "perm must be"),
    ],
)
def test_bad_inputs_are_rejected(perm, labels, k, message) -> None:
    mask = np.ones((1, 3), dtype=bool)
    with pytest.raises(ValueError, match=message):
        ndcg_at_k(np.array(perm), np.array(labels), mask, k)


def test_nan_scores_and_empty_batches_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ranking_from_scores(np.array([[1.0, np.nan]]), np.ones((1, 2), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        ranking_metrics(np.zeros((0, 3), np.int64), np.zeros((0, 3)), np.zeros((0, 3), bool))


def test_paired_bootstrap_interval() -> None:
    low, high = paired_bootstrap(np.full(50, 0.2))
    assert low == pytest.approx(0.2) and high == pytest.approx(0.2)
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 1.0, 400)
    low, high = paired_bootstrap(noise)
    assert low < noise.mean() < high and low < 0 < high
    assert high - low == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.2)  # the normal-theory width
    assert paired_bootstrap(noise) == (low, high)  # seeded
    low, high = paired_bootstrap(noise + 0.5)
    assert low > 0  # a real gain is told apart from noise
    with pytest.raises(ValueError, match="non-empty 1-d"):
        paired_bootstrap(np.zeros(0))
