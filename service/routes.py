"""HTTP routes: validate, delegate, answer. The work lives in inference.py and profiles.py."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Annotated, Any, get_type_hints

import orjson
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import Discriminator, Tag, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from export.contract.shadow import ClickRecord
from service import api, logs, metrics, tracing
from service.deps import Service, service
from service.profiles import STORE_ERRORS, AppendFailed
from service.shadow import ShadowWriter

EVENTS_RETRY_AFTER_S = 1
EVENTS_RETRY = (
    f"retry after {EVENTS_RETRY_AFTER_S} s (an event with an event_id is stored once however often it is sent)"
)


class JSON(JSONResponse):
    """orjson-rendered JSON: numpy values as they are, and a faster encoder than the stdlib's. A
    JSONResponse subclass, so the OpenAPI schema shows each route's response_model."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # an integer beyond 64 bits, echoed as a 422's "input": stdlib JSON has them
            return json.dumps(content, default=str).encode()


def body_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors with FastAPI's body location: ("body", *field path)."""
    errors = []
    for err in exc.errors(include_url=False):
        if err["type"] == "json_invalid":
            err = {**err, "input": {}}  # FastAPI does not echo an unparseable body
        errors.append({**err, "loc": ("body", *err["loc"])})
    return errors


def is_json(content_type: str | None) -> bool:
    """application/json, application/<anything>+json (parameters such as charset allowed), or none."""
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


@dataclass(frozen=True)
class BodyEndpoint:
    """The one request path of a route with a JSON body: the ASGI app of its BodyRoute, which
    FastPath calls too. It admits (the guards, each `(svc, **headers)`: 401/403 before any byte of
    the body is read; then the content type: 415), reads the body, validates it and calls the
    endpoint `(body: T, svc: Svc, **headers)` by keyword, and answers every exception itself
    through error_response, so no Request, dependency resolution or exception middleware is needed.
    What it needs is read once from the endpoint's signature and the route's dependencies.

    pydantic-core (Rust) parses and validates the raw body in one pass, so every route answers
    malformed JSON (invalid UTF-8, huge integers, deep nesting) with the same 422 naming the
    problem, where FastAPI's generic body handling answers some of it with an undeclared 400.
    """

    endpoint: Callable[..., Coroutine[Any, Any, Response]]
    validate: Callable[[bytes], Any]
    optional: bool  # an empty body is None
    headers: dict[str, str]  # parameter -> header name
    guards: tuple[tuple[Callable[..., None], dict[str, str]], ...]
    wanted: frozenset[bytes]  # the header names read, as ASGI gives them

    @classmethod
    def of(cls, route: APIRoute) -> BodyEndpoint:
        hints = get_type_hints(route.endpoint, include_extras=True)
        optional = inspect.signature(route.endpoint).parameters["body"].default is None
        guards = tuple((d.dependency, header_params(d.dependency)) for d in route.dependencies if d.dependency)
        validate = TypeAdapter(hints["body"]).validate_json
        headers = header_params(route.endpoint)
        names = {"content-type", "x-request-id", *headers.values(), *(h for _, g in guards for h in g.values())}
        return cls(route.endpoint, validate, optional, headers, guards, frozenset(n.encode("latin-1") for n in names))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if tracing.TRACER is None:
            await self.serve(scope, receive, send)
            return
        with tracing.server_span(scope) as span:
            status = await self.serve(scope, receive, send)
            if status is not None:
                span.set_attribute("http.response.status_code", status)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> int | None:
        """Answer the request; the status sent, None when the client went away first."""
        svc: Service = scope["app"].state.service
        headers = self.read_headers(scope)
        try:
            self.admit(svc, headers)
            raw = await read_body(receive)
            if raw is None:
                return None  # the client went away: nobody to answer
            body = None if self.optional and not raw else parse_body(self.validate, raw)
            response = await self.endpoint(body=body, svc=svc, **{p: headers.get(h) for p, h in self.headers.items()})
        except Exception as exc:
            response = error_response(svc, exc, scope["path"], headers.get("x-request-id"))
        await response(scope, receive, send)
        return response.status_code

    def read_headers(self, scope: Scope) -> dict[str, str]:
        """The headers this endpoint reads; of a repeated one the first, as Starlette's Headers."""
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in self.wanted:
                headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        return headers

    def admit(self, svc: Service, headers: Mapping[str, str]) -> None:
        """The guards (401/403 from the admin check), then the content type (415)."""
        for guard, names in self.guards:
            guard(svc=svc, **{p: headers.get(h) for p, h in names.items()})
        if not is_json(headers.get("content-type")):
            raise HTTPException(415, "send the body as JSON with 'Content-Type: application/json'")


