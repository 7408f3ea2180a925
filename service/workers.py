"""Several server processes on one port, each with a listening socket of its own (SO_REUSEPORT).

Why not uvicorn's --workers: its processes share one listening socket, and the process that wakes
first accepts every pending connection. A caller that opens its keep-alive connections together
(a ranking stage, a load balancer, the benchmark) then lands them all on one process, whose event
loop and GIL cap the rate while the other cores idle (docs/service.md, "Workers"). With a socket
per process the kernel spreads new connections over the processes by a hash of their addresses.
A worker binds its socket before uvicorn starts, and uvicorn listens on it only once the app's
startup (the model load) is done, so no connection waits on a worker that is still loading.

Why not gunicorn (UvicornWorker, `reuse_port`): its workers' sockets listen before the app has
started, and run inside this process it needs workarounds of its internals for a worker that fails
at startup and for a worker's exit unwinding this process's stack (they are forked from it);
measured side by side in docs/benchmarks.md ("Worker supervisors").

The supervisor restarts a worker that dies, but gives up (stopping the others) when a worker
fails its startup (a model that does not load: nothing to serve) or workers keep dying. SIGINT
and SIGTERM stop every worker with uvicorn's graceful shutdown.
"""

from __future__ import annotations

import logging.config
import multiprocessing
import signal
import socket
import threading
import time
from collections import deque
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from service import logs
from service.fleet import Fleet

STARTUP_FAILURE = 3  # uvicorn's exit code when the app's startup (model load) fails
SHUTDOWN_WAIT_S = 30.0  # workers still running this long after SIGTERM are killed
POLL_S = 0.5  # how often dead workers are looked for
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0  # more restarts than this within the window: give up


class WorkersError(RuntimeError):
    """The workers cannot serve: the port is taken, or a worker fails at startup or keeps dying."""


def tcp_socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes may bind to the same address too."""
    sock = tcp_socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def check_port_free(host: str, port: int) -> None:
    """Bind without SO_REUSEPORT, which fails while anything (an older `psad serve` too) listens there."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise WorkersError("several workers need SO_REUSEPORT (Linux, macOS, BSD); run one worker per container")
    with tcp_socket(host) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise WorkersError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve_one(config: dict[str, Any], host: str, port: int) -> None:
    """A worker process: its own socket, then uvicorn's server loop until SIGINT/SIGTERM."""
    import uvicorn

    sock = reuseport_socket(host, port)
    uvicorn.Server(uvicorn.Config(**config, host=host, port=port)).run(sockets=[sock])


def supervise(config: dict[str, Any], host: str, port: int, workers: int, fleet_dir: Path) -> None:
    """Run `workers` processes until SIGINT/SIGTERM; WorkersError when they cannot serve.
    config: uvicorn.Config's keyword arguments, log_config included (this process applies it too);
    fleet_dir: where the workers agree on one model version (service.fleet)."""
    logging.config.dictConfig(config["log_config"])  # this process's lines: the same JSON as the workers'
    log = logging.getLogger(logs.LOGGER_NAME)
    check_port_free(host, port)
    ctx = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def start() -> BaseProcess:
        proc = ctx.Process(target=serve_one, args=(config, host, port), name="psad-worker")
        proc.start()
        return proc

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs = [start() for _ in range(workers)]
    log.info("workers started", extra={"address": f"{host}:{port}", "pids": [p.pid for p in procs]})
    restarts: deque[float] = deque()
    try:
        while not stop.wait(POLL_S):
            for i, proc in enumerate(procs):
                if proc.is_alive() or stop.is_set():
                    continue
                if proc.exitcode == STARTUP_FAILURE:
                    raise WorkersError(f"worker {proc.pid} failed at startup (see its log above); stopping")
                now = time.monotonic()
                while restarts and now - restarts[0] > RESTART_WINDOW_S:
                    restarts.popleft()
                if len(restarts) >= MAX_RESTARTS:
                    raise WorkersError(f"{MAX_RESTARTS} workers died within {RESTART_WINDOW_S:.0f} s; stopping")
                log.warning("worker exited; starting another", extra={"pid": proc.pid, "exitcode": proc.exitcode})
                _mark_dead(proc.pid, Fleet(fleet_dir))
                restarts.append(now)
                procs[i] = start()
    finally:
        _stop_all(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_all(procs: list[BaseProcess]) -> None:
    """SIGTERM (uvicorn finishes in-flight requests and the lifespan), then SIGKILL past one deadline."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _mark_dead(pid: int | None, fleet: Fleet) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics (its counters stay summed),
    and its state from the fleet: a reload no longer waits for it."""
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid)
        fleet.forget(pid)
