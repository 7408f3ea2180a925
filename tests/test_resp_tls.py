"""RespClient over TLS against a real redis-server started with a TLS port: the same profiles as
redis-py from one rediss:// URL, a clear connect error when the CA is wrong, and the service
end to end on a rediss:// URL (profiles bulk-loaded over TLS, /rerank reading them through
RespClient, /events appending)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from psad.procs import free_port, start_redis, stop_tree, tls_args, tls_files
from service.app import create_app
from service.profiles import ProfileStore, RedisPyReader, connect, history_key
from service.resp import RespClient
from tests.test_service_api import PREFIX, loaded_data, request, serve, settings_for


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, Path]]]:
    work = tmp_path_factory.mktemp("redis-tls")
    files = tls_files(work / "tls")
    tls_port = free_port()
    proc = start_redis(free_port(), work / "redis", tls_args(tls_port, files))
    yield tls_port, files
    stop_tree(proc)


def tls_url(tls_server: tuple[int, dict[str, Path]]) -> str:
    port, files = tls_server
    return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={files['ca']}"


def test_resp_client_matches_redis_py_over_tls(tls_server: tuple[int, dict[str, Path]]) -> None:
    url = tls_url(tls_server)
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


def test_the_service_reads_and_appends_profiles_over_tls(
    tls_server: tuple[int, dict[str, Path]], tiny_data: Path, tiny_bundle: Path
) -> None:
    """Only the TLS port is named: profiles loaded, read by /rerank (through RespClient, the fast
    path) and appended by /events all go over TLS."""
    url = tls_url(tls_server)
    data = loaded_data(tiny_data, url)  # bulk_load over TLS, the load marker included
    app = create_app(settings_for(tiny_bundle.parents[1], url))
    with serve(app.state.settings, app) as client:
        assert isinstance(app.state.service.profiles.reader, RespClient)
        known = client.post("/rerank", json=request(data)).json()
        cold = client.post("/rerank", json=request(data, user="tls-new-user")).json()
        for answer in (known, cold):
            assert answer["degraded"] is False and answer["degraded_reasons"] == []
        assert [i["score"] for i in known["items"]] != [i["score"] for i in cold["items"]]  # the profile was read

        items = data["items"][:3]
        events = [
            {"user_id": "tls-new-user", "item_id": item, "action": "click", "timestamp": 100 + k, "event_id": f"t{k}"}
            for k, item in enumerate(items)
        ]
        assert client.post("/events", json={"events": events}).json() == {"accepted": 3}
        warm = client.post("/rerank", json=request(data, user="tls-new-user")).json()
        assert warm["degraded"] is False
        assert [i["score"] for i in warm["items"]] != [i["score"] for i in cold["items"]]  # the appended history
    reader = redis.Redis.from_url(url)
    try:
        stored = [m.decode() for m in reader.zrange(history_key(PREFIX, "tls-new-user"), 0, -1)]
    finally:
        reader.close()
    assert [m.split("|", 3)[3] for m in stored] == items  # timestamp|action|event_id|item_id
