"""MovieLens-100K / -1M -> the on-disk data-set format, with the ReChorus reranking recipe.

Recipe (docs/data.md#movielens): rating >= 4 is a click; 5-core filter on clicks; global time
split 80/10/10 on day boundaries; val/test users and items must occur in train; a displayed list
is a run of at most 20 consecutive interactions of one user within one split; its history is
that user's interactions strictly before the list (click for rating >= 4, else view). The genre
flags and the decade are the items' content (schema.item_content).

With `cold_items`, val/test interactions on items unseen in train are kept (users unseen in
train are still dropped): those items are the cold items, first seen after the training period.
MovieLens has few (most films were rated from the start), so `cold_share` also holds out a
seeded share of the films rated in val/test: their training-period interactions are dropped, as
if they had entered the catalogue at the val cut.

MovieLens logs no displayed order, so an initial ranker (training/data/initial_ranker.py) fit on
the first half of the training period orders every later list. Training lists from that first
half are dropped: their order would come from a model that saw them (their interactions still
serve as histories).
"""

from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from export.contract.schema import RANK_SCORE
from training.data.generic import (
    DERIVED_ACTIONS,
    SPLIT_FRACTIONS,
    Logs,
    check_numeric,
    check_timestamps,
    fail_rows,
    time_split,
    write_logs,
)
from training.data.initial_ranker import InitialRanker
from training.data.store import DataError

DAY = 86_400
CLICK_RATING = 4
CORE = 5
LIST_RUN = 20
COLD_STREAM = 20  # the held-out items' random stream: (seed, COLD_STREAM), apart from the ranker's (seed)
GENRE_PREFIX = "genre_"  # item columns genre_<name>: 0/1 flags, with `decade` the items' content
RANKER_FRACTION = 0.5  # share of training interactions (day boundary) the initial ranker is fit on
ML1M_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
ML100K_GENRES = ("unknown", *ML1M_GENRES)
AGE_BOUNDS = (18, 25, 35, 45, 50, 56)  # ML-1M age groups; ML-100K ages are bucketed the same way
AGE_LABELS = ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


@dataclass(frozen=True)
class FileSpec:
    name: str
    sep: str
    columns: tuple[str, ...]  # every field, in order
    optional: tuple[str, ...] = ()  # fields that may be empty; the others may not


RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
FORMATS = {
    "ml100k": (
        FileSpec("u.data", "\t", RATING_COLUMNS),
        FileSpec("u.user", "|", ("user_id", "age", "gender", "occupation", "zip"), ("zip",)),
        FileSpec(
            "u.item",
            "|",
            ("item_id", "title", "release", "video_release", "url", *(f"g{i}" for i in range(19))),
            ("title", "release", "video_release", "url"),
        ),
    ),
    "ml1m": (
        FileSpec("ratings.dat", "::", RATING_COLUMNS),
        FileSpec("users.dat", "::", ("user_id", "gender", "age", "occupation", "zip"), ("zip",)),
        FileSpec("movies.dat", "::", ("item_id", "title", "genres")),
    ),
}


def read_file(source: Path, spec: FileSpec) -> pd.DataFrame:
    """Read one headerless MovieLens file as strings; rows are numbered from 1 in messages."""
    path = source / spec.name
    if not path.is_file():
        raise DataError(f"{path}: file not found; see docs/data.md#movielens for the files each format needs")
    text = path.read_bytes().decode("latin-1")
    sep = spec.sep
    if len(sep) > 1:  # pandas' C parser takes one-character separators only
        text, sep = text.replace(sep, "\x1f"), "\x1f"
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, header=None, dtype=str, keep_default_na=False, quoting=3)
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: expected {len(spec.columns)} {spec.sep!r}-separated fields per row ({exc})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    if df.shape[1] != len(spec.columns):
        first = text.split("\n", 1)[0]
        guess = next((d for d in ("::", "\t", "|", ",", ";") if d in first and d != spec.sep), None)
        hint = f"; is the delimiter {guess!r}?" if guess else ""
        raise DataError(
            f"{path}: expected {len(spec.columns)} fields separated by {spec.sep!r}, found {df.shape[1]} in "
            f"row 1 {first[:60]!r}{hint}"
        )
    df.columns = list(spec.columns)
    for col in (c for c in spec.columns if c not in spec.optional):
        fail_rows(path, col, df[col].isna() | (df[col].str.strip() == ""), "empty value; the file looks truncated")
    return df


