"""sid bundles: code tables, the assigner graph, the parity gate over codes, the checks that refuse a
bundle whose codes do not match its manifest, and the known-only vocabulary of a data set with cold items.

One tiny simulated data set with content vectors and cold items, one sid and one id run on it, each
exported once per session.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from export.contract.bundle import (
    ASSIGN_FILE,
    CODEBOOKS,
    ITEM_CODES_FILE,
    BundleError,
    ItemEncoder,
    item_tokens,
    served_item_bytes,
    verify_bundle,
)
from export.contract.content import sid_tokens
from export.contract.fixtures import BatchMaker
from export.contract.schema import OOV, FeatureSchema, Vocabularies
from export.exporter import RankScores, known_inputs, load_torch_model
from export.parity import FP32, ParityError, check_codes, check_parity, require_codes, require_parity
from export.runtime import load_bundle, synthetic_content
from export.triton import triton_config
from tests.test_runtime import _edit_manifest, _rehash
from training.checkpoint import load_run
from training.data.store import load_split, load_vocabs
from training.models.sid import find_sid

SHAPES = ((1, 1, 0), (2, 10, 1), (3, 7, 13))


@pytest.fixture
def sid_copy(sid_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session's sid bundle that a test may damage."""
    return Path(shutil.copytree(sid_bundle, tmp_path / "psad" / "1"))


def _known_val(run: Path) -> tuple[dict[str, np.ndarray], FeatureSchema]:
    """The run's validation inputs as its bundle reads them (cold items as OOV), and the run's schema."""
    _, _, schema = load_run(run)
    data = Path(json.loads((run / "config.json").read_text())["data_dir"])
    return load_split(data, "val", schema).inputs, schema


