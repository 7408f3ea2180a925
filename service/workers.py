"""Several server processes on one port, each with a listening socket of its own (SO_REUSEPORT).

Why not uvicorn's --workers: its processes share one listening socket, and the process that wakes
first accepts every pending connection. A caller that opens its keep-alive connections together
(a ranking stage, a load balancer, the benchmark) then lands them all on one process, whose event
loop and GIL cap the rate while the other cores idle; the measured throughput on 2 cores flipped
between about 700 and 1,050 requests/s from run to run. With a socket per process the kernel
spreads new connections over the processes by a hash of their addresses.

The supervisor restarts a worker that dies (its metrics files are marked dead for Prometheus) and
stops them all on SIGINT/SIGTERM, each with uvicorn's graceful shutdown.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import threading
from multiprocessing.process import BaseProcess
from typing import Any

from service import logs

SHUTDOWN_WAIT_S = 30.0  # a worker still running this long after SIGTERM is killed
POLL_S = 0.5  # how often dead workers are looked for


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes may bind to the same address too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve_one(config: dict[str, Any], host: str, port: int) -> None:
    """A worker process: its own socket, then uvicorn's server loop until SIGINT/SIGTERM."""
    import uvicorn

    sock = reuseport_socket(host, port)
    uvicorn.Server(uvicorn.Config(**config, host=host, port=port)).run(sockets=[sock])


def supervise(config: dict[str, Any], host: str, port: int, workers: int) -> int:
    """Run `workers` processes until a signal; returns the number of workers restarted."""
    log = logs.configure(config["log_level"])
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("several workers need SO_REUSEPORT (Linux, macOS, BSD)")
    reuseport_socket(host, port).close()  # fail here, once, if the address is taken
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
    restarted = 0
    try:
        while not stop.wait(POLL_S):
            for i, proc in enumerate(procs):
                if not proc.is_alive():
                    log.warning("worker exited; starting another", extra={"pid": proc.pid, "exitcode": proc.exitcode})
                    _mark_dead(proc.pid)
                    procs[i] = start()
                    restarted += 1
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes in-flight requests and the lifespan
        for proc in procs:
            proc.join(SHUTDOWN_WAIT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return restarted


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics (its counters stay summed)."""
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid)
