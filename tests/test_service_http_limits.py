"""Connection limits (service.http) over real HTTP: an oversized request head is answered 431 as
it arrives; silent, half-sent heads and bodies and idle keep-alive connections are closed after
their timeouts; many slow sockets do not stop /rerank. Hostile clients are raw sockets."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest

from psad.load_profiles import bulk_load
from tests.test_service_api import PREFIX, request, serve, settings_for

TIMEOUTS = {"header_timeout_s": 1, "body_timeout_s": 1, "keepalive_timeout_s": 1}  # test-short
HEAD = b"POST /rerank HTTP/1.1\r\nHost: psad\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def data(tiny_data: Path, redis_server) -> dict:
    bulk_load(redis_server.url, tiny_data, prefix=PREFIX, ttl_s=0, progress=False)
    return {
        "users": pd.read_parquet(tiny_data / "users.parquet")["user_id"].tolist(),
        "items": json.loads((tiny_data / "vocab.json").read_text())["items"],
    }


@pytest.fixture(scope="module")
def client(tiny_bundle: Path, redis_server, data) -> Iterator[httpx.Client]:
    with serve(settings_for(tiny_bundle.parents[1], redis_server.url, **TIMEOUTS)) as c:
        yield c


def connect(client: httpx.Client) -> socket.socket:
    return socket.create_connection(("127.0.0.1", client.base_url.port), timeout=10)


def read_until_closed(sock: socket.socket, within_s: float = 15.0) -> bytes:
    """All the server sends until it closes the connection; fails if it is still open after within_s."""
    deadline = time.monotonic() + within_s
    chunks = []
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server kept the connection open for {within_s} s; it sent {b''.join(chunks)[:200]!r}")
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def status_and_detail(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close" in head.lower(), head
    return int(head.split()[1]), json.loads(body)["detail"]


def test_a_head_over_the_limit_is_answered_431_before_it_ends_and_the_connection_closes(client):
    with connect(client) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: psad\r\nX-Big: " + b"a" * (100 * 1024))  # never ends
        status, detail = status_and_detail(read_until_closed(sock))
    assert status == 431 and "max_header_bytes=65536" in detail and "PSAD_MAX_HEADER_BYTES" in detail
    # A client that sends all of a huge head before it reads still gets the answer, not a reset.
    with connect(client) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: psad\r\nX-Big: " + b"a" * (4 * 1024 * 1024) + b"\r\n\r\n")
        assert status_and_detail(read_until_closed(sock))[0] == 431
    under = client.get("/livez", headers={"X-Big": "a" * (63 * 1024)})
    assert under.status_code == 200


def test_silent_half_head_and_half_body_connections_are_closed_after_their_timeouts(client):
    silent, half_head, half_body = (connect(client) for _ in range(3))
    with silent, half_head, half_body:
        half_head.sendall(HEAD[:30])
        half_body.sendall(HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"user_id": "' + b"u" * 487)
        assert read_until_closed(silent) == b""  # no request began: closed without an answer
        status, detail = status_and_detail(read_until_closed(half_head))
        assert status == 408 and "header_timeout_s=1" in detail and "PSAD_HEADER_TIMEOUT_S" in detail
        status, detail = status_and_detail(read_until_closed(half_body))
        assert status == 408 and "body_timeout_s=1" in detail and "PSAD_BODY_TIMEOUT_S" in detail


def test_a_body_sent_in_pieces_within_the_timeout_is_served(client, data):
    body = json.dumps(request(data)).encode()
    with connect(client) as sock:
        sock.sendall(HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:20])
        time.sleep(0.2)
        sock.sendall(body[20:])
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 200 ") and b'"items"' in response


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout_s(client):
    with connect(client) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: psad\r\n\r\n" * 2)  # pipelined: both answered
        time.sleep(0.3)
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: psad\r\n\r\n")  # the connection is reused
        # 1 s here; uvicorn's default, 5 s, would outlast this wait.
        response = read_until_closed(sock, within_s=4)
    assert response.count(b"HTTP/1.1 200 ") == 3 and b"HTTP/1.1 408" not in response


def test_many_slow_sockets_do_not_stop_rerank_and_are_closed_after_the_header_timeout(tiny_bundle, redis_server, data):
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, **{**TIMEOUTS, "header_timeout_s": 3})
    with serve(settings) as c:
        expected = c.post("/rerank", json=request(data)).json()["items"]
        assert sorted(i["item_id"] for i in expected) == sorted(data["items"][:10])

        def right(items: list[dict]) -> bool:  # the same ranking (micro-batches move scores by float noise)
            ids, scores = [i["item_id"] for i in items], [i["score"] for i in items]
            return ids == [i["item_id"] for i in expected] and scores == pytest.approx([i["score"] for i in expected])

        slow = [connect(c) for _ in range(300)]
        try:
            for sock in slow:
                sock.sendall(HEAD[:40])  # half a head each, kept open
            url = str(c.base_url.join("/rerank"))
            for k in range(20):  # a pooled connection and new ones alike
                r = c.post("/rerank", json=request(data)) if k % 2 else httpx.post(url, json=request(data), timeout=30)
                assert r.status_code == 200 and right(r.json()["items"])
            assert c.get("/livez").status_code == 200
            answers = [read_until_closed(sock) for sock in slow]
        finally:
            for sock in slow:
                sock.close()
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
        assert right(c.post("/rerank", json=request(data)).json()["items"])


@pytest.fixture(scope="module")
def small_bodies(tiny_bundle: Path, redis_server, data) -> Iterator[httpx.Client]:
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, max_body_bytes=2048, **TIMEOUTS)
    with serve(settings) as c:
        yield c


def too_large(response: bytes) -> None:
    """The service's JSON 413, naming the limit and the fix."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"\r\ncontent-type: application/json\r\n" in head.lower() + b"\r\n"
    detail = json.loads(body)["detail"]
    assert "max_body_bytes=2048" in detail and "PSAD_MAX_BODY_BYTES" in detail


def head_of(path: str) -> bytes:
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: psad\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("path", ["/rerank", "/events"])
def test_a_streamed_body_is_answered_413_as_it_grows_past_the_limit(small_bodies, path):
    """Chunks of 1,000 bytes past max_body_bytes=2048, the body never ended: FastPath reads these
    routes' bodies, and the limit still answers, before the body is complete."""
    chunk = b"3e8\r\n" + b"a" * 1000 + b"\r\n"
    with connect(small_bodies) as sock:
        sock.sendall(head_of(path) + b"Transfer-Encoding: chunked\r\n\r\n" + chunk)
        time.sleep(0.2)
        sock.sendall(chunk * 2)
        too_large(read_until_closed(sock))
    assert small_bodies.get("/livez").status_code == 200


@pytest.mark.parametrize("path", ["/rerank", "/events", "/admin/reload"])
def test_a_declared_length_over_the_limit_is_answered_413_before_the_body_is_sent(small_bodies, path):
    """And before the admin check: this server has no admin token, yet /admin/reload answers 413."""
    with connect(small_bodies) as sock:
        sock.sendall(head_of(path) + b"Content-Length: 5000\r\n\r\n" + b'{"user_id": ')  # the rest never sent
        too_large(read_until_closed(sock))