def _rank_scores(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return model.rank_scores({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


def test_sid_bundle_round_trip(sid_bundle: Path, sid_run: Path) -> None:
    """The code tables are written and checked, the bundle is known-only, and its graph on the
    bundle's tokens scores like the trained model on item indices."""
    model, _, run_schema = load_run(sid_run)
    assert 0 < run_schema.known_items < run_schema.n_items  # the fixture has cold items
    manifest = json.loads((sid_bundle / "manifest.json").read_text())
    sid = find_sid(model)
    assert sid is not None
    entry = manifest["item_encoder"]
    assert {k: entry[k] for k in ("kind", "levels", "codebook_size", "dim")} == {
        "kind": "sid",
        "levels": sid.levels,
        "codebook_size": sid.codebook_size,
        "dim": sid.codebooks.shape[2],
    }
    assert entry["parity"]["passed"] and len(entry["parity"]["checks"]) == 4
    assert {ITEM_CODES_FILE, ASSIGN_FILE} <= set(manifest["files"])
    bundle = load_bundle(sid_bundle, device="cpu")
    assert bundle.schema == run_schema.known_only() and bundle.schema.n_items == run_schema.n_known_items
    assert len(bundle.vocabs.items) == bundle.schema.n_items
    codes = np.load(sid_bundle / ITEM_CODES_FILE)
    assert codes.dtype == np.uint8 and np.array_equal(codes, sid.known_codes().numpy())
    assert bundle.item_encoder == "sid" and bundle.item_tokens[:2].tolist() == [0, 1]
    assert np.array_equal(bundle.item_tokens[2:], sid_tokens(codes[2:], sid.codebook_size))
    val, _ = _known_val(sid_run)
    maker = BatchMaker(bundle.schema, known_inputs(val, bundle.schema.n_items), seed=1)
    for shape in ((1, 1, 0), (64, 200, 50), (3, 7, 13)):
        inputs = maker.make(*shape)
        got, want, mask = bundle.score(bundle.tokens(inputs)), _rank_scores(model, inputs), inputs["cand_mask"]
        np.testing.assert_allclose(got[mask], want[mask], atol=FP32.max_abs, rtol=0)
    graph = onnx.load(str(sid_bundle / "model.onnx")).graph
    assert [list(t.dims) for t in graph.initializer if t.name == CODEBOOKS] == [list(sid.codebooks.shape)]


def test_parity_gate_catches_tampered_item_codes(sid_copy: Path, sid_run: Path) -> None:
    model = load_run(sid_run)[0]  # the weights model.onnx was exported from
    sid = find_sid(model)
    assert sid is not None
    schema = FeatureSchema.load(sid_copy / "schema.json")
    require_codes(check_codes(sid, schema, sid_copy, sid_copy / ASSIGN_FILE))  # intact: passes
    codes = np.load(sid_copy / ITEM_CODES_FILE)
    tampered = codes.copy()
    tampered[2:] = (tampered[2:].astype(np.int64) + 1) % sid.codebook_size
    np.save(sid_copy / ITEM_CODES_FILE, tampered)
    report = check_codes(sid, schema, sid_copy, sid_copy / ASSIGN_FILE)
    assert not report.passed and report.rows[0].mismatched == len(codes) - 2
    with pytest.raises(ParityError, match=r"item codes differ from the model's(.|\n)*item_codes\.npy == known_codes"):
        require_codes(report)
    encoder = ItemEncoder("sid", sid.codebooks.shape[2], sid.levels, sid.codebook_size)
    maker = BatchMaker(schema, seed=0)
    scores = check_parity(
        RankScores(model),
        sid_copy / "model.onnx",
        maker,
        shapes=SHAPES,
        tokens=item_tokens(encoder, tampered, len(codes)),
    )
    assert not scores.passed


def test_parity_gate_catches_a_tampered_codebook(sid_copy: Path, sid_run: Path) -> None:
    model = load_run(sid_run)[0]
    graph = onnx.load(str(sid_copy / "model.onnx"))
    init = next(t for t in graph.graph.initializer if t.name == CODEBOOKS)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, CODEBOOKS))
    onnx.save_model(graph, str(sid_copy / "model.onnx"))
    codes = np.load(sid_copy / ITEM_CODES_FILE)
    schema = FeatureSchema.load(sid_copy / "schema.json")
    encoder = ItemEncoder.from_dict(json.loads((sid_copy / "manifest.json").read_text())["item_encoder"], "manifest")
    tokens = item_tokens(encoder, codes, len(codes))
    report = check_parity(
        RankScores(model), sid_copy / "model.onnx", BatchMaker(schema, seed=0), shapes=SHAPES, tokens=tokens
    )
    with pytest.raises(ParityError, match="does not score like PyTorch"):
        require_parity(report)


def _save_codes(bundle: Path, codes: np.ndarray) -> None:
    np.save(bundle / ITEM_CODES_FILE, codes)
    _rehash(bundle, ITEM_CODES_FILE)


def _encoder(**changes: object) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        _edit_manifest(bundle, lambda m: m["item_encoder"].update(changes))

    damage.__name__ = "manifest_" + "_".join(f"{k}_{v}" for k, v in changes.items())
    return damage


def no_item_encoder(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m.pop("item_encoder"))


def codes_unlisted(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["files"].pop(ITEM_CODES_FILE))


def assign_unlisted(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["files"].pop(ASSIGN_FILE))


def codes_int64(bundle: Path) -> None:
    _save_codes(bundle, np.load(bundle / ITEM_CODES_FILE).astype(np.int64))


def codes_one_level_short(bundle: Path) -> None:
    _save_codes(bundle, np.load(bundle / ITEM_CODES_FILE)[:, :-1].copy())


def codes_one_row_short(bundle: Path) -> None:
    _save_codes(bundle, np.load(bundle / ITEM_CODES_FILE)[:-1].copy())


def code_past_the_codebook(bundle: Path) -> None:
    codes = np.load(bundle / ITEM_CODES_FILE)
    codes[5, 0] = json.loads((bundle / "manifest.json").read_text())["item_encoder"]["codebook_size"]
    _save_codes(bundle, codes)


def _edit_graph(bundle: Path, edit: Callable[[onnx.ModelProto, onnx.TensorProto], None]) -> None:
    model = onnx.load(str(bundle / "model.onnx"))
    edit(model, next(t for t in model.graph.initializer if t.name == CODEBOOKS))
    onnx.save_model(model, str(bundle / "model.onnx"))
    _rehash(bundle, "model.onnx")


def codebooks_renamed(bundle: Path) -> None:
    def edit(model: onnx.ModelProto, init: onnx.TensorProto) -> None:
        init.name = "other"
        for node in model.graph.node:
            node.input[:] = ["other" if i == CODEBOOKS else i for i in node.input]

    _edit_graph(bundle, edit)


def codebooks_one_code_short(bundle: Path) -> None:
    def edit(model: onnx.ModelProto, init: onnx.TensorProto) -> None:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:, :-1].copy(), CODEBOOKS))

    _edit_graph(bundle, edit)


