"""`psad shadow run`, the consumer of the service's shadow records (psad.shadow.consumer), and
`psad shadow report` (psad.shadow.report).

Redis, key prefix and model repository default to the service's settings (PSAD_SHADOW_REDIS_URL or
PSAD_REDIS_URL, PSAD_KEY_PREFIX, PSAD_MODEL_REPO), so a consumer next to a service finds its stream
and its bundles. The stream needs one Redis >= 7.0, not a cluster: the command refuses to start
otherwise. torch is imported when the command runs, so `psad --help` works without it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from pathlib import Path

import redis
import typer

from export.contract.bundle import NAME_PATTERN
from export.contract.errors import FAILED, fail, reported
from psad.shadow.consumer import DEFAULTS, Consumer, Metrics, Options, Teachers, require_redis
from psad.shadow.report import report_command
from service.cli import MODEL_REPO, apply_overrides
from service.model_repo import open_repo

CONSUMER_NAME = re.compile(NAME_PATTERN)  # it names part files: a model name's rule, one path component
CONSUMER_NAME_MAX = 100

shadow_app = typer.Typer(help="Shadow evaluation: the teacher judges the served student (docs/shadow.md).")


def run_command(
    redis_url: str | None = typer.Option(
        None, "--redis-url", help="Redis of the shadow stream (default: PSAD_SHADOW_REDIS_URL, else PSAD_REDIS_URL)."
    ),
    prefix: str | None = typer.Option(None, "--prefix", help="Redis key prefix (overrides PSAD_KEY_PREFIX)."),
    model_repo: str | None = MODEL_REPO,
    out: Path = typer.Option(DEFAULTS.out, "--out", help="Results directory (parquet, per kind and window)."),
    consumer: str | None = typer.Option(
        None, "--consumer", help="This consumer's name in the group, unique per process (default: <hostname>-<pid>)."
    ),
    window_s: int = typer.Option(DEFAULTS.window_s, "--window-s", min=60, help="Width of a results window, seconds."),
    k: int = typer.Option(DEFAULTS.k, "--k", min=1, help="Top k of the overlap and the NDCG (clipped to the list)."),
    batch: int = typer.Option(DEFAULTS.batch, "--batch", min=1, max=1000, help="Records per batch."),
    claim_idle_s: float = typer.Option(
        DEFAULTS.claim_idle_s,
        "--claim-idle-s",
        min=0.1,
        help="Claim records pending this long: a dead consumer's, or clicks held for their list (their grace).",
    ),
    max_deliveries: int = typer.Option(
        DEFAULTS.max_deliveries,
        "--max-deliveries",
        min=2,
        help="Dead-letter a record delivered more often (it crashes consumers); a held click takes two.",
    ),
    join_window_s: int = typer.Option(
        DEFAULTS.join_window_s, "--join-window-s", min=1, help="How long a processed list waits for its clicks, s."
    ),
    metrics_port: int = typer.Option(9109, "--metrics-port", min=0, max=65535, help="Prometheus port; 0 = off."),
    metrics_host: str = typer.Option("0.0.0.0", "--metrics-host", help="Interface of the metrics server."),
    threads: int = typer.Option(1, "--threads", min=1, max=64, help="torch threads (scale with more consumers)."),
    log_interval_s: float = typer.Option(
        DEFAULTS.log_interval_s, "--log-interval-s", min=0.1, help="Seconds between progress lines."
    ),
    once: bool = typer.Option(False, "--once", help="Process what the stream holds now, then exit (tests, cron)."),
) -> None:
    """Compare the teacher with the served student on the sampled lists, and join their clicks."""
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    if not CONSUMER_NAME.fullmatch(name) or len(name) > CONSUMER_NAME_MAX:
        raise fail(
            f"--consumer {name!r}: use 1-{CONSUMER_NAME_MAX} letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it names the part files)"
        )
    settings = apply_overrides(shadow_redis_url=redis_url, key_prefix=prefix, model_repo=model_repo)
    if settings.redis_cluster and not settings.shadow_redis_url:
        raise fail(
            "PSAD_REDIS_CLUSTER is true and the stream would live on the cluster: `psad shadow run` needs a "
            "single-node Redis for it; point PSAD_SHADOW_REDIS_URL (or --redis-url) at one, for the service too"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(threads)
    options = Options(
        consumer=name,
        prefix=settings.key_prefix,
        out=out,
        window_s=window_s,
        k=k,
        batch=batch,
        claim_idle_s=claim_idle_s,
        max_deliveries=max_deliveries,
        join_window_s=join_window_s,
        log_interval_s=log_interval_s,
    )
    metrics = Metrics()
    client = redis.Redis.from_url(settings.shadow_url, socket_timeout=10 + options.block_ms / 1000)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # the batch in hand is finished and acknowledged first
    worker = Consumer(client, options, Teachers(open_repo(settings)), metrics)
    try:
        require_redis(str(client.info("server")["redis_version"]))
        worker.ensure_group()
    except redis.RedisError as exc:
        raise fail(f"Redis at {settings.shadow_url}: {exc}; start it or pass --redis-url", FAILED) from None
    except RuntimeError as exc:
        raise fail(f"Redis at {settings.shadow_url}: {exc}", FAILED) from None
    server = _serve_metrics(metrics, metrics_host, metrics_port)
    try:
        with reported(redis.RedisError):
            worker.run(stop, once=once)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        client.close()


def _serve_metrics(metrics: Metrics, host: str, port: int):
    if port == 0:
        return None
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise fail(
            f"--metrics-port {port}: cannot listen on {host}:{port} ({exc}); pick another or 0", FAILED
        ) from None
    return server


shadow_app.command("run")(run_command)
shadow_app.command("report")(report_command)
