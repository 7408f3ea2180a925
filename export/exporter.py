"""Exports a training run as a versioned model bundle, laid out like a Triton model repository.

    <repo>/<name>/<version>/
        model.onnx           UPN + student in one graph: inputs INPUT_NAMES, output "scores"; for PSAD
                             the fused graph of export/fusion.py (fewer kernels, same function)
        model_fp16.onnx      optional float16 variant for GPUs (--fp16), float32 inputs and outputs
        model_int8.onnx      optional int8 variant (--int8): weights and item table dynamically quantised
        manifest.json        what the bundle is, where it came from, parity results, sha256 of every file
        schema.json          the FeatureSchema the service assembles inputs with
        vocab.json           item ids and user categorical values -> indices (unseen -> OOV row)
        teacher.safetensors  the whole model state dict at the teacher's best validation epoch (the
                             run's teacher.safetensors; model.safetensors for scorer-only baselines),
                             for offline shadow evaluation
        items.safetensors    the item side tables the model was built with
        config.json          the run's TrainConfig (+ data_dir)
        config.pbtxt         Triton's model configuration for the same model.onnx (export/triton.py);
                             Triton reads it one level up: copy it to <repo>/<name>/ (docs/export.md)

A bundle is assembled in a hidden directory beside its final place and renamed into place only
after every file is written and the parity gate passed, so a version directory that exists is
complete, and versions are immutable: exporting onto an existing version is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from export.contract.bundle import (
    FORMAT_VERSION,
    FP16_FILE,
    INT8_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    NAME_PATTERN,
    BundleError,
    sha256,
)
from export.contract.fixtures import BatchMaker
from export.contract.schema import INPUT_NAMES, MODEL_OUTPUT, FeatureSchema, SchemaError, TensorSpec, model_inputs
from export.fusion import FusedScorer, fused_serving_module
from export.parity import FP16, FP32, INT8, ParityReport, check_parity, require_parity
from export.runtime import CPU, DISABLED_OPTIMIZERS, session_options
from export.triton import CONFIG_FILE, triton_config
from training.checkpoint import (
    BEST_FILES,
    MODELS,
    RunError,
    check_data_matches_run,
    load_run,
    load_weights,
    read_config,
)
from training.data.store import DataError, load_split, load_vocabs
from training.models.registry import GENERATOR_ARCHS, build_model
from training.models.reranker import Reranker

if TYPE_CHECKING:
    import onnx

OPSET = 18
EXAMPLE_SHAPE = (2, 3, 5)  # batch, list, history: >= 2 and distinct, so no axis is frozen or merged
ONNX_DTYPES = {"int64": 7, "float32": 1, "bool": 9}  # onnx.TensorProto element types


class ExportError(RuntimeError):
    """The export failed on the way (exit code 1); the message names the step and the fix."""


class ExportInputError(ExportError, ValueError):
    """The run or a flag cannot be exported as given (exit code 2): an ExportError to callers that
    catch those, a ValueError to the command-line error policy (export.contract.errors)."""


def export_run(
    run_dir: Path,
    repo_dir: Path,
    name: str = "psad",
    version: int | None = None,
    fp16: bool = False,
    int8: bool = False,
    fuse: bool = True,
    progress: bool = False,
) -> Path:
    """Export `run_dir` to `repo_dir/name/version` (next free version when None); returns that directory.

    fuse: write PSAD's fused graph (export/fusion.py); False writes its plain serving module, for
    comparisons. Either way the parity gate compares the graph with the plain serving module."""
    run_dir, repo_dir = Path(run_dir), Path(repo_dir)
    if not re.match(NAME_PATTERN, name):
        raise ExportInputError(f"--name {name!r}: use letters, digits, '_', '.', '-' (it becomes a directory name)")
    model_dir = repo_dir / name
    if version is None:
        version = next_version(repo_dir, name)
    if version < 1:
        raise ExportInputError(f"--version {version}: versions are integers >= 1")
    final = model_dir / str(version)
    if final.exists():
        raise ExportInputError(
            f"{final} already exists and versions are immutable: omit --version to take the next one "
            f"({next_version(repo_dir, name)})"
        )
    try:
        model, config, schema = load_run(run_dir)
        shadow = "teacher" if config.model.arch in GENERATOR_ARCHS else "student"
        if shadow == "teacher":
            load_run(run_dir, shadow)  # the weights shipped for shadow evaluation exist and fit the model
        _, data_dir = read_config(run_dir)
        fix = "the data set was rebuilt or replaced since training; export needs its vocabularies: retrain on it"
        check_data_matches_run(data_dir, run_dir, schema, fix)
        vocabs = load_vocabs(data_dir, schema)
        validation = best_validation(run_dir)
    except (RunError, DataError, SchemaError) as exc:
        raise ExportInputError(f"cannot export {run_dir}: {exc}") from None

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    steps = tqdm(total=4 + fp16 + int8, desc=f"export {name}/{version}", disable=not progress, leave=False)
    try:
        val_inputs = load_split(data_dir, "val", schema).inputs if (data_dir / "val.parquet").is_file() else None
        maker = BatchMaker(schema, val_inputs, seed=0)
        serving = model.serving_module().eval()  # the reference every graph is gated against
        steps.set_postfix_str("torch.onnx.export")
        graph = fused_serving_module(model) if fuse else serving
        export_onnx(graph, maker, tmp / MODEL_FILE)
        steps.update()
        steps.set_postfix_str("parity")
        parity = [require_parity(check_parity(serving, tmp / MODEL_FILE, maker, FP32))]
        steps.update()
        extra = ((fp16, FP16_FILE, convert_fp16, FP16), (int8, INT8_FILE, quantize_int8, INT8))
        for wanted, file, convert, tolerance in extra:
            if wanted:
                steps.set_postfix_str(file)
                convert(tmp / MODEL_FILE, tmp / file)
                parity.append(require_parity(check_parity(serving, tmp / file, maker, tolerance)))
                steps.update()
        steps.set_postfix_str("files")
        schema.save(tmp / "schema.json")
        vocabs.save(tmp / "vocab.json")
        shutil.copyfile(run_dir / BEST_FILES[shadow], tmp / "teacher.safetensors")
        shutil.copyfile(run_dir / "items.safetensors", tmp / "items.safetensors")
        shutil.copyfile(run_dir / "config.json", tmp / "config.json")
        (tmp / CONFIG_FILE).write_text(triton_config(name, schema))
        steps.update()
        kernels = {r.model_file: graph_kernels(tmp / r.model_file) for r in parity}
        graph_info = {"fused": isinstance(graph, FusedScorer), "kernels": kernels}
        manifest = build_manifest(
            tmp, name, version, schema, config.model.arch, run_dir, data_dir, validation, parity, graph_info
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if final.exists():
            raise ExportError(f"{final} appeared while exporting (another export?): versions are immutable")
        os.rename(tmp, final)
        steps.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    return final


def next_version(repo_dir: Path, name: str) -> int:
    """One past the highest numbered entry of `name`, complete or not (1 for a new model): an
    incomplete version directory (a copy in progress, a stray mkdir) is skipped, never reused."""
    model_dir = Path(repo_dir) / name
    numbered = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    return max(numbered, default=0) + 1


def best_validation(run_dir: Path) -> dict[str, Any]:
    """The student's best epoch (whose weights are model.onnx) and its validation metrics; for
    generators also the teacher's (whose weights are teacher.safetensors). max() keeps the first
    of equal scores, as training does (a tie is no improvement)."""
    from training.checkpoint import VALIDATION_METRIC

    path = Path(run_dir) / "history.json"
    try:
        history = json.loads(path.read_text())
        best = {
            m: max(history, key=lambda e: e["val"][m][VALIDATION_METRIC]) for m in history[-1]["val"] if m in MODELS
        }
        student = best["student"]
    except FileNotFoundError:
        raise ExportInputError(f"{path}: not found; export a run written by `psad train`") from None
    except (json.JSONDecodeError, TypeError, KeyError, ValueError, IndexError) as exc:
        raise ExportInputError(
            f"{path}: cannot read per-epoch validation metrics ({exc!r}); re-run `psad train`"
        ) from None
    out = {"selected_by": f"student {VALIDATION_METRIC}", "epoch": student["epoch"], "metrics": student["val"]}
    if "teacher" in best:
        teacher = best["teacher"]
        out["teacher"] = {
            "selected_by": f"teacher {VALIDATION_METRIC}",
            "epoch": teacher["epoch"],
            "metrics": teacher["val"],
        }
    return out


def export_onnx(module: nn.Module, maker: BatchMaker, path: Path) -> None:
    """torch.onnx (dynamo) with batch, list and history dynamic; axes renamed to the schema's names.

    `module` is a serving module: its forward(*tensors) takes the model inputs in INPUT_NAMES order."""
    import onnx
    from torch.export import Dim

    example = maker.make(*EXAMPLE_SHAPE)
    args = tuple(torch.from_numpy(example[n]) for n in INPUT_NAMES)
    specs = model_inputs(maker.schema)
    dims = {"batch": Dim("batch", min=1), "list": Dim("list", min=1), "history": Dim("history", min=0)}
    dynamic = tuple({axis: dims[d] for axis, d in enumerate(s.dims) if d in dims} for s in specs)
    try:
        with _quiet("torch.onnx._internal.exporter._registration"):
            program = torch.onnx.export(
                module,
                args,
                input_names=list(INPUT_NAMES),
                output_names=[MODEL_OUTPUT.name],
                dynamic_shapes=(dynamic,),  # one entry per forward parameter: *tensors takes all nine
                opset_version=OPSET,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for the serving module: {exc}") from exc
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise ExportError(f"torch.onnx.export(dynamo=True) returned no ONNX program (torch {torch.__version__})")
    graph = program.model_proto
    _name_axes(graph, specs)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save_model(graph, str(path))


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a converter's notes: the exporter's (torchvision not installed, axis names merged:
    axes are named after), the quantiser's (pre-processing advice, on the root logger)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _name_axes(model: onnx.ModelProto, specs: tuple[TensorSpec, ...]) -> None:
    """Give the exporter's symbolic axes the schema's names and check every input and the output."""
    graph = model.graph
    got = [i.name for i in graph.input]
    if got != list(INPUT_NAMES):
        raise ExportError(f"the exported graph has inputs {got}, expected {list(INPUT_NAMES)} in this order")
    if [o.name for o in graph.output] != [MODEL_OUTPUT.name]:
        raise ExportError(f"the exported graph has outputs {[o.name for o in graph.output]}, expected ['scores']")
    rename: dict[str, str] = {}
    for value, spec in zip([*graph.input, *graph.output], [*specs, MODEL_OUTPUT], strict=True):
        tensor = value.type.tensor_type
        if tensor.elem_type != ONNX_DTYPES[spec.dtype]:
            raise ExportError(f"exported {spec.name} has ONNX element type {tensor.elem_type}, expected {spec.dtype}")
        if len(tensor.shape.dim) != len(spec.dims):
            raise ExportError(f"exported {spec.name} has rank {len(tensor.shape.dim)}, expected dims {spec.dims}")
        for axis, (dim, want) in enumerate(zip(tensor.shape.dim, spec.dims, strict=True)):
            if want.isdigit():
                if dim.dim_value != int(want):
                    raise ExportError(f"exported {spec.name} axis {axis} is {dim}, expected {want}")
            elif dim.dim_param:
                rename[dim.dim_param] = want
            else:
                raise ExportError(f"exported {spec.name} axis {axis} ({want}) was frozen to {dim.dim_value}")
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def convert_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and activations, float32 inputs and outputs (the service's arrays are unchanged)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save_model(model, str(dst))


def quantize_int8(src: Path, dst: Path) -> None:
    """int8 dynamic quantisation: the MatMuls with a constant operand get int8 weights and activations
    quantised per call, the gathered tables 8-bit values; MatMuls of two activations (the
    attention's) stay float32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(""):
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})


