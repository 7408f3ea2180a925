"""What the profile store survives: acknowledged /events writes through a restart and a crash of a
persistent Redis, and an emptied store (a restart without persistence) flagged until it is loaded."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pandas as pd
import pytest
import redis

from service.profiles import ProfileStore, connect, history_key, marker_key
from tests.conftest import RedisServer
from tests.test_service_api import PREFIX, metric_samples, request, serve, settings_for
from tests.test_service_cli import psad_profiles

AOF = ("--appendonly", "yes", "--appendfsync", "everysec")  # Redis's default fsync policy, said explicitly
INTERVAL_S = 0.2  # PSAD_REDIS_HEALTH_INTERVAL_S of these tests
MISSING = ("psad_degraded_total", (("reason", "profiles_missing"),))


@pytest.fixture
def data(tiny_data: Path) -> dict:
    return {
        "users": pd.read_parquet(tiny_data / "users.parquet")["user_id"].astype(str).tolist(),
        "items": json.loads((tiny_data / "vocab.json").read_text())["items"],
    }


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """`psad profiles ...` writes its overrides to PSAD_* variables: restore them afterwards (setenv
    first, so that a variable that was not set is removed again, not left behind)."""
    monkeypatch.setenv("PSAD_REDIS_URL", "unset")
    monkeypatch.delenv("PSAD_REDIS_URL")
    monkeypatch.setenv("PSAD_KEY_PREFIX", PREFIX)
    return monkeypatch


def restart(server: RedisServer, crash: bool = False) -> None:
    """Stop redis-server (SIGTERM: a clean shutdown; crash: SIGKILL, nothing flushed) and start it
    again on the same port and directory."""
    if crash:
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        server.proc = None
    else:
        server.stop()
    server.start()


def first(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.02)


def reasons(c: httpx.Client, data: dict, user: str | None = None) -> list[str]:
    r = c.post("/rerank", json=request(data, user=user))
    assert r.status_code == 200, r.text
    return r.json()["degraded_reasons"]


# Durability -------------------------------------------------------------------------------------


def send_events(c: httpx.Client, users: list[str], per_user: int, tag: str) -> set[tuple[str, str]]:
    """per_user events for each user through POST /events, one per call; each must be acknowledged.
    Returns the (user, event id) pairs acknowledged."""
    acked = set()
    for k in range(per_user):
        for u in users:
            event_id = f"{tag}-{k}"
            event = {"user_id": u, "item_id": f"i{k}", "action": "click", "timestamp": 1_000 + k, "event_id": event_id}
            r = c.post("/events", json=event)
            assert r.status_code == 200, r.text
            acked.add((u, event_id))
    return acked


def stored_events(url: str, users: list[str]) -> set[tuple[str, str]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    return {(u, m.split("|")[2]) for u in users for m in client.zrange(history_key(PREFIX, u), 0, -1)}


def reachable_again(c: httpx.Client) -> bool:
    return c.get("/readyz").json()["redis"] == "ok"


def test_acknowledged_events_survive_a_restart_and_a_crash_of_a_persistent_redis(tiny_bundle, tmp_path):
    """appendonly yes + appendfsync everysec: every event /events answered 200 for is still there
    after a clean restart (SIGTERM) and after the redis-server process is killed (SIGKILL)."""
    server = RedisServer(tmp_path, args=AOF)
    server.start()
    users = [f"durable-{k}" for k in range(20)]
    settings = settings_for(tiny_bundle.parents[1], server.url, history_len=100, redis_health_interval_s=INTERVAL_S)
    try:
        config = redis.Redis.from_url(server.url, decode_responses=True).config_get("append*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        with serve(settings) as c:
            acked = send_events(c, users, per_user=15, tag="before-restart")  # 300 events
            restart(server)
            first(lambda: reachable_again(c), "Redis reachable after the restart")
            assert stored_events(server.url, users) == acked

            acked |= send_events(c, users, per_user=15, tag="before-crash")
            restart(server, crash=True)  # at once: the last events were acknowledged microseconds ago
            first(lambda: reachable_again(c), "Redis reachable after the crash")
            assert stored_events(server.url, users) == acked
            assert len(acked) == 600
    finally:
        server.stop()


# The load marker --------------------------------------------------------------------------------


def test_a_store_emptied_by_a_restart_is_flagged_until_profiles_are_loaded_again(
    tiny_bundle, tiny_data, tmp_path, data, cli_env
):
    server = RedisServer(tmp_path)  # no persistence: a restart empties it
    server.start()
    settings = settings_for(tiny_bundle.parents[1], server.url, redis_health_interval_s=INTERVAL_S)
    try:
        result = psad_profiles("load", "--data", str(tiny_data), "--redis-url", server.url)
        assert result.exit_code == 0, result.output
        marker = json.loads(redis.Redis.from_url(server.url).get(marker_key(PREFIX)))
        assert marker["users"] == len(data["users"]) and marker["behaviours"] > 0 and marker["generation"]
        assert redis.Redis.from_url(server.url).ttl(marker_key(PREFIX)) == -1  # never expires
        with serve(settings) as c:
            assert reasons(c, data) == []
            ready = c.get("/readyz").json()
            assert ready["profiles"] == "loaded" and metric_samples(c)[("psad_profiles_missing", ())] == 0

            restart(server)  # Redis comes back empty
            first(lambda: reasons(c, data) == ["profiles_missing"], "the health watch flagging the empty store")
            before = metric_samples(c).get(MISSING, 0.0)
            assert [reasons(c, data, user=u) for u in data["users"][:5]] == [["profiles_missing"]] * 5
            assert metric_samples(c)[MISSING] == before + 5  # counted like every other reason
            ready = c.get("/readyz")
            assert ready.status_code == 200  # still ready: it answers, flagged; the gauge and its alert say why
            assert ready.json()["redis"] == "ok" and ready.json()["profiles"] == "missing"
            assert metric_samples(c)[("psad_profiles_missing", ())] == 1

            result = psad_profiles("load", "--data", str(tiny_data), "--redis-url", server.url)
            assert result.exit_code == 0, result.output
            loaded_at = time.monotonic()
            first(lambda: reasons(c, data) == [], "the flag clearing after the reload")
            assert time.monotonic() - loaded_at < 10 * INTERVAL_S + 2  # one interval, with room for a slow machine
            assert c.get("/readyz").json()["profiles"] == "loaded"
            assert metric_samples(c)[("psad_profiles_missing", ())] == 0
    finally:
        server.stop()


def test_a_fresh_service_flags_an_unmarked_store_from_its_first_answer_until_it_is_marked(
    tiny_bundle, tmp_path, data, cli_env
):
    """A store fed only by /events holds profiles but no marker until `psad profiles mark` runs."""
    import asyncio

    server = RedisServer(tmp_path)
    server.start()
    user = data["users"][0]

    async def append() -> None:
        store = ProfileStore(connect(server.url, 2, 1.0), PREFIX, ttl_s=0)
        await store.append([(user, data["items"][k], "click", 100 + k, f"e{k}") for k in range(5)], cap=20)
        await store.aclose()

    try:
        asyncio.run(append())
        with serve(settings_for(tiny_bundle.parents[1], server.url, redis_health_interval_s=INTERVAL_S)) as c:
            assert reasons(c, data, user=user) == ["profiles_missing"]  # the very first answer
            assert c.get("/readyz").json()["profiles"] == "missing"
            result = psad_profiles("mark", "--redis-url", server.url)
            assert result.exit_code == 0, result.output
            assert f"{PREFIX}:profiles" in result.output
            first(lambda: reasons(c, data, user=user) == [], "the flag clearing once the store is marked")
            assert c.get("/readyz").json()["profiles"] == "loaded"
        assert json.loads(redis.Redis.from_url(server.url).get(marker_key(PREFIX)))["source"] == "psad profiles mark"
    finally:
        server.stop()


def test_an_unreachable_redis_keeps_its_own_reason_and_the_marker_state_is_unknown(tiny_bundle, tmp_path, data):
    server = RedisServer(tmp_path)
    server.start()
    try:
        with serve(settings_for(tiny_bundle.parents[1], server.url, redis_health_interval_s=INTERVAL_S)) as c:
            assert reasons(c, data) == ["profiles_missing"]
            server.stop()
            assert reasons(c, data) == ["redis_unavailable"]  # not profiles_missing: the read failed
            ready = c.get("/readyz").json()
            assert ready["redis"] == "unreachable" and ready["profiles"] == "unknown"
            assert metric_samples(c)[("psad_profiles_missing", ())] == 0  # PsadRedisDown pages, not this one
    finally:
        server.stop()
