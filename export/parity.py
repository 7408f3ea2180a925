"""The parity gate: an exported graph must score like the PyTorch module it was exported from.

ONNX Runtime (CPU provider, full graph optimisation, as served) and PyTorch score the same
held-out batches at every combination of batch 1/2/64, list length 1/10/200 and history length
0/1/50 (lengths past the schema's max_list reuse its last position code, so they are fair game). Real
lists from the validation split are cropped or tiled to reach a shape; without a split the
batches are synthesised from the schema. The last row of every batch of two or more is padded
(half its candidates and history masked out), as assemble() pads a mixed batch.

A shape passes when the largest absolute score difference over valid candidates is within
`max_abs` and every list ranks its valid candidates the same way: reading the PyTorch scores in
ONNX Runtime's order must give the sorted PyTorch scores, up to `tie_eps`, at each of the first
`top_k` ranks (so candidates whose scores tie within tie_eps may swap places, nothing else may).

A sid graph reads item tokens: PyTorch scores the vocabulary indices (the model's own path from
index to codes) and ONNX Runtime the tokens the bundle maps them to (its item_codes.npy), so the
gate covers the stored codes too. check_codes adds the codes themselves: item_codes.npy must equal
the model's known_codes() exactly, and assign.onnx must give the codes of the PyTorch assigner on
every known item's content, on that content perturbed, and on content drawn from the schema. A
code may differ on at most CODE_MISMATCH of the items (and on none of a catalogue under
1 / CODE_MISMATCH items): a hard argmax flips on a float32 near-tie between two codes.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.contract.bundle import ASSIGN_OUTPUT, ITEM_CODES_FILE
from export.contract.fixtures import BatchMaker
from export.contract.schema import INPUT_NAMES, MODEL_OUTPUT, N_RESERVED, FeatureSchema
from export.runtime import CPU, session_options, synthetic_content

if TYPE_CHECKING:
    from torch import nn

    from training.models.sid import SidEncoder

BATCHES = (1, 2, 64)
LISTS = (1, 10, 200)
HISTORIES = (0, 1, 50)
SHAPES = tuple(itertools.product(BATCHES, LISTS, HISTORIES))  # (batch, list, history)
CODE_MISMATCH = 1e-4  # share of items whose assign.onnx codes may differ from PyTorch's (near-ties)
CONTENT_SAMPLES = 256  # perturbed and synthetic content rows the assigner is checked on


class ParityError(RuntimeError):
    """The exported graph does not score like PyTorch; the message holds the per-shape table."""


@dataclass(frozen=True)
class Tolerance:
    max_abs: float  # largest allowed |onnx - torch| over valid candidates
    tie_eps: float  # PyTorch scores this close count as tied (either order is correct)
    top_k: int | None = None  # ranks that must agree; None = the whole list


FP32 = Tolerance(max_abs=1e-4, tie_eps=1e-5)
FP16 = Tolerance(max_abs=1e-2, tie_eps=1e-2, top_k=10)
INT8 = Tolerance(max_abs=0.25, tie_eps=0.25, top_k=10)  # a gate against a broken quantisation, not a quality claim


@dataclass(frozen=True)
class ParityRow:
    batch: int
    list: int
    history: int
    max_abs_diff: float
    rank_agreement: float  # fraction of lists whose ranking agrees
    passed: bool


@dataclass
class ParityReport:
    model_file: str
    tolerance: Tolerance
    source: str  # where the batches came from
    rows: list[ParityRow]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def max_abs_diff(self) -> float:
        return max(r.max_abs_diff for r in self.rows)

    def table(self) -> str:
        tol = self.tolerance
        k = "all ranks" if tol.top_k is None else f"top-{tol.top_k}"
        lines = [
            f"parity of {self.model_file} vs PyTorch on {self.source} "
            f"(max |diff| <= {tol.max_abs:g}, rankings agree on {k}, ties within {tol.tie_eps:g})",
            "| batch | list | history | max abs diff | rank agreement | result |",
            "|---:|---:|---:|---:|---:|:---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.batch} | {r.list} | {r.history} | {r.max_abs_diff:.3g} | {r.rank_agreement:.3f} | "
                f"{'pass' if r.passed else 'FAIL'} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_file": self.model_file,
            "passed": self.passed,
            "source": self.source,
            "tolerance": asdict(self.tolerance),
            "max_abs_diff": self.max_abs_diff,
            "shapes": [asdict(r) for r in self.rows],
        }


def compare(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray, tol: Tolerance) -> tuple[float, float]:
    """(max abs diff, fraction of lists whose ranking agrees) over the valid candidates."""
    if reference.shape != candidate.shape:
        return float("inf"), 0.0
    if not mask.any():
        return 0.0, 1.0
    diff = np.abs(reference[mask].astype(np.float64) - candidate[mask].astype(np.float64))
    max_diff = float(np.max(diff)) if np.isfinite(diff).all() else float("inf")
    agree = [_same_ranking(reference[i][mask[i]], candidate[i][mask[i]], tol) for i in range(len(mask))]
    return max_diff, float(np.mean(agree))


def _same_ranking(ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> bool:
    k = len(ref) if tol.top_k is None else min(tol.top_k, len(ref))
    by_candidate = ref[np.argsort(-cand, kind="stable")[:k]]
    best = -np.sort(-ref)[:k]
    return bool(np.all(np.abs(by_candidate - best) <= tol.tie_eps))


def check_parity(
    module: nn.Module,
    onnx_path: Path,
    maker: BatchMaker,
    tol: Tolerance = FP32,
    shapes: tuple[tuple[int, int, int], ...] = SHAPES,
    tokens: np.ndarray | None = None,
) -> ParityReport:
    """Score every shape with PyTorch (`module` takes the model inputs positionally, items as
    vocabulary indices) and ONNX Runtime (CPU; items mapped through `tokens`, the bundle's item
    tokens, when given) and compare; never raises on a mismatch."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), session_options(threads=1), providers=[CPU])
    rows = []
    for batch, length, history in shapes:
        inputs = maker.make(batch, length, history)
        with torch.inference_mode():
            ref = module(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES)).float().numpy()
        if tokens is not None:
            inputs = {**inputs, "cand_items": tokens[inputs["cand_items"]], "hist_items": tokens[inputs["hist_items"]]}
        got = session.run([MODEL_OUTPUT.name], inputs)[0]
        max_diff, agreement = compare(ref, got, inputs["cand_mask"], tol)
        passed = max_diff <= tol.max_abs and agreement == 1.0
        rows.append(ParityRow(batch, length, history, max_diff, agreement, passed))
    return ParityReport(Path(onnx_path).name, tol, maker.source, rows)


