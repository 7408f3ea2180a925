"""Impression logs in the generic layout (docs/data.md#generic) -> the on-disk data-set format.

Two jobs, both shared by every real-data builder:
- `read_logs` reads and validates a directory in the generic layout into `Logs`;
- `write_logs` turns `Logs` plus a split per impression row into a data set: vocabularies,
  encoded side tables, one row per displayed list with its leakage-free history, and the
  split's provenance (`extra["split"]`: method and cut times) in schema.json and stats.json.
MovieLens (training/data/movielens.py) converts its files into `Logs` and reuses `write_logs`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from export.contract.schema import (
    N_RESERVED,
    RANK_SCORE,
    CategoricalFeature,
    FeatureSchema,
    NumericFeature,
    Vocab,
    Vocabularies,
)
from training.data.initial_ranker import order_quality
from training.data.store import SPLITS, DataError, staged, write_dataset

IMPRESSION_REQUIRED = ("request_id", "user_id", "timestamp", "item_id", "position", "label")
IMPRESSION_OPTIONAL = (RANK_SCORE, "split")
BEHAVIOUR_COLUMNS = ("user_id", "item_id", "timestamp", "action")
ID_COLUMNS = ("request_id", "user_id", "item_id")
DERIVED_ACTIONS = ("view", "click")  # behaviours derived from impressions: label > 0 -> click
HISTORY_FROM = ("clicks", "all")  # impression rows that become history without a behaviours file; first = default
SPLIT_FRACTIONS = (0.8, 0.9)  # train | val | test boundaries, by request time
MIN_LIST = 2  # a list of one item has nothing to rerank
MAX_UNIX_SECONDS = 10**11  # year 5138: a larger timestamp is in milliseconds or finer, not seconds
RESERVED_ITEM_COLUMNS = ("item_index",)  # items.parquet gets it from the builder


@dataclass
class Logs:
    """Validated logs: what a real-data builder hands to `write_logs`.

    impressions: request_id, user_id, timestamp, item_id, position, label, rank_score, f_* (one row per shown item)
    behaviours: user_id, item_id, timestamp, action (the source of histories)
    users / items: user_id / item_id plus feature columns (string -> categorical, number -> numeric)
    """

    impressions: pd.DataFrame
    behaviours: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame


def build_generic(
    source: Path, out: Path, *, max_history: int, history_from: str | None = None, progress: bool = True
) -> dict:
    """Build a data set from your own impression logs.

    The split is the impressions' `split` column when there is one, else 80/10/10 by request
    time. `history_from` (clicks | all) says which impression rows become history when there is
    no behaviours file; None means the default, clicks.
    """
    logs, actions, history = read_logs(Path(source), history_from)
    imp = logs.impressions
    if "split" in imp.columns:
        split, provenance = imp["split"], {"method": "column"}
    else:
        split, cuts = split_by_time(imp["timestamp"], SPLIT_FRACTIONS, what=f"{source}/impressions")
        provenance = time_split(cuts)
    return write_logs(
        out,
        logs,
        split,
        item_ids=sorted(imp.loc[split == "train", "item_id"].unique()),
        actions=actions,
        max_history=max_history,
        extra={"source": "generic", "path": str(source), "split": provenance, "history_from": history},
        progress=progress,
    )


def time_split(cuts: list[int]) -> dict:
    """Provenance of a time split: train < cuts[0] <= val < cuts[1] <= test (unix s)."""
    return {"method": "time", "cuts": [int(c) for c in cuts]}


# --- reading and validation -------------------------------------------------------------------


def read_table(directory: Path, stem: str, *, required: bool) -> tuple[pd.DataFrame, Path] | None:
    """Read `stem.parquet` or `stem.csv` (ids as strings); None when optional and absent."""
    found = [p for p in (directory / f"{stem}.parquet", directory / f"{stem}.csv") if p.is_file()]
    if len(found) == 2:
        raise DataError(f"{directory}: both {stem}.parquet and {stem}.csv exist; keep exactly one")
    if not found:
        if not directory.is_dir():
            raise DataError(f"{directory}: directory not found")
        if required:
            raise DataError(f"{directory}: {stem}.parquet or {stem}.csv not found (layout: docs/data.md#generic)")
        return None
    path = found[0]
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, dtype={c: str for c in ID_COLUMNS}, skipinitialspace=True)
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes a message naming the file
        raise DataError(f"{path}: cannot be parsed ({type(exc).__name__}: {exc})") from None
    if path.suffix == ".csv" and len(df.columns) == 1:
        name = str(df.columns[0])
        guess = next((d for d in (";", "\t", "|", ":") if d in name), None)
        hint = f" — is the delimiter {guess!r}?" if guess else ""
        raise DataError(f"{path}: expected comma-separated; found one column named {name!r}{hint}")
    if len(df) == 0:
        raise DataError(f"{path}: no data rows")
    return df.reset_index(drop=True), path


def fail_rows(path: Path, column: str, mask: pd.Series | np.ndarray, problem: str) -> None:
    """A DataError at the first row where `mask` holds; rows count from 1.

    A Series mask's index is taken as each row's 0-based number in the file, so a builder that
    reads in batches keeps the absolute row there (a fresh RangeIndex gives the position).
    """
    hits = np.flatnonzero(np.asarray(mask))
    if len(hits):
        first = mask.index[hits[0]] if isinstance(mask, pd.Series) else hits[0]
        row = int(first) + 1
        raise DataError(f"{path}: row {row}, column {column!r}: {problem}")


def check_ids(df: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    for col in columns:
        values = df[col]
        fail_rows(path, col, values.isna(), "empty value; every row needs one")
        df[col] = values.astype(str).str.strip()
        fail_rows(path, col, df[col] == "", "empty value; every row needs one")


def check_numeric(
    df: pd.DataFrame,
    path: Path,
    col: str,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: tuple[float, str] | None = None,
) -> None:
    """Parse `col` as finite numbers in place; `maximum` is (bound, what a larger value means)."""
    raw = df[col]
    fail_rows(path, col, raw.isna(), "empty value; fill it in or drop the row")
    values = pd.to_numeric(raw, errors="coerce").astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        fail_rows(path, col, bad, f"{raw[bad].iloc[0]!r} is not a finite number")
    if integer:
        fail_rows(path, col, values != np.floor(values), "must be a whole number")
    if minimum is not None:
        fail_rows(path, col, values < minimum, f"must be >= {minimum:g}")
    if maximum is not None:
        bound, meaning = maximum
        above = values > bound
        if above.any():
            fail_rows(path, col, above, f"{values[above].iloc[0]:.15g} is above {bound:g}: {meaning}")
    df[col] = values.astype(np.int64) if integer else values


def check_timestamps(df: pd.DataFrame, path: Path, col: str = "timestamp") -> None:
    """Make `col` unix seconds (int64) in place.

    A datetime column (Parquet; naive means UTC) is converted, since its raw integers are micro- or
    nanoseconds; numbers beyond MAX_UNIX_SECONDS are refused, since read as seconds they would date
    every event millennia ahead and leave histories empty.
    """
    raw = df[col]
    if pd.api.types.is_datetime64_any_dtype(raw):
        df[col] = (raw - pd.Timestamp(0, tz=raw.dt.tz)) // pd.Timedelta(seconds=1)
    meaning = "unix seconds expected; this looks like milliseconds or finer (divide by 1000)"
    check_numeric(df, path, col, integer=True, minimum=0, maximum=(MAX_UNIX_SECONDS, meaning))


def _check_columns(df: pd.DataFrame, path: Path, required: tuple[str, ...], allowed: tuple[str, ...] | None) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}; found {list(df.columns)}")
    if allowed is not None:
        unknown = [c for c in df.columns if c not in allowed and not str(c).startswith("f_")]
        if unknown:
            raise DataError(
                f"{path}: unknown column(s) {unknown}; allowed: {list(allowed)} and numeric columns prefixed 'f_'"
            )


def _check_duplicates(df: pd.DataFrame, path: Path, keys: list[str], why: str) -> None:
    fail_rows(path, "+".join(keys), df.duplicated(keys), f"duplicate {tuple(keys)}; {why}")


def check_split(df: pd.DataFrame, path: Path) -> None:
    """The user's own split: every row names one of SPLITS, and every split gets rows."""
    allowed = f"allowed: {list(SPLITS)}"
    fail_rows(path, "split", df["split"].isna(), f"empty value; every row needs one ({allowed})")
    df["split"] = df["split"].astype(str).str.strip()
    unknown = ~df["split"].isin(SPLITS)
    if unknown.any():
        fail_rows(path, "split", unknown, f"{df.loc[unknown, 'split'].iloc[0]!r} is not a split; {allowed}")
    empty = [s for s in SPLITS if not (df["split"] == s).any()]
    if empty:
        raise DataError(f"{path}: column 'split' has no row for {empty}; every split needs requests ({allowed})")


