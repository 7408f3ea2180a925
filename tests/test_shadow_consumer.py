"""`psad shadow run` against a real redis-server and the real tiny bundle: records are written as the
service writes them (contract encode + XADD, inputs from the bundle's schema, scores from its ONNX
session), and every result is checked against the teacher decoded here and formulas written out."""

from __future__ import annotations

import itertools
import logging
import math
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis
import torch
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from export.contract import shadow
from export.contract.fixtures import BatchMaker
from export.exporter import load_torch_model
from export.runtime import Bundle, load_bundle
from psad.procs import free_port, wait_http
from psad.shadow import results
from psad.shadow.cli import shadow_app
from psad.shadow.consumer import (
    DEAD_MAXLEN,
    TAU_BUCKETS,
    UNIT_BUCKETS,
    Consumer,
    Metrics,
    Options,
    Teachers,
    list_row,
    require_redis,
)
from service.model_repo import LocalRepo
from tests.conftest import RedisServer

REPO = Path(__file__).resolve().parents[1]
NOT_ROWS = ["processed_at", "consumer"]  # what differs between two consumers' rows of one record


@pytest.fixture(scope="module")
def scorer(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle, device="cpu", warmup=False)


@pytest.fixture(scope="module")
def teacher(tiny_bundle: Path):
    return load_torch_model(tiny_bundle)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


def make_list(
    scorer: Bundle, request_id: str, n: int, seed: int, *, slots: int | None = None, served: int = 3, **meta
) -> shadow.ListRecord:
    """A list as the service records it: inputs built from the schema (slots > n: padded candidate
    slots, as in a batch of longer lists), the student's scores from the ONNX session."""
    inputs = BatchMaker(scorer.schema, seed=seed).make(1, slots or n, 5, pad_last=False)
    inputs["cand_mask"][0, n:] = False
    scores = scorer.score(inputs)[0, :n]
    fields = {"time": time.time(), "model": "psad", "version": 1, "user_id": f"u{seed}", "degraded_reasons": []}
    return shadow.ListRecord(
        request_id=request_id,
        items=[f"{request_id}/{j}" for j in range(n)],
        scores=scores.tolist(),
        served=np.argsort(-scores, kind="stable")[:served].tolist(),
        inputs=inputs,
        **{**fields, **meta},
    )


def click(
    request_id: str,
    item_id: str,
    when: float | None = None,
    user: str = "u",
    action: str = "click",
    event_id: str | None = None,
) -> shadow.ClickRecord:
    return shadow.ClickRecord(request_id, time.time() if when is None else when, user, item_id, action, event_id)


def add(client: redis.Redis, prefix: str, *records: shadow.ListRecord | shadow.ClickRecord | dict) -> list[str]:
    """XADD each record (or raw fields), as the service does; returns the stream ids."""
    pipe = client.pipeline(transaction=False)
    for r in records:
        pipe.execute_command(*shadow.xadd_command(prefix, r if isinstance(r, dict) else shadow.encode(r), 10_000))
    return [rid.decode() for rid in pipe.execute()]


def consumer(client: redis.Redis, prefix: str, tiny_bundle: Path, tmp_path: Path, **options) -> Consumer:
    opts = Options(prefix=prefix, out=tmp_path / "shadow", **options)
    worker = Consumer(client, opts, Teachers(LocalRepo(tiny_bundle.parents[1])), Metrics())
    worker.ensure_group()
    return worker


def run_once(worker: Consumer) -> Consumer:
    worker.run(threading.Event(), once=True)
    return worker


