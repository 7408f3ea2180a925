"""Agreement of the student's order with the teacher's (psad.shadow.agreement), against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from psad.shadow.agreement import agreement, order_by_scores, ranks

L3 = math.log2(3)


@pytest.mark.parametrize(
    ("s", "t", "k", "tau", "overlap", "ndcg", "first"),
    [
        pytest.param([0, 1, 2, 3], [0, 1, 2, 3], 2, 1.0, 1.0, 1.0, True, id="identical"),
        pytest.param([3, 2, 1, 0], [0, 1, 2, 3], 2, -1.0, 0.0, 0.0, False, id="reversed"),
        # one discordant pair of 6; top 2 holds the same items; DCG = 1/1 + 2/log2(3), ideal 2/1 + 1/log2(3)
        pytest.param([1, 0, 2, 3], [0, 1, 2, 3], 2, 4 / 6, 1.0, (1 + 2 / L3) / (2 + 1 / L3), False, id="one-swap"),
        pytest.param([0], [0], 10, 1.0, 1.0, 1.0, True, id="n=1"),
        # k=10 clipped to 3; teacher ranks of S's items are [2, 0, 1]: 2 discordant pairs of 3;
        # relevances item0=3, item1=2, item2=1: DCG = 1/1 + 3/log2(3) + 2/2, ideal 3/1 + 2/log2(3) + 1/2
        pytest.param([2, 0, 1], [0, 1, 2], 10, -1 / 3, 1.0, (2 + 3 / L3) / (3.5 + 2 / L3), False, id="k>n"),
        # 3 discordant pairs of 6; top 2 share one item (1); DCG = rel(1)/1 + rel(3)/log2(3) = 1
        pytest.param([1, 3, 0, 2], [0, 1, 2, 3], 2, 0.0, 0.5, 1 / (2 + 1 / L3), False, id="half-top"),
    ],
)
def test_measures_match_hand_computation(s, t, k, tau, overlap, ndcg, first) -> None:
    a = agreement(np.array(s), np.array(t), k)
    assert a.kendall_tau == pytest.approx(tau)
    assert a.topk_overlap == pytest.approx(overlap)
    assert a.ndcg == pytest.approx(ndcg)
    assert a.first_agree is first


def test_kendall_tau_agrees_with_scipy_on_random_permutations() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 5, 17, 200):
        s, t = rng.permutation(n), rng.permutation(n)
        expected = kendalltau(ranks(s), ranks(t)).statistic
        assert agreement(s, t, 10).kendall_tau == pytest.approx(expected)


def test_order_by_scores_is_descending_and_keeps_request_order_on_ties() -> None:
    assert order_by_scores(np.array([0.1, 0.5, 0.5, 0.9], np.float32)).tolist() == [3, 1, 2, 0]
    assert order_by_scores(np.array([0.1, 0.5, 0.5, 0.9])).dtype == np.int32


def test_mismatched_orders_are_refused() -> None:
    with pytest.raises(ValueError, match="orders of 3 and 2"):
        agreement(np.array([0, 1, 2]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="k=0"):
        agreement(np.array([0]), np.array([0]), 0)
