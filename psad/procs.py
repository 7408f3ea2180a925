"""Ports and child processes for the tools, the benchmarks and the tests: one way to pick a port,
start a private redis-server (or a local Redis Cluster of them), wait for a server and stop what
was started.

A redis-server counts as started when it answers PING and INFO names its own pid: a port that
another Redis took between the choice of a free port and the start fails at once instead of
handing its caller somebody else's data.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import redis

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback port nothing listens on now (the OS's choice; another process may still take it first)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def redis_pid(port: int) -> int | None:
    """The pid of the redis-server serving commands on `port`; None while nothing answers or it is
    still loading its data (PING answers LOADING then)."""
    client = redis.Redis(host=LOOPBACK, port=port, socket_connect_timeout=0.5, socket_timeout=1)
    try:
        client.ping()
        return int(client.info("server")["process_id"])
    except redis.RedisError:
        return None
    finally:
        client.close()


def start_redis(port: int, workdir: Path, args: Sequence[str] = (), timeout_s: float = 10.0) -> subprocess.Popen:
    """A child redis-server on loopback, without persistence unless `args` (placed after the defaults,
    so they override them) ask for it; its files and redis.log in `workdir`. Returns once it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError(
            "redis-server is not installed: run `sudo apt-get install -y redis-server` (or `make setup` as root), "
            "or point PSAD_REDIS_URL at a running Redis"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    log = (workdir / "redis.log").resolve()
    cmd = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
    cmd += ["--daemonize", "no", "--dir", str(workdir.resolve()), "--logfile", str(log), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while (pid := redis_pid(port)) != proc.pid:
        if pid is not None:
            stop_tree(proc)
            raise RuntimeError(f"port {port} is taken by another redis-server (pid {pid}): choose another port")
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_tree(proc)
            raise RuntimeError(f"redis-server did not start on port {port}; see {log}")
        time.sleep(0.05)
    return proc


def tls_files(workdir: Path) -> dict[str, Path]:
    """A private CA and a server certificate for localhost and 127.0.0.1 signed by it, made with the
    openssl CLI into `workdir` (for a TLS redis-server in the tests and benchmarks): keys ca, cert, key."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = {"ca": workdir / "ca.crt", "cert": workdir / "server.crt", "key": workdir / "server.key"}
    ca_key, csr = workdir / "ca.key", workdir / "server.csr"
    ext = workdir / "server.ext"
    ext.write_text(f"subjectAltName=DNS:localhost,IP:{LOOPBACK}\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=psad-test-ca"]
        + ["-keyout", ca_key, "-out", files["ca"]],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", files["key"], "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", files["ca"], "-CAkey", ca_key, "-CAcreateserial", "-days", "2"]
        + ["-extfile", ext, "-out", files["cert"]],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    return files


def tls_args(port: int, files: dict[str, Path], auth_clients: bool = False) -> list[str]:
    """start_redis args adding a TLS port (the plain port stays, for start_redis's readiness check)."""
    return [
        *("--tls-port", str(port), "--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"])),
        *("--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "yes" if auth_clients else "no"),
    ]


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every live process (Linux /proc; empty elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def tree_pids(pid: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """`pid` and its live descendants, parents first."""
    table = _proc_table() if table is None else table
    tree, k = [pid], 0
    while k < len(tree):
        tree += [child for child, (parent, _) in table.items() if parent == tree[k]]
        k += 1
    return tree


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (a server and its workers)."""
    table = _proc_table()
    return sum(table[p][1] for p in tree_pids(pid, table) if p in table)


def stop_tree(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """SIGTERM, so the process shuts down cleanly (a server's supervisor stops its own workers); past
    timeout_s, SIGKILL to it and to every descendant it had, so none is left behind."""
    if proc is None or proc.poll() is not None:
        return
    tree = tree_pids(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def wait_http(
    url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None, hint: str = ""
) -> bytes:
    """The body of `url` once a GET answers 200. proc: the server's process, whose exit ends the
    wait at once with the tail of its `log`; hint: appended to the timeout's message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.is_file() else ""
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.read()
        except OSError:  # not listening yet, or not ready (an HTTPError is an OSError)
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g} s{hint}")


def cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free too (ephemeral ports are too high)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20_000, 30_000)
        if port not in ports and all(port_free(p) for p in (port, port + 10_000)):
            ports.append(port)
    return ports


class LocalCluster:
    """`nodes` cluster-enabled redis-server processes on loopback joined into one Redis Cluster (no
    replicas), for the tests and benchmarks. With `tls` (tls_files' files) each node also listens on
    a TLS port, the cluster bus runs over TLS and `url` is the rediss:// one (a TLS client is told
    the nodes' TLS ports); the plain ports stay for start_redis's readiness check. A node stopped
    with stop_node and started again with start_node rejoins with its slots (its nodes.conf stays
    in its directory) but without its data."""

    def __init__(self, workdir: Path, nodes: int = 3, tls: dict[str, Path] | None = None):
        self.workdir = workdir
        self.tls = tls
        ports = cluster_ports(2 * nodes if tls else nodes)  # a TLS port has its bus port too
        self.ports, self.tls_ports = ports[:nodes], ports[nodes:]
        self.procs: list[subprocess.Popen | None] = [None] * nodes

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://{LOOPBACK}:{self.tls_ports[0]}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://{LOOPBACK}:{self.ports[0]}/0"

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError(
                "redis-cli is not installed: run `sudo apt-get install -y redis-server` (or `make setup` as root)"
            )
        for k in range(len(self.ports)):
            self.start_node(k, wait=False)
        create = [cli, "--cluster", "create", *(f"{LOOPBACK}:{p}" for p in self.ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60
        )
        self.wait_ok()

    def start_node(self, k: int, wait: bool = True) -> None:
        """Start node `k` (again); with `wait`, return once every node reports the cluster ok."""
        port = self.ports[k]
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        if self.tls:
            args += [*tls_args(self.tls_ports[k], self.tls), "--tls-cluster", "yes"]
        self.procs[k] = start_redis(port, self.workdir / str(port), args)
        if wait:
            self.wait_ok()

    def stop_node(self, k: int) -> None:
        stop_tree(self.procs[k])
        self.procs[k] = None

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node says cluster_state:ok."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._ok(p) for p, proc in zip(self.ports, self.procs, strict=True) if proc is not None):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis cluster on ports {self.ports} did not become ready; see redis.log in {self.workdir}")

    @staticmethod
    def _ok(port: int) -> bool:
        client = redis.Redis(host=LOOPBACK, port=port, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        for k in range(len(self.ports)):
            self.stop_node(k)
