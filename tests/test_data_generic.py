"""The generic builder: your own impression logs (CSV or Parquet) in the layout of docs/data.md#generic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from training.data.cli import app
from training.data.generic import build_generic
from training.data.store import SPLITS, DataError, load_items, load_schema, load_split

N_REQUESTS, SHOWN, T0 = 40, 5, 1_700_000_000


def impressions(graded: bool = False) -> pd.DataFrame:
    """40 requests by 6 users, 5 shown items each (from 12), one request an hour."""
    rows = []
    for r in range(N_REQUESTS):
        for pos in range(SHOWN):
            item = (r * 3 + pos * 5) % 12
            label = (item + r) % 3 if graded else int((item + r) % 3 == 0)
            rows.append(
                {"request_id": f"r{r}", "user_id": f"u{r % 6}", "timestamp": T0 + 3600 * r,
                 "item_id": f"i{item}", "position": pos, "label": label, "f_price_rank": float(pos % 2)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def leave_last_out(df: pd.DataFrame) -> pd.DataFrame:
    """A user's own split: each user's last request -> test, the one before -> val, the rest -> train."""
    order = df.groupby("user_id")["timestamp"].rank(method="dense", ascending=False)
    return df.assign(split=np.select([order == 1, order == 2], ["test", "val"], "train"))


def write_csv_example(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    impressions().to_csv(directory / "impressions.csv", index=False)
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(6)], "age": [20 + u for u in range(6)],
                          "country": ["fr", "de", "fr", "it", "de", "fr"]})  # fmt: skip
    users.to_csv(directory / "users.csv", index=False)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(12)], "category": [f"c{i % 3}" for i in range(12)],
                          "price": [1.5 * i for i in range(12)]})  # fmt: skip
    items.to_csv(directory / "items.csv", index=False)
    return directory


def test_csv_example_builds_and_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "data"
    stats = build_generic(write_csv_example(tmp_path / "src"), out, max_history=10, progress=False)
    schema = load_schema(out)
    assert [f.name for f in schema.user_numeric] == ["age"] and [f.name for f in schema.user_categorical] == ["country"]
    assert [f.name for f in schema.item_numeric] == ["price"] and [f.name for f in schema.item_categorical] == [
        "category"
    ]
    assert [f.name for f in schema.candidate_numeric] == ["rank_score", "f_price_rank"]
    assert schema.actions == ("click",) and schema.label == "click" and schema.max_list == SHOWN
    assert sum(s["lists"] for s in stats["splits"].values()) == N_REQUESTS
    assert set(stats["initial_order"]) == {"val", "test"}
    source = impressions()
    cat, num = load_items(out, schema)
    items = pd.read_parquet(out / "items.parquet")
    price = dict(zip(items["item_id"], num[:, 0], strict=True))
    assert price["i3"] == pytest.approx(4.5)
    for name in SPLITS:
        df = pd.read_parquet(out / f"{name}.parquet")
        data = load_split(out, name)
        assert data.inputs["cand_items"].shape == (len(df), SHOWN)
        for request, labels, scores in zip(df["list_id"], df["labels"], df["cand_rank_score"], strict=True):
            shown = source[source["request_id"] == f"r{request}"]  # list ids follow request time
            assert list(labels) == shown.sort_values("position")["label"].tolist()
            assert list(scores) == [-p for p in range(SHOWN)]  # derived from position: shown order kept
        for ts, hist_ts in zip(df["timestamp"], df["hist_ts"], strict=True):
            assert (np.asarray(hist_ts) < ts).all() and len(hist_ts) <= 10


def test_split_is_by_request_time_and_its_cuts_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "data"
    stats = build_generic(write_csv_example(tmp_path / "src"), out, max_history=10, progress=False)
    parts = {s: pd.read_parquet(out / f"{s}.parquet") for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [32, 4, 4]
    cuts = [T0 + 3600 * 32, T0 + 3600 * 36]  # the first val and the first test request
    assert parts["train"]["timestamp"].max() < cuts[0] == parts["val"]["timestamp"].min()
    assert parts["val"]["timestamp"].max() < cuts[1] == parts["test"]["timestamp"].min()
    assert load_schema(out).extra["split"] == {"method": "time", "cuts": cuts}
    assert stats["split"] == json.loads((out / "stats.json").read_text())["split"] == {"method": "time", "cuts": cuts}


def splits(out: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(out / f"{s}.parquet") for s in SPLITS}


def test_a_split_column_is_the_split_and_histories_stay_strictly_earlier(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "data"
    src.mkdir()
    source = leave_last_out(impressions())
    source.to_csv(src / "impressions.csv", index=False)
    stats = build_generic(src, out, max_history=3, progress=False)
    parts = splits(out)
    for name in SPLITS:  # each list lands in the split its rows name, whatever its time
        expected = source[source["split"] == name].groupby("request_id")["timestamp"].first().sort_values()
        assert parts[name]["timestamp"].tolist() == expected.tolist()
    assert [len(parts[s]) for s in SPLITS] == [28, 6, 6]  # the time split would give 32 / 4 / 4
    assert load_schema(out).extra["split"] == stats["split"] == {"method": "column"}
    clicks = source[source["label"] > 0]
    for df in parts.values():
        for user, ts, hist_ts in zip(df["user_id"], df["timestamp"], df["hist_ts"], strict=True):
            earlier = np.sort(clicks.loc[(clicks["user_id"] == user) & (clicks["timestamp"] < ts), "timestamp"])
            assert np.array_equal(hist_ts, earlier[-3:])  # the last H clicks before the list, any split's
    test_u0 = parts["test"].set_index("user_id").loc["u0"]
    assert len(test_u0["hist_ts"]) == 3 and (np.asarray(test_u0["hist_ts"]) < test_u0["timestamp"]).all()


def test_history_from_impressions_defaults_to_clicks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A label-0 row may be a sampled negative the user never saw: by default it is no behaviour."""
    src = write_csv_example(tmp_path / "src")
    shown = impressions()
    built = {}
    for mode in (None, "clicks", "all"):
        out = tmp_path / f"data-{mode}"
        build_generic(src, out, max_history=10, history_from=mode, progress=False)
        built[mode] = (load_schema(out), pd.read_parquet(out / "behaviours.parquet"), capsys.readouterr().err)
    schema, behaviours, err = built[None]
    assert schema.actions == ("click",) and schema.extra["history_from"] == "impressions:clicks" and err == ""
    assert len(behaviours) == (shown["label"] > 0).sum() and set(behaviours["action"]) == {"click"}
    pd.testing.assert_frame_equal(built["clicks"][1], behaviours)
    schema, behaviours, err = built["all"]
    assert schema.actions == ("view", "click") and schema.extra["history_from"] == "impressions:all"
    assert len(behaviours) == len(shown) and (behaviours["action"] == "view").sum() == (shown["label"] == 0).sum()
    n_views = f"{(shown['label'] == 0).sum():,}"
    assert err.startswith("warning: ") and f"{n_views} shown-but-not-clicked rows become `view`" in err
    assert len(err.strip().splitlines()) == 1


