"""PSAD model family: masking, equivariance, decoding, training signal, serving and ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from export.contract.inputs import EncodedProfile, assemble
from export.contract.schema import INPUT_NAMES, CategoricalFeature, FeatureSchema, NumericFeature
from training.models.config import ModelConfig
from training.models.psad import PSAD, SHOWN
from training.models.student import PAD_SCORE, Student

N_ITEMS = 40
SCHEMA = FeatureSchema(
    n_items=N_ITEMS,
    actions=("click", "buy"),
    max_history=8,
    max_list=12,
    user_categorical=(CategoricalFeature("gender", 4),),
    user_numeric=(NumericFeature("age", 30.0, 10.0),),
    item_categorical=(CategoricalFeature("genre", 6),),
    item_numeric=(NumericFeature("popularity", 1.0, 2.0),),
    candidate_numeric=(NumericFeature("rank_score", 0.5, 0.2),),
)
TINY = {"d_model": 8, "n_heads": 2, "teacher_layers": 1, "student_hidden": 8, "dropout": 0.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only spin against the other tests on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int = 0, **overrides) -> PSAD:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(123)
    item_cat = torch.randint(0, 6, (N_ITEMS, 1), generator=gen)
    item_num = torch.randn(N_ITEMS, 1, generator=gen)
    return PSAD(ModelConfig(**{**TINY, **overrides}), SCHEMA, item_cat, item_num)


def profile(rng: np.random.Generator, history: int) -> EncodedProfile:
    return EncodedProfile(
        user_cat=rng.integers(0, 4, 1),
        user_num=rng.normal(30, 10, 1).astype(np.float32),
        hist_items=rng.integers(2, N_ITEMS, history),
        hist_ts=np.sort(rng.integers(0, 10_000_000, history)),
        hist_actions=rng.integers(2, 4, history),
    )


def make_inputs(lengths: list[int], histories: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch assembled by the real input assembly (export.contract.inputs.assemble)."""
    rng = np.random.default_rng(seed)
    profiles = [profile(rng, h) for h in histories]
    items = [rng.integers(2, N_ITEMS, n) for n in lengths]
    nums = [rng.random((n, 1)).astype(np.float32) for n in lengths]
    arrays = assemble(SCHEMA, profiles, items, nums, now=[20_000_000.0] * len(lengths))
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def pad(inputs: dict[str, torch.Tensor], extra_list: int, extra_history: int) -> dict[str, torch.Tensor]:
    """The same batch with more padded candidate and history slots (junk values under the mask)."""
    out = dict(inputs)
    for names, extra in (
        (("hist_items", "hist_actions", "hist_age", "hist_mask"), extra_history),
        (("cand_items", "cand_num", "cand_mask"), extra_list),
    ):
        for name in names:
            t = inputs[name]
            shape = (t.shape[0], extra, *t.shape[2:])
            junk = (
                torch.zeros(shape, dtype=torch.bool) if t.dtype == torch.bool else torch.full(shape, 3, dtype=t.dtype)
            )
            out[name] = torch.cat([t, junk], dim=1)
    return out


# the default inputs, with the history-match features, and with features only (configs/trivago.toml)
INPUT_VARIANTS = [{}, {"history_match": True}, {"history_match": True, "item_ids": False}]


@pytest.mark.parametrize("variant", INPUT_VARIANTS)
def test_padding_never_changes_a_score(variant: dict):
    model = make_model(**variant).eval()
    inputs = make_inputs([5, 3], [4, 0])
    with torch.no_grad():
        base = model.rank_scores(inputs)
        padded = model.rank_scores(pad(inputs, extra_list=4, extra_history=3))
    mask = inputs["cand_mask"]
    torch.testing.assert_close(padded[:, : mask.shape[1]][mask], base[mask], atol=1e-5, rtol=1e-5)
    assert (padded[:, mask.shape[1] :] == PAD_SCORE).all()
    assert (base[~mask] == PAD_SCORE).all()


def _permute_candidates(inputs: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: (v[:, perm] if k.startswith("cand_") else v) for k, v in inputs.items()}


def test_scores_are_permutation_equivariant_without_position_encoding():
    model = make_model(position_encoding=False).eval()
    inputs = make_inputs([7, 4], [5, 2])
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model.rank_scores(inputs)
        permuted = model.rank_scores(_permute_candidates(inputs, perm))
    torch.testing.assert_close(permuted, base[:, perm], atol=1e-5, rtol=1e-5)