def metric(worker: Consumer, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def pending(client: redis.Redis, prefix: str) -> int:
    return int(client.xpending(shadow.stream_key(prefix), shadow.GROUP)["pending"])


def teacher_order(teacher, record: shadow.ListRecord) -> list[int]:
    n = len(record.items)
    return teacher.teacher_decode({k: torch.from_numpy(v) for k, v in record.inputs.items()})[0, :n].tolist()


def student_order(record: shadow.ListRecord) -> list[int]:
    return sorted(range(len(record.scores)), key=lambda i: -record.scores[i])  # sorted() is stable


def by_hand(s: list[int], t: list[int], k: int) -> dict:
    """The common brief's definitions, pair by pair and rank by rank."""
    n, k = len(s), min(k, len(s))
    rank_t = {item: r for r, item in enumerate(t)}
    pairs = list(itertools.combinations(range(n), 2))
    concordant = sum(rank_t[s[i]] < rank_t[s[j]] for i, j in pairs)
    rel = {item: (k - r if r < k else 0) for item, r in rank_t.items()}
    dcg = sum(rel[s[r]] / math.log2(r + 2) for r in range(k))
    ideal = sum(rel[t[r]] / math.log2(r + 2) for r in range(k))
    return {
        "kendall_tau": (2 * concordant - len(pairs)) / len(pairs) if pairs else 1.0,
        "topk_overlap": len(set(s[:k]) & set(t[:k])) / k,
        "ndcg": dcg / ideal,
        "first_agree": s[0] == t[0],
    }


def test_metrics_match_a_hand_computation(client, prefix, scorer, teacher, tiny_bundle, tmp_path) -> None:
    records = [
        make_list(scorer, "a", 7, seed=1),
        make_list(scorer, "b", 5, seed=2, slots=9),  # padded candidate slots
        make_list(scorer, "c", 1, seed=3),
        make_list(scorer, "d", 12, seed=4, degraded_reasons=["redis_unavailable"]),
    ]
    ids = add(client, prefix, *records)
    worker = run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1", k=4))

    rows = results.read(tmp_path / "shadow", "lists").set_index("record_id")
    assert sorted(rows.index) == sorted(ids)
    expected = []
    for rid, record in zip(ids, records, strict=True):
        s, t = student_order(record), teacher_order(teacher, record)
        hand = by_hand(s, t, 4)
        expected.append(hand)
        row = rows.loc[rid]
        assert row["teacher_order"].tolist() == t and row["student_order"].tolist() == s
        assert row["served"].tolist() == record.served and row["items"].tolist() == record.items
        assert (row["n"], row["k"], row["version"], row["request_id"]) == (len(s), min(4, len(s)), 1, record.request_id)
        for name, value in hand.items():
            assert row[name] == pytest.approx(value), (rid, name)
        assert row["degraded"] == bool(record.degraded_reasons)
        assert list(row["degraded_reasons"]) == record.degraded_reasons

    assert metric(worker, "psad_shadow_lists_total", version="1") == 4
    assert metric(worker, "psad_shadow_first_item_agreement_total", version="1") == sum(
        e["first_agree"] for e in expected
    )
    for name, bounds in (("kendall_tau", TAU_BUCKETS), ("topk_overlap", UNIT_BUCKETS), ("ndcg", UNIT_BUCKETS)):
        values = [e[name] for e in expected]
        for le in bounds:  # cumulative bucket counts, as the exposition has them
            want = sum(v <= le for v in values)
            assert metric(worker, f"psad_shadow_{name}_bucket", version="1", le=str(float(le))) == want, (name, le)
        assert metric(worker, f"psad_shadow_{name}_count", version="1") == 4
        if bounds[0] >= 0:  # prometheus_client has no _sum for a histogram with negative buckets
            assert metric(worker, f"psad_shadow_{name}_sum", version="1") == pytest.approx(sum(values))
    assert pending(client, prefix) == 0
    assert client.zcard(shadow.done_key(prefix)) == 4


def click_ranks(row: pd.Series) -> list[int | None]:
    return [None if pd.isna(row[c]) else int(row[c]) for c in ("student_rank", "teacher_rank", "served_rank")]


def test_clicks_joined_by_request_id_land_on_the_right_list(
    client, prefix, scorer, teacher, tiny_bundle, tmp_path
) -> None:
    a, b = make_list(scorer, "req-a", 6, seed=5), make_list(scorer, "req-b", 8, seed=6, served=4)
    s_a, t_a, s_b, t_b = student_order(a), teacher_order(teacher, a), student_order(b), teacher_order(teacher, b)
    # Same batch as their lists (joined in memory): a click on a's student top item.
    first = add(client, prefix, a, b, click("req-a", a.items[s_a[0]], user=a.user_id))
    run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1"))
    # A later batch (joined through the ranks keys): a's teacher top item, viewed; b's 6th student
    # item (not served), an item not in b, a click on a by another user (a reused request id: not
    # its list), and two clicks whose list is not found: held on this first delivery, however old.
    later = add(
        client,
        prefix,
        click("req-a", a.items[t_a[0]], user=a.user_id, action="view"),
        click("req-b", b.items[s_b[5]], user=b.user_id),
        click("req-b", "not-in-the-list", user=b.user_id),
        click("req-a", a.items[s_a[0]], user="someone-else"),
        click("req-unknown", "x", when=1000.0),
        click("req-unknown-yet", "x"),
    )
    worker = run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="c2"))

    def ranks(s: list[int], t: list[int], served: list[int], item: int) -> list:
        return [s.index(item) + 1, t.index(item) + 1, served.index(item) + 1 if item in served else None]

    want = {
        first[2]: (True, ranks(s_a, t_a, a.served, s_a[0])),
        later[0]: (True, ranks(s_a, t_a, a.served, t_a[0])),
        later[1]: (True, ranks(s_b, t_b, b.served, s_b[5])),
        later[2]: (True, [None, None, None]),
        later[3]: (False, [None, None, None]),
    }
    rows = results.read(tmp_path / "shadow", "clicks").set_index("record_id")
    assert sorted(rows.index) == sorted(want)
    for rid, (matched, got) in want.items():
        row = rows.loc[rid]
        assert (bool(row["matched"]), click_ranks(row)) == (matched, got), rid
        assert (None if pd.isna(row["version"]) else int(row["version"])) == (1 if matched else None)
    assert want[later[1]][1][2] is None  # b's 6th item was not in its answer of 4
    assert rows.loc[later[0], "request_id"] == "req-a" and rows.loc[later[1], "request_id"] == "req-b"
    assert rows.loc[later[0], "action"] == "view"
    assert metric(worker, "psad_shadow_clicks_total", action="click", matched="true") == 2
    assert metric(worker, "psad_shadow_clicks_total", action="view", matched="true") == 1
    assert metric(worker, "psad_shadow_clicks_total", action="click", matched="false") == 1
    assert metric(worker, "psad_shadow_click_rank_count", action="click", order="student") == 1
    assert metric(worker, "psad_shadow_click_rank_count", action="view", order="teacher") == 1
    assert pending(client, prefix) == 2  # the clicks without their list: retried after the claim timeout

    time.sleep(0.1)  # idle past the claim timeout: on the redelivery they are decided
    claimer = run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="c3", claim_idle_s=0.05))
    rows = results.read(tmp_path / "shadow", "clicks").set_index("record_id")
    assert not rows.loc[later[4:], "matched"].any() and pending(client, prefix) == 0
    assert metric(claimer, "psad_shadow_claimed_total") == 2
    assert metric(claimer, "psad_shadow_clicks_total", action="click", matched="false") == 2


