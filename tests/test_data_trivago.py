"""The trivago builder: the RecSys Challenge 2019 session log -> a data set, streamed.

Every test but the last uses a small log the test writes itself, in the challenge's columns.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import training.data.trivago as trivago
from export.contract.schema import OOV, Vocabularies
from training.data.cli import app
from training.data.generic import SPLIT_FRACTIONS, Logs, split_by_time, write_logs
from training.data.store import SPLITS, DataError, load_schema, load_split, read_parquet
from training.data.trivago import ACTIONS, CLICKOUT, COLUMNS, ITEM_ACTIONS, build_trivago

T0 = 1_541_548_800  # 2018-11-07
TRIVAGO = Path(os.environ.get("PSAD_TRIVAGO", "../shared/data/trivago-100k/trivago_val_100k.parquet"))


def session_log(users: int = 12, seed: int = 0) -> pd.DataFrame:
    """Each user: one or two sessions of item interactions, filters and clickouts over 20 hotels.

    Includes what the builder must handle: a behaviour at a clickout's own second, an `unknown`
    reference, a clickout on a hotel that was not shown, and one that shows a single hotel.
    """
    rng = np.random.default_rng(seed)
    rows = []
    t = T0
    for u in range(users):
        for s in range(1 + u % 2):
            step = 0
            for _ in range(6):
                step += 1
                t += int(rng.integers(5, 400))
                hotels = [f"{h}" for h in rng.choice(np.arange(100, 120), size=int(rng.integers(3, 8)), replace=False)]
                kind = rng.choice(["image", "filter", "clickout", "clickout"])
                base = {"user_id": f"U{u:02d}", "session_id": f"S{u:02d}{s}", "timestamp": t, "step": step,
                        "platform": ["FR", "DE"][u % 2], "city": f"City {u % 3}", "device": "mobile",
                        "current_filters": None, "impressions": None, "prices": None}  # fmt: skip
                if kind == "image":
                    rows.append({**base, "action_type": "interaction item image", "reference": hotels[0]})
                elif kind == "filter":
                    rows.append({**base, "action_type": "filter selection", "reference": "Sort by Price"})
                else:
                    prices = [str(int(p)) for p in rng.integers(30, 300, size=len(hotels))]
                    clicked = hotels[int(rng.integers(len(hotels)))]
                    rows.append({**base, "action_type": CLICKOUT, "reference": clicked,
                                 "impressions": "|".join(hotels), "prices": "|".join(prices)})  # fmt: skip
                    step += 1  # a rating of another hotel in the same second: not in this list's history
                    rating = {"step": step, "action_type": "interaction item rating", "reference": hotels[1]}
                    rows.append({**base, **rating})
    df = pd.DataFrame(rows)
    extra = df.iloc[-1].to_dict()
    df = pd.concat(
        [
            df,
            pd.DataFrame(
                [
                    {
                        **extra,
                        "timestamp": extra["timestamp"] + 1,
                        "action_type": "interaction item info",
                        "reference": "unknown",
                    },
                    {
                        **extra,
                        "timestamp": extra["timestamp"] + 2,
                        "action_type": CLICKOUT,
                        "reference": "999",
                        "impressions": "100|101",
                        "prices": "50|60",
                    },
                    {
                        **extra,
                        "timestamp": extra["timestamp"] + 3,
                        "action_type": CLICKOUT,
                        "reference": "100",
                        "impressions": "100",
                        "prices": "50",
                    },
                ]  # fmt: skip
            ),
        ],
        ignore_index=True,
    )
    return df[list(COLUMNS)]


def write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.astype({"timestamp": "int64", "step": "int64"}).to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path, dict]:
    tmp = tmp_path_factory.mktemp("trivago")
    log = session_log()
    stats = build_trivago(write(log, tmp / "train.csv"), tmp / "data", max_history=6, progress=False)
    return log, tmp / "data", stats


def lists_of(data: Path) -> pd.DataFrame:
    return pd.concat([read_parquet(data / f"{s}.parquet").assign(split=s) for s in SPLITS], ignore_index=True)


def item_ids(data: Path) -> np.ndarray:
    return read_parquet(data / "items.parquet")["item_id"].to_numpy()


def source_clickouts(log: pd.DataFrame) -> pd.DataFrame:
    """The clickouts that become lists, keyed by (user_id, timestamp) (unique in the fixture)."""
    clicks = log[log["action_type"] == CLICKOUT].copy()
    clicks["hotels"] = clicks["impressions"].str.split("|")
    clicks["price_list"] = clicks["prices"].str.split("|").map(lambda p: [float(x) for x in p])
    keep = [r in h and len(h) >= 2 for r, h in zip(clicks["reference"], clicks["hotels"], strict=True)]
    return clicks[keep].set_index(["user_id", "timestamp"])


def test_lists_keep_the_display_order_the_click_and_the_prices(built: tuple[pd.DataFrame, Path, dict]) -> None:
    log, data, stats = built
    lists, ids = lists_of(data), item_ids(data)
    source = source_clickouts(log)
    assert len(lists) == len(source) == sum(stats["splits"][s]["lists"] for s in SPLITS)
    assert stats["dropped_clickouts"] == {"clicked_hotel_not_shown": 1, "fewer_than_2_hotels": 1}
    assert stats["skipped_unknown_references"] == 1
    for split in SPLITS:  # the share of clicks on a hotel already in the list's history, recomputed here
        part = read_parquet(data / f"{split}.parquet")
        repeats = [row.items[int(row.labels.argmax())] in set(row.hist_items) for row in part.itertuples()]
        assert stats["clicks_on_a_history_item"][split] == pytest.approx(np.mean(repeats))
    for row in lists.itertuples():
        src = source.loc[(row.user_id, row.timestamp)]
        assert list(ids[row.items]) == src["hotels"]  # display order, every hotel known (the catalogue)
        assert row.labels.sum() == 1 and ids[row.items[int(row.labels.argmax())]] == src["reference"]
        np.testing.assert_array_equal(row.cand_price, src["price_list"])
        np.testing.assert_array_equal(row.cand_rank_score, -np.arange(len(src["hotels"])))
        price = np.asarray(src["price_list"])
        np.testing.assert_array_equal(row.cand_price_rank, [(price < p).sum() for p in price])


def test_no_behaviour_at_or_after_a_list_enters_its_history(built: tuple[pd.DataFrame, Path, dict]) -> None:
    log, data, _ = built
    lists, ids = lists_of(data), item_ids(data)
    items = log[log["action_type"].isin(ITEM_ACTIONS) & (log["reference"] != "unknown")]
    actions = load_schema(data).actions
    checked_same_second = 0
    for row in lists.itertuples():
        assert (np.asarray(row.hist_ts) < row.timestamp).all()
        mine = items[(items["user_id"] == row.user_id) & (items["timestamp"] < row.timestamp)]
        mine = mine.sort_values(["timestamp", "reference"], kind="stable").tail(6)  # max_history=6
        assert list(ids[row.hist_items]) == mine["reference"].tolist()
        assert [actions[a - 2] for a in row.hist_actions] == mine["action_type"].map(ITEM_ACTIONS).tolist()
        same = items[(items["user_id"] == row.user_id) & (items["timestamp"] == row.timestamp)]
        checked_same_second += int((same["action_type"] != CLICKOUT).any())
    assert checked_same_second > 0  # the fixture's same-second ratings were there to be leaked, and were not


def test_split_by_clickout_time_with_cuts_recorded(built: tuple[pd.DataFrame, Path, dict]) -> None:
    _, data, stats = built
    lists = lists_of(data)
    val_from, test_from = stats["split"]["cuts"]
    assert lists.loc[lists["split"] == "train", "timestamp"].max() < val_from
    assert lists.loc[lists["split"] == "val", "timestamp"].between(val_from, test_from - 1).all()
    assert lists.loc[lists["split"] == "test", "timestamp"].min() >= test_from
    assert load_schema(data).extra["split"] == stats["split"]
    assert sorted(lists["list_id"]) == list(range(len(lists)))


def test_loads_for_training_with_user_context(built: tuple[pd.DataFrame, Path, dict]) -> None:
    _, data, _ = built
    schema = load_schema(data)
    vocabs = Vocabularies.load(data / "vocab.json", schema)
    assert [f.name for f in schema.user_categorical] == ["platform", "device", "city"]
    assert [f.name for f in schema.candidate_numeric] == ["rank_score", "price", "price_rank"]
    assert schema.actions == ACTIONS
    assert vocabs.user_categorical["platform"].tokens == ["DE", "FR"]
    test = load_split(data, "test", schema)
    assert test.inputs["cand_items"].shape[1] <= schema.max_list and len(test) > 0
    users = read_parquet(data / "users.parquet")
    assert (users["device"] == vocabs.user_categorical["device"].index("mobile")).all()


def reference_build(log: pd.DataFrame, out: Path, max_history: int) -> None:
    """The same recipe in memory through the generic builder's writer: the streaming build's oracle."""
    log = log.reset_index(drop=True)
    clicks = log[log["action_type"] == CLICKOUT]
    shown = []
    for row, click in clicks.iterrows():
        hotels, prices = click["impressions"].split("|"), [float(p) for p in click["prices"].split("|")]
        if click["reference"] not in hotels or len(hotels) < 2:
            continue
        for pos, (hotel, price) in enumerate(zip(hotels, prices, strict=True)):
            shown.append({"request_id": f"{row:09d}", "user_id": click["user_id"], "timestamp": click["timestamp"],
                          "item_id": hotel, "position": pos, "label": float(hotel == click["reference"]),
                          "rank_score": -float(pos), "f_price": price,
                          "f_price_rank": float(sum(p < price for p in prices))})  # fmt: skip
    impressions = pd.DataFrame(shown)
    items = log[log["action_type"].isin(ITEM_ACTIONS) & (log["reference"] != "unknown")]
    behaviours = pd.DataFrame(
        {
            "user_id": items["user_id"],
            "item_id": items["reference"],
            "timestamp": items["timestamp"],
            "action": items["action_type"].map(ITEM_ACTIONS),
        }  # fmt: skip
    )
    requests = impressions.drop_duplicates("request_id")
    split, _ = split_by_time(requests["timestamp"], SPLIT_FRACTIONS, what="reference")
    split = impressions["request_id"].map(dict(zip(requests["request_id"], split, strict=True)))
    catalogue = sorted(set(impressions["item_id"]) | set(behaviours["item_id"]))
    logs = Logs(impressions, behaviours, pd.DataFrame({"user_id": []}), pd.DataFrame({"item_id": []}))
    write_logs(out, logs, split, item_ids=catalogue, actions=ACTIONS, max_history=max_history, extra={}, progress=False)


def test_streaming_build_equals_the_in_memory_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = session_log(users=30, seed=3)
    monkeypatch.setattr(trivago, "BATCH_ROWS", 37)  # many batches, users cut across them
    monkeypatch.setattr(trivago, "CHUNK_USERS", 4)  # many chunks of users in pass 3
    build_trivago(write(log, tmp_path / "log.parquet"), tmp_path / "stream", max_history=5, progress=False)
    reference_build(log, tmp_path / "reference", max_history=5)
    assert item_ids(tmp_path / "stream").tolist() == item_ids(tmp_path / "reference").tolist()
    renamed = {"cand_f_price": "cand_price", "cand_f_price_rank": "cand_price_rank"}
    for split in SPLITS:
        got = read_parquet(tmp_path / "stream" / f"{split}.parquet").sort_values("list_id").reset_index(drop=True)
        want = read_parquet(tmp_path / "reference" / f"{split}.parquet").rename(columns=renamed)
        assert len(got) == len(want) > 0
        for col in want.columns:
            for a, b in zip(got[col], want[col], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{split}.{col}")
    got = read_parquet(tmp_path / "stream" / "behaviours.parquet")
    want = read_parquet(tmp_path / "reference" / "behaviours.parquet")
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    stream, ref = load_schema(tmp_path / "stream"), load_schema(tmp_path / "reference")
    for a, b in zip(stream.candidate_numeric, ref.candidate_numeric, strict=True):
        assert (a.mean, a.std) == pytest.approx((b.mean, b.std), rel=1e-6)


def test_csv_and_parquet_sources_give_the_same_data_set(tmp_path: Path) -> None:
    log = session_log(users=8, seed=5)
    for suffix in ("csv", "parquet"):
        build_trivago(write(log, tmp_path / f"log.{suffix}"), tmp_path / suffix, max_history=4, progress=False)
    for split in SPLITS:
        a, b = (read_parquet(tmp_path / s / f"{split}.parquet") for s in ("csv", "parquet"))
        assert a.shape == b.shape and all(
            np.array_equal(x, y) for col in a.columns for x, y in zip(a[col], b[col], strict=True)
        )


def corrupt(df: pd.DataFrame, kind: str) -> tuple[pd.DataFrame, int, str]:
    """A copy of the log with one bad row: (log, its 1-based data row, the column named)."""
    df = df.copy()
    clicks = np.flatnonzero(df["action_type"] == CLICKOUT)
    i = int(clicks[len(clicks) // 2])
    if kind == "price_count":
        df.loc[i, "prices"] = df.loc[i, "prices"] + "|10"
        return df, i + 1, "prices"
    if kind == "price_text":
        df.loc[i, "prices"] = "12|abc|" + "|".join(df.loc[i, "prices"].split("|")[2:])
        df.loc[i, "prices"] = "|".join(df.loc[i, "prices"].split("|")[: len(df.loc[i, "impressions"].split("|"))])
        return df, i + 1, "prices"
    if kind == "no_impressions":
        df.loc[i, ["impressions", "prices"]] = None
        return df, i + 1, "impressions"
    if kind == "repeated_hotel":
        hotels = df.loc[i, "impressions"].split("|")
        df.loc[i, "impressions"] = "|".join([*hotels[:-1], hotels[0]])
        return df, i + 1, "impressions"
    if kind == "blank_reference":
        j = int(np.flatnonzero(df["action_type"] == "interaction item image")[-1])
        df.loc[j, "reference"] = "   "
        return df, j + 1, "reference"
    if kind == "action":
        df.loc[3, "action_type"] = "teleport"
        return df, 4, "action_type"
    df["timestamp"] = df["timestamp"].astype(object)
    df.loc[5, "timestamp"] = "yesterday"
    return df, 6, "timestamp"


@pytest.mark.parametrize(
    "kind", ["price_count", "price_text", "no_impressions", "repeated_hotel", "blank_reference", "action", "timestamp"]
)
def test_a_malformed_row_names_file_row_and_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(trivago, "BATCH_ROWS", 16)  # the bad row sits in a later batch: rows count from the file
    log, row, column = corrupt(session_log(), kind)
    path = write(log, tmp_path / "train.csv")
    with pytest.raises(DataError) as err:
        build_trivago(path, tmp_path / "data", max_history=4, progress=False)
    assert f"{path}: row {row}, column {column!r}" in str(err.value)
    assert not (tmp_path / "data").exists()  # nothing half-written


def test_a_parquet_log_with_numeric_hotel_ids_builds_the_same_lists(tmp_path: Path) -> None:
    log = session_log(users=8, seed=5)
    log = log[log["reference"].str.isnumeric()].reset_index(drop=True)  # item rows only: references are ids
    build_trivago(write(log, tmp_path / "text.parquet"), tmp_path / "text", max_history=4, progress=False)
    numeric = log.assign(reference=log["reference"].astype("int64"))
    build_trivago(write(numeric, tmp_path / "int.parquet"), tmp_path / "int", max_history=4, progress=False)
    for split in SPLITS:
        a, b = (read_parquet(tmp_path / d / f"{split}.parquet") for d in ("text", "int"))
        assert all(np.array_equal(x, y) for col in a.columns for x, y in zip(a[col], b[col], strict=True))
    fractional = log.assign(reference=log["reference"].astype(float) + 0.5)
    with pytest.raises(DataError, match=r"column 'reference': \d+\.5 is not a whole id"):
        build_trivago(write(fractional, tmp_path / "f.parquet"), tmp_path / "f", max_history=4, progress=False)


def test_histories_stay_per_user_at_any_timestamp(tmp_path: Path) -> None:
    """Timestamps far beyond 2^32 s (still valid unix seconds) must not mix users' behaviours."""
    log = session_log(users=8, seed=2)
    late = log.assign(timestamp=log["timestamp"] + 4_000_000_000)
    for name, source in (("now", log), ("late", late)):
        build_trivago(write(source, tmp_path / f"{name}.parquet"), tmp_path / name, max_history=4, progress=False)
    for split in SPLITS:
        a, b = (read_parquet(tmp_path / d / f"{split}.parquet") for d in ("now", "late"))
        assert all(np.array_equal(x, y) for x, y in zip(a["hist_items"], b["hist_items"], strict=True))


