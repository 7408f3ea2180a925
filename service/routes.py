"""HTTP routes: validate, delegate, answer. The work lives in inference.py and profiles.py."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, get_type_hints

import orjson
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Discriminator, Tag, ValidationError
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import api, logs, metrics
from service.app import Service, redis_reachable
from service.profiles import STORE_ERRORS, AppendFailed

EVENTS_RETRY_AFTER_S = 1
EVENTS_RETRY = (
    f"retry after {EVENTS_RETRY_AFTER_S} s (an event with an event_id is stored once however often it is sent)"
)


class JSON(JSONResponse):
    """orjson-rendered JSON (numpy-aware); several times faster than the stdlib encoder. A
    JSONResponse subclass, so the OpenAPI schema shows each route's response_model."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # an integer beyond 64 bits, echoed as a 422's "input": stdlib JSON has them
            return json.dumps(content, default=str).encode()


def service(request: Request) -> Service:
    return request.app.state.service


def body_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors with FastAPI's body location: ("body", *field path)."""
    errors = []
    for err in exc.errors(include_url=False):
        if err["type"] == "json_invalid":
            err = {**err, "input": {}}  # FastAPI does not echo an unparseable body
        errors.append({**err, "loc": ("body", *err["loc"])})
    return errors


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """The raw JSON body parsed and validated in one pass by pydantic-core (Rust); a failure raises
    RequestValidationError in FastAPI's format, each error naming its field."""
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(body_errors(exc), body=raw) from None


def body_model(endpoint: Callable) -> type[BaseModel]:
    return get_type_hints(endpoint)["body"]


def call_endpoint(endpoint: Callable) -> Callable[[Any, Service, str | None], Coroutine[Any, Any, Response]]:
    """endpoint(body, svc[, x_request_id]) as a function of all three."""
    if "x_request_id" in inspect.signature(endpoint).parameters:
        return endpoint
    return lambda body, svc, header: endpoint(body, svc)


class BodyRoute(APIRoute):
    """A route whose JSON body goes through parse_body, with no per-request dependency resolution.

    FastAPI's generic body handling decodes the JSON with the stdlib, validates the Python objects,
    then resolves the endpoint's dependencies. Here the endpoint's signature must be
    `(body: Model, svc: Svc, x_request_id: <header> = None)`: FastAPI still reads it for the OpenAPI
    schema (the body model, the header), while the handler calls the endpoint directly.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        model, endpoint = body_model(self.endpoint), call_endpoint(self.endpoint)

        async def handler(request: Request) -> Response:
            body = parse_body(model, await request.body())
            return await endpoint(body, request.app.state.service, request.headers.get("x-request-id"))

        return handler


class BodyLimit:
    """ASGI layer: a body over `limit` bytes is answered 413 before any of it is parsed (a declared
    Content-Length at once, a streamed body as its chunks arrive), so one huge request cannot hold
    the event loop or the memory. On a streamed overflow the app then sees the client leave, and
    whatever it would still send is dropped."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.limit:
            await too_large_response(self.limit)(scope, receive, send)
            return
        received, refused = 0, False

        async def limited() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not refused:
                refused = True
                await too_large_response(self.limit)(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited, unless_refused)


