"""RecSys Challenge 2019 (trivago) session logs -> the on-disk data-set format, in bounded memory.

Recipe (docs/data.md#trivago): one list per clickout whose clicked hotel is among its impressions
and which shows at least 2 hotels. The candidates are the impressions in display order (the
ranking stage's order), label 1 on the clicked hotel and 0 on the others; candidate features are
the price, its rank within the list and the display position (as `rank_score` = -position). A
list's history is the user's item-level actions (image, info, rating, deals, item search and
earlier clickouts) strictly before the clickout, across the user's sessions. Lists are split
80/10/10 by clickout time.

The item vocabulary is the catalogue: every hotel the log names, not only those shown in training.
A hotel first shown after training keeps an untrained embedding but its own identity, so a click
on a hotel the user looked at before stays visible as a repeat (much of this log's signal);
hotel ids carry no label, so nothing leaks.

The challenge's train.csv has 15.9 M rows, so nothing holds the file at once:
1. pyarrow reads the source in batches; each batch is validated (errors name file, row, column)
   and written to typed work files: item behaviours, clickouts, each user's first context.
2. DuckDB, memory-capped and spilling to disk, picks the lists, the item vocabulary and the users.
3. The events of each user stream in time order past a window of their last H behaviours; each
   list is written to its split in chunks as it goes by.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from export.contract.schema import (
    N_RESERVED,
    OOV,
    RANK_SCORE,
    CategoricalFeature,
    FeatureSchema,
    NumericFeature,
    Vocab,
    Vocabularies,
)
from training.data.generic import (
    MIN_LIST,
    SPLIT_FRACTIONS,
    check_ids,
    check_numeric,
    check_timestamps,
    fail_rows,
    format_order_quality,
    format_split,
    split_by_time,
    time_split,
)
from training.data.initial_ranker import order_quality
from training.data.store import (
    SPLITS,
    DataError,
    SplitWriter,
    read_parquet,
    staged,
    write_side_tables,
    write_stats,
)

COLUMNS = (
    "user_id", "session_id", "timestamp", "step", "action_type", "reference",
    "platform", "city", "device", "current_filters", "impressions", "prices",
)  # fmt: skip
CLICKOUT = "clickout item"
ITEM_ACTIONS = {
    CLICKOUT: "clickout",
    "interaction item image": "image",
    "interaction item info": "info",
    "interaction item rating": "rating",
    "interaction item deals": "deals",
    "search for item": "search",
}  # the challenge's action types that name a hotel -> behaviour action
OTHER_ACTIONS = ("filter selection", "change of sort order", "search for destination", "search for poi")
ACTIONS = tuple(sorted(ITEM_ACTIONS.values()))
UNKNOWN_REFERENCE = "unknown"  # the log's placeholder for a hotel it did not record: not a behaviour
CONTEXT = ("platform", "device", "city")  # user features: the values of the user's first logged row
MIN_CONTEXT_USERS = 3  # a context value needs this many training-period users, else it is out of vocabulary
CANDIDATE_FEATURES = (RANK_SCORE, "price", "price_rank")
BATCH_ROWS = 1 << 18  # source rows per validated batch
CHUNK_USERS = 100_000  # users whose lists are built and written together


def build_trivago(
    source: Path, out: Path, *, max_history: int, memory_limit: str = "1GB", progress: bool = True
) -> dict:
    """Build a data set from the challenge's session log (`train.csv`, or a Parquet file with its columns)."""
    import duckdb

    source = Path(source)
    with staged(out) as staging:
        work = staging / ".work"
        work.mkdir()
        with duckdb.connect() as con:
            try:
                con.execute(f"SET memory_limit = '{memory_limit}'")
            except duckdb.Error as exc:
                raise DataError(f"--memory-limit {memory_limit!r}: {exc}; give a size such as 1GB or 512MB") from None
            con.execute(f"SET temp_directory = {_quoted(work / 'spill')}")
            counts = _validate_and_stage(source, work, progress)
            stats = _build(con, source, work, staging, max_history, counts, progress)
        shutil.rmtree(work)
    if progress:
        tqdm.write(format_order_quality(stats["initial_order"]))
        tqdm.write(format_split(stats["split"]))
    return stats


# --- pass 1: read, validate, stage -------------------------------------------------------------


