"""The HTTP contract: request and response models (they are the OpenAPI schema) and the checks
that depend on settings or on the serving model's schema.

Static rules (types, finite numbers, non-empty lists, top_k >= 1, timestamps >= 0) live in the
models; limits that come from settings (max_candidates, max_id_length, max_future_s, ...) and from the model
(known candidate features, behaviour actions) are checked by `check_*`, which raise the same
422 error format FastAPI uses, with the location of the offending field.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from export.contract.schema import RANK_SCORE
from service.settings import Settings

# Numbers reach the model as float32: bound them well inside its range so no input becomes inf.
FLOAT32_SAFE = 1e30
Feature = Annotated[float, Field(ge=-FLOAT32_SAFE, le=FLOAT32_SAFE)]


class _Strict(BaseModel):
    """Unknown fields, NaN and infinities are refused, and types are strict: a number sent as a
    string or as true/false is a 422, not a silent conversion (2.0 for an integer too)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class Candidate(_Strict):
    item_id: str = Field(
        min_length=1,
        description="Item id as the ranking stage knows it; unknown ids are fine; unique within the request.",
    )
    score: float | None = Field(
        None,
        ge=-FLOAT32_SAFE,
        le=FLOAT32_SAFE,
        description="Ranking-stage score (feeds `rank_score`). Give it for every candidate or for none.",
    )
    features: dict[str, Feature] | None = Field(
        None, description="Other per-candidate numeric features, by schema name (candidate_numeric)."
    )


class Context(_Strict):
    timestamp: float | None = Field(
        None, ge=0, description="Request time, unix seconds (default: now); at most max_future_s ahead."
    )


# A request id is echoed in the X-Request-ID header: visible ASCII only (no spaces, no control
# characters, nothing HTTP cannot carry in a header).
HEADER_SAFE_ID = re.compile(r"^[!-~]+$")


def _header_safe(value: str) -> str:
    if not HEADER_SAFE_ID.match(value):
        raise ValueError("use visible ASCII only (no spaces, accents or control characters): it is echoed in a header")
    return value


class RerankRequest(_Strict):
    request_id: Annotated[str, AfterValidator(_header_safe)] | None = Field(
        None,
        min_length=1,
        json_schema_extra={"pattern": HEADER_SAFE_ID.pattern},
        description="Visible ASCII, echoed back in the body and the X-Request-ID header; generated when absent.",
    )
    user_id: str = Field(min_length=1)
    candidates: list[Candidate] = Field(
        min_length=1, description="In the ranking stage's order; item ids unique; a score for every one or for none."
    )
    context: Context | None = None
    top_k: int | None = Field(
        None, ge=1, description="Return only the first top_k items (1..len(candidates)). An integer: 5.0 is refused."
    )


class RankedItem(BaseModel):
    item_id: str
    score: float


class RerankResponse(BaseModel):
    request_id: str
    items: list[RankedItem]
    model_version: str
    degraded: bool
    degraded_reasons: list[str]


class BatchRerankRequest(_Strict):
    requests: list[RerankRequest] = Field(min_length=1)


class BatchRerankResponse(BaseModel):
    responses: list[RerankResponse]


class Event(_Strict):
    user_id: str = Field(min_length=1)
    item_id: str = Field(min_length=1)
    action: str = Field(min_length=1, description="One of the model schema's actions.")
    timestamp: int | None = Field(
        None, ge=0, description="Unix seconds (default: now); at most max_future_s ahead. An integer: 5.0 is refused."
    )
    event_id: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[^|]+$",
        description="Idempotency key: a retried event with the same id is stored once.",
    )


class EventBatch(_Strict):
    events: list[Event] = Field(min_length=1)


class EventsAccepted(BaseModel):
    accepted: int


class Detail(BaseModel):
    detail: str


class WorkerVersion(BaseModel):
    pid: int
    version: int = Field(description="the version this worker serves")


class ReloadResult(BaseModel):
    result: str = Field(
        description="loaded, unchanged, refused (409), or partial (409: some workers do not serve it; detail says why)"
    )
    version: int = Field(description="the version now serving")
    detail: str
    workers: list[WorkerVersion] = Field(
        default_factory=list, description="With several workers: what each serves after the reload."
    )