def assign_two_codes_wide(bundle: Path) -> None:
    """An assign.onnx of the format's names whose codes are two wide, whatever the manifest says."""
    schema = FeatureSchema.load(bundle / "schema.json")
    n_cat, n_num = len(schema.content_categorical), len(schema.content_numeric)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["content_num"], ["as_int"], to=onnx.TensorProto.INT64),
            helper.make_node("Slice", ["as_int", "start", "end", "axis"], ["codes"]),
        ],
        "assign",
        [
            helper.make_tensor_value_info("content_cat", onnx.TensorProto.INT64, ["batch", n_cat]),
            helper.make_tensor_value_info("content_num", onnx.TensorProto.FLOAT, ["batch", n_num]),
        ],
        [helper.make_tensor_value_info("codes", onnx.TensorProto.INT64, ["batch", 2])],
        [numpy_helper.from_array(np.array([v]), n) for n, v in (("start", 0), ("end", 2), ("axis", 1))],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(bundle / ASSIGN_FILE))
    _rehash(bundle, ASSIGN_FILE)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (no_item_encoder, r"manifest\.json: no 'item_encoder' object"),
        (_encoder(kind="hash"), r"item_encoder\.kind 'hash' is not one of \['id', 'sid'\]"),
        (_encoder(levels=0), r"item_encoder\.levels must be a positive integer, got 0"),
        (_encoder(levels=True), r"item_encoder\.levels must be a positive integer, got True"),
        (_encoder(codebook_size="32"), r"item_encoder\.codebook_size must be a positive integer, got '32'"),
        (_encoder(codebook_size=512), r"codebook_size 512 exceeds 256"),
        (_encoder(levels=2), r"item_codes\.npy: shape \(\d+, 3\), expected \(n_items=\d+, levels=2\)"),
        (
            _encoder(codebook_size=64),
            r"model\.onnx: codebook initializer 'item_codebooks' is \[3, 32, 16\] .*"
            r"\[levels, codebook_size, dim\] = \[3, 64, 16\]",
        ),
        (_encoder(dim=17), r"model\.onnx: codebook initializer .* = \[3, 32, 17\]"),
        (codes_unlisted, r"a sid bundle lists no item_codes\.npy"),
        (assign_unlisted, r"a sid bundle lists no assign\.onnx"),
        (codes_int64, r"item_codes\.npy: dtype int64, expected uint8"),
        (codes_one_level_short, r"item_codes\.npy: shape \(\d+, 2\), expected \(n_items=\d+, levels=3\)"),
        (codes_one_row_short, r"item_codes\.npy: shape \(\d+, 3\), expected"),
        (code_past_the_codebook, r"item_codes\.npy: code 32 is outside the codebook \(codebook_size=32\)"),
        (codebooks_renamed, r"model\.onnx: no codebook initializer 'item_codebooks'"),
        (codebooks_one_code_short, r"model\.onnx: codebook initializer 'item_codebooks' is \[3, 31, 16\]"),
        (assign_two_codes_wide, r"assign\.onnx: output 'codes' is 2 codes wide, the manifest says levels=3"),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_a_sid_bundle_whose_codes_do_not_match_its_manifest_is_refused(
    sid_copy: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(sid_copy)
    with pytest.raises(BundleError, match=message):
        load_bundle(sid_copy, device="cpu", warmup=False)


def test_intact_sid_copy_verifies(sid_copy: Path) -> None:
    manifest, schema, _ = verify_bundle(sid_copy)
    assert manifest["item_encoder"]["kind"] == "sid" and schema.item_content


def test_assign_is_deterministic_and_matches_pytorch(sid_bundle: Path, sid_run: Path) -> None:
    """Same content -> same tokens: twice in one session, across sessions, and as the PyTorch assigner."""
    first, second = load_bundle(sid_bundle, device="cpu"), load_bundle(sid_bundle, device="cpu")
    content = synthetic_content(first.schema, 50, np.random.default_rng(7))
    tokens = first.assign(*content)
    assert tokens.dtype == np.int64 and tokens.shape == (50,)
    assert np.array_equal(tokens, first.assign(*content)) and np.array_equal(tokens, second.assign(*content))
    sid = find_sid(load_run(sid_run)[0])  # the weights model.onnx and assign.onnx were exported from
    assert sid is not None
    with torch.inference_mode():
        codes = sid.assigner().eval()(*(torch.from_numpy(a) for a in content)).numpy()
    assert np.array_equal(tokens, sid_tokens(codes, sid.codebook_size))
    assert first.assign(content[0][:0], content[1][:0]).shape == (0,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda c: (c[0].astype(np.int32), c[1]), r"content_cat: expected a numpy int64 array \[N, \d+\]"),
        (lambda c: (c[0], c[1][:, :-1]), r"content_num: expected a numpy float32 array \[N, 8\], got float32"),
        (lambda c: (c[0], c[1][:-1]), r"content_cat has 5 rows, content_num 4"),
    ],
)
def test_assign_rejects_malformed_content(sid_bundle: Path, args: Callable, message: str) -> None:
    bundle = load_bundle(sid_bundle, device="cpu", warmup=False)
    with pytest.raises(ValueError, match=message):
        bundle.assign(*args(synthetic_content(bundle.schema, 5, np.random.default_rng(0))))


