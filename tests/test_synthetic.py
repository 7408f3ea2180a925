"""The click simulator: data-set contract, no leakage, and the exactness of its expected utility."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from training.data.cli import app
from training.data.store import SPLITS, DataError, ListData, load_items, load_schema, load_split, load_vocabs
from training.data.synthetic import DEFAULT_LOGGING_POLICY, DEFAULT_TEMPERATURE, ClickModel, build_synthetic
from training.metrics import ranking_from_scores

SMALL = {"lists": 60, "users": 10, "items": 40, "list_length": 5, "max_history": 5}
LOGGED = {"lists": 600, "users": 40, "items": 100, "list_length": 10, "max_history": 5, "seed": 5}


def one_list(attraction: list[float], category: list[int], valid: list[bool] | None = None) -> ListData:
    """A hand-made ListData with the simulator columns (other inputs are not read by the click model)."""
    valid = valid or [True] * len(attraction)
    return ListData(
        inputs={"cand_mask": np.array([valid])},
        labels=np.zeros((1, len(attraction)), np.float32),
        list_ids=np.zeros(1, np.int64),
        user_ids=np.array(["u"], dtype=object),
        extras={"attraction": np.array([attraction], np.float32), "category": np.array([category], np.float32)},
    )


def reference_click_probs(model: ClickModel, attraction, category, order) -> np.ndarray:
    """docs/simulator.md's formula, written out rank by rank, independently of ClickModel's vectorised code."""
    probs = []
    for r, i in enumerate(order):
        logit = attraction[i] - model.position_decay * np.log(1 + r)
        for s, j in enumerate(order[:r]):
            weight = model.neighbour_decay ** (r - s - 1)
            if category[i] == category[j]:
                logit -= weight * model.redundancy
            elif category[i] == category[j] ^ 1:
                logit += weight * model.complement
        probs.append(1 / (1 + np.exp(-logit)))
    return np.array(probs)


def test_round_trip_through_the_store(tiny_data: Path) -> None:
    schema = load_schema(tiny_data)
    vocabs = load_vocabs(tiny_data, schema)
    assert schema.n_items == 152 and schema.max_list == 10 and schema.max_history == 20 and schema.label == "click"
    assert vocabs.items.index("i042") == 44 and vocabs.user_categorical["segment"].index("s0") == 2
    item_cat, item_num = load_items(tiny_data, schema)
    assert item_cat.shape == (152, 1) and item_num.shape == (152, 2)
    assert (item_cat[2:] >= 2).all() and (item_cat[:2] == 0).all()
    total = 0
    for split in SPLITS:
        data = load_split(tiny_data, split)
        total += len(data)
        assert data.labels.shape == (len(data), 10)
        assert set(np.unique(data.labels)) <= {0.0, 1.0}
        assert data.inputs["cand_mask"].all()
        assert set(data.extras) == {"attraction", "category", "shown_position"}
        np.testing.assert_array_equal(
            np.sort(data.extras["shown_position"], axis=1), np.arange(10.0)[None].repeat(len(data), 0)
        )
        assert ((data.extras["category"] >= 0) & (data.extras["category"] < 20)).all()
        items = data.inputs["cand_items"]
        assert ((items >= 2) & (items < schema.n_items)).all()
        assert all(len(set(row)) == len(row) for row in items)  # distinct candidates
        rank_score = data.inputs["cand_num"][..., 0]
        assert (np.diff(rank_score, axis=1) <= 0).all()  # stored in the ranking stage's order
        np.testing.assert_array_equal(data.extras["category"] + 2, item_cat[items, 0])
    assert total == 1200
    assert 0.05 < load_split(tiny_data, "train").labels.mean() < 0.4


def test_histories_come_from_the_behaviour_log_strictly_before_each_list(tiny_data: Path) -> None:
    schema = load_schema(tiny_data)
    vocabs = load_vocabs(tiny_data, schema)
    log = pd.read_parquet(tiny_data / "behaviours.parquet")
    assert set(log["action"]) == {"view", "click"}
    assert log.equals(log.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True))
    log["item"] = vocabs.items.indices(log["item_id"].tolist())
    log["action_index"] = [schema.action_index(a) for a in log["action"]]
    by_user = {u: g[["timestamp", "item", "action_index"]].to_numpy().T for u, g in log.groupby("user_id")}
    full = 0
    for split in SPLITS:
        df = pd.read_parquet(tiny_data / f"{split}.parquet")
        for row in df.itertuples():
            ts, items, actions = by_user[row.user_id]
            end = np.searchsorted(ts, row.timestamp, side="left")
            window = slice(max(0, end - schema.max_history), end)
            assert (np.asarray(row.hist_ts) < row.timestamp).all()
            np.testing.assert_array_equal(row.hist_ts, ts[window])
            np.testing.assert_array_equal(row.hist_items, items[window])
            np.testing.assert_array_equal(row.hist_actions, actions[window])
            full += len(row.hist_ts) == schema.max_history
    assert full > 600  # most lists have a full history window


def test_splits_are_disjoint_in_time(tiny_data: Path) -> None:
    frames = {s: pd.read_parquet(tiny_data / f"{s}.parquet", columns=["list_id", "timestamp"]) for s in SPLITS}
    assert frames["train"]["timestamp"].max() < frames["val"]["timestamp"].min()
    assert frames["val"]["timestamp"].max() < frames["test"]["timestamp"].min()
    assert [len(frames[s]) for s in SPLITS] == [960, 120, 120]
    ids = np.concatenate([f["list_id"].to_numpy() for f in frames.values()])
    assert len(np.unique(ids)) == len(ids)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    def build(name: str, seed: int) -> dict[str, pd.DataFrame]:
        build_synthetic(tmp_path / name, **SMALL, seed=seed, progress=False)
        names = ("train", "test", "behaviours", "users", "items")
        return {n: pd.read_parquet(tmp_path / name / f"{n}.parquet") for n in names}

    first, again, other = build("a", 3), build("b", 3), build("c", 4)
    for name, df in first.items():
        pd.testing.assert_frame_equal(df, again[name])
    assert not first["train"]["labels"].map(list).equals(other["train"]["labels"].map(list))
    np.testing.assert_array_equal(
        np.load(tmp_path / "a" / "simulator.npz")["item_vec"], np.load(tmp_path / "b" / "simulator.npz")["item_vec"]
    )


def test_expected_utility_matches_monte_carlo(tiny_data: Path) -> None:
    model = ClickModel.load(tiny_data)
    data = load_split(tiny_data, "test").take(np.arange(6))
    rng = np.random.default_rng(0)
    perm = np.argsort(rng.random(data.labels.shape), axis=1)
    exact = model.expected_utility(data, perm)
    attraction, category = data.extras["attraction"], data.extras["category"].astype(int)
    draws = 20_000
    for b in range(len(data)):
        probs = reference_click_probs(model, attraction[b], category[b], perm[b])
        clicks = (rng.random((draws, len(probs))) < probs).sum(axis=1)
        stderr = clicks.std() / np.sqrt(draws)
        assert abs(clicks.mean() - exact[b]) < 4 * stderr, (b, clicks.mean(), exact[b])
        assert exact[b] == pytest.approx(probs.sum(), rel=1e-6)


def test_context_clicks_are_what_neighbours_add_to_the_expected_clicks() -> None:
    """Two items of category 3 and one of its partner 2: the context part is the exact expected
    clicks minus those of the same order without item-to-item effects, by the written-out formula."""
    model = ClickModel()
    data = one_list([0.5, 0.2, -0.1], [3, 3, 2])
    plain = ClickModel(redundancy=0.0, complement=0.0)
    for order in ([0, 1, 2], [0, 2, 1]):
        with_effects = reference_click_probs(model, [0.5, 0.2, -0.1], [3, 3, 2], order).sum()
        without = reference_click_probs(plain, [0.5, 0.2, -0.1], [3, 3, 2], order).sum()
        assert model.context_clicks(data, np.array([order]))[0] == pytest.approx(with_effects - without)
    apart, together = (model.context_clicks(data, np.array([o]))[0] for o in ([0, 2, 1], [0, 1, 2]))
    assert apart > together  # the partner between the two redundant items earns clicks
    assert plain.context_clicks(data, np.array([[0, 1, 2]]))[0] == 0.0


def test_padded_candidates_are_ignored() -> None:
    model = ClickModel()
    padded = one_list([0.5, 9.0, -0.3, 1.0], [3, 3, 5, 3], valid=[True, False, True, True])
    dense = one_list([0.5, -0.3, 1.0], [3, 5, 3])
    # the padded candidate is "shown" first and shares a category: it must change nothing
    got = model.expected_utility(padded, np.array([[1, 3, 0, 2]]))
    assert got[0] == pytest.approx(model.expected_utility(dense, np.array([[2, 0, 1]]))[0])
    greedy = model.greedy_permutation(padded)
    assert greedy[0, -1] == 1 and sorted(greedy[0]) == [0, 1, 2, 3]


def test_redundancy_and_complementarity_act_in_the_documented_direction() -> None:
    model = ClickModel()
    same = one_list([0.0, 0.0, 0.0, 0.0], [0, 0, 2, 4])
    adjacent = model.expected_utility(same, np.array([[0, 1, 2, 3]]))[0]
    separated = model.expected_utility(same, np.array([[0, 2, 1, 3]]))[0]
    assert separated > adjacent  # two of a kind next to each other at the top lose clicks

    pair = one_list([0.0, 0.0], [0, 1])  # categories 0 and 1 complement each other
    unrelated = one_list([0.0, 0.0], [0, 2])
    identity = np.array([[0, 1]])
    boosted = model.click_probabilities(pair.extras["attraction"], pair.extras["category"], [[True, True]], identity)
    plain = model.click_probabilities(
        unrelated.extras["attraction"], unrelated.extras["category"], [[True, True]], identity
    )
    assert boosted[0, 0] == pytest.approx(plain[0, 0])  # the first one has nothing above it
    assert boosted[0, 1] > plain[0, 1]


def test_initial_order_beats_random_and_diversity_beats_relevance_sort(tiny_data: Path) -> None:
    model = ClickModel.load(tiny_data)
    data = load_split(tiny_data, "test")
    mask = data.inputs["cand_mask"]
    initial = model.expected_utility(data, np.broadcast_to(np.arange(mask.shape[1]), mask.shape).copy()).mean()
    rng = np.random.default_rng(1)
    random = np.mean([model.expected_utility(data, np.argsort(rng.random(mask.shape), axis=1)) for _ in range(5)])
    by_attraction = model.expected_utility(data, ranking_from_scores(data.extras["attraction"], mask)).mean()
    greedy = model.expected_utility(data, model.greedy_permutation(data)).mean()
    assert initial > random
    assert by_attraction > initial  # the user's current interest helps
    assert greedy > by_attraction  # and so does spreading categories out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"list_length": 50}, r"--items \(40\) must be >= --list-length \(50\)"),
        ({"lists": 10}, "--lists must be >= 30"),
        ({"users": 0}, "--users must be >= 1"),
        ({"list_length": 1}, "--list-length must be >= 2"),
        ({"max_history": -1}, "--max-history must be >= 0"),
        ({"seed": -3}, "--seed must be >= 0"),
        (
            {"logging_policy": "random"},
            r"--logging-policy must be one of initial\|shuffle\|plackett-luce, got 'random'",
        ),
        ({"logging_policy": "plackett-luce", "temperature": 0.0}, "--temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, "--temperature must be a finite number > 0"),
        (
            {"logging_policy": "shuffle", "temperature": 2.0},
            "--temperature applies only to --logging-policy plackett-luce",
        ),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, overrides: dict, message: str) -> None:
    args = {**SMALL, "seed": 0, **overrides}
    with pytest.raises(DataError, match=message):
        build_synthetic(tmp_path / "x", **args, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--seed", "-1"], "--seed"),
        (["--logging-policy", "top"], "--logging-policy"),
        (["--temperature", "-1"], "--temperature"),
    ],
)
def test_flags_are_checked_by_the_command_line(tmp_path: Path, args: list[str], flag: str) -> None:
    done = CliRunner().invoke(app, ["build", "synthetic", "--out", str(tmp_path / "x"), "--lists", "30", *args])
    assert done.exit_code == 2 and flag in done.output and not (tmp_path / "x").exists()


def log_likelihood(model: ClickModel, data: ListData, perm: np.ndarray) -> float:
    """log P(logged clicks | the lists were shown in order ``perm``)."""
    p = model.click_probabilities(data.extras["attraction"], data.extras["category"], data.inputs["cand_mask"], perm)
    return float(np.where(data.labels > 0, np.log(p), np.log1p(-p)).sum())


def test_under_shuffle_clicks_follow_the_stored_shown_order(tmp_path: Path) -> None:
    build_synthetic(tmp_path / "shuffle", **LOGGED, logging_policy="shuffle", progress=False)
    build_synthetic(tmp_path / "initial", **LOGGED, logging_policy="initial", progress=False)
    model = ClickModel.load(tmp_path / "shuffle")
    shuffled, initial = load_split(tmp_path / "shuffle", "train"), load_split(tmp_path / "initial", "train")
    position = shuffled.extras["shown_position"]
    n, length = position.shape
    identity = np.arange(length)[None].repeat(n, 0)
    np.testing.assert_array_equal(np.sort(position, axis=1), identity)  # a permutation per list
    assert (position[:, 0] != 0).mean() > 0.8  # the ranking stage's top is rarely shown first
    for key in ("cand_items", "cand_num"):  # the same lists as under `initial`, stored in the same order
        np.testing.assert_array_equal(shuffled.inputs[key], initial.inputs[key])
    np.testing.assert_array_equal(shuffled.extras["attraction"], initial.extras["attraction"])

    shown = np.argsort(position, axis=1)
    # the clicks are far likelier under the stored shown order than under the stored (initial) order
    # or under the inverse permutation (a shown_position written as rank -> index by mistake)
    assert log_likelihood(model, shuffled, shown) > log_likelihood(model, shuffled, identity) + 30
    assert log_likelihood(model, shuffled, shown) > log_likelihood(model, shuffled, position.astype(np.int64)) + 30
    # and by position: clicks follow the shown position (position bias), not the stored index
    by_shown = np.array([shuffled.labels[position == r].mean() for r in (0, length - 1)])
    assert by_shown[0] > by_shown[1] + 0.05


def test_plackett_luce_explores_more_with_temperature_and_tiny_temperature_is_the_initial_order(tmp_path: Path) -> None:
    def build(name: str, policy: str, temperature: float | None = None) -> tuple[pd.DataFrame, ListData]:
        build_synthetic(tmp_path / name, **LOGGED, logging_policy=policy, temperature=temperature, progress=False)
        return pd.read_parquet(tmp_path / name / "train.parquet"), load_split(tmp_path / name, "train")

    (initial, initial_data), (frozen, frozen_data) = build("initial", "initial"), build("frozen", "plackett-luce", 1e-9)
    length = LOGGED["list_length"]
    for data in (initial_data, frozen_data):
        np.testing.assert_array_equal(data.extras["shown_position"], np.arange(length)[None].repeat(len(data), 0))
    pd.testing.assert_frame_equal(initial, frozen)  # labels included: drawn under the same order with the same draws

    def displacement(data: ListData) -> float:
        return float(np.abs(data.extras["shown_position"] - np.arange(length)).mean())

    moved = [displacement(build(f"t{t}", "plackett-luce", t)[1]) for t in (0.5, 2.0)]
    assert 0 < moved[0] < moved[1] < displacement(build("shuffle", "shuffle")[1])


def test_the_logging_policy_is_recorded(tmp_path: Path) -> None:
    for policy, temperature, recorded in [
        ("plackett-luce", 0.5, 0.5),
        ("shuffle", None, None),
        (None, None, DEFAULT_TEMPERATURE if DEFAULT_LOGGING_POLICY == "plackett-luce" else None),
    ]:
        out = tmp_path / str(policy)
        stats = build_synthetic(out, **SMALL, seed=0, logging_policy=policy, temperature=temperature, progress=False)
        expected = {"logging_policy": policy or DEFAULT_LOGGING_POLICY, "temperature": recorded}
        for record in (
            stats,
            json.loads((out / "stats.json").read_text()),
            json.loads((out / "simulator.json").read_text()),
            load_schema(out).extra,
        ):
            assert {k: record[k] for k in expected} == expected


def test_a_rebuild_replaces_the_data_set_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "sim"
    build_synthetic(out, **SMALL, seed=1, progress=False)
    build_synthetic(out, **SMALL, seed=2, progress=False)
    build_synthetic(tmp_path / "fresh", **SMALL, seed=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "fresh").iterdir()
    }

    def fail(*_args) -> None:
        raise OSError("disk full")

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(ClickModel, "save", fail)  # the last file of a synthetic data set
    with pytest.raises(OSError, match="disk full"):
        build_synthetic(out, **SMALL, seed=3, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "sim"]


@pytest.mark.parametrize("name", ["train.parquet", "users.parquet", "items.parquet"])
def test_a_corrupt_table_is_a_data_error_naming_it(tiny_data: Path, tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / name).write_bytes((data / name).read_bytes()[:100])
    schema = load_schema(data)
    with pytest.raises(DataError, match=rf"{name}: cannot be read .*rebuild the data set"):
        load_items(data, schema) if name == "items.parquet" else load_split(data, "train", schema)


def test_click_model_needs_a_synthetic_data_set(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="simulator.json: not found"):
        ClickModel.load(tmp_path)
    (tmp_path / "simulator.json").write_text('{"version": 1, "click_model": {"colour": 3}}')
    with pytest.raises(DataError, match="malformed simulator parameters"):
        ClickModel.load(tmp_path)
    no_extras = one_list([0.0, 0.0], [0, 1])
    no_extras.extras.clear()
    with pytest.raises(DataError, match="lacks simulator column"):
        ClickModel().expected_utility(no_extras, np.array([[0, 1]]))
