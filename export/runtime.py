"""The one loader the service uses: verifies a model bundle and scores batches with ONNX Runtime.

load_bundle() refuses anything it cannot vouch for (a missing, truncated or altered file, a
manifest that is not JSON, another schema version, inputs that differ from the schema's, a
manifest naming another model or version than its directory, a graph that does not run on the
schema's inputs) with a BundleError naming the file and the problem. It picks the execution
provider, then reports the one actually active: onnxruntime-gpu falls back to CPU with only a log
line, so the provider a bundle reports is read back from the session, and a fallback is logged
as a warning.

Items: the graph reads `item_tokens[index]` for each vocabulary index (the index itself for an
"id" bundle, the item's sid token for a "sid" one); a sid bundle also opens assign.onnx, which
gives a new item its codes from its content (Bundle.assign), with the scorer's settings.

Threads: a serving process runs one session per worker process, so intra-op threads default to
1 (pass more for large batches), inter-op threads to 1 with sequential execution, and idle pool
threads do not spin (spinning buys a little latency alone but steals cores from neighbours).
On the CPU provider ONNX Runtime's SkipLayerNormalization fusion is turned off: at this model's
widths its CPU kernel is slower than the Add and LayerNormalization it replaces (docs/benchmarks.md,
"A shorter model call"). numpy and onnxruntime only: the service imports this without torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.contract.bundle import (
    ASSIGN_FILE,
    ASSIGN_INPUTS,
    ASSIGN_OUTPUT,
    DEVICES,
    FP16_FILE,
    INT8_FILE,
    ITEM_CODES_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SID,
    BundleError,
    ItemEncoder,
    item_tokens,
    read_item_codes,
    verify_bundle,
)
from export.contract.content import sid_tokens
from export.contract.fixtures import BatchMaker
from export.contract.schema import (
    INPUT_NAMES,
    MODEL_OUTPUT,
    FeatureSchema,
    Vocabularies,
    model_inputs,
)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
WARMUP_RUNS = 3
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)  # its CPU kernel is slower than the Add + LayerNorm it fuses

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    """A verified bundle with a live ONNX Runtime session."""

    path: Path
    name: str
    version: int
    manifest: dict[str, Any]
    schema: FeatureSchema
    vocabs: Vocabularies
    provider: str  # the execution provider actually active, e.g. "CPUExecutionProvider"
    threads: int
    session: Any  # onnxruntime.InferenceSession
    encoder: ItemEncoder
    item_tokens: np.ndarray  # int64 [n_items]: vocabulary index -> what the graph reads
    assign_session: Any = None  # sid: onnxruntime.InferenceSession on assign.onnx
    check_inputs: InputCheck = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_inputs = InputCheck(self.schema)

    @property
    def item_encoder(self) -> str:
        return self.encoder.kind

    def score(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Model inputs as the graph reads them (export.contract.inputs.assemble; a sid bundle's items
        as tokens, see tokens()) -> float32 scores [batch, list]."""
        self.check_inputs(inputs)
        return self.session.run([MODEL_OUTPUT.name], {n: inputs[n] for n in INPUT_NAMES})[0]

    def tokens(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs with vocabulary indices -> the same inputs with the items the graph reads."""
        return {
            **inputs,
            "cand_items": self.item_tokens[inputs["cand_items"]],
            "hist_items": self.item_tokens[inputs["hist_items"]],
        }

    def assign(self, content_cat: np.ndarray, content_num: np.ndarray) -> np.ndarray:
        """New items' encoded content (export.contract.content.encode_content, stacked) -> int64
        tokens [N] of the codes assign.onnx gives them (sid bundles only)."""
        if self.assign_session is None:
            raise ValueError(
                f"bundle {self.path}: item_encoder is {self.item_encoder!r}; only sid bundles assign codes"
            )
        n_cat, n_num = len(self.schema.content_categorical), len(self.schema.content_numeric)
        for name, array, dtype, width in (
            ("content_cat", content_cat, np.int64, n_cat),
            ("content_num", content_num, np.float32, n_num),
        ):
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 2 or array.shape[1] != width:
                got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"{name}: expected a numpy {np.dtype(dtype)} array [N, {width}], got {got}")
        if len(content_cat) != len(content_num):
            raise ValueError(f"content_cat has {len(content_cat)} rows, content_num {len(content_num)}: one per item")
        if not len(content_cat):
            return np.zeros(0, dtype=np.int64)
        feeds = {"content_cat": content_cat, "content_num": content_num}
        wanted = {i.name for i in self.assign_session.get_inputs()}  # an input the graph never reads is dropped
        codes = self.assign_session.run([ASSIGN_OUTPUT], {k: v for k, v in feeds.items() if k in wanted})[0]
        return sid_tokens(codes, self.encoder.codebook_size)


class InputCheck:
    """Names, dtypes and shapes agree with model_inputs(schema), and batch/list/history agree across
    arrays. The specs are resolved once (dtypes, fixed sizes): the check runs on every request."""

    def __init__(self, schema: FeatureSchema):
        self.specs = [
            (s.name, np.dtype(s.dtype), s.dims, tuple(int(d) if d.isdigit() else d for d in s.dims))
            for s in model_inputs(schema)
        ]

    def __call__(self, inputs: dict[str, np.ndarray]) -> None:
        missing = [n for n in INPUT_NAMES if n not in inputs]
        if missing:
            raise ValueError(f"model inputs missing {missing}; build them with export.contract.inputs.assemble")
        sizes: dict[str, int] = {}
        for name, dtype, names, dims in self.specs:
            array = inputs[name]
            if not isinstance(array, np.ndarray) or array.dtype != dtype:
                got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"model input {name}: expected a numpy {dtype} array, got {got}")
            if array.ndim != len(dims):
                raise ValueError(f"model input {name}: expected dims {names}, got shape {array.shape}")
            for dim, size in zip(dims, array.shape, strict=True):
                want = dim if isinstance(dim, int) else sizes.setdefault(dim, size)
                if size != want:
                    raise ValueError(f"model input {name}: {dim} is {size}, other inputs say {want} ({names})")


def load_bundle(
    path: Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    spinning: bool = False,
    fp16: bool = False,
    int8: bool = False,
    warmup: bool = True,
) -> Bundle:
    """Verify the bundle at `path` (a version directory) and open an ONNX Runtime session on it.

    device: "auto" (CUDA when it works, else CPU), "cuda" (CPU with a warning when CUDA does
    not work) or "cpu". threads: intra-op threads, default 1. fp16: serve model_fp16.onnx; int8:
    serve model_int8.onnx (each only when exported; not both).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if fp16 and int8:
        raise ValueError("fp16 and int8 name two model files: pick one")
    path = Path(path)
    manifest, schema, vocabs = verify_bundle(path)
    model_file, flag = (FP16_FILE, "--fp16") if fp16 else (INT8_FILE, "--int8") if int8 else (MODEL_FILE, "")
    if model_file not in manifest["files"]:
        raise BundleError(f"{path}: no {model_file} in this bundle; export it with `psad export {flag}`")
    session = _session(path / model_file, device, threads or 1, spinning)
    encoder = ItemEncoder.from_dict(manifest["item_encoder"], str(path / MANIFEST_FILE))  # verified already
    codes = read_item_codes(path / ITEM_CODES_FILE, encoder, schema.n_items) if encoder.kind == SID else None
    bundle = Bundle(
        path=path,
        name=str(manifest["name"]),
        version=int(manifest["version"]),
        manifest=manifest,
        schema=schema,
        vocabs=vocabs,
        provider=session.get_providers()[0],
        threads=threads or 1,
        session=session,
        encoder=encoder,
        item_tokens=item_tokens(encoder, codes, schema.n_items),
        assign_session=_assigner(path / ASSIGN_FILE, encoder, device, threads or 1, spinning)
        if codes is not None
        else None,
    )
    if device != "cpu" and bundle.provider != CUDA:
        import onnxruntime as ort

        level = logging.WARNING if device == "cuda" or CUDA in ort.get_available_providers() else logging.INFO
        log.log(level, "bundle %s: asked for device=%s, running on %s", bundle.path, device, bundle.provider)
    if warmup:
        try:
            _warm_up(bundle)
        except Exception as exc:  # ONNX Runtime raises its own types; a graph that disagrees with schema.json
            raise BundleError(
                f"{path / model_file}: the warm-up run on inputs built from schema.json failed "
                f"({_ort_error(exc)}); the graph does not fit the schema, re-export the bundle"
            ) from None
    return bundle


def session_options(threads: int, spinning: bool = False, disabled: tuple[str, ...] = DISABLED_OPTIMIZERS):
    """The serving process's ONNX Runtime settings (see the module docstring); `disabled`: the graph
    optimisers turned off (() = ONNX Runtime's defaults, for comparisons)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if disabled:
        options.add_session_config_entry("optimization.disable_specified_optimizers", ";".join(disabled))
    options.log_severity_level = 3
    return options


def _session(model: Path, device: str, threads: int, spinning: bool):
    import onnxruntime as ort

    want_cuda = device != "cpu" and CUDA in ort.get_available_providers()
    providers = [CUDA, CPU] if want_cuda else [CPU]
    # the disabled fusions were measured on the CPU provider; CUDA keeps ONNX Runtime's defaults
    options = session_options(threads, spinning, disabled=() if want_cuda else DISABLED_OPTIMIZERS)
    try:
        return ort.InferenceSession(str(model), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise BundleError(f"{model}: ONNX Runtime cannot load it ({_ort_error(exc)})") from None


def _assigner(model: Path, encoder: ItemEncoder, device: str, threads: int, spinning: bool):
    """A session on assign.onnx whose inputs and output are those of the format, `levels` codes wide."""
    session = _session(model, device, threads, spinning)
    names = [i.name for i in session.get_inputs()]
    outputs = [(o.name, o.shape) for o in session.get_outputs()]
    fix = "re-export the bundle (assign.onnx does not match its manifest)"
    if not set(names) <= set(ASSIGN_INPUTS):
        raise BundleError(f"{model}: inputs {names}, expected some of {list(ASSIGN_INPUTS)}; {fix}")
    if len(outputs) != 1 or outputs[0][0] != ASSIGN_OUTPUT or len(outputs[0][1]) != 2:
        raise BundleError(f"{model}: outputs {outputs}, expected one {ASSIGN_OUTPUT!r} [batch, levels]; {fix}")
    if outputs[0][1][1] != encoder.levels:
        raise BundleError(
            f"{model}: output {ASSIGN_OUTPUT!r} is {outputs[0][1][1]} codes wide, the manifest says "
            f"levels={encoder.levels}; {fix}"
        )
    return session


def _ort_error(exc: Exception) -> str:
    """ONNX Runtime's message on one line (it spans several), for one-line errors and log fields."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _warm_up(bundle: Bundle) -> None:
    """Run representative shapes once or twice so the first requests do not pay for allocation."""
    maker = BatchMaker(bundle.schema, seed=0)
    s = bundle.schema
    for shape in ((1, s.max_list, s.max_history), (1, min(10, s.max_list), 0), (32, s.max_list, s.max_history)):
        inputs = bundle.tokens(maker.make(*shape))
        for _ in range(WARMUP_RUNS):
            bundle.score(inputs)
    if bundle.assign_session is not None:
        content = synthetic_content(s, s.max_list, np.random.default_rng(0))
        for _ in range(WARMUP_RUNS):
            bundle.assign(*content)


def synthetic_content(schema: FeatureSchema, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n items' encoded content drawn from the schema (any category, numerics around their mean):
    inputs for assign.onnx that no real item needs to have."""
    cat = [rng.integers(0, f.cardinality, n) for f in schema.content_categorical]
    num = [rng.normal(f.mean, 2 * f.std, n) for f in schema.content_numeric]
    return (
        np.stack(cat, axis=1).astype(np.int64) if cat else np.zeros((n, 0), np.int64),
        np.stack(num, axis=1).astype(np.float32) if num else np.zeros((n, 0), np.float32),
    )
