"""Shadow evaluation end to end: a real service (tiny bundle, real redis-servers) samples every answer
at rate 1.0, its /events become click records, and `psad shadow run --once` (in process) turns them
into results that match the answers the client received and the teacher decoded here."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
import redis
import torch

from export.contract.shadow import ListRecord, decode, stream_key
from export.exporter import load_torch_model
from psad.shadow import results
from psad.shadow.consumer import Consumer, Metrics, Options, Teachers
from service.model_repo import LocalRepo
from tests.conftest import RedisServer
from tests.test_service_api import PREFIX, loaded_data, metric_samples, request, serve, settings_for

WAIT_S = 15.0  # how long the test waits for the service's writer (a bound, not a timing check)


@pytest.fixture(scope="module")
def data(tiny_data: Path, redis_server) -> dict:
    return loaded_data(tiny_data, redis_server.url)


@pytest.fixture
def shadow_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "shadow-redis")
    server.start()
    yield server
    server.stop()


def written(client: httpx.Client) -> float:
    return metric_samples(client)[("psad_shadow_records_total", (("result", "written"),))]


def event(user: str, item: str, request_id: str, action: str = "click", **extra: str) -> dict:
    return {"user_id": user, "item_id": item, "action": action, "request_id": request_id, **extra}


def test_answers_and_their_events_come_out_of_the_consumer_as_served(
    tiny_bundle: Path, redis_server, shadow_redis: RedisServer, data: dict, tmp_path: Path
) -> None:
    users, items = data["users"], data["items"]
    settings = settings_for(
        tiny_bundle.parents[1], redis_server.url, shadow_sample_rate=1.0, shadow_redis_url=shadow_redis.url
    )
    bodies = [
        request(data, request_id="e2e-one", top_k=4),
        request(data, user=users[1], n=6, request_id="e2e-two"),
        request(data, user=users[2], n=8, request_id="e2e-b0", top_k=3),
        request(data, user=users[3], n=5, request_id="e2e-b1"),
    ]
    with serve(settings) as c:
        before = written(c)
        answers = [c.post("/rerank", json=body).json() for body in bodies[:2]]
        answers += c.post("/rerank/batch", json={"requests": bodies[2:]}).json()["responses"]
        served = {a["request_id"]: [item["item_id"] for item in a["items"]] for a in answers}
        clicks = [event(b["user_id"], served[b["request_id"]][1], b["request_id"]) for b in bodies]
        unserved = next(i for i in items[:10] if i not in served["e2e-one"])
        clicks += [
            event(users[0], unserved, "e2e-one", action="view"),  # scored, not in the answer's top 4
            event(users[5], served["e2e-one"][0], "e2e-one"),  # another user: not this list's event
        ]
        retried = event(users[1], served["e2e-two"][0], "e2e-two", event_id="ev-1")
        assert c.post("/events", json={"events": clicks}).status_code == 200
        for _ in range(2):  # a client retrying: stored once, recorded twice
            assert c.post("/events", json=retried).status_code == 200
        deadline = time.monotonic() + WAIT_S
        while written(c) - before < len(bodies) + len(clicks) + 2:
            assert time.monotonic() < deadline, "the service did not write every record"
            time.sleep(0.02)

    with redis.Redis.from_url(shadow_redis.url) as client:
        options = Options(consumer="e2e", prefix=PREFIX, out=tmp_path / "out")
        worker = Consumer(client, options, Teachers(LocalRepo(tiny_bundle.parents[1])), Metrics())
        worker.ensure_group()
        worker.run(threading.Event(), once=True)
        records = [decode(fields) for _, fields in client.xrange(stream_key(PREFIX))]
        assert client.xpending(stream_key(PREFIX), "psad-shadow")["pending"] == 0

    model = load_torch_model(tiny_bundle)
    teacher: dict[str, list[int]] = {}
    for record in records:
        if isinstance(record, ListRecord):
            inputs = {name: torch.from_numpy(array) for name, array in record.inputs.items()}
            teacher[record.request_id] = model.teacher_decode(inputs)[0, : len(record.items)].tolist()

    lists = results.read(tmp_path / "out", "lists").set_index("request_id")
    assert sorted(lists.index) == sorted(served)
    for body in bodies:
        row, rid = lists.loc[body["request_id"]], body["request_id"]
        candidates = [cand["item_id"] for cand in body["candidates"]]
        assert row["items"].tolist() == candidates and row["user_id"] == body["user_id"]
        assert [candidates[i] for i in row["served"]] == served[rid]  # the answer's order
        assert row["student_order"].tolist()[: len(served[rid])] == row["served"].tolist()
        assert row["teacher_order"].tolist() == teacher[rid]
        assert (row["version"], row["n"], row["degraded"]) == (1, len(candidates), False)

    def ranks(rid: str, item: str) -> list[int | None]:
        row = lists.loc[rid]
        index = row["items"].tolist().index(item)
        served_rank = served[rid].index(item) + 1 if item in served[rid] else None
        return [row["student_order"].tolist().index(index) + 1, teacher[rid].index(index) + 1, served_rank]

    got = results.read(tmp_path / "out", "clicks")
    assert len(got) == len(clicks) + 1  # the retried event is one row
    for row in got.to_dict("records"):
        rid, item = row["request_id"], row["item_id"]
        observed = [None if pd.isna(row[c]) else int(row[c]) for c in ("student_rank", "teacher_rank", "served_rank")]
        if row["user_id"] == users[5]:
            assert not row["matched"] and observed == [None, None, None]
            continue
        assert row["matched"] and observed == ranks(rid, item), row
    view = got[got["action"] == "view"].iloc[0]
    assert pd.isna(view["served_rank"]) and view["student_rank"] > 4
    assert got[got["event_id"] == "ev-1"]["item_id"].tolist() == [served["e2e-two"][0]]

    def counted(action: str, matched: str) -> float:
        labels = {"action": action, "matched": matched}
        return worker.metrics.registry.get_sample_value("psad_shadow_clicks_total", labels) or 0.0

    assert worker.metrics.registry.get_sample_value("psad_shadow_lists_total", {"version": "1"}) == len(bodies)
    assert [counted("click", "true"), counted("view", "true"), counted("click", "false")] == [len(bodies) + 1, 1, 1]
