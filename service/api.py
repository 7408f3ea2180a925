"""The HTTP contract: request and response models (they are the OpenAPI schema), the reasons an
answer is degraded, and the checks that depend on settings or on the serving model's schema.

Static rules (types, finite numbers, non-empty lists, top_k >= 1, timestamps >= 0) live in the
models; limits that come from settings (max_candidates, max_id_length, max_future_s, ...) and from the model
(known candidate features, behaviour actions) are checked by `check_*`, which raise the same
422 error format FastAPI uses, with the location of the offending field. Each of those rules is
written once: the settings' limits on fields in ID_FIELDS and LIST_LIMITS, which openapi_schema
also states in /openapi.json, the others in the one check that enforces them.
"""

from __future__ import annotations

import copy
import re
import time
from enum import StrEnum
from itertools import groupby, islice
from operator import attrgetter, itemgetter
from typing import Annotated, Any, Literal, NamedTuple

from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic.json_schema import JsonDict

from export.contract.schema import RANK_SCORE, FeatureSchema
from service.settings import Settings

# Numbers reach the model as float32: bound them well inside its range so no input becomes inf.
FLOAT32_SAFE = 1e30
Feature = Annotated[float, Field(ge=-FLOAT32_SAFE, le=FLOAT32_SAFE)]
# A content value: a categorical feature's raw value or a numeric feature's number; which one a
# feature takes is the model's, checked when the item is resolved (a flagged fallback, not a 422).
ContentValue = Annotated[
    Annotated[Annotated[str, Field(max_length=1000)], Tag("string")] | Annotated[Feature, Tag("number")],
    Discriminator(
        lambda v: "string" if isinstance(v, str) else "number" if type(v) in (int, float) else None,
        custom_error_type="content_value",
        custom_error_message="a content value is a string (a categorical feature's raw value) or a number",
    ),
]


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
    content: dict[str, ContentValue] | None = Field(
        None,
        description=(
            "The item's content, content feature -> raw value (a string for a categorical feature, as the data "
            "set wrote it; a number for a numeric one): a sid model ranks an item its vocabulary does not hold "
            "from it (before any content in Redis). Ignored for items the model knows and by id models. A "
            "feature the model does not know, a value of the wrong kind, or no content at all: the item is "
            "scored as out-of-vocabulary and the answer flagged (item_content_invalid, item_content_missing)."
        ),
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


RequestId = Annotated[str, AfterValidator(_header_safe)]
# The pattern is stated for the schema only (openapi_schema moves it onto the string branch): the
# validator above says what is wrong in words.
REQUEST_ID_SCHEMA: JsonDict = {"pattern": HEADER_SAFE_ID.pattern}


class RerankRequest(_Strict):
    request_id: RequestId | None = Field(
        None,
        min_length=1,
        json_schema_extra=REQUEST_ID_SCHEMA,
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


class Degraded(StrEnum):
    """Why an answer was degraded: its `degraded_reasons`, the reason label of psad_degraded_total
    and the log's `degraded` field (docs/service.md, "Degradation rules")."""

    REDIS_UNAVAILABLE = "redis_unavailable"  # the profile read failed: cold-start profile
    REDIS_TIMEOUT = "redis_timeout"  # the profile read exceeded PSAD_REDIS_BUDGET_MS: cold-start profile
    PROFILES_MISSING = "profiles_missing"  # Redis answers without the profile load marker (emptied)
    PROFILE_CORRUPT = "profile_corrupt"  # unparseable profile entries skipped, or unreadable keys
    MODEL_ERROR = "model_error"  # the model call raised: the ranking stage's order
    MODEL_NONFINITE = "model_nonfinite"  # the model returned non-finite scores: the ranking stage's order
    INTERNAL_ERROR = "internal_error"  # any other failure in the pipeline: the ranking stage's order
    ITEM_CONTENT_MISSING = "item_content_missing"  # sid: a new item without content (request or Redis): OOV
    ITEM_CONTENT_INVALID = "item_content_invalid"  # sid: a new item whose content fails validation: OOV


class RankedItem(BaseModel):
    item_id: str
    score: float


class RerankResponse(BaseModel):
    request_id: str
    items: list[RankedItem]
    model_version: str
    degraded: bool
    degraded_reasons: list[Degraded]


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
    request_id: RequestId | None = Field(
        None,
        min_length=1,
        json_schema_extra=REQUEST_ID_SCHEMA,
        description=(
            "The request_id of the /rerank answer this event acts on (same rules as a rerank request's): "
            "with shadow sampling on, the event is joined to that list's record (a click on a served item)."
        ),
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
    """The answer of /admin/reload, built by service.model_store."""

    result: Literal["loaded", "unchanged", "refused", "partial"] = Field(
        description="loaded, unchanged, refused (409), or partial (409: some workers do not serve it; detail says why)"
    )
    version: int = Field(description="the version now serving")
    detail: str
    workers: list[WorkerVersion] = Field(
        default_factory=list, description="With several workers: what each serves after the reload."
    )

    @property
    def status_code(self) -> int:
        """409 when this worker refused the version or some others do not serve it, else 200."""
        return 409 if self.result in ("refused", "partial") else 200


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


ErrorEntry = dict[str, Any]  # one item of a 422's detail: type, loc, msg, input
Loc = tuple[str | int, ...]  # a field's location under the body
MAX_ERRORS = 20  # enough to fix a request; a huge error body helps nobody


class ListLimit(NamedTuple):
    field: str  # a list field of the model
    setting: str  # the Settings field bounding its length


# The settings' limits on fields, each stated once: check_* enforce them and openapi_schema writes
# them into /openapi.json (maxLength, maxItems). Ids are listed in the order their errors appear.
ID_FIELDS: dict[type[BaseModel], tuple[str, ...]] = {
    RerankRequest: ("user_id", "request_id"),
    Candidate: ("item_id",),
    Event: ("user_id", "item_id", "event_id", "request_id"),
}
LIST_LIMITS: dict[type[BaseModel], ListLimit] = {
    RerankRequest: ListLimit("candidates", "max_candidates"),
    BatchRerankRequest: ListLimit("requests", "max_batch_requests"),
    EventBatch: ListLimit("events", "max_events"),
}


def given_features(schema: FeatureSchema) -> list[str]:
    """The candidate features a request may name: the model's, less rank_score (the candidate's score)."""
    return [f.name for f in schema.candidate_numeric if f.name != RANK_SCORE]


def openapi_schema(base: dict[str, Any], settings: Settings, schema: FeatureSchema) -> dict[str, Any]:
    """FastAPI's schema of the models plus what the server enforces from its settings and its
    serving model: id lengths, list sizes, the model's actions and candidate features. Rules JSON
    Schema cannot state (unique item ids, top_k <= len(candidates), a score for every candidate
    or none, timestamps at most max_future_s ahead) are in the fields' descriptions."""
    spec = copy.deepcopy(base)
    models = spec["components"]["schemas"]

    def string(model: str, name: str) -> dict[str, Any]:  # the string branch of a property
        prop = models[model]["properties"][name]
        return next((b for b in prop.get("anyOf", [prop]) if b.get("type") == "string"), prop)

    for model, names in ID_FIELDS.items():
        for name in names:
            string(model.__name__, name)["maxLength"] = settings.max_id_length
    for owner in ("RerankRequest", "Event"):
        string(owner, "request_id")["pattern"] = models[owner]["properties"]["request_id"].pop("pattern")
    for model, limit in LIST_LIMITS.items():
        models[model.__name__]["properties"][limit.field]["maxItems"] = getattr(settings, limit.setting)
    string("Event", "action")["enum"] = list(schema.actions)
    given = next(b for b in models["Candidate"]["properties"]["features"]["anyOf"] if b.get("type") == "object")
    number = given.pop("additionalProperties")
    given.update(properties={f: number for f in given_features(schema)}, additionalProperties=False)
    return spec


def _error(loc: Loc, msg: str, value: Any) -> ErrorEntry:
    return {"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}


def raise_if(errors: list[ErrorEntry]) -> None:
    if errors:
        raise RequestValidationError(errors)


def _limit_errors(obj: BaseModel, settings: Settings, loc: Loc) -> list[ErrorEntry]:
    """The settings' limits on the model's own fields: its list's size (LIST_LIMITS), its ids'
    lengths (ID_FIELDS)."""
    errors = []
    bound = LIST_LIMITS.get(type(obj))
    if bound is not None:
        n, most = len(getattr(obj, bound.field)), getattr(settings, bound.setting)
        if n > most:
            errors.append(_error((*loc, bound.field), f"at most {bound.setting}={most} {bound.field}, got {n}", n))
    limit = settings.max_id_length
    for name in ID_FIELDS.get(type(obj), ()):
        value = getattr(obj, name)
        if value is not None and len(value) > limit:
            errors.append(_error((*loc, name), f"longer than max_id_length={limit}", value[:limit] + "..."))
    return errors


def _too_far_ahead(loc: Loc, timestamp: float | None, settings: Settings) -> list[ErrorEntry]:
    """A timestamp at most max_future_s ahead of the server clock."""
    if timestamp is None:
        return []
    ahead = timestamp - time.time()
    if ahead <= settings.max_future_s:
        return []
    msg = (
        f"{ahead:.0f} s ahead of the server clock (limit: max_future_s={settings.max_future_s}); "
        "send unix seconds, not milliseconds"
    )
    return [_error(loc, msg, timestamp)]


def check_rerank(req: RerankRequest, settings: Settings, schema: FeatureSchema, loc: Loc = ()) -> list[ErrorEntry]:
    """Errors of one request against the settings' limits and the model's candidate features: the
    request's own fields first, then each bad candidate's, in order, until MAX_ERRORS."""
    n = len(req.candidates)
    errors = _limit_errors(req, settings, loc)
    if req.top_k is not None and req.top_k > n:
        errors.append(_error((*loc, "top_k"), f"top_k must be within 1..{n} (the number of candidates)", req.top_k))
    if req.context is not None:
        errors += _too_far_ahead((*loc, "context", "timestamp"), req.context.timestamp, settings)
    found = _candidate_errors(req.candidates, settings, schema, (*loc, "candidates"))
    if found:
        found.sort(key=itemgetter(0))  # stable: a candidate's errors keep the rules' order
        for _, group in groupby(found, key=itemgetter(0)):
            if len(errors) >= MAX_ERRORS:
                break
            errors += [error for _, error in group]
    return errors


def _candidate_errors(
    cands: list[Candidate], settings: Settings, schema: FeatureSchema, loc: Loc
) -> list[tuple[int, ErrorEntry]]:
    """(candidate index, error) for the rules candidates break. Each rule is first tested on the
    whole list in one pass, so a valid request (the common case) costs only those passes; a rule
    that fails then walks the candidates to name the first MAX_ERRORS that break it (check_rerank
    answers no more, so a list of a million bad candidates costs no more than one of twenty)."""
    found: list[tuple[int, ErrorEntry]] = []
    limit = settings.max_id_length
    ids = [c.item_id for c in cands]  # also read by the duplicate rule
    for name in ID_FIELDS[Candidate]:
        values = ids if name == "item_id" else list(map(attrgetter(name), cands))
        if max(map(len, values)) > limit:
            msg = f"longer than max_id_length={limit}"
            long = ((i, v) for i, v in enumerate(values) if len(v) > limit)
            found += [(i, _error((*loc, i, name), msg, v[:limit] + "...")) for i, v in islice(long, MAX_ERRORS)]
    if len(set(ids)) < len(ids):
        first: dict[str, int] = {}
        seen = ((i, first.setdefault(item, i), item) for i, item in enumerate(ids))  # lazily: in order
        for i, j, item in islice(((i, j, item) for i, j, item in seen if j != i), MAX_ERRORS):
            msg = f"duplicate item_id {item!r} (also at candidates[{j}])"
            found.append((i, _error((*loc, i, "item_id"), msg, item)))
    scores = [c.score for c in cands]
    if 0 < scores.count(None) < len(scores):
        has_score = scores[0] is not None
        odd = ((i, s) for i, s in enumerate(scores) if (s is not None) != has_score)
        msg = "give a score for every candidate or for none"
        found += [(i, _error((*loc, i, "score"), msg, s)) for i, s in islice(odd, MAX_ERRORS)]
    with_features = [c.features for c in cands if c.features]
    if with_features:
        allowed = given_features(schema)
        known = set(allowed)
        if not all(f.keys() <= known for f in with_features):
            unknowns = ((i, sorted(set(c.features or ()) - known)) for i, c in enumerate(cands))
            for i, unknown in islice(((i, u) for i, u in unknowns if u), MAX_ERRORS):
                msg = f"unknown feature(s) {unknown}; the model's candidate features are {allowed}"
                if RANK_SCORE in unknown:
                    msg += f"; {RANK_SCORE} is given as the candidate's score"
                found.append((i, _error((*loc, i, "features"), msg, unknown)))
    return found


def check_batch(batch: BatchRerankRequest, settings: Settings, schema: FeatureSchema) -> None:
    raise_if(_limit_errors(batch, settings, ()))
    raise_if([e for i, req in enumerate(batch.requests) for e in check_rerank(req, settings, schema, ("requests", i))])


def check_events(body: Event | EventBatch, settings: Settings, schema: FeatureSchema) -> None:
    """A batch's errors are located under ("events", i), a single event's at the body's fields."""
    if isinstance(body, EventBatch):
        events, errors = body.events, _limit_errors(body, settings, ())
    else:
        events, errors = [body], []
    for i, e in enumerate(events):
        where: Loc = ("events", i) if isinstance(body, EventBatch) else ()
        errors += _limit_errors(e, settings, where)
        if e.action not in schema.actions:
            errors.append(_error((*where, "action"), f"unknown action; allowed: {list(schema.actions)}", e.action))
        errors += _too_far_ahead((*where, "timestamp"), e.timestamp, settings)
        if len(errors) >= MAX_ERRORS:
            break
    raise_if(errors)


# KServe / Open Inference Protocol v2: read-only aliases of the health routes and the model's signature.
OIP_DATATYPES = {"int64": "INT64", "float32": "FP32", "bool": "BOOL"}  # numpy dtype name -> OIP datatype
OIP_PLATFORM = "onnxruntime_onnx"


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="OIP datatype: INT64, FP32, BOOL")
    shape: list[int] = Field(description="-1 for a dynamic axis (batch, list, history)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OipError(BaseModel):
    error: str


def model_metadata(name: str, version: int, manifest: dict[str, Any]) -> ModelMetadata:
    """The served bundle's signature as OIP metadata, read from its (verified) manifest."""

    def tensors(specs: list[dict[str, Any]]) -> list[TensorMetadata]:
        return [
            TensorMetadata(
                name=s["name"],
                datatype=OIP_DATATYPES[s["dtype"]],
                shape=[int(d) if d.isdigit() else -1 for d in s["dims"]],
            )
            for s in specs
        ]

    return ModelMetadata(
        name=name,
        versions=[str(version)],
        platform=OIP_PLATFORM,
        inputs=tensors(manifest["inputs"]),
        outputs=tensors(manifest["outputs"]),
    )
