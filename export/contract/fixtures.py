"""Model inputs of any (batch, list, history) shape, from real lists or synthesised from the schema:
what the exporter traces with, the parity gate compares on, the runtime warms up with, and tests use.
"""

from __future__ import annotations

import numpy as np

from export.contract.schema import N_RESERVED, OOV, FeatureSchema, ModelInputs

MAX_AGE_DAYS = 365.0


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
        out = ModelInputs(  # in the order of the random draws, so that a seed keeps making the same batches
            user_cat=self._rows(pool["user_cat"], batch),
            user_num=self._rows(pool["user_num"], batch),
            cand_items=self._windows(pool["cand_items"], batch, length),
            cand_num=self._windows(pool["cand_num"], batch, length),
            hist_items=self._windows(pool["hist_items"], batch, history),
            hist_actions=self._windows(pool["hist_actions"], batch, history),
            hist_age=self._windows(pool["hist_age"], batch, history),
            cand_mask=np.ones((batch, length), dtype=bool),
            hist_mask=np.ones((batch, history), dtype=bool),
        )
        if pad_last and batch >= 2:
            _pad_row(out, batch - 1, keep_list=max(1, (length + 1) // 2), keep_history=history // 2)
        return out._asdict()

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


def _pad_row(out: ModelInputs[np.ndarray], row: int, keep_list: int, keep_history: int) -> None:
    """Zero the tail of one row (masks included) the way assemble() pads a shorter list and history."""
    for array in (out.cand_items, out.cand_num, out.cand_mask):
        array[row, keep_list:] = 0
    for array in (out.hist_items, out.hist_actions, out.hist_age, out.hist_mask):
        array[row, keep_history:] = 0
