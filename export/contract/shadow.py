"""Shadow records: what the service samples to a Redis Stream, and `psad shadow run` re-scores.

The one definition of the record format (docs/shadow.md describes it for readers in other
languages), the stream keys and the sampling rule, shared by the writer (service.shadow) and the
consumer (psad.shadow). Every shadow key carries the hash tag ``{shadow}`` after the prefix, so
with Redis Cluster they share one slot and one script may touch them all:

    <prefix>:{shadow}:records    stream: list and click records (XADD ... MAXLEN ~ N)
    <prefix>:{shadow}:dead       stream: records the consumer cannot use, with the reason
    <prefix>:{shadow}:done       sorted set: records whose result is written (the record id, or
                                 click:<len>:<request id>:<event id>; score = the record id's ms)
    <prefix>:{shadow}:ranks:<request id>   string, with a TTL: a processed list's ranks, for clicks

A record is a stream entry with these fields (bytes):

    v       FORMAT, as text: a reader refuses another
    kind    "list" (an answered list) or "click" (an /events event naming a request id)
    meta    JSON (below)
    in.<name>   list records only: one model input of this list, as the student scored it
                (batch dimension 1), raw C-order little-endian bytes; meta["inputs"] gives each
                one's dtype and shape

A list's meta: request_id, time (unix s, when answered), model, version, user_id, items (the
candidate ids in request order), scores (the student's, in request order), served (candidate
indices in the answer's order: top_k of them), degraded_reasons, inputs. A click's meta:
request_id, time, user_id, item_id, action, event_id (or null).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from export.contract.schema import INPUT_DTYPES, INPUT_NAMES

FORMAT = 1
KINDS = ("list", "click")
INPUT_FIELD = "in."
GROUP = "psad-shadow"  # the consumer group every `psad shadow run` joins
_DTYPE_NAMES = {np.dtype(name): name for name in INPUT_DTYPES}  # a lookup: dtype.name is slow
_SAMPLE_SPACE = 2**64
_NATIVE_LITTLE = sys.byteorder == "little"


class RecordError(ValueError):
    """A stream entry that is not a usable record (truncated, another format, bad fields): the
    message says which field and why. The consumer sends such entries to the dead-letter stream."""


def stream_key(prefix: str) -> str:
    return f"{prefix}:{{shadow}}:records"


def dead_letter_key(prefix: str) -> str:
    return f"{prefix}:{{shadow}}:dead"


def done_key(prefix: str) -> str:
    return f"{prefix}:{{shadow}}:done"


def ranks_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:{{shadow}}:ranks:{request_id}"


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is shadowed: decided by a hash of its id, so every process, restart and
    replay samples the same requests, and a click names a sampled list exactly when its list was."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < rate * _SAMPLE_SPACE


@dataclass
class ListRecord:
    """An answered list, with the model inputs exactly as the student scored them."""

    request_id: str
    time: float
    model: str
    version: int
    user_id: str
    items: list[str]
    scores: list[float]
    served: list[int]
    degraded_reasons: list[str]
    inputs: dict[str, np.ndarray]  # INPUT_NAMES -> array with batch dimension 1


@dataclass
class ClickRecord:
    """An event posted to /events with the request id of the list it acted on."""

    request_id: str
    time: float
    user_id: str
    item_id: str
    action: str
    event_id: str | None


def encode_list(record: ListRecord) -> dict[bytes, bytes]:
    meta = {
        "request_id": record.request_id,
        "time": record.time,
        "model": record.model,
        "version": record.version,
        "user_id": record.user_id,
        "items": record.items,
        "scores": record.scores,
        "served": record.served,
        "degraded_reasons": record.degraded_reasons,
        "inputs": {n: {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape)} for n, a in record.inputs.items()},
    }
    fields = {b"v": b"%d" % FORMAT, b"kind": b"list", b"meta": orjson.dumps(meta)}
    for name, array in record.inputs.items():
        fields[(INPUT_FIELD + name).encode()] = _little_endian_bytes(array)
    return fields


def _little_endian_bytes(array: np.ndarray) -> bytes:
    """C-order little-endian bytes. tobytes() is C order already; on a little-endian machine a
    native array is written as it is, without a conversion pass."""
    if _NATIVE_LITTLE and array.dtype.byteorder != ">":
        return array.tobytes()
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()


def encode_click(record: ClickRecord) -> dict[bytes, bytes]:
    meta = {
        "request_id": record.request_id,
        "time": record.time,
        "user_id": record.user_id,
        "item_id": record.item_id,
        "action": record.action,
        "event_id": record.event_id,
    }
    return {b"v": b"%d" % FORMAT, b"kind": b"click", b"meta": orjson.dumps(meta)}


def xadd_command(prefix: str, fields: Mapping[bytes, bytes], maxlen: int) -> tuple[Any, ...]:
    """The XADD that appends a record, trimming the stream to about `maxlen` entries (`~`: Redis
    trims whole macro nodes, which is cheap)."""
    args: list[Any] = ["XADD", stream_key(prefix), "MAXLEN", "~", maxlen, "*"]
    for key, value in fields.items():
        args += [key, value]
    return tuple(args)


def decode(fields: Mapping[bytes, bytes]) -> ListRecord | ClickRecord:
    """A stream entry's fields -> its record; RecordError naming what is wrong otherwise."""
    version = fields.get(b"v")
    if version != b"%d" % FORMAT:
        raise RecordError(f"field v: format {_shown(version)}, this reader reads format {FORMAT}")
    kind = fields.get(b"kind")
    if kind is None or kind.decode("latin-1") not in KINDS:
        raise RecordError(f"field kind: {_shown(kind)}, expected one of {list(KINDS)}")
    try:
        meta = orjson.loads(fields.get(b"meta", b""))
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"field meta: not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise RecordError("field meta: not a JSON object")
    if kind == b"click":
        return ClickRecord(
            request_id=_get(meta, "request_id", str),
            time=_time(meta),
            user_id=_get(meta, "user_id", str),
            item_id=_get(meta, "item_id", str),
            action=_get(meta, "action", str),
            event_id=_get(meta, "event_id", str, optional=True),
        )
    record = ListRecord(
        request_id=_get(meta, "request_id", str),
        time=_time(meta),
        model=_get(meta, "model", str),
        version=_get(meta, "version", int),
        user_id=_get(meta, "user_id", str),
        items=_list(meta, "items", str),
        scores=_list(meta, "scores", float),
        served=_list(meta, "served", int),
        degraded_reasons=_list(meta, "degraded_reasons", str),
        inputs=_inputs(meta, fields),
    )
    n = len(record.items)
    if n == 0 or len(record.scores) != n:
        raise RecordError(f"fields items/scores: {n} items and {len(record.scores)} scores; expected as many, >= 1")
    if any(not 0 <= i < n for i in record.served) or len(set(record.served)) != len(record.served):
        raise RecordError(f"field served: expected distinct candidate indices in [0, {n})")
    return record