def test_an_id_bundle_does_not_assign(cold_id_bundle: Path) -> None:
    bundle = load_bundle(cold_id_bundle, device="cpu", warmup=False)
    assert bundle.item_encoder == "id" and np.array_equal(bundle.item_tokens, np.arange(bundle.schema.n_items))
    with pytest.raises(ValueError, match="item_encoder is 'id'; only sid bundles assign codes"):
        bundle.assign(np.zeros((1, 0), np.int64), np.zeros((1, 8), np.float32))


def test_an_id_bundle_knows_only_the_training_items(cold_id_bundle: Path, cold_data: Path) -> None:
    """Its vocabulary stops at the known items, so a cold item is OOV to it, and it scores lists with
    cold items as the trained model does (which reads their rows as OOV too)."""
    manifest = json.loads((cold_id_bundle / "manifest.json").read_text())
    run = Path(manifest["source"]["run"])
    model, _, run_schema = load_run(run)
    bundle = load_bundle(cold_id_bundle, device="cpu")
    data_vocab = load_vocabs(cold_data, run_schema)
    assert bundle.vocabs.items.tokens == data_vocab.items.tokens[: run_schema.n_known_items - 2]
    cold = data_vocab.items.tokens[run_schema.n_known_items - 2 :]
    assert cold and set(bundle.vocabs.items.indices(cold)) == {OOV}
    val, _ = _known_val(run)
    has_cold = (val["cand_items"] >= run_schema.n_known_items).any(1)
    assert has_cold.any()
    inputs = {k: v[has_cold][:32] for k, v in val.items()}
    got = bundle.score(known_inputs(inputs, bundle.schema.n_items))
    want, mask = _rank_scores(model, inputs), inputs["cand_mask"]
    np.testing.assert_allclose(got[mask], want[mask], atol=FP32.max_abs, rtol=0)
    shadow = load_torch_model(cold_id_bundle)  # the teacher weights, cut to the known items
    with torch.inference_mode():
        shadow.rank_scores({k: torch.from_numpy(v) for k, v in known_inputs(inputs, bundle.schema.n_items).items()})
    assert Vocabularies.load(cold_id_bundle / "vocab.json", bundle.schema).items.tokens == bundle.vocabs.items.tokens