def _batches(source: Path) -> Iterator[pd.DataFrame]:
    """The source in order, as pandas batches whose index is each row's 0-based number in the file."""
    if not source.is_file():
        raise DataError(f"{source}: file not found; give the challenge's train.csv or a Parquet file with its columns")
    try:
        if source.suffix == ".parquet":
            names = pq.ParquetFile(source).schema_arrow.names
            _check_columns(source, names)
            batches = pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS))
        elif source.suffix == ".csv":
            reader = pacsv.open_csv(
                source,
                read_options=pacsv.ReadOptions(block_size=1 << 24),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=True
                ),
            )
            _check_columns(source, reader.schema.names)
            batches = reader
        else:
            raise DataError(f"{source}: expected a .csv or .parquet file, got {source.suffix or 'no suffix'!r}")
        first = 0
        for batch in batches:
            df = batch.to_pandas()
            df.index = pd.RangeIndex(first, first + len(df))
            first += len(df)
            yield df
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{source}: cannot be parsed ({type(exc).__name__}: {exc})") from None


def _check_columns(source: Path, names: list[str]) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the challenge's log has {list(COLUMNS)}")
    unknown = [c for c in names if c not in COLUMNS]
    if unknown:
        raise DataError(f"{source}: unknown column(s) {unknown}; the challenge's log has {list(COLUMNS)}")


