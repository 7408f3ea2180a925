"""Exports a training run as a versioned model bundle, laid out like a Triton model repository.

    <repo>/<name>/<version>/
        model.onnx           UPN + student in one graph: inputs INPUT_NAMES, output "scores"; for PSAD
                             the fused graph of export/fusion.py (fewer kernels, same function)
        model_fp16.onnx      optional float16 variant for GPUs (--fp16), float32 inputs and outputs
        model_int8.onnx      optional int8 variant (--int8): weights and item table dynamically quantised
        item_codes.npy       sid models: uint8 [n_items, levels], each known item's codes (model.onnx
                             then reads one token per item, not an index into an item table)
        assign.onnx          sid models: content_cat, content_num -> codes, a new item's codes
        manifest.json        what the bundle is, where it came from, parity results, sha256 of every file
        schema.json          the FeatureSchema the service assembles inputs with: the items seen in
                             training only (schema.known_only(); an item first seen later is new to it)
        vocab.json           item ids and user categorical values -> indices (unseen -> OOV row)
        teacher.safetensors  the whole model state dict at the teacher's best validation epoch (the
                             run's teacher.safetensors; model.safetensors for scorer-only baselines
                             and for sid models, whose recorded tokens name that epoch's codes),
                             for offline shadow evaluation, its item rows cut to the known items
        items.safetensors    the item side tables the model was built with (known items)
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
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from export.contract.bundle import (
    ASSIGN_FILE,
    ASSIGN_INPUTS,
    ASSIGN_OUTPUT,
    CODEBOOKS,
    FORMAT_VERSION,
    FP16_FILE,
    ID,
    INT8_FILE,
    ITEM_CODES_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    NAME_PATTERN,
    SID,
    BundleError,
    ItemEncoder,
    item_tokens,
    read_item_codes,
    sha256,
)
from export.contract.fixtures import BatchMaker
from export.contract.schema import (
    INPUT_NAMES,
    MODEL_OUTPUT,
    OOV,
    FeatureSchema,
    SchemaError,
    TensorSpec,
    model_inputs,
)
from export.fusion import FusedScorer, fused_serving_module
from export.parity import (
    FP16,
    FP32,
    INT8,
    CodeReport,
    ParityReport,
    check_codes,
    check_parity,
    require_codes,
    require_parity,
)
from export.runtime import CPU, DISABLED_OPTIMIZERS, session_options, synthetic_content
from export.triton import CONFIG_FILE, triton_config
from training.checkpoint import (
    BEST_FILES,
    MODELS,
    RunError,
    check_data_matches_run,
    load_run,
    load_weights,
    read_config,
    save_weights,
)
from training.config import TrainConfig
from training.data.store import DataError, load_split, load_vocabs
from training.models.registry import GENERATOR_ARCHS, build_model
from training.models.reranker import Reranker
from training.models.sid import SidEncoder, find_sid

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
        trained, config, run_schema = load_run(run_dir)
        # A sid teacher re-decodes recorded tokens, which name the served student's codes: its epoch's.
        sid_run = config.model.item_encoder == "sid"
        shadow = "teacher" if config.model.arch in GENERATOR_ARCHS and not sid_run else "student"
        shadow_model = load_run(run_dir, shadow)[0] if shadow == "teacher" else trained  # they exist and fit
        _, data_dir = read_config(run_dir)
        fix = "the data set was rebuilt or replaced since training; export needs its vocabularies: retrain on it"
        check_data_matches_run(data_dir, run_dir, run_schema, fix)
        schema, vocabs = run_schema.known_only(), load_vocabs(data_dir, run_schema).known_only(run_schema)
        validation = best_validation(run_dir)
    except (RunError, DataError, SchemaError) as exc:
        raise ExportInputError(f"cannot export {run_dir}: {exc}") from None
    items = _known_items(run_dir, schema.n_items)
    model = known_model(trained, config, run_schema, items)
    sid = find_sid(model)
    encoder = item_encoder(model, config)

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    steps = tqdm(total=4 + fp16 + int8, desc=f"export {name}/{version}", disable=not progress, leave=False)
    try:
        val = load_split(data_dir, "val", run_schema).inputs if (data_dir / "val.parquet").is_file() else None
        maker = BatchMaker(schema, None if val is None else known_inputs(val, schema.n_items), seed=0)
        serving = model.serving_module().eval()
        steps.set_postfix_str("torch.onnx.export")
        graph = fused_serving_module(model) if fuse else serving
        export_onnx(graph, maker, tmp / MODEL_FILE)
        codes = None
        if sid is not None:  # the gate reads the codes back as the runtime will
            write_sid_tables(sid, schema, tmp)
            codes = read_item_codes(tmp / ITEM_CODES_FILE, encoder, schema.n_items)
        steps.update()
        steps.set_postfix_str("parity")
        # the reference every graph is gated against: the serving module; for sid the model's own path
        # from item indices to codes, the graph reading the tokens of the bundle's stored codes
        reference = serving if sid is None else RankScores(model)
        tokens = item_tokens(encoder, codes, schema.n_items)
        code_report = None if sid is None else require_codes(check_codes(sid, schema, tmp, tmp / ASSIGN_FILE))
        parity = [require_parity(check_parity(reference, tmp / MODEL_FILE, maker, FP32, tokens=tokens))]
        steps.update()
        extra = ((fp16, FP16_FILE, convert_fp16, FP16), (int8, INT8_FILE, quantize_int8, INT8))
        for wanted, file, convert, tolerance in extra:
            if wanted:
                steps.set_postfix_str(file)
                convert(tmp / MODEL_FILE, tmp / file)
                parity.append(require_parity(check_parity(reference, tmp / file, maker, tolerance, tokens=tokens)))
                steps.update()
        steps.set_postfix_str("files")
        schema.save(tmp / "schema.json")
        vocabs.save(tmp / "vocab.json")
        if model is trained:  # no cold items: the run's files as they are
            shutil.copyfile(run_dir / BEST_FILES[shadow], tmp / "teacher.safetensors")
            shutil.copyfile(run_dir / "items.safetensors", tmp / "items.safetensors")
        else:
            save_weights(known_model(shadow_model, config, run_schema, items), tmp / "teacher.safetensors")
            save_file({k: v.contiguous() for k, v in items.items()}, str(tmp / "items.safetensors"))
        shutil.copyfile(run_dir / "config.json", tmp / "config.json")
        (tmp / CONFIG_FILE).write_text(triton_config(name, schema))
        steps.update()
        kernels = {r.model_file: graph_kernels(tmp / r.model_file) for r in parity}
        graph_info = {"fused": isinstance(graph, FusedScorer), "kernels": kernels}
        graph_info |= {"item_encoder": encoder_entry(encoder, code_report)}
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


def _known_items(run_dir: Path, n_known: int) -> dict[str, torch.Tensor]:
    """The run's item side tables, cut to the items seen in training (what a bundle knows)."""
    from safetensors.torch import load_file

    try:
        items = load_file(str(Path(run_dir) / "items.safetensors"))
        return {k: items[k][:n_known] for k in ("item_cat", "item_num")}
    except (OSError, KeyError) as exc:
        raise ExportInputError(
            f"{run_dir}/items.safetensors: cannot read the item tables ({exc}); re-run `psad train`"
        ) from None


