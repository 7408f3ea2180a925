"""Prometheus metrics, in seconds, with buckets that resolve a sub-millisecond service.

With several uvicorn workers set PROMETHEUS_MULTIPROC_DIR (an empty directory, wiped before the
workers start) before the service imports this module: each worker then writes its samples to
files there and /metrics aggregates all workers (prometheus_client multiprocess mode).
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
STAGES = ("profile_read", "feature_assembly", "inference", "response")

REQUEST_DURATION = Histogram(
    "psad_request_duration_seconds",
    "Request latency inside the service, by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
STAGE_DURATION = Histogram(
    "psad_stage_duration_seconds", "Latency of one stage of a rerank request.", ["stage"], buckets=LATENCY_BUCKETS
)
REQUESTS = Counter("psad_requests", "Requests answered, by route and HTTP status.", ["route", "status"])
DEGRADED = Counter(
    "psad_degraded", "Rerank answers flagged degraded, by reason (an answer counts once per reason).", ["reason"]
)
CANDIDATES = Histogram(
    "psad_candidates_per_request",
    "Candidates per rerank request.",
    buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
BATCH_SIZE = Histogram(
    "psad_batch_size", "Lists scored per model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
MODEL_INFO = Gauge(
    "psad_model_info",
    "1 for the model being served, 0 for earlier ones.",
    ["name", "version", "provider"],
    multiprocess_mode="livemax",
)
REDIS_UP = Gauge(
    "psad_redis_up",
    "1 when this worker's latest PING of the profile store answered, else 0 (the lowest worker's value).",
    multiprocess_mode="livemin",
)
PROFILES_MISSING = Gauge(
    "psad_profiles_missing",
    "1 when this worker's latest check found Redis up but without the profile load marker (an emptied "
    "store), else 0, also while Redis is unreachable (the highest worker's value).",
    multiprocess_mode="livemax",
)
RELOADS = Counter("psad_model_reload", "Model reload attempts, by result (loaded, unchanged, refused).", ["result"])
for _result in ("loaded", "unchanged", "refused"):  # exported at 0, so increase() sees a first refusal
    RELOADS.labels(_result)
SHADOW_RECORDS = Counter(
    "psad_shadow_records",
    "Shadow records by outcome: written to the stream, dropped (the queue was full, or still queued at "
    "shutdown), failed (Redis refused, timed out or was unreachable).",
    ["result"],
)


class ShadowCounters(NamedTuple):
    """SHADOW_RECORDS' children, looked up once, so each shows at 0 from the start."""

    written: Any
    dropped: Any
    failed: Any


SHADOW = ShadowCounters(*(SHADOW_RECORDS.labels(result) for result in ShadowCounters._fields))


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: request count and latency by route template and status (cheap:
    no BaseHTTPMiddleware body copying)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 499  # no response started: the client went away (nginx's "client closed request")

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            if status == 499:  # an error escaped before any response: the server's 500
                status = 500
            raise
        finally:
            route = route_label(scope)
            duration, count = _route_children(route, status)
            duration.observe(time.perf_counter() - start)
            count.inc()


def route_label(scope: dict) -> str:
    """The matched route's path template; FastAPI's own pages (/openapi.json, /docs) set an
    endpoint but no route, and their paths are fixed. Anything else is `unmatched`, so a scan of
    random paths cannot grow the label set."""
    route = scope.get("route")
    if route is not None:
        return route.path
    return scope["path"] if scope.get("endpoint") is not None else "unmatched"


_CHILDREN: dict[tuple[str, int], tuple] = {}


def _route_children(route: str, status: int) -> tuple:
    """The labelled children of a (route, status), looked up once: labels() checks its values and
    takes a lock on every call."""
    key = (route, status)
    hit = _CHILDREN.get(key)
    if hit is None:
        hit = _CHILDREN[key] = (REQUEST_DURATION.labels(route), REQUESTS.labels(route, str(status)))
    return hit


class Stages(NamedTuple):
    """STAGE_DURATION's children, one per stage, looked up once (labels() checks its values and
    takes a lock on every call)."""

    profile_read: Any
    feature_assembly: Any
    inference: Any
    response: Any


STAGE = Stages(*(STAGE_DURATION.labels(stage) for stage in Stages._fields))