def _validate(df: pd.DataFrame, source: Path) -> pa.Table:
    """Checks one batch in place and returns its clickouts, impressions and prices parsed."""
    for col in ("reference", "impressions", "prices", *CONTEXT):
        _as_text(df, col, source)
    check_ids(df, source, ("user_id", "session_id", "action_type"))
    check_timestamps(df, source)
    check_numeric(df, source, "step", integer=True, minimum=0)
    known = tuple(ITEM_ACTIONS) + OTHER_ACTIONS
    unknown = ~df["action_type"].isin(known)
    if unknown.any():
        value = df.loc[unknown, "action_type"].iloc[0]
        fail_rows(source, "action_type", unknown, f"{value!r} is not an action of the log; expected one of {known}")
    items = df["action_type"].isin(ITEM_ACTIONS)
    empty = df["reference"].isna() | (df["reference"] == "")
    fail_rows(source, "reference", items & empty, "empty; an item action names its hotel")
    clicks = df[df["action_type"] == CLICKOUT]
    rows = clicks.index.to_numpy(dtype=np.int64)
    for col in ("impressions", "prices"):
        fail_rows(source, col, clicks[col].isna() | (clicks[col] == ""), "a clickout without " + col)
    split_ids = pc.split_pattern(pa.array(clicks["impressions"], pa.string()), "|")
    hotels = pa.ListArray.from_arrays(split_ids.offsets, pc.utf8_trim_whitespace(split_ids.flatten()))
    prices = pc.split_pattern(pa.array(clicks["prices"], pa.string()), "|")
    n_hotels, n_prices = (pc.list_value_length(x).to_numpy(zero_copy_only=False) for x in (hotels, prices))
    differ = n_hotels != n_prices
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        problem = f"{n_prices[i]} prices for {n_hotels[i]} impressions; each shown hotel has one price, in order"
        fail_rows(source, "prices", pd.Series(differ, index=rows), problem)
    flat = pc.list_flatten(hotels).to_numpy(zero_copy_only=False)
    parent = pc.list_parent_indices(hotels).to_numpy()
    fail_rows(source, "impressions", pd.Series(flat == "", index=rows[parent]), "an empty hotel id between '|'")
    repeated = pd.DataFrame({"list": parent, "hotel": flat}).duplicated().to_numpy()
    if repeated.any():
        hotel = flat[repeated][0]
        fail_rows(source, "impressions", pd.Series(repeated, index=rows[parent]), f"hotel {hotel} is shown twice")
    tokens = pc.list_flatten(prices).to_numpy(zero_copy_only=False)
    values = pd.to_numeric(pd.Series(tokens), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        fail_rows(source, "prices", pd.Series(bad, index=rows[parent]), f"{tokens[bad][0]!r} is not a price >= 0")
    return pa.table(
        {
            "row": rows,
            "user_id": pa.array(clicks["user_id"], pa.string()),
            "timestamp": clicks["timestamp"].to_numpy(dtype=np.int64),
            "reference": pa.array(clicks["reference"], pa.string()),
            "impressions": hotels,
            "prices": pa.ListArray.from_arrays(prices.offsets, pa.array(values)),
        }
    )


def _as_text(df: pd.DataFrame, col: str, source: Path) -> None:
    """`col` as stripped nullable strings in place; a Parquet `reference` may hold hotel ids as numbers."""
    values = df[col]
    if col == "reference" and pd.api.types.is_float_dtype(values):
        whole = values.isna() | (values == np.floor(values))
        if not whole.all():
            fail_rows(source, col, ~whole, f"{values[~whole].iloc[0]:.15g} is not a whole id")
        values = values.astype("Int64")
    elif col != "reference" and (values.dtype == object or not pd.api.types.is_string_dtype(values.dtype)):
        text = values.map(lambda v: v is None or isinstance(v, str) or (isinstance(v, float) and v != v))
        if not text.all():
            problem = f"{values[~text].iloc[0]!r} is not text; the log's {col} are '|'-separated strings"
            fail_rows(source, col, ~text, problem)
    df[col] = values.astype("string").str.strip()


class _Stage:
    """One typed work file, appended batch by batch."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.writer = pq.ParquetWriter(path, schema)

    def write(self, table: pd.DataFrame | pa.Table) -> None:
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, schema=self.writer.schema, preserve_index=False)
        self.writer.write_table(table.cast(self.writer.schema))


def _validate_and_stage(source: Path, work: Path, progress: bool) -> dict[str, int]:
    """Pass 1: every row validated; behaviours, clickouts and first contexts written to `work`."""
    text, whole = pa.string(), pa.int64()
    schemas = {
        "behaviours": {"user_id": text, "item_id": text, "timestamp": whole, "action": text, "row": whole},
        "clickouts": {"row": whole, "user_id": text, "timestamp": whole, "reference": text,
                      "impressions": pa.list_(text), "prices": pa.list_(pa.float64())},
        "contexts": {"user_id": text, "timestamp": whole, "row": whole, **{c: text for c in CONTEXT}},
    }  # fmt: skip
    stages = {name: _Stage(work / f"{name}.parquet", pa.schema(fields)) for name, fields in schemas.items()}
    counts = {"rows": 0, "unknown_reference": 0}
    bar = tqdm(desc="rows read", unit=" rows", unit_scale=True, disable=not progress, leave=False)
    try:
        for df in _batches(source):
            clicks = _validate(df, source)
            counts["rows"] += len(df)
            items = df[df["action_type"].isin(ITEM_ACTIONS)]
            unknown = items["reference"] == UNKNOWN_REFERENCE
            counts["unknown_reference"] += int(unknown.sum())
            items = items[~unknown]
            stages["behaviours"].write(
                pd.DataFrame(
                    {
                        "user_id": items["user_id"],
                        "item_id": items["reference"],
                        "timestamp": items["timestamp"],
                        "action": items["action_type"].map(ITEM_ACTIONS),
                        "row": items.index.to_numpy(dtype=np.int64),
                    }
                )
            )
            stages["clickouts"].write(clicks)
            first = df.assign(row=df.index).sort_values(["timestamp", "row"]).drop_duplicates("user_id")
            stages["contexts"].write(first[["user_id", "timestamp", "row", *CONTEXT]])
            bar.update(len(df))
    finally:
        bar.close()
        for stage in stages.values():
            stage.writer.close()
    if counts["rows"] == 0:
        raise DataError(f"{source}: no data rows")
    return counts


# --- pass 2: select and encode in DuckDB ------------------------------------------------------


def _build(con, source: Path, work: Path, out: Path, max_history: int, counts: dict[str, int], progress: bool) -> dict:
    clickouts, behaviours, contexts = (
        _quoted(work / f"{name}.parquet") for name in ("clickouts", "behaviours", "contexts")
    )
    con.execute(
        f"""CREATE VIEW candidates AS SELECT *, len(impressions) AS length,
                   list_position(impressions, reference) - 1 AS clicked
            FROM read_parquet({clickouts})"""
    )
    dropped = con.execute(
        f"""SELECT count(*) FILTER (clicked IS NULL), count(*) FILTER (clicked IS NOT NULL AND length < {MIN_LIST})
            FROM candidates"""
    ).fetchall()[0]
    lists = con.execute(
        f"SELECT row, timestamp FROM candidates WHERE clicked IS NOT NULL AND length >= {MIN_LIST} ORDER BY row"
    ).df()
    if len(lists) == 0:
        raise DataError(f"{source}: no clickout whose clicked hotel is among >= {MIN_LIST} impressions")
    split, cuts = split_by_time(lists["timestamp"], SPLIT_FRACTIONS, what=f"{source} (clickouts)")
    lists["split"] = split.map({s: i for i, s in enumerate(SPLITS)}).to_numpy(dtype=np.int8)
    lists = lists.sort_values(["split", "timestamp", "row"])
    lists["list_id"] = np.arange(len(lists), dtype=np.int64)  # time order within each split (rows: user order)
    con.register("lists", lists[["row", "split", "list_id"]])
    users, user_cat, user_vocabs = _users(
        con, behaviours, contexts, train_end=int(lists.loc[lists["split"] == 0, "timestamp"].max())
    )
    con.register("users", users[["user_id"]].assign(ucode=np.arange(len(users), dtype=np.int64)))
    con.execute(
        """CREATE TABLE kept AS SELECT u.ucode, c.*, l.split, l.list_id
           FROM candidates c JOIN lists l USING (row) JOIN users u USING (user_id)
           ORDER BY u.ucode, c.timestamp, c.row"""
    )
    con.execute(
        f"""CREATE TABLE events AS SELECT u.ucode, b.* FROM read_parquet({behaviours}) b JOIN users u USING (user_id)
            ORDER BY u.ucode, b.timestamp, b.item_id, b.row"""
    )
    item_ids = sorted(
        r[0] for r in con.execute("SELECT unnest(impressions) FROM kept UNION SELECT item_id FROM events").fetchall()
    )
    cold = con.execute(
        """WITH shown AS (SELECT DISTINCT unnest(impressions) AS item_id FROM kept WHERE split = 0)
           SELECT split, avg(CASE WHEN s.item_id IS NULL THEN 1 ELSE 0 END) FROM
               (SELECT split, unnest(impressions) AS item_id FROM kept WHERE split > 0)
               LEFT JOIN shown s USING (item_id)
           GROUP BY split ORDER BY split"""
    ).fetchall()
    vocab = Vocab(item_ids)
    max_list = int(con.execute("SELECT max(length) FROM kept").fetchall()[0][0])
    layout = FeatureSchema(
        n_items=len(vocab),
        actions=ACTIONS,
        max_history=max_history,
        max_list=max_list,
        candidate_numeric=tuple(NumericFeature(f) for f in CANDIDATE_FEATURES),
    )
    writers = {s: SplitWriter(out, s, layout) for s in SPLITS}
    with writers["train"], writers["val"], writers["test"]:
        _stream_lists(con, pd.Index(item_ids), layout, len(users), writers, len(lists), progress)
    con.execute(
        f"""COPY (SELECT user_id, item_id, timestamp, action FROM events ORDER BY ucode, timestamp, item_id, row)
            TO {_quoted(out / "behaviours.parquet")} (FORMAT parquet)"""
    )
    schema = FeatureSchema(
        n_items=len(vocab),
        actions=ACTIONS,
        max_history=max_history,
        max_list=max_list,
        user_categorical=tuple(user_cat),
        candidate_numeric=tuple(_standardised(con, out / "train.parquet", f) for f in CANDIDATE_FEATURES),
        extra={
            "source": "trivago",
            "path": str(source),
            "recipe": "one list per clickout whose clicked hotel is shown among >= 2; display order; "
            f"history = item actions {ACTIONS} strictly before; time split {SPLIT_FRACTIONS}; "
            f"context {CONTEXT} from the user's first row, values of < {MIN_CONTEXT_USERS} training users OOV; "
            "item vocabulary = every hotel the log names (the catalogue)",
            "split": time_split(cuts),
        },
    )
    reserved = [""] * N_RESERVED
    items = pd.DataFrame({"item_index": np.arange(len(vocab), dtype=np.int64), "item_id": reserved + item_ids})
    write_side_tables(out, schema, Vocabularies(items=vocab, user_categorical=user_vocabs), users, items)
    stats = write_stats(out, {s: w.summary for s, w in writers.items()}, n_users=len(users), n_items=len(vocab))
    stats["dropped_clickouts"] = {"clicked_hotel_not_shown": int(dropped[0]), "fewer_than_2_hotels": int(dropped[1])}
    stats["split"] = schema.extra["split"]
    stats["candidates_not_shown_in_train"] = {SPLITS[code]: float(share) for code, share in cold}
    stats["clicks_on_a_history_item"] = {s: _repeat_share(con, out / f"{s}.parquet") for s in SPLITS}
    stats["rows"] = counts["rows"]
    stats["skipped_unknown_references"] = counts["unknown_reference"]
    stats["initial_order"] = {
        s: order_quality(read_parquet(out / f"{s}.parquet", columns=["labels"])["labels"]) for s in ("val", "test")
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _repeat_share(con, split_file: Path) -> float:
    """Share of lists whose clicked hotel is in the list's own history: what history-first exploits."""
    return float(
        con.execute(
            f"""SELECT avg(list_contains(hist_items, items[list_position(labels, 1.0)])::INT)
                FROM read_parquet({_quoted(split_file)})"""
        ).fetchall()[0][0]
    )


def _quoted(path: Path) -> str:
    """A path as a DuckDB string literal (a quote in a directory name must not end it)."""
    return "'" + str(path).replace("'", "''") + "'"


def _standardised(con, train: Path, feature: str) -> NumericFeature:
    """Mean and population std of a candidate feature over the training lists (std 1 when constant)."""
    mean, std = con.execute(
        f"SELECT avg(x), stddev_pop(x) FROM (SELECT unnest(cand_{feature}) AS x FROM read_parquet({_quoted(train)}))"
    ).fetchall()[0]
    return NumericFeature(feature, float(mean), float(std) if std and std > 1e-12 else 1.0)


def _users(
    con, behaviours: str, contexts: str, train_end: int
) -> tuple[pd.DataFrame, list[CategoricalFeature], dict[str, Vocab]]:
    """Users with a list or a behaviour, in id order, with their first logged context encoded."""
    first = con.execute(
        f"""SELECT user_id, {", ".join(f"arg_min({c}, (timestamp, row)) AS {c}" for c in CONTEXT)},
                   min(timestamp) AS since
            FROM read_parquet({contexts})
            WHERE user_id IN (SELECT user_id FROM candidates JOIN lists USING (row)
                              UNION SELECT user_id FROM read_parquet({behaviours}))
            GROUP BY user_id ORDER BY user_id"""
    ).df()
    users = pd.DataFrame({"user_id": first["user_id"].astype(str)})
    cats, vocabs = [], {}
    for col in CONTEXT:
        values = first[col]
        seen = values[first["since"] <= train_end].value_counts()
        vocab = Vocab(sorted(seen.index[seen >= MIN_CONTEXT_USERS].astype(str)))
        codes = np.zeros(len(first), dtype=np.int64)  # a missing value -> 0
        present = values.notna().to_numpy()
        codes[present] = vocab.indices(values[present].tolist())
        users[col] = codes
        cats.append(CategoricalFeature(col, max(len(vocab), N_RESERVED + 1)))
        vocabs[col] = vocab
    return users, cats, vocabs


# --- pass 3: lists and their histories, a chunk of users at a time ------------------------------


def _stream_lists(
    con,
    items: pd.Index,
    layout: FeatureSchema,
    n_users: int,
    writers: dict[str, SplitWriter],
    total: int,
    progress: bool,
) -> None:
    """Each chunk of users: their lists and behaviours, both in time order, joined in numpy.

    Rows reach the split files chunk by chunk, so they are in user order; `list_id` keeps the time order.
    """
    bar = tqdm(total=total, desc="lists", disable=not progress, leave=False)
    for first in range(0, n_users, CHUNK_USERS):
        where = f"ucode >= {first} AND ucode < {first + CHUNK_USERS}"
        lists = con.sql(
            f"""SELECT list_id, split, user_id, ucode, timestamp, impressions, prices, clicked FROM kept
                WHERE {where} ORDER BY ucode, timestamp, row"""
        ).to_arrow_table()
        events = con.sql(
            f"""SELECT ucode, timestamp, item_id, action FROM events
                WHERE {where} ORDER BY ucode, timestamp, item_id, row"""
        ).to_arrow_table()
        table = _list_table(lists, events, items, layout)
        split = lists["split"].to_numpy()
        for code, name in enumerate(SPLITS):
            writers[name].write(table.filter(pa.array(split == code)))
        bar.update(len(lists))
    bar.close()


def _list_table(lists: pa.Table, events: pa.Table, items: pd.Index, layout: FeatureSchema) -> pa.Table:
    """The split-file rows of `lists`; both tables are sorted by (ucode, timestamp)."""
    hotels = lists["impressions"].combine_chunks()
    offsets = hotels.offsets.to_numpy()
    lengths = np.diff(offsets)
    starts = np.repeat(offsets[:-1], lengths)
    flat = pc.list_flatten(hotels).to_numpy(zero_copy_only=False)
    price = pc.list_flatten(lists["prices"].combine_chunks()).to_numpy().astype(np.float32)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    by_price = np.lexsort((price, owner))  # within each list, cheapest first
    sorted_price, sorted_owner = price[by_price], owner[by_price]
    new_value = np.r_[True, (sorted_price[1:] != sorted_price[:-1]) | (sorted_owner[1:] != sorted_owner[:-1])]
    first_of_value = np.maximum.accumulate(np.where(new_value, np.arange(len(price)), 0))
    price_rank = np.empty(len(price), np.float32)
    price_rank[by_price] = first_of_value - np.repeat(offsets[:-1], lengths)[by_price]  # ties share the lower rank
    labels = np.zeros(len(flat), np.float32)
    labels[offsets[:-1] + lists["clicked"].to_numpy()] = 1.0

    ucode, ts = lists["ucode"].to_numpy(), lists["timestamp"].to_numpy()
    e_ucode, e_ts = events["ucode"].to_numpy(), events["timestamp"].to_numpy()
    first = min(ts.min(), e_ts.min(initial=ts.min()))
    span = max(ts.max(), e_ts.max(initial=ts.max())) - first + 1  # (user, time) -> one sortable int64

    def key(user: np.ndarray, when: np.ndarray) -> np.ndarray:
        return user * span + (when - first)

    events_key = key(e_ucode, e_ts)
    end = np.searchsorted(events_key, key(ucode, ts), side="left")  # first behaviour at or after the list
    begin = np.maximum(np.searchsorted(events_key, key(ucode, first), side="left"), end - layout.max_history)
    hist_offsets, gather = _ragged(begin, end)
    event_items = _encode(items, events["item_id"].to_numpy(zero_copy_only=False))
    event_actions = (
        pd.Series(events["action"].to_numpy(zero_copy_only=False)).map(layout.action_codes).to_numpy(np.int64)
    )

    def ragged(off: np.ndarray, values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(values))

    return pa.table(
        {
            "list_id": lists["list_id"],
            "user_id": lists["user_id"],
            "timestamp": lists["timestamp"],
            "items": ragged(offsets, _encode(items, flat)),
            "cand_rank_score": ragged(offsets, -(np.arange(len(flat)) - starts).astype(np.float32)),
            "cand_price": ragged(offsets, price),
            "cand_price_rank": ragged(offsets, price_rank),
            "labels": ragged(offsets, labels),
            "hist_items": ragged(hist_offsets, event_items[gather]),
            "hist_ts": ragged(hist_offsets, events["timestamp"].to_numpy()[gather]),
            "hist_actions": ragged(hist_offsets, event_actions[gather]),
        }
    )


def _ragged(begin: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and source indices of the concatenated slices [begin[i], end[i])."""
    lengths = end - begin
    offsets = np.r_[0, np.cumsum(lengths)]
    return offsets, np.arange(offsets[-1]) - np.repeat(offsets[:-1] - begin, lengths)


def _encode(items: pd.Index, ids: np.ndarray) -> np.ndarray:
    """Item ids -> vocabulary indices (export/contract/schema.py: unseen -> OOV)."""
    found = items.get_indexer(ids)
    return np.where(found < 0, OOV, found + N_RESERVED).astype(np.int64)