def known_model(
    model: Reranker, config: TrainConfig, run_schema: FeatureSchema, items: dict[str, torch.Tensor]
) -> Reranker:
    """`model` rebuilt on the bundle's schema (run_schema.known_only(): the items seen in training),
    its item rows cut to them (`items`: the side tables, cut); the model itself when every item is
    known. The rows cut never reach a known item's score (an "id" model reads them as OOV, a "sid"
    model gives them codes from their content), so both score known items alike."""
    schema = run_schema.known_only()
    if schema.n_items == run_schema.n_items:
        return model
    known = build_model(config.model, schema, items["item_cat"], items["item_num"])
    state, cut = model.state_dict(), {}
    for key, want in known.state_dict().items():
        have = state[key]
        if have.shape[:1] == (run_schema.n_items,) and want.shape == (schema.n_items, *have.shape[1:]):
            have = have[: schema.n_items]
        if have.shape != want.shape:
            raise ExportError(f"cannot cut {key} {tuple(have.shape)} to the known items: expected {tuple(want.shape)}")
        cut[key] = have
    known.load_state_dict(cut)
    return known.eval()


def known_inputs(inputs: dict[str, np.ndarray], n_known: int) -> dict[str, np.ndarray]:
    """Model inputs with the items a bundle does not know (rows past n_known) as OOV, as it reads them."""
    return {
        **inputs,
        **{k: np.where(inputs[k] < n_known, inputs[k], OOV) for k in ("cand_items", "hist_items")},
    }


def item_encoder(model: Reranker, config: TrainConfig) -> ItemEncoder:
    sid = find_sid(model)
    if sid is None:
        return ItemEncoder(ID, config.model.d_model)
    return ItemEncoder(SID, config.model.d_model, sid.levels, sid.codebook_size)


def encoder_entry(encoder: ItemEncoder, codes: CodeReport | None) -> dict[str, Any]:
    """The manifest's item_encoder entry; for sid also what the code checks found."""
    return encoder.to_dict() | ({} if codes is None else {"parity": codes.to_dict()})


