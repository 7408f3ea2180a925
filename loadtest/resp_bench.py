"""`python -m loadtest.resp_bench`: the request path's profile read through service/resp.py's
RespClient and through redis-py (RedisPyReader, the reference reader), against one private
redis-server; with `--mode cluster`, through service/resp_cluster.py's ClusterReader and through
redis-py's RedisCluster, against a private three-node Redis Cluster.

The fast readers exist only because they make the one Redis call of every request cheaper; this
says by how much on the machine at hand. Both readers sit inside the same ProfileStore (same
commands, same decoding into RawProfile), on connections made with the service's default
settings, so the difference is the client. Each iteration reads `--batch` users (a micro-batch:
on a cluster, spread over the nodes) through both, in an order that flips every iteration, so
both see the same machine state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import numpy as np
import redis
import redis.cluster
import typer
from redis.asyncio.cluster import RedisCluster

from export.contract.errors import reported
from loadtest.service_bench.client import run_async
from loadtest.service_bench.report import cpu_model
from psad.procs import LocalCluster, free_port, start_redis, stop_tree, tls_args, tls_files
from service.profiles import ProfileReader, ProfileStore, RedisPyReader, connect, history_key, member, user_key
from service.resp import RespClient
from service.resp_cluster import ClusterReader
from service.settings import Settings


class Mode(StrEnum):
    single = "single"
    cluster = "cluster"


PREFIX = "respbench"
# Per mode: the fast reader's row, the reference's row, the ratio's row.
NAMES = {
    Mode.single: ("RespClient (service/resp.py)", "redis-py (RedisPyReader)", "ratio redis-py / RespClient"),
    Mode.cluster: (
        "ClusterReader (service/resp_cluster.py)",
        "redis-py (RedisPyReader over RedisCluster)",
        "ratio redis-py / ClusterReader",
    ),
}
CLUSTER_NODES = 3
READ_TIMEOUT_S = 1.0  # a timer per read as on the request path, long enough never to fire
FEATURES = {"age": "31", "country": "de", "activity": "0.42", "device": "mobile"}
START_TS = 1_600_000_000


def load(url: str, profiles: int, history: int, mode: Mode) -> tuple[list[str], str]:
    """`profiles` users, each with FEATURES and `history` behaviours in the service's key layout;
    returns them and the server's version."""
    client = redis.cluster.RedisCluster.from_url(url) if mode is Mode.cluster else redis.Redis.from_url(url)
    users = [f"user-{k}" for k in range(profiles)]
    pipe = client.pipeline(transaction=False)
    for k, uid in enumerate(users):
        pipe.hset(user_key(PREFIX, uid), mapping=FEATURES)  # type: ignore[arg-type]  # redis-py types the keys invariantly: str is valid
        behaviours = {member(START_TS + j, "click", f"e{j}", f"item-{j}"): START_TS + j for j in range(history)}
        if behaviours:
            pipe.zadd(history_key(PREFIX, uid), behaviours)
        if k % 200 == 199:
            pipe.execute()
    pipe.execute()
    version = str(redis.Redis.from_url(url).info("server")["redis_version"])  # the URL's node: one answer
    client.close()
    return users, version


