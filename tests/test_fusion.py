"""The fused serving graph (export/fusion.py): the same scores as PSAD's serving module, fewer kernels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from export.contract.bundle import ItemEncoder, item_tokens
from export.contract.fixtures import BatchMaker
from export.contract.schema import INPUT_NAMES, OOV, CategoricalFeature, FeatureSchema, NumericFeature
from export.exporter import RankScores, export_onnx, graph_kernels
from export.fusion import FusedScorer, fused_serving_module
from export.parity import FP32, SHAPES, check_parity
from tests.test_models import one_thread  # noqa: F401  (an autouse fixture: tiny tensors, one thread)
from training.models.baselines import BASELINES
from training.models.config import ModelConfig
from training.models.psad import PSAD
from training.models.sid import find_sid

FULL = FeatureSchema(
    n_items=40,
    actions=("click", "buy"),
    max_history=8,
    max_list=12,
    user_categorical=(CategoricalFeature("gender", 4), CategoricalFeature("country", 5)),
    user_numeric=(NumericFeature("age", 30.0, 10.0),),
    item_categorical=(CategoricalFeature("genre", 6),),
    item_numeric=(NumericFeature("popularity", 1.0, 2.0),),
    candidate_numeric=(NumericFeature("rank_score", 0.5, 0.2),),
)
CONTENT = dataclasses.replace(FULL, item_content=("genre", "popularity"))  # what a sid model assigns codes from
SID = {"item_encoder": "sid", "sid_levels": 2, "sid_codebook_size": 5}
# few code combinations: one gather from their sums (TokenTable); many: the float64 decode (TokenDecode)
SID_FORMS = {"table": SID, "decode": {**SID, "sid_levels": 3, "sid_codebook_size": 256}}
BARE = FeatureSchema(n_items=40, actions=("click",), max_history=8, max_list=12)  # no side features at all
TINY = {"d_model": 8, "n_heads": 2, "teacher_layers": 1, "student_hidden": 8, "dropout": 0.0}
# every branch of the fused graph: defaults, repeat features, no ids, no UPN, no position codes
VARIANTS = [
    {},
    {"history_match": True},
    {"history_match": True, "item_ids": False},
    {"use_upn": False},
    {"position_encoding": False},
]


def trained_like(schema: FeatureSchema, seed: int = 0, **overrides) -> PSAD:
    """A PSAD model whose every parameter is random (gates included, which start at zero): each
    folded weight of the fused graph then matters."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(123)
    item_cat = (
        torch.stack(
            [torch.randint(0, f.cardinality, (schema.n_items,), generator=gen) for f in schema.item_categorical], 1
        )
        if schema.item_categorical
        else torch.zeros(schema.n_items, 0, dtype=torch.long)
    )
    item_num = torch.randn(schema.n_items, len(schema.item_numeric), generator=gen)
    model = PSAD(ModelConfig(**{**TINY, **overrides}), schema, item_cat, item_num)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def scores(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return module(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES)).numpy()


@pytest.mark.parametrize("schema", [FULL, BARE], ids=["side-features", "bare"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()) or "default")
def test_fused_scorer_computes_the_serving_modules_scores(schema: FeatureSchema, variant: dict) -> None:
    model = trained_like(schema, **variant)
    fused, plain = fused_serving_module(model), model.serving_module().eval()
    assert isinstance(fused, FusedScorer)
    maker = BatchMaker(schema, seed=1)
    for shape in ((1, 1, 0), (2, 10, 1), (3, 7, 13), (5, 30, 8)):  # past max_list and max_history too
        inputs = maker.make(*shape)
        mask = inputs["cand_mask"]
        want, got = scores(plain, inputs), scores(fused, inputs)
        np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, rtol=0)
        assert (got[~mask] == want[~mask]).all()  # padded slots keep PAD_SCORE exactly


def test_a_baseline_exports_its_own_serving_module() -> None:
    schema, cfg = FULL, ModelConfig(**{**TINY, "arch": "dnn"})
    model = BASELINES["dnn"](cfg, schema, torch.zeros(40, 1, dtype=torch.long), torch.zeros(40, 1))
    assert not isinstance(fused_serving_module(model), FusedScorer)