def _answers(*statuses: tuple[int, str], model: type[BaseModel] = Detail) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": text} for status, text in statuses}


TOO_LARGE = (413, "Body over PSAD_MAX_BODY_BYTES; refused before parsing.")
NOT_JSON = (415, "A Content-Type other than application/json (or application/*+json); none is read as JSON.")
# The non-200 answers each route may give besides 422, for the OpenAPI schema.
BODY_ANSWERS = _answers(TOO_LARGE, NOT_JSON)
EVENTS_ANSWERS = _answers(TOO_LARGE, NOT_JSON, (503, "Not stored or not all stored: retry after Retry-After seconds."))
RELOAD_ANSWERS = {
    **_answers(
        (401, "No bearer token."), (403, "Wrong token, or admin disabled (no PSAD_ADMIN_TOKEN)."), TOO_LARGE, NOT_JSON
    ),
    **_answers((409, "The bundle was refused; the current version keeps serving."), model=ReloadResult),
}


class ReloadRequest(_Strict):
    version: int | None = Field(None, ge=1, description="Version to load (default: the latest).")


def openapi_schema(
    base: dict[str, Any], settings: Settings, actions: Sequence[str], features: Sequence[str]
) -> dict[str, Any]:
    """FastAPI's schema of the models plus what the server enforces from its settings and its
    serving model: id lengths, list sizes, the model's actions and candidate features. Rules JSON
    Schema cannot state (unique item ids, top_k <= len(candidates), a score for every candidate
    or none, timestamps at most max_future_s ahead) are in the fields' descriptions."""
    schema = copy.deepcopy(base)
    models = schema["components"]["schemas"]

    def string(model: str, name: str) -> dict[str, Any]:  # the string branch of a property
        prop = models[model]["properties"][name]
        return next((b for b in prop.get("anyOf", [prop]) if b.get("type") == "string"), prop)

    for model, name in [
        ("RerankRequest", "request_id"),
        ("RerankRequest", "user_id"),
        ("Candidate", "item_id"),
        ("Event", "user_id"),
        ("Event", "item_id"),
        ("Event", "event_id"),
    ]:
        string(model, name)["maxLength"] = settings.max_id_length
    request_id = models["RerankRequest"]["properties"]["request_id"]
    string("RerankRequest", "request_id")["pattern"] = request_id.pop("pattern")
    for model, name, limit in [
        ("RerankRequest", "candidates", settings.max_candidates),
        ("BatchRerankRequest", "requests", settings.max_batch_requests),
        ("EventBatch", "events", settings.max_events),
    ]:
        models[model]["properties"][name]["maxItems"] = limit
    string("Event", "action")["enum"] = list(actions)
    given = next(b for b in models["Candidate"]["properties"]["features"]["anyOf"] if b.get("type") == "object")
    number = given.pop("additionalProperties")
    given.update(properties={f: number for f in features if f != RANK_SCORE}, additionalProperties=False)
    return schema


