"""Redis Cluster (PSAD_REDIS_CLUSTER=true): profiles spread over three real cluster nodes, read and
appended through the cluster client, and the service serving from them end to end."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from psad.load_profiles import bulk_load
from psad.procs import port_free, start_redis, stop_tree
from service.profiles import ProfileStore, connect, history_key
from tests.test_service_api import request, serve, settings_for

NODES = 3


def cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free too (ephemeral ports are too high)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20_000, 30_000)
        if port not in ports and all(port_free(p) for p in (port, port + 10_000)):
            ports.append(port)
    return ports


class Cluster:
    """Three cluster-enabled redis-server processes joined into one cluster (no replicas)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.ports = cluster_ports(NODES)
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for port in self.ports:
            args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            self.procs.append(start_redis(port, self.workdir / str(port), args))
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60
        )
        for port in self.ports:
            self._wait(lambda p=port: b"cluster_state:ok" in redis.Redis(port=p).execute_command("CLUSTER", "INFO"))

    @staticmethod
    def _wait(ready, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError("redis cluster did not become ready")

    def stop(self) -> None:
        for proc in self.procs:
            stop_tree(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed: run `make setup` (apt-get install redis-server)")
    c = Cluster(tmp_path_factory.mktemp("cluster"))
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
    import json

    import pandas as pd

    data = {
        "users": pd.read_parquet(tiny_data / "users.parquet")["user_id"].tolist(),
        "items": json.loads((tiny_data / "vocab.json").read_text())["items"],
    }
    with serve(settings_for(tiny_bundle.parents[1], cluster.url, redis_cluster=True)) as c:
        assert c.get("/readyz").json()["redis"] == "ok"
        answers = [c.post("/rerank", json=request(data, user=u)).json() for u in data["users"][:10]]
        assert all(a["degraded"] is False for a in answers)
        cold = c.post("/rerank", json=request(data, user="never-seen-user")).json()
        assert any([i["score"] for i in a["items"]] != [i["score"] for i in cold["items"]] for a in answers)
        event = {"user_id": "cluster-user", "item_id": data["items"][0], "action": "click", "event_id": "c1"}
        assert c.post("/events", json=event).json() == {"accepted": 1}
    client = RedisCluster.from_url(cluster.url)
    assert client.zcard(history_key("apitest", "cluster-user")) == 1
    client.close()
