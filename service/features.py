"""Requests and stored profiles -> model inputs, through export.contract.inputs.assemble (the function
training uses, so serving cannot drift from it).

Candidate features: ``rank_score`` is the candidate's ``score``. When a request carries no scores,
the stand-in is ``mean + std * (1 - 2 i / (L - 1))`` for the candidate at position i of L, from
the bundle schema's rank_score statistics: strictly decreasing with position and spanning one
standard deviation either side of the training mean. Other candidate features missing from a
candidate take their training mean (0 after the model's standardisation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from export.contract.inputs import EncodedProfile, assemble, cold_start_profile
from export.contract.schema import RANK_SCORE, FeatureSchema, NumericFeature, Vocabularies
from service.api import RerankRequest
from service.profiles import RawProfile, encode_profile

log = logging.getLogger("psad.service")


@dataclass
class Job:
    """One list to score: the validated request, its raw profile and its request time."""

    request: RerankRequest
    profile: RawProfile | None  # None: the read failed, score with a cold-start profile
    now: float


def request_time(request: RerankRequest) -> float:
    """The request's time: its context's timestamp, else now (only behaviours before it are read)."""
    given = request.context.timestamp if request.context is not None else None
    return time.time() if given is None else given


def position_stand_in(n: int, stats: NumericFeature | None = None) -> np.ndarray:
    """Scores that decrease with position: the ranking stage's order when no scores were given."""
    mean, std = (stats.mean, stats.std) if stats else (0.0, 1.0)
    return (mean + std * (1.0 - 2.0 * np.arange(n) / max(n - 1, 1))).astype(np.float32)


def given_scores(request: RerankRequest, schema: FeatureSchema | None = None) -> np.ndarray:
    """The ranking stage's scores, or the position stand-in when the request has none."""
    if request.candidates[0].score is None:
        stats = next((f for f in schema.candidate_numeric if f.name == RANK_SCORE), None) if schema else None
        return position_stand_in(len(request.candidates), stats)
    return np.array([c.score for c in request.candidates], dtype=np.float32)


def candidate_numeric(request: RerankRequest, schema: FeatureSchema) -> np.ndarray:
    """float32 [L, n_candidate_numeric] in schema order."""
    out = np.empty((len(request.candidates), len(schema.candidate_numeric)), dtype=np.float32)
    for j, f in enumerate(schema.candidate_numeric):
        if f.name == RANK_SCORE:
            out[:, j] = given_scores(request, schema)
        else:
            out[:, j] = [(c.features or {}).get(f.name, f.mean) for c in request.candidates]
    return out


def encoded(profile: RawProfile | None, schema: FeatureSchema, vocabs: Vocabularies) -> tuple[EncodedProfile, int]:
    """The encoded profile and its corrupt-entry count; a cold start for a failed read, and for a
    profile that Redis cannot read (keys of another type) or that cannot be decoded at all (so one
    bad profile never fails a whole micro-batch)."""
    if profile is None:
        return cold_start_profile(schema), 0
    if profile.error is not None:
        log.warning("profile unreadable in Redis; scoring with a cold-start profile", extra={"error": profile.error})
        return cold_start_profile(schema), 1
    try:
        return encode_profile(profile, schema, vocabs)
    except Exception:
        log.warning("profile cannot be decoded; scoring with a cold-start profile", exc_info=True)
        return cold_start_profile(schema), 1


def build_inputs(
    jobs: Sequence[Job], schema: FeatureSchema, vocabs: Vocabularies
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Model inputs for a batch of jobs, and the corrupt profile entries skipped per job."""
    profiles, corrupt = zip(*(encoded(j.profile, schema, vocabs) for j in jobs), strict=True)
    items = [np.asarray(vocabs.items.indices([c.item_id for c in j.request.candidates]), dtype=np.int64) for j in jobs]
    nums = [candidate_numeric(j.request, schema) for j in jobs]
    return assemble(schema, list(profiles), items, nums, [j.now for j in jobs]), list(corrupt)
