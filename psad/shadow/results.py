"""The consumer's results on disk: parquet part files per kind and time window, read back one row per record.

    <root>/<kind>/window=<YYYYMMDDTHHMMZ>/part-<consumer>-<first record id>.parquet

kind is "lists" or "clicks"; the window is the record's `time` floored to the consumer's window
(UTC). A part is written atomically (a hidden temporary file, fsync, rename), so a reader never
sees half a file. Delivery is at least once: a record redelivered after a crash can sit in two
parts with identical content, so `read` keeps one row per `record_id`, which makes the results
idempotent whatever the crashes. A click with an event_id is kept once per (request_id,
event_id): an /events call retried with the same event_id is one event, though the service
recorded it twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

_INDICES = pa.list_(pa.int32())
LISTS_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("request_id", pa.string()),
        ("time", pa.float64()),
        ("model", pa.string()),
        ("version", pa.int64()),
        ("user_id", pa.string()),
        ("n", pa.int32()),
        ("k", pa.int32()),
        ("kendall_tau", pa.float64()),
        ("topk_overlap", pa.float64()),
        ("ndcg", pa.float64()),
        ("first_agree", pa.bool_()),
        ("degraded", pa.bool_()),
        ("degraded_reasons", pa.list_(pa.string())),
        ("items", pa.list_(pa.string())),
        ("student_order", _INDICES),
        ("teacher_order", _INDICES),
        ("served", _INDICES),
        ("processed_at", pa.float64()),
        ("consumer", pa.string()),
    ]
)
CLICKS_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("request_id", pa.string()),
        ("event_id", pa.string()),  # the /events idempotency key; null when the event had none
        ("time", pa.float64()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("action", pa.string()),
        ("matched", pa.bool_()),
        ("version", pa.int64()),  # null when unmatched
        ("student_rank", pa.int32()),  # 1-based; null when unmatched or the item is not in the list
        ("teacher_rank", pa.int32()),
        ("served_rank", pa.int32()),  # null also when the item was not in the served answer
        ("processed_at", pa.float64()),
        ("consumer", pa.string()),
    ]
)
SCHEMAS: Mapping[str, pa.Schema] = {"lists": LISTS_SCHEMA, "clicks": CLICKS_SCHEMA}
WINDOW_FORMAT = "%Y%m%dT%H%MZ"


def window_name(time: float, window_s: int) -> str:
    """The window directory's name for a record time (unix s): its start, UTC, to the minute."""
    start = int(time // window_s) * window_s
    return datetime.fromtimestamp(start, UTC).strftime(WINDOW_FORMAT)


def write(root: Path, kind: str, rows: Sequence[Mapping[str, Any]], consumer: str, window_s: int) -> list[Path]:
    """Write rows (dicts with the kind's columns, in batch order) as one part per window; returns the paths."""
    schema = _schema(kind)
    windows: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        windows.setdefault(window_name(row["time"], window_s), []).append(row)
    paths = []
    for window, group in windows.items():
        path = Path(root) / kind / f"window={window}" / f"part-{consumer}-{group[0]['record_id']}.parquet"
        _write_atomic(pa.Table.from_pylist(list(group), schema=schema), path)
        paths.append(path)
    return paths


def read(
    root: Path, kind: str, start: float | datetime | None = None, end: float | datetime | None = None
) -> pd.DataFrame:
    """Every result of `kind` under root with start <= time < end (unix s or aware datetimes; None =
    unbounded), one row per record_id (clicks with an event_id: the first per (request_id,
    event_id)), ordered by time then record id. Empty: a frame with the columns."""
    schema = _schema(kind)
    lo, hi = _seconds(start), _seconds(end)
    tables = [_read_part(path, schema) for path in _parts(Path(root) / kind, hi)]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    frame = table.to_pandas()
    if lo is not None:
        frame = frame[frame["time"] >= lo]
    if hi is not None:
        frame = frame[frame["time"] < hi]
    frame = frame.sort_values(["time", "record_id"], kind="stable")
    return frame[~_identity(frame, kind).duplicated(keep="first")].reset_index(drop=True)


def event_key(request_id: str, event_id: str) -> str:
    """One event of a list, whatever records carried it: the key the consumer's done set and `read`
    share. The request id's length comes first: both ids may contain ':', and ("a:b", "c") must
    not meet ("a", "b:c"). A stream id ("<ms>-<seq>") never starts with "click:"."""
    return f"click:{len(request_id)}:{request_id}:{event_id}"


def _identity(frame: pd.DataFrame, kind: str) -> pd.Series:
    """What makes two rows one result: the record id, or a click's event_key."""
    if kind != "clicks":
        return frame["record_id"]
    keys = [
        record if pd.isna(event) else event_key(request, event)
        for record, request, event in zip(frame["record_id"], frame["request_id"], frame["event_id"], strict=True)
    ]
    return pd.Series(keys, index=frame.index)


def _parts(kind_dir: Path, end: float | None) -> Iterable[Path]:
    """Part files, skipping windows that start at or after `end` (none of their records can be earlier)."""
    for window in sorted(kind_dir.glob("window=*")):
        if end is not None:
            started = datetime.strptime(window.name.removeprefix("window="), WINDOW_FORMAT).replace(tzinfo=UTC)
            if started.timestamp() >= end:
                continue
        yield from sorted(window.glob("part-*.parquet"))


def _read_part(path: Path, schema: pa.Schema) -> pa.Table:
    try:
        return pq.read_table(path, schema=schema)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(
            f"{path}: cannot be read as a shadow result part ({exc}); move it away to read the rest"
        ) from None


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: not matched by part-*.parquet
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def _schema(kind: str) -> pa.Schema:
    if kind not in SCHEMAS:
        raise ValueError(f"kind must be one of {list(SCHEMAS)}, got {kind!r}")
    return SCHEMAS[kind]


def _seconds(bound: float | datetime | None) -> float | None:
    if isinstance(bound, datetime):
        if bound.tzinfo is None:
            raise ValueError(f"time bound {bound.isoformat()}: give a timezone (e.g. +00:00) or unix seconds")
        return bound.timestamp()
    return None if bound is None else float(bound)
