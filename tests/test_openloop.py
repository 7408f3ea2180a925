"""The open-loop sender (loadtest/openloop.py) on virtual time: fake servers whose answers take known
times, so every latency, late send and percentile is known exactly. (`psad bench service --rate`
against a real server is in tests/test_service_bench.py.) Also the locust file's constant rate."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest

from loadtest.openloop import arrival_offsets, run_open_loop
from tests.conftest import REPO

T = TypeVar("T")


class FakeClock:
    """Virtual time on an event loop of its own: when nothing is ready to run, the loop jumps to
    its next timer instead of waiting, so timed code runs at once and its times are exact."""

    def __init__(self) -> None:
        self.t = 0.0
        clock = self

        class Jumping(selectors.DefaultSelector):
            def select(self, timeout: float | None = None) -> list[Any]:
                events = super().select(0)
                if not events and timeout:
                    clock.t += timeout
                return events

        class Loop(asyncio.SelectorEventLoop):
            def time(self) -> float:
                return clock.t

        self.loop = Loop(Jumping())

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self.loop.run_until_complete(coro)
        finally:
            self.loop.close()


class FakeServer:
    """Answers each request after `service_s(k)` of virtual time (k: the request's first byte, its
    index); `status(k)` its status. Logs each request's (index, connection, arrival time)."""

    def __init__(
        self,
        clock: FakeClock,
        service_s: Callable[[int], float],
        status: Callable[[int], int] = lambda k: 200,
    ):
        self.clock, self.service_s, self.status = clock, service_s, status
        self.log: list[tuple[int, int, float]] = []
        self.connections = 0

    async def connect(self) -> FakeConnection:
        self.connections += 1
        return FakeConnection(self, self.connections)


class FakeConnection:
    def __init__(self, server: FakeServer, number: int):
        self.server, self.number = server, number
        self.busy = False

    async def call(self, request: bytes) -> tuple[int, bytes]:
        assert not self.busy, "two requests at once on one connection"
        self.busy = True
        k = int(request)
        self.server.log.append((k, self.number, self.server.clock.now()))
        await self.server.clock.sleep(self.server.service_s(k))
        self.busy = False
        status = self.server.status(k)
        if status < 0:
            raise ConnectionResetError("the fake server reset the connection")
        return status, b"{}"

    def close(self) -> None:
        pass


REQUESTS = [str(k).encode() for k in range(1000)]  # request k's body is its index


def test_a_stall_delays_later_requests_and_their_latency_counts_from_their_scheduled_time():
    """One connection (the cap), 100 requests/s, 1 ms answers, request 10 stalls for 42 ms: requests
    11-14 could not be sent on time; each latency runs from when it was due, not when it went out."""
    clock = FakeClock()
    server = FakeServer(clock, lambda k: 0.043 if k == 10 else 0.001)
    result = clock.run(
        run_open_loop(server.connect, REQUESTS, 100.0, 0.3, clock=clock, warmup_s=0.0, connections=1, max_connections=1)
    )
    assert result.scheduled == 30 and result.errors == result.unfinished == 0
    expected = [1.0] * 30
    expected[10] = 43.0  # due at 100 ms, answered at 143
    for k, sent_ms in zip((11, 12, 13, 14), (143, 144, 145, 146), strict=True):  # each waits for the one before
        expected[k] = sent_ms + 1 - 10 * k
    np.testing.assert_allclose(result.latency_ms, expected, atol=1e-6)
    np.testing.assert_allclose(result.send_lag_ms[11:15], [33, 24, 15, 6], atol=1e-6)
    assert result.late == result.waited == 4 and result.peak_connections == 1
    sends = {k: t for k, _, t in server.log}
    assert sends[15] == pytest.approx(0.150)  # back on schedule: 15 is due after 14 is answered


def test_a_slow_server_gets_more_connections_so_every_request_goes_out_on_time():
    """Answers take 95 ms at 100 requests/s: about ten requests are in flight at once; with the pool
    allowed to grow, none waits, none is late, and each latency is the server's time."""
    clock = FakeClock()
    server = FakeServer(clock, lambda k: 0.095)
    result = clock.run(run_open_loop(server.connect, REQUESTS, 100.0, 1.0, clock=clock, warmup_s=0.0, connections=2))
    assert result.scheduled == len(result.latency_ms) == 100
    np.testing.assert_allclose(result.latency_ms, 95.0, atol=1e-6)
    assert result.late == result.waited == 0 and np.max(result.send_lag_ms) < 1e-6
    assert result.peak_connections == server.connections == 10
    # Each connection carries one request at a time (FakeConnection asserts it), and all ten are used.
    assert len({conn for _, conn, _ in server.log}) == 10
    assert result.achieved_rate == pytest.approx(100 / 1.085)  # 100 answers from 0 s to the last, at 1.085 s


