"""Baselines (DNN, PRM, DLCM, SetRank), with and without the history-match features: padding never
changes a real candidate's score, training lowers the loss, the serving module scores exactly like
rank_scores, and SetRank ignores the initial order. Every model, PSAD included, has the one signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.contract.schema import INPUT_NAMES
from training.data.store import load_items, load_schema, load_split
from training.evaluate import to_tensors
from training.models.baselines import BASELINES
from training.models.config import ModelConfig
from training.models.psad import SHOWN
from training.models.registry import build_model
from training.models.student import PAD_SCORE

ARCHS = sorted(BASELINES)


@pytest.fixture(scope="module")
def setup(tiny_data: Path):
    schema = load_schema(tiny_data)
    item_cat, item_num = (torch.from_numpy(np.array(a)) for a in load_items(tiny_data, schema))
    data = load_split(tiny_data, "train", schema)
    return schema, item_cat, item_num, data


def make(arch: str, setup, seed: int = 0, **features: bool):
    schema, item_cat, item_num, _ = setup
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=arch,
        d_model=16,
        n_heads=2,
        teacher_layers=1,
        student_hidden=16,
        dropout=0.0,
        **features,
    )
    return build_model(cfg, schema, item_cat, item_num).eval()


def batch(setup, rows: slice) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    data = setup[3]
    inputs = to_tensors({k: v[rows] for k, v in data.inputs.items()}, torch.device("cpu"))
    return inputs, torch.from_numpy(data.labels[rows])


def pad(inputs: dict[str, torch.Tensor], extra_list: int, extra_history: int) -> dict[str, torch.Tensor]:
    """Append padded (masked) candidates and behaviours; values in padded slots are arbitrary."""
    out = {}
    for name, value in inputs.items():
        extra = extra_list if name.startswith("cand_") else extra_history if name.startswith("hist_") else 0
        if extra:
            fill = torch.zeros_like(value[:, :1]).expand(-1, extra, *value.shape[2:])
            if name in ("cand_items", "hist_items"):
                fill = torch.full_like(fill, 3)  # a real item index: padding must be ignored by the mask alone
            value = torch.cat([value, fill], dim=1)
        out[name] = value
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_built_from_registry(arch: str, setup) -> None:
    assert isinstance(make(arch, setup), BASELINES[arch])


FEATURES = [{}, {"history_match": True}, {"history_match": True, "item_ids": False}]  # default, + repeats, trivago


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_invariance(arch: str, features: dict, setup) -> None:
    model = make(arch, setup, **features)
    inputs, _ = batch(setup, slice(0, 6))
    short = {k: (v[:, :6] if k.startswith("cand_") else v) for k, v in inputs.items()}  # lists of 6 (max_list 10)
    with torch.no_grad():
        base = model.rank_scores(short)
        padded = model.rank_scores(pad(short, extra_list=3, extra_history=4))
    torch.testing.assert_close(padded[:, :6], base, atol=1e-5, rtol=1e-5)
    assert (padded[:, 6:] == PAD_SCORE).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_steps_lower_the_loss(arch: str, setup) -> None:
    model = make(arch, setup).train()
    inputs, labels = batch(setup, slice(0, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(25):
        loss = model(inputs, labels, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("arch", ARCHS)
def test_serving_module_scores_like_rank_scores(arch: str, features: dict, setup) -> None:
    model = make(arch, setup, **features)
    inputs, _ = batch(setup, slice(10, 15))
    serving = model.serving_module()
    assert {id(p) for p in serving.parameters()} == {id(p) for p in model.parameters()}  # shared, not copied
    with torch.no_grad():
        torch.testing.assert_close(serving(*(inputs[n] for n in INPUT_NAMES)), model.rank_scores(inputs))


@pytest.mark.parametrize("arch", ["psad", *ARCHS])
def test_every_model_reads_the_inputs_by_name_and_serves_them_in_signature_order(arch: str, setup) -> None:
    """rank_scores picks the model inputs out of a batch by name (key order and other keys do not
    matter); the serving module takes exactly the nine tensors, in INPUT_NAMES order."""
    model = make(arch, setup)
    inputs, _ = batch(setup, slice(0, 4))
    tensors = [inputs[n] for n in INPUT_NAMES]
    reordered = {SHOWN: torch.zeros_like(inputs["cand_items"]), **dict(reversed(inputs.items()))}
    serving = model.serving_module()
    with torch.no_grad():
        torch.testing.assert_close(model.rank_scores(reordered), serving(*tensors))
        with pytest.raises(TypeError, match="cand_mask"):
            serving(*tensors[:-1])
        with pytest.raises(TypeError):
            serving(*tensors, tensors[0])


@pytest.mark.parametrize("features", FEATURES)
def test_empty_history_and_single_candidate_stay_finite(features: dict, setup) -> None:
    inputs, _ = batch(setup, slice(0, 2))
    inputs = {
        k: (v[:, :0] if k.startswith("hist_") else v[:, :1] if k.startswith("cand_") else v) for k, v in inputs.items()
    }
    for arch in ARCHS:
        with torch.no_grad():
            assert torch.isfinite(make(arch, setup, **features).rank_scores(inputs)).all(), arch


def permuted(inputs: dict[str, torch.Tensor], order: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same lists with their candidates shown in `order` (one permutation of the list axis)."""
    return {k: (v[:, order] if k.startswith("cand_") else v) for k, v in inputs.items()}


def test_setrank_is_permutation_invariant_and_prm_is_not(setup) -> None:
    inputs, _ = batch(setup, slice(20, 28))
    order = torch.randperm(inputs["cand_items"].shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for arch in ("setrank", "prm"):
            model = make(arch, setup)
            base, moved = model.rank_scores(inputs), model.rank_scores(permuted(inputs, order))
            if arch == "setrank":  # permuting the candidates permutes the scores
                torch.testing.assert_close(moved, base[:, order], atol=1e-5, rtol=1e-5)
            else:  # the same set in another initial order scores differently: PRM reads the positions
                assert (moved - base[:, order]).abs().max() > 1e-3
    assert not any("positions" in name for name, _ in make("setrank", setup).named_parameters())