def test_position_encoding_makes_order_matter():
    model = make_model().eval()
    with torch.no_grad():
        model.upn.positions.weight.normal_()
        inputs = make_inputs([7], [3])
        perm = torch.tensor([6, 5, 4, 3, 2, 1, 0])
        base = model.rank_scores(inputs)
        permuted = model.rank_scores(_permute_candidates(inputs, perm))
    assert not torch.allclose(permuted, base[:, perm], atol=1e-4)


def test_student_head_is_equivariant_given_candidate_reps():
    torch.manual_seed(0)
    student = Student(ModelConfig(**TINY)).eval()
    x, u = torch.randn(2, 6, 8), torch.randn(2, 8)
    mask = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(student(x[:, perm], u, mask[:, perm]), student(x, u, mask)[:, perm])


@settings(max_examples=25, deadline=None)
@given(data=st.data(), width=st.integers(1, 12))
def test_teacher_decoding_is_a_valid_permutation(data: st.DataObject, width: int):
    block = data.draw(st.integers(1, width + 2), label="block_size")
    lengths = data.draw(st.lists(st.integers(1, width), min_size=1, max_size=3), label="lengths")
    lengths[0] = width  # the batch is padded to `width`
    model = make_model(block_size=block).eval()
    inputs = make_inputs(lengths, [3] * len(lengths), seed=sum(lengths) + width)
    perm = model.teacher_decode(inputs)
    assert perm.shape == (len(lengths), width)
    for row, n in zip(perm.tolist(), lengths, strict=True):
        assert sorted(row) == list(range(width))
        assert sorted(row[:n]) == list(range(n))  # valid candidates first, padded ones last
    assert model.teacher.last_decode_steps == model.decode_steps(width) == -(-width // block)


@pytest.mark.parametrize(("block", "steps"), [(10, 1), (1, 10), (4, 3), (25, 1)])
def test_decode_loop_runs_ceil_l_over_b_network_steps(block: int, steps: int):
    model = make_model(block_size=block).eval()
    model.teacher_decode(make_inputs([10, 6], [2, 2]))
    assert model.decode_steps(10) == steps
    assert model.teacher.last_decode_steps == steps


def test_block_decoding_matches_teacher_forcing():
    """Greedy decoding and teacher forcing share one code path: forcing the greedy permutation
    gives the lowest possible loss structure, i.e. every slot's target is its argmax."""
    model = make_model(block_size=3).eval()
    inputs = make_inputs([8], [4])
    perm = model.teacher_decode(inputs)
    x, u = model.upn(*(inputs[n] for n in INPUT_NAMES))
    enc = model.teacher.encode(x, inputs["cand_mask"])
    ranks = torch.arange(8)
    item_rank = torch.empty_like(perm).scatter_(1, perm, ranks[None])
    with torch.no_grad():
        logits = model.teacher.pointer_logits(enc, model.teacher.pointer_keys(enc, u), item_rank, ranks)[0]
    for r in range(8):
        allowed = item_rank[0] >= r
        assert int(logits[r].masked_fill(~allowed, -torch.inf).argmax()) == int(perm[0, r])


def test_teacher_loss_accepts_any_remaining_click_on_its_own_prefix_and_skips_the_tail():
    """Slot r given the prefix's first r items: -log of the summed probability of the remaining
    clicked items; the slots after the last click carry no loss."""
    model = make_model(block_size=2).eval()
    inputs = make_inputs([6], [3])
    mask = inputs["cand_mask"]
    x, u = model.upn(*(inputs[n] for n in INPUT_NAMES))
    enc = model.teacher.encode(x, mask)
    prefix = torch.tensor([[3, 0, 1, 2, 4, 5]])
    labels = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])  # clicked: candidates 1 and 3
    item_rank = torch.empty_like(prefix).scatter_(1, prefix, torch.arange(6)[None])
    with torch.no_grad():
        loss = model.teacher.loss(enc, u, mask, labels, prefix)
        logits = model.teacher.pointer_logits(enc, model.teacher.pointer_keys(enc, u), item_rank, torch.arange(6))[0]
    expected = []
    for r, accepted in [(0, [1, 3]), (1, [1]), (2, [1])]:  # from rank 3 on no click remains
        log_p = torch.log_softmax(logits[r].masked_fill(item_rank[0] < r, -torch.inf), -1)
        expected.append(-torch.logsumexp(log_p[accepted], -1))
    torch.testing.assert_close(loss, torch.stack(expected).mean())