def header_params(fn: Callable[..., Any]) -> dict[str, str]:
    """A function's parameters other than body and svc, which are headers: name -> header name."""
    return {p: p.replace("_", "-") for p in inspect.signature(fn).parameters if p not in ("body", "svc")}


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_body(validate: Callable[[bytes], Any], raw: bytes) -> Any:
    """The raw JSON body validated; a failure raises RequestValidationError in FastAPI's format,
    each error naming its field."""
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        return validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(body_errors(exc), body=raw) from None


class BodyRoute(APIRoute):
    """A FastAPI route whose app is its BodyEndpoint. FastAPI still reads the endpoint's signature
    and the route's dependencies for the OpenAPI schema (the body, the headers); the router
    matches it as any route (405 for another method), then the BodyEndpoint answers."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.body_endpoint = BodyEndpoint.of(self)
        self.app = self.body_endpoint


class BodyLimit(RequestBodyLimitMiddleware):
    """Starlette's body size limit with the service's JSON answer. Starlette refuses a declared
    Content-Length over the limit, and a streamed body as it grows past it, before the app has
    the body: its receive() raises HTTPException(413) into the app (BodyEndpoint answers it), and
    for a declared length it replaces whatever the app answers with its own plain-text 413. Any
    413 is answered here with too_large_response, which names the limit and the fix."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def json_413(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 413:
                replaced = True
                await too_large_response(self.max_body_size)(scope, receive, send)
            elif not replaced:
                await send(message)

        await super().__call__(scope, receive, json_413)


class FastPath:
    """ASGI layer in front of FastAPI's routing: a POST to a BodyRoute's exact path goes straight to
    that route's app, its BodyEndpoint, which is what the router would call. It skips the router's
    matching, the per-request Request and exit stacks, and the exception middleware (a
    BodyEndpoint answers its own errors); docs/benchmarks.md has what that saves. Every other
    request, and these paths with another method, go to FastAPI unchanged. It sets scope["route"]
    as the router does, so MetricsMiddleware (outside it) labels them by route.

    The routes are read when the middleware stack is built, at the app's first request.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = {r.path: r for r in routes if isinstance(r, BodyRoute) and r.methods == {"POST"}}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        await route.body_endpoint(scope, receive, send)


Svc = Annotated[Service, Depends(service)]
EventsBody = Annotated[
    Annotated[api.EventBatch, Tag("batch")] | Annotated[api.Event, Tag("single")],
    Discriminator(lambda v: "batch" if isinstance(v, dict) and "events" in v else "single"),
]

router = APIRouter(default_response_class=JSON)


_ID_PREFIX = uuid.uuid4().hex[:16]  # per process, so ids stay unique across workers and restarts
_id_counter = itertools.count()


def new_request_id() -> str:
    """A unique id without a syscall per request (uuid4 reads os.urandom on every call)."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def _request_id(given: str | None, header: str | None, limit: int) -> str:
    """The body's id, else the X-Request-ID header's when it is usable as one, else a new id."""
    if given is not None:
        return given
    if header and len(header) <= limit and api.HEADER_SAFE_ID.match(header):
        return header
    return new_request_id()


body_router = APIRouter(default_response_class=JSON, route_class=BodyRoute)