def test_a_click_whose_list_comes_later_from_another_consumer_is_matched_after_the_claim(
    client, prefix, scorer, teacher, tiny_bundle, tmp_path
) -> None:
    late = make_list(scorer, "late", 5, seed=7)
    s, t = student_order(late), teacher_order(teacher, late)
    (held,) = add(client, prefix, click("late", late.items[s[1]], user=late.user_id))
    c1 = run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1", claim_idle_s=0.05))
    assert pending(client, prefix) == 1 and results.read(tmp_path / "shadow", "clicks").empty  # held
    assert metric(c1, "psad_shadow_clicks_total", action="click", matched="false") == 0

    add(client, prefix, late)
    run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="c2"))  # the list: a later batch, c2
    time.sleep(0.1)
    run_once(c1)  # the claim: c1 takes its own held click back, and finds the list now
    (row,) = results.read(tmp_path / "shadow", "clicks").to_dict("records")
    assert (row["record_id"], row["matched"], row["consumer"]) == (held, True, "c1")
    assert click_ranks(pd.Series(row)) == [2, t.index(s[1]) + 1, 2]  # served: the student's top 3
    assert metric(c1, "psad_shadow_clicks_total", action="click", matched="true") == 1
    assert pending(client, prefix) == 0


def test_a_retried_event_is_counted_once_and_read_back_once(client, prefix, scorer, tiny_bundle, tmp_path) -> None:
    a = make_list(scorer, "retried", 4, seed=8)
    item = a.items[0]
    # /events retried with the same event_id: two click records; one in the list's batch, one later.
    first = add(client, prefix, a, click("retried", item, user=a.user_id, event_id="e-1"))
    worker = consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1")
    run_once(worker)
    again = add(
        client,
        prefix,
        click("retried", item, user=a.user_id, event_id="e-1"),
        click("retried", item, user=a.user_id),  # no event_id: each record is its own event
        click("retried", item, user=a.user_id),
    )
    run_once(worker)
    assert metric(worker, "psad_shadow_clicks_total", action="click", matched="true") == 3
    parts = pd.concat(pq.read_table(p).to_pandas() for p in (tmp_path / "shadow" / "clicks").rglob("part-*.parquet"))
    assert sorted(parts["record_id"]) == sorted([first[1], *again])  # both records are written...
    rows = results.read(tmp_path / "shadow", "clicks")
    assert sorted(rows["record_id"]) == sorted([first[1], *again[1:]])  # ...and read back as one event
    assert rows.set_index("record_id").loc[first[1], "event_id"] == "e-1"
    assert client.zscore(shadow.done_key(prefix), "click:7:retried:e-1") is not None


