"""Profiles in a real Redis: bulk load, raw storage, encoding with a bundle's vocabularies,
corrupt contents, and concurrent appends that lose nothing."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import redis

from export.contract.schema import OOV
from psad.load_profiles import bulk_load
from service.profiles import (
    ProfileStore,
    RawProfile,
    RedisPyReader,
    connect,
    encode_profile,
    history_key,
    mark_loaded,
    member,
    user_key,
)
from tests.test_service_api import request, serve, settings_for
from training.data.store import load_schema, load_vocabs


@pytest.fixture(scope="module")
def loaded(tiny_data: Path, redis_server) -> dict:
    stats = bulk_load(redis_server.url, tiny_data, prefix="proftest", ttl_s=3600, progress=False)
    return stats


def test_bulk_load_stores_raw_values_and_is_idempotent(tiny_data, redis_server, loaded):
    schema = load_schema(tiny_data)
    users = pd.read_parquet(tiny_data / "users.parquet")
    behaviours = pd.read_parquet(tiny_data / "behaviours.parquet")
    assert loaded["users"] == len(users) and loaded["rate"] > 0
    per_user = behaviours.groupby("user_id").size().clip(upper=schema.max_history)
    assert loaded["behaviours"] == int(per_user.sum())
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    uid = users["user_id"].iloc[0]
    fields = r.hgetall(user_key("proftest", uid))
    vocab = json.loads((tiny_data / "vocab.json").read_text())["user_categorical"]
    for f in schema.user_categorical:  # the raw value, not the training index
        assert fields[f.name] == vocab[f.name][int(users[f.name].iloc[0]) - 2]
    members = r.zrange(history_key("proftest", uid), 0, -1)
    mine = behaviours[behaviours["user_id"] == uid].iloc[-schema.max_history :]
    assert [m.split("|", 3)[3] for m in members] == mine["item_id"].tolist()
    assert 0 < r.ttl(history_key("proftest", uid)) <= 3600
    bulk_load(redis_server.url, tiny_data, prefix="proftest", ttl_s=3600, progress=False)
    assert r.zcard(history_key("proftest", uid)) == len(members)


def test_encoding_uses_the_vocabularies_and_skips_corrupt_entries(tiny_data):
    schema = load_schema(tiny_data)
    vocabs = load_vocabs(tiny_data, schema)
    known_item = vocabs.items.tokens[0]
    raw = RawProfile(
        user={schema.user_categorical[0].name: "never-seen", schema.user_numeric[0].name: "not-a-number"},
        history=["20|click|e1|" + known_item, "garbage", "x|view|e2|a", "\u00b2|view|e4|a", "10|view|e3|unknown|item"],
    )
    profile, corrupt = encode_profile(raw, schema, vocabs)
    assert corrupt == 4  # the numeric and three history members (a superscript digit is no timestamp)
    assert profile.user_cat.tolist() == [OOV] and profile.user_num.tolist() == [0.0]
    assert profile.hist_ts.tolist() == [10, 20]  # time-sorted; item ids may contain '|'
    assert profile.hist_items.tolist() == [OOV, vocabs.items.index(known_item)]
    assert profile.hist_actions.tolist() == [schema.action_index("view"), schema.action_index("click")]


def test_corrupt_redis_contents_are_flagged_not_fatal(tiny_bundle, tiny_data, redis_server, loaded):
    mark_loaded(redis_server.url, "apitest")  # the served prefix is a loaded store: only corruption is flagged
    r = redis.Redis.from_url(redis_server.url)
    r.zadd(history_key("apitest", "corrupt-user"), {"no-pipes-here": 5, "7|click|e|i001": 7})
    r.hset(user_key("apitest", "corrupt-user"), "activity", "NaN")
    data = {"users": ["corrupt-user"], "items": json.loads((tiny_data / "vocab.json").read_text())["items"]}
    r.set(history_key("apitest", "wrong-type-user"), "a string where a sorted set belongs")
    healthy = pd.read_parquet(tiny_data / "users.parquet")["user_id"].astype(str).iloc[0]
    with serve(settings_for(tiny_bundle.parents[1], redis_server.url)) as c:
        out = c.post("/rerank", json=request(data)).json()
        batch = {"requests": [request(data, user="wrong-type-user"), request(data, user=healthy)]}
        wrong, fine = c.post("/rerank/batch", json=batch).json()["responses"]
    assert out["degraded_reasons"] == ["profile_corrupt"] and len(out["items"]) == 10
    assert wrong["degraded_reasons"] == ["profile_corrupt"] and fine["degraded_reasons"] == []


def test_reads_see_only_the_past_in_time_order(redis_server):
    async def run() -> list[RawProfile]:
        store = ProfileStore(connect(redis_server.url, 4, 1.0), "ordertest", ttl_s=0)
        late_first = [("u", f"i{ts}", "view", ts, None) for ts in (50, 10, 30, 40, 20)]
        await store.append(late_first, cap=100)
        out = await store.read(["u", "u"], [35.0, 1e9], max_history=2)
        await store.client.aclose()
        return out

    upto35, latest = asyncio.run(run())
    assert [m.split("|")[0] for m in upto35.history] == ["20", "30"]  # strictly before 35, the last 2
    assert [m.split("|")[0] for m in latest.history] == ["40", "50"]


@pytest.mark.parametrize("cap", [2000, 100])
def test_concurrent_appends_lose_nothing(redis_server, cap):
    async def run() -> list[str]:
        store = ProfileStore(connect(redis_server.url, 32, 5.0), f"concurrent{cap}", ttl_s=0)

        async def task(t: int) -> None:
            for k in range(50):
                ts = 1_000_000 + t * 50 + k
                await store.append([("u", f"i{ts}", "click", ts, None)], cap=cap)

        await asyncio.gather(*(task(t) for t in range(20)))
        members = await redis.asyncio.Redis.from_url(redis_server.url).zrange(
            history_key(f"concurrent{cap}", "u"), 0, -1
        )
        await store.client.aclose()
        return [m.decode() for m in members]

    members = asyncio.run(run())
    assert len(members) == min(cap, 1000)
    expected = [1_000_000 + k for k in range(1000)][-cap:]
    assert [int(m.split("|")[0]) for m in members] == expected


def test_concurrent_http_event_batches_lose_nothing(tiny_bundle, redis_server):
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, history_len=2000)
    with serve(settings) as c:

        def send(t: int) -> int:
            events = [
                {"user_id": "http-user", "item_id": f"i{t}-{k}", "action": "view", "timestamp": 10_000 + t * 50 + k}
                for k in range(50)
            ]
            return c.post("/events", json={"events": events}).status_code

        with ThreadPoolExecutor(20) as pool:
            assert set(pool.map(send, range(20))) == {200}
    assert redis.Redis.from_url(redis_server.url).zcard(history_key("apitest", "http-user")) == 1000


def test_resp_client_multiplexes_survives_timeouts_and_selects_the_db(redis_server):
    from redis.exceptions import ResponseError

    from service.resp import RespClient

    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    plain = redis.Redis.from_url(url)
    plain.set("resp:a", "x\xff".encode("latin-1"))  # not UTF-8: decoded with U+FFFD, not an error
    plain.rpush("resp:l", *[f"v{k}" for k in range(5)])

    async def run() -> None:
        client = RespClient(url, connect_timeout_s=2.0, stale_s=5.0)
        await client.connect()
        assert await client.execute([("GET", "resp:a"), ("LRANGE", "resp:l", 0, -1)]) == [
            "x\ufffd",
            ["v0", "v1", "v2", "v3", "v4"],
        ]
        # Concurrent callers on the one connection each get their own replies.
        answers = await asyncio.gather(*(client.execute([("LINDEX", "resp:l", k)]) for k in range(5)))
        assert answers == [[f"v{k}"] for k in range(5)]
        # A caller that gives up leaves the stream in step: the next caller reads its own reply.
        plain.execute_command("CLIENT", "PAUSE", 300)
        with pytest.raises(asyncio.TimeoutError):
            await client.execute([("GET", "resp:a")], timeout_s=0.05)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.execute([("GET", "resp:a")]), 0.05)
        assert await client.execute([("LINDEX", "resp:l", 4)]) == ["v4"]
        with pytest.raises(ResponseError):
            await client.execute([("LINDEX", "resp:a", 0)])  # WRONGTYPE
        assert await client.execute([("LINDEX", "resp:l", 0)]) == ["v0"]
        client.close()

    asyncio.run(run())


def test_profile_reads_agree_through_both_clients(tiny_data, redis_server, loaded):
    from service.resp import RespClient

    users = pd.read_parquet(tiny_data / "users.parquet")["user_id"].astype(str).tolist()[:5] + ["nobody"]

    async def run() -> tuple[list[RawProfile], list[RawProfile]]:
        client = connect(redis_server.url, 4, 1.0)
        plain = ProfileStore(client, "proftest", ttl_s=0)
        fast = ProfileStore(client, "proftest", ttl_s=0, reader=RespClient(redis_server.url))
        now = [1e10] * len(users)
        out = await plain.read(users, now, 7), await fast.read(users, now, 7)
        await fast.aclose()
        return out

    plain, fast = asyncio.run(run())
    assert plain == fast and plain[-1] == RawProfile()
    assert all(0 < len(p.history) <= 7 and p.user for p in plain[:-1])


def test_the_resp_reader_returns_what_the_reference_reader_returns(tiny_data, redis_server, loaded):
    """RespClient against the reference ProfileReader (redis-py) on the same store: loaded users, a
    user with features and an empty history, one whose only behaviour is not yet in the past, a
    missing user, bytes that are not UTF-8, and a key of the wrong type (an error from both)."""
    from service.resp import RespClient

    r = redis.Redis.from_url(redis_server.url)
    r.hset(user_key("proftest", "no-history"), mapping={"activity": "0.5", "city": b"x\xff"})
    r.zadd(history_key("proftest", "later-only"), {member(2_000_000_000, "click", "e1", "a|b\u00e9"): 2e9})
    r.set(history_key("proftest", "wrong-type"), "a string where a sorted set belongs")
    users = pd.read_parquet(tiny_data / "users.parquet")["user_id"].astype(str).tolist()[:5]
    users += ["no-history", "later-only", "nobody", "wrong-type"]

    async def run() -> list[list[RawProfile]]:
        client = connect(redis_server.url, 4, 1.0)
        readers = [RedisPyReader(client), RespClient(redis_server.url)]
        now = [1.9e9] * len(users)
        out = [
            await ProfileStore(client, "proftest", 0, reader).read(users, now, 7, timeout_s=5.0) for reader in readers
        ]
        for reader in readers:
            reader.close()
        await client.aclose()
        return out

    reference, resp = asyncio.run(run())
    assert resp == reference
    assert all(0 < len(p.history) <= 7 and p.user and p.error is None for p in reference[:5])
    assert reference[5] == RawProfile(user={"activity": "0.5", "city": "x\ufffd"})
    assert reference[6] == reference[7] == RawProfile()
    assert "WRONGTYPE" in (reference[8].error or "")
