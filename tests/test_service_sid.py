"""A sid bundle served: items its vocabulary does not hold are ranked from their content (the
request's, else Redis's from `psad items load`), scoring as the PyTorch model scores those items by
their data-set index; missing or malformed content falls back to OOV, flagged and counted."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import redis

from export.contract.inputs import EncodedProfile, assemble
from export.contract.schema import FeatureSchema, Vocabularies
from export.parity import FP32
from psad.load_items import bulk_load_items
from service.profiles import item_key, mark_loaded
from service.settings import load_settings
from tests.test_service_api import metric_samples, serve

PREFIX = "sidtest"
NOW = 1_700_000_000  # request time (in the past: the service refuses far-future times), after every event below


@dataclasses.dataclass
class Catalogue:
    """The data set's view: full schema and vocabularies (cold items included) and raw content."""

    schema: FeatureSchema
    vocabs: Vocabularies
    content: dict[str, dict[str, float]]  # item id -> raw content, every item

    @property
    def known(self) -> list[str]:
        return self.vocabs.items.tokens[: self.schema.n_known_items - 2]

    @property
    def cold(self) -> list[str]:
        return self.vocabs.items.tokens[self.schema.n_known_items - 2 :]


@pytest.fixture(scope="module")
def catalogue(cold_data: Path) -> Catalogue:
    schema = FeatureSchema.load(cold_data / "schema.json")
    items = pd.read_parquet(cold_data / "items.parquet").iloc[2:]
    content = {row["item_id"]: {f: float(row[f]) for f in schema.item_content} for row in items.to_dict("records")}
    return Catalogue(schema, Vocabularies.load(cold_data / "vocab.json", schema), content)


@pytest.fixture(scope="module")
def client(sid_bundle: Path, redis_server) -> Iterator[httpx.Client]:
    mark_loaded(redis_server.url, PREFIX)
    settings = load_settings(
        model_repo=sid_bundle.parents[1],
        redis_url=redis_server.url,
        key_prefix=PREFIX,
        device="cpu",
        redis_budget_ms=1000,
    )
    with serve(settings) as c:
        yield c