def _error(loc: Sequence[Any], msg: str, value: Any) -> dict[str, Any]:
    return {"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}


def _too_far_ahead(timestamp: float | None, settings: Settings) -> bool:
    return timestamp is not None and timestamp > time.time() + settings.max_future_s


def _future_error(loc: Sequence[Any], timestamp: float, settings: Settings) -> dict[str, Any]:
    ahead = timestamp - time.time()
    msg = (
        f"{ahead:.0f} s ahead of the server clock (limit: max_future_s={settings.max_future_s}); "
        "send unix seconds, not milliseconds"
    )
    return _error(loc, msg, timestamp)


def raise_if(errors: list[dict[str, Any]]) -> None:
    if errors:
        raise RequestValidationError(errors)


def check_rerank(req: RerankRequest, settings: Settings, features: Sequence[str], loc: Sequence[Any] = ()) -> list:
    """Errors of one request against the settings' limits and the model's candidate features.

    A valid request (the common case) is confirmed by a few whole-list checks; only a request
    that fails one of them is walked candidate by candidate to name each bad field."""
    if _valid(req, settings, features):
        return []
    return _rerank_errors(req, settings, features, loc)


def _valid(req: RerankRequest, settings: Settings, features: Sequence[str]) -> bool:
    cands = req.candidates
    n = len(cands)
    limit = settings.max_id_length
    if n > settings.max_candidates or len(req.user_id) > limit:
        return False
    if (req.request_id is not None and len(req.request_id) > limit) or (req.top_k is not None and req.top_k > n):
        return False
    if req.context is not None and _too_far_ahead(req.context.timestamp, settings):
        return False
    ids = [c.item_id for c in cands]
    if len(set(ids)) != n or max(map(len, ids)) > limit:
        return False
    missing = [c.score for c in cands].count(None)
    if missing not in (0, n):
        return False
    with_features = [c.features for c in cands if c.features]
    if with_features:
        allowed = set(features) - {RANK_SCORE}
        return all(f.keys() <= allowed for f in with_features)
    return True


def _rerank_errors(req: RerankRequest, settings: Settings, features: Sequence[str], loc: Sequence[Any]) -> list:
    errors = []
    limit = settings.max_id_length
    n = len(req.candidates)
    if n > settings.max_candidates:
        errors.append(_error((*loc, "candidates"), f"at most {settings.max_candidates} candidates, got {n}", n))
    for name, value in (("user_id", req.user_id), ("request_id", req.request_id)):
        if value is not None and len(value) > limit:
            errors.append(_error((*loc, name), f"longer than max_id_length={limit}", value[:limit] + "..."))
    if req.top_k is not None and req.top_k > n:
        errors.append(_error((*loc, "top_k"), f"top_k must be within 1..{n} (the number of candidates)", req.top_k))
    if req.context is not None and _too_far_ahead(req.context.timestamp, settings):
        errors.append(_future_error((*loc, "context", "timestamp"), req.context.timestamp, settings))
    allowed = [f for f in features if f != RANK_SCORE]
    seen: dict[str, int] = {}
    has_score = req.candidates[0].score is not None
    for i, c in enumerate(req.candidates):
        where = (*loc, "candidates", i)
        if len(c.item_id) > limit:
            errors.append(_error((*where, "item_id"), f"longer than max_id_length={limit}", c.item_id[:limit] + "..."))
        if c.item_id in seen:
            msg = f"duplicate item_id {c.item_id!r} (also at candidates[{seen[c.item_id]}])"
            errors.append(_error((*where, "item_id"), msg, c.item_id))
        seen.setdefault(c.item_id, i)
        if (c.score is not None) != has_score:
            errors.append(_error((*where, "score"), "give a score for every candidate or for none", c.score))
        unknown = sorted(set(c.features or ()) - set(allowed))
        if unknown:
            msg = f"unknown feature(s) {unknown}; the model's candidate features are {allowed}"
            if RANK_SCORE in unknown:
                msg += f"; {RANK_SCORE} is given as the candidate's score"
            errors.append(_error((*where, "features"), msg, unknown))
        if len(errors) >= 20:  # enough to fix the request; do not build a huge error body
            break
    return errors


def check_batch(batch: BatchRerankRequest, settings: Settings, features: Sequence[str]) -> None:
    n = len(batch.requests)
    if n > settings.max_batch_requests:
        msg = f"at most {settings.max_batch_requests} requests per batch, got {n}"
        raise_if([_error(("requests",), msg, n)])
    errors = []
    for i, req in enumerate(batch.requests):
        errors += check_rerank(req, settings, features, loc=("requests", i))
    raise_if(errors)


def check_events(events: Sequence[Event], settings: Settings, actions: Sequence[str], batch: bool) -> None:
    errors = []
    if len(events) > settings.max_events:
        errors.append(_error(("events",), f"at most {settings.max_events} events per request", len(events)))
    limit = settings.max_id_length
    for i, e in enumerate(events):
        where = ("events", i) if batch else ()
        for name in ("user_id", "item_id", "event_id"):
            value = getattr(e, name)
            if value is not None and len(value) > limit:
                errors.append(_error((*where, name), f"longer than max_id_length={limit}", value[:limit] + "..."))
        if e.action not in actions:
            errors.append(_error((*where, "action"), f"unknown action; allowed: {list(actions)}", e.action))
        if _too_far_ahead(e.timestamp, settings):
            errors.append(_future_error((*where, "timestamp"), e.timestamp, settings))
        if len(errors) >= 20:
            break
    raise_if(errors)