class RankScores(nn.Module):
    """model.rank_scores on the model inputs positionally (items as vocabulary indices): the parity
    reference of a sid graph, which reads tokens."""

    def __init__(self, model: Reranker):
        super().__init__()
        self.model = model

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model.rank_scores(dict(zip(INPUT_NAMES, tensors, strict=True)))


def write_sid_tables(sid: SidEncoder, schema: FeatureSchema, bundle: Path) -> None:
    """A sid bundle's code tables: item_codes.npy, assign.onnx, and model.onnx's codebooks as the one
    initializer CODEBOOKS."""
    codes = sid.known_codes().numpy()
    if codes.shape != (schema.n_items, sid.levels):
        raise ExportError(f"known_codes() is {codes.shape}, expected (n_items={schema.n_items}, {sid.levels})")
    np.save(bundle / ITEM_CODES_FILE, codes.astype(np.uint8))
    export_assigner(sid, schema, bundle / ASSIGN_FILE)
    name_codebooks(bundle / MODEL_FILE, sid.codebooks.detach().float().numpy(), codes[OOV])


def export_assigner(sid: SidEncoder, schema: FeatureSchema, path: Path) -> None:
    """assign.onnx: content_cat int64 [batch, n] and content_num float32 [batch, m] -> codes int64
    [batch, levels], the batch axis dynamic."""
    import onnx
    from torch.export import Dim

    cat, num = synthetic_content(schema, EXAMPLE_SHAPE[1], np.random.default_rng(0))
    batch = Dim("batch", min=1)
    args = (torch.from_numpy(cat), torch.from_numpy(num))
    graph = dynamo_export(
        sid.assigner().eval(), args, ASSIGN_INPUTS, ASSIGN_OUTPUT, ({0: batch}, {0: batch}), "the sid assigner"
    )
    output = graph.graph.output
    dims = [d.dim_value or d.dim_param for d in output[0].type.tensor_type.shape.dim] if len(output) == 1 else []
    if [o.name for o in output] != [ASSIGN_OUTPUT] or len(dims) != 2 or dims[1] != sid.levels:
        raise ExportError(
            f"the exported assigner has outputs {[o.name for o in output]} {dims}, expected codes [batch, {sid.levels}]"
        )
    for value in [*graph.graph.input, *output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(graph, full_check=True)
    onnx.save_model(graph, str(path))


def code_sum_table(codebooks: np.ndarray, oov_codes: np.ndarray) -> np.ndarray:
    """[2 + K^L, d]: row = served token (0 padding, 1 OOV), the sum of its codes' vectors
    (fusion.TokenTable's table)."""
    levels, size, dim = codebooks.shape
    table = codebooks[0]
    for codebook in codebooks[1:]:
        table = (table[:, None, :] + codebook[None, :, :]).reshape(-1, dim)
    oov = int(np.sum(oov_codes * size ** np.arange(levels - 1, -1, -1)))
    return np.concatenate([table[:1], table[oov : oov + 1], table])


def _table_nodes(table_name: str, oov_codes: np.ndarray, size: int, dim: int) -> tuple[list, list]:
    """Nodes building code_sum_table from CODEBOOKS into `table_name`, and their constant inputs."""
    from onnx import helper, numpy_helper

    levels = len(oov_codes)
    oov = int(np.sum(oov_codes * size ** np.arange(levels - 1, -1, -1)))
    name = f"{CODEBOOKS}_table"
    consts = {
        "rows": np.array([-1, dim], dtype=np.int64),
        "axis0": np.array([0], dtype=np.int64),
        "axis1": np.array([1], dtype=np.int64),
        "first": np.array([0], dtype=np.int64),
        "oov": np.array([oov], dtype=np.int64),
        **{f"level{level}": np.array(level, dtype=np.int64) for level in range(levels)},
    }
    inits = [numpy_helper.from_array(v, f"{name}_{k}") for k, v in consts.items()]
    nodes = [helper.make_node("Gather", [CODEBOOKS, f"{name}_level0"], [f"{name}_0"], f"{name}_gather0")]
    for level in range(1, levels):
        c, t = f"{name}_c{level}", f"{name}_{level - 1}"
        nodes += [
            helper.make_node("Gather", [CODEBOOKS, f"{name}_level{level}"], [c], f"{name}_gather{level}"),
            helper.make_node("Unsqueeze", [t, f"{name}_axis1"], [f"{t}_u"], f"{name}_unsqueeze_t{level}"),
            helper.make_node("Unsqueeze", [c, f"{name}_axis0"], [f"{c}_u"], f"{name}_unsqueeze_c{level}"),
            helper.make_node("Add", [f"{t}_u", f"{c}_u"], [f"{name}_sum{level}"], f"{name}_add{level}"),
            helper.make_node(
                "Reshape", [f"{name}_sum{level}", f"{name}_rows"], [f"{name}_{level}"], f"{name}_flat{level}"
            ),
        ]
    full = f"{name}_{levels - 1}"
    nodes += [
        helper.make_node("Gather", [full, f"{name}_first"], [f"{name}_pad"], f"{name}_pad"),
        helper.make_node("Gather", [full, f"{name}_oov"], [f"{name}_oov_row"], f"{name}_oov_row"),
        helper.make_node("Concat", [f"{name}_pad", f"{name}_oov_row", full], [table_name], f"{name}_concat", axis=0),
    ]
    return nodes, inits


def name_codebooks(path: Path, codebooks: np.ndarray, oov_codes: np.ndarray) -> None:
    """Give the graph's codebooks one initializer CODEBOOKS [levels, codebook_size, dim], whatever
    form the exporter left them in (a flattened [levels * codebook_size, dim] copy is reshaped by a
    node, and fusion.TokenTable's table of code sums is rebuilt from them by nodes; ONNX Runtime folds
    both when it loads the graph), so that a bundle can be checked against its manifest without
    running it, and holds no table that grows with the codes' combinations."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    levels, size, dim = codebooks.shape
    table = code_sum_table(codebooks, oov_codes)
    for t in graph.initializer:
        if tuple(t.dims) == table.shape and np.allclose(numpy_helper.to_array(t), table, rtol=0, atol=1e-6):
            graph.initializer.remove(t)
            nodes, inits = _table_nodes(t.name, oov_codes, size, dim)
            graph.initializer.extend([numpy_helper.from_array(codebooks.astype(np.float32), CODEBOOKS), *inits])
            for node in reversed(nodes):
                graph.node.insert(0, node)
            onnx.checker.check_model(model, full_check=True)
            onnx.save_model(model, str(path))
            return
    forms = {(levels, size, dim), (levels * size, dim)}  # as trained, or flattened for one gather
    found = [
        t
        for t in graph.initializer
        if tuple(t.dims) in forms and np.array_equal(numpy_helper.to_array(t).reshape(codebooks.shape), codebooks)
    ]
    if len(found) != 1:
        raise ExportError(
            f"{path}: expected one initializer holding the codebooks {list(codebooks.shape)}, found {len(found)}; "
            "the served item lookup must read them from one table"
        )
    old = found[0]
    graph.initializer.remove(old)
    graph.initializer.append(numpy_helper.from_array(codebooks.astype(np.float32), CODEBOOKS))
    if tuple(old.dims) == codebooks.shape:
        for node in graph.node:
            node.input[:] = [CODEBOOKS if i == old.name else i for i in node.input]
    else:
        shape = numpy_helper.from_array(np.array(old.dims, dtype=np.int64), f"{CODEBOOKS}_flat_shape")
        graph.initializer.append(shape)
        graph.node.insert(0, helper.make_node("Reshape", [CODEBOOKS, shape.name], [old.name], f"{CODEBOOKS}_flat"))
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))


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
    # one dynamic_shapes entry per forward parameter: *tensors takes all nine
    graph = dynamo_export(module, args, INPUT_NAMES, MODEL_OUTPUT.name, (dynamic,), "the serving module")
    _name_axes(graph, specs)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save_model(graph, str(path))


def dynamo_export(
    module: nn.Module, args: tuple, inputs: tuple[str, ...], output: str, dynamic: tuple, what: str
) -> onnx.ModelProto:
    """torch.onnx's dynamo exporter, optimised, opset OPSET, its registration chatter quiet; an
    ExportError naming `what` when it fails."""
    try:
        with _quiet("torch.onnx._internal.exporter._registration"):
            program = torch.onnx.export(
                module,
                args,
                input_names=list(inputs),
                output_names=[output],
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {what}: {exc}") from exc
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise ExportError(f"torch.onnx.export(dynamo=True) returned no ONNX program (torch {torch.__version__})")
    return program.model_proto


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
    attention's) stay float32. Weights use 7 bits (reduce_range): on x86 CPUs without VNNI, ONNX
    Runtime's u8 x s8 kernels saturate their 16-bit intermediate sums with full-range weights, and
    the scores drift far beyond the parity gate's tolerance."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(""):
        quantize_dynamic(
            src, dst, weight_type=QuantType.QInt8, reduce_range=True, extra_options={"MatMulConstBOnly": True}
        )


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
    """graph: fused, kernels and item_encoder (the manifest's entry of that name)."""
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
        "graph": {k: v for k, v in graph.items() if k != "item_encoder"},
        "item_encoder": graph["item_encoder"],
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