@pytest.mark.parametrize("variant", [{}, {"history_match": True, "item_ids": False}])
def test_fused_onnx_graph_passes_the_parity_gate_at_every_shape(tmp_path: Path, variant: dict) -> None:
    """Exported with dynamic axes, the fused graph scores like the plain PyTorch serving module in
    ONNX Runtime at all 27 gate shapes (batch 1/2/64, list 1/10/200, history 0/1/50), padded rows included."""
    model = trained_like(FULL, seed=2, **variant)
    maker = BatchMaker(FULL, seed=0)
    export_onnx(fused_serving_module(model), maker, tmp_path / "fused.onnx")
    report = check_parity(model.serving_module().eval(), tmp_path / "fused.onnx", maker, FP32, SHAPES)
    assert report.passed, report.table()
    assert len(report.rows) == 27 and report.max_abs_diff <= FP32.max_abs


def test_fused_graph_runs_fewer_kernels_than_the_plain_one(tmp_path: Path) -> None:
    model = trained_like(FULL, seed=3)
    maker = BatchMaker(FULL, seed=0)
    export_onnx(fused_serving_module(model), maker, tmp_path / "fused.onnx")
    export_onnx(model.serving_module().eval(), maker, tmp_path / "plain.onnx")
    fused, plain = graph_kernels(tmp_path / "fused.onnx"), graph_kernels(tmp_path / "plain.onnx")
    before = graph_kernels(tmp_path / "plain.onnx", disabled=())  # with every ONNX Runtime fusion on
    assert fused < plain and fused < before, (fused, plain, before)


def sid_tokens_of(model: PSAD) -> np.ndarray:
    """The item tokens a bundle of `model` would serve (vocabulary index -> token)."""
    sid = find_sid(model)
    assert sid is not None
    encoder = ItemEncoder("sid", TINY["d_model"], sid.levels, sid.codebook_size)
    return item_tokens(encoder, sid.known_codes().numpy(), CONTENT.n_items)


@pytest.mark.parametrize("form", SID_FORMS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()) or "default")
def test_fused_sid_scorer_computes_the_serving_modules_scores(variant: dict, form: str) -> None:
    """On tokens (OOV among them), the fused graph's item gather scores like the sid lookup."""
    model = trained_like(CONTENT, **SID_FORMS[form], **variant)
    fused, plain = fused_serving_module(model), model.serving_module().eval()
    assert isinstance(fused, FusedScorer)
    assert type(fused.items).__name__ == {"table": "TokenTable", "decode": "TokenDecode"}[form]
    tokens, maker = sid_tokens_of(model), BatchMaker(CONTENT, seed=1)
    for shape in ((1, 1, 0), (2, 10, 1), (3, 7, 13), (5, 30, 8)):
        inputs = maker.make(*shape)
        inputs["cand_items"][0, 0] = inputs["hist_items"][-1, :1] = OOV  # items without usable content
        inputs = {**inputs, "cand_items": tokens[inputs["cand_items"]], "hist_items": tokens[inputs["hist_items"]]}
        mask = inputs["cand_mask"]
        want, got = scores(plain, inputs), scores(fused, inputs)
        np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, rtol=0)
        assert (got[~mask] == want[~mask]).all()


@pytest.mark.parametrize("form", SID_FORMS)
def test_fused_sid_onnx_graph_passes_the_parity_gate_with_fewer_kernels(tmp_path: Path, form: str) -> None:
    """Against the model's own path from item indices to codes, at all 27 gate shapes; and fewer
    kernels than the plain sid graph."""
    model = trained_like(CONTENT, seed=4, **SID_FORMS[form], history_match=True)
    maker = BatchMaker(CONTENT, seed=0)
    export_onnx(fused_serving_module(model), maker, tmp_path / "fused.onnx")
    export_onnx(model.serving_module().eval(), maker, tmp_path / "plain.onnx")
    report = check_parity(RankScores(model), tmp_path / "fused.onnx", maker, FP32, SHAPES, tokens=sid_tokens_of(model))
    assert report.passed, report.table()
    assert graph_kernels(tmp_path / "fused.onnx") < graph_kernels(tmp_path / "plain.onnx")
