"""The FastAPI application: create_app(settings) wires the pieces and owns their lifetimes.

Startup (lifespan): JSON logging, the first model (a failure stops startup: there is nothing to
serve), the Redis pool (Redis being down does not stop startup: requests degrade to cold-start
profiles, /readyz reports it and psad_redis_up is 0 until it is back), the first check of the
store (Redis and the profile load marker: service.health) and the health watch that repeats it,
the inference thread pool and micro-batcher, the shadow writer when sampling is on (its own
Redis connection: a shadow Redis that is down stops nothing either), the repository poller, and
with several workers the follower of the server's model version (service.fleet). Shutdown undoes
them in reverse, writing what the shadow writer still holds within a short bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from redis.asyncio.cluster import RedisCluster
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import api, logs, routes, tracing
from service.deps import Service
from service.health import StoreHealth, watch_redis
from service.inference import Reranker, Scorer
from service.metrics import MetricsMiddleware
from service.model_store import ModelStore
from service.profiles import ProfileStore, connect
from service.resp import RespClient
from service.resp_cluster import ClusterReader
from service.settings import Settings, load_settings
from service.shadow import ShadowWriter

GC_GEN0_THRESHOLD = 20_000


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    log = logs.configure(settings.log_level)
    stop_tracing = tracing.setup(settings.tracing or settings.otlp_endpoint is not None, settings.otlp_endpoint)
    models = ModelStore(settings)
    bundle = await models.start()
    timeout_s = settings.events_timeout_ms / 1000
    client = connect(settings.redis_url, settings.redis_pool_size, timeout_s, cluster=settings.redis_cluster)
    reader: RespClient | ClusterReader | None = None  # None: redis-py reads (a URL RespClient cannot take)
    if isinstance(client, RedisCluster):
        reader = ClusterReader(client, settings.redis_url, connect_timeout_s=timeout_s, stale_s=timeout_s)
    elif RespClient.supports(settings.redis_url):
        reader = RespClient(settings.redis_url, connect_timeout_s=timeout_s, stale_s=timeout_s)
    profiles = ProfileStore(client, settings.key_prefix, settings.profile_ttl_s, reader)
    try:
        await asyncio.wait_for(profiles.ping(), 1.0)
        if reader is not None:
            await asyncio.wait_for(reader.connect(), 1.0)
    except Exception as exc:
        log.warning("redis unreachable at startup; serving cold-start profiles", extra={"error": repr(exc)})
    health = StoreHealth(profiles)
    await health.check()  # before the first request: an unmarked store is flagged from the first answer
    scorer = Scorer(settings)
    scorer.start()
    shadow = ShadowWriter(settings) if settings.shadow_sample_rate > 0 else None
    if shadow is not None:
        shadow.start()
    reranker = Reranker(settings, models, profiles, scorer, health, shadow)
    app.state.service = Service(settings, models, profiles, reranker, log, health, shadow)
    watcher = asyncio.create_task(watch_redis(health, settings.redis_health_interval_s))
    poller = None
    if settings.poll_interval_s > 0 and settings.model_version == "latest":
        poller = asyncio.create_task(models.poll(settings.poll_interval_s))
    follower = asyncio.create_task(models.follow()) if models.fleet is not None else None
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
        if follower is not None:
            follower.cancel()
        if poller is not None:
            poller.cancel()
        watcher.cancel()
        if shadow is not None:
            await shadow.close()
        await scorer.stop()
        await profiles.aclose()
        stop_tracing()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; settings default to the PSAD_* environment (load_settings)."""
    settings = settings or load_settings()
    # The routes are handed to FastAPI directly rather than through include_router: an included
    # router is matched through an extra layer of scope bookkeeping on every request.
    own = [*routes.body_router.routes, *routes.router.routes]
    if settings.enable_floor_endpoint:
        own += routes.floor_router.routes
    app = FastAPI(
        title="PSAD reranking service",
        version="1",
        description="Final-stage list reranking: POST candidates in the ranking stage's order, get them reordered.",
        lifespan=_lifespan,
        routes=own,
        # FastAPI's own OpenTelemetry spans, metrics and logs, on whenever a provider is installed: off,
        # service.tracing makes the one server span per request, and FastPath skips FastAPI anyway.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings

    def openapi() -> dict[str, Any]:
        """The schema with the serving model's actions and features (regenerated: a reload may change them)."""
        base = FastAPI.openapi(app)  # FastAPI builds it once and caches it
        svc: Service | None = getattr(app.state, "service", None)
        if svc is None:
            return base
        return api.openapi_schema(base, settings, svc.models.current.schema)

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    for error in (RequestValidationError, StarletteHTTPException, Exception):  # as BodyEndpoints answer theirs
        app.add_exception_handler(error, routes.error_handler)
    # Innermost first: FastPath (it sets scope["route"] for the metrics, and takes the app's routes
    # when the stack is built), BodyLimit (so the body FastPath reads is limited), then
    # MetricsMiddleware, which sees every answer.
    app.add_middleware(routes.FastPath, routes=app.routes)
    app.add_middleware(routes.BodyLimit, max_body_size=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    return app
