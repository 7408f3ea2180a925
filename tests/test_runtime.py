"""The service's loader: integrity checks, provider reporting, thread settings, input checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from export.contract.bundle import BundleError, sha256, verify_bundle
from export.contract.fixtures import BatchMaker
from export.contract.schema import CategoricalFeature, FeatureSchema, NumericFeature, model_inputs
from export.runtime import CPU, load_bundle


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session's bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "psad" / "1"))


def _edit_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _rehash(bundle: Path, name: str) -> None:
    """Record a file's new sha256, as a buggy exporter (not a copy error) would have."""

    def edit(m: dict) -> None:
        m["files"][name] = {"sha256": sha256(bundle / name), "bytes": (bundle / name).stat().st_size}

    _edit_manifest(bundle, edit)


def flip_byte(bundle: Path) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))


def remove_vocab(bundle: Path) -> None:
    (bundle / "vocab.json").unlink()


def truncate_onnx(bundle: Path) -> None:
    data = (bundle / "model.onnx").read_bytes()
    (bundle / "model.onnx").write_bytes(data[: len(data) // 3])
    _rehash(bundle, "model.onnx")


def schema_file_from_the_future(bundle: Path) -> None:
    schema = json.loads((bundle / "schema.json").read_text())
    schema["version"] = 99
    (bundle / "schema.json").write_text(json.dumps(schema))
    _rehash(bundle, "schema.json")


def manifest_schema_version(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m.update(schema_version=99))


def manifest_not_json(bundle: Path) -> None:
    (bundle / "manifest.json").write_text('{"files": {"model.onnx": ')


def manifest_tampered_inputs(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["inputs"].reverse())


def manifest_tampered_hash(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["files"]["vocab.json"].update(sha256="0" * 64))


def manifest_missing(bundle: Path) -> None:
    (bundle / "manifest.json").unlink()


def manifest_version_bool(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m.update(version=True))


def graph_disagrees_with_schema(bundle: Path) -> None:
    """schema.json gains a candidate feature the graph does not take; the manifest agrees with it."""
    schema = json.loads((bundle / "schema.json").read_text())
    schema["candidate_numeric"].append({"name": "extra", "mean": 0.0, "std": 1.0})
    (bundle / "schema.json").write_text(json.dumps(schema))
    _rehash(bundle, "schema.json")

    def edit(m: dict) -> None:
        m["schema"] = schema
        next(i for i in m["inputs"] if i["name"] == "cand_num")["dims"][2] = str(len(schema["candidate_numeric"]))

    _edit_manifest(bundle, edit)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (flip_byte, r"model\.onnx: sha256 mismatch"),
        (remove_vocab, r"vocab\.json: missing"),
        (truncate_onnx, r"model\.onnx: ONNX Runtime cannot load it"),
        (schema_file_from_the_future, r"schema\.version is 99, this release reads version 1"),
        (manifest_schema_version, r"manifest\.json: schema_version 99, this release reads 1"),
        (manifest_not_json, r"manifest\.json: not valid JSON"),
        (manifest_tampered_inputs, r"manifest\.json: inputs .* differ from the schema's model inputs"),
        (manifest_tampered_hash, r"vocab\.json: sha256 mismatch"),
        (manifest_missing, r"manifest\.json: missing"),
        (manifest_version_bool, r"manifest\.json: 'version' must be a int"),
        (graph_disagrees_with_schema, r"model\.onnx: the warm-up run .* failed \(InvalidArgument: .*cand_num"),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_damaged_bundles_are_refused(bundle_copy: Path, damage: Callable[[Path], None], message: str) -> None:
    damage(bundle_copy)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy, device="cpu")


@pytest.mark.parametrize("place", ["psad/7", "other/1"])
def test_a_bundle_outside_its_name_and_version_directory_is_refused(
    tiny_bundle: Path, tmp_path: Path, place: str
) -> None:
    """The service finds versions by directory and reports the manifest's: they must agree."""
    copy = shutil.copytree(tiny_bundle, tmp_path / place)
    with pytest.raises(BundleError, match=rf"manifest\.json: says psad/1 but the bundle is in {place} "):
        load_bundle(copy, device="cpu")


@pytest.mark.parametrize("cause", ["graph", "crash"])
def test_a_version_that_fails_to_load_is_refused_once_while_polling(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    """A bad graph, or any other failure of the loader: refused and counted once, not retried every poll."""
    from prometheus_client import REGISTRY

    from service import model_store
    from service.settings import Settings

    attempts: list[str] = []

    def load(path: Path, **kwargs) -> object:
        attempts.append(path.name)
        if cause == "crash" and path.name == "2":
            raise RuntimeError("CUDA out of memory")
        return load_bundle(path, **kwargs)

    monkeypatch.setattr(model_store, "load_bundle", load)
    store = model_store.ModelStore(Settings(model_repo=bundle_copy.parent.parent, device="cpu"))
    refused = {"result": "refused"}
    before = REGISTRY.get_sample_value("psad_model_reload_total", refused) or 0

    async def serve_and_poll() -> None:
        await store.start()
        bad = shutil.copytree(bundle_copy, bundle_copy.parent / "2")
        _edit_manifest(bad, lambda m: m.update(version=2))
        graph_disagrees_with_schema(bad)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(store.poll(0.01), 0.5)

    asyncio.run(serve_and_poll())
    assert attempts == ["1", "2"] and store.current is not None and store.current.version == 1
    assert REGISTRY.get_sample_value("psad_model_reload_total", refused) == before + 1


def test_intact_copy_verifies(bundle_copy: Path) -> None:
    manifest, schema, vocabs = verify_bundle(bundle_copy)
    assert manifest["version"] == 1 and len(vocabs.items) == schema.n_items


def test_the_model_signature_is_the_one_exported_bundles_carry() -> None:
    """Spelled out here on purpose: every bundle already exported lists these inputs in its manifest,
    and load_bundle refuses one whose list differs from model_inputs(schema). Renaming, reordering or
    retyping an input orphans every bundle in every model repository."""
    schema = FeatureSchema(
        n_items=10,
        actions=("click",),
        max_history=4,
        max_list=5,
        user_categorical=(CategoricalFeature("a", 3), CategoricalFeature("b", 4)),
        user_numeric=(NumericFeature("x"), NumericFeature("y"), NumericFeature("z")),
    )
    assert [(s.name, s.dtype, s.dims) for s in model_inputs(schema)] == [
        ("user_cat", "int64", ("batch", "2")),
        ("user_num", "float32", ("batch", "3")),
        ("hist_items", "int64", ("batch", "history")),
        ("hist_actions", "int64", ("batch", "history")),
        ("hist_age", "float32", ("batch", "history")),
        ("hist_mask", "bool", ("batch", "history")),
        ("cand_items", "int64", ("batch", "list")),
        ("cand_num", "float32", ("batch", "list", "1")),
        ("cand_mask", "bool", ("batch", "list")),
    ]


def test_cuda_request_falls_back_to_cpu_and_says_so(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present: the fallback cannot be observed here")
    with caplog.at_level(logging.INFO, logger="export.runtime"):
        bundle = load_bundle(tiny_bundle, device="cuda")
    assert bundle.provider == CPU == bundle.session.get_providers()[0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "device=cuda, running on CPUExecutionProvider" in warnings[0].getMessage()


def test_session_settings_and_metadata(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle, device="cpu", threads=2)
    options = bundle.session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert load_bundle(tiny_bundle, device="cpu", warmup=False).session.get_session_options().intra_op_num_threads == 1
    assert (bundle.name, bundle.version, bundle.path, bundle.threads) == ("psad", 1, tiny_bundle, 2)
    assert bundle.manifest["schema"]["n_items"] == bundle.schema.n_items


def test_fp16_is_refused_when_not_exported(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match=r"no model_fp16\.onnx in this bundle"):
        load_bundle(tiny_bundle, device="cpu", fp16=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda x: x.pop("cand_mask"), r"missing \['cand_mask'\]"),
        (lambda x: x.update(cand_items=x["cand_items"].astype(np.int32)), r"cand_items: expected a numpy int64"),
        (lambda x: x.update(cand_mask=x["cand_mask"][:, :3]), r"cand_mask: list is 3, other inputs say 10"),
        (lambda x: x.update(hist_age=x["hist_age"][:1]), r"hist_age: batch is 1, other inputs say 2"),
        (lambda x: x.update(cand_num=x["cand_num"][..., 0]), r"cand_num: expected dims"),
    ],
)
def test_score_rejects_malformed_inputs(tiny_bundle: Path, edit: Callable[[dict], None], message: str) -> None:
    bundle = load_bundle(tiny_bundle, device="cpu", warmup=False)
    inputs = BatchMaker(bundle.schema, seed=0).make(2, 10, 4)
    edit(inputs)
    with pytest.raises(ValueError, match=message):
        bundle.score(inputs)


def test_bad_arguments(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        load_bundle(tiny_bundle, device="tpu")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        load_bundle(tiny_bundle, threads=0)
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