@pytest.mark.parametrize("distill", ["listwise", "rd", "none"])
@pytest.mark.parametrize("student_loss", ["listwise", "bce"])
def test_no_nan_with_empty_history_or_no_positive(distill: str, student_loss: str):
    model = make_model(distill=distill, student_loss=student_loss, rd_warmup_steps=0)
    inputs = make_inputs([5, 1], [0, 0])
    assert inputs["hist_items"].shape[1] == 0
    out = model(inputs, torch.zeros(2, 5), step=10)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if distill == "none":
        assert float(out["distill"]) == 0.0


def test_all_history_masked_gives_finite_scores():
    model = make_model().eval()
    inputs = make_inputs([4], [3])
    inputs["hist_mask"][:] = False
    with torch.no_grad():
        assert torch.isfinite(model.rank_scores(inputs)).all()


@pytest.mark.parametrize("distill", ["listwise", "rd"])
def test_optimizer_steps_lower_the_loss(distill: str):
    model = make_model(distill=distill, block_size=2)
    inputs = make_inputs([8, 6, 8, 5], [4, 0, 6, 2], seed=3)
    labels = (torch.arange(8)[None].expand(4, -1) % 3 == 0).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(30):
        out = model(inputs, labels, step=step)
        first = float(out["loss"].detach()) if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        last = model(inputs, labels, step=30)
    assert float(last["loss"]) < 0.7 * first
    assert float(last["teacher"]) < float(out["teacher"]) + 1.0


def test_serving_module_matches_rank_scores():
    model = make_model().eval()
    inputs = make_inputs([6, 2], [5, 0])
    with torch.no_grad():
        served = model.serving_module()(*(inputs[n] for n in INPUT_NAMES))
        torch.testing.assert_close(served, model.rank_scores(inputs))


