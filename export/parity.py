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

import numpy as np

from training.schema import INPUT_NAMES, MODEL_OUTPUT, N_RESERVED, OOV, FeatureSchema

BATCHES = (1, 2, 64)
LISTS = (1, 10, 200)
HISTORIES = (0, 1, 50)
MAX_AGE_DAYS = 365.0


class ParityError(RuntimeError):
    """The exported graph does not score like PyTorch; the message holds the per-shape table."""


@dataclass(frozen=True)
class Tolerance:
    max_abs: float  # largest allowed |onnx - torch| over valid candidates
    tie_eps: float  # PyTorch scores this close count as tied (either order is correct)
    top_k: int | None = None  # ranks that must agree; None = the whole list


FP32 = Tolerance(max_abs=1e-4, tie_eps=1e-5)
FP16 = Tolerance(max_abs=1e-2, tie_eps=1e-2, top_k=10)


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

    def to_dict(self) -> dict:
        return {
            "model_file": self.model_file,
            "passed": self.passed,
            "source": self.source,
            "tolerance": asdict(self.tolerance),
            "max_abs_diff": self.max_abs_diff,
            "shapes": [asdict(r) for r in self.rows],
        }


SHAPES = tuple(itertools.product(BATCHES, LISTS, HISTORIES))  # (batch, list, history)


class BatchMaker:
    """Builds model inputs of any (batch, list, history) shape from real lists or from the schema.

    Real lists are flattened into pools of valid candidates and behaviours; a row of length L
    is a window of L consecutive pool entries (wrapping), so short lists are tiled from their
    neighbours and long ones cropped, and every item index is one the model saw in validation.
    """

    def __init__(self, schema: FeatureSchema, inputs: dict[str, np.ndarray] | None = None, seed: int = 0):
        self.schema = schema
        self.rng = np.random.default_rng(seed)
        self.pool = _flatten(inputs) if inputs is not None and inputs["cand_mask"].any() else None
        if self.pool is not None and len(self.pool["hist_items"]) == 0:
            self.pool = {**self.pool, **self._synthetic_history(64)}

    @property
    def source(self) -> str:
        return "validation lists" if self.pool is not None else "batches synthesised from the schema"

    def make(self, batch: int, length: int, history: int, pad_last: bool = True) -> dict[str, np.ndarray]:
        pool = self.pool or self._synthetic_pool(batch, length, history)
        out = {
            "user_cat": self._rows(pool["user_cat"], batch),
            "user_num": self._rows(pool["user_num"], batch),
            **{n: self._windows(pool[n], batch, length) for n in ("cand_items", "cand_num")},
            **{n: self._windows(pool[n], batch, history) for n in ("hist_items", "hist_actions", "hist_age")},
            "cand_mask": np.ones((batch, length), dtype=bool),
            "hist_mask": np.ones((batch, history), dtype=bool),
        }
        if pad_last and batch >= 2:
            _pad_row(out, batch - 1, keep_list=max(1, (length + 1) // 2), keep_history=history // 2)
        return {n: out[n] for n in INPUT_NAMES}

    def _rows(self, pool: np.ndarray, batch: int) -> np.ndarray:
        return pool[self.rng.integers(0, len(pool), size=batch)]

    def _windows(self, pool: np.ndarray, batch: int, length: int) -> np.ndarray:
        starts = self.rng.integers(0, len(pool), size=(batch, 1))
        return pool[(starts + np.arange(length)) % len(pool)]

    def _synthetic_pool(self, batch: int, length: int, history: int) -> dict[str, np.ndarray]:
        s, rng = self.schema, self.rng
        n = max(batch, length, history, 1)
        ucat = [rng.integers(N_RESERVED, f.cardinality, size=n) for f in s.user_categorical]
        return {
            "user_cat": np.stack(ucat, axis=1) if ucat else np.zeros((n, 0), np.int64),
            "user_num": rng.standard_normal((n, len(s.user_numeric))).astype(np.float32),
            "cand_items": rng.integers(N_RESERVED, s.n_items, size=n),
            "cand_num": rng.standard_normal((n, len(s.candidate_numeric))).astype(np.float32),
            **self._synthetic_history(n),
        }

    def _synthetic_history(self, n: int) -> dict[str, np.ndarray]:
        s, rng = self.schema, self.rng
        first_action = N_RESERVED if s.actions else OOV
        return {
            "hist_items": rng.integers(N_RESERVED, s.n_items, size=n),
            "hist_actions": rng.integers(first_action, max(s.n_actions, first_action + 1), size=n),
            "hist_age": rng.uniform(0.0, MAX_AGE_DAYS, size=n).astype(np.float32),
        }


def _flatten(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cm, hm = inputs["cand_mask"], inputs["hist_mask"]
    return {
        "user_cat": inputs["user_cat"],
        "user_num": inputs["user_num"],
        "cand_items": inputs["cand_items"][cm],
        "cand_num": inputs["cand_num"][cm],
        "hist_items": inputs["hist_items"][hm],
        "hist_actions": inputs["hist_actions"][hm],
        "hist_age": inputs["hist_age"][hm],
    }


def _pad_row(out: dict[str, np.ndarray], row: int, keep_list: int, keep_history: int) -> None:
    """Mask the tail of one row the way assemble() pads a shorter list and history."""
    out["cand_mask"][row, keep_list:] = False
    out["hist_mask"][row, keep_history:] = False
    for name, keep in (("cand_items", keep_list), ("cand_num", keep_list)):
        out[name][row, keep:] = 0
    for name in ("hist_items", "hist_actions", "hist_age"):
        out[name][row, keep_history:] = 0


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
    module, onnx_path: Path, maker: BatchMaker, tol: Tolerance = FP32, shapes: tuple[tuple[int, int, int], ...] = SHAPES
) -> ParityReport:
    """Score every shape with PyTorch and ONNX Runtime (CPU) and compare; never raises on a mismatch."""
    import onnxruntime as ort
    import torch

    from export.runtime import CPU, session_options

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
