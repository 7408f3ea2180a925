"""The load generator: a minimal HTTP/1.1 keep-alive client on raw asyncio streams and the two ways
it drives the server. Requests are encoded once and sent as is, so the client allocates little
beyond each response; its latency is still inside every figure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

WARMUP_PAIRS = 200
WARMUP_S = 1.0


def http_request(host: str, path: str, body: bytes) -> bytes:
    """One pre-encoded POST, sent as is on every call."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def call(self, request: bytes) -> tuple[int, bytes]:
        """Send one request and read its answer: (status, body)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at < 0:
            raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
        length = int(lower[at + 15 : lower.index(b"\r\n", at)])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Sample:
    """Latencies in ms of one endpoint, and what went wrong."""

    ms: np.ndarray
    errors: int
    degraded: int

    def pct(self, q: float) -> float:
        return float(np.percentile(self.ms, q)) if len(self.ms) else float("nan")

    @staticmethod
    def merged(samples: list[Sample]) -> Sample:
        """Several phases' samples as one."""
        ms = np.concatenate([s.ms for s in samples])
        return Sample(ms, sum(s.errors for s in samples), sum(s.degraded for s in samples))


def _sample(ns: list[int], errors: int, degraded: int) -> Sample:
    return Sample(np.asarray(ns, dtype=np.float64) / 1e6, errors, degraded)


Target = tuple[int, list[bytes]]  # a server's port and the pre-encoded requests sent to it


async def one_client(host: str, first: Target, second: Target, n: int) -> tuple[Sample, Sample]:
    """Alternate two streams of requests request by request (the order flips every pair), so both
    see the same machine state: /rerank and /bench/floor of one server on one connection, or the
    same requests to two servers, one connection each."""
    conns = {port: await Connection.open(host, port) for port in {first[0], second[0]}}
    ns: list[list[int]] = [[], []]
    errors, degraded = [0, 0], [0, 0]
    try:
        for i in range(-WARMUP_PAIRS, n):
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                port, reqs = (first, second)[k]
                t0 = time.perf_counter_ns()
                status, body = await conns[port].call(reqs[i % len(reqs)])
                elapsed = time.perf_counter_ns() - t0
                if i < 0:
                    continue
                ns[k].append(elapsed)
                errors[k] += status != 200
                degraded[k] += b'"degraded":true' in body
    finally:
        for conn in conns.values():
            conn.close()
    return _sample(ns[0], errors[0], degraded[0]), _sample(ns[1], errors[1], degraded[1])


async def throughput(
    host: str, port: int, requests: list[bytes], concurrency: int, duration_s: float
) -> tuple[Sample, float]:
    """C closed-loop connections for WARMUP_S + duration_s; returns the measured window's sample and rps."""
    conns = [await Connection.open(host, port) for _ in range(concurrency)]
    start = time.perf_counter() + WARMUP_S
    stop = start + duration_s
    ns: list[int] = []
    errors = degraded = 0

    async def loop(conn: Connection, offset: int) -> None:
        nonlocal errors, degraded
        i = offset
        while (now := time.perf_counter()) < stop:
            t0 = time.perf_counter_ns()
            status, body = await conn.call(requests[i % len(requests)])
            i += 1
            if now >= start:
                ns.append(time.perf_counter_ns() - t0)
                errors += status != 200
                degraded += b'"degraded":true' in body

    try:
        await asyncio.gather(*(loop(c, k * 7) for k, c in enumerate(conns)))
    finally:
        for c in conns:
            c.close()
    return _sample(ns, errors, degraded), len(ns) / duration_s


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop when available: the client should be as cheap as the server's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
