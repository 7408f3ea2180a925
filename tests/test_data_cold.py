"""Item content and the cold-item split (issue 20) in every builder: simulator, generic logs, MovieLens.

A cold item is a catalogue item first seen after the training period: it must be in no training
list and in no behaviour before the train/val cut, yet in val/test lists, with its own vocabulary
index after the known items (schema.known_items).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from export.contract.schema import N_RESERVED, OOV, FeatureSchema
from tests.test_data_generic import impressions, write_csv_example
from tests.test_data_movielens import BASE_DAY, DAY, tiny_ratings, write_movielens
from training.data.cli import app
from training.data.generic import Logs, read_logs, write_logs
from training.data.movielens import build_movielens
from training.data.store import SPLITS, DataError, load_schema, load_vocabs
from training.data.synthetic import SimulatorConfig, build_synthetic

COLD = {"lists": 1200, "users": 80, "items": 150, "list_length": 10, "max_history": 20, "seed": 0}
CONTENT_DIM = 8
# The default simulator's output (lists, clicks, histories, item features) for one seed, as built
# before content and cold items existed: they draw from spawned generators, so it must not move.
DEFAULT_DIGEST = "8d403e4caddfe4ef7bc133a6e02c52735e9fb5981cc70f63086e6e8595b0c440"


def splits(data: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(data / f"{s}.parquet") for s in SPLITS}


def flat(column: pd.Series) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=np.float64) for x in column]) if len(column) else np.zeros(0)


def val_cut(data: Path) -> int:
    return int(pd.read_parquet(data / "val.parquet", columns=["timestamp"])["timestamp"].min())


def assert_cold_split(data: Path) -> FeatureSchema:
    """The cold-item contract of any builder's output; returns the schema."""
    schema = load_schema(data)
    vocabs = load_vocabs(data, schema)
    assert N_RESERVED < schema.known_items < schema.n_items
    tables = splits(data)
    train = tables["train"]
    assert flat(train["items"]).max() < schema.known_items
    assert flat(train["hist_items"]).max(initial=0) < schema.known_items
    later = np.concatenate([flat(tables[s]["items"]) for s in ("val", "test")])
    assert (later >= schema.known_items).any()
    log = pd.read_parquet(data / "behaviours.parquet")
    index = np.asarray(vocabs.items.indices(log["item_id"].tolist()))
    assert (index != OOV).all()  # every behaviour's item is in the vocabulary, cold ones included
    assert (index[log["timestamp"].to_numpy() < val_cut(data)] < schema.known_items).all()
    stats = json.loads((data / "stats.json").read_text())
    assert stats["cold_items"] == schema.n_items - schema.known_items
    for name, df in tables.items():
        cold = [np.asarray(i) >= schema.known_items for i in df["items"]]
        clicks = sum(int((np.asarray(lab)[c] > 0).sum()) for lab, c in zip(df["labels"], cold, strict=True))
        expected = {
            "lists_with_cold_items": sum(bool(c.any()) for c in cold),
            "cold_candidate_share": sum(int(c.sum()) for c in cold) / sum(len(c) for c in cold),
            "cold_item_clicks": clicks,
        }
        assert {k: stats["splits"][name][k] for k in expected} == pytest.approx(expected)
    return schema


# --- simulator --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cold_sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cold_sim") / "data"
    build_synthetic(out, **COLD, progress=False, config=SimulatorConfig(content_dim=CONTENT_DIM, cold_items=0.2))
    return out


@pytest.fixture(scope="module")
def default_sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default_sim") / "data"
    build_synthetic(out, **COLD, progress=False)
    return out


def test_simulator_declares_its_content_vectors(cold_sim: Path) -> None:
    schema = load_schema(cold_sim)
    names = tuple(f"content_{j}" for j in range(CONTENT_DIM))
    assert schema.item_content == names
    assert [f.name for f in schema.content_numeric] == list(names) and schema.content_categorical == ()
    assert load_vocabs(cold_sim, schema).item_content == {}
    items = pd.read_parquet(cold_sim / "items.parquet")
    content = items[list(names)].to_numpy()
    assert np.isfinite(content).all() and content[2:].std(axis=0).min() > 0.3
    np.testing.assert_allclose(content[:2], [[f.mean for f in schema.content_numeric]] * 2, rtol=1e-6)


