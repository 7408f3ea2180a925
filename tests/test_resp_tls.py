"""RespClient over TLS against a real redis-server started with a TLS port: the same profiles as
redis-py from one rediss:// URL, and a clear connect error when the CA is wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from psad.procs import free_port, start_redis, stop_tree, tls_args, tls_files
from service.profiles import ProfileStore, RedisPyReader, connect
from service.resp import RespClient


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, Path]]]:
    work = tmp_path_factory.mktemp("redis-tls")
    files = tls_files(work / "tls")
    tls_port = free_port()
    proc = start_redis(free_port(), work / "redis", tls_args(tls_port, files))
    yield tls_port, files
    stop_tree(proc)


def test_resp_client_matches_redis_py_over_tls(tls_server: tuple[int, dict[str, Path]]) -> None:
    port, files = tls_server
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={files['ca']}"
    assert RespClient.supports(url)

    async def run() -> None:
        client = connect(url, 4, 1.0)
        resp = RespClient(url)
        users = [f"u{k}" for k in range(20)]
        fast, ref = ProfileStore(client, "tls", 3600, resp), ProfileStore(client, "tls", 3600, RedisPyReader(client))
        await fast.append([(uid, f"i{k}", "click", 1000 + k, None) for k, uid in enumerate(users)], 10)
        now = [2000.0] * len(users)
        try:
            assert await fast.read(users, now, 10) == await ref.read(users, now, 10)
        finally:
            resp.close()
            await client.aclose()

    asyncio.run(run())


def test_wrong_ca_fails_at_connect_with_a_clear_error(tls_server: tuple[int, dict[str, Path]]) -> None:
    port, _ = tls_server
    resp = RespClient(f"rediss://127.0.0.1:{port}/0")  # the system CAs do not know the test CA
    with pytest.raises(
        RedisConnectionError, match=r"cannot connect to Redis at 127\.0\.0\.1:\d+: .*CERTIFICATE_VERIFY"
    ):
        asyncio.run(resp.connect())