def graph_kernels(path: Path, disabled: tuple[str, ...] = DISABLED_OPTIMIZERS) -> int:
    """Nodes of the graph ONNX Runtime runs (CPU provider, the serving session options with the
    optimisers `disabled`): one kernel each per call."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=1, disabled=disabled)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=[CPU])
        return len(onnx.load(options.optimized_model_filepath).graph.node)


def build_manifest(
    bundle: Path,
    name: str,
    version: int,
    schema: FeatureSchema,
    arch: str,
    run_dir: Path,
    data_dir: Path,
    validation: dict[str, Any],
    parity: list[ParityReport],
    graph: dict[str, Any],
) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import onnxscript

    def spec(s: TensorSpec) -> dict[str, Any]:
        return {"name": s.name, "dtype": s.dtype, "dims": list(s.dims)}

    variants = {MODEL_FILE: "fp32", FP16_FILE: "fp16", INT8_FILE: "int8"}
    models = {variants[r.model_file]: r.model_file for r in parity}
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "arch": arch,
        "models": models,
        "inputs": [spec(s) for s in model_inputs(schema)],
        "outputs": [spec(MODEL_OUTPUT)],
        "opset": OPSET,
        "graph": graph,
        "schema_version": schema.version,
        "schema": schema.to_dict(),
        "software": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "exporter": "torch.onnx.export(dynamo=True)",
        },
        "source": {"run": str(Path(run_dir).resolve()), "data": str(data_dir), "validation": validation},
        "parity": {r.model_file: r.to_dict() for r in parity},
        "files": {p.name: file_entry(p) for p in sorted(bundle.iterdir()) if p.name != MANIFEST_FILE},
    }


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def load_torch_model(bundle_dir: Path) -> Reranker:
    """Rebuild the whole PyTorch model (teacher included, eval mode) from a bundle alone, with the
    weights of the teacher's best epoch (which may differ from the epoch model.onnx was exported from)."""
    from safetensors.torch import load_file

    bundle_dir = Path(bundle_dir)
    try:
        config, _ = read_config(bundle_dir)
        schema = FeatureSchema.load(bundle_dir / "schema.json")
        items = load_file(str(bundle_dir / "items.safetensors"))
        model = build_model(config.model, schema, items["item_cat"], items["item_num"])
        load_weights(model, bundle_dir / "teacher.safetensors")
    except (RunError, SchemaError, OSError, KeyError) as exc:
        raise BundleError(f"{bundle_dir}: cannot rebuild the PyTorch model ({exc})") from None
    return model.eval()
