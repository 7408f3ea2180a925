"""PSAD losses against hand-computed values, plus config validation."""

from __future__ import annotations

import math

import pytest
import torch

from training.models import losses
from training.models.config import ModelConfig


def test_listwise_softmax_loss_by_hand():
    scores = torch.tensor([[1.0, 2.0, 0.0, 5.0]])
    labels = torch.tensor([[1.0, 3.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, True, False]])  # the 4th slot is padding: ignored
    log_z = math.log(math.exp(1) + math.exp(2) + math.exp(0))
    expected = -(0.25 * (1 - log_z) + 0.75 * (2 - log_z))
    assert float(losses.listwise_softmax_loss(scores, labels, mask)) == pytest.approx(expected, rel=1e-6)


def test_listwise_loss_ignores_lists_without_positives():
    scores = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    alone = losses.listwise_softmax_loss(scores[:1], labels[:1], mask[:1])
    assert float(losses.listwise_softmax_loss(scores, labels, mask)) == pytest.approx(float(alone))
    assert float(losses.listwise_softmax_loss(scores[1:], labels[1:], mask[1:])) == 0.0


def test_bce_loss_by_hand():
    scores = torch.tensor([[0.0, 2.0, 9.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, False]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert float(losses.bce_loss(scores, targets, mask)) == pytest.approx(expected, rel=1e-6)


def test_position_weights():
    w = losses.position_weights(4, top_k=0)
    assert w.tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5)])
    assert losses.position_weights(4, top_k=2).tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0, 0.0])


def test_listwise_distill_loss_by_hand():
    scores = torch.tensor([[0.0, 1.0, 2.0, 7.0]])
    perm = torch.tensor([[2, 0, 1, 3]])  # teacher: item 2, then 0, then 1; slot 3 is padding
    mask = torch.tensor([[True, True, True, False]])
    e = math.exp
    nll = [math.log(e(2) + e(0) + e(1)) - 2, math.log(e(0) + e(1)) - 0, 0.0]
    w = [1.0, 1 / math.log2(3), 0.5]
    expected = sum(a * b for a, b in zip(w, nll, strict=True)) / sum(w)
    assert float(losses.listwise_distill_loss(scores, perm, mask)) == pytest.approx(expected, rel=1e-6)
    top1 = losses.listwise_distill_loss(scores, perm, mask, top_k=1)
    assert float(top1) == pytest.approx(nll[0], rel=1e-6)


def test_rd_static_weights_by_hand():
    z = math.exp(-1) + math.exp(-2) + math.exp(-3)
    expected = [math.exp(-1) / z, math.exp(-2) / z, math.exp(-3) / z]
    assert losses.rd_static_weights(3, 1.0).tolist() == pytest.approx(expected)


def test_rd_dynamic_weights_with_given_ranks():
    # student scores give items the ranks: item0 -> 4, item1 -> 1, item2 -> 3, item3 -> 2
    scores = torch.tensor([[0.0, 9.0, 1.0, 5.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert losses.student_ranks(scores, mask).tolist() == [[4, 1, 3, 2]]
    perm = torch.tensor([[0, 1, 2, 3]])  # teacher top-3: item0 (r=1), item1 (r=2), item2 (r=3)
    static = losses.rd_static_weights(3, 1.0)
    dyn = torch.tensor([math.tanh(0.5 * (4 - 1)), 0.0, 0.0])  # max(0, tanh(mu (rank - r)))
    expected = static * dyn / (static * dyn).sum()
    got = losses.rd_weights(scores, perm, mask, k=3, lam=1.0, mu=0.5)
    assert got[0].tolist() == pytest.approx(expected.tolist())
    assert not got.requires_grad


def test_rd_weights_skip_padded_ranks_and_short_lists():
    scores = torch.tensor([[1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    perm = torch.tensor([[1, 0, 2]])
    w = losses.rd_weights(scores, perm, mask, k=10, lam=1.0)
    static = losses.rd_static_weights(10, 1.0)
    assert w[0].tolist() == pytest.approx([float(static[0]), float(static[1]), 0.0])


def test_rd_distill_loss_by_hand():
    scores = torch.tensor([[0.0, 2.0, -1.0]])
    perm = torch.tensor([[1, 0, 2]])
    weights = torch.tensor([[0.7, 0.3]])
    expected = 2.0 * (0.7 * math.log(1 + math.exp(-2)) + 0.3 * math.log(2))
    assert float(losses.rd_distill_loss(scores, perm, weights, alpha=2.0)) == pytest.approx(expected, rel=1e-6)


def test_losses_are_finite_on_single_candidate_lists():
    scores = torch.tensor([[3.0, -1e4]])
    mask = torch.tensor([[True, False]])
    perm = torch.tensor([[0, 1]])
    assert float(losses.listwise_distill_loss(scores, perm, mask)) == 0.0
    assert math.isfinite(float(losses.listwise_softmax_loss(scores, torch.tensor([[1.0, 0.0]]), mask)))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"distill_weight": -0.5}, "distill_weight"),
        ({"arch": "transformer"}, "arch"),
        ({"student_loss": "hinge"}, "student_loss"),
        ({"distill": "kl"}, "distill"),
        ({"d_model": 30, "n_heads": 4}, "d_model"),
        ({"dropout": 1.0}, "dropout"),
        ({"rd_k": 0}, "rd_k"),
        ({"rd_lambda": 0.0}, "rd_lambda"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str):
    with pytest.raises(ValueError, match=f"model.{field}"):
        ModelConfig(**overrides).validate()


def test_config_from_dict_rejects_unknown_keys_and_bad_types():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['blok_size'\].*allowed: \['arch'"):
        ModelConfig.from_dict({"blok_size": 4})
    with pytest.raises(ValueError, match="model.block_size"):
        ModelConfig.from_dict({"block_size": "4"})
    with pytest.raises(ValueError, match="model.rd_dynamic"):
        ModelConfig.from_dict({"rd_dynamic": 1})


def test_config_round_trip():
    cfg = ModelConfig(block_size=1, distill="rd", distill_weight=2)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(ModelConfig.from_dict({"distill_weight": 2}).distill_weight, float)
