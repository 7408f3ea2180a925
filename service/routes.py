"""HTTP routes: validate, delegate, answer. The work lives in inference.py and profiles.py."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import Discriminator, Tag
from redis.exceptions import RedisError

from service import api, logs, metrics
from service.app import Service

EVENTS_RETRY_AFTER_S = 1


class JSON(Response):
    """orjson-rendered JSON (numpy-aware); several times faster than the stdlib encoder."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(service)]
EventsBody = Annotated[
    Annotated[api.EventBatch, Tag("batch")] | Annotated[api.Event, Tag("single")],
    Discriminator(lambda v: "batch" if isinstance(v, dict) and "events" in v else "single"),
]

router = APIRouter(default_response_class=JSON)


def _request_id(given: str | None, header: str | None, limit: int) -> str:
    if given is not None:
        return given
    if header and len(header) <= limit:
        return header
    return uuid.uuid4().hex


@router.post("/rerank", response_model=api.RerankResponse)
async def rerank(body: api.RerankRequest, svc: Svc, x_request_id: Annotated[str | None, Header()] = None) -> JSON:
    started = time.perf_counter()
    bundle = svc.models.current
    api.raise_if(api.check_rerank(body, svc.settings, [f.name for f in bundle.schema.candidate_numeric]))
    rid = _request_id(body.request_id, x_request_id, svc.settings.max_id_length)
    metrics.CANDIDATES.observe(len(body.candidates))
    (answer,) = await svc.reranker.rerank([body], [rid])
    logs.log_request(svc.log, "/rerank", rid, started, answer["degraded_reasons"], candidates=len(body.candidates))
    return JSON(answer, headers={"X-Request-ID": rid})


@router.post("/rerank/batch", response_model=api.BatchRerankResponse)
async def rerank_batch(body: api.BatchRerankRequest, svc: Svc) -> JSON:
    started = time.perf_counter()
    bundle = svc.models.current
    api.check_batch(body, svc.settings, [f.name for f in bundle.schema.candidate_numeric])
    ids = [r.request_id or uuid.uuid4().hex for r in body.requests]
    for r in body.requests:
        metrics.CANDIDATES.observe(len(r.candidates))
    answers = await svc.reranker.rerank(body.requests, ids)
    reasons = sorted({x for a in answers for x in a["degraded_reasons"]})
    logs.log_request(svc.log, "/rerank/batch", ",".join(ids), started, reasons, lists=len(ids))
    return JSON({"responses": answers})


@router.post("/events", response_model=api.EventsAccepted)
async def events(body: EventsBody, svc: Svc) -> JSON:
    """Append behaviours. 503 + Retry-After when the profile store is down: nothing was stored."""
    batch = isinstance(body, api.EventBatch)
    items = body.events if batch else [body]
    bundle = svc.models.current
    api.check_events(items, svc.settings, bundle.schema.actions, batch=batch)
    now = int(time.time())
    rows = [(e.user_id, e.item_id, e.action, now if e.timestamp is None else e.timestamp, e.event_id) for e in items]
    cap = svc.settings.history_len or bundle.schema.max_history
    try:
        await asyncio.wait_for(svc.profiles.append(rows, cap), svc.settings.events_timeout_ms / 1000)
    except (asyncio.TimeoutError, RedisError, OSError) as exc:
        svc.log.warning("events not stored", extra={"events": len(rows), "error": repr(exc)})
        detail = (
            f"profile store unavailable ({type(exc).__name__}): the {len(rows)} event(s) were NOT stored; "
            f"retry after {EVENTS_RETRY_AFTER_S} s (send event_id so a retry cannot store an event twice)"
        )
        return JSON({"detail": detail}, status_code=503, headers={"Retry-After": str(EVENTS_RETRY_AFTER_S)})
    return JSON({"accepted": len(rows)})


@router.get("/livez")
async def livez() -> JSON:
    return JSON({"status": "ok"})


@router.get("/readyz")
async def readyz(svc: Svc) -> JSON:
    """200 when a model is loaded and Redis answers a PING; 503 otherwise, saying which."""
    bundle = svc.models.current
    try:
        redis_ok = await asyncio.wait_for(svc.profiles.ping(), 0.25)
    except (asyncio.TimeoutError, RedisError, OSError):
        redis_ok = False
    body = {
        "ready": bundle is not None and redis_ok,
        "model": None
        if bundle is None
        else {"name": bundle.name, "version": bundle.version, "provider": bundle.provider},
        "redis": "ok" if redis_ok else "unreachable",
    }
    return JSON(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics")
async def prometheus() -> Response:
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)


def admin(svc: Svc, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer-token check: 403 when admin is disabled or the token is wrong, 401 when it is missing."""
    token = svc.settings.admin_token
    if token is None:
        raise HTTPException(403, "admin endpoints are disabled: set PSAD_ADMIN_TOKEN to enable them")
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing 'Authorization: Bearer <token>' header", {"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(authorization[7:].encode(), token.get_secret_value().encode()):
        raise HTTPException(403, "wrong admin token")


@router.post("/admin/reload", dependencies=[Depends(admin)])
async def reload(svc: Svc, body: api.ReloadRequest | None = None) -> JSON:
    """Load the latest (or the given) version: verified and warmed before the swap; 409 if refused."""
    result = await svc.models.reload(body.version if body else None)
    status = 409 if result.result == "refused" else 200
    return JSON({"result": result.result, "version": result.version, "detail": result.detail}, status_code=status)


floor_router = APIRouter(default_response_class=JSON)


@floor_router.post("/bench/floor", response_model=api.RerankResponse)
async def floor(body: api.RerankRequest, svc: Svc, x_request_id: Annotated[str | None, Header()] = None) -> JSON:
    """Benchmark baseline: /rerank's parsing, validation and profile read, then a sort by score."""
    bundle = svc.models.current
    api.raise_if(api.check_rerank(body, svc.settings, [f.name for f in bundle.schema.candidate_numeric]))
    rid = _request_id(body.request_id, x_request_id, svc.settings.max_id_length)
    return JSON(await svc.reranker.floor(body, rid), headers={"X-Request-ID": rid})


async def validation_error(request: Request, exc: RequestValidationError) -> JSON:
    """422 naming each bad field; orjson renders a NaN input as null where the stdlib encoder fails."""
    return JSON({"detail": jsonable_encoder(exc.errors())}, status_code=422)


async def unexpected_error(request: Request, exc: Exception) -> JSON:
    request.app.state.service.log.warning(
        "unhandled error",
        exc_info=exc,
        extra={"path": request.url.path, "request_id": request.headers.get("x-request-id")},
    )
    return JSON({"detail": f"internal error ({type(exc).__name__}); see the service log"}, status_code=500)