def test_triton_config_of_a_sid_bundle_keeps_the_model_inputs(sid_bundle: Path, cold_id_bundle: Path) -> None:
    schema = FeatureSchema.load(sid_bundle / "schema.json")
    assert (sid_bundle / "config.pbtxt").read_text() == triton_config("psad", schema)
    id_config = (cold_id_bundle / "config.pbtxt").read_text()
    assert (sid_bundle / "config.pbtxt").read_text().replace('"psad"', '"id"') == id_config
    graph = onnx.load(str(sid_bundle / "model.onnx")).graph
    assert [i.name for i in graph.input] == [i.name for i in onnx.load(str(cold_id_bundle / "model.onnx")).graph.input]


def test_served_item_bytes_for_a_ten_million_item_catalogue() -> None:
    """The issue's target, computed from the format at the default widths (d 32, 3 levels of 32)."""
    n = 10_000_000
    sid, ident = served_item_bytes(ItemEncoder("sid", 32, 3, 32)), served_item_bytes(ItemEncoder("id", 32))
    assert ident == {"per_item": 128, "runtime_per_item": 128, "fixed": 0, "runtime_fixed": 0}
    table = (2 + 32**3) * 32 * 4  # the sum of every code combination, which the fused graph gathers from
    assert sid == {
        "per_item": 3,
        "runtime_per_item": 8,
        "fixed": 3 * 32 * 32 * 4,
        "runtime_fixed": 3 * 32 * 32 * 4 + table,
    }
    assert n * sid["per_item"] + sid["fixed"] <= n * ident["per_item"] / 10
    assert n * sid["runtime_per_item"] + sid["runtime_fixed"] <= n * ident["runtime_per_item"] / 10


def test_assigner_of_categorical_and_numeric_content_exports_exactly(tmp_path: Path) -> None:
    """MovieLens-like content (a categorical genre and a numeric): assign.onnx and item_codes.npy pass
    the code checks, and a graph with the codebooks as one flattened table gets them as CODEBOOKS."""
    from export.exporter import export_onnx, write_sid_tables
    from tests.test_fusion import CONTENT, SID, trained_like

    model = trained_like(CONTENT, seed=5, **SID)
    sid = find_sid(model)
    assert sid is not None and CONTENT.content_categorical and CONTENT.content_numeric
    export_onnx(model.serving_module().eval(), BatchMaker(CONTENT, seed=0), tmp_path / "model.onnx")  # the plain lookup
    write_sid_tables(sid, CONTENT, tmp_path)
    assert np.array_equal(np.load(tmp_path / ITEM_CODES_FILE), sid.known_codes().numpy())
    report = require_codes(check_codes(sid, CONTENT, tmp_path, tmp_path / ASSIGN_FILE))
    assert [r.items for r in report.rows] == [CONTENT.n_items, CONTENT.n_items - 2, 256, 256]
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [list(t.dims) for t in graph.initializer if t.name == CODEBOOKS] == [list(sid.codebooks.shape)]


def test_the_shadow_teacher_re_decodes_recorded_tokens_as_the_run_decodes_item_indices(
    sid_bundle: Path, sid_run: Path
) -> None:
    """A sid bundle's records hold tokens; its teacher (the served student's epoch, whose codes the
    tokens name) re-decodes them into the order the run's model gives the item indices."""
    import torch

    from psad.shadow.consumer import Teachers
    from service.model_repo import LocalRepo

    bundle = load_bundle(sid_bundle, warmup=False)
    teacher = Teachers(LocalRepo(str(sid_bundle.parent.parent))).get("psad", 1)
    model = load_run(sid_run, "student")[0].eval()
    maker = BatchMaker(bundle.schema, seed=3)
    for length, history in ((10, 8), (4, 0), (10, 20)):
        inputs = maker.make(1, length, history, pad_last=False)
        recorded = bundle.tokens(inputs)
        want = model.teacher_decode({k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy()
        np.testing.assert_array_equal(teacher.order(recorded, length), want)
