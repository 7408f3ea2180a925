"""service.resp_cluster.ClusterReader on a real three-node Redis Cluster: the same profiles as
redis-py's reader, redirections after a slot migration followed, a stopped node's users failed in
place and read again once it is back, the budget kept when a node stalls, TLS to every node; and
`python -m loadtest.resp_bench --mode cluster` on a small cluster of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import typer
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from typer.testing import CliRunner

from psad.procs import LocalCluster, tls_files
from service.profiles import ProfileStore, RawProfile, connect, history_key, member, user_key
from service.resp_cluster import ClusterReader
from tests import test_service_cluster

T = TypeVar("T")
NODES = test_service_cluster.NODES
cluster = test_service_cluster.cluster  # its module fixture: this module gets a cluster of its own
NOW = [1e10]


def load(url: str, prefix: str, users: list[str]) -> None:
    """Each user: two features and three behaviours, written through redis-py's cluster client."""
    client = RedisCluster.from_url(url)
    for k, uid in enumerate(users):
        client.hset(user_key(prefix, uid), mapping={"age": str(20 + k), "country": "de"})
        client.zadd(
            history_key(prefix, uid), {member(100 + j, "click", f"e{j}", f"item-{k}-{j}"): 100 + j for j in range(3)}
        )
    client.close()


def port_of(url: str, key: str) -> int:
    client = RedisCluster.from_url(url)
    try:
        return int(client.get_node_from_key(key).port)
    finally:
        client.close()


def node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)


async def with_stores(url: str, prefix: str, use: Callable[[ProfileStore, ProfileStore], Awaitable[T]]) -> T:
    """`use(fast, reference)`: a store reading through ClusterReader and one through RedisPyReader,
    over one RedisCluster client, as the service builds them."""
    client = connect(url, 8, 2.0, cluster=True)
    fast = ProfileStore(client, prefix, 0, ClusterReader(client, url, connect_timeout_s=1.0, stale_s=1.0))
    try:
        return await use(fast, ProfileStore(client, prefix, 0))
    finally:
        await fast.aclose()


def expected(users: list[str]) -> list[RawProfile]:
    return [
        RawProfile(
            {"age": str(20 + k), "country": "de"},
            [member(100 + j, "click", f"e{j}", f"item-{k}-{j}") for j in range(3)],
        )
        for k in range(len(users))
    ]


def test_a_batch_over_every_node_reads_what_redis_py_reads(cluster):
    users = [f"user-{k}" for k in range(40)]
    load(cluster.url, "same", users)
    wrong = node(port_of(cluster.url, user_key("same", "wrong-type")))
    wrong.set(user_key("same", "wrong-type"), "not a hash")  # HGETALL answers WRONGTYPE: an error in place
    batch = [*users[:20], "wrong-type", "never-seen", *users[20:]]
    assert len({port_of(cluster.url, history_key("same", u)) for u in users}) == NODES

    async def both(fast: ProfileStore, reference: ProfileStore) -> tuple[list[RawProfile], list[RawProfile]]:
        at = NOW * len(batch)
        return await fast.read(batch, at, 10, timeout_s=2.0), await reference.read(batch, at, 10, timeout_s=2.0)

    got, ref = asyncio.run(with_stores(cluster.url, "same", both))
    assert (
        [p.error is not None for p in got] == [p.error is not None for p in ref] == [u == "wrong-type" for u in batch]
    )
    assert "WRONGTYPE" in str(got[20].error)
    assert [p for p in got if p.error is None] == [p for p in ref if p.error is None]
    assert got[:20] + got[22:] == expected(users) and got[21] == RawProfile()


def migrate(cluster: LocalCluster, slot: int, src: int, dst: int, finish: bool) -> None:
    """Move every key of `slot` from port `src` to port `dst` (CLUSTER SETSLOT + MIGRATE, as
    redis-cli --cluster reshard does); with `finish`, hand the slot to `dst` on every node."""
    source, target = node(src), node(dst)
    src_id, dst_id = source.execute_command("CLUSTER", "MYID"), target.execute_command("CLUSTER", "MYID")
    if not finish:
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        source.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
        return
    for port in [dst, src, *(p for p in cluster.ports if p not in (src, dst))]:
        node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    cluster.wait_ok()