def test_simulator_cold_items_are_the_last_fifth_and_unseen_before_the_cut(cold_sim: Path) -> None:
    schema = assert_cold_split(cold_sim)
    assert schema.known_items == 2 + 120 and schema.n_items == 152
    truth = np.load(cold_sim / "simulator.npz")
    np.testing.assert_array_equal(truth["item_cold"], np.arange(150) >= 120)
    popularity = pd.read_parquet(cold_sim / "items.parquet")["popularity"].to_numpy()
    assert (popularity[schema.known_items :] == 0).all()  # the warm-up log predates them


def test_content_predicts_relevance_of_cold_items_but_noisily(cold_sim: Path) -> None:
    """A linear map fit on the known items' content recovers cold items' affinity to users, imperfectly."""
    truth = np.load(cold_sim / "simulator.npz")
    content, vec, cold = truth["item_content"], truth["item_vec"], truth["item_cold"]
    design = np.c_[content, np.ones(len(content))]
    weights, *_ = np.linalg.lstsq(design[~cold], vec[~cold], rcond=None)
    true, estimate = truth["user_base"] @ vec[cold].T, truth["user_base"] @ (design[cold] @ weights).T
    corr = np.mean([np.corrcoef(t, e)[0, 1] for t, e in zip(true, estimate, strict=True)])
    assert 0.3 < corr < 0.95
    np.testing.assert_allclose(
        pd.read_parquet(cold_sim / "items.parquet").iloc[2:][[f"content_{j}" for j in range(CONTENT_DIM)]], content
    )


def test_defaults_are_bit_identical_to_the_simulator_before_content(tmp_path: Path) -> None:
    build_synthetic(tmp_path, lists=60, users=10, items=40, list_length=5, max_history=5, seed=3, progress=False)
    digest = hashlib.sha256()
    for df in splits(tmp_path).values():
        for column in ("items", "cand_rank_score", "labels", "hist_items", "shown_position"):
            digest.update(np.concatenate(df[column].to_list()).tobytes())
    digest.update("".join(pd.read_parquet(tmp_path / "behaviours.parquet")["item_id"]).encode())
    digest.update(pd.read_parquet(tmp_path / "items.parquet")[["quality", "popularity"]].to_numpy().tobytes())
    assert digest.hexdigest() == DEFAULT_DIGEST
    schema = load_schema(tmp_path)
    assert schema.item_content == () and schema.known_items == 0
    assert "cold_items" not in json.loads((tmp_path / "stats.json").read_text())


