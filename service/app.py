"""The FastAPI application: create_app(settings) wires the pieces and owns their lifetimes.

Startup (lifespan): JSON logging, the first model (a failure stops startup: there is nothing to
serve), the Redis pool (Redis being down does not stop startup: requests degrade to cold-start
profiles and /readyz says 503 until it is back), the inference thread pool and micro-batcher,
and the repository poller. Shutdown undoes them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from service import logs
from service.inference import Reranker, Scorer
from service.metrics import MetricsMiddleware
from service.model_store import ModelStore
from service.profiles import ProfileStore, connect
from service.settings import Settings, load_settings


@dataclass
class Service:
    """Everything a route needs, created by the lifespan and kept on app.state.service."""

    settings: Settings
    models: ModelStore
    profiles: ProfileStore
    reranker: Reranker
    log: logging.Logger


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    log = logs.configure(settings.log_level)
    models = ModelStore(settings)
    bundle = await models.start()
    client = connect(settings.redis_url, settings.redis_pool_size, timeout_s=settings.events_timeout_ms / 1000)
    profiles = ProfileStore(client, settings.key_prefix, settings.profile_ttl_s)
    try:
        await asyncio.wait_for(profiles.ping(), 1.0)
    except Exception as exc:
        log.warning("redis unreachable at startup; serving cold-start profiles", extra={"error": repr(exc)})
    scorer = Scorer(settings)
    scorer.start()
    app.state.service = Service(settings, models, profiles, Reranker(settings, models, profiles, scorer), log)
    poller = None
    if settings.poll_interval_s > 0 and settings.model_version == "latest":
        poller = asyncio.create_task(models.poll(settings.poll_interval_s))
    log.info("service ready", extra={"model": bundle.name, "version": bundle.version, "provider": bundle.provider})
    try:
        yield
    finally:
        if poller is not None:
            poller.cancel()
        await scorer.stop()
        await client.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; settings default to the PSAD_* environment (load_settings)."""
    from service import routes  # routes import Service from here

    settings = settings or load_settings()
    app = FastAPI(
        title="PSAD reranking service",
        version="1",
        description="Final-stage list reranking: POST candidates in the ranking stage's order, get them reordered.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.add_exception_handler(RequestValidationError, routes.validation_error)
    app.add_exception_handler(Exception, routes.unexpected_error)
    app.include_router(routes.router)
    if settings.enable_floor_endpoint:
        app.include_router(routes.floor_router)
    app.add_middleware(MetricsMiddleware)
    return app