def read_impressions(directory: Path) -> pd.DataFrame:
    df, path = read_table(directory, "impressions", required=True)
    _check_columns(df, path, IMPRESSION_REQUIRED, IMPRESSION_REQUIRED + IMPRESSION_OPTIONAL)
    check_ids(df, path, ("request_id", "user_id", "item_id"))
    check_timestamps(df, path)
    check_numeric(df, path, "position", integer=True, minimum=0)
    check_numeric(df, path, "label", minimum=0)
    for col in [c for c in df.columns if c == RANK_SCORE or str(c).startswith("f_")]:
        check_numeric(df, path, col)
    if "split" in df.columns:
        check_split(df, path)
    _check_duplicates(df, path, ["request_id", "position"], "each shown position appears once per request")
    _check_duplicates(df, path, ["request_id", "item_id"], "an item is shown at most once per request")
    for col in [c for c in ("user_id", "timestamp", "split") if c in df.columns]:
        varies = df[col] != df.groupby("request_id")[col].transform("first")  # the row that departs from the first
        fail_rows(path, col, varies, f"differs between rows of the same request_id; a request has one {col}")
    if RANK_SCORE not in df.columns:
        df[RANK_SCORE] = -df["position"].astype(np.float64)  # the shown order is the ranking stage's order
    return df