async def measure(
    url: str, mode: Mode, users: list[str], history: int, batch: int, reads: int, warmup: int
) -> tuple[dict[str, np.ndarray], str]:
    """Microseconds per read of `batch` users through each reader, `reads` each after `warmup`
    unrecorded iterations, and the event loop's module (uvloop or asyncio)."""
    settings = Settings()
    connect_s = settings.events_timeout_ms / 1000  # what the service's lifespan gives both clients
    client = connect(url, settings.redis_pool_size, connect_s, cluster=mode is Mode.cluster)
    fast: RespClient | ClusterReader
    if isinstance(client, RedisCluster):
        fast = ClusterReader(client, url, connect_timeout_s=connect_s, stale_s=connect_s)
    else:
        fast = RespClient(url, connect_timeout_s=connect_s, stale_s=connect_s)
    await fast.connect()
    readers: list[ProfileReader] = [fast, RedisPyReader(client)]
    stores = {name: ProfileStore(client, PREFIX, 0, r) for name, r in zip(NAMES[mode], readers, strict=False)}
    now = [float(START_TS + history + 1)]
    sample = users[:: max(1, len(users) // 50)]
    at = now * len(sample)
    first, second = stores.values()
    if await first.read(sample, at, history) != await second.read(sample, at, history):
        raise RuntimeError("the two readers returned different profiles: fix the reader before timing it")
    ns: dict[str, list[int]] = {name: [] for name in stores}
    order = list(stores.items())
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(users), size=(warmup + reads, batch))
    now = now * batch
    try:
        for i, ks in enumerate(picks):
            chosen = [users[k] for k in ks]
            for name, store in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter_ns()
                await store.read(chosen, now, history, READ_TIMEOUT_S)
                if i >= warmup:
                    ns[name].append(time.perf_counter_ns() - t0)
    finally:
        fast.close()
        await client.aclose()
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return {name: np.asarray(v, dtype=np.float64) / 1000 for name, v in ns.items()}, loop


def table(us: dict[str, np.ndarray], ratio: str) -> list[str]:
    """Rows of the fast reader (first in `us`), the reference (second), and reference / fast."""
    stats = {name: (v.mean(), np.percentile(v, 50), np.percentile(v, 99)) for name, v in us.items()}
    f, s = stats.values()
    return [
        "| client | reads | mean µs | p50 µs | p99 µs |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {len(us[name]):,} | {m:.1f} | {p50:.1f} | {p99:.1f} |" for name, (m, p50, p99) in stats.items()),
        f"| {ratio} | | {s[0] / f[0]:.2f}x | {s[1] / f[1]:.2f}x | {s[2] / f[2]:.2f}x |",
    ]


@contextlib.contextmanager
def private_redis(mode: Mode, tls: bool, var: Path) -> Iterator[str]:
    """A private redis-server (or a three-node cluster) for the run, stopped after; yields its URL."""
    files = tls_files(var / "tls") if tls else {}
    if mode is Mode.cluster:
        cluster = LocalCluster(var / "cluster", CLUSTER_NODES, files or None)
        try:
            cluster.start()
            yield cluster.url
        finally:
            cluster.stop()
        return
    port, tls_port = free_port(), free_port()
    proc = start_redis(port, var / "redis", tls_args(tls_port, files) if tls else ())
    try:
        yield f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={files['ca']}" if tls else f"redis://127.0.0.1:{port}/0"
    finally:
        stop_tree(proc)


def main(
    profiles: int = typer.Option(1000, min=1, max=1_000_000, help="Users stored, each read at random."),
    history: int = typer.Option(50, min=0, max=10_000, help="Behaviours per profile, all of them read."),
    batch: int = typer.Option(1, min=1, max=10_000, help="Users per read (a micro-batch), one round trip per node."),
    reads: int = typer.Option(20_000, min=100, max=10_000_000, help="Timed reads per client."),
    warmup: int = typer.Option(2_000, min=0, max=1_000_000, help="Untimed reads per client first."),
    var: Path = typer.Option(Path("var/resp-bench"), help="Work directory of the private redis-server(s)."),
    tls: bool = typer.Option(False, help="Read over TLS (rediss://, a private CA) instead of plain TCP."),
    mode: Mode = typer.Option(Mode.single, help="single: one redis-server; cluster: a three-node Redis Cluster."),
) -> None:
    """Mean, p50 and p99 of one profile read through the fast reader and through redis-py, and their ratio."""
    load_average = os.getloadavg()[0]
    fast, reference, ratio = NAMES[mode]
    with reported(redis.RedisError), private_redis(mode, tls, var) as url:
        users, version = load(url, profiles, history, mode)
        us, loop = run_async(measure(url, mode, users, history, batch, reads, warmup))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    where = f"a {CLUSTER_NODES}-node Redis Cluster" if mode is Mode.cluster else "one redis-server"
    lines = [
        f"# Profile read: {fast.split()[0]} vs redis-py",
        "",
        f"- {profiles:,} profiles of {history} behaviours and {len(FEATURES)} features; {warmup:,} untimed then "
        f"{reads:,} timed reads per client, alternating; {batch} user(s) per read (HGETALL + ZRANGE each, one "
        f"round trip per node) on loopback{' over TLS' if tls else ''}, {where}",
        f"- redis-server {version}; Python {platform.python_version()}, {loop}; {cpu_model()}, {cores} cores "
        f"usable, load average {load_average:.2f} at the start",
        "",
        *table(us, ratio),
    ]
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
