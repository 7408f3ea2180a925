"""Model-input assembly: the one function that turns encoded profiles and candidate lists
into the padded arrays the model reads. The data-set loader and the service both call it,
so training and serving cannot drift apart. numpy only (the service runs without torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from export.contract.schema import FeatureSchema, ModelInputs

SECONDS_PER_DAY = 86_400.0


@dataclass
class EncodedProfile:
    """A user as the model sees them: encoded features and the behaviour history, oldest first."""

    user_cat: np.ndarray  # int64 [n_user_categorical]
    user_num: np.ndarray  # float32 [n_user_numeric]
    hist_items: np.ndarray  # int64 [h]
    hist_ts: np.ndarray  # int64 [h], unix seconds
    hist_actions: np.ndarray  # int64 [h]


def cold_start_profile(schema: FeatureSchema) -> EncodedProfile:
    """An unknown user: missing features (index 0, zero numerics) and an empty history."""
    empty = np.zeros(0, dtype=np.int64)
    return EncodedProfile(
        user_cat=np.zeros(len(schema.user_categorical), dtype=np.int64),
        user_num=np.zeros(len(schema.user_numeric), dtype=np.float32),
        hist_items=empty,
        hist_ts=empty,
        hist_actions=empty,
    )


def _recent_history(profile: EncodedProfile, now: float, max_history: int) -> slice:
    """Behaviours strictly before `now` (no leakage from the future), the last max_history."""
    end = int(profile.hist_ts.searchsorted(now, side="left"))
    return slice(max(0, end - max_history), end)


def assemble(
    schema: FeatureSchema,
    profiles: Sequence[EncodedProfile],
    cand_items: Sequence[np.ndarray],
    cand_num: Sequence[np.ndarray],
    now: Sequence[float],
) -> dict[str, np.ndarray]:
    """Pad a batch of lists to its longest list and longest history.

    cand_items[i]: int64 [L_i] item indices in the ranking stage's order;
    cand_num[i]: float32 [L_i, n_candidate_numeric]; now[i]: request time, unix seconds.
    Histories must be sorted by timestamp (profiles keep them so).
    """
    n = len(profiles)
    if not (len(cand_items) == len(cand_num) == len(now) == n):
        raise ValueError("assemble: profiles, cand_items, cand_num and now must have the same length")
    windows = [_recent_history(p, t, schema.max_history) for p, t in zip(profiles, now, strict=True)]
    h = max((w.stop - w.start for w in windows), default=0)
    lmax = max((len(c) for c in cand_items), default=0)
    n_num = len(schema.candidate_numeric)

    # Spelled out rather than built from model_inputs(schema), which would cost every request its
    # specs; tests/test_schema.py holds these arrays to the specs' dtypes and dims.
    out: ModelInputs[np.ndarray] = ModelInputs(
        user_cat=np.zeros((n, len(schema.user_categorical)), dtype=np.int64),
        user_num=np.zeros((n, len(schema.user_numeric)), dtype=np.float32),
        hist_items=np.zeros((n, h), dtype=np.int64),
        hist_actions=np.zeros((n, h), dtype=np.int64),
        hist_age=np.zeros((n, h), dtype=np.float32),
        hist_mask=np.zeros((n, h), dtype=bool),
        cand_items=np.zeros((n, lmax), dtype=np.int64),
        cand_num=np.zeros((n, lmax, n_num), dtype=np.float32),
        cand_mask=np.zeros((n, lmax), dtype=bool),
    )
    for i, (p, w, items, num, t) in enumerate(zip(profiles, windows, cand_items, cand_num, now, strict=True)):
        out.user_cat[i] = p.user_cat
        out.user_num[i] = p.user_num
        k = w.stop - w.start
        out.hist_items[i, :k] = p.hist_items[w]
        out.hist_actions[i, :k] = p.hist_actions[w]
        out.hist_age[i, :k] = np.maximum(0.0, (t - p.hist_ts[w]) / SECONDS_PER_DAY)
        out.hist_mask[i, :k] = True
        m = len(items)
        out.cand_items[i, :m] = items
        out.cand_num[i, :m] = np.asarray(num, dtype=np.float32).reshape(m, n_num)
        out.cand_mask[i, :m] = True
    return out._asdict()
