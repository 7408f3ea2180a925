"""Open-loop load: requests at a fixed arrival rate, each latency measured from its scheduled send time.

A closed-loop client (each connection sends its next request when the previous answer arrives)
slows down with the server, so a stall delays the requests that would have arrived meanwhile and
their wait is never measured (coordinated omission). Here request k is due at t0 + k / rate (or at
a seeded Poisson arrival time), whatever the answers do:

- it goes out on an idle keep-alive connection; when every connection is busy a new one is opened,
  up to `max_connections`, so a slow answer does not hold back the next send. Idle connections are
  reused oldest first, so the load spreads over all of them (and over a server's worker
  processes, which each accept their own);
- its latency runs from when it was due to when its answer was read, so time spent waiting for a
  connection, for the sender's own event loop or in the server's queue is all counted;
- what could not go out on time is counted apart: `late` (sent more than `late_ms` after it was
  due, whatever held it) and `waited` (every connection busy at the cap).

The clock is injectable (`Clock`): the scheduler reads time only through it, so a test drives it
on virtual time. This module knows nothing of the service; `connect` opens whatever channel
speaks to the server under test.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Channel(Protocol):
    """One keep-alive connection: one request at a time."""

    async def call(self, request: bytes) -> tuple[int, bytes]:
        """Send `request` and read its answer: (status, body)."""
        ...

    def close(self) -> None: ...


Connect = Callable[[], Awaitable[Channel]]
LATE_MS = 1.0  # a send this long after it was due counts as late
DRAIN_S = 30.0  # after the last send, how long answers are awaited


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: perf_counter, and the running event loop's sleep."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class OpenLoopResult:
    """What one run at one rate measured, over the requests due after the warm-up."""

    rate: float  # target arrivals per second
    duration_s: float
    scheduled: int
    latency_ms: np.ndarray  # answers with status 200, from the scheduled send time
    send_lag_ms: np.ndarray  # actual send time - scheduled, of every request sent
    errors: int  # answers other than 200, and requests whose connection failed
    late: int  # sent more than late_ms after they were due
    waited: int  # found every connection busy with the pool at its cap
    unfinished: int  # not answered when the drain timeout ran out
    peak_connections: int
    achieved_rate: float  # answers per second, from the window's start to the last answer

    def pct(self, q: float) -> float:
        """The q-th percentile of latency by nearest rank: the smallest measured value with at least q%
        of them at or below it (the rank rounded up, past float noise: p99.9 of 1000 is the 999th);
        nan without answers."""
        n = len(self.latency_ms)
        if not n:
            return math.nan
        rank = min(n, max(1, math.ceil(q * n / 100 - 1e-9)))
        return float(np.partition(self.latency_ms, rank - 1)[rank - 1])


def arrival_offsets(rate: float, span_s: float, seed: int | None = None) -> np.ndarray:
    """Due times in seconds from the start, below span_s: every 1 / rate, or a Poisson process of that
    rate drawn from `seed`."""
    if not rate > 0:
        raise ValueError(f"rate {rate}: expected arrivals per second > 0")
    if seed is None:
        return np.arange(math.ceil(rate * span_s - 1e-9)) / rate
    rng = np.random.default_rng(seed)
    offsets = np.zeros(1)
    while offsets[-1] < span_s:
        gaps = rng.exponential(1.0 / rate, size=max(16, math.ceil(rate * span_s)))
        offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(gaps)])
    return offsets[offsets < span_s]


class Pool:
    """Keep-alive connections: idle ones reused oldest first, new ones opened up to a cap, and
    requests queued for a connection beyond it."""

    def __init__(self, connect: Connect, cap: int):
        self.connect, self.cap = connect, cap
        self.idle: deque[Channel] = deque()
        self.waiters: deque[asyncio.Future[Channel]] = deque()
        self.opened: set[Channel] = set()  # every live connection, idle or busy
        self.opening = 0
        self.peak = 0
        self.replacing: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references

    async def open(self) -> Channel:
        self.opening += 1
        self.peak = max(self.peak, len(self.opened) + self.opening)
        try:
            conn = await self.connect()
        finally:
            self.opening -= 1
        self.opened.add(conn)
        return conn

    async def acquire(self) -> tuple[Channel, bool]:
        """A connection, and whether the request had to wait for one at the cap."""
        if self.idle:
            return self.idle.popleft(), False
        if len(self.opened) + self.opening < self.cap:
            return await self.open(), False
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter, True

    def release(self, conn: Channel) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def discard(self, conn: Channel) -> None:
        """Close a failed connection; a request waiting at the cap gets a new one in its place."""
        conn.close()
        self.opened.discard(conn)
        if self.waiters:
            task = asyncio.get_running_loop().create_task(self.replace())
            self.replacing.add(task)
            task.add_done_callback(self.replacing.discard)

    async def replace(self) -> None:
        try:
            conn = await self.open()
        except Exception as exc:  # the server refuses: the first waiter fails with it, not silently
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)
                    return
            return
        self.release(conn)

    def close(self) -> None:
        for conn in self.opened:
            conn.close()
        self.opened.clear()
        self.idle.clear()


@dataclass
class Tally:
    """Per-request outcomes of the measured window, filled as answers arrive."""

    latency: list[float]
    lag: list[float]
    errors: int = 0
    late: int = 0
    waited: int = 0
    last_answer: float = -math.inf


async def run_open_loop(
    connect: Connect,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float,
    *,
    clock: Clock | None = None,
    warmup_s: float = 1.0,
    connections: int = 16,
    max_connections: int = 256,
    seed: int | None = None,
    late_ms: float = LATE_MS,
    drain_s: float = DRAIN_S,
) -> OpenLoopResult:
    """Send `requests` in turn at `rate` per second for warmup_s + duration_s and measure the
    requests due after the warm-up. `connections` are opened before the first send; more are
    opened as needed up to `max_connections`. seed: Poisson arrivals from it (None: evenly
    spaced). After the last send, answers are awaited for at most drain_s; the rest are counted
    unfinished."""
    if not requests:
        raise ValueError("requests: expected at least one pre-encoded request")
    if not 1 <= connections <= max_connections:
        raise ValueError(
            f"connections {connections}, max_connections {max_connections}: expected 1 <= connections <= max"
        )
    clock = clock or MonotonicClock()
    offsets = arrival_offsets(rate, warmup_s + duration_s, seed)
    pool = Pool(connect, max_connections)
    for conn in await asyncio.gather(*(pool.open() for _ in range(connections))):
        pool.release(conn)
    tally = Tally([], [])
    tasks: list[asyncio.Task[None]] = []

    async def one(k: int, due: float, measured: bool) -> None:
        conn: Channel | None = None
        status = 0
        try:
            conn, waited = await pool.acquire()
            sent = clock.now()
            if measured:
                tally.lag.append(1000 * (sent - due))
                tally.late += sent - due > late_ms / 1000
                tally.waited += waited
            status, _ = await conn.call(requests[k % len(requests)])
        except (OSError, EOFError, ValueError, RuntimeError, asyncio.LimitOverrunError):  # reset, closed, garbled
            if conn is not None:
                pool.discard(conn)
        else:
            pool.release(conn)
        done = clock.now()
        if measured:
            if status == 200:
                tally.latency.append(1000 * (done - due))
            else:
                tally.errors += 1
            tally.last_answer = max(tally.last_answer, done)

    t0 = clock.now()
    start = t0 + warmup_s
    for k, offset in enumerate(offsets):
        due = t0 + float(offset)
        if (delay := due - clock.now()) > 0:
            await clock.sleep(delay)
        tasks.append(asyncio.create_task(one(k, due, offset >= warmup_s)))
    unfinished = await drain(tasks, clock, drain_s, warmup_s, offsets)
    pool.close()
    answered = len(tally.latency) + tally.errors
    window = tally.last_answer - start
    return OpenLoopResult(
        rate=rate,
        duration_s=duration_s,
        scheduled=int(np.count_nonzero(offsets >= warmup_s)),
        latency_ms=np.asarray(tally.latency, dtype=np.float64),
        send_lag_ms=np.asarray(tally.lag, dtype=np.float64),
        errors=tally.errors,
        late=tally.late,
        waited=tally.waited,
        unfinished=unfinished,
        peak_connections=pool.peak,
        achieved_rate=answered / window if window > 0 else 0.0,
    )


async def drain(
    tasks: list[asyncio.Task[None]], clock: Clock, drain_s: float, warmup_s: float, offsets: np.ndarray
) -> int:
    """Wait for the requests in flight for at most drain_s (on `clock`); cancel the rest and return
    how many of them were due in the measured window. A request that failed in an unexpected way
    (a bug, not a network error) raises here."""
    if not tasks:
        return 0
    everything = asyncio.ensure_future(asyncio.wait(tasks))
    timer = asyncio.ensure_future(clock.sleep(drain_s))
    await asyncio.wait([everything, timer], return_when=asyncio.FIRST_COMPLETED)
    timer.cancel()
    everything.cancel()
    pending = [k for k, task in enumerate(tasks) if not task.done()]
    for k in pending:
        tasks[k].cancel()
    await asyncio.gather(*(tasks[k] for k in pending), return_exceptions=True)
    for task in tasks:
        if not task.cancelled():
            task.result()
    return sum(1 for k in pending if offsets[k] >= warmup_s)