def test_percentiles_are_nearest_rank_values_of_the_measured_window():
    """Request k takes (k mod 1000) / 10 ms, 1000 after a warm-up of 50: the percentiles are the
    nearest-rank values of exactly those latencies, the warm-up's excluded."""
    clock = FakeClock()
    server = FakeServer(clock, lambda k: 1e-4 * ((k - 50) % 1000 + 1))
    result = clock.run(run_open_loop(server.connect, REQUESTS, 1000.0, 1.0, clock=clock, warmup_s=0.05))
    assert result.scheduled == len(result.latency_ms) == 1000
    measured = np.sort(result.latency_ms)
    np.testing.assert_allclose(measured, 0.1 * np.arange(1, 1001), atol=1e-6)  # the warm-up's 50 are not in it
    assert result.pct(50) == pytest.approx(50.0)  # the 500th of 1000
    assert result.pct(99) == pytest.approx(99.0)
    assert result.pct(99.9) == pytest.approx(99.9)
    assert result.pct(100) == pytest.approx(100.0)


def test_errors_broken_connections_and_unanswered_requests_are_counted_apart():
    """A 503, a reset connection (replaced by a new one) and a request never answered within the
    drain timeout: counted, not in the latencies, and the run goes on."""
    clock = FakeClock()
    server = FakeServer(
        clock,
        lambda k: 100.0 if k == 7 else 0.001,
        status=lambda k: {3: 503, 5: -1}.get(k, 200),
    )
    result = clock.run(
        run_open_loop(
            server.connect, REQUESTS, 100.0, 0.2, clock=clock, warmup_s=0.0, connections=1, max_connections=2, drain_s=1
        )
    )
    assert result.scheduled == 20
    assert result.errors == 2 and result.unfinished == 1 and len(result.latency_ms) == 17
    assert server.connections == 3  # the first, the reset one's replacement, and one beside the stuck request


def test_arrivals_are_evenly_spaced_or_a_seeded_poisson_process():
    np.testing.assert_allclose(arrival_offsets(4.0, 1.0), [0.0, 0.25, 0.5, 0.75])
    poisson = arrival_offsets(1000.0, 20.0, seed=3)
    np.testing.assert_array_equal(poisson, arrival_offsets(1000.0, 20.0, seed=3))
    assert not np.array_equal(poisson, arrival_offsets(1000.0, 20.0, seed=4))
    gaps = np.diff(poisson)
    assert poisson[0] == 0.0 and poisson[-1] < 20.0 and np.all(gaps >= 0)
    assert abs(len(poisson) - 20_000) < 5 * np.sqrt(20_000)  # a count of a Poisson process: within 5 sigma
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.05)  # exponential gaps: sd = mean


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rate": 0.0}, "rate 0.0: expected arrivals per second > 0"),
        ({"connections": 9, "max_connections": 8}, "expected 1 <= connections <= max"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, float], message: str):
    clock = FakeClock()
    server = FakeServer(clock, lambda k: 0.001)
    args: dict[str, Any] = {"rate": 10.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        clock.run(run_open_loop(server.connect, REQUESTS, duration_s=1.0, clock=clock, **args))


# The locust file's constant-rate option (PSAD_LOADTEST_RATE) --------------------------------------

PACING = """
import json, time, types
import loadtest.locustfile as lf
slow = types.SimpleNamespace(_cp_last_run=time.perf_counter() - 1.0, _cp_last_wait_time=0.0)
quick = types.SimpleNamespace(_cp_last_run=time.perf_counter() - 0.1, _cp_last_wait_time=0.0)
print(json.dumps([lf.RerankUser.wait_time(slow), lf.RerankUser.wait_time(quick)]))
"""


def locust_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSAD_LOADTEST_")}
    return {**env, **{f"PSAD_LOADTEST_{k}": v for k, v in values.items()}}


def test_locust_users_pace_their_tasks_to_the_rate_asked():
    """PSAD_LOADTEST_RATE=4: a user waits out the rest of a quarter second after each task (none after
    a task that took longer). In a subprocess: importing locust patches gevent."""
    done = subprocess.run(
        [sys.executable, "-c", PACING], cwd=REPO, env=locust_env(RATE="4"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    after_slow, after_quick = json.loads(done.stdout.splitlines()[-1])
    assert after_slow == 0 and 0 < after_quick <= 0.25 - 0.1


def test_locust_refuses_a_negative_rate():
    done = subprocess.run(
        [sys.executable, "-c", "import loadtest.locustfile"],
        cwd=REPO,
        env=locust_env(RATE="-1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "PSAD_LOADTEST_RATE=-1.0: expected a number >= 0.0" in done.stderr
