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
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.contract.fixtures import BatchMaker
from export.contract.schema import INPUT_NAMES, MODEL_OUTPUT
from export.runtime import CPU, session_options

if TYPE_CHECKING:
    from torch import nn

BATCHES = (1, 2, 64)
LISTS = (1, 10, 200)
HISTORIES = (0, 1, 50)
SHAPES = tuple(itertools.product(BATCHES, LISTS, HISTORIES))  # (batch, list, history)


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
) -> ParityReport:
    """Score every shape with PyTorch (a serving module: the model inputs positionally) and ONNX
    Runtime (CPU) and compare; never raises on a mismatch."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), session_options(threads=1), providers=[CPU])
    rows = []
    for batch, length, history in shapes:
        inputs = maker.make(batch, length, history)
        with torch.inference_mode():
            ref = module(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES)).float().numpy()
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
