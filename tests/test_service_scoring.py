"""The scorer: lists go straight to a worker when the service is idle and are merged into one
model call when they queue up behind busy workers (micro-batching, on by default)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np

from export.runtime import load_bundle
from service.api import RerankRequest
from service.features import Job
from service.inference import Scorer
from service.settings import load_settings


def test_idle_lists_go_straight_through_and_queued_lists_share_a_model_call(tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle, device="cpu", warmup=False)
    settings = load_settings(model_repo=tiny_bundle.parents[1], inference_workers=1)
    assert settings.microbatch_max_size == 8 and settings.microbatch_max_wait_us == 0  # the defaults
    real, calls, gate = bundle.score, [], threading.Event()

    def score(inputs: dict[str, np.ndarray]) -> np.ndarray:
        calls.append(inputs["cand_items"].shape[0])  # lists in this model call
        gate.wait(30)  # hold the only worker until every list is queued
        return real(inputs)

    bundle.score = score
    jobs = [
        Job(RerankRequest(user_id=f"u{k}", candidates=[{"item_id": f"i{j}"} for j in range(3 + k)]), None, 1e9)
        for k in range(4)
    ]

    async def run():
        scorer = Scorer(settings)
        scorer.start()
        first = asyncio.create_task(scorer.score(bundle, [jobs[0]]))
        while not calls:  # the idle service scores the first list at once
            await asyncio.sleep(0.01)
        rest = []
        for job in jobs[1:]:  # arriving one by one while the only worker is busy: they wait together
            rest.append(asyncio.create_task(scorer.score(bundle, [job])))
            await asyncio.sleep(0.02)
        gate.set()
        out = await asyncio.gather(first, *rest)
        await scorer.stop()
        return out

    outcomes = asyncio.run(run())
    assert calls == [1, 3]
    assert [len(o[0].scores) for o in outcomes] == [3, 4, 5, 6]  # padding removed per list
    assert all(not o[0].reasons and np.isfinite(o[0].scores).all() for o in outcomes)