def test_a_corrupt_ranks_key_leaves_its_clicks_unmatched(client, prefix, tiny_bundle, tmp_path) -> None:
    client.set(shadow.ranks_key(prefix, "broken"), b"{not json")
    client.set(shadow.ranks_key(prefix, "odd"), b'{"version": 1}')
    ids = add(client, prefix, click("broken", "x"), click("odd", "x"))
    worker = run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1"))
    rows = results.read(tmp_path / "shadow", "clicks")
    assert sorted(rows["record_id"]) == sorted(ids) and not rows["matched"].any()
    assert metric(worker, "psad_shadow_clicks_total", action="click", matched="false") == 2
    assert pending(client, prefix) == 0


def test_poison_records_are_dead_lettered_and_the_good_ones_around_them_processed(
    client, prefix, scorer, tiny_bundle, tmp_path
) -> None:
    good = [make_list(scorer, f"good{i}", 4, seed=10 + i) for i in range(2)]
    truncated = shadow.encode(make_list(scorer, "truncated", 4, seed=12))
    truncated[b"in.cand_items"] = truncated[b"in.cand_items"][:-3]
    other_format = {**shadow.encode(make_list(scorer, "v99", 4, seed=13)), b"v": b"99"}
    unknown_version = make_list(scorer, "v7", 4, seed=14, version=7)
    wrong_inputs = make_list(scorer, "inputs", 4, seed=15)
    wrong_inputs.inputs["user_cat"] = np.zeros((1, wrong_inputs.inputs["user_cat"].shape[1] + 1), np.int64)
    ids = add(client, prefix, good[0], truncated, other_format, unknown_version, wrong_inputs, good[1])
    worker = run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1"))

    dead = {f[b"original_id"].decode(): f for _, f in client.xrange(shadow.dead_letter_key(prefix))}
    reasons = {rid: f[b"reason"].decode() for rid, f in dead.items()}
    assert reasons == {ids[1]: "record", ids[2]: "record", ids[3]: "version", ids[4]: "inputs"}
    assert b"in.cand_items" in dead[ids[1]][b"error"] and b"format" in dead[ids[2]][b"error"]
    assert b"user_cat" in dead[ids[4]][b"error"] and b"psad/7" in dead[ids[3]][b"error"]
    assert dead[ids[1]][b"meta"] == truncated[b"meta"]  # the record's header travels with it...
    inputs = {f for f in truncated if f.startswith(b"in.")}
    assert inputs and not inputs & dead[ids[1]].keys()  # ...its tensors do not, only their byte lengths
    assert {f: int(dead[ids[1]][b"len." + f]) for f in inputs} == {f: len(truncated[f]) for f in inputs}
    expected = {b"v", b"kind", b"meta", b"reason", b"error", b"original_id", *(b"len." + f for f in inputs)}
    assert set(dead[ids[1]]) == expected
    assert results.read(tmp_path / "shadow", "lists")["record_id"].tolist() == [ids[0], ids[5]]
    assert pending(client, prefix) == 0
    assert metric(worker, "psad_shadow_dead_letters_total", reason="record") == 2
    assert metric(worker, "psad_shadow_dead_letters_total", reason="version") == 1
    assert metric(worker, "psad_shadow_dead_letters_total", reason="inputs") == 1
    assert metric(worker, "psad_shadow_lists_total", version="1") == 2
    assert client.xinfo_stream(shadow.dead_letter_key(prefix))["length"] <= DEAD_MAXLEN


def test_two_consumers_racing_on_a_poison_record_dead_letter_it_once(client, prefix, scorer, tiny_bundle, tmp_path):
    (rid,) = add(client, prefix, {**shadow.encode(make_list(scorer, "poison", 4, seed=16)), b"v": b"99"})
    first, second = (consumer(client, prefix, tiny_bundle, tmp_path, consumer=name) for name in ("c1", "c2"))
    (entry,) = first.read(block_ms=0)
    for worker in (first, second):  # both decided it is poison (a redelivery after a claim, say)
        worker.dead_letter(worker.process([entry]).poison)
    assert [f[b"original_id"].decode() for _, f in client.xrange(shadow.dead_letter_key(prefix))] == [rid]
    assert [metric(w, "psad_shadow_dead_letters_total", reason="record") for w in (first, second)] == [1, 0]
    assert pending(client, prefix) == 0