def test_logs_without_any_click_build_with_empty_histories(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "data"
    src.mkdir()
    impressions().assign(label=0).to_csv(src / "impressions.csv", index=False)
    stats = build_generic(src, out, max_history=10, progress=False)
    assert all(s["mean_history_length"] == 0 and s["click_rate"] == 0 for s in stats["splits"].values())
    assert len(pd.read_parquet(out / "behaviours.parquet")) == 0


def test_cli_history_flag_and_split_line(tmp_path: Path) -> None:
    src = write_csv_example(tmp_path / "src")
    done = CliRunner().invoke(
        app, ["build", "generic", str(src), "--out", str(tmp_path / "out"), "--history-from-impressions", "all"]
    )
    assert done.exit_code == 0, done.output
    assert "warning: " in done.output and "shown-but-not-clicked" in done.output
    assert "split: time; train < 2023-11-16 06:13:20 UTC <= val < 2023-11-16 10:13:20 UTC <= test" in done.output
    done = CliRunner().invoke(
        app, ["build", "generic", str(src), "--out", str(tmp_path / "out"), "--history-from-impressions", "views"]
    )
    assert done.exit_code == 2 and done.output.startswith("error: ") and "got 'views'" in done.output
    assert len(done.output.strip().splitlines()) == 1


def test_parquet_example_with_behaviours_and_graded_labels(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "data"
    src.mkdir()
    impressions(graded=True).drop(columns="f_price_rank").assign(rank_score=lambda d: 10.0 - d["position"]).to_parquet(
        src / "impressions.parquet"
    )
    behaviours = pd.DataFrame(
        {"user_id": ["u0", "u0", "u1"], "item_id": ["i1", "i2", "i99"], "timestamp": [T0 - 10, T0 + 7200, T0 - 5],
         "action": ["buy", "like", "buy"]}
    )  # fmt: skip
    behaviours.to_parquet(src / "behaviours.parquet")
    build_generic(src, out, max_history=5, progress=False)
    schema = load_schema(out)
    assert schema.label == "graded" and schema.max_label == 2.0 and schema.actions == ("buy", "like")
    assert schema.user_categorical == () and schema.item_numeric == ()
    train = pd.read_parquet(out / "train.parquet")
    first_u0 = train[train["user_id"] == "u0"].iloc[0]  # at T0: only the behaviour at T0 - 10 is earlier
    assert list(first_u0["hist_ts"]) == [T0 - 10] and list(first_u0["hist_actions"]) == [schema.action_index("buy")]
    u1 = train[train["user_id"] == "u1"].iloc[0]
    assert list(u1["hist_items"]) == [1]  # i99 never shown in train -> OOV


def test_datetime_timestamps_are_converted_to_unix_seconds(tmp_path: Path) -> None:
    """Parquet datetime columns store micro/nanoseconds: read raw, every history would be empty."""
    behaviours = pd.DataFrame(
        {"user_id": ["u0", "u1"], "item_id": ["i1", "i2"], "timestamp": [T0 - 10, T0 + 7200], "action": ["buy", "buy"]}
    )  # fmt: skip

    def build(name: str, impression_ts, behaviour_ts) -> pd.DataFrame:
        src, out = tmp_path / name, tmp_path / f"{name}-out"
        src.mkdir()
        impressions().assign(timestamp=impression_ts).to_parquet(src / "impressions.parquet")
        behaviours.assign(timestamp=behaviour_ts).to_parquet(src / "behaviours.parquet")
        build_generic(src, out, max_history=5, progress=False)
        return pd.read_parquet(out / "train.parquet")

    seconds = build("seconds", impressions()["timestamp"], behaviours["timestamp"])
    aware = pd.to_datetime(impressions()["timestamp"], unit="s", utc=True).dt.tz_convert("Asia/Tokyo")
    naive = pd.to_datetime(behaviours["timestamp"], unit="s").astype("datetime64[ms]")  # naive means UTC
    pd.testing.assert_frame_equal(build("datetimes", aware, naive), seconds)
    assert seconds["timestamp"].iloc[0] == T0 and seconds["hist_ts"].map(len).sum() > 0


def test_a_failed_build_leaves_the_previous_data_set_untouched(tmp_path: Path, monkeypatch) -> None:
    src, out = write_csv_example(tmp_path / "src"), tmp_path / "data"
    build_generic(src, out, max_history=10, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(_labels) -> dict:
        raise DataError("disk full")

    monkeypatch.setattr("training.data.generic.order_quality", fail)  # after every data-set file is written
    for target in (out, tmp_path / "new"):
        with pytest.raises(DataError, match="disk full"):
            build_generic(src, target, max_history=3, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # nothing half-built, no staging left


def test_out_that_is_not_a_data_set_is_refused_not_replaced(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not a data set"):
        build_generic(write_csv_example(tmp_path / "src"), notes, max_history=10, progress=False)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def test_cli_reports_a_bad_input_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    src = write_csv_example(tmp_path / "src")
    _set(2, "timestamp", -1)(src)
    done = CliRunner().invoke(app, ["build", "generic", str(src), "--out", str(tmp_path / "out")])
    assert done.exit_code == 2, done.output
    assert done.output.startswith("error: ") and "row 2, column 'timestamp': must be >= 0" in done.output
    assert len(done.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def _csv(directory: Path, df: pd.DataFrame, name: str = "impressions.csv", **kw) -> None:
    df.to_csv(directory / name, index=False, **kw)


def _set(row: int, column: str, value, base=impressions):
    def corrupt(d: Path) -> None:
        df = base().astype({column: object})
        df.loc[row - 1, column] = value
        _csv(d, df)

    return corrupt


def _split(row: int, value):
    return _set(row, "split", value, lambda: leave_last_out(impressions()))


def _behaviours(d: Path) -> None:
    _csv(
        d, pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "timestamp": [T0], "action": ["buy"]}), "behaviours.csv"
    )


BAD_INPUTS = {
    "missing impressions": (lambda d: (d / "impressions.csv").unlink(), "impressions.csv not found"),
    "semicolon delimiter": (lambda d: _csv(d, impressions(), sep=";"), "found one column named 'request_id;user_id"),
    "empty user": (_set(3, "user_id", ""), "row 3, column 'user_id': empty value"),
    "NaN label": (_set(4, "label", np.nan), "row 4, column 'label': empty value"),
    "text label": (_set(4, "label", "yes"), "row 4, column 'label': 'yes' is not a finite number"),
    "negative label": (_set(4, "label", -1), "row 4, column 'label': must be >= 0"),
    "negative timestamp": (_set(2, "timestamp", -1), "row 2, column 'timestamp': must be >= 0"),
    "timestamp in milliseconds": (
        lambda d: _csv(d, impressions().assign(timestamp=lambda x: x["timestamp"] * 1000)),
        "row 1, column 'timestamp': 1700000000000 is above 1e+11: unix seconds expected; this looks like milliseconds",
    ),
    "fractional position": (_set(2, "position", 0.5), "row 2, column 'position': must be a whole number"),
    "unknown column": (lambda d: _csv(d, impressions().assign(price=1)), "unknown column(s) ['price']"),
    "missing column": (lambda d: _csv(d, impressions().drop(columns="label")), "missing required column(s) ['label']"),
    "duplicate position": (_set(2, "position", 0), "row 2, column 'request_id+position': duplicate"),
    "duplicate item": (_set(2, "item_id", "i0"), "row 2, column 'request_id+item_id': duplicate"),
    "request with two users": (_set(2, "user_id", "u5"), "row 2, column 'user_id': differs between rows of the same"),
    "both formats": (lambda d: impressions().to_parquet(d / "impressions.parquet"), "keep exactly one"),
    "duplicate user row": (
        lambda d: _csv(d, pd.DataFrame({"user_id": ["u1", "u1"], "age": [1, 2]}), "users.csv"),
        "users.csv: row 2, column 'user_id': duplicate",
    ),
    "infinite user feature": (
        lambda d: _csv(d, pd.DataFrame({"user_id": ["u1", "u2"], "age": [30, np.inf]}), "users.csv"),
        "users.csv: row 2, column 'age': inf is not a finite number",
    ),
    "reserved item column": (
        lambda d: _csv(d, pd.DataFrame({"item_id": ["i1"], "item_index": [7]}), "items.csv"),
        "items.csv: column(s) ['item_index'] are reserved",
    ),
    "behaviours without action": (
        lambda d: _csv(d, pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "timestamp": [T0]}), "behaviours.csv"),
        "behaviours.csv: missing required column(s) ['action']",
    ),
    "too few distinct times": (lambda d: _csv(d, impressions().assign(timestamp=T0)), "would be empty"),
    "only one-item lists": (lambda d: _csv(d, impressions().query("position == 0")), "no list of >= 2 items"),
    "unknown split": (
        _split(7, "validation"),
        "impressions.csv: row 7, column 'split': 'validation' is not a split; allowed: ['train', 'val', 'test']",
    ),
    "empty split": (_split(3, np.nan), "row 3, column 'split': empty value; every row needs one (allowed: ['train'"),
    "split varies in a request": (
        _split(2, "test"),
        "row 2, column 'split': differs between rows of the same request_id; a request has one split",
    ),
    "a split without rows": (
        lambda d: _csv(d, leave_last_out(impressions()).replace({"split": {"val": "train"}})),
        "impressions.csv: column 'split' has no row for ['val']; every split needs requests",
    ),
    "a split without a list of 2": (
        lambda d: _csv(d, leave_last_out(impressions()).query("split != 'test' or position == 0")),
        "split 'test' has no list of >= 2 items",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_rejected_with_a_message(case: str, tmp_path: Path) -> None:
    corrupt, message = BAD_INPUTS[case]
    src = write_csv_example(tmp_path / "src")
    corrupt(src)
    with pytest.raises(DataError) as err:
        build_generic(src, tmp_path / "out", max_history=10, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


BAD_HISTORY_FLAGS = {
    "unknown mode": ("views", None, "--history-from-impressions must be one of ['clicks', 'all'], got 'views'"),
    "flag with a behaviours file": ("all", _behaviours, "applies only without a behaviours file"),
}


@pytest.mark.parametrize("case", list(BAD_HISTORY_FLAGS))
def test_bad_history_flags_are_rejected(case: str, tmp_path: Path) -> None:
    mode, corrupt, message = BAD_HISTORY_FLAGS[case]
    src = write_csv_example(tmp_path / "src")
    if corrupt:
        corrupt(src)
    with pytest.raises(DataError) as err:
        build_generic(src, tmp_path / "out", max_history=10, history_from=mode, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()