def test_ablation_without_upn_trains_and_scores():
    model = make_model(use_upn=False)
    inputs = make_inputs([5, 3], [2, 0])
    out = model(inputs, torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert not hasattr(model.upn, "cand_read")


def test_history_match_counts_each_action_on_the_candidates_own_item_and_its_recency():
    """Candidates 5, 7, 9 and a padded slot against a hand-made history (actions: 2 click, 3 buy)."""
    match = make_model(history_match=True).upn.match
    hist_items = torch.tensor([[7, 5, 7, 1, 9]])  # 1 = OOV: an unknown item is nobody's repeat
    hist_actions = torch.tensor([[2, 3, 3, 2, 2]])
    hist_age = torch.tensor([[3.0, 1.0, 0.5, 0.1, 0.2]])
    hist_mask = torch.tensor([[True, True, True, True, False]])  # 9's behaviour is padding
    cand_items = torch.tensor([[5, 7, 9, 1, 0]])
    got = match.features(cand_items, hist_items, hist_actions, hist_age, hist_mask)[0]
    expected = torch.zeros(5, SCHEMA.n_actions + 2)
    expected[0, 3], expected[0, -2], expected[0, -1] = np.log1p(1), 1 / (1 + 1.0), 1 / (1 + 1)  # 5: bought a day ago
    expected[1, 2], expected[1, 3] = np.log1p(1), np.log1p(1)  # 7: clicked and bought; the later behaviour
    expected[1, -2], expected[1, -1] = 1 / (1 + 0.5), 1 / (1 + 0)  # is the last known one (the OOV is not)
    torch.testing.assert_close(got[:, :-2], expected[:, :-2])
    torch.testing.assert_close(got[:, -2:], expected[:, -2:], atol=1e-8, rtol=1e-6)
    empty = match.features(cand_items, *(t[:, :0] for t in (hist_items, hist_actions, hist_age, hist_mask)))
    assert (
        empty.shape == (1, 5, SCHEMA.n_actions + 2) and (empty[..., :-2] == 0).all() and (empty[..., -2:] < 1e-8).all()
    )
    assert make_model().upn.match is None and make_model(use_upn=False, history_match=True).upn.match is None


def test_without_item_ids_an_item_is_its_features():
    """Two items with the same side tables embed alike, whatever their ids."""
    model = make_model(item_ids=False).eval()
    table, cats = model.upn.items.table(), model.upn.items.item_cat[:, 0]
    a, b = next((i, j) for i in range(2, N_ITEMS) for j in range(i + 1, N_ITEMS) if cats[i] == cats[j])
    model.upn.items.item_num[b] = model.upn.items.item_num[a]
    table = model.upn.items.table()
    torch.testing.assert_close(table[a], table[b])
    assert model.upn.items.ids is None and make_model().upn.items.ids is not None


def test_item_tables_are_persistent_buffers():
    state = make_model().state_dict()
    assert state["upn.items.item_cat"].shape == (N_ITEMS, 1)
    assert state["upn.items.item_num"].shape == (N_ITEMS, 1)
    assert "upn.items.cand_num_mean" in state


def test_item_table_shape_is_checked():
    with pytest.raises(ValueError, match="item_cat has shape"):
        PSAD(ModelConfig(**TINY), SCHEMA, torch.zeros(N_ITEMS, 2, dtype=torch.long), torch.zeros(N_ITEMS, 1))
    with pytest.raises(ValueError, match="genre"):
        PSAD(ModelConfig(**TINY), SCHEMA, torch.full((N_ITEMS, 1), 6), torch.zeros(N_ITEMS, 1))


@pytest.mark.parametrize("variant", INPUT_VARIANTS)
def test_onnx_export_matches_pytorch(tmp_path, variant: dict):
    """The serving module exports with dynamic batch/list/history axes and ONNX Runtime agrees
    with PyTorch at other shapes, including a single candidate and an empty history."""
    model = make_model(**variant).eval()
    scorer = model.serving_module().eval()
    example = make_inputs([7, 5], [5, 3])
    path = tmp_path / "student.onnx"
    axes = {name: {0: "batch"} for name in INPUT_NAMES}
    for name in ("hist_items", "hist_actions", "hist_age", "hist_mask"):
        axes[name][1] = "history"
    for name in ("cand_items", "cand_num", "cand_mask"):
        axes[name][1] = "list"
    with torch.no_grad():
        torch.onnx.export(
            scorer,
            tuple(example[n] for n in INPUT_NAMES),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["scores"],
            dynamic_axes={**axes, "scores": {0: "batch", 1: "list"}},
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for lengths, histories in (([1], [0]), ([7, 3, 1], [5, 0, 2])):
        inputs = make_inputs(lengths, histories, seed=7)
        with torch.no_grad():
            expected = scorer(*(inputs[n] for n in INPUT_NAMES)).numpy()
        got = session.run(None, {n: inputs[n].numpy() for n in INPUT_NAMES})[0]
        assert got.shape == expected.shape
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_click_loss_is_the_bce_of_each_shown_item_at_its_displayed_slot():
    """teacher_target "shown": slot r's pointer logit of the item displayed at r, given the items
    displayed in earlier blocks, against its click; padded slots carry no loss."""
    model = make_model(block_size=2, teacher_target="shown").eval()
    inputs = make_inputs([5, 3], [4, 0])
    mask = inputs["cand_mask"]
    shown = torch.tensor([[4, 2, 0, 1, 3], [1, 0, 2, 3, 4]])  # list 2: 3 candidates, padded ones last
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0, 1.0]])  # padded labels are junk
    with torch.no_grad():
        x, u = model._represent(inputs)
        enc = model.teacher.encode(x, mask)
        got = model.teacher.click_loss(enc, u, mask, labels, shown)
        keys = model.teacher.pointer_keys(enc, u)
        terms = []
        for b, n in enumerate((5, 3)):
            rank_of = torch.full((1, 5), 5)  # unplaced
            for r in range(n):
                rank_of[0, shown[b, r]] = r
            logits = model.teacher.pointer_logits(
                enc[b : b + 1], (keys[0][b : b + 1], keys[1][b : b + 1]), rank_of, torch.arange(5)
            )
            for r in range(n):
                item = shown[b, r]
                terms.append(torch.nn.functional.binary_cross_entropy_with_logits(logits[0, r, item], labels[b, item]))
    torch.testing.assert_close(got, torch.stack(terms).mean())
    model.train()
    with pytest.raises(ValueError, match=r"teacher_target = \"shown\" trains on inputs\['shown_order'\]"):
        model(inputs, labels)
    out = model({**inputs, SHOWN: shown}, labels)
    out["loss"].backward()
    assert torch.isfinite(out["teacher"]) and model.teacher.pointer_q.weight.grad.abs().sum() > 0