def test_a_slot_migration_is_followed_through_ask_and_moved(cluster):
    users = [f"mover-{k}" for k in range(12)]
    load(cluster.url, "moved", users)
    mover = users[0]
    slot = key_slot(history_key("moved", mover).encode())
    src = port_of(cluster.url, history_key("moved", mover))
    dst = next(p for p in cluster.ports if p != src)

    async def run(fast: ProfileStore, _: ProfileStore) -> list[list[RawProfile]]:
        reader = fast.reader
        assert isinstance(reader, ClusterReader)
        reads = [await fast.read(users, NOW * len(users), 10, timeout_s=2.0)]  # the topology is cached now
        migrate(cluster, slot, src, dst, finish=False)  # keys on dst, slot still src's: src answers ASK
        reads.append(await fast.read(users, NOW * len(users), 10, timeout_s=2.0))
        migrate(cluster, slot, src, dst, finish=True)  # the slot is dst's: src answers MOVED
        reads.append(await fast.read(users, NOW * len(users), 10, timeout_s=2.0))
        deadline = time.monotonic() + 10
        while reader.nodes.get_node_from_slot(slot).port != dst and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the refresh the MOVED started
        assert reader.nodes.get_node_from_slot(slot).port == dst
        reads.append(await fast.read(users, NOW * len(users), 10, timeout_s=2.0))
        return reads

    for read in asyncio.run(with_stores(cluster.url, "moved", run)):
        assert read == expected(users)


def test_a_stopped_node_fails_its_users_in_place_and_is_read_again_once_back(cluster):
    users = [f"outage-{k}" for k in range(30)]
    load(cluster.url, "outage", users)
    down = cluster.ports[1]
    on_down = [port_of(cluster.url, history_key("outage", u)) == down for u in users]
    assert any(on_down) and not all(on_down)

    async def run(fast: ProfileStore, _: ProfileStore) -> tuple[list[RawProfile], list[RawProfile]]:
        reader = fast.reader
        at = NOW * len(users)
        assert await fast.read(users, at, 10, timeout_s=2.0) == expected(users)  # connected to every node
        cluster.stop_node(1)
        during = await fast.read(users, at, 10, timeout_s=2.0)
        with pytest.raises(RedisConnectionError):
            await reader.execute(fast.read_commands(users, at, 10), timeout_s=2.0)
        cluster.start_node(1)  # back without its data (no persistence): write it again
        load(cluster.url, "outage", users)
        return during, await fast.read(users, at, 10, timeout_s=2.0)

    during, after = asyncio.run(with_stores(cluster.url, "outage", run))
    for d, profile, want in zip(on_down, during, expected(users), strict=True):
        if d:
            assert profile is None  # a failed read (the service says redis_unavailable), not a bad profile
        else:
            assert profile == want
    assert after == expected(users)


def test_a_stalled_node_times_the_read_out_within_its_budget(cluster):
    users = [f"stall-{k}" for k in range(30)]
    load(cluster.url, "stall", users)

    async def run(fast: ProfileStore, _: ProfileStore) -> list[RawProfile]:
        at = NOW * len(users)
        await fast.read(users, at, 10, timeout_s=2.0)
        node(cluster.ports[2]).execute_command("CLIENT", "PAUSE", 1500, "ALL")  # answers nothing for 1.5 s
        with pytest.raises(TimeoutError):
            await fast.read(users, at, 10, timeout_s=0.2)
        await asyncio.sleep(1.5)
        return await fast.read(users, at, 10, timeout_s=2.0)  # the late replies were dropped, not misread

    assert asyncio.run(with_stores(cluster.url, "stall", run)) == expected(users)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("tls-cluster")
    c = LocalCluster(workdir, NODES, tls_files(workdir / "tls"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_over_tls_every_node_is_read_through_the_urls_ssl_context(tls_cluster):
    users = [f"tls-{k}" for k in range(30)]
    load(tls_cluster.url, "tls", users)

    async def both(fast: ProfileStore, reference: ProfileStore) -> tuple[list[RawProfile], list[RawProfile], dict]:
        at = NOW * len(users)
        got, ref = await fast.read(users, at, 10, timeout_s=2.0), await reference.read(users, at, 10, timeout_s=2.0)
        reader = fast.reader
        assert isinstance(reader, ClusterReader)
        return got, ref, {int(name.rpartition(":")[2]): c.ssl is not None for name, c in reader.clients.items()}

    got, ref, tls = asyncio.run(with_stores(tls_cluster.url, "tls", both))
    assert got == ref == expected(users)
    assert tls == dict.fromkeys(tls_cluster.tls_ports, True)  # a TLS connection per node, on the ports announced


def test_the_cluster_benchmark_starts_its_cluster_and_prints_both_readers(tmp_path: Path):
    from loadtest.resp_bench import main

    app = typer.Typer()
    app.command()(main)
    args = ["--mode", "cluster", "--profiles", "30", "--history", "5", "--batch", "8", "--reads", "100"]
    result = CliRunner().invoke(app, [*args, "--warmup", "0", "--var", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| ClusterReader (service/resp_cluster.py) | 100 |" in result.output
    assert "| redis-py (RedisPyReader over RedisCluster) | 100 |" in result.output
    assert "| ratio redis-py / ClusterReader | |" in result.output
    logs = list((tmp_path / "cluster").glob("*/redis.log"))
    assert len(logs) == NODES and all("ready to exit" in log.read_text() for log in logs)  # and stopped them
