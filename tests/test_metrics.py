"""Ranking metrics: NDCG against sklearn, MAP against a plain-Python reference, CLICKS and MRR by
hand; the history-first ranker on hand-made lists."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from export.contract.schema import OOV, PAD
from training.metrics import (
    clicks_at_k,
    history_first,
    map_at_k,
    mrr,
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
    np.testing.assert_allclose(mrr(perm, labels, mask), [1 / 2, 0.0])


def test_mrr_by_hand_and_padding_never_counts() -> None:
    labels = np.array([[0.0, 0.0, 1.0, 2.0], [3.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    mask = np.array([[True] * 4, [False, True, True, True], [True] * 4, [True, True, False, True]])
    perm = np.array([[3, 0, 1, 2], [0, 1, 3, 2], [0, 1, 2, 3], [2, 0, 1, 3]])
    # list 0: label 2 shown first; list 1: the padded label 3 ranked first is moved last, the first
    # relevant is candidate 2 at rank 2; list 2: nothing relevant; list 3: only a padded positive
    np.testing.assert_allclose(mrr(perm, labels, mask), [1.0, 1 / 3, 0.0, 0.0])
    np.testing.assert_allclose(per_list_metrics(perm, labels, mask)["mrr"], [1.0, 1 / 3, 0.0, 0.0])


def test_mrr_matches_a_plain_reference() -> None:
    scores, labels, mask = random_batch(np.random.default_rng(3))
    ours = mrr(ranking_from_scores(scores, mask), labels, mask)
    for b in range(len(scores)):
        valid = np.flatnonzero(mask[b])
        ranked = labels[b, valid[np.argsort(-scores[b, valid])]]
        hits = np.flatnonzero(ranked > 0)
        assert ours[b] == pytest.approx(1 / (hits[0] + 1) if len(hits) else 0.0), b


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
    names = ["ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "map@5", "map@10", "clicks@5", "clicks@10", "mrr"]
    assert list(means) == names
    for name, values in per_list.items():
        assert values.shape == (len(scores),)
        assert means[name] == pytest.approx(values.mean())
    ideal = per_list_metrics(ranking_from_scores(np.where(mask, labels, 0), mask), labels, mask)
    has_relevant = ((labels > 0) & mask).any(axis=1)
    for name in ("ndcg@1", "ndcg@5", "ndcg@10", "map@10", "mrr"):
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


A, B, C, D, E = 5, 6, 7, 8, 9  # known item indices (PAD = 0 and OOV = 1 are reserved)


def history_inputs(hist: list[list[int]], age: list[list[float]], cand: list[list[int]], n_cand: list[int]):
    """Hand-made assembled inputs: history slots of item PAD are padding, candidates beyond n_cand too."""
    hist_items = np.array(hist, dtype=np.int64).reshape(len(cand), -1)
    cand_items = np.array(cand, dtype=np.int64)
    return {
        "hist_items": hist_items,
        "hist_mask": hist_items != PAD,
        "hist_age": np.array(age, dtype=np.float32).reshape(hist_items.shape),
        "cand_items": cand_items,
        "cand_mask": np.arange(cand_items.shape[1]) < np.array(n_cand)[:, None],
    }


def test_history_first_by_hand() -> None:
    inputs = history_inputs(
        hist=[[A, B, A, PAD], [OOV, C, PAD, PAD], [PAD] * 4, [B, A, PAD, PAD], [A, B, PAD, PAD]],
        age=[[9, 5, 1, 0], [1, 3, 0, 0], [0] * 4, [4, 4, 0, 0], [2, 8, 0, 0]],
        cand=[[C, B, A, D], [OOV, D, C, OOV], [D, C, B, A], [B, A, C, PAD], [C, B, A, A]],
        n_cand=[4, 4, 4, 3, 4],
    )
    np.testing.assert_array_equal(
        history_first(inputs),
        [
            [2, 1, 0, 3],  # history a, b, a (a most recent): a, b, then c, d in their order
            [2, 0, 1, 3],  # the OOV interaction promotes neither OOV candidate; c was seen
            [0, 1, 2, 3],  # no history: the initial order
            [1, 0, 2, 3],  # equal ages: the later slot (a) is the more recent; the padded slot stays last
            [2, 3, 1, 0],  # ages decide over slots (b is older than a although later); duplicates keep order
        ],
    )


def test_history_first_ignores_padding_and_keeps_padded_candidates_last() -> None:
    inputs = history_inputs(hist=[[D, PAD, A]], age=[[3, 0, 1]], cand=[[A, B, D, PAD]], n_cand=[2])
    inputs["hist_mask"][0, 2] = False  # a masked slot never matches, whatever item it holds
    inputs["cand_items"][0, 3] = D  # nor does a padded candidate, whatever item it holds
    np.testing.assert_array_equal(history_first(inputs), [[0, 1, 2, 3]])
    inputs["cand_mask"][0, 2] = True
    np.testing.assert_array_equal(history_first(inputs), [[2, 0, 1, 3]])


def test_history_first_matches_a_plain_reference_on_random_lists() -> None:
    rng = np.random.default_rng(0)
    n, h, length = 40, 7, 9
    hist = rng.integers(0, 12, size=(n, h))
    hist[:5] = 0  # some lists without history
    inputs = {
        "hist_items": hist,
        "hist_mask": hist != PAD,
        "hist_age": np.sort(rng.integers(0, 5, size=(n, h)), axis=1)[:, ::-1].astype(np.float32),
        "cand_items": rng.integers(0, 12, size=(n, length)),
        "cand_mask": np.arange(length) < rng.integers(1, length + 1, size=n)[:, None],
    }
    perm = history_first(inputs)
    for b in range(n):
        last_seen = {}  # item -> recency key (age, -slot) of its most recent interaction
        for j in range(h):
            if inputs["hist_mask"][b, j] and hist[b, j] > OOV:
                key = (inputs["hist_age"][b, j], -j)
                last_seen[hist[b, j]] = min(key, last_seen.get(hist[b, j], key))
        valid = [i for i in range(length) if inputs["cand_mask"][b, i]]
        seen = sorted(
            (i for i in valid if inputs["cand_items"][b, i] in last_seen),
            key=lambda i: last_seen[inputs["cand_items"][b, i]],
        )
        expected = seen + [i for i in valid if i not in seen] + [i for i in range(length) if i not in valid]
        assert perm[b].tolist() == expected, b


def test_history_first_rejects_bad_inputs() -> None:
    inputs = history_inputs(hist=[[A, B]], age=[[1, np.nan]], cand=[[A, B]], n_cand=[2])
    with pytest.raises(ValueError, match=r"hist_age\[0, 1\] = nan"):
        history_first(inputs)
    with pytest.raises(ValueError, match="must all be"):
        history_first({**inputs, "hist_age": np.zeros((1, 3), np.float32)})
    with pytest.raises(ValueError, match="N = 1"):
        history_first({**inputs, "cand_items": np.zeros((2, 2), np.int64), "cand_mask": np.ones((2, 2), bool)})
