"""The on-disk data-set format, written by every builder and read by training and profile loading.

A data set is a directory:

    schema.json        FeatureSchema (versioned)
    vocab.json         Vocabularies: item ids and categorical user-feature values
    stats.json         the summary printed at build time (per split: lists, users, time range, ...)
    users.parquet      user_id (str), <user categorical> (int64, encoded), <user numeric> (float32)
    items.parquet      item_index (int64, 0..n_items-1 in order), item_id (str, "" for reserved rows),
                       <item categorical> (int64), <item numeric> (float32)
    behaviours.parquet user_id (str), item_id (str), timestamp (int64, unix s), action (str);
                       sorted by user_id, timestamp; the source of histories and online profiles
    {train,val,test}.parquet  one row per displayed list:
                       list_id (int64), user_id (str), timestamp (int64),
                       items (list<int64>, encoded, in the ranking stage's order),
                       cand_<name> (list<float32>) for each schema.candidate_numeric feature,
                       labels (list<float32>),
                       hist_items / hist_ts / hist_actions (list<int64>): the user's last
                       max_history behaviours strictly before `timestamp`, oldest first;
                       builders may add list columns of their own (the simulator adds
                       `attraction` and `shown_position`), carried through as `extras`.
Builders that stream (trivago) write the splits in chunks through `SplitWriter`; the others
hand whole frames to `write_dataset`, which uses the same writer.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from export.contract.inputs import EncodedProfile, assemble
from export.contract.schema import FeatureSchema, SchemaError, Vocabularies

SPLITS = ("train", "val", "test")
SHOWN_POSITION = "shown_position"  # optional list column: the 0-based rank each candidate was displayed at
LIST_COLUMNS = ("list_id", "user_id", "timestamp", "items", "labels", "hist_items", "hist_ts", "hist_actions")


class DataError(ValueError):
    """A data file is invalid; the message names the file, row and column and the fix."""


@dataclass
class ListData:
    """One split, padded and ready for batching: model inputs plus labels and extras."""

    inputs: dict[str, np.ndarray]  # as export.contract.inputs.assemble returns
    labels: np.ndarray  # float32 [N, L]
    list_ids: np.ndarray  # int64 [N]
    user_ids: np.ndarray  # object [N]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # float32 [N, L] each

    def __len__(self) -> int:
        return len(self.labels)

    def shown_order(self) -> np.ndarray:
        """int64 [N, L]: the candidate index at each displayed rank, from the `shown_position` extra
        (padded candidates last); what a teacher trained on the displayed order reads."""
        if SHOWN_POSITION not in self.extras:
            raise DataError(
                f"the data set has no `{SHOWN_POSITION}` list column (the rank each candidate was displayed "
                "at): build it with `psad data build synthetic --logging-policy ...`, or train with "
                'model.teacher_target = "own"'
            )
        mask = self.inputs["cand_mask"]
        position = np.where(mask, self.extras[SHOWN_POSITION], np.inf)
        order = np.argsort(position, axis=1, kind="stable")
        shown = np.take_along_axis(position, order, axis=1)
        repeated = (shown[:, 1:] == shown[:, :-1]) & np.isfinite(shown[:, 1:])
        bad = repeated.any(axis=1) | (~np.isfinite(self.extras[SHOWN_POSITION]) & mask).any(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"list {self.list_ids[row]}: `{SHOWN_POSITION}` must give each candidate its own finite "
                'displayed rank; fix the column or train with model.teacher_target = "own"'
            )
        return order

    def take(self, idx: np.ndarray) -> ListData:
        return ListData(
            inputs={k: v[idx] for k, v in self.inputs.items()},
            labels=self.labels[idx],
            list_ids=self.list_ids[idx],
            user_ids=self.user_ids[idx],
            extras={k: v[idx] for k, v in self.extras.items()},
        )


def write_dataset(
    out: Path,
    schema: FeatureSchema,
    vocabs: Vocabularies,
    users: pd.DataFrame,
    items: pd.DataFrame,
    behaviours: pd.DataFrame,
    splits: dict[str, pd.DataFrame],
) -> dict:
    """Validate and write a data set held in memory; returns the summary (also saved as stats.json)."""
    out = Path(out)
    write_side_tables(out, schema, vocabs, users, items)
    behaviours.to_parquet(out / "behaviours.parquet", index=False)
    summaries = {}
    for name in SPLITS:
        with SplitWriter(out, name, schema) as writer:
            if name in splits:
                writer.write(splits[name])
        summaries[name] = writer.summary
    return write_stats(out, summaries, n_users=len(users), n_items=schema.n_items, known_items=schema.known_items)


def write_side_tables(
    out: Path, schema: FeatureSchema, vocabs: Vocabularies, users: pd.DataFrame, items: pd.DataFrame
) -> None:
    """schema.json, vocab.json, users.parquet and items.parquet, checked against each other."""
    schema.validate()
    if len(items) != schema.n_items:
        raise DataError(f"items table has {len(items)} rows but schema.n_items={schema.n_items}")
    out.mkdir(parents=True, exist_ok=True)
    schema.save(out / "schema.json")
    vocabs.save(out / "vocab.json")
    users.to_parquet(out / "users.parquet", index=False)
    items.to_parquet(out / "items.parquet", index=False)


@dataclass
class SplitSummary:
    """Running totals of one split: the build summary without holding the split in memory.

    With `known_items` (schema.known_items, > 0 in a cold-item split) it also counts the candidates
    that are cold items (index >= known_items), so a build says how much of val/test tests them.
    """

    known_items: int = 0
    lists: int = 0
    users: set[str] = field(default_factory=set)
    candidates: int = 0
    history: int = 0
    clicked: int = 0
    first_timestamp: int | None = None
    last_timestamp: int | None = None
    cold_lists: int = 0
    cold_candidates: int = 0
    cold_clicks: int = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        total = lambda column: int(pc.sum(pc.list_value_length(table[column])).as_py())  # noqa: E731
        self.lists += table.num_rows
        self.users.update(table["user_id"].to_pylist())
        self.candidates += total("items")
        self.history += total("hist_items")
        self.clicked += int(pc.sum(pc.greater(pc.list_flatten(table["labels"]), 0)).as_py())
        span = pc.min_max(table["timestamp"])
        first, last = span["min"].as_py(), span["max"].as_py()
        self.first_timestamp = first if self.first_timestamp is None else min(first, self.first_timestamp)
        self.last_timestamp = last if self.last_timestamp is None else max(last, self.last_timestamp)
        if self.known_items:
            cold = pc.greater_equal(pc.list_flatten(table["items"]), self.known_items)
            rows = pc.filter(pc.list_parent_indices(table["items"]), cold)
            self.cold_lists += len(pc.unique(rows))
            self.cold_candidates += int(pc.sum(cold).as_py() or 0)
            clicked = pc.and_(cold, pc.greater(pc.list_flatten(table["labels"]), 0))
            self.cold_clicks += int(pc.sum(clicked).as_py() or 0)

    def to_dict(self) -> dict:
        return {
            "lists": self.lists,
            "users": len(self.users),
            "mean_list_length": self.candidates / self.lists if self.lists else 0.0,
            "mean_history_length": self.history / self.lists if self.lists else 0.0,
            "click_rate": self.clicked / self.candidates if self.candidates else 0.0,
            "first_timestamp": self.first_timestamp,
            "last_timestamp": self.last_timestamp,
            **(self.cold_dict() if self.known_items else {}),
        }

    def cold_dict(self) -> dict:
        return {
            "lists_with_cold_items": self.cold_lists,
            "cold_candidate_share": self.cold_candidates / self.candidates if self.candidates else 0.0,
            "cold_item_clicks": self.cold_clicks,
        }


class SplitWriter:
    """Writes one split's lists to `{split}.parquet` in chunks, so a builder can stream them.

    Every chunk is checked for the columns the format needs and cast to the first chunk's types;
    a split left empty is refused on close, as the format needs all three.
    """

    def __init__(self, out: Path, split: str, schema: FeatureSchema):
        self.path = Path(out) / f"{split}.parquet"
        self.split = split
        self.required = [*LIST_COLUMNS, *(f"cand_{f.name}" for f in schema.candidate_numeric)]
        self.summary = SplitSummary(known_items=schema.known_items)
        self._writer: pq.ParquetWriter | None = None

    def write(self, lists: pd.DataFrame | pa.Table) -> None:
        table = pa.Table.from_pandas(lists, preserve_index=False) if isinstance(lists, pd.DataFrame) else lists
        missing = [c for c in self.required if c not in table.column_names]
        if missing:
            raise DataError(f"split {self.split!r} lacks column(s) {missing}")
        if table.num_rows == 0:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table.cast(self._writer.schema))
        self.summary.add(table)

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._writer is not None:
            self._writer.close()
        if exc_type is None and self.summary.lists == 0:
            raise DataError(f"split {self.split!r} is empty: the source has too little data after filtering")


def write_stats(
    out: Path, summaries: dict[str, SplitSummary], n_users: int, n_items: int, known_items: int = 0
) -> dict:
    """stats.json; a cold-item split (known_items > 0) also gets `cold_items`, the items after the known ones."""
    stats: dict = {"users": n_users, "items": n_items - 2}
    if known_items:
        stats["cold_items"] = n_items - known_items
    stats["splits"] = {s: summaries[s].to_dict() for s in SPLITS}
    (Path(out) / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield an empty sibling directory to build into, moved to `out` only when the block completes.

    A failed build so leaves `out` as it was (the old data set, or nothing), never a mix of old and
    new files. `out` may be new, empty or an earlier data set; anything else is refused, not deleted.
    """
    out = Path(out).resolve()
    if out.exists() and not (out / "schema.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not a data set (no schema.json); choose a new or empty --out")
    tag = uuid.uuid4().hex[:8]
    new, old = out.with_name(f".{out.name}.new-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    out.parent.mkdir(parents=True, exist_ok=True)
    new.mkdir()
    try:
        yield new
        if out.exists():
            out.rename(old)
        try:
            new.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
    finally:
        shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def format_summary(stats: dict) -> str:
    rows = [f"users {stats['users']:,}   items {stats['items']:,}"]
    rows.append(
        f"{'split':<6} {'lists':>9} {'users':>7} {'mean L':>7} {'mean H':>7} {'click rate':>10}  "
        f"{'from (UTC)':<16}  {'to (UTC)':<16}"
    )
    for name, s in stats["splits"].items():
        rows.append(
            f"{name:<6} {s['lists']:>9,} {s['users']:>7,} {s['mean_list_length']:>7.2f} "
            f"{s['mean_history_length']:>7.2f} {s['click_rate']:>10.4f}  "
            f"{_utc(s.get('first_timestamp')):<16}  {_utc(s.get('last_timestamp')):<16}"
        )
    if "cold_items" in stats:
        rows[0] += f"   cold items {stats['cold_items']:,} (first seen after the training period)"
        rows.append(f"{'split':<6} {'lists with cold':>15} {'cold share':>10} {'cold clicks':>11}")
        for name, s in stats["splits"].items():
            rows.append(
                f"{name:<6} {s['lists_with_cold_items']:>15,} {s['cold_candidate_share']:>10.4f} "
                f"{s['cold_item_clicks']:>11,}"
            )
    return "\n".join(rows)


def _utc(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def load_schema(data_dir: Path) -> FeatureSchema:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found; build one with `psad data build`")
    return FeatureSchema.load(data_dir / "schema.json")


def load_vocabs(data_dir: Path, schema: FeatureSchema) -> Vocabularies:
    return Vocabularies.load(Path(data_dir) / "vocab.json", schema)


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A data-set table; a missing or unreadable file (truncated copy, disk error) is a DataError naming it."""
    if not Path(path).is_file():
        raise DataError(f"{path}: not found; rebuild the data set with `psad data build`")
    try:
        return pd.read_parquet(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); rebuild the data set with `psad data build`") from None


def load_items(data_dir: Path, schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray]:
    """Item side tables by item index: categorical int64 [n_items, n_cat], numeric float32 [n_items, n_num]."""
    df = read_parquet(Path(data_dir) / "items.parquet")
    if len(df) != schema.n_items or not (df["item_index"].to_numpy() == np.arange(schema.n_items)).all():
        raise DataError(f"{data_dir}/items.parquet: item_index must be 0..{schema.n_items - 1} in order")
    cat = df[[f.name for f in schema.item_categorical]].to_numpy(dtype=np.int64).reshape(len(df), -1)
    num = df[[f.name for f in schema.item_numeric]].to_numpy(dtype=np.float32).reshape(len(df), -1)
    return cat, num


def load_users(data_dir: Path, schema: FeatureSchema) -> pd.DataFrame:
    return read_parquet(Path(data_dir) / "users.parquet").set_index("user_id")


def load_split(data_dir: Path, split: str, schema: FeatureSchema | None = None) -> ListData:
    """Read one split and assemble its model inputs with the same code the service uses."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    schema = schema or load_schema(data_dir)
    path = data_dir / f"{split}.parquet"
    df = read_parquet(path)
    users = load_users(data_dir, schema)
    ucat_cols = [f.name for f in schema.user_categorical]
    unum_cols = [f.name for f in schema.user_numeric]
    known = df["user_id"].isin(users.index)
    if not known.all():
        raise DataError(f"{path}: user_id {df.loc[~known, 'user_id'].iloc[0]!r} is not in users.parquet")
    urows = users.loc[df["user_id"]]
    ucat = urows[ucat_cols].to_numpy(dtype=np.int64).reshape(len(df), -1)
    unum = urows[unum_cols].to_numpy(dtype=np.float32).reshape(len(df), -1)
    profiles = [
        EncodedProfile(
            user_cat=ucat[i],
            user_num=unum[i],
            hist_items=np.asarray(hi, dtype=np.int64),
            hist_ts=np.asarray(ht, dtype=np.int64),
            hist_actions=np.asarray(ha, dtype=np.int64),
        )
        for i, (hi, ht, ha) in enumerate(zip(df["hist_items"], df["hist_ts"], df["hist_actions"], strict=True))
    ]
    cand_items = [np.asarray(x, dtype=np.int64) for x in df["items"]]
    num_cols = [df[f"cand_{f.name}"] for f in schema.candidate_numeric]
    cand_num = [
        np.stack([np.asarray(col.iloc[i], dtype=np.float32) for col in num_cols], axis=-1)
        if num_cols
        else np.zeros((len(cand_items[i]), 0), np.float32)
        for i in range(len(df))
    ]
    inputs = assemble(schema, profiles, cand_items, cand_num, df["timestamp"].to_numpy(dtype=np.float64))
    lmax = inputs["cand_items"].shape[1]

    def pad(col: pd.Series) -> np.ndarray:
        arr = np.zeros((len(df), lmax), dtype=np.float32)
        for i, x in enumerate(col):
            arr[i, : len(x)] = x
        return arr

    extra_cols = [c for c in df.columns if c not in LIST_COLUMNS and not c.startswith("cand_")]
    return ListData(
        inputs=inputs,
        labels=pad(df["labels"]),
        list_ids=df["list_id"].to_numpy(dtype=np.int64),
        user_ids=df["user_id"].to_numpy(dtype=object),
        extras={c: pad(df[c]) for c in extra_cols},
    )


def check_schema_files(data_dir: Path) -> None:
    """Fail early with a clear message when a directory is not a data set."""
    for name in ("schema.json", "vocab.json", "items.parquet", "users.parquet", *(f"{s}.parquet" for s in SPLITS)):
        if not (Path(data_dir) / name).is_file():
            raise SchemaError(f"{data_dir}: {name} missing; is this a data set built by `psad data build`?")