@body_router.post("/rerank", response_model=api.RerankResponse, responses=api.BODY_ANSWERS)
async def rerank(body: api.RerankRequest, svc: Svc, x_request_id: Annotated[str | None, Header()] = None) -> JSON:
    started = time.perf_counter()
    bundle = svc.models.current
    api.raise_if(api.check_rerank(body, svc.settings, bundle.schema))
    rid = _request_id(body.request_id, x_request_id, svc.settings.max_id_length)
    metrics.CANDIDATES.observe(len(body.candidates))
    (answer,) = await svc.reranker.rerank([body], [rid], bundle)
    logs.log_request(svc.log, "/rerank", rid, started, answer["degraded_reasons"], candidates=len(body.candidates))
    return JSON(answer, headers={"X-Request-ID": rid})


@body_router.post("/rerank/batch", response_model=api.BatchRerankResponse, responses=api.BODY_ANSWERS)
async def rerank_batch(body: api.BatchRerankRequest, svc: Svc) -> JSON:
    started = time.perf_counter()
    bundle = svc.models.current
    api.check_batch(body, svc.settings, bundle.schema)
    ids = [r.request_id or new_request_id() for r in body.requests]
    for r in body.requests:
        metrics.CANDIDATES.observe(len(r.candidates))
    answers = await svc.reranker.rerank(body.requests, ids, bundle)
    reasons = sorted({x for a in answers for x in a["degraded_reasons"]})
    logs.log_request(svc.log, "/rerank/batch", ",".join(ids), started, reasons, lists=len(ids))
    return JSON({"responses": answers})


@body_router.post("/events", response_model=api.EventsAccepted, responses=api.EVENTS_ANSWERS)
async def events(body: EventsBody, svc: Svc) -> JSON:
    """Append behaviours. 503 + Retry-After when the profile store is down or refuses some users' appends;
    the detail says what was stored. Once stored, an event naming the request id of a sampled
    list is offered to the shadow writer (a click record)."""
    items = body.events if isinstance(body, api.EventBatch) else [body]
    bundle = svc.models.current
    api.check_events(body, svc.settings, bundle.schema)
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
    except (TimeoutError, *STORE_ERRORS) as exc:
        svc.log.warning("events not stored", extra={"events": len(rows), "error": repr(exc)})
        detail = f"profile store unavailable ({type(exc).__name__}): the {len(rows)} event(s) may not be stored"
        detail += f"; {EVENTS_RETRY}"
        return JSON({"detail": detail}, status_code=503, headers={"Retry-After": str(EVENTS_RETRY_AFTER_S)})
    if svc.shadow is not None:
        offer_clicks(svc.shadow, items)
    return JSON({"accepted": len(rows)})


def offer_clicks(shadow: ShadowWriter, events: Sequence[api.Event]) -> None:
    """Click records of the stored events whose request id names a sampled list (the same hash, so
    exactly the lists that were recorded); their time is when the service accepted them."""
    accepted = time.time()
    for e in events:
        if e.request_id is not None and shadow.samples(e.request_id):
            shadow.offer(ClickRecord(e.request_id, accepted, e.user_id, e.item_id, e.action, e.event_id))


@router.get("/livez")
async def livez() -> JSON:
    return JSON({"status": "ok"})


@router.get("/readyz", responses={503: {"description": "Not ready: no model loaded (same body)."}})
async def readyz(svc: Svc) -> JSON:
    """200 when a model is loaded: this process can answer, degraded or not. Redis and the profile
    load marker are reported (checked now) but do not decide it: /rerank serves cold-start profiles
    through an outage, so a shared Redis outage or an emptied store must not take every replica out
    of the load balancer (psad_redis_up and psad_profiles_missing alert instead)."""
    bundle = svc.models.current
    redis_ok = await svc.health.check()
    body = {
        "ready": bundle is not None,
        "model": None
        if bundle is None
        else {"name": bundle.name, "version": bundle.version, "provider": bundle.provider},
        "redis": "ok" if redis_ok else "unreachable",
        "profiles": svc.health.profiles,
    }
    return JSON(body, status_code=200 if body["ready"] else 503)