def test_the_done_set_forgets_records_trimmed_from_the_stream_and_remembers_the_others(
    client, prefix, scorer, tiny_bundle, tmp_path
) -> None:
    stream, done = shadow.stream_key(prefix), shadow.done_key(prefix)
    worker = consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1", claim_idle_s=1.0)  # margin: 1000 ms

    def at(ms: int, record: shadow.ListRecord | shadow.ClickRecord) -> str:
        return client.xadd(stream, shadow.encode(record), id=f"{ms}-0").decode()

    at(1000, make_list(scorer, "old", 3, seed=60))
    at(1001, click("old", "old/0", user="u60", event_id="e"))
    kept = at(5000, make_list(scorer, "kept", 3, seed=61))
    run_once(worker)
    assert client.zcard(done) == 3 and client.zscore(done, "click:3:old:e") == 1001  # scored by its record id
    client.xtrim(stream, minid=kept, approximate=False)  # the two old records leave the stream
    assert client.zcard(done) == 3  # nothing trims the done set until the next commit
    newer = at(9000, make_list(scorer, "newer", 3, seed=62))
    run_once(worker)
    assert sorted(m.decode() for m in client.zrange(done, 0, -1)) == sorted([kept, newer])
    assert client.zscore(done, kept) == 5000

    late = consumer(client, prefix, tiny_bundle, tmp_path, consumer="late")
    redelivered = late.process(client.xrange(stream), redelivered=True)
    assert [r["record_id"] for r in redelivered.lists] == [kept, newer]
    assert late.commit(redelivered, time.time()) == set()  # still in the stream: still deduped

    at(12_000, make_list(scorer, "last", 3, seed=63))
    entries = worker.read(block_ms=0)
    client.xtrim(stream, maxlen=0, approximate=False)  # trimmed while in hand: committed into an empty stream
    worker.handle(entries, redelivered=False)
    assert client.zcard(done) == 3  # an empty stream trims nothing


def test_a_crash_between_writing_and_committing_neither_loses_nor_double_counts(
    client, prefix, scorer, tiny_bundle, tmp_path
) -> None:
    ids = add(client, prefix, *(make_list(scorer, f"r{i}", 3 + i, seed=20 + i) for i in range(6)))
    dying = consumer(client, prefix, tiny_bundle, tmp_path, consumer="dying", batch=10)
    dying.write(dying.process(dying.read(block_ms=0)))  # parquet written; killed before the commit script
    assert pending(client, prefix) == 6

    time.sleep(0.1)  # idle past the survivor's claim timeout
    survivor = run_once(consumer(client, prefix, tiny_bundle, tmp_path, consumer="survivor", claim_idle_s=0.05))
    assert metric(survivor, "psad_shadow_claimed_total") == 6
    assert metric(survivor, "psad_shadow_lists_total", version="1") == 6

    parts = sorted((tmp_path / "shadow" / "lists").rglob("part-*.parquet"))
    assert [p.name.split("-")[1] for p in parts] == ["dying", "survivor"]
    copies = [pq.read_table(p).to_pandas().drop(columns=NOT_ROWS) for p in parts]
    pd.testing.assert_frame_equal(copies[0], copies[1])  # the redelivered record's row is the same
    assert sorted(results.read(tmp_path / "shadow", "lists")["record_id"]) == sorted(ids)
    assert client.zcard(shadow.done_key(prefix)) == 6 and pending(client, prefix) == 0

    late = consumer(client, prefix, tiny_bundle, tmp_path, consumer="late")
    redelivered = late.process(client.xrange(shadow.stream_key(prefix)))
    assert late.commit(redelivered, time.time()) == set()  # already done: a late redelivery is not counted again


