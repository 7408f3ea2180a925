"""Scoring without blocking the event loop, and the rerank pipeline with its degradation rules.

Feature assembly and the ONNX Runtime call are CPU-bound: they run in a dedicated thread pool
(PSAD_INFERENCE_WORKERS threads). With micro-batching on (PSAD_MICROBATCH_MAX_SIZE > 1, the
default) a list goes straight to a worker when one is free and nothing is queued; otherwise it
queues, and one task, waiting for a free worker and then up to PSAD_MICROBATCH_MAX_WAIT_US for
more (default 0: only what is queued), scores the queue in one model call (assemble pads mixed
lengths); results are scattered back to each request.

Degradation, never a 5xx storm: a profile read that fails or exceeds its budget gives a
cold-start profile; a model failure (an exception or non-finite scores) gives the ranking stage's
order; a store that answers without its load marker (emptied: service.health.StoreHealth) gives
whatever it holds, flagged `profiles_missing`; with a sid bundle, an item its vocabulary does not
hold and whose content is missing or invalid is scored as out-of-vocabulary, flagged
`item_content_missing` or `item_content_invalid` (service.features). Each is flagged in the
response (degraded_reasons) and counted in psad_degraded_total.

Item content (sid bundles only): the new candidates' stored content is read in the profiles' round
trip; new items that only the histories name take a second one, only when there are any.

Shadow sampling: each list the model scored whose request id is sampled is offered to the shadow
writer (service.shadow) once its answer is built, as references (a ScoredList: the batch's
assembled inputs and the list's row of them, padding included); the writer's flusher builds the
record, so the request path copies and converts nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np

from export.contract.schema import OOV
from export.runtime import Bundle
from service import metrics, tracing
from service.api import Degraded, RerankRequest
from service.features import SID, Job, build_inputs, given_scores, request_time
from service.health import StoreHealth
from service.model_store import ModelStore
from service.profiles import STORE_ERRORS, ProfileStore, RawProfile, StoredContent, member_item
from service.settings import Settings
from service.shadow import ScoredList, ShadowWriter

log = logging.getLogger("psad.service")


@dataclass
class Outcome:
    scores: np.ndarray | None  # model scores [L]; None = the model failed for this list
    reasons: list[Degraded] = field(default_factory=list)
    inputs: dict[str, np.ndarray] | None = None  # the batch's assembled inputs, shared by its lists
    row: int = 0  # this list's row of them
    timing: tracing.BatchTiming | None = None  # the batch's stage times, kept only while tracing


def run_batch(bundle: Bundle, jobs: list[Job]) -> list[Outcome]:
    """Assemble and score a batch (runs in a worker thread); never raises."""
    t0 = time.perf_counter()
    try:
        built = build_inputs(jobs, bundle)
    except Exception:
        log.warning("feature assembly failed", exc_info=True)
        return [Outcome(None, [Degraded.INTERNAL_ERROR]) for _ in jobs]
    t1 = time.perf_counter()
    metrics.STAGE.feature_assembly.observe(t1 - t0)
    inputs = built.inputs
    base = [[Degraded.PROFILE_CORRUPT, *r] if c else r for c, r in zip(built.corrupt, built.reasons, strict=True)]
    try:
        scores = bundle.score(inputs)
    except Exception:
        log.warning("model call failed", exc_info=True, extra={"version": bundle.version})
        return [Outcome(None, [*b, Degraded.MODEL_ERROR]) for b in base]
    t2 = time.perf_counter()
    metrics.STAGE.inference.observe(t2 - t1)
    metrics.BATCH_SIZE.observe(len(jobs))
    timing = None if tracing.TRACER is None else tracing.BatchTiming(t0, t1, t2, len(jobs))
    out = []
    for i, job in enumerate(jobs):
        row = scores[i, : len(job.request.candidates)]
        finite = np.isfinite(row).all()
        if finite:
            out.append(Outcome(row, base[i], inputs, i, timing))
        else:
            out.append(Outcome(None, [*base[i], Degraded.MODEL_NONFINITE], timing=timing))
    return out


class Scorer:
    """A thread pool for CPU work and, optionally, the micro-batch collector in front of it.

    Every model call holds one of PSAD_INFERENCE_WORKERS permits, so a batch never waits inside
    the executor behind another call: while all permits are taken, lists queue up and the
    collector takes everything queued as soon as one is free."""

    def __init__(self, settings: Settings):
        self.workers = cast(int, settings.inference_workers)  # None is resolved by the settings' validator
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="psad-infer")
        self.max_size = settings.microbatch_max_size if settings.microbatching else 0
        self.max_wait_s = settings.microbatch_max_wait_us / 1e6
        self.queue: asyncio.Queue[tuple[Bundle, Job, asyncio.Future]] = asyncio.Queue()
        self._free = asyncio.Semaphore(self.workers)
        self._collector: asyncio.Task | None = None

    def start(self) -> None:
        if self.max_size:
            self._collector = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, bundle: Bundle, jobs: list[Job]) -> list[Outcome]:
        idle = self.queue.empty() and not self._free.locked()
        if not self.max_size or len(jobs) >= self.max_size or idle:
            # Nothing to batch with (or batching is off, or the batch is full already): score now.
            async with self._free:
                return await asyncio.get_running_loop().run_in_executor(self.executor, run_batch, bundle, jobs)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        for job, fut in zip(jobs, futures, strict=True):
            self.queue.put_nowait((bundle, job, fut))
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            await self._free.acquire()  # lists keep queuing while every worker is busy: bigger batches
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_size:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            asyncio.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[Bundle, Job, asyncio.Future]]) -> None:
        """Score a collected batch on the permit the collector took, then release it."""
        try:
            groups: dict[int, list[tuple[Bundle, Job, asyncio.Future]]] = {}
            for entry in batch:  # a model swap may fall inside a batch: one call per bundle
                groups.setdefault(id(entry[0]), []).append(entry)
            loop = asyncio.get_running_loop()
            for entries in groups.values():
                jobs = [job for _, job, _ in entries]
                try:
                    outcomes = await loop.run_in_executor(self.executor, run_batch, entries[0][0], jobs)
                except Exception:
                    log.warning("micro-batch failed", exc_info=True)
                    outcomes = [Outcome(None, [Degraded.INTERNAL_ERROR]) for _ in jobs]
                for (_, _, fut), outcome in zip(entries, outcomes, strict=True):
                    if not fut.done():
                        fut.set_result(outcome)
        finally:
            self._free.release()


class Reranker:
    """The rerank pipeline: profile read (within budget) -> scoring -> response dicts."""

    def __init__(
        self,
        settings: Settings,
        models: ModelStore,
        profiles: ProfileStore,
        scorer: Scorer,
        health: StoreHealth,
        shadow: ShadowWriter | None = None,
    ):
        self.settings = settings
        self.models = models
        self.profiles = profiles
        self.scorer = scorer
        self.health = health
        self.shadow = shadow  # None: sampling is off
        self.budget_s = settings.redis_budget_ms / 1000

    async def read_profiles(
        self, requests: list[RerankRequest], now: list[float], bundle: Bundle
    ) -> tuple[Sequence[RawProfile | None], list[Degraded | None], dict[str, StoredContent]]:
        """Raw profiles (None = cold start after a failed read), each request's degradation
        reason, if any: its failed read's (with Redis Cluster, one node may fail alone), else
        profiles_missing while the store has no load marker; and for a sid bundle the stored
        content of the new items the lists name (service.features resolves them)."""
        t0 = time.perf_counter()
        raws: Sequence[RawProfile | None]
        contents: dict[str, StoredContent] = {}
        n = len(requests)
        users = [r.user_id for r in requests]
        sid = bundle.item_encoder == SID
        try:
            if sid:
                new = new_candidates(requests, bundle)
                raws, contents = await self.profiles.read_with_items(
                    users, now, bundle.schema.max_history, new, self.budget_s
                )
                contents.update(await self.read_history_items(raws, bundle, {*new}, t0))
            else:
                raws = await self.profiles.read(users, now, bundle.schema.max_history, self.budget_s)
            missing = Degraded.PROFILES_MISSING if self.health.missing else None
            reasons = [Degraded.REDIS_UNAVAILABLE if raw is None else missing for raw in raws]
        except TimeoutError:
            raws, reasons = [None] * n, [Degraded.REDIS_TIMEOUT] * n
        except STORE_ERRORS:
            raws, reasons = [None] * n, [Degraded.REDIS_UNAVAILABLE] * n
        t1 = time.perf_counter()
        metrics.STAGE.profile_read.observe(t1 - t0)
        if tracing.TRACER is not None:
            tracing.stage("profile_read", t0, t1)
        return raws, reasons, contents

    async def read_history_items(
        self, raws: Sequence[RawProfile | None], bundle: Bundle, read: set[str], t0: float
    ) -> dict[str, StoredContent]:
        """The stored content of the new items in the histories just read that the first round trip
        did not fetch: a second round trip, only when there are any, within what is left of the budget."""
        members = (m for raw in raws if raw is not None for m in raw.history)
        ids = [i for i in dict.fromkeys(member_item(m) for m in members) if i and i not in read]
        new = [i for i, idx in zip(ids, bundle.vocabs.items.indices(ids), strict=True) if idx == OOV]
        if not new:
            return {}
        left = max(self.budget_s - (time.perf_counter() - t0), 0.0)
        try:
            return await self.profiles.read_items(new, left)
        except (TimeoutError, *STORE_ERRORS):  # the profiles are read: only these items fall back
            return {}

    async def rerank(
        self, requests: list[RerankRequest], request_ids: list[str], bundle: Bundle | None = None
    ) -> list[dict[str, Any]]:
        bundle = bundle or self.models.current  # taken once: a model swap does not affect this request
        now = [request_time(r) for r in requests]
        try:
            raws, redis_reasons, contents = await self.read_profiles(requests, now, bundle)
            jobs = [Job(r, p, t, contents) for r, p, t in zip(requests, raws, now, strict=True)]
            outcomes = await self.scorer.score(bundle, jobs)
            outcomes = [
                replace(o, reasons=[why, *o.reasons]) if why else o
                for o, why in zip(outcomes, redis_reasons, strict=True)
            ]
        except Exception:
            log.warning(
                "rerank failed; answering in the ranking stage's order",
                exc_info=True,
                extra={"request_ids": request_ids},
            )
            outcomes = [Outcome(None, [Degraded.INTERNAL_ERROR]) for _ in requests]
        t0 = time.perf_counter()
        out = []
        shadow = self.shadow
        for request, rid, outcome in zip(requests, request_ids, outcomes, strict=True):
            answer, served = self.respond(request, rid, outcome, bundle)
            out.append(answer)
            if shadow is not None and outcome.inputs is not None and shadow.samples(rid):
                shadow.offer(scored_list(request, rid, outcome, served, bundle))
        t1 = time.perf_counter()
        metrics.STAGE.response.observe(t1 - t0)
        if tracing.TRACER is not None:
            for timing in {id(o.timing): o.timing for o in outcomes if o.timing is not None}.values():
                tracing.batch(timing)
            tracing.stage("response", t0, t1)
        return out

    async def floor(self, request: RerankRequest, request_id: str, bundle: Bundle | None = None) -> dict[str, Any]:
        """The no-model baseline: same parsing and profile read, then a sort by the given score."""
        bundle = bundle or self.models.current
        _, (reason,), _ = await self.read_profiles([request], [request_time(request)], bundle)
        scores = given_scores(request, bundle.schema)
        return self.respond(request, request_id, Outcome(scores, [reason] if reason else []), bundle)[0]

    @staticmethod
    def respond(
        request: RerankRequest, request_id: str, outcome: Outcome, bundle: Bundle
    ) -> tuple[dict[str, Any], Sequence[int]]:
        """Candidates in the new order, and that order (candidate indices); on model failure, the
        ranking stage's order with its scores."""
        k = request.top_k or len(request.candidates)
        order: Sequence[int]
        if outcome.scores is None:
            scores = given_scores(request, bundle.schema)
            order = range(min(k, len(scores)))
        else:
            scores = outcome.scores
            order = (-scores).argsort(kind="stable")[:k].tolist()  # python ints index faster
        values = scores.tolist()
        cands = request.candidates
        for reason in outcome.reasons:
            metrics.DEGRADED.labels(reason).inc()
        answer = {
            "request_id": request_id,
            "items": [{"item_id": cands[i].item_id, "score": values[i]} for i in order],
            "model_version": str(bundle.version),
            "degraded": bool(outcome.reasons),
            "degraded_reasons": outcome.reasons,
        }
        return answer, order


def new_candidates(requests: Sequence[RerankRequest], bundle: Bundle) -> list[str]:
    """The candidates of a sid bundle's lists that its vocabulary does not hold and whose request
    carries no content for them: the items whose content is read from Redis (each once)."""
    ids = [c.item_id for r in requests for c in r.candidates if c.content is None]
    return list(dict.fromkeys(i for i, idx in zip(ids, bundle.vocabs.items.indices(ids), strict=True) if idx == OOV))


def scored_list(
    request: RerankRequest, request_id: str, outcome: Outcome, served: Sequence[int], bundle: Bundle
) -> ScoredList:
    """What the shadow writer builds a scored list's record from (outcome.scores and .inputs are set)."""
    assert outcome.scores is not None and outcome.inputs is not None
    return ScoredList(
        request=request,
        request_id=request_id,
        time=time.time(),
        model=bundle.name,
        version=bundle.version,
        scores=outcome.scores,
        reasons=outcome.reasons,
        inputs=outcome.inputs,
        row=outcome.row,
        served=served,
    )
