"""`psad compare` on tiny real runs: two rankers on the same lists, their paired difference per metric."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from export.contract.schema import SchemaError
from training.checkpoint import RunError
from training.compare import CompareError, compare_runs, format_comparison
from training.config import TrainConfig
from training.train import train


def one_epoch(arch: str = "psad") -> TrainConfig:
    config = TrainConfig.small_for_tests()
    config.epochs = 1
    config.model.arch = arch
    return config


@pytest.fixture(scope="module")
def twin_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two runs of one config and seed: the same weights (CPU training is deterministic)."""
    root = tmp_path_factory.mktemp("compare")
    for name in ("a", "b"):
        train(tiny_data, one_epoch(), root / name, progress=False)
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def other_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run on another data set (8 candidates per list instead of 10)."""
    from training.data.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("other")
    data = root / "other"
    build_synthetic(data, lists=300, users=40, items=60, list_length=8, max_history=10, seed=1, progress=False)
    train(data, one_epoch("dnn"), root / "run", progress=False)
    return root / "run"


def test_identical_runs_differ_by_zero_and_their_interval_contains_zero(twin_runs) -> None:
    result = compare_runs(*twin_runs, "test")
    assert result["lists"] > 0 and {"ndcg@10", "map@10", "clicks@5", "utility"} <= result["metrics"].keys()
    for name, m in result["metrics"].items():
        assert m["a"] == m["b"] and m["diff"] == 0 and m["low"] <= 0 <= m["high"], name
    table = format_comparison(result)
    assert table.count("not distinguishable") == len(result["metrics"])
    assert f"A = student of {twin_runs[0].resolve()}" in table


def test_a_ranker_against_the_initial_order_agrees_with_evaluate(twin_runs) -> None:
    """The same lists, metrics and bootstrap as `psad evaluate`'s gain over the initial order."""
    from training.evaluate import evaluate_run

    run = twin_runs[0]
    m = compare_runs(run, run, "test", "teacher", "initial")["metrics"]["ndcg@10"]
    evaluation = evaluate_run(run, "test")
    gain = evaluation["vs_initial"]["teacher"]["ndcg@10"]
    assert m["a"] == pytest.approx(evaluation["overall"]["teacher"]["ndcg@10"])
    assert m["b"] == pytest.approx(evaluation["overall"]["initial"]["ndcg@10"])
    assert (m["diff"], m["low"], m["high"]) == pytest.approx((gain["gain"], gain["low"], gain["high"]))


def test_runs_of_other_data_sets_are_refused(twin_runs, other_run: Path, tiny_data: Path) -> None:
    with pytest.raises(CompareError, match=r"trained on .* but .* needs the same lists.*pass --data"):
        compare_runs(twin_runs[0], other_run, "test")
    with pytest.raises(SchemaError, match=r"schema.json differs from .*schema.json"):
        compare_runs(twin_runs[0], other_run, "test", data_dir=tiny_data)
    with pytest.raises(CompareError, match="both the student of"):
        compare_runs(twin_runs[0], twin_runs[0], "test")
    with pytest.raises(RunError, match="has no teacher"):
        compare_runs(other_run, other_run, "test", "teacher")


def test_runs_that_keep_other_list_lengths_are_refused(twin_runs, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(twin_runs[1], cut)
    config = json.loads((cut / "config.json").read_text())
    config["train"]["max_list"] = 6  # ranks the first 6 candidates of each list only
    (cut / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompareError, match=r"ranks 10 candidates per list but .* 6 \(train.max_list differs\)"):
        compare_runs(twin_runs[0], cut, "test")


def test_command_prints_the_table_writes_json_and_names_bad_flags(twin_runs, tmp_path: Path) -> None:
    from psad.cli import app

    runner = CliRunner()
    path = tmp_path / "cmp.json"
    done = runner.invoke(app, ["compare", str(twin_runs[0]), "--ranker-b", "history", "--json", str(path)])
    assert done.exit_code == 0, done.output
    saved = json.loads(path.read_text())
    assert saved["a"]["ranker"] == "student" and saved["b"] == {"run": str(twin_runs[0].resolve()), "ranker": "history"}
    assert "B = history of" in done.output and "ndcg@10" in done.output
    for flag, value in (("--ranker-a", "oracle"), ("--split", "dev")):
        done = runner.invoke(app, ["compare", str(twin_runs[0]), str(twin_runs[1]), flag, value])
        assert done.exit_code == 2 and flag in done.output, done.output
    done = runner.invoke(app, ["compare", str(twin_runs[0]), str(tmp_path / "missing")])
    assert done.exit_code == 2 and "error:" in done.output and "missing" in done.output