class FastPath:
    """ASGI layer in front of FastAPI's routing for the hot BodyRoutes (POST /rerank, /rerank/batch,
    /bench/floor): an exact path lookup, then the same endpoint as the BodyRoute with the same
    parsing, 422 and 500 answers. It skips the router's matching, the per-request Request and
    exit stacks, and the exception middleware: about 0.2 ms of CPU per request on the benchmark
    machine. Every other request, and these paths with another method, go to FastAPI unchanged.
    It sets scope["route"], so MetricsMiddleware (outside it) labels them by route as before.
    """

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]):
        self.app = app
        self.routes = {
            r.path: (r, body_model(r.endpoint), call_endpoint(r.endpoint))
            for r in routes
            if isinstance(r, BodyRoute) and r.methods == {"POST"}
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hit = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if hit is None:
            await self.app(scope, receive, send)
            return
        route, model, endpoint = hit
        scope["route"] = route
        svc: Service = scope["app"].state.service
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        try:
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away: nobody to answer
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            response = await endpoint(parse_body(model, b"".join(chunks)), svc, header)
        except RequestValidationError as exc:
            response = validation_response(exc)
        except Exception as exc:
            response = unexpected_response(svc, exc, scope["path"], header)
        await response(scope, receive, send)


Svc = Annotated[Service, Depends(service)]
EventsBody = Annotated[
    Annotated[api.EventBatch, Tag("batch")] | Annotated[api.Event, Tag("single")],
    Discriminator(lambda v: "batch" if isinstance(v, dict) and "events" in v else "single"),
]

router = APIRouter(default_response_class=JSON)


_ID_PREFIX = uuid.uuid4().hex[:16]  # per process, so ids stay unique across workers and restarts
_id_counter = itertools.count()


def new_request_id() -> str:
    """A unique id without a syscall per request (uuid4 reads os.urandom: ~2% of server CPU)."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def _request_id(given: str | None, header: str | None, limit: int) -> str:
    """The body's id, else the X-Request-ID header's when it is usable as one, else a new id."""
    if given is not None:
        return given
    if header and len(header) <= limit and api.HEADER_SAFE_ID.match(header):
        return header
    return new_request_id()


fast_router = APIRouter(default_response_class=JSON, route_class=BodyRoute)


@fast_router.post("/rerank", response_model=api.RerankResponse, responses=api.BODY_ANSWERS)
async def rerank(body: api.RerankRequest, svc: Svc, x_request_id: Annotated[str | None, Header()] = None) -> JSON:
    started = time.perf_counter()
    bundle = svc.models.current
    api.raise_if(api.check_rerank(body, svc.settings, svc.candidate_features(bundle)))
    rid = _request_id(body.request_id, x_request_id, svc.settings.max_id_length)
    metrics.CANDIDATES.observe(len(body.candidates))
    (answer,) = await svc.reranker.rerank([body], [rid], bundle)
    logs.log_request(svc.log, "/rerank", rid, started, answer["degraded_reasons"], candidates=len(body.candidates))
    return JSON(answer, headers={"X-Request-ID": rid})


@fast_router.post("/rerank/batch", response_model=api.BatchRerankResponse, responses=api.BODY_ANSWERS)
async def rerank_batch(body: api.BatchRerankRequest, svc: Svc) -> JSON:
    started = time.perf_counter()
    bundle = svc.models.current
    api.check_batch(body, svc.settings, svc.candidate_features(bundle))
    ids = [r.request_id or new_request_id() for r in body.requests]
    for r in body.requests:
        metrics.CANDIDATES.observe(len(r.candidates))
    answers = await svc.reranker.rerank(body.requests, ids, bundle)
    reasons = sorted({x for a in answers for x in a["degraded_reasons"]})
    logs.log_request(svc.log, "/rerank/batch", ",".join(ids), started, reasons, lists=len(ids))
    return JSON({"responses": answers})


@router.post("/events", response_model=api.EventsAccepted, responses=api.EVENTS_ANSWERS)
async def events(body: EventsBody, svc: Svc) -> JSON:
    """Append behaviours. 503 + Retry-After when the profile store is down or refuses some users' appends;
    the detail says what was stored."""
    batch = isinstance(body, api.EventBatch)
    items = body.events if batch else [body]
    bundle = svc.models.current
    api.check_events(items, svc.settings, bundle.schema.actions, batch=batch)
    now = int(time.time())
    rows = [(e.user_id, e.item_id, e.action, now if e.timestamp is None else e.timestamp, e.event_id) for e in items]
    cap = svc.settings.history_len or bundle.schema.max_history
    try:
        await asyncio.wait_for(svc.profiles.append(rows, cap), svc.settings.events_timeout_ms / 1000)
    except AppendFailed as exc:
        svc.log.warning("events not stored for some users", extra={"failed": exc.failed})
        users = ", ".join(f"{uid!r}: {error}" for uid, error in list(exc.failed.items())[:5])
        detail = (
            f"events of {len(exc.failed)} user(s) were NOT stored ({users}); those of the other "
            f"{exc.stored_users} user(s) were; {EVENTS_RETRY}"
        )
        return JSON({"detail": detail}, status_code=503, headers={"Retry-After": str(EVENTS_RETRY_AFTER_S)})
    except (asyncio.TimeoutError, *STORE_ERRORS) as exc:
        svc.log.warning("events not stored", extra={"events": len(rows), "error": repr(exc)})
        detail = f"profile store unavailable ({type(exc).__name__}): the {len(rows)} event(s) may not be stored"
        detail += f"; {EVENTS_RETRY}"
        return JSON({"detail": detail}, status_code=503, headers={"Retry-After": str(EVENTS_RETRY_AFTER_S)})
    return JSON({"accepted": len(rows)})


@router.get("/livez")
async def livez() -> JSON:
    return JSON({"status": "ok"})


@router.get("/readyz", responses={503: {"description": "Not ready: no model loaded (same body)."}})
async def readyz(svc: Svc) -> JSON:
    """200 when a model is loaded: this process can answer, degraded or not. Redis is reported but
    does not decide it: /rerank serves cold-start profiles through an outage, so a shared Redis
    outage must not take every replica out of the load balancer (psad_redis_up alerts instead)."""
    bundle = svc.models.current
    redis_ok = await redis_reachable(svc.profiles)
    body = {
        "ready": bundle is not None,
        "model": None
        if bundle is None
        else {"name": bundle.name, "version": bundle.version, "provider": bundle.provider},
        "redis": "ok" if redis_ok else "unreachable",
    }
    return JSON(body, status_code=200 if body["ready"] else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus exposition text", "content": {"text/plain": {}}}},
)
async def prometheus() -> Response:
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)


def admin(svc: Svc, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer-token check: 403 when admin is disabled or the token is wrong, 401 when it is missing."""
    token = svc.settings.admin_token
    if token is None:
        raise HTTPException(403, "admin endpoints are disabled: set PSAD_ADMIN_TOKEN to enable them")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():  # the scheme is case-insensitive (RFC 9110)
        raise HTTPException(401, "missing 'Authorization: Bearer <token>' header", {"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(403, "wrong admin token")


@router.post(
    "/admin/reload", dependencies=[Depends(admin)], response_model=api.ReloadResult, responses=api.RELOAD_ANSWERS
)
async def reload(svc: Svc, body: api.ReloadRequest | None = None) -> JSON:
    """Load the latest (or the given) version: verified and warmed before the swap; 409 if refused."""
    result = await svc.models.reload(body.version if body else None)
    status = 409 if result.result == "refused" else 200
    return JSON({"result": result.result, "version": result.version, "detail": result.detail}, status_code=status)


floor_router = APIRouter(default_response_class=JSON, route_class=BodyRoute)


@floor_router.post("/bench/floor", response_model=api.RerankResponse, responses=api.BODY_ANSWERS)
async def floor(body: api.RerankRequest, svc: Svc, x_request_id: Annotated[str | None, Header()] = None) -> JSON:
    """Benchmark baseline: /rerank's parsing, validation and profile read, then a sort by score."""
    bundle = svc.models.current
    api.raise_if(api.check_rerank(body, svc.settings, svc.candidate_features(bundle)))
    rid = _request_id(body.request_id, x_request_id, svc.settings.max_id_length)
    return JSON(await svc.reranker.floor(body, rid, bundle), headers={"X-Request-ID": rid})


def validation_response(exc: RequestValidationError) -> JSON:
    """422 naming each bad field; orjson renders a NaN input as null where the stdlib encoder fails."""
    return JSON({"detail": jsonable_encoder(exc.errors())}, status_code=422)


def too_large_response(limit: int) -> JSON:
    detail = f"request body over max_body_bytes={limit}: split the batch, or raise PSAD_MAX_BODY_BYTES"
    return JSON({"detail": detail}, status_code=413)


def unexpected_response(svc: Service, exc: Exception, path: str, request_id: str | None) -> JSON:
    svc.log.warning("unhandled error", exc_info=exc, extra={"path": path, "request_id": request_id})
    return JSON({"detail": f"internal error ({type(exc).__name__}); see the service log"}, status_code=500)


async def validation_error(request: Request, exc: RequestValidationError) -> JSON:
    return validation_response(exc)


async def unexpected_error(request: Request, exc: Exception) -> JSON:
    return unexpected_response(request.app.state.service, exc, request.url.path, request.headers.get("x-request-id"))