def read_behaviours(directory: Path) -> pd.DataFrame | None:
    table = read_table(directory, "behaviours", required=False)
    if table is None:
        return None
    df, path = table
    _check_columns(df, path, BEHAVIOUR_COLUMNS, None)
    unknown = [c for c in df.columns if c not in BEHAVIOUR_COLUMNS]
    if unknown:
        raise DataError(f"{path}: unknown column(s) {unknown}; allowed: {list(BEHAVIOUR_COLUMNS)}")
    check_ids(df, path, ("user_id", "item_id", "action"))
    check_timestamps(df, path)
    return df


def read_side_table(directory: Path, stem: str, key: str, reserved: tuple[str, ...] = ()) -> pd.DataFrame:
    """A users/items table: one row per `key`; numeric columns may have gaps (NaN) but no infinities."""
    table = read_table(directory, stem, required=False)
    if table is None:
        return pd.DataFrame({key: pd.Series([], dtype=str)})
    df, path = table
    _check_columns(df, path, (key,), None)
    clash = [c for c in df.columns if c in reserved]
    if clash:
        raise DataError(f"{path}: column(s) {clash} are reserved (the builder creates them); rename them")
    check_ids(df, path, (key,))
    _check_duplicates(df, path, [key], f"one row per {key}")
    for col in [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]:
        values = df[col].to_numpy(dtype=np.float64, na_value=np.nan)
        infinite = np.isinf(values)
        if infinite.any():
            problem = f"{values[infinite][0]} is not a finite number; leave the value empty if it is unknown"
            fail_rows(path, col, infinite, problem)
    return df


def read_logs(directory: Path, history_from: str | None = None) -> tuple[Logs, tuple[str, ...], str]:
    """Read and validate the generic layout.

    Returns the logs, the behaviour types and where histories come from ("behaviours" or
    "impressions:<history_from>"); `history_from` applies only without a behaviours file.
    """
    if history_from is not None and history_from not in HISTORY_FROM:
        raise DataError(f"--history-from-impressions must be one of {list(HISTORY_FROM)}, got {history_from!r}")
    impressions = read_impressions(directory)
    behaviours = read_behaviours(directory)
    if behaviours is None:
        history_from = history_from or HISTORY_FROM[0]
        behaviours, actions = impression_behaviours(impressions, history_from, what=f"{directory}/impressions")
        history = f"impressions:{history_from}"
    elif history_from is not None:
        raise DataError(
            f"{directory}: --history-from-impressions applies only without a behaviours file, and "
            "behaviours exist (histories come from them); drop the flag or the file"
        )
    else:
        actions, history = tuple(sorted(behaviours["action"].unique())), "behaviours"
    users = read_side_table(directory, "users", "user_id")
    items = read_side_table(directory, "items", "item_id", RESERVED_ITEM_COLUMNS)
    return Logs(impressions=impressions, behaviours=behaviours, users=users, items=items), actions, history


