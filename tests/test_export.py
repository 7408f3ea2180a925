"""Export: bundle layout and manifest, the parity gate, the round trip to PyTorch, versioning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from export.contract.bundle import latest_version, sha256
from export.contract.fixtures import BatchMaker
from export.contract.schema import INPUT_NAMES, OOV, SCHEMA_VERSION, FeatureSchema, model_inputs
from export.exporter import ExportError, export_run, next_version
from export.parity import FP32, SHAPES, ParityError, check_parity, require_parity
from export.runtime import load_bundle
from psad.cli import app
from training.checkpoint import load_run
from training.data.store import load_split

BUNDLE_FILES = {
    "model.onnx",
    "manifest.json",
    "schema.json",
    "vocab.json",
    "teacher.safetensors",
    "items.safetensors",
    "config.json",
    "config.pbtxt",
}


def test_bundle_layout_and_manifest(tiny_bundle: Path, tiny_run: Path) -> None:
    assert tiny_bundle.name == "1" and tiny_bundle.parent.name == "psad"
    assert {p.name for p in tiny_bundle.iterdir()} == BUNDLE_FILES
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    schema = FeatureSchema.load(tiny_bundle / "schema.json")
    assert manifest["name"] == "psad" and manifest["version"] == 1
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert FeatureSchema.from_dict(manifest["schema"]) == schema
    assert [i["name"] for i in manifest["inputs"]] == list(INPUT_NAMES)
    specs = [{"name": s.name, "dtype": s.dtype, "dims": list(s.dims)} for s in model_inputs(schema)]
    assert manifest["inputs"] == specs
    assert manifest["outputs"] == [{"name": "scores", "dtype": "float32", "dims": ["batch", "list"]}]
    assert manifest["source"]["run"] == str(tiny_run.resolve())
    validation = manifest["source"]["validation"]
    assert "ndcg@10" in validation["metrics"]["student"]
    history = json.loads((tiny_run / "history.json").read_text())
    for model, picked in (("student", validation), ("teacher", validation["teacher"])):  # each model's own epoch
        scores = [h["val"][model]["ndcg@10"] for h in history]
        assert picked["epoch"] == 1 + scores.index(max(scores))
    assert (tiny_bundle / "teacher.safetensors").read_bytes() == (tiny_run / "teacher.safetensors").read_bytes()
    assert set(manifest["files"]) == BUNDLE_FILES - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(tiny_bundle / name)
    parity = manifest["parity"]["model.onnx"]
    assert parity["passed"] and parity["source"] == "validation lists"
    assert {(s["batch"], s["list"], s["history"]) for s in parity["shapes"]} == set(SHAPES)
    assert parity["max_abs_diff"] <= FP32.max_abs


def test_onnx_axes_are_named_and_dynamic(tiny_bundle: Path) -> None:
    import onnx

    graph = onnx.load(str(tiny_bundle / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["cand_items"] == ["batch", "list"]
    assert dims["hist_items"] == ["batch", "history"]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", "list"]


def test_graph_inputs_are_the_model_signature(tiny_bundle: Path) -> None:
    """Every input of the exported graph, in order: the name, element type and axes of model_inputs(schema)
    (the serving module takes the tensors positionally; the service feeds them by name)."""
    import onnx

    schema = FeatureSchema.load(tiny_bundle / "schema.json")
    graph = onnx.load(str(tiny_bundle / "model.onnx")).graph
    got = [
        (
            value.name,
            onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
            tuple(str(d.dim_param or d.dim_value) for d in value.type.tensor_type.shape.dim),
        )
        for value in graph.input
    ]
    assert got == [(s.name, s.dtype, s.dims) for s in model_inputs(schema)]


@pytest.mark.parametrize("shape", [(1, 1, 0), (2, 10, 1), (64, 200, 50), (3, 7, 13)])
def test_round_trip_matches_pytorch_rank_scores(tiny_bundle: Path, tiny_run: Path, shape) -> None:
    model, _, schema = load_run(tiny_run)
    val = load_split(Path(json.loads((tiny_run / "config.json").read_text())["data_dir"]), "val", schema)
    inputs = BatchMaker(schema, val.inputs, seed=1).make(*shape)
    got = load_bundle(tiny_bundle, device="cpu").score(inputs)
    with torch.inference_mode():
        want = model.rank_scores({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    mask = inputs["cand_mask"]
    assert got.shape == shape[:2] and got.dtype == np.float32
    np.testing.assert_allclose(got[mask], want[mask], atol=FP32.max_abs, rtol=0)
    for row in range(shape[0]):
        valid = mask[row]
        assert (np.argsort(-got[row][valid], kind="stable") == np.argsort(-want[row][valid], kind="stable")).all()


def test_parity_gate_refuses_a_graph_that_scores_differently(tiny_bundle: Path, tiny_run: Path) -> None:
    model, _, schema = load_run(tiny_run)
    serving = model.serving_module()

    class Shifted(torch.nn.Module):  # a real deviation the gate must catch: scores off by 1e-3
        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return serving(*inputs) + 1e-3 * torch.arange(inputs[6].shape[1])

    report = check_parity(Shifted(), tiny_bundle / "model.onnx", BatchMaker(schema), FP32, shapes=((2, 10, 1),))
    assert not report.passed and report.rows[0].max_abs_diff > FP32.max_abs
    with pytest.raises(ParityError, match=r"model.onnx does not score like PyTorch(.|\n)*\| 2 \| 10 \| 1 \|"):
        require_parity(report)


def test_unknown_items_map_to_oov_and_score_finitely(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle, device="cpu")
    inputs = BatchMaker(bundle.schema, seed=2).make(2, 10, 5)
    ids = ["never-seen-1", "never-seen-2", *bundle.vocabs.items.tokens[:8]]
    inputs["cand_items"][0] = bundle.vocabs.items.indices(ids)
    inputs["hist_items"][0] = bundle.vocabs.items.indices(["never-seen-3"] * 5)
    assert inputs["cand_items"][0, 0] == OOV and inputs["hist_items"][0, 0] == OOV
    scores = bundle.score(inputs)
    assert np.isfinite(scores[inputs["cand_mask"]]).all()


def test_export_refuses_to_overwrite_a_version(tiny_bundle: Path, tiny_run: Path) -> None:
    before = sha256(tiny_bundle / "manifest.json")
    with pytest.raises(ExportError, match=r"already exists and versions are immutable"):
        export_run(tiny_run, tiny_bundle.parent.parent, name="psad", version=1)
    assert sha256(tiny_bundle / "manifest.json") == before


def test_export_rejects_bad_names_and_runs(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(ExportError, match="--name"):
        export_run(tiny_run, tmp_path, name="../escape")
    with pytest.raises(ExportError, match="run directory not found"):
        export_run(tmp_path / "no-run", tmp_path)
    assert not (tmp_path / "psad").exists()


def test_export_refuses_a_data_set_rebuilt_since_training(tmp_path: Path, tiny_run: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    config = json.loads((tiny_run / "config.json").read_text())
    shutil.copytree(config["data_dir"], data)
    shutil.copytree(tiny_run, run)
    (run / "config.json").write_text(json.dumps({**config, "data_dir": str(data)}))
    schema = json.loads((data / "schema.json").read_text())
    schema["max_history"] += 1  # as a rebuild with other settings would leave it
    (data / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(ExportError, match=r"schema\.json differs from .*: the data set was rebuilt"):
        export_run(run, tmp_path / "repo")
    assert not (tmp_path / "repo" / "psad").exists()


def test_latest_version_counts_only_complete_versions(tmp_path: Path, tiny_bundle: Path) -> None:
    assert latest_version(tmp_path, "psad") is None and next_version(tmp_path, "psad") == 1
    shutil.copytree(tiny_bundle, tmp_path / "psad" / "3")
    (tmp_path / "psad" / "7").mkdir()  # no manifest: incomplete
    (tmp_path / "psad" / ".8.tmp-abc").mkdir()  # an export in progress
    (tmp_path / "psad" / "notes").mkdir()
    assert latest_version(tmp_path, "psad") == 3  # what the service serves
    assert next_version(tmp_path, "psad") == 8  # what export takes: past the incomplete 7, not onto it


@pytest.mark.slow
def test_auto_version_and_fp16_export(tmp_path: Path, tiny_bundle: Path, tiny_run: Path) -> None:
    """Omitting the version takes the next free one; --fp16 adds a parity-checked float16 graph."""
    shutil.copytree(tiny_bundle, tmp_path / "psad" / "1")
    (tmp_path / "psad" / "2").mkdir()  # an incomplete version directory is skipped
    bundle = export_run(tiny_run, tmp_path, name="psad", fp16=True)
    assert bundle == tmp_path / "psad" / "3"
    assert not [p for p in (tmp_path / "psad").iterdir() if p.name.startswith(".")]  # temp dir renamed away
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["models"] == {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}
    assert manifest["parity"]["model_fp16.onnx"]["passed"]
    assert manifest["parity"]["model_fp16.onnx"]["tolerance"]["top_k"] == 10
    fp32, fp16 = load_bundle(bundle, device="cpu"), load_bundle(bundle, device="cpu", fp16=True)
    inputs = BatchMaker(fp32.schema, seed=3).make(4, 10, 5)
    mask = inputs["cand_mask"]
    np.testing.assert_allclose(fp16.score(inputs)[mask], fp32.score(inputs)[mask], atol=1e-2, rtol=0)


def test_bench_model_reports_bad_arguments_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    """Each refused before any timing, as `error: ...` with exit code 2, not a traceback."""
    damaged = shutil.copytree(tiny_bundle, tmp_path / "psad" / "1")
    (damaged / "vocab.json").write_text("{}")
    cases = [
        (["--bundle", str(tmp_path / "nope")], "nope: bundle directory not found"),
        (["--bundle", str(damaged)], "vocab.json: sha256 mismatch"),
        (["--run", str(tmp_path / "no-run")], "run directory not found"),
        (["--bundle", str(tiny_bundle), "--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
    ]
    for args, message in cases:
        done = CliRunner().invoke(app, ["bench", "model", *args, "--lists", "10", "--histories", "0"])
        assert done.exit_code == 2 and done.output.startswith("error: "), done.output
        assert message in done.output and len(done.output.splitlines()) == 1


def test_manifest_records_the_fused_graph_and_its_kernels(tiny_bundle: Path) -> None:
    from export.exporter import graph_kernels

    graph = json.loads((tiny_bundle / "manifest.json").read_text())["graph"]
    assert graph["fused"] is True
    assert graph["kernels"] == {"model.onnx": graph_kernels(tiny_bundle / "model.onnx")}


@pytest.mark.slow
def test_int8_export_is_listed_verified_and_loadable(tmp_path: Path, tiny_bundle: Path, tiny_run: Path) -> None:
    """--int8 adds model_int8.onnx: hashed and parity-gated in the manifest, served by load_bundle(int8=True),
    refused when altered, and asked for by name when a bundle lacks it."""
    from export.contract.bundle import BundleError
    from export.parity import INT8

    with pytest.raises(BundleError, match=r"no model_int8\.onnx in this bundle; export it with `psad export --int8`"):
        load_bundle(tiny_bundle, device="cpu", int8=True)
    bundle = export_run(tiny_run, tmp_path, name="psad", int8=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["models"] == {"fp32": "model.onnx", "int8": "model_int8.onnx"}
    assert manifest["files"]["model_int8.onnx"]["sha256"] == sha256(bundle / "model_int8.onnx")
    report = manifest["parity"]["model_int8.onnx"]
    assert report["passed"] and report["tolerance"]["max_abs"] == INT8.max_abs
    assert {(s["batch"], s["list"], s["history"]) for s in report["shapes"]} == set(SHAPES)
    assert (bundle / "model_int8.onnx").stat().st_size < (bundle / "model.onnx").stat().st_size
    fp32, int8 = load_bundle(bundle, device="cpu"), load_bundle(bundle, device="cpu", int8=True)
    inputs = BatchMaker(fp32.schema, seed=3).make(4, 10, 5)
    mask = inputs["cand_mask"]
    got, want = int8.score(inputs), fp32.score(inputs)
    assert not np.array_equal(got[mask], want[mask])  # a different graph, really quantised
    np.testing.assert_allclose(got[mask], want[mask], atol=INT8.max_abs, rtol=0)
    with pytest.raises(ValueError, match="pick one"):
        load_bundle(bundle, device="cpu", fp16=True, int8=True)
    raw = bytearray((bundle / "model_int8.onnx").read_bytes())
    raw[-1] ^= 0xFF
    (bundle / "model_int8.onnx").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"model_int8\.onnx: sha256 mismatch"):
        load_bundle(bundle, device="cpu", int8=True)


@pytest.mark.slow
def test_bench_model_compares_fused_unfused_and_int8_in_one_run(tiny_run: Path) -> None:
    args = ["--run", str(tiny_run), "--compare-unfused", "--int8", "--batches", "1", "--lists", "10,30"]
    args += ["--histories", "5", "--seconds", "0.01", "--iters", "5", "--quality", "val"]
    done = CliRunner().invoke(app, ["bench", "model", *args])
    assert done.exit_code == 0, done.output
    kernels = next(line for line in done.output.splitlines() if line.startswith("Kernels per call"))
    counts = dict(part.rsplit(" ", 1) for part in kernels.split(": ", 1)[1].split(", "))
    assert set(counts) == {"served", "unfused", "before", "int8"}
    assert int(counts["served"]) < int(counts["unfused"]) and int(counts["served"]) < int(counts["before"])
    assert "| served p50 ms | unfused p50 ms | before p50 ms | int8 p50 ms |" in done.output
    assert [line.split(" | ")[:4] for line in done.output.splitlines() if line.startswith("| cpu | 1 | ")][-2:] == [
        ["| cpu", "1", "10", "5"],
        ["| cpu", "1", "30", "5"],
    ]
    assert "| int8 | " in done.output.split("NDCG@10 on the val split")[1]


def test_bench_model_compare_unfused_needs_a_run(tiny_bundle: Path) -> None:
    done = CliRunner().invoke(app, ["bench", "model", "--bundle", str(tiny_bundle), "--compare-unfused"])
    assert done.exit_code == 2 and "--compare-unfused exports the run's plain graph" in done.output