def _inputs(meta: dict[str, Any], fields: Mapping[bytes, bytes]) -> dict[str, np.ndarray]:
    specs = meta.get("inputs")
    if not isinstance(specs, dict) or sorted(specs) != sorted(INPUT_NAMES):
        raise RecordError(f"field meta.inputs: expected a dtype and shape for each of {list(INPUT_NAMES)}")
    out = {}
    for name, expected in zip(INPUT_NAMES, INPUT_DTYPES, strict=True):
        spec = specs[name]
        dtype, shape = (spec.get("dtype"), spec.get("shape")) if isinstance(spec, dict) else (None, None)
        if dtype != expected or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RecordError(f"field meta.inputs.{name}: expected dtype {expected} and a shape (a list of sizes)")
        if not shape or shape[0] != 1:
            raise RecordError(f"field meta.inputs.{name}: shape {shape}, expected a batch dimension of 1")
        raw = fields.get((INPUT_FIELD + name).encode())
        want = math.prod(shape) * np.dtype(dtype).itemsize
        if raw is None or len(raw) != want:
            got = "missing" if raw is None else f"{len(raw)} bytes"
            raise RecordError(f"field {INPUT_FIELD}{name}: {got}, expected {want} bytes ({dtype} {shape})")
        out[name] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
    return out


def _get(meta: dict[str, Any], key: str, kind: type, optional: bool = False) -> Any:
    value = meta.get(key)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RecordError(f"field meta.{key}: {_shown(value)}, expected {kind.__name__}")
    return value


def _time(meta: dict[str, Any]) -> float:
    value = _get(meta, "time", float)
    if not math.isfinite(value) or value < 0:
        raise RecordError(f"field meta.time: {value!r}, expected unix seconds")
    return value


def _list(meta: dict[str, Any], key: str, kind: type) -> list[Any]:
    value = meta.get(key)
    if not isinstance(value, list):
        raise RecordError(f"field meta.{key}: {_shown(value)}, expected a list of {kind.__name__}")
    return [_get({key: v}, key, kind) for v in value]


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def encode(record: ListRecord | ClickRecord) -> dict[bytes, bytes]:
    """A record's stream fields."""
    return encode_list(record) if isinstance(record, ListRecord) else encode_click(record)