def test_list_typed_impressions_are_refused_as_not_text(tmp_path: Path) -> None:
    log = session_log(users=4)
    log["impressions"] = log["impressions"].map(lambda v: v.split("|") if isinstance(v, str) else None)
    with pytest.raises(DataError, match=r"column 'impressions': .* is not text"):
        build_trivago(write(log, tmp_path / "l.parquet"), tmp_path / "d", max_history=4, progress=False)


def test_missing_columns_and_wrong_suffix_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing column\(s\) \['prices'\]"):
        build_trivago(write(session_log().drop(columns="prices"), tmp_path / "a.csv"), tmp_path / "d", max_history=4)
    (tmp_path / "log.json").write_text("{}")
    with pytest.raises(DataError, match="expected a .csv or .parquet"):
        build_trivago(tmp_path / "log.json", tmp_path / "d", max_history=4)


def test_cli_builds_and_reports_a_bad_file_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    src = write(session_log(), tmp_path / "train.csv")
    ok = runner.invoke(app, ["build", "trivago", str(src), "--out", str(tmp_path / "data"), "--max-history", "4"])
    assert ok.exit_code == 0, ok.output
    assert "train" in ok.output and "built" in ok.output
    bad = write(corrupt(session_log(), "price_count")[0], tmp_path / "bad.csv")
    res = runner.invoke(app, ["build", "trivago", str(bad), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "error:" in res.output and "column 'prices'" in res.output
    res = runner.invoke(app, ["build", "trivago", str(src), "--out", str(tmp_path / "m"), "--memory-limit", "lots"])
    assert res.exit_code == 2 and "--memory-limit" in res.output


@pytest.mark.skipif(not TRIVAGO.is_file(), reason=f"{TRIVAGO} absent (set PSAD_TRIVAGO to the shared slice)")
def test_the_shared_slice_builds_with_the_documented_counts(tmp_path: Path) -> None:
    stats = build_trivago(TRIVAGO, tmp_path / "trivago", max_history=50, progress=False)
    assert {s: stats["splits"][s]["lists"] for s in SPLITS} == {"train": 10_848, "val": 1_356, "test": 1_356}
    assert stats["rows"] == 100_003
    lists = lists_of(tmp_path / "trivago")
    clicked = [items[int(labels.argmax())] for items, labels in zip(lists["items"], lists["labels"], strict=True)]
    assert OOV not in clicked
