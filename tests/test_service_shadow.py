"""Shadow sampling on the request path (service/shadow.py): records written to a real redis-server
by a real server, decoded with the contract, re-scored with the real bundle; the answer never
waits for the write, and an outage of the shadow Redis is counted and recovers by itself."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from export.contract.shadow import ClickRecord, ListRecord, decode, sampled, stream_key
from export.runtime import load_bundle
from service.app import create_app
from service.shadow import ScoredList
from tests.conftest import RedisServer, free_port
from tests.test_service_api import PREFIX, loaded_data, metric_samples, request, serve, settings_for
from tests.test_service_degradation import copy_version, failing_graph

RESULTS = ("written", "dropped", "failed")
WAIT_S = 15.0  # how long a test waits for the flusher to catch up (a bound, not a timing check)


@pytest.fixture(scope="module")
def data(tiny_data: Path, redis_server) -> dict:
    return loaded_data(tiny_data, redis_server.url)


@pytest.fixture
def shadow_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """The shadow stream's own redis-server: an empty stream per test, and one a test may stop."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def counts(client: httpx.Client) -> dict[str, float]:
    samples = metric_samples(client)
    return {r: samples[("psad_shadow_records_total", (("result", r),))] for r in RESULTS}


def wait_for(what: Callable[[], bool], why: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:g} s: {why}")
        time.sleep(0.02)


def records(url: str) -> list[ListRecord | ClickRecord]:
    with redis.Redis.from_url(url) as r:
        return [decode(fields) for _, fields in r.xrange(stream_key(PREFIX))]


def served_indices(body: dict, answer: dict) -> list[int]:
    index = {c["item_id"]: i for i, c in enumerate(body["candidates"])}
    return [index[item["item_id"]] for item in answer["items"]]


def test_every_scored_list_is_recorded_as_the_model_saw_it(tiny_bundle, redis_server, shadow_redis, data):
    settings = settings_for(
        tiny_bundle.parents[1], redis_server.url, shadow_sample_rate=1.0, shadow_redis_url=shadow_redis.url
    )
    single = request(data, request_id="one", top_k=4)
    batch = [request(data, user=data["users"][k], n=n, request_id=f"b-{k}") for k, n in enumerate((10, 6, 8))]
    with serve(settings) as c:
        before = counts(c)
        started = time.time()
        answers = [c.post("/rerank", json=single).json()]
        answers += c.post("/rerank/batch", json={"requests": batch}).json()["responses"]
        answered = time.time()
        wait_for(lambda: counts(c)["written"] - before["written"] == 4, "4 records written")
        assert counts(c)["failed"] == before["failed"] and counts(c)["dropped"] == before["dropped"]
    got = records(shadow_redis.url)
    assert [r.request_id for r in got] == ["one", "b-0", "b-1", "b-2"]
    bundle = load_bundle(tiny_bundle, device="cpu")
    for record, body, answer in zip(got, [single, *batch], answers, strict=True):
        assert isinstance(record, ListRecord)
        n = len(body["candidates"])
        assert record.items == [c["item_id"] for c in body["candidates"]] and record.user_id == body["user_id"]
        assert (record.model, record.version, record.degraded_reasons) == ("psad", 1, [])
        assert record.served == served_indices(body, answer) and len(record.served) == body.get("top_k", n)
        assert [record.scores[i] for i in record.served] == [item["score"] for item in answer["items"]]
        assert started <= record.time <= answered
        assert all(a.shape[0] == 1 for a in record.inputs.values())
        np.testing.assert_allclose(bundle.score(record.inputs)[0, :n], record.scores, rtol=1e-5, atol=1e-6)
    # The batch's lists keep its padding: each is the row the model scored, 10 candidates wide.
    assert [r.inputs["cand_items"].shape[1] for r in got[1:]] == [10, 10, 10]
    assert [int(r.inputs["cand_mask"].sum()) for r in got[1:]] == [10, 6, 8]


def test_a_cold_start_list_is_recorded_with_its_reasons(tiny_bundle, shadow_redis, data):
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # the profile store is down: cold-start profiles
    settings = settings_for(tiny_bundle.parents[1], nowhere, shadow_sample_rate=1.0, shadow_redis_url=shadow_redis.url)
    body = request(data, request_id="cold")
    with serve(settings) as c:
        before = counts(c)
        answer = c.post("/rerank", json=body).json()
        assert answer["degraded_reasons"] == ["redis_unavailable"]
        event = {"user_id": body["user_id"], "item_id": data["items"][0], "action": "click", "request_id": "cold"}
        assert c.post("/events", json=event).status_code == 503  # not stored: no click record either
        c.post("/rerank", json=request(data, request_id="later"))  # written after any click would be
        wait_for(lambda: counts(c)["written"] - before["written"] == 2, "the two lists written")
    record, later = records(shadow_redis.url)
    assert isinstance(later, ListRecord) and later.request_id == "later"
    assert isinstance(record, ListRecord) and record.degraded_reasons == ["redis_unavailable"]
    assert record.served == served_indices(body, answer)
    scores = load_bundle(tiny_bundle, device="cpu").score(record.inputs)[0]
    np.testing.assert_allclose(scores, record.scores, rtol=1e-5, atol=1e-6)