def test_a_record_delivered_too_often_is_dead_lettered(client, prefix, scorer, tiny_bundle, tmp_path) -> None:
    (rid,) = add(client, prefix, make_list(scorer, "crasher", 4, seed=30))
    consumer(client, prefix, tiny_bundle, tmp_path, consumer="crashed").read(block_ms=0)  # delivery 1, then it died
    time.sleep(0.1)
    again = consumer(client, prefix, tiny_bundle, tmp_path, consumer="crashed-too", claim_idle_s=0.05)
    assert [e[0].decode() for e in again.claim()] == [rid]  # delivery 2: it died too
    time.sleep(0.1)
    worker = run_once(
        consumer(client, prefix, tiny_bundle, tmp_path, consumer="next", claim_idle_s=0.05, max_deliveries=2)
    )
    (entry,) = client.xrange(shadow.dead_letter_key(prefix))
    assert entry[1][b"original_id"].decode() == rid and entry[1][b"reason"] == b"deliveries"
    assert metric(worker, "psad_shadow_dead_letters_total", reason="deliveries") == 1
    assert pending(client, prefix) == 0 and results.read(tmp_path / "shadow", "lists").empty


def test_a_redis_outage_is_counted_and_the_consumer_resumes_once_redis_is_back(
    prefix, scorer, tiny_bundle, tmp_path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    worker = consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1", block_ms=100)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        add(client, prefix, make_list(scorer, "before", 4, seed=50))
        until(lambda: client.zcard(shadow.done_key(prefix)) == 1, "the first record", [])
        server.stop()  # no persistence: the stream and its group are gone when it comes back
        until(lambda: metric(worker, "psad_shadow_redis_errors_total") > 0, "the outage to be counted", [])
        server.start()
        add(client, prefix, make_list(scorer, "after", 4, seed=51))
        until(lambda: client.zcard(shadow.done_key(prefix)) == 1 and pending(client, prefix) == 0, "the next one", [])
    finally:
        stop.set()
        thread.join(timeout=30)
        client.close()
        server.stop()
    assert not thread.is_alive()
    assert results.read(tmp_path / "shadow", "lists")["request_id"].tolist() == ["before", "after"]
    assert metric(worker, "psad_shadow_lists_total", version="1") == 2


def test_results_that_cannot_be_written_stay_in_hand_until_the_disk_is_back(
    client, prefix, scorer, tiny_bundle, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "shadow"
    out.write_bytes(b"")  # a file where the results directory should be: every write fails (OSError)
    worker = consumer(client, prefix, tiny_bundle, tmp_path, consumer="c1", block_ms=100)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    lists = [make_list(scorer, f"disk{i}", 4, seed=70 + i) for i in range(3)]
    ids = add(client, prefix, *lists, click("disk0", lists[0].items[0], user=lists[0].user_id))
    with caplog.at_level(logging.INFO, logger="psad.shadow.consumer"):
        thread.start()
        try:
            until(lambda: metric(worker, "psad_shadow_write_errors_total") >= 2, "two failed writes", [])
            assert pending(client, prefix) == len(ids) and client.zcard(shadow.done_key(prefix)) == 0  # no ack
            out.unlink()
            until(lambda: pending(client, prefix) == 0, "the batch written once the disk is back", [])
        finally:
            stop.set()
            thread.join(timeout=30)
    assert not thread.is_alive()
    assert sorted(results.read(out, "lists")["record_id"]) == sorted(ids[:3])
    assert results.read(out, "clicks")["matched"].tolist() == [True]
    assert metric(worker, "psad_shadow_lists_total", version="1") == 3
    assert metric(worker, "psad_shadow_clicks_total", action="click", matched="true") == 1
    assert not client.exists(shadow.dead_letter_key(prefix)) and metric(worker, "psad_shadow_claimed_total") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write results" in m for m in messages) == 1  # logged once, however many retries
    assert any(m.startswith("results written again") for m in messages)


def until(condition: Callable[[], bool], what: str, procs: list[subprocess.Popen], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [p.args[-1] for p in procs if p.poll() is not None]
        assert not dead, f"consumer {dead} exited early while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_consumers_one_killed_mid_batch_lose_nothing_and_count_nothing_twice(
    client, prefix, redis_server, scorer, tiny_bundle, tmp_path
) -> None:
    n = 200
    records = [make_list(scorer, f"r{i}", 2 + i % 9, seed=100 + i) for i in range(n)]
    out, ports = tmp_path / "shadow", [free_port(), free_port()]
    procs, logs = [], []
    for name, port in zip(("c1", "c2"), ports, strict=True):
        cmd = [sys.executable, "-m", "psad.cli", "shadow", "run", "--redis-url", redis_server.url]
        cmd += ["--prefix", prefix, "--model-repo", str(tiny_bundle.parents[1]), "--out", str(out), "--batch", "5"]
        cmd += ["--claim-idle-s", "1", "--metrics-port", str(port), "--log-interval-s", "1", "--consumer", name]
        logs.append(open(tmp_path / f"{name}.log", "wb"))  # noqa: SIM115  # closed in the finally below
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        for proc, port in zip(procs, ports, strict=True):
            wait_http(f"http://127.0.0.1:{port}/metrics", 60, proc, tmp_path / f"{proc.args[-1]}.log")
        ids = add(client, prefix, *records)
        until(lambda: any(out.rglob("part-c1-*.parquet")), "c1's first part file", procs)

        def c1_pending() -> int:
            return next(
                (
                    c["pending"]
                    for c in client.xpending(shadow.stream_key(prefix), shadow.GROUP)["consumers"]
                    if c["name"] == b"c1"
                ),
                0,
            )

        # Freeze c1 until it is caught holding records it has not acknowledged, then kill it.
        for _ in range(2000):
            procs[0].send_signal(signal.SIGSTOP)
            held = c1_pending()
            if held:
                procs[0].kill()
                break
            procs[0].send_signal(signal.SIGCONT)
            time.sleep(0.002)
        assert held, "c1 was never caught mid-batch"
        procs[0].wait(timeout=10)

        done = shadow.done_key(prefix)
        until(lambda: client.zcard(done) == n and pending(client, prefix) == 0, "every record done", procs[1:])
        text = wait_http(f"http://127.0.0.1:{ports[1]}/metrics", 10).decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert samples["psad_shadow_claimed_total", ()] >= held  # c2 took over what c1 held
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=30) == 0
    finally:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()

    rows = results.read(out, "lists")
    assert len(rows) == n and sorted(rows["record_id"]) == sorted(ids)
    teachers = Teachers(LocalRepo(tiny_bundle.parents[1]))
    for rid, record in zip(ids, records, strict=True):
        want = list_row(rid, record, teachers.get("psad", 1), 10)
        got = rows[rows["record_id"] == rid].iloc[0]
        for name, value in want.items():
            assert np.array_equal(np.asarray(got[name]), np.asarray(value)), (rid, name)
    assert set(rows["consumer"]) <= {"c1", "c2"}
    assert client.zcard(shadow.done_key(prefix)) == n
    # End to end, counted once: c1 committed (and counted, then died with its counters) exactly the
    # ids whose only rows are its own; c2 counted every other one, including those it redid.
    writers: dict[str, set[str]] = {}
    for part in out.rglob("part-*.parquet"):  # every part, not deduplicated
        for row in pq.read_table(part, columns=["record_id", "consumer"]).to_pylist():
            writers.setdefault(row["record_id"], set()).add(row["consumer"])
    assert writers.keys() == set(ids)
    c1_only = sum(names == {"c1"} for names in writers.values())
    assert samples["psad_shadow_lists_total", (("version", "1"),)] == n - c1_only


def shadow_cli(*args: str):
    root = typer.Typer()
    root.add_typer(shadow_app, name="shadow")
    return CliRunner().invoke(root, ["shadow", "run", *args])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The command writes its overrides to PSAD_* variables: restore them after each test."""
    for name in ("SHADOW_REDIS_URL", "REDIS_URL", "REDIS_CLUSTER", "MODEL_REPO", "KEY_PREFIX"):
        monkeypatch.setenv(f"PSAD_{name}", "")
        monkeypatch.delenv(f"PSAD_{name}")
    return monkeypatch


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--batch", "0"], "--batch"),
        (["--k", "0"], "--k"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--consumer", "a/b"], "--consumer"),
        (["--consumer", ".hidden"], "--consumer"),
        (["--consumer", "c" * 101], "--consumer"),
        (["--max-deliveries", "1"], "--max-deliveries"),  # a held click is delivered twice by design
        (["--click-grace-s", "30"], "--click-grace-s"),  # removed: the claim timeout is the grace
        (["--dedup-window-s", "60"], "--dedup-window-s"),  # removed: the stream's first entry bounds the done set
        (["--prefix", "a b"], "PSAD_KEY_PREFIX='a b'"),  # the service's settings check it, as for `psad serve`
    ],
)
def test_bad_flags_name_the_flag(clean_env, args: list[str], named: str) -> None:
    result = shadow_cli("--once", "--metrics-port", "0", *args)
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_a_cluster_stream_is_refused_unless_the_stream_has_its_own_redis(clean_env, redis_server, tmp_path) -> None:
    clean_env.setenv("PSAD_REDIS_CLUSTER", "true")
    result = shadow_cli("--once", "--metrics-port", "0")
    assert result.exit_code == 2, result.output
    assert "PSAD_REDIS_CLUSTER" in result.output and "PSAD_SHADOW_REDIS_URL" in result.output
    args = ["--once", "--metrics-port", "0", "--prefix", f"t{uuid.uuid4().hex[:8]}", "--out", str(tmp_path)]
    assert shadow_cli("--redis-url", redis_server.url, *args).exit_code == 0
    clean_env.setenv("PSAD_SHADOW_REDIS_URL", redis_server.url)
    assert shadow_cli(*args).exit_code == 0


def test_a_redis_older_than_7_is_refused_naming_its_version(redis_server) -> None:
    with redis.Redis.from_url(redis_server.url) as c:
        require_redis(c.info("server")["redis_version"])  # the redis-server the tests run
    for old in ("6.2.14", "5.0.7", "garbage"):
        with pytest.raises(RuntimeError, match=rf"Redis {old} found; .* needs Redis >= 7\.0"):
            require_redis(old)
    require_redis("7.0.0")
    require_redis("10.1.2")


def test_an_unreachable_redis_fails_with_exit_1(clean_env) -> None:
    result = shadow_cli("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--once", "--metrics-port", "0")
    assert result.exit_code == 1, result.output
    assert "error: Redis at" in result.output and "--redis-url" in result.output


def test_once_exits_0_and_writes_results(
    clean_env, redis_server, client, prefix, scorer, tiny_bundle, tmp_path
) -> None:
    (rid,) = add(client, prefix, make_list(scorer, "cli", 5, seed=40))
    repo, out = str(tiny_bundle.parents[1]), str(tmp_path / "out")
    result = shadow_cli(
        "--redis-url",
        redis_server.url,
        "--prefix",
        prefix,
        "--model-repo",
        repo,
        "--out",
        out,
        "--once",
        "--metrics-port",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert results.read(Path(out), "lists")["record_id"].tolist() == [rid]


def test_results_are_laid_out_by_window_and_read_back_by_time_range(tmp_path: Path) -> None:
    def row(rid: str, when: float, event_id: str | None = None, request_id: str = "q") -> dict:
        base = {"request_id": request_id, "user_id": "u", "item_id": "i", "action": "click", "matched": False}
        nulls = dict.fromkeys(("version", "student_rank", "teacher_rank", "served_rank"))
        ids = {"record_id": rid, "event_id": event_id}
        return {**ids, "time": when, **base, **nulls, "processed_at": when, "consumer": "c"}

    hour = 1_700_000_000 // 3600 * 3600  # 2023-11-14T22:00Z
    rows = [row("5-0", hour + 10.0), row("6-0", hour + 3600.0), row("7-0", hour + 20.0)]
    paths = results.write(tmp_path, "clicks", rows, "c", 3600)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "clicks/window=20231114T2200Z/part-c-5-0.parquet",
        "clicks/window=20231114T2300Z/part-c-6-0.parquet",
    ]
    results.write(tmp_path, "clicks", rows[2:], "d", 3600)  # a redelivered record in a second part
    assert results.read(tmp_path, "clicks")["record_id"].tolist() == ["5-0", "7-0", "6-0"]
    assert results.read(tmp_path, "clicks", start=hour + 15, end=hour + 3600)["record_id"].tolist() == ["7-0"]
    # Retried events (same request and event id) are one event: the first kept; other pairs are not.
    retries = [row("8-0", hour + 30.0, "e1"), row("9-0", hour + 31.0, "e1"), row("10-0", hour + 32.0, "e2")]
    retries.append(row("11-0", hour + 33.0, "e1", request_id="other"))
    results.write(tmp_path, "clicks", retries, "c", 3600)
    got = results.read(tmp_path, "clicks", end=hour + 3600)
    assert got["record_id"].tolist() == ["5-0", "7-0", "8-0", "10-0", "11-0"]
    assert got["event_id"].fillna("").tolist() == ["", "", "e1", "e2", "e1"]
    empty = results.read(tmp_path, "lists")
    assert empty.empty and list(empty.columns) == results.LISTS_SCHEMA.names
    with pytest.raises(ValueError, match="kind must be one of"):
        results.read(tmp_path, "list")
    assert not list(tmp_path.rglob(".*tmp"))  # no temporary file left behind
