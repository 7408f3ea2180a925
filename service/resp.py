"""A minimal multiplexed RESP client for the profile read, the one Redis call on the request path.

Why not redis-py for this call: its connection checkout and release take locks and run
observability hooks and a health check per call, which costs more than the round trip
itself. `python -m loadtest.resp_bench` measures the two against the same redis-server (figures
in docs/benchmarks.md). This client is a service.profiles.ProfileReader, and on Redis Cluster
service.resp_cluster.ClusterReader runs one per node; redis-py (RedisPyReader) is the reference
reader, and does everything else (appends, PING).

TLS (rediss://): the SSLContext is the one redis-py builds from the same URL (its ssl_cert_reqs,
ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_check_hostname query parameters), so one URL
configures both clients the same way.

Design: one TCP (TLS, or unix socket) connection per process, shared by all requests. Commands are
written as they come (Redis answers in order) and replies are matched to their callers in FIFO
order, decoded to text by hiredis in C (invalid UTF-8 becomes U+FFFD). A caller that gives up
(its time budget ran out, the task was cancelled) leaves its slot in the queue: its replies are
read and dropped when they arrive, so a timeout never desynchronises the stream and never costs
a reconnect. If the oldest pending call has waited longer than `stale_s` the connection is
presumed dead (a half-open TCP connection never answers): it is aborted, every pending caller
fails with ConnectionError, and the next call reconnects. Connects are shared: concurrent
callers wait for the same attempt. Errors are redis-py's exceptions (ConnectionError,
ResponseError), so callers handle one family.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Command = Sequence[str | bytes | int | float]
T = TypeVar("T")


def pack(commands: Sequence[Command]) -> bytes:
    """RESP encoding of several commands, concatenated (one write, one round trip)."""
    out = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            if isinstance(arg, str):
                raw = arg.encode()
            elif isinstance(arg, bytes):
                raw = arg
            elif isinstance(arg, int | float) and not isinstance(arg, bool):
                raw = repr(int(arg) if isinstance(arg, int) else float(arg)).encode()  # no numpy reprs
            else:
                raise TypeError(f"RESP argument must be str, bytes, int or float, got {type(arg).__name__}")
            out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self.transport: asyncio.Transport | None = None
        # (future, number of replies expected, replies so far, monotonic send time)
        self.pending: deque[tuple[asyncio.Future, int, list, float]] = deque()
        self.alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.alive = True

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        try:
            while pending:
                reply = self.reader.gets()
                if reply is False:
                    return
                fut, n, replies, _ = pending[0]
                replies.append(reply)
                if len(replies) == n:
                    pending.popleft()
                    if not fut.done():  # a caller that gave up: its replies are dropped here
                        fut.set_result(replies)
        except hiredis.ProtocolError as exc:
            self.abort(f"protocol error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection to Redis lost ({exc or 'closed by the server'})")

    def abort(self, why: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._fail(why)

    def _fail(self, why: str) -> None:
        self.alive = False
        while self.pending:
            fut = self.pending.popleft()[0]
            if not fut.done():
                fut.set_exception(RedisConnectionError(why))

    def call(self, data: bytes, n: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((fut, n, [], time.monotonic()))
        self.transport.write(data)  # type: ignore[union-attr]
        return fut


def _expire(fut: asyncio.Future, hops: int) -> None:
    """Time out `fut` after `hops` more turns of the event loop (each turn polls the sockets, so a
    reply that already arrived is delivered first)."""
    if fut.done():
        return
    if hops:
        asyncio.get_running_loop().call_soon(_expire, fut, hops - 1)
    else:
        fut.set_exception(TimeoutError())


async def within(aw: Awaitable[T], seconds: float | None) -> T:
    """`await aw` with a time limit (asyncio.TimeoutError past it; None = no limit).
    asyncio.timeout runs the awaitable in the calling task; wait_for wraps it in a new one."""
    async with asyncio.timeout(seconds):
        return await aw


class RespClient:
    """`await client.execute([(cmd, arg, ...), ...])` -> the replies (str, int, list, None), in order."""

    def __init__(self, url: str, connect_timeout_s: float = 1.0, stale_s: float = 1.0):
        pool = aredis.ConnectionPool.from_url(url)  # redis-py's URL rules
        kwargs = pool.connection_kwargs
        self.ssl: ssl.SSLContext | None = None
        if issubclass(pool.connection_class, aredis.SSLConnection):
            self.ssl = pool.connection_class(**kwargs).ssl_context.get()
        self.path: str | None = kwargs.get("path")
        self.host: str = kwargs.get("host") or "localhost"
        self.port = int(kwargs.get("port") or 6379)
        self.db = int(kwargs.get("db") or 0)
        self.username: str | None = kwargs.get("username")
        self.password: str | None = kwargs.get("password")
        self.connect_timeout_s = connect_timeout_s
        self.stale_s = stale_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task | None = None

    @staticmethod
    def supports(url: str) -> bool:
        """A single Redis over TCP, TLS or a unix socket (Redis Cluster: service.resp_cluster, one per node)."""
        return url.startswith(("redis://", "rediss://", "unix://"))

    async def connect(self) -> None:
        """Open the connection now (else the first call does, inside its time budget)."""
        if self._proto is None or not self._proto.alive:
            await self._connection()

    async def execute(
        self, commands: Sequence[Command], timeout_s: float | None = None, raise_on_error: bool = True
    ) -> list[Any]:
        """Send the commands in one write and return their replies, in order; an error reply raises
        ResponseError, or with raise_on_error=False comes back as one in its place.

        timeout_s: past it, asyncio.TimeoutError, unless the replies had already reached the
        socket: the deadline is checked only after the event loop has polled its sockets once
        more, so a busy loop that is late to resume this caller does not turn a fast Redis into a
        timeout (the replies then wait in the socket buffer, not in Redis)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s  # one budget, reconnect included
        proto = self._proto
        if proto is None or not proto.alive:
            proto = await within(self._connection(), timeout_s)
        elif proto.pending and time.monotonic() - proto.pending[0][3] > self.stale_s:
            proto.abort(f"Redis has not answered for {self.stale_s:g} s")
            proto = await within(self._connection(), timeout_s)
        fut = proto.call(pack(commands), len(commands))
        if deadline is None:
            replies = await fut
        else:
            left = max(0.0, deadline - time.monotonic())
            timer = asyncio.get_running_loop().call_later(left, _expire, fut, 2)
            try:
                replies = await fut
            finally:
                timer.cancel()
        replies = [ResponseError(str(r)) if isinstance(r, hiredis.ReplyError) else r for r in replies]
        if raise_on_error:
            for r in replies:
                if isinstance(r, ResponseError):
                    raise r
        return replies

    async def _connection(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._proto = task.result()

    async def _connect(self) -> _Protocol:
        try:
            return await asyncio.wait_for(self._open(), self.connect_timeout_s)
        except (TimeoutError, OSError) as exc:
            where = self.path or f"{self.host}:{self.port}"
            raise RedisConnectionError(f"cannot connect to Redis at {where}: {exc!r}") from exc

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self.path:
            _, proto = await loop.create_unix_connection(_Protocol, self.path)
        else:
            _, proto = await loop.create_connection(_Protocol, self.host, self.port, ssl=self.ssl)
        setup: list[Command] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        try:
            for r in await proto.call(pack(setup), len(setup)) if setup else ():
                if isinstance(r, hiredis.ReplyError):
                    raise ResponseError(f"Redis connection setup (AUTH/SELECT): {r}")
        except BaseException:  # a failed setup, or the connect timeout cancelling it: close the socket
            proto.abort("connection setup failed")
            raise
        return proto

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
