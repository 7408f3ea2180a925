"""MovieLens builders: a tiny hand-made set in both file formats, and the real ML-100K / ML-1M when present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from export.contract.schema import OOV, FeatureSchema, SchemaError
from tests.conftest import ML100K, REPO
from training.data.movielens import ML1M_GENRES, ML100K_GENRES, build_movielens, core_filter
from training.data.store import SPLITS, DataError, load_schema, load_split, load_vocabs
from training.metrics import ndcg_at_k

BASE_DAY = 11_323  # 2001-01-01, a day boundary
DAY = 86_400
GENRES = ("Comedy", "Drama", "Children's")
UNRATED_USERS = (100, 101, 102)  # in the users file, without ratings: a ratings file may hold some users only
ML1M = Path(os.environ.get("PSAD_ML1M", REPO.parent / "shared" / "data" / "ml-1m-half"))
ML1M_HALF_LISTS = {"train": 10_738, "val": 1_194, "test": 2_400}  # docs/data.md#movielens


def tiny_ratings() -> list[tuple[int, int, int, int]]:
    """8 users x 24 items over 12 days (2 a day per user; 1 non-click per item), plus 5-core victims."""
    rows = []
    for u in range(1, 9):
        for j in range(24):
            item = (j + 3 * u) % 24 + 1
            rating = 2 if j % 8 == 0 else 4 + j % 2
            rows.append((u, item, rating, (BASE_DAY + j // 2) * DAY + 3600 * (j % 2) + 60 * u))
    rows += [(99, 1 + k, 5, BASE_DAY * DAY + k) for k in range(3)]  # user with 3 clicks
    rows += [(u, 999, 5, (BASE_DAY + 1) * DAY + u) for u in (1, 2)]  # item with 2 clicks
    return rows


def write_movielens(directory: Path, fmt: str, ratings: list[tuple] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ratings = tiny_ratings() if ratings is None else ratings
    users = sorted({r[0] for r in ratings} | set(UNRATED_USERS))
    items = sorted({r[1] for r in ratings})
    title = {i: ("Amélie" if i == 1 else f"Movie {i}") + f" ({1960 + 10 * (i % 5)})" for i in items}
    if fmt == "ml1m":
        files = {
            "ratings.dat": ["::".join(map(str, r)) for r in ratings],
            "users.dat": [f"{u}::{'MF'[u % 2]}::{(1, 18, 25, 35, 56)[u % 5]}::{u % 21}::0{u}000" for u in users],
            "movies.dat": [f"{i}::{title[i]}::{GENRES[i % 3]}|{GENRES[(i + 1) % 3]}" for i in items],
        }
    else:
        flags = {i: ["1" if g in (GENRES[i % 3], GENRES[(i + 1) % 3]) else "0" for g in ML100K_GENRES] for i in items}
        files = {
            "u.data": ["\t".join(map(str, r)) for r in ratings],
            "u.user": [f"{u}|{15 + 6 * u}|{'MF'[u % 2]}|writer|0{u}000" for u in users],
            "u.item": [f"{i}|{title[i]}|01-Jan-{title[i][-5:-1]}||http://x|{'|'.join(flags[i])}" for i in items],
        }
    for name, lines in files.items():
        (directory / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return directory


def build(source: Path, out: Path, fmt: str) -> Path:
    build_movielens(source, out, fmt=fmt, max_history=8, seed=0, progress=False)
    return out


def _tiny(fmt: str):
    @pytest.fixture(scope="module")
    def built_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
        root = tmp_path_factory.mktemp(f"tiny_{fmt}")
        return build(write_movielens(root / "src", fmt), root / "data", fmt)

    return built_tiny


tiny_ml1m, tiny_ml100k = _tiny("ml1m"), _tiny("ml100k")


@pytest.fixture(params=["tiny_ml1m", "tiny_ml100k"])
def tiny(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {ML100K} (set PSAD_ML100K); licence forbids shipping it")
    return build(ML100K, tmp_path_factory.mktemp("ml100k") / "data", "ml100k")


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ML1M / "ratings.dat").is_file():
        pytest.skip(f"MovieLens-1M not found at {ML1M} (set PSAD_ML1M); licence forbids shipping it")
    return build(ML1M, tmp_path_factory.mktemp("ml1m") / "data", "ml1m")


@pytest.fixture(params=["tiny_ml1m", "tiny_ml100k", "ml100k", "ml1m"])
def built(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def splits(data: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(data / f"{s}.parquet") for s in SPLITS}


def test_tiny_round_trips_through_load_split(tiny: Path) -> None:
    schema = load_schema(tiny)
    fmt = schema.extra["source"]
    genres = ML1M_GENRES if fmt == "ml1m" else ML100K_GENRES
    assert schema.actions == ("view", "click")
    assert [f.name for f in schema.user_categorical] == ["age", "gender", "occupation"]
    assert len(schema.item_numeric) == len(genres) and schema.item_numeric[0].name.startswith("genre_")
    assert [f.name for f in schema.item_categorical] == ["decade"]
    assert schema.item_content == (*(f.name for f in schema.item_numeric), "decade") and schema.known_items == 0
    assert load_vocabs(tiny, schema).item_content["decade"].tokens == ["1960s", "1970s", "1980s", "1990s", "2000s"]
    assert [f.name for f in schema.candidate_numeric] == ["rank_score"]
    for name, df in splits(tiny).items():
        data = load_split(tiny, name)
        assert len(data) == len(df) > 0
        lengths = df["items"].map(len).to_numpy()
        assert (data.inputs["cand_mask"].sum(axis=1) == lengths).all() and lengths.min() >= 2
        assert np.array_equal(data.labels.sum(axis=1), df["labels"].map(sum).to_numpy(dtype=np.float32))
        # stored order is the initial ranker's: rank_score descending
        assert all((np.diff(s) <= 0).all() for s in df["cand_rank_score"])


def test_tiny_five_core_and_run_lengths(tiny: Path) -> None:
    users = pd.read_parquet(tiny / "users.parquet")
    items = pd.read_parquet(tiny / "items.parquet")
    assert "99" not in set(users["user_id"]) and "999" not in set(items["item_id"])
    assert set(users["user_id"]) == {str(u) for u in range(1, 9)}
    parts = splits(tiny)
    # train lists come from the second half of the training days only: one run of 10 per user
    assert parts["train"]["items"].map(len).tolist() == [10] * 8
    assert parts["val"]["items"].map(len).tolist() == [2] * 8


def test_build_is_deterministic(tmp_path: Path) -> None:
    src = write_movielens(tmp_path / "src", "ml1m")
    a, b = build(src, tmp_path / "a", "ml1m"), build(src, tmp_path / "b", "ml1m")
    for name in SPLITS:
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet"))


def test_core_filter_iterates_until_stable() -> None:
    # item c has 5 clicks only while user z stays; z has 4 clicks plus c -> removing z drops c next round
    rows = [(u, i, 1) for u in "abcde" for i in "pqrst"]
    rows += [(u, "c", 1) for u in "abcd"] + [("z", i, 1) for i in "pqrc"] + [("z", "p", 0)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "label"])
    kept = core_filter(df)
    assert "z" not in set(kept["user_id"]) and "c" not in set(kept["item_id"])
    clicks = kept[kept["label"] > 0]
    assert clicks["user_id"].value_counts().min() >= 5 and clicks["item_id"].value_counts().min() >= 5


def test_no_history_leakage(built: Path) -> None:
    schema = load_schema(built)
    behaviours = pd.read_parquet(built / "behaviours.parquet")
    by_user = {u: g["timestamp"].to_numpy() for u, g in behaviours.groupby("user_id")}
    for df in splits(built).values():
        for user, ts, hist_ts in zip(df["user_id"], df["timestamp"], df["hist_ts"], strict=True):
            hist_ts = np.asarray(hist_ts)
            assert (hist_ts < ts).all() and (np.diff(hist_ts) >= 0).all()
            earlier = by_user[user][by_user[user] < ts]
            assert len(hist_ts) == min(schema.max_history, len(earlier))  # the last H, none skipped
            assert np.array_equal(hist_ts, earlier[len(earlier) - len(hist_ts) :])


def test_splits_disjoint_in_time_and_ids_seen_in_train(built: Path) -> None:
    parts = splits(built)
    schema = load_schema(built)
    assert parts["train"]["timestamp"].max() < parts["val"]["timestamp"].min()
    assert parts["val"]["timestamp"].max() < parts["test"]["timestamp"].min()
    behaviours = pd.read_parquet(built / "behaviours.parquet")
    cuts = schema.extra["split"]["cuts"]
    assert schema.extra["split"] == {"method": "time", "cuts": cuts} and all(c % DAY == 0 for c in cuts)
    assert json.loads((built / "stats.json").read_text())["split"] == schema.extra["split"]
    assert parts["train"]["timestamp"].max() < cuts[0] <= parts["val"]["timestamp"].min()
    assert parts["val"]["timestamp"].max() < cuts[1] <= parts["test"]["timestamp"].min()
    train_period = behaviours[behaviours["timestamp"] < cuts[0]]
    for name in ("val", "test"):
        assert set(parts[name]["user_id"]) <= set(train_period["user_id"])
        items = np.concatenate(parts[name]["items"].to_numpy())
        assert items.min() > OOV  # every candidate item is in the training vocabulary


@pytest.mark.parametrize("real", ["ml100k", "ml1m"])
def test_initial_order_beats_random(real: str, request: pytest.FixtureRequest) -> None:
    data_dir = request.getfixturevalue(real)
    stats = json.loads((data_dir / "stats.json").read_text())
    rng = np.random.default_rng(0)
    for name in ("val", "test"):
        data = load_split(data_dir, name)
        mask = data.inputs["cand_mask"]
        stored = np.broadcast_to(np.arange(mask.shape[1]), mask.shape)
        ndcg = ndcg_at_k(stored, data.labels, mask, 10).mean()
        random = np.mean([ndcg_at_k(rng.permuted(stored, axis=1), data.labels, mask, 10).mean() for _ in range(20)])
        assert ndcg > random + 0.03
        assert stats["initial_order"][name]["ndcg@10"] == pytest.approx(ndcg)


def test_ml1m_half_holds_the_rated_users_only(ml1m: Path) -> None:
    """ratings.dat of users 1-2,999 with users.dat of all 6,040: the others are absent, not empty lists."""
    stats = json.loads((ml1m / "stats.json").read_text())
    assert {s: stats["splits"][s]["lists"] for s in SPLITS} == ML1M_HALF_LISTS
    assert (stats["users"], stats["items"]) == (2_774, 2_794)
    users = pd.read_parquet(ml1m / "users.parquet")["user_id"].astype(int)
    assert len(users) == stats["users"] and users.max() < 3_000
    for df in splits(ml1m).values():
        assert set(df["user_id"]) <= set(users.astype(str)) and df["items"].map(len).min() >= 2


def test_schema_version_is_checked(tiny: Path, tmp_path: Path) -> None:
    raw = json.loads((tiny / "schema.json").read_text())
    assert FeatureSchema.from_dict(raw) == load_schema(tiny)
    raw["version"] = 999
    (tmp_path / "schema.json").write_text(json.dumps(raw))
    with pytest.raises(SchemaError, match="version"):
        FeatureSchema.load(tmp_path / "schema.json")


RATINGS = {"ml1m": "ratings.dat", "ml100k": "u.data"}


def _replace_line(path: Path, index: int, new: str) -> None:
    lines = path.read_text(encoding="latin-1").splitlines()
    lines[index] = new
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")


def _corrupt_field(path: Path, field: int, value: str, sep: str) -> None:
    line = path.read_text(encoding="latin-1").splitlines()[2].split(sep)
    line[field] = value
    _replace_line(path, 2, sep.join(line))


BAD_INPUTS = {
    "missing file": (lambda d, f, sep: (d / RATINGS[f]).unlink(), "file not found"),
    "wrong delimiter": (
        lambda d, f, sep: (d / RATINGS[f]).write_text((d / RATINGS[f]).read_text().replace(sep, ",")),
        "is the delimiter ','",
    ),
    "empty value": (lambda d, f, sep: _corrupt_field(d / RATINGS[f], 2, "", sep), "row 3, column 'rating'"),
    "not a number": (lambda d, f, sep: _corrupt_field(d / RATINGS[f], 2, "x", sep), "'x' is not a finite number"),
    "negative timestamp": (lambda d, f, sep: _corrupt_field(d / RATINGS[f], 3, "-5", sep), "'timestamp': must be >= 0"),
    "timestamp in milliseconds": (
        lambda d, f, sep: _corrupt_field(d / RATINGS[f], 3, "978300760000", sep),
        "row 3, column 'timestamp': 978300760000 is above 1e+11: unix seconds expected",
    ),
    "rating out of range": (lambda d, f, sep: _corrupt_field(d / RATINGS[f], 2, "7", sep), "ratings must be 1..5"),
    "unknown user": (lambda d, f, sep: _corrupt_field(d / RATINGS[f], 0, "5000", sep), "[5000] is not in"),
    "nothing survives filtering": (
        lambda d, f, sep: write_movielens(d, f, [(u, i, 3, DAY * i) for u in (1, 2) for i in (1, 2)]),
        "no interaction survives the 5-core filter",
    ),
    "too few days": (
        lambda d, f, sep: write_movielens(d, f, [(u, i, 5, BASE_DAY * DAY + i) for u in range(7) for i in range(7)]),
        "empty",
    ),
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["ml1m", "ml100k"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_rejected_with_a_message(case: str, fmt: str, tmp_path: Path) -> None:
    corrupt, message = BAD_INPUTS[case]
    src = write_movielens(tmp_path / "src", fmt)
    corrupt(src, fmt, "::" if fmt == "ml1m" else "\t")
    with pytest.raises(DataError) as err:
        build(src, tmp_path / "out", fmt)
    assert message in str(err.value)
    assert not (tmp_path / "out" / "schema.json").exists()


def test_ml1m_unknown_genre_names_the_row(tmp_path: Path) -> None:
    src = write_movielens(tmp_path / "src", "ml1m")
    _replace_line(src / "movies.dat", 1, "2::Movie 2 (1970)::Comedy|Space Opera")
    with pytest.raises(DataError, match=r"movies.dat: row 2, column 'genres': unknown genre \['Space Opera'\]"):
        build(src, tmp_path / "out", "ml1m")