def impression_behaviours(
    impressions: pd.DataFrame, history_from: str, *, what: str
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Behaviours from impressions at the request's time: label > 0 -> click; with "all", label 0 -> view.

    "clicks" is the default because a row with label 0 may be a sampled negative the user never
    saw: as a `view` in later histories it would be invented behaviour, and the service (which
    gets only real events) would never see its like. "all" suits logs whose every row was really
    displayed; it prints a warning, since it cannot tell the two apart.
    """
    rows = impressions[["user_id", "item_id", "timestamp"]]
    clicked = (impressions["label"] > 0).to_numpy()
    if history_from == "clicks":
        return rows[clicked].assign(action="click"), ("click",)
    if not clicked.all():
        print(
            f"warning: {what}: {int((~clicked).sum()):,} shown-but-not-clicked rows become `view` behaviours "
            "in later histories (--history-from-impressions all); if some are sampled negatives the user "
            "never saw, use --history-from-impressions clicks",
            file=sys.stderr,
        )
    return rows.assign(action=np.where(clicked, "click", "view")), DERIVED_ACTIONS


def split_by_time(timestamps: pd.Series, fractions: tuple[float, float], *, what: str) -> tuple[pd.Series, list[int]]:
    """train | val | test by time, and the cuts: the timestamps below which ~80% / ~90% of rows fall."""
    ts = timestamps.to_numpy(dtype=np.int64)
    cuts = [int(np.quantile(ts, f, method="higher")) for f in fractions]
    split = np.select([ts < cuts[0], ts < cuts[1]], ["train", "val"], "test")
    counts = {s: int((split == s).sum()) for s in SPLITS}
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        raise DataError(
            f"{what}: split(s) {empty} would be empty (rows per split {counts}); the timestamps span too few "
            "distinct times to split 80/10/10 — add more logs"
        )
    return pd.Series(split, index=timestamps.index), cuts


# --- writing ------------------------------------------------------------------------------------


def numeric_feature(name: str, values: np.ndarray) -> NumericFeature:
    """Standardisation statistics; a constant column gets std 1 (schema requires std > 0)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else 0.0
    std = float(values.std()) if len(values) else 0.0
    return NumericFeature(name, mean, std if std > 1e-12 else 1.0)


def _encode_side(
    table: pd.DataFrame, key: str, ids: list[str], fit_rows: int | None = None
) -> tuple[pd.DataFrame, list[CategoricalFeature], list[NumericFeature], dict[str, Vocab]]:
    """Features of `ids` in order (missing rows -> categorical 0, numeric mean): strings -> categorical.

    Vocabularies and standardisation come from the first `fit_rows` ids (None: all): a cold-item split
    fits them on the known items, so a value first seen on a cold item is OOV, as it is to a model.
    """
    rows = table.set_index(key).reindex(ids)
    fit = rows.iloc[:fit_rows]
    encoded = pd.DataFrame(index=range(len(ids)))
    cats, nums, vocabs = [], [], {}
    for col in rows.columns:
        values = rows[col]
        if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            feat = numeric_feature(str(col), fit[col].dropna().to_numpy(dtype=np.float64))
            encoded[col] = values.fillna(feat.mean).to_numpy(dtype=np.float32)
            nums.append(feat)
        else:
            vocab = Vocab(sorted(fit[col].dropna().astype(str).unique()))
            codes = np.zeros(len(ids), dtype=np.int64)
            codes[values.notna().to_numpy()] = vocab.indices(values.dropna().astype(str).tolist())
            encoded[col] = codes
            cats.append(CategoricalFeature(str(col), max(len(vocab), N_RESERVED + 1)))
            vocabs[str(col)] = vocab
    return encoded, cats, nums, vocabs


def _histories(behaviours: pd.DataFrame, vocab: Vocab, actions: tuple[str, ...]) -> dict[str, tuple]:
    """Per user: (timestamps, item indices, action indices), sorted by time; none when there are no behaviours."""
    if len(behaviours) == 0:
        return {}
    schema_actions = FeatureSchema(n_items=3, actions=actions, max_history=0, max_list=1)
    items = np.asarray(vocab.indices(behaviours["item_id"].tolist()), dtype=np.int64)
    acts = behaviours["action"].map(schema_actions.action_index).to_numpy(dtype=np.int64)
    ts = behaviours["timestamp"].to_numpy(dtype=np.int64)
    users = behaviours["user_id"].to_numpy()
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(users)]
    return {users[s]: (ts[s:e], items[s:e], acts[s:e]) for s, e in zip(starts, ends, strict=True)}


