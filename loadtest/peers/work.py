"""What every peer does for one request, written once so that the peers differ only in their framework.

The profile read is redis-py's asyncio client (hiredis parses the replies when installed) sending the
service's two commands (service.profiles' key layout: HGETALL of the user hash, ZRANGE BYSCORE REV of
the last max_history behaviours before now) in one pipelined round trip. The profile is encoded and the
inputs assembled by the project's own functions (service.profiles.encode_profile,
export.contract.inputs.assemble), the student is scored by export.runtime.load_bundle's session (the
service's ONNX Runtime settings and intra-op threads), the candidates are sorted by score (stable) and
the answer has /rerank's fields.

Requests carry a score per candidate, as the benchmark's do: the ranking-stage score is the model's
rank_score and any other candidate feature takes its training mean, as in service.features. The peers
need only numpy, onnxruntime and redis from the project's dependencies, so each framework's own
virtualenv can import this.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aredis

from export.contract.inputs import assemble
from export.contract.schema import RANK_SCORE, FeatureSchema
from export.runtime import load_bundle
from service.profiles import RawProfile, encode_profile, history_key, user_key

ENV = "PSAD_PEER_"  # the settings a peer process reads, set by the benchmark (registry.peer_env)


@dataclass(frozen=True)
class PeerConfig:
    """A peer process's settings: the bundle (a version directory), Redis, the key prefix, ONNX
    Runtime's intra-op threads, the worker processes (or replicas) it runs, and whether it freezes
    its startup heap out of the cyclic garbage collector (as our service does; off by default)."""

    bundle: Path
    redis_url: str
    prefix: str = "psad"
    threads: int = 1
    workers: int = 2
    gc_freeze: bool = False

    def env(self) -> dict[str, str]:
        return {
            f"{ENV}BUNDLE": str(self.bundle.resolve()),
            f"{ENV}REDIS_URL": self.redis_url,
            f"{ENV}PREFIX": self.prefix,
            f"{ENV}THREADS": str(self.threads),
            f"{ENV}WORKERS": str(self.workers),
            f"{ENV}GC_FREEZE": "1" if self.gc_freeze else "0",
        }

    @classmethod
    def from_env(cls) -> PeerConfig:
        missing = [f"{ENV}{k}" for k in ("BUNDLE", "REDIS_URL") if f"{ENV}{k}" not in os.environ]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} unset: peers are started by `psad bench peers`, which sets them")
        return cls(
            bundle=Path(os.environ[f"{ENV}BUNDLE"]),
            redis_url=os.environ[f"{ENV}REDIS_URL"],
            prefix=os.environ.get(f"{ENV}PREFIX", "psad"),
            threads=int(os.environ.get(f"{ENV}THREADS", "1")),
            workers=int(os.environ.get(f"{ENV}WORKERS", "2")),
            gc_freeze=os.environ.get(f"{ENV}GC_FREEZE") == "1",
        )


def candidate_numeric(schema: FeatureSchema, scores: Sequence[float]) -> np.ndarray:
    """float32 [L, n_candidate_numeric]: the given scores as rank_score, other features at their mean."""
    out = np.empty((len(scores), len(schema.candidate_numeric)), dtype=np.float32)
    for j, f in enumerate(schema.candidate_numeric):
        out[:, j] = scores if f.name == RANK_SCORE else f.mean
    return out


class Reranker:
    """One process's model session and Redis client; `rerank` is the whole request."""

    def __init__(self, config: PeerConfig):
        self.config = config
        self.bundle = load_bundle(config.bundle, device="cpu", threads=config.threads)
        self.redis = aredis.Redis.from_url(config.redis_url, decode_responses=True)

    async def read(self, user_id: str, now: float) -> RawProfile:
        """The user's features and last max_history behaviours before `now`, oldest first."""
        prefix, limit = self.config.prefix, self.bundle.schema.max_history
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(user_key(prefix, user_id))
            pipe.zrange(history_key(prefix, user_id), f"({now!r}", "-inf", desc=True, byscore=True, offset=0, num=limit)
            user, history = await pipe.execute()
        return RawProfile(user, history[::-1])

    def score(
        self,
        profile: RawProfile,
        item_ids: Sequence[str],
        scores: Sequence[float],
        now: float,
        top_k: int | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Assemble, score and sort one list; the answer as /rerank gives it."""
        schema, vocabs = self.bundle.schema, self.bundle.vocabs
        encoded, _ = encode_profile(profile, schema, vocabs)
        items = np.asarray(vocabs.items.indices(item_ids), dtype=np.int64)
        inputs = assemble(schema, [encoded], [items], [candidate_numeric(schema, scores)], [now])
        row = self.bundle.score(inputs)[0, : len(item_ids)]
        order = (-row).argsort(kind="stable")[: top_k or len(item_ids)].tolist()
        values = row.tolist()
        return {
            "request_id": request_id or uuid.uuid4().hex,
            "items": [{"item_id": item_ids[i], "score": values[i]} for i in order],
            "model_version": str(self.bundle.version),
            "degraded": False,
            "degraded_reasons": [],
        }

    async def rerank(
        self,
        user_id: str,
        item_ids: Sequence[str],
        scores: Sequence[float],
        top_k: int | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        now = time.time()
        profile = await self.read(user_id, now)
        return self.score(profile, item_ids, scores, now, top_k, request_id)

    def ready(self) -> None:
        """Called once the process has made everything it serves with: with gc_freeze, move what
        exists now out of the cyclic collector's scans. Unfrozen, a full collection walks the model,
        the vocabularies and the framework's objects every so often, a pause of tens of ms."""
        if self.config.gc_freeze:
            gc.collect()
            gc.freeze()

    async def aclose(self) -> None:
        await self.redis.aclose()
