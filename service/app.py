"""The FastAPI application: create_app(settings) wires the pieces and owns their lifetimes.

Startup (lifespan): JSON logging, the first model (a failure stops startup: there is nothing to
serve), the Redis pool (Redis being down does not stop startup: requests degrade to cold-start
profiles, /readyz reports it and psad_redis_up is 0 until it is back), the Redis health watch,
the inference thread pool and micro-batcher, and the repository poller. Shutdown undoes them in
reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from export.runtime import Bundle
from service import logs, metrics
from service.inference import Reranker, Scorer
from service.metrics import MetricsMiddleware
from service.model_store import ModelStore
from service.profiles import STORE_ERRORS, ProfileStore, connect
from service.resp import RespClient
from service.settings import Settings, load_settings

GC_GEN0_THRESHOLD = 20_000
HEALTH_PING_S = 0.25  # a PING slower than this counts as Redis down


async def redis_reachable(profiles: ProfileStore) -> bool:
    """One PING within HEALTH_PING_S; its answer is also what psad_redis_up shows."""
    try:
        ok = await asyncio.wait_for(profiles.ping(), HEALTH_PING_S)
    except (asyncio.TimeoutError, *STORE_ERRORS):
        ok = False
    metrics.REDIS_UP.set(1 if ok else 0)
    return ok


async def watch_redis(profiles: ProfileStore, interval_s: float) -> None:
    """Keep psad_redis_up current between /readyz probes, so an outage alerts without taking the
    replicas out of the load balancer."""
    while True:
        await redis_reachable(profiles)
        await asyncio.sleep(interval_s)


@dataclass
class Service:
    """Everything a route needs, created by the lifespan and kept on app.state.service."""

    settings: Settings
    models: ModelStore
    profiles: ProfileStore
    reranker: Reranker
    log: logging.Logger

    @staticmethod
    def candidate_features(bundle: Bundle) -> list[str]:
        return [f.name for f in bundle.schema.candidate_numeric]


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    log = logs.configure(settings.log_level)
    models = ModelStore(settings)
    bundle = await models.start()
    timeout_s = settings.events_timeout_ms / 1000
    client = connect(settings.redis_url, settings.redis_pool_size, timeout_s, cluster=settings.redis_cluster)
    reader = None
    if not settings.redis_cluster and RespClient.supports(settings.redis_url):
        reader = RespClient(settings.redis_url, connect_timeout_s=timeout_s, stale_s=timeout_s)
    profiles = ProfileStore(client, settings.key_prefix, settings.profile_ttl_s, reader)
    try:
        await asyncio.wait_for(profiles.ping(), 1.0)
        if reader is not None:
            await asyncio.wait_for(reader.connect(), 1.0)
    except Exception as exc:
        log.warning("redis unreachable at startup; serving cold-start profiles", extra={"error": repr(exc)})
    scorer = Scorer(settings)
    scorer.start()
    app.state.service = Service(settings, models, profiles, Reranker(settings, models, profiles, scorer), log)
    watcher = asyncio.create_task(watch_redis(profiles, settings.redis_health_interval_s))
    poller = None
    if settings.poll_interval_s > 0 and settings.model_version == "latest":
        poller = asyncio.create_task(models.poll(settings.poll_interval_s))
    # Startup objects (the model, vocabularies, FastAPI's routes) are never garbage: freeze them out of
    # the cyclic collector's scans, and collect the young generation less often (a 100-candidate
    # request allocates hundreds of objects, so the default threshold of 700 runs a collection
    # every request or two; reference counting frees nearly all of them anyway).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    log.info("service ready", extra={"model": bundle.name, "version": bundle.version, "provider": bundle.provider})
    try:
        yield
    finally:
        if poller is not None:
            poller.cancel()
        watcher.cancel()
        await scorer.stop()
        await profiles.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; settings default to the PSAD_* environment (load_settings)."""
    from service import routes  # routes import Service from here

    settings = settings or load_settings()
    # The routes are handed to FastAPI directly rather than through include_router: an included
    # router is matched through an extra layer of scope bookkeeping on every request.
    own = [*routes.fast_router.routes, *routes.router.routes]
    if settings.enable_floor_endpoint:
        own += routes.floor_router.routes
    app = FastAPI(
        title="PSAD reranking service",
        version="1",
        description="Final-stage list reranking: POST candidates in the ranking stage's order, get them reordered.",
        lifespan=_lifespan,
        routes=own,
    )
    app.state.settings = settings
    app.add_exception_handler(RequestValidationError, routes.validation_error)
    app.add_exception_handler(Exception, routes.unexpected_error)
    app.add_middleware(routes.FastPath, routes=own)  # inside MetricsMiddleware: it sets scope["route"]
    app.add_middleware(routes.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    return app