def _lists(
    impressions: pd.DataFrame,
    vocab: Vocab,
    histories: dict[str, tuple],
    cand_cols: list[str],
    max_history: int,
    progress: bool,
) -> pd.DataFrame:
    """One row per request, candidates in shown order, history = last max_history behaviours strictly before."""
    imp = impressions.sort_values(["timestamp", "request_id", "position"], kind="stable")
    req = imp["request_id"].to_numpy()
    bounds = np.flatnonzero(req[1:] != req[:-1]) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(req)]
    items = np.asarray(vocab.indices(imp["item_id"].tolist()), dtype=np.int64)
    labels = imp["label"].to_numpy(dtype=np.float32)
    cands = {c: imp[c].to_numpy(dtype=np.float32) for c in cand_cols}
    users = imp["user_id"].to_numpy()
    ts = imp["timestamp"].to_numpy(dtype=np.int64)
    empty = (np.zeros(0, np.int64),) * 3
    rows = []
    for s, e in tqdm(
        zip(starts, ends, strict=True), total=len(starts), desc="lists", disable=not progress, leave=False
    ):
        if e - s < MIN_LIST:
            continue
        h_ts, h_items, h_acts = histories.get(users[s], empty)
        end = int(np.searchsorted(h_ts, ts[s], side="left"))
        window = slice(max(0, end - max_history), end)
        row = {
            "user_id": users[s],
            "timestamp": ts[s],
            "items": items[s:e],
            "labels": labels[s:e],
            "hist_items": h_items[window],
            "hist_ts": h_ts[window],
            "hist_actions": h_acts[window],
        }
        row.update({f"cand_{c}": v[s:e] for c, v in cands.items()})
        rows.append(row)
    columns = ["user_id", "timestamp", "items", *(f"cand_{c}" for c in cand_cols), "labels"]
    return pd.DataFrame(rows, columns=[*columns, "hist_items", "hist_ts", "hist_actions"])


