"""Offline evaluation: rankers, metrics, simulator utility, activity groups, the JSON and the command."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from export.contract.schema import FeatureSchema, SchemaError
from training.commands import app
from training.config import TrainConfig
from training.data.store import ListData
from training.evaluate import GROUPS, behaviours_before, evaluate_run, fixed_rankings, format_table
from training.train import train

METRICS = {
    "ndcg@1",
    "ndcg@3",
    "ndcg@5",
    "ndcg@10",
    "map@5",
    "map@10",
    "clicks@5",
    "clicks@10",
    "mrr",
    "utility",
    "context",
}
RANKERS = ["initial", "history", "student", "teacher"]


def test_fixed_rankings_on_a_hand_made_split() -> None:
    a, b, c, d = 5, 6, 7, 8  # item indices; 0 is padding, 1 OOV
    hist = np.array([[a, b, a], [0, 0, 0], [1, d, 0]])
    cand = np.array([[c, b, a, d], [c, b, a, d], [1, c, d, 0]])
    inputs = {
        "hist_items": hist,
        "hist_mask": hist != 0,
        "hist_age": np.array([[9.0, 5.0, 1.0], [0.0, 0.0, 0.0], [2.0, 4.0, 0.0]], dtype=np.float32),
        "cand_items": cand,
        "cand_mask": np.array([[True] * 4, [True] * 4, [True, True, True, False]]),
    }
    data = ListData(inputs=inputs, labels=np.zeros((3, 4), np.float32), list_ids=np.arange(3), user_ids=np.arange(3))
    perms = fixed_rankings(data)
    assert list(perms) == ["initial", "history"]
    np.testing.assert_array_equal(perms["initial"], np.tile(np.arange(4), (3, 1)))
    # a, b, c, d; no history keeps the initial order; the OOV interaction promotes no OOV candidate
    np.testing.assert_array_equal(perms["history"], [[2, 1, 0, 3], [0, 1, 2, 3], [2, 0, 1, 3]])


def test_behaviours_before_counts_a_users_behaviours_strictly_before_each_list(tmp_path: Path) -> None:
    """Users a (3 behaviours at t = 1, 2, 5) and b (none); one row per candidate, lists in any order."""
    pd.DataFrame(
        {"list_id": [7, 7, 3, 9, 9], "user_id": ["a", "a", "b", "a", "a"], "timestamp": [5, 5, 4, 2, 2]}
    ).to_parquet(tmp_path / "test.parquet")
    pd.DataFrame({"user_id": ["a", "a", "a"], "timestamp": [1, 2, 5]}).to_parquet(tmp_path / "behaviours.parquet")
    np.testing.assert_array_equal(behaviours_before(tmp_path, "test"), [2, 0, 1])  # at t = 5 the one at 5 is not before
    np.testing.assert_array_equal(behaviours_before(tmp_path, "test", np.array([9, 7])), [1, 2])


def test_evaluate_run_reports_every_ranker_metric_and_group(tiny_run: Path) -> None:
    result = evaluate_run(tiny_run, "test")
    assert result["rankers"] == RANKERS
    for rows in [result["overall"], *result["groups"].values()]:
        assert set(rows) == set(RANKERS)
        for values in rows.values():
            assert set(values) == METRICS
            assert all(0.0 <= values[f"ndcg@{k}"] <= 1.0 for k in (1, 3, 5, 10))
            assert values["clicks@5"] <= values["clicks@10"]
    activity = result["activity"]
    assert set(activity["lists"]) == set(GROUPS)
    assert sum(activity["lists"].values()) == result["lists"]
    assert activity["light_max"] <= activity["medium_max"]
    assert set(result["groups"]) == {g for g, n in activity["lists"].items() if n > 0}
    assert list(result["vs_initial"]) == RANKERS[1:]
    for ranker in RANKERS[1:]:
        for metric in ("ndcg@10", "mrr"):
            gain = result["vs_initial"][ranker][metric]
            expected = result["overall"][ranker][metric] - result["overall"]["initial"][metric]
            assert gain["gain"] == pytest.approx(expected)
            assert gain["low"] <= gain["gain"] <= gain["high"]
        assert set(result["vs_initial"][ranker]) == {"ndcg@10", "mrr", "utility"}
    assert "paired bootstrap 95% interval" in format_table(result)
    overall_ndcg = result["overall"]["student"]["ndcg@10"]
    weighted = sum(result["groups"][g]["student"]["ndcg@10"] * activity["lists"][g] for g in result["groups"])
    assert weighted / result["lists"] == pytest.approx(overall_ndcg)


def test_evaluate_command_prints_a_table_and_writes_json(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    done = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--split", "val"])
    assert done.exit_code == 0, done.output
    result = json.loads((run / "eval_val.json").read_text())
    assert result["split"] == "val" and "overall" in result and "groups" in result
    assert format_table(result).splitlines()[1] in done.output
    assert "overall    student" in done.output and "overall    history" in done.output

    custom = tmp_path / "out" / "m.json"
    done = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--split", "test", "--json", str(custom)])
    assert done.exit_code == 0 and json.loads(custom.read_text())["split"] == "test"


def test_evaluate_rejects_bad_split_missing_run_and_foreign_data(tiny_run: Path, tiny_data: Path, tmp_path: Path):
    done = CliRunner().invoke(app, ["evaluate", "--run", str(tiny_run), "--split", "dev"])
    assert done.exit_code == 2 and "--split" in done.output
    done = CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path / "none")])
    assert done.exit_code == 2 and "run directory not found" in done.output

    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    raw = json.loads((other / "schema.json").read_text())
    raw["max_history"] += 1
    FeatureSchema.from_dict(raw).save(other / "schema.json")
    with pytest.raises(SchemaError, match="differs from"):
        evaluate_run(tiny_run, "test", other)


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A short run (3 epochs of the test model, ~10 s on one thread) on 4,000 simulated lists of 20."""
    from training.data.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("sim")
    build_synthetic(
        root / "data", lists=4000, users=200, items=300, list_length=20, max_history=20, seed=0, progress=False
    )
    config = dataclasses.replace(TrainConfig.small_for_tests(), epochs=3)
    return train(root / "data", config, root / "run", progress=False), root / "data"


def test_short_training_beats_the_initial_order_under_the_simulator(sim_run: tuple[Path, Path]) -> None:
    """Issue #3: the loss goes down and both the student and the teacher beat the ranking stage's
    order on exact expected clicks. Measured gains over the initial order are 0.022 to 0.031 for
    training seeds 0, 1, 2; the 0.005 margin leaves room for other platforms' float differences."""
    from training.data.store import load_split
    from training.data.synthetic import ClickModel

    run, data_dir = sim_run
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    assert history[-1]["train"]["teacher"] < history[0]["train"]["teacher"]
    evaluation = evaluate_run(run, "test")
    result = evaluation["overall"]
    initial = result["initial"]["utility"]
    assert result["student"]["utility"] > initial + 0.005
    assert result["teacher"]["utility"] > initial + 0.005
    for ranker in ("student", "teacher"):  # and not by chance: the paired interval excludes 0
        assert evaluation["vs_initial"][ranker]["utility"]["low"] > 0
    data = load_split(data_dir, "test")
    rng = np.random.default_rng(0)
    random_orders = np.argsort(rng.random(data.labels.shape), 1)
    assert initial > ClickModel.load(data_dir).expected_utility(data, random_orders).mean() + 0.05