def require_parity(report: ParityReport) -> ParityReport:
    """The gate: a report that failed becomes a ParityError carrying its table."""
    if not report.passed:
        raise ParityError(f"export refused: {report.model_file} does not score like PyTorch\n{report.table()}")
    return report


@dataclass(frozen=True)
class CodeRow:
    check: str  # what was compared
    items: int
    mismatched: int
    allowed: int

    @property
    def passed(self) -> bool:
        return self.mismatched <= self.allowed


@dataclass
class CodeReport:
    rows: list[CodeRow]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def table(self) -> str:
        lines = ["| codes | items | mismatched | allowed | result |", "|:---|---:|---:|---:|:---|"]
        for r in self.rows:
            lines.append(f"| {r.check} | {r.items} | {r.mismatched} | {r.allowed} | {'pass' if r.passed else 'FAIL'} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "max_mismatch": CODE_MISMATCH, "checks": [asdict(r) for r in self.rows]}


def check_codes(
    sid: SidEncoder, schema: FeatureSchema, bundle_dir: Path, assign_path: Path, seed: int = 0
) -> CodeReport:
    """The bundle's codes against the model's: item_codes.npy in `bundle_dir` against
    sid.known_codes(), and assign.onnx against sid.assigner() on known, perturbed and synthetic
    content (`schema`: the bundle's); never raises on a mismatch."""
    import onnxruntime as ort
    import torch

    stored = np.load(Path(bundle_dir) / ITEM_CODES_FILE, allow_pickle=False)
    known = sid.known_codes().numpy()
    rows = [CodeRow(f"{ITEM_CODES_FILE} == known_codes()", len(known), _mismatched(stored, known), 0)]
    session = ort.InferenceSession(str(assign_path), session_options(threads=1), providers=[CPU])
    wanted = {i.name for i in session.get_inputs()}
    assigner = sid.assigner().eval()
    rng = np.random.default_rng(seed)
    stored_cat, stored_num = sid.content_cat, sid.content_num  # buffers: the items' raw content
    assert isinstance(stored_cat, torch.Tensor) and isinstance(stored_num, torch.Tensor)
    content_cat = stored_cat[N_RESERVED : len(known)].numpy()
    content_num = stored_num[N_RESERVED : len(known)].numpy()
    picked = rng.integers(0, len(content_cat), CONTENT_SAMPLES) if len(content_cat) else np.zeros(0, np.int64)
    std = np.array([f.std for f in schema.content_numeric], dtype=np.float32)
    cases = {
        "assign.onnx on known items' content": (content_cat, content_num),
        "assign.onnx on perturbed content": (
            content_cat[rng.permutation(picked)] if len(picked) else content_cat,
            (content_num[picked] + rng.normal(0, 0.3, (len(picked), len(std))) * std).astype(np.float32),
        ),
        "assign.onnx on synthetic content": synthetic_content(schema, CONTENT_SAMPLES, rng),
    }
    for check, (cat, num) in cases.items():
        feeds = {"content_cat": cat, "content_num": num}
        got = session.run([ASSIGN_OUTPUT], {k: v for k, v in feeds.items() if k in wanted})[0] if len(cat) else cat
        with torch.inference_mode():
            want = assigner(torch.from_numpy(cat), torch.from_numpy(num)).numpy() if len(cat) else cat
        rows.append(CodeRow(check, len(cat), _mismatched(got, want), int(len(cat) * CODE_MISMATCH)))
    return CodeReport(rows)


def _mismatched(got: np.ndarray, want: np.ndarray) -> int:
    """Items (rows) whose codes differ; every row when the shapes differ."""
    if got.shape != want.shape:
        return max(len(got), len(want))
    return int((got.astype(np.int64) != want.astype(np.int64)).any(axis=-1).sum())


def require_codes(report: CodeReport) -> CodeReport:
    """The gate on codes: a report that failed becomes a ParityError carrying its table."""
    if not report.passed:
        raise ParityError(f"export refused: the bundle's item codes differ from the model's\n{report.table()}")
    return report