@router.get("/v2", response_model=api.ServerMetadata)
async def v2_server() -> JSON:
    """Open Inference Protocol server metadata; no OIP extension is implemented."""
    return JSON({"name": "psad", "version": metadata.version("psad"), "extensions": []})


@router.get("/v2/health/live", response_model=api.Live)
async def v2_live() -> JSON:
    return JSON({"live": True})


@router.get("/v2/health/ready", response_model=api.Ready, responses={503: {"model": api.Ready}})
async def v2_ready(svc: Svc) -> JSON:
    """/readyz's decision: ready once a model is loaded."""
    ready = svc.models.current is not None
    return JSON({"ready": ready}, status_code=200 if ready else 503)


def served(svc: Service, name: str) -> JSON | None:
    """OIP's 404 unless `name` is the model this service serves."""
    if name == svc.settings.model_name and svc.models.current is not None:
        return None
    return JSON({"error": f"unknown model {name!r}; this service serves {svc.settings.model_name!r}"}, 404)


@router.get("/v2/models/{name}", response_model=api.ModelMetadata, responses={404: {"model": api.OipError}})
async def v2_model(name: str, svc: Svc) -> JSON:
    bundle = svc.models.current
    missing = served(svc, name)
    if missing is not None:
        return missing
    return JSON(api.model_metadata(name, bundle.version, bundle.manifest).model_dump())


@router.get("/v2/models/{name}/ready", response_model=api.ModelReady, responses={404: {"model": api.OipError}})
async def v2_model_ready(name: str, svc: Svc) -> JSON:
    return served(svc, name) or JSON({"name": name, "ready": True})


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


@body_router.post(
    "/admin/reload", dependencies=[Depends(admin)], response_model=api.ReloadResult, responses=api.RELOAD_ANSWERS
)
async def reload(svc: Svc, body: api.ReloadRequest | None = None) -> JSON:
    """Load the latest (or the given) version: verified and warmed before the swap, on every worker of
    the server; 409 if refused here, or if some workers do not serve it (partial)."""
    result = await svc.models.reload(body.version if body else None)
    return JSON(result.model_dump(), status_code=result.status_code)


floor_router = APIRouter(default_response_class=JSON, route_class=BodyRoute)


@floor_router.post("/bench/floor", response_model=api.RerankResponse, responses=api.BODY_ANSWERS)
async def floor(body: api.RerankRequest, svc: Svc, x_request_id: Annotated[str | None, Header()] = None) -> JSON:
    """Benchmark baseline: /rerank's parsing, validation and profile read, then a sort by score."""
    bundle = svc.models.current
    api.raise_if(api.check_rerank(body, svc.settings, bundle.schema))
    rid = _request_id(body.request_id, x_request_id, svc.settings.max_id_length)
    return JSON(await svc.reranker.floor(body, rid, bundle), headers={"X-Request-ID": rid})


def too_large_response(limit: int) -> JSON:
    detail = f"request body over max_body_bytes={limit}: split the batch, or raise PSAD_MAX_BODY_BYTES"
    return JSON({"detail": detail}, status_code=413)


def error_response(svc: Service, exc: Exception, path: str, request_id: str | None) -> JSON:
    """The answer to an exception, the same on every route and path: 422 naming each bad field
    (orjson renders a NaN input as null where the stdlib encoder fails), an HTTPException's own
    status, detail and headers, else a 500, logged with its traceback (a 500 is a bug)."""
    if isinstance(exc, RequestValidationError):
        return JSON({"detail": jsonable_encoder(exc.errors())}, status_code=422)
    if isinstance(exc, StarletteHTTPException):
        return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    svc.log.warning("unhandled error", exc_info=exc, extra={"path": path, "request_id": request_id})
    return JSON({"detail": f"internal error ({type(exc).__name__}); see the service log"}, status_code=500)


async def error_handler(request: Request, exc: Exception) -> Response:
    """error_response as the app's exception handler, for the routes that are not BodyRoutes."""
    return error_response(request.app.state.service, exc, request.url.path, request.headers.get("x-request-id"))