def write_logs(
    out: Path,
    logs: Logs,
    split: pd.Series,
    *,
    item_ids: Sequence[str],
    actions: tuple[str, ...],
    max_history: int,
    extra: dict,
    progress: bool,
    content: Sequence[str] = (),
    cold_item_ids: Sequence[str] = (),
) -> dict:
    """Write `logs` as a data set; `split` gives each impression row's split, `item_ids` the item vocabulary.

    `content` names the item feature columns that describe what an item is (schema.item_content);
    `cold_item_ids` are catalogue items first seen after the training period: they follow
    `item_ids` in the vocabulary (schema.known_items marks where), so lists and histories keep them
    apart instead of folding them into OOV, and side-feature vocabularies and statistics are fit on
    the known items only.

    Lists shorter than 2 are dropped. The summary gains `initial_order`: NDCG@10 of the stored
    (ranking-stage) order vs a random order on val and test, so users see what rerankers must beat;
    and `split`, a copy of `extra["split"]` (how the split was made), so the provenance is beside
    the figures it explains.
    """
    imp = logs.impressions
    check_content(logs.items, content)
    known_ids, cold_ids = [str(i) for i in item_ids], [str(i) for i in cold_item_ids]
    both = sorted(set(known_ids) & set(cold_ids))
    if both:
        raise DataError(f"cold_item_ids: {both[:5]} are also in item_ids; a cold item is one not seen in training")
    all_ids = known_ids + cold_ids
    vocab = Vocab(all_ids)
    n_items = len(vocab)
    n_known = N_RESERVED + len(known_ids)
    reserved = [""] * N_RESERVED  # rows 0 (pad) and 1 (OOV): missing features
    item_table, item_cat, item_num, item_vocabs = _encode_side(logs.items, "item_id", reserved + all_ids, n_known)
    items = pd.concat(
        [pd.DataFrame({"item_index": np.arange(n_items, dtype=np.int64), "item_id": reserved + all_ids}), item_table],
        axis=1,
    )
    user_ids = sorted(set(imp["user_id"]) | set(logs.behaviours["user_id"]))
    user_table, user_cat, user_num, user_vocabs = _encode_side(logs.users, "user_id", user_ids)
    users = pd.concat([pd.DataFrame({"user_id": user_ids}), user_table], axis=1)

    behaviours = (
        logs.behaviours[list(BEHAVIOUR_COLUMNS)]
        .sort_values(["user_id", "timestamp", "item_id"], kind="stable")
        .reset_index(drop=True)
    )
    histories = _histories(behaviours, vocab, actions)
    cand_cols = [RANK_SCORE, *sorted(c for c in imp.columns if str(c).startswith("f_"))]
    splits = {name: _lists(imp[split == name], vocab, histories, cand_cols, max_history, progress) for name in SPLITS}
    first_id = 0
    for name in SPLITS:
        splits[name].insert(0, "list_id", np.arange(first_id, first_id + len(splits[name]), dtype=np.int64))
        first_id += len(splits[name])
        if len(splits[name]) == 0:
            raise DataError(f"split {name!r} has no list of >= {MIN_LIST} items after filtering: too little data")
    train_rows = imp[split == "train"]
    graded = not imp["label"].isin([0, 1]).all()
    schema = FeatureSchema(
        n_items=n_items,
        actions=tuple(actions),
        max_history=max_history,
        max_list=max(int(splits[s]["items"].map(len).max()) for s in SPLITS),
        user_categorical=tuple(user_cat),
        user_numeric=tuple(user_num),
        item_categorical=tuple(item_cat),
        item_numeric=tuple(item_num),
        candidate_numeric=tuple(numeric_feature(c, train_rows[c].to_numpy()) for c in cand_cols),
        label="graded" if graded else "click",
        max_label=float(imp["label"].max()) if graded else 1.0,
        item_content=tuple(content),
        known_items=n_known if cold_ids else 0,
        extra=extra,
    )
    vocabs = Vocabularies(
        items=vocab,
        user_categorical=user_vocabs,
        item_content={c: item_vocabs[c] for c in content if c in item_vocabs},
    )
    with staged(out) as staging:
        stats = write_dataset(staging, schema, vocabs, users, items, behaviours, splits)
        stats["initial_order"] = {s: order_quality(splits[s]["labels"]) for s in ("val", "test")}
        if "split" in extra:
            stats["split"] = extra["split"]
        (staging / "stats.json").write_text(json.dumps(stats, indent=2))
    if progress:
        tqdm.write(format_order_quality(stats["initial_order"]))
        if "split" in stats:
            tqdm.write(format_split(stats["split"]))
    return stats


def check_content(items: pd.DataFrame, content: Sequence[str]) -> None:
    """Each content name is an item feature column, once: a typo would silently leave content out."""
    features = [str(c) for c in items.columns if c != "item_id"]
    for name in content:
        if name not in features:
            raise DataError(
                f"content: {name!r} is not an item feature column; choose from {features} "
                "(the columns of the items table besides item_id)"
            )
    repeated = sorted({c for c in content if list(content).count(c) > 1})
    if repeated:
        raise DataError(f"content: {repeated} named more than once; name each content column once")


def format_split(split: dict) -> str:
    if split["method"] != "time":
        return "split: the impressions' `split` column"
    val, test = (pd.Timestamp(c, unit="s").strftime("%Y-%m-%d %H:%M:%S") for c in split["cuts"])
    return f"split: time; train < {val} UTC <= val < {test} UTC <= test"


def format_order_quality(quality: dict) -> str:
    rows = ["initial order (ranking stage) vs random order:"]
    rows.append(f"{'split':<6} {'lists':>7} {'NDCG@10':>8} {'random':>8}")
    for name, q in quality.items():
        rows.append(f"{name:<6} {q['lists']:>7,} {q['ndcg@10']:>8.4f} {q['random_ndcg@10']:>8.4f}")
    return "\n".join(rows)