def drop_item_content(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(item_key(PREFIX, "*")):
        r.delete(key)
    r.close()


def history(cat: Catalogue) -> list[tuple[str, str, int]]:
    """(item, action, timestamp): known items, a cold item that is also a candidate, one that is not."""
    items = [cat.known[0], cat.cold[0], cat.known[1], cat.cold[-1]]
    return [(item, "click", NOW - 3600 * (len(items) - k)) for k, item in enumerate(items)]


def post_history(c: httpx.Client, user: str, cat: Catalogue) -> None:
    events = [{"user_id": user, "item_id": i, "action": a, "timestamp": t} for i, a, t in history(cat)]
    assert c.post("/events", json={"events": events}).status_code == 200


def candidates(cat: Catalogue) -> list[str]:
    return [cat.known[2], cat.cold[0], cat.known[3], cat.cold[1], cat.known[4], cat.cold[2]]


def rerank(c: httpx.Client, user: str, items: list[str], content: dict[str, Any] | None = None) -> dict:
    cands = [
        {"item_id": i, "score": 1.0 - 0.1 * k, **({"content": content[i]} if content and i in content else {})}
        for k, i in enumerate(items)
    ]
    r = c.post("/rerank", json={"user_id": user, "candidates": cands, "context": {"timestamp": NOW}})
    assert r.status_code == 200, r.text
    return r.json()


def scores(answer: dict) -> dict[str, float]:
    return {i["item_id"]: i["score"] for i in answer["items"]}


def torch_scores(run: Path, cat: Catalogue, items: list[str]) -> dict[str, float]:
    """The PyTorch model's scores of the list, items by their data-set index (cold ones included)."""
    import torch

    from training.checkpoint import load_run

    model, _, schema = load_run(run)
    s = cat.schema
    hist = history(cat)
    profile = EncodedProfile(
        user_cat=np.zeros(len(s.user_categorical), np.int64),
        user_num=np.zeros(len(s.user_numeric), np.float32),
        hist_items=np.array(cat.vocabs.items.indices([i for i, _, _ in hist]), np.int64),
        hist_ts=np.array([t for _, _, t in hist], np.int64),
        hist_actions=np.array([s.action_index(a) for _, a, _ in hist], np.int64),
    )
    cand = np.array(cat.vocabs.items.indices(items), np.int64)
    num = (1.0 - 0.1 * np.arange(len(items), dtype=np.float32))[:, None]
    inputs = assemble(schema, [profile], [cand], [num], [float(NOW)])
    with torch.no_grad():
        out = model.rank_scores({k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy()
    return dict(zip(items, out.tolist(), strict=True))


def test_new_items_scored_from_redis_content_match_the_pytorch_model(
    client, cold_data, sid_run, catalogue, redis_server
):
    bulk_load_items(redis_server.url, cold_data, prefix=PREFIX, progress=False)
    post_history(client, "u-redis", catalogue)
    items = candidates(catalogue)
    answer = rerank(client, "u-redis", items)
    assert answer["degraded_reasons"] == []
    got, want = scores(answer), torch_scores(sid_run, catalogue, items)
    assert max(abs(got[i] - want[i]) for i in items) <= FP32.max_abs
    assert [i["item_id"] for i in answer["items"]] == sorted(items, key=lambda i: -want[i])


def test_request_content_scores_as_redis_content_and_no_content_falls_back(client, cold_data, catalogue, redis_server):
    post_history(client, "u-request", catalogue)
    items = [*candidates(catalogue), catalogue.cold[-1]]  # cold[-1] is in the history too
    bulk_load_items(redis_server.url, cold_data, prefix=PREFIX, progress=False)
    from_redis = rerank(client, "u-request", items)
    drop_item_content(redis_server.url)
    try:
        missing = rerank(client, "u-request", items)
        given = rerank(client, "u-request", items, catalogue.content)
        partly = rerank(client, "u-request", items[:-1], catalogue.content)  # none for the history's cold[-1]
    finally:
        bulk_load_items(redis_server.url, cold_data, prefix=PREFIX, progress=False)
    assert from_redis["degraded_reasons"] == [] and given["degraded_reasons"] == []
    assert missing["degraded_reasons"] == ["item_content_missing"]
    assert partly["degraded_reasons"] == ["item_content_missing"]
    a, b = scores(from_redis), scores(given)
    assert max(abs(a[i] - b[i]) for i in items) <= FP32.max_abs
    assert scores(missing) != a  # without content the cold items are OOV: other scores


def degraded(c: httpx.Client, reason: str) -> float:
    return metric_samples(c).get(("psad_degraded_total", (("reason", reason),)), 0.0)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({"colour": "red"}, "item_content_invalid"),  # a feature the model does not know
        ({"content_0": "high"}, "item_content_invalid"),  # a string for a numeric feature
        (None, "item_content_missing"),  # none, and none in Redis
    ],
)
def test_unusable_content_is_a_flagged_oov_fallback(client, catalogue, content, reason):
    items = [catalogue.known[0], "brand-new-item", catalogue.known[1]]
    before = degraded(client, reason)
    answer = rerank(client, "u-fallback", items, {"brand-new-item": content} if content else None)
    assert answer["degraded"] is True and answer["degraded_reasons"] == [reason]
    assert degraded(client, reason) == before + 1
    oov = rerank(client, "u-fallback", items)  # no content: the OOV token
    assert scores(answer)["brand-new-item"] == pytest.approx(scores(oov)["brand-new-item"], abs=FP32.max_abs)


@pytest.mark.parametrize("value", [True, None, [1.0], {"x": 1}])
def test_content_of_a_wrong_json_type_answers_422_naming_the_field(client, catalogue, value):
    body = {
        "user_id": "u",
        "candidates": [{"item_id": catalogue.known[0]}, {"item_id": "new", "content": {"content_0": value}}],
    }
    r = client.post("/rerank", json=body)
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "candidates", 1, "content", "content_0"]
    assert "a content value is a string" in error["msg"]