def test_a_list_the_model_failed_is_not_recorded_but_its_click_is(tiny_bundle, tmp_path, redis_server, shadow_redis):
    """The ranking stage's order is not the student's: nothing to compare. Records are written in
    order, so once the click is there, the list would have been too."""
    repo = tmp_path / "models"
    schema = load_bundle(tiny_bundle, device="cpu").schema
    copy_version(tiny_bundle, repo, 1, failing_graph(schema, "nan"))
    settings = settings_for(repo, redis_server.url, shadow_sample_rate=1.0, shadow_redis_url=shadow_redis.url)
    with serve(settings) as c:
        before = counts(c)
        body = {"user_id": "u", "request_id": "nan-1", "candidates": [{"item_id": "a"}, {"item_id": "b"}]}
        assert c.post("/rerank", json=body).json()["degraded_reasons"] == ["model_nonfinite"]
        event = {"user_id": "u", "item_id": "b", "action": schema.actions[0], "request_id": "nan-1"}
        assert c.post("/events", json=event).status_code == 200
        wait_for(lambda: counts(c)["written"] > before["written"], "the click written")
        assert counts(c)["written"] - before["written"] == 1
    (click,) = records(shadow_redis.url)
    assert isinstance(click, ClickRecord)
    assert (click.request_id, click.user_id, click.item_id, click.action) == ("nan-1", "u", "b", schema.actions[0])


def test_a_shadow_redis_of_its_own_is_one_node_beside_a_cluster_store(tiny_bundle, redis_server, shadow_redis, data):
    """PSAD_REDIS_CLUSTER is the profile store's: a shadow Redis of its own is written as one node,
    the way `psad shadow run` reads it (here the store, a single node spoken to as a cluster, fails
    its reads: the list is scored cold and recorded all the same)."""
    settings = settings_for(
        tiny_bundle.parents[1],
        redis_server.url,
        redis_cluster=True,
        shadow_sample_rate=1.0,
        shadow_redis_url=shadow_redis.url,
    )
    with serve(settings) as c:
        before = counts(c)
        assert c.post("/rerank", json=request(data, request_id="beside")).status_code == 200
        wait_for(lambda: counts(c)["written"] + counts(c)["failed"] > before["written"] + before["failed"], "the write")
        assert counts(c)["written"] - before["written"] == 1
    assert [r.request_id for r in records(shadow_redis.url)] == ["beside"]


def test_sampling_follows_the_request_id_and_clicks_follow_their_list(tiny_bundle, redis_server, shadow_redis, data):
    rate = 0.3
    ids = [f"s-{k}" for k in range(40)]
    chosen = [rid for rid in ids if sampled(rid, rate)]
    assert 0 < len(chosen) < len(ids)
    settings = settings_for(
        tiny_bundle.parents[1], redis_server.url, shadow_sample_rate=rate, shadow_redis_url=shadow_redis.url
    )
    action = "click"
    with serve(settings) as c:
        before = counts(c)
        for rid in ids[:30]:
            assert c.post("/rerank", json=request(data, request_id=rid)).status_code == 200
        batch = {"requests": [request(data, request_id=rid) for rid in ids[30:]]}
        assert c.post("/rerank/batch", json=batch).status_code == 200
        events = [
            {"user_id": data["users"][0], "item_id": data["items"][0], "action": action, "request_id": rid}
            for rid in ids
        ]
        events.append({"user_id": data["users"][0], "item_id": data["items"][1], "action": action})  # no request id
        assert c.post("/events", json={"events": events}).json() == {"accepted": len(events)}
        wait_for(lambda: counts(c)["written"] - before["written"] == 2 * len(chosen), "lists and clicks written")
    got = records(shadow_redis.url)
    assert [r.request_id for r in got if isinstance(r, ListRecord)] == chosen
    assert [r.request_id for r in got if isinstance(r, ClickRecord)] == chosen


def test_rate_zero_writes_nothing(tiny_bundle, redis_server, shadow_redis, data):
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, shadow_redis_url=shadow_redis.url)
    app = create_app(settings)
    with serve(settings, app) as c:
        before = counts(c)
        assert c.post("/rerank", json=request(data, request_id="off-1")).status_code == 200
        event = {"user_id": data["users"][0], "item_id": data["items"][0], "action": "click", "request_id": "off-1"}
        assert c.post("/events", json=event).status_code == 200
        assert app.state.service.shadow is None and app.state.service.reranker.shadow is None
        assert counts(c) == before
    with redis.Redis.from_url(shadow_redis.url) as r:
        assert not r.exists(stream_key(PREFIX))


