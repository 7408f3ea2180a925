"""The sid item encoder (training/models/sid.py): deterministic assignment, straight-through gradients,
the UID anchor, cold items, and the served token lookup scoring exactly as the PyTorch model."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.contract.inputs import EncodedProfile, assemble
from export.contract.schema import INPUT_NAMES, OOV, CategoricalFeature, FeatureSchema, NumericFeature
from training.models.config import ARCHS, ConfigError, ModelConfig
from training.models.registry import build_model
from training.models.reranker import served_inputs
from training.models.sid import codes_to_tokens, find_sid

N_ITEMS, KNOWN = 40, 32  # rows 32..39: catalogue items first seen after training (cold)
SCHEMA = FeatureSchema(
    n_items=N_ITEMS,
    actions=("click", "buy"),
    max_history=8,
    max_list=12,
    user_categorical=(CategoricalFeature("gender", 4),),
    item_categorical=(CategoricalFeature("genre", 6), CategoricalFeature("studio", 5)),
    item_numeric=(NumericFeature("year", 1990.0, 10.0), NumericFeature("popularity", 1.0, 2.0)),
    candidate_numeric=(NumericFeature("rank_score", 0.5, 0.2),),
    item_content=("genre", "year"),
    known_items=KNOWN,
)
TINY = {"d_model": 8, "n_heads": 2, "teacher_layers": 1, "student_hidden": 8, "dropout": 0.0}
SID = {"item_encoder": "sid", "sid_levels": 2, "sid_codebook_size": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def item_tables() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    cat = torch.stack(
        [torch.randint(2, 6, (N_ITEMS,), generator=gen), torch.randint(2, 5, (N_ITEMS,), generator=gen)], 1
    )
    num = torch.stack([1990 + 10 * torch.randn(N_ITEMS, generator=gen), torch.randn(N_ITEMS, generator=gen)], 1)
    cat[:2], num[:2] = 0, torch.tensor([1990.0, 1.0])  # reserved rows: missing content (numerics at the mean)
    return cat, num


def make_model(arch: str = "psad", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cat, num = item_tables()
    return build_model(ModelConfig(**{**TINY, **SID, "arch": arch, **overrides}), SCHEMA, cat, num)


def make_inputs(seed: int = 0, items_high: int = N_ITEMS) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    profiles = [
        EncodedProfile(
            user_cat=rng.integers(0, 4, 1),
            user_num=np.zeros(0, np.float32),
            hist_items=rng.integers(1, items_high, h),
            hist_ts=np.sort(rng.integers(0, 10_000_000, h)),
            hist_actions=rng.integers(2, 4, h),
        )
        for h in (5, 0, 8)
    ]
    items = [rng.integers(1, items_high, n) for n in (6, 3, 12)]
    nums = [rng.random((len(c), 1)).astype(np.float32) for c in items]
    arrays = assemble(SCHEMA, profiles, items, nums, now=[20_000_000.0] * 3)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def test_the_assignment_is_deterministic_at_inference():
    model = make_model().eval()
    sid = find_sid(model)
    first = sid.known_codes()
    assert torch.equal(first, sid.known_codes())
    assert torch.equal(first, make_model().eval().upn.items.sid.known_codes())  # same seed, same codes
    cat, num = sid.content_cat[KNOWN:], sid.content_num[KNOWN:]
    assert torch.equal(sid.assigner()(cat, num), sid.assigner()(cat.clone(), num.clone()))
    assert first.shape == (KNOWN, 2) and int(first.max()) < 4 and not first[0].any()


def test_the_straight_through_choice_passes_gradients_to_codebooks_and_the_assignment_network():
    model = make_model().train()
    losses = model(make_inputs(), torch.ones(3, 12))
    assert "anchor" in losses and float(losses["anchor"].detach()) > 0
    losses["loss"].backward()
    sid = find_sid(model)
    for name, parameter in [("codebooks", sid.codebooks), *sid.assign.levels.named_parameters()]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert sid.content.cats[0].weight.grad.abs().sum() > 0
    assert sid.uid.weight.grad.abs().sum() > 0  # the anchor's collaborative side is trained


def test_the_forward_pass_uses_the_hard_choice_while_training():
    model = make_model().train()
    sid = find_sid(model)
    items = torch.arange(2, KNOWN)
    with torch.no_grad():
        trained = sid.assign(sid._vectors(items, 0.0)[0])[1]
        model.eval()
        evaluated = sid.assign(sid._vectors(items, 0.0)[0])[1]
    torch.testing.assert_close(trained, evaluated)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("history_match", [False, True])
def test_served_tokens_score_as_the_pytorch_model(arch: str, history_match: bool):
    model = make_model(arch, history_match=history_match).eval()
    inputs = make_inputs()
    with torch.no_grad():
        expected = model.rank_scores(inputs)
        got = model.serving_module().eval()(*served_inputs(model, inputs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cold_items_are_ranked_from_their_content_and_id_models_treat_them_as_oov():
    sid_model = make_model().eval()
    sid = find_sid(sid_model)
    cold = torch.arange(KNOWN, N_ITEMS)
    content_codes = sid.assigner()(sid.content_cat[cold], sid.content_num[cold])
    with torch.no_grad():
        via_index = sid(cold)
        via_codes = sid.served()(codes_to_tokens(content_codes, sid.codebook_size))
    torch.testing.assert_close(via_index, via_codes)
    assert len({tuple(c) for c in content_codes.tolist()}) > 1  # content tells cold items apart
    id_model = make_model(item_encoder="id").eval()
    items = id_model.upn.items
    with torch.no_grad():
        torch.testing.assert_close(items.lookup(cold), items.lookup(torch.full_like(cold, OOV)))
        assert items.table().shape == (KNOWN, 8)


def test_a_sid_model_needs_content_and_its_config_is_checked():
    with pytest.raises(ValueError, match="item_content"):
        cat, num = item_tables()
        build_model(ModelConfig(**TINY, **SID), dataclasses.replace(SCHEMA, item_content=()), cat, num)
    with pytest.raises(ConfigError, match="sid_codebook_size"):
        ModelConfig(sid_codebook_size=257)
    with pytest.raises(ConfigError, match="item_encoder"):
        ModelConfig(item_encoder="hash")


def test_a_sid_model_holds_no_per_item_embedding_in_its_served_graph():
    model = make_model().eval()
    served = model.serving_module()
    state = {k: tuple(v.shape) for k, v in served.state_dict().items() if k.startswith("items.")}
    assert state["items.flat"] == (2 * 4, 8)
    assert all(N_ITEMS not in shape and KNOWN not in shape for shape in state.values())


def test_the_served_graph_and_the_assigner_export_to_onnx_and_agree_with_pytorch(tmp_path):
    model = make_model(history_match=True).eval()
    scorer, sid = model.serving_module().eval(), find_sid(model)
    inputs = served_inputs(model, make_inputs())
    axes = {name: {0: "batch"} for name in INPUT_NAMES}
    for name in INPUT_NAMES:
        if name.startswith(("hist_", "cand_")):
            axes[name][1] = "history" if name.startswith("hist_") else "list"
    with torch.no_grad():
        torch.onnx.export(
            scorer,
            tuple(inputs),
            str(tmp_path / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=["scores"],
            dynamic_axes={**axes, "scores": {0: "batch", 1: "list"}},
            opset_version=17,
            dynamo=False,
        )
        cold = torch.arange(KNOWN, N_ITEMS)
        content = (sid.content_cat[cold], sid.content_num[cold])
        torch.onnx.export(
            sid.assigner(),
            content,
            str(tmp_path / "assign.onnx"),
            input_names=["content_cat", "content_num"],
            output_names=["codes"],
            dynamic_axes={"content_cat": {0: "n"}, "content_num": {0: "n"}, "codes": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
        expected = scorer(*served_inputs(model, make_inputs(seed=5))).numpy()
        codes = sid.assigner()(*content).numpy()
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = dict(zip(INPUT_NAMES, (t.numpy() for t in served_inputs(model, make_inputs(seed=5))), strict=True))
    feed = {i.name: feed[i.name] for i in session.get_inputs()}  # a zero-width input is pruned
    np.testing.assert_allclose(session.run(None, feed)[0], expected, rtol=1e-5, atol=1e-5)
    assign = ort.InferenceSession(str(tmp_path / "assign.onnx"), providers=["CPUExecutionProvider"])
    got = assign.run(None, {"content_cat": content[0].numpy()[:3], "content_num": content[1].numpy()[:3]})[0]
    np.testing.assert_array_equal(got, codes[:3])