def test_an_id_bundle_ignores_request_content(tiny_bundle, tiny_data, redis_server):
    from tests.test_service_api import settings_for

    items = Vocabularies.load(tiny_data / "vocab.json", FeatureSchema.load(tiny_data / "schema.json")).items.tokens
    cands = [{"item_id": items[0]}, {"item_id": "never-seen"}, {"item_id": items[1]}]
    with serve(settings_for(tiny_bundle.parents[1], redis_server.url)) as c:
        plain = c.post("/rerank", json={"user_id": "u", "candidates": cands}).json()
        cands[1]["content"] = {"anything": "goes", "n": 1.5}
        given = c.post("/rerank", json={"user_id": "u", "candidates": cands}).json()
    assert "item_content_missing" not in plain["degraded_reasons"]
    assert [i["item_id"] for i in given["items"]] == [i["item_id"] for i in plain["items"]]
    assert [i["score"] for i in given["items"]] == pytest.approx([i["score"] for i in plain["items"]], abs=1e-6)
    assert given["degraded_reasons"] == plain["degraded_reasons"]


def test_the_new_items_of_a_batch_are_assigned_in_one_call_then_cached(sid_bundle, catalogue):
    from export.runtime import load_bundle
    from service.api import RerankRequest
    from service.features import Job
    from service.inference import run_batch

    bundle = load_bundle(sid_bundle, device="cpu", warmup=False)
    real, calls = bundle.assign, []

    def assign(cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        calls.append(len(cat))
        return real(cat, num)

    bundle.assign = assign  # type: ignore[method-assign]  # counts the real calls
    # contents no other test sent: the process-wide cache has none of them yet
    content = {i: {**catalogue.content[i], "content_0": 7.25 + k} for k, i in enumerate(catalogue.cold[:4])}
    lists = [[catalogue.known[0], *catalogue.cold[:2]], [catalogue.cold[1], catalogue.cold[2], catalogue.cold[3]]]

    def jobs() -> list[Job]:
        def candidate(item: str) -> dict[str, Any]:
            return {"item_id": item, **({"content": content[item]} if item in content else {})}

        requests = [
            RerankRequest.model_validate({"user_id": "u", "candidates": list(map(candidate, items))}) for items in lists
        ]
        return [Job(r, None, float(NOW)) for r in requests]

    first = run_batch(bundle, jobs())
    assert calls == [4]  # one call, each distinct content once (cold[1] is in both lists)
    again = run_batch(bundle, jobs())
    assert calls == [4]  # all cached
    alone = [run_batch(bundle, [job])[0] for job in jobs()]
    for a, b, c in zip(first, again, alone, strict=True):
        assert a.reasons == [] and np.array_equal(a.scores, b.scores)
        assert np.allclose(a.scores, c.scores, atol=FP32.max_abs)  # batched or alone: the same scores


def test_redis_down_keeps_request_content_and_flags_the_rest(sid_bundle, catalogue, tmp_path):
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    mark_loaded(server.url, PREFIX)
    settings = load_settings(
        model_repo=sid_bundle.parents[1], redis_url=server.url, key_prefix=PREFIX, device="cpu", redis_budget_ms=1000
    )
    items = [catalogue.known[0], catalogue.cold[0], catalogue.cold[1]]
    try:
        with serve(settings) as c:
            up = rerank(c, "u-down", items, {catalogue.cold[0]: catalogue.content[catalogue.cold[0]]})
            server.stop()
            down = rerank(c, "u-down", items, {catalogue.cold[0]: catalogue.content[catalogue.cold[0]]})
    finally:
        server.stop()
    assert up["degraded_reasons"] == ["item_content_missing"]  # cold[1]: nothing in this Redis
    assert down["degraded_reasons"] == ["redis_unavailable", "item_content_missing"]
    assert scores(down) == pytest.approx(scores(up), abs=FP32.max_abs)  # a new user: the cold start either way
