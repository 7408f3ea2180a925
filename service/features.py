"""Requests and stored profiles -> model inputs, through export.contract.inputs.assemble (the function
training uses, so serving cannot drift from it).

Candidate features: ``rank_score`` is the candidate's ``score``. When a request carries no scores,
the stand-in is ``mean + std * (1 - 2 i / (L - 1))`` for the candidate at position i of L, from
the bundle schema's rank_score statistics: strictly decreasing with position and spanning one
standard deviation either side of the training mean. Other candidate features missing from a
candidate take their training mean (0 after the model's standardisation).

Items (docs/service.md, "How an item is resolved"): an id bundle reads vocabulary indices (an
unknown item is OOV; request content is ignored). A sid bundle reads one token per item: a known
item's is `bundle.item_tokens[index]`; an item its vocabulary does not hold is given a temporary
index past the vocabulary while the batch is encoded (candidates and histories alike, by the
usual code), then its content (the request's `content`, else Redis's) is encoded with
export.contract.content and every new item of the micro-batch is assigned in one `bundle.assign`
call, through a process-wide LRU cache keyed by the bundle's path and the encoded content (what
the token is a function of). An item without content, or with content that fails validation, gets
the OOV token and flags its list.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.contract.content import ContentError, encode_content, from_stored
from export.contract.inputs import EncodedProfile, assemble, cold_start_profile
from export.contract.schema import OOV, RANK_SCORE, FeatureSchema, NumericFeature, Vocab, Vocabularies
from export.runtime import Bundle
from service.api import Degraded, RerankRequest
from service.profiles import RawProfile, StoredContent, encode_profile

log = logging.getLogger("psad.service")
SID = "sid"
TOKEN_CACHE_SIZE = 100_000  # new items' tokens kept per process (a few MB), across bundle versions


@dataclass
class Job:
    """One list to score: the validated request, its raw profile, its request time and (sid
    bundles) the Redis content of the new items it names (item id -> StoredContent, those found)."""

    request: RerankRequest
    profile: RawProfile | None  # None: the read failed, score with a cold-start profile
    now: float
    contents: Mapping[str, StoredContent] = field(default_factory=dict)


@dataclass
class Built:
    """A batch's model inputs, and per job the corrupt profile entries skipped and its item fallbacks."""

    inputs: dict[str, np.ndarray]
    corrupt: list[int]
    reasons: list[list[Degraded]]


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


def build_inputs(jobs: Sequence[Job], bundle: Bundle) -> Built:
    """Model inputs for a batch of jobs: vocabulary indices for an id bundle, item tokens for a sid one."""
    schema = bundle.schema
    new = NewItems(bundle) if bundle.item_encoder == SID else None
    profiles, corrupt, items = [], [], []
    for job in jobs:
        vocabs = bundle.vocabs if new is None else new.next_job()
        profile, bad = encoded(job.profile, schema, vocabs)
        profiles.append(profile)
        corrupt.append(bad)
        items.append(np.asarray(vocabs.items.indices([c.item_id for c in job.request.candidates]), dtype=np.int64))
    reasons: list[list[Degraded]] = [[] for _ in jobs]
    if new is not None:
        tokens, reasons = new.resolve(jobs)
        profiles = [dataclasses.replace(p, hist_items=tokens[p.hist_items]) for p in profiles]
        items = [tokens[x] for x in items]
    nums = [candidate_numeric(j.request, schema) for j in jobs]
    return Built(assemble(schema, profiles, items, nums, [j.now for j in jobs]), corrupt, reasons)


class JobItems(Vocab):
    """The bundle's item vocabulary for one job, which gives each item it does not hold a temporary
    index past the vocabulary (and past earlier jobs' new items), so that the usual encoding code
    runs unchanged; `new` lists them in order."""

    def __init__(self, known: Vocab, first: int):
        self.tokens = known.tokens  # shared, not copied: the known part is the bundle's
        self._known = known
        self._first = first
        self.new: dict[str, int] = {}

    def index(self, token: str) -> int:
        return self.indices([token])[0]

    def indices(self, tokens: Sequence[str]) -> list[int]:
        out = self._known.indices(tokens)
        for k, idx in enumerate(out):
            if idx == OOV:
                token = str(tokens[k])
                out[k] = self.new.setdefault(token, self._first + len(self.new))
        return out