def test_events_request_id_is_checked_and_documented(tiny_bundle, redis_server, data):
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, shadow_sample_rate=1.0, max_id_length=16)
    event = {"user_id": data["users"][0], "item_id": data["items"][0], "action": "click"}
    with serve(settings) as c:
        r = c.post("/events", json={**event, "request_id": "has space"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "request_id"
        assert "visible ASCII" in r.json()["detail"][0]["msg"]
        r = c.post("/events", json={"events": [{**event, "request_id": "x" * 17}]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "events", 0, "request_id"]
        assert c.post("/events", json={**event, "request_id": ""}).status_code == 422
        spec = c.get("/openapi.json").json()["components"]["schemas"]["Event"]["properties"]["request_id"]
    branch = next(b for b in spec["anyOf"] if b.get("type") == "string")
    assert branch["maxLength"] == 16 and branch["pattern"] == "^[!-~]+$" and "request_id" in spec["description"]


class SilentRedis:
    """A TCP server that accepts connections and reads everything, and never answers: a Redis that
    hangs (or a half-open connection), as the shadow writer meets it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        while chunk := conn.recv(65536):
            self.received += chunk

    def close(self) -> None:
        for conn in [self.sock, *self.conns]:
            conn.close()


def test_the_answer_does_not_wait_for_the_write(tiny_bundle, redis_server, data):
    silent = SilentRedis()
    settings = settings_for(
        tiny_bundle.parents[1],
        redis_server.url,
        shadow_sample_rate=1.0,
        shadow_redis_url=silent.url,
        shadow_queue_size=3,
        shadow_timeout_ms=60_000,  # the first write stays under way for the whole test
    )
    app = create_app(settings)
    sent = 10
    try:
        with serve(settings, app) as c:
            before = counts(c)
            for k in range(sent):
                r = c.post("/rerank", json=request(data, request_id=f"w-{k}"))
                assert r.status_code == 200 and r.json()["degraded"] is False
            wait_for(lambda: b"XADD" in silent.received, "the first write reached the silent Redis")
            writer = app.state.service.shadow
            in_flight, queued = writer.in_flight, len(writer.queue)
            now = counts(c)
            assert in_flight >= 1 and queued == 3  # every answer came back while its record was unwritten
            assert all(type(e) is ScoredList for e in writer.queue)  # the request path built no record
            assert now["written"] == before["written"] and now["failed"] == before["failed"]
            assert now["dropped"] - before["dropped"] == sent - in_flight - queued
        # Shutdown waits a short bound for the stuck write, then counts what is left: each record once.
        after = counts_now()
        assert after["dropped"] - before["dropped"] == sent - in_flight
        assert after["failed"] - before["failed"] == in_flight
    finally:
        silent.close()


def counts_now() -> dict[str, float]:
    """The shadow counters once the server is gone (the servers of these tests run in this process)."""
    return {r: REGISTRY.get_sample_value("psad_shadow_records_total", {"result": r}) or 0.0 for r in RESULTS}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("shadow"):
            self.messages.append(record.getMessage())


def test_a_shadow_redis_outage_is_counted_and_writing_recovers(tiny_bundle, redis_server, shadow_redis, data):
    settings = settings_for(
        tiny_bundle.parents[1],
        redis_server.url,
        shadow_sample_rate=1.0,
        shadow_redis_url=shadow_redis.url,
        shadow_timeout_ms=500,
    )
    lines = Lines()
    logging.getLogger("psad.service").addHandler(lines)
    try:
        with serve(settings) as c:
            before = counts(c)
            c.post("/rerank", json=request(data, request_id="up-1"))
            wait_for(lambda: counts(c)["written"] > before["written"], "a write before the outage")
            shadow_redis.stop()
            down = counts(c)
            for k in range(8):
                r = c.post("/rerank", json=request(data, request_id=f"down-{k}"))
                assert r.status_code == 200 and r.json()["degraded"] is False  # the shadow is not the profile store

            def lost() -> float:
                now = counts(c)
                return now["failed"] + now["dropped"] - down["failed"] - down["dropped"]

            wait_for(lambda: lost() == 8, "every record of the outage counted")
            assert counts(c)["written"] == down["written"] and counts(c)["failed"] > down["failed"]
            assert lines.messages == ["shadow records not written; counting failures until a write succeeds"]
            shadow_redis.start()
            back = counts(c)

            def written_again() -> bool:
                c.post("/rerank", json=request(data, request_id="back"))
                return counts(c)["written"] > back["written"]

            wait_for(written_again, "records written once Redis is back")
            assert lines.messages[-1] == "shadow records written again" and len(lines.messages) == 2
    finally:
        logging.getLogger("psad.service").removeHandler(lines)
    assert {r.request_id for r in records(shadow_redis.url)} == {"back"}  # the restarted Redis kept nothing
