"""Redis Cluster (PSAD_REDIS_CLUSTER=true): profiles spread over three real cluster nodes, read and
appended through the cluster client, and the service serving from them end to end."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator

import pandas as pd
import pytest
from redis.cluster import RedisCluster

from psad.load_profiles import bulk_load
from psad.procs import LocalCluster
from service.app import create_app
from service.profiles import ProfileStore, connect, history_key
from service.resp_cluster import ClusterReader
from tests.test_service_api import request, serve, settings_for

NODES = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed: run `make setup` (apt-get install redis-server)")
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), NODES)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_profiles_on_a_cluster_are_appended_and_read_per_user(cluster):
    users = [f"user-{k}" for k in range(30)]  # spread over the three nodes' slots

    async def run():
        store = ProfileStore(connect(cluster.url, 8, 2.0, cluster=True), "clustertest", ttl_s=0)
        events = [(u, f"i{k}", "click", 100 + k, f"e{k}") for u in users for k in range(3)]
        await store.append(events, cap=2)
        await store.append(events[:3], cap=2)  # a retry: same event ids, stored once
        out = await store.read(users, [1e9] * len(users), max_history=5)
        await store.aclose()
        return out

    profiles = asyncio.run(run())
    assert [[m.split("|")[0] for m in p.history] for p in profiles] == [["101", "102"]] * len(users)
    client = RedisCluster.from_url(cluster.url)
    slots = {client.keyslot(history_key("clustertest", u)) for u in users}
    nodes = {client.get_node_from_key(history_key("clustertest", u)).port for u in users}
    assert len(nodes) == NODES and len(slots) > 1
    client.close()


def test_the_service_serves_profiles_from_a_cluster(tiny_bundle, tiny_data, cluster):
    bulk_load(cluster.url, tiny_data, prefix="apitest", ttl_s=0, progress=False, cluster=True)
    data = {
        "users": pd.read_parquet(tiny_data / "users.parquet")["user_id"].tolist(),
        "items": json.loads((tiny_data / "vocab.json").read_text())["items"],
    }
    app = create_app(settings_for(tiny_bundle.parents[1], cluster.url, redis_cluster=True))
    with serve(app.state.settings, app) as c:
        assert c.get("/readyz").json()["redis"] == "ok"
        assert isinstance(app.state.service.profiles.reader, ClusterReader)  # the fast read, not redis-py's
        answers = [c.post("/rerank", json=request(data, user=u)).json() for u in data["users"][:10]]
        assert all(a["degraded"] is False for a in answers)
        cold = c.post("/rerank", json=request(data, user="never-seen-user")).json()
        assert any([i["score"] for i in a["items"]] != [i["score"] for i in cold["items"]] for a in answers)
        event = {"user_id": "cluster-user", "item_id": data["items"][0], "action": "click", "event_id": "c1"}
        assert c.post("/events", json=event).json() == {"accepted": 1}
    client = RedisCluster.from_url(cluster.url)
    assert client.zcard(history_key("apitest", "cluster-user")) == 1
    client.close()


def test_a_node_down_degrades_only_its_users_answers_and_they_recover(tiny_bundle, tiny_data, cluster):
    """Users whose slots live on a stopped node get cold-start answers flagged redis_unavailable
    (not profile_corrupt); the others are served as usual; once the node is back, all are."""
    bulk_load(cluster.url, tiny_data, prefix="apitest", ttl_s=0, progress=False, cluster=True)
    data = {
        "users": pd.read_parquet(tiny_data / "users.parquet")["user_id"].tolist(),
        "items": json.loads((tiny_data / "vocab.json").read_text())["items"],
    }
    client = RedisCluster.from_url(cluster.url)
    down = cluster.ports[2]
    on_down = {u: client.get_node_from_key(history_key("apitest", u)).port == down for u in data["users"]}
    client.close()
    assert any(on_down.values()) and not all(on_down.values())
    settings = settings_for(tiny_bundle.parents[1], cluster.url, redis_cluster=True)
    with serve(settings) as c:
        cluster.stop_node(2)
        try:
            answers = {u: c.post("/rerank", json=request(data, user=u)).json() for u in data["users"]}
        finally:
            cluster.start_node(2)
        for user, answer in answers.items():
            want = ["redis_unavailable"] if on_down[user] else []
            assert answer["degraded_reasons"] == want, (user, answer)
        bulk_load(cluster.url, tiny_data, prefix="apitest", ttl_s=0, progress=False, cluster=True)  # it restarted empty
        again = [c.post("/rerank", json=request(data, user=u)).json() for u, d in on_down.items() if d]
        assert all(a["degraded"] is False for a in again)