def test_cold_items_change_only_the_training_period(cold_sim: Path, default_sim: Path) -> None:
    """Val/test lists and users are those of the default build; training lists differ in candidates only."""

    def listed(column: pd.Series) -> list:
        return [np.asarray(x).tolist() for x in column]

    cold, default = splits(cold_sim), splits(default_sim)
    for name in SPLITS:
        columns = ("user_id", "timestamp") if name == "train" else ("user_id", "timestamp", "items", "labels")
        for column in columns:
            assert listed(cold[name][column]) == listed(default[name][column]), (name, column)
    assert listed(cold["train"]["items"]) != listed(default["train"]["items"])
    pd.testing.assert_frame_equal(*(pd.read_parquet(d / "users.parquet") for d in (cold_sim, default_sim)))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"content_dim": -1}, "--content-dim must be in 0..1024"),
        ({"content_noise": float("nan")}, "--content-noise must be a finite number >= 0"),
        ({"cold_items": 1.0}, "--cold-items must be a share in [0, 1)"),
        ({"cold_items": 0.001}, "is no item; raise --cold-items or --items"),
        ({"cold_items": 0.9}, "leaves 15 items for the training period, fewer than --list-length (20)"),
    ],
)
def test_bad_simulator_settings_are_rejected(tmp_path: Path, config: dict, message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        build_synthetic(
            tmp_path, lists=60, users=5, items=150, list_length=20, max_history=5, seed=0,
            progress=False, config=SimulatorConfig(**config),
        )  # fmt: skip


def test_cli_flags_reach_the_simulator_and_the_summary_says_it(tmp_path: Path) -> None:
    args = ["build", "synthetic", "--out", str(tmp_path / "d"), "--lists", "120", "--users", "10", "--items", "60"]
    args += ["--list-length", "5", "--max-history", "5", "--content-dim", "3", "--cold-items", "0.25"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "cold items 15 (first seen after the training period)" in result.output
    assert "lists with cold" in result.output
    schema = load_schema(tmp_path / "d")
    assert schema.item_content == ("content_0", "content_1", "content_2") and schema.known_items == 47
    bad = CliRunner().invoke(app, [*args[:-1], "1.5"])
    assert bad.exit_code == 2 and "--cold-items must be a share in [0, 1), got 1.5" in bad.output


# --- generic logs (write_logs, shared by the real-data builders) --------------------------------


def generic_logs(source: Path, cold: tuple[str, ...] = ()) -> tuple[Logs, tuple[str, ...], pd.Series]:
    """The generic CSV example with a split column (requests 0-31 train, 32-35 val, 36-39 test), the
    `cold` items' training-period impressions dropped (behaviours derive from impressions)."""
    write_csv_example(source)
    imp = impressions()
    request = imp["request_id"].str[1:].astype(int)
    imp["split"] = np.select([request < 32, request < 36], ["train", "val"], "test")
    imp[~(imp["item_id"].isin(cold) & (imp["split"] == "train"))].to_csv(source / "impressions.csv", index=False)
    logs, actions, _ = read_logs(source)
    return logs, actions, logs.impressions["split"]


def write(out: Path, logs: Logs, actions: tuple[str, ...], split: pd.Series, **kwargs: object) -> dict:
    kwargs.setdefault("item_ids", sorted(logs.impressions.loc[split == "train", "item_id"].unique()))
    return write_logs(out, logs, split, actions=actions, max_history=5, extra={}, progress=False, **kwargs)


def test_write_logs_declares_content_and_keeps_its_vocabularies(tmp_path: Path) -> None:
    logs, actions, split = generic_logs(tmp_path / "src")
    write(tmp_path / "d", logs, actions, split, content=["category", "price"])
    schema = load_schema(tmp_path / "d")
    vocabs = load_vocabs(tmp_path / "d", schema)
    assert schema.item_content == ("category", "price") and schema.known_items == 0
    assert [f.name for f in schema.content_categorical] == ["category"]
    assert vocabs.item_content["category"].tokens == ["c0", "c1", "c2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (["colour"], "content: 'colour' is not an item feature column; choose from ['category', 'price']"),
        (["item_id"], "content: 'item_id' is not an item feature column"),
        (["price", "price"], "content: ['price'] named more than once"),
    ],
)
def test_bad_content_columns_are_named(tmp_path: Path, content: list[str], message: str) -> None:
    logs, actions, split = generic_logs(tmp_path / "src")
    with pytest.raises(DataError, match=re.escape(message)):
        write(tmp_path / "d", logs, actions, split, content=content)
    assert not (tmp_path / "d").exists()


def test_write_logs_gives_cold_items_their_own_index_after_the_known_ones(tmp_path: Path) -> None:
    cold = ("i10", "i11")
    logs, actions, split = generic_logs(tmp_path / "src", cold)
    logs.items.loc[logs.items["item_id"] == "i11", "category"] = "c9"  # a value first seen on a cold item
    known = sorted(logs.impressions.loc[split == "train", "item_id"].unique())
    assert not set(cold) & set(known)
    stats = write(tmp_path / "d", logs, actions, split, item_ids=known, cold_item_ids=cold, content=["category"])
    schema = assert_cold_split(tmp_path / "d")
    assert schema.known_items == 2 + len(known) and schema.n_items == schema.known_items + len(cold)
    vocabs = load_vocabs(tmp_path / "d", schema)
    assert [vocabs.items.index(i) for i in cold] == [schema.known_items, schema.known_items + 1]
    items = pd.read_parquet(tmp_path / "d" / "items.parquet").set_index("item_id")
    assert items.loc["i11", "category"] == OOV and items.loc["i10", "category"] > OOV  # vocab fit on known items
    assert "c9" not in vocabs.item_content["category"].tokens
    assert stats["cold_items"] == len(cold)
    with pytest.raises(DataError, match=re.escape("cold_item_ids: ['i0'] are also in item_ids")):
        write(tmp_path / "e", logs, actions, split, item_ids=known, cold_item_ids=["i0"])


# --- MovieLens ----------------------------------------------------------------------------------


def cold_ratings() -> list[tuple[int, int, int, int]]:
    """The tiny MovieLens set plus two films first rated in val (day 10) and test (day 11), 6 clicks each."""
    later = [(u, film, 5, (BASE_DAY + day) * DAY + 7200 + u) for film, day in ((60, 10), (61, 11)) for u in range(1, 7)]
    return tiny_ratings() + later


@pytest.fixture(scope="module", params=["ml1m", "ml100k"])
def cold_movielens(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the build with --cold-items, the build without) of the same files."""
    root = tmp_path_factory.mktemp(f"cold_{request.param}")
    source = write_movielens(root / "src", request.param, cold_ratings())
    for name, cold in (("cold", True), ("plain", False)):
        build_movielens(source, root / name, fmt=request.param, max_history=8, seed=0, cold_items=cold, progress=False)
    return root / "cold", root / "plain"


def test_movielens_cold_items_are_the_films_first_rated_after_training(cold_movielens: tuple[Path, Path]) -> None:
    cold, plain = cold_movielens
    schema = assert_cold_split(cold)
    vocabs = load_vocabs(cold, schema)
    assert vocabs.items.tokens[schema.known_items - 2 :] == ["60", "61"]
    plain_schema = load_schema(plain)
    assert plain_schema.known_items == 0 and plain_schema.n_items == schema.known_items
    assert "60" not in load_vocabs(plain, plain_schema).items.tokens
    val = splits(cold)["val"]
    scores = [
        s
        for items, ss in zip(val["items"], val["cand_rank_score"], strict=True)
        for i, s in zip(items, ss, strict=True)
        if i == schema.known_items
    ]
    assert len(scores) == 6 and np.isfinite(scores).all() and np.ptp(scores) > 0  # ranked from features, per user


def test_movielens_declares_genres_and_decade_as_content(cold_movielens: tuple[Path, Path]) -> None:
    for data in cold_movielens:
        schema = load_schema(data)
        assert schema.item_content[-1] == "decade" and all(c.startswith("genre_") for c in schema.item_content[:-1])
        assert [f.name for f in schema.content_numeric] == list(schema.item_content[:-1])
        assert set(load_vocabs(data, schema).item_content) == {"decade"}


def test_movielens_cli_flag(tmp_path: Path) -> None:
    source = write_movielens(tmp_path / "src", "ml1m", cold_ratings())
    result = CliRunner().invoke(app, ["build", "ml1m", str(source), "--out", str(tmp_path / "d"), "--cold-items"])
    assert result.exit_code == 0, result.output
    assert "cold items 2 (first seen after the training period)" in result.output


def test_movielens_cold_share_holds_out_films_rated_after_training(tmp_path: Path) -> None:
    source = write_movielens(tmp_path / "src", "ml1m", cold_ratings())
    build_movielens(source, tmp_path / "d", fmt="ml1m", max_history=8, seed=0, cold_share=0.25, progress=False)
    schema = assert_cold_split(tmp_path / "d")
    cold = load_vocabs(tmp_path / "d", schema).items.tokens[schema.known_items - 2 :]
    assert {"60", "61"} < set(cold) and len(cold) > 2
    assert schema.extra["cold_share"] == 0.25
    ratings = pd.DataFrame(cold_ratings(), columns=["user_id", "item_id", "rating", "timestamp"]).astype(
        {"item_id": str}
    )
    log = pd.read_parquet(tmp_path / "d" / "behaviours.parquet")
    later = ratings["timestamp"] >= val_cut(tmp_path / "d")
    kept = ratings[later & ratings["item_id"].isin(cold)]
    assert len(log[log["item_id"].isin(cold)]) == len(kept)  # their later interactions all stay


@pytest.mark.parametrize(
    ("share", "message"),
    [(-0.1, "--cold-share must be a share in [0, 1), got -0.1"), (1.0, "--cold-share must be a share in [0, 1)"),
     (0.001, "--cold-share 0.001 of the ")],
)  # fmt: skip
def test_movielens_bad_cold_share_is_rejected(tmp_path: Path, share: float, message: str) -> None:
    source = write_movielens(tmp_path / "src", "ml1m", cold_ratings())
    with pytest.raises(DataError, match=re.escape(message)):
        build_movielens(source, tmp_path / "d", fmt="ml1m", max_history=8, seed=0, cold_share=share, progress=False)