class NewItems:
    """The items of one batch that a sid bundle's vocabulary does not hold, and their tokens."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.jobs: list[JobItems] = []

    def next_job(self) -> Vocabularies:
        """The next job's vocabularies: its new items numbered after the earlier jobs'."""
        first = len(self.bundle.item_tokens) + sum(len(j.new) for j in self.jobs)
        items = JobItems(self.bundle.vocabs.items, first)
        self.jobs.append(items)
        return dataclasses.replace(self.bundle.vocabs, items=items)

    def resolve(self, jobs: Sequence[Job]) -> tuple[TokenMap, list[list[Degraded]]]:
        """Batch index -> token (known tokens, then each job's new items'), and each job's fallbacks."""
        bundle = self.bundle
        oov = int(bundle.item_tokens[OOV])
        encoded: list[tuple[np.ndarray, np.ndarray] | None] = []
        reasons: list[list[Degraded]] = []
        for job, items in zip(jobs, self.jobs, strict=True):
            given = {c.item_id: (k, c.content) for k, c in enumerate(job.request.candidates) if c.content is not None}
            why: set[Degraded] = set()
            for item_id in items.new:
                content, reason = item_content(bundle, item_id, given.get(item_id), job.contents.get(item_id))
                encoded.append(content)
                if reason is not None:
                    why.add(reason)
            reasons.append(sorted(why))
        new = np.full(len(encoded), oov, dtype=np.int64)
        found = [k for k, e in enumerate(encoded) if e is not None]
        if found:
            new[found] = TOKENS.get(bundle, [e for e in encoded if e is not None])
        return TokenMap(bundle.item_tokens, new), reasons


@dataclass(frozen=True)
class TokenMap:
    """Batch item index -> token: the bundle's for its vocabulary's indices, then the batch's new
    items' (indexed, never concatenated: the bundle's table is as long as the catalogue)."""

    known: np.ndarray  # int64 [n_items]
    new: np.ndarray  # int64 [new items of the batch]

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        n = len(self.known)
        out = self.known[np.minimum(index, n - 1)]
        later = index >= n
        if later.any():
            out[later] = self.new[index[later] - n]
        return out


def item_content(
    bundle: Bundle, item_id: str, given: tuple[int, Mapping[str, Any]] | None, stored: StoredContent | None
) -> tuple[tuple[np.ndarray, np.ndarray] | None, Degraded | None]:
    """A new item's encoded content (the request's, else Redis's), or None and why not."""
    schema, vocabs = bundle.schema, bundle.vocabs
    try:
        if given is not None:
            k, raw = given
            return encode_content(schema, vocabs, raw, f"candidates[{k}].content"), None
        if stored is None:
            return None, Degraded.ITEM_CONTENT_MISSING
        where = f"redis item {item_id!r}"
        if stored.error is not None:
            raise ContentError(f"{where}: unreadable ({stored.error}); reload it with `psad items load`")
        return encode_content(schema, vocabs, from_stored(schema, stored.fields, where), where), None
    except ContentError as exc:
        log.warning("item content invalid; scoring the item as out-of-vocabulary", extra={"error": str(exc)})
        return None, Degraded.ITEM_CONTENT_INVALID


class TokenCache:
    """New items' tokens by bundle and encoded content (what the token is a function of), least
    recently used dropped first; shared by the inference threads, hence the lock. A miss is
    assigned in one `bundle.assign` call per batch."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[tuple[str, bytes, bytes], int] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, bundle: Bundle, contents: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """int64 tokens [N] of the encoded contents."""
        where = str(bundle.path)
        keys = [(where, cat.tobytes(), num.tobytes()) for cat, num in contents]
        out = np.empty(len(keys), dtype=np.int64)
        missing: dict[tuple[str, bytes, bytes], list[int]] = {}
        with self.lock:
            for k, key in enumerate(keys):
                token = self.entries.get(key)
                if token is None:
                    missing.setdefault(key, []).append(k)
                else:
                    self.entries.move_to_end(key)
                    out[k] = token
        if not missing:
            return out
        first = [rows[0] for rows in missing.values()]
        cat = np.stack([contents[k][0] for k in first])
        num = np.stack([contents[k][1] for k in first])
        tokens = np.asarray(bundle.assign(cat, num), dtype=np.int64)
        with self.lock:
            for (key, rows), token in zip(missing.items(), tokens.tolist(), strict=True):
                out[rows] = token
                self.entries[key] = token
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return out


TOKENS = TokenCache(TOKEN_CACHE_SIZE)