def read_movielens(source: Path, fmt: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Ratings (user_id, item_id, rating, timestamp), users (age, gender, occupation), items (genres, decade).

    Ids stay integers here (fast filtering); they become strings when handed to `write_logs`.
    Users and items without ratings are legitimate (a ratings file may hold some users only):
    they stay out of the data set, which keeps only ids that interacted.
    """
    if fmt not in FORMATS:
        raise DataError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: directory not found")
    spec_r, spec_u, spec_i = FORMATS[fmt]
    ratings, users, items = (read_file(source, s) for s in FORMATS[fmt])

    path = source / spec_r.name
    for col in ("user_id", "item_id"):
        check_numeric(ratings, path, col, integer=True, minimum=0)
    check_numeric(ratings, path, "rating", integer=True, minimum=1)
    fail_rows(path, "rating", ratings["rating"] > 5, "ratings must be 1..5")
    check_timestamps(ratings, path)

    path = source / spec_u.name
    check_numeric(users, path, "user_id", integer=True, minimum=0)
    check_numeric(users, path, "age", integer=True, minimum=0)
    users = pd.DataFrame(
        {
            "user_id": users["user_id"],
            "age": np.asarray(AGE_LABELS)[np.searchsorted(AGE_BOUNDS, users["age"].to_numpy(), side="right")],
            "gender": users["gender"].str.strip(),
            "occupation": users["occupation"].str.strip(),
        }
    )

    path = source / spec_i.name
    check_numeric(items, path, "item_id", integer=True, minimum=0)
    if fmt == "ml100k":
        flags = [f"g{i}" for i in range(len(ML100K_GENRES))]
        for col in flags:
            check_numeric(items, path, col, integer=True, minimum=0)
        genres = items[flags].to_numpy(dtype=np.float32)
        year = items["release"].str.extract(r"(\d{4})\s*$")[0]
        names = ML100K_GENRES
    else:
        split = items["genres"].str.split("|")
        unknown = split.map(lambda gs: next((g for g in gs if g not in ML1M_GENRES), None))
        fail_rows(
            path,
            "genres",
            unknown.notna(),
            f"unknown genre {unknown.dropna().head(1).tolist()}; expected '|'-separated names from {list(ML1M_GENRES)}",
        )
        genres = np.array([[g in gs for g in ML1M_GENRES] for gs in split], dtype=np.float32).reshape(-1, 18)
        year = items["title"].str.extract(r"\((\d{4})\)\s*$")[0]
        names = ML1M_GENRES
    decade = year.astype(float).floordiv(10).mul(10)
    items = pd.DataFrame(
        {"item_id": items["item_id"], **{genre_column(g): genres[:, k] for k, g in enumerate(names)}}
    ).assign(decade=decade.map(lambda d: f"{d:.0f}s", na_action="ignore"))

    for table, key, name in ((users, "user_id", spec_u.name), (items, "item_id", spec_i.name)):
        fail_rows(source / name, key, table[key].duplicated(), f"duplicate {key}")
        missing = ~ratings[key].isin(table[key])
        fail_rows(source / spec_r.name, key, missing, f"{ratings.loc[missing, key].head(1).tolist()} is not in {name}")
    return ratings, users, items


def genre_column(genre: str) -> str:
    return GENRE_PREFIX + re.sub(r"[^a-z0-9]+", "_", genre.lower().replace("'", "")).strip("_")


def core_filter(ratings: pd.DataFrame, k: int = CORE) -> pd.DataFrame:
    """Drop users and items with < k clicks (and all their interactions) until none is left."""
    while True:
        clicks = ratings[ratings["label"] > 0]
        users = clicks["user_id"].value_counts()
        items = clicks["item_id"].value_counts()
        keep = ratings["user_id"].isin(users.index[users >= k]) & ratings["item_id"].isin(items.index[items >= k])
        if keep.all():
            return ratings
        ratings = ratings[keep]


def day_cuts(ts: np.ndarray, fractions: tuple[float, ...]) -> list[int]:
    """Day boundaries (unix s) before which the share of `ts` is closest to each fraction."""
    days, counts = np.unique(np.asarray(ts) // DAY, return_counts=True)
    before = (np.cumsum(counts) - counts) / len(ts)
    return [int(days[np.argmin(np.abs(before - f))]) * DAY for f in fractions]


def hold_out_items(ratings: pd.DataFrame, share: float, seed: int, *, what: str) -> pd.DataFrame:
    """Drop the training-period interactions of a seeded `share` of the items rated after it, which
    so enter the catalogue at the val cut: a cold-item split for logs whose items are nearly all old."""
    later = np.unique(ratings.loc[ratings["split"] != "train", "item_id"])
    n = int(round(share * len(later)))
    if n == 0:
        raise DataError(
            f"{what}: --cold-share {share} of the {len(later)} films rated after training is none; raise it"
        )
    held = np.random.default_rng([seed, COLD_STREAM]).choice(later, size=n, replace=False)
    return ratings[~(ratings["item_id"].isin(held) & (ratings["split"] == "train"))]


def _features(table: pd.DataFrame, key: str, ids: np.ndarray) -> np.ndarray:
    """Dense ranker inputs: numeric columns as is, string columns one-hot."""
    rows = table.set_index(key).loc[ids]
    return pd.get_dummies(rows, dtype=np.float64).to_numpy(dtype=np.float64)


def build_movielens(
    source: Path,
    out: Path,
    *,
    fmt: str,
    max_history: int,
    seed: int,
    cold_items: bool = False,
    cold_share: float = 0.0,
    progress: bool = True,
) -> dict:
    """Build ml100k / ml1m with the ReChorus recipe; lists are ordered by the initial ranker.

    `cold_items` keeps val/test interactions on items unseen in train as cold items (a cold-item
    split); the initial ranker scores them from their features, as it scores any item it was not fit on.
    `cold_share` (implies `cold_items`) first makes that share of the films rated in val/test cold.
    """
    if not 0.0 <= cold_share < 1.0:
        raise DataError(f"--cold-share must be a share in [0, 1), got {cold_share}")
    cold_items = cold_items or cold_share > 0
    ratings, users, items = read_movielens(source, fmt)
    ratings = ratings.assign(label=(ratings["rating"] >= CLICK_RATING).astype(np.int64))
    ratings = core_filter(ratings)
    if len(ratings) == 0:
        raise DataError(
            f"{source}: no interaction survives the {CORE}-core filter on clicks (rating >= {CLICK_RATING}); "
            "the files hold too few clicks per user and item"
        )
    cuts = day_cuts(ratings["timestamp"].to_numpy(), SPLIT_FRACTIONS)
    ts = ratings["timestamp"]
    ratings = ratings.assign(split=np.select([ts < cuts[0], ts < cuts[1]], ["train", "val"], "test"))
    if cold_share:
        ratings = hold_out_items(ratings, cold_share, seed, what=str(source))
    train = ratings[ratings["split"] == "train"]
    later = ratings["split"] != "train"
    seen = ratings["user_id"].isin(train["user_id"])
    if not cold_items:
        seen &= ratings["item_id"].isin(train["item_id"])
    ratings = ratings[~later | seen].sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    ratings = ratings.reset_index(drop=True)
    empty = [s for s in ("train", "val", "test") if not (ratings["split"] == s).any()]
    if empty:
        dropped = "users unseen in train" if cold_items else "users and items unseen in train"
        raise DataError(
            f"{source}: split(s) {empty} empty after the day split and dropping val/test {dropped} "
            f"({len(ratings)} interactions over {ts.floordiv(DAY).nunique()} days): too little data"
        )

    ranker_cut = day_cuts(train["timestamp"].to_numpy(), (RANKER_FRACTION,))[0]
    period = ratings["split"].where((ratings["split"] != "train") | (ratings["timestamp"] >= ranker_cut), "ranker")
    user_ids, user_idx = np.unique(ratings["user_id"], return_inverse=True)
    item_ids, item_idx = np.unique(ratings["item_id"], return_inverse=True)
    fit = (period == "ranker").to_numpy()
    if not fit.any() or fit.sum() == (ratings["split"] == "train").sum():
        raise DataError(f"{source}: the training period spans too few days to fit the initial ranker on its first half")
    ranker = InitialRanker(_features(users, "user_id", user_ids), _features(items, "item_id", item_ids))
    ranker.fit(user_idx[fit], item_idx[fit], ratings["label"].to_numpy()[fit], seed=seed, progress=progress)
    ratings[RANK_SCORE] = ranker.score(user_idx, item_idx)
    ratings = ratings.astype({"user_id": str, "item_id": str})
    users, items = users.astype({"user_id": str}), items.astype({"item_id": str})

    shown = ratings[~fit].assign(period=period[~fit])
    run = shown.groupby(["user_id", "period"], sort=False).cumcount() // LIST_RUN
    shown = shown.assign(request_id=shown["user_id"] + ":" + shown["period"] + ":" + run.astype(str))
    shown["timestamp"] = shown.groupby("request_id")["timestamp"].transform("min")
    shown = shown.sort_values(["request_id", RANK_SCORE, "item_id"], ascending=[True, False, True], kind="stable")
    shown["position"] = shown.groupby("request_id").cumcount()

    logs = Logs(
        impressions=shown[["request_id", "user_id", "timestamp", "item_id", "position", "label", RANK_SCORE]],
        behaviours=ratings[["user_id", "item_id", "timestamp"]].assign(
            action=np.where(ratings["label"] > 0, "click", "view")
        ),
        users=users,
        items=items,
    )
    extra = {
        "source": fmt,
        "recipe": f"rating>={CLICK_RATING} click; {CORE}-core on clicks; day split {SPLIT_FRACTIONS}; "
        f"runs of <= {LIST_RUN} interactions; ordered by the initial ranker",
        "split": time_split(cuts),
        "ranker_cut": ranker_cut,
        "ranker": {**asdict(ranker.config), "seed": seed, "fit_interactions": int(fit.sum())},
        **({"cold_share": cold_share} if cold_share else {}),
    }
    in_train = ratings["split"] == "train"
    train_items = set(ratings.loc[in_train, "item_id"])
    return write_logs(
        out,
        logs,
        shown["period"],
        item_ids=sorted(train_items, key=int),
        cold_item_ids=sorted(set(ratings.loc[~in_train, "item_id"]) - train_items, key=int),
        content=[c for c in items.columns if c.startswith(GENRE_PREFIX)] + ["decade"],
        actions=DERIVED_ACTIONS,
        max_history=max_history,
        extra=extra,
        progress=progress,
    )
