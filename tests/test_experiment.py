"""`psad experiment` in miniature: two models x two seeds on the tiny synthetic data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import predate_per_model_checkpoints
from training.config import TrainConfig
from training.experiment import SPECS, ExperimentError, make_plan, parse_models, run_experiment

MODELS = ["initial", "dnn"]


class Killed(RuntimeError):
    pass


def tiny_config() -> TrainConfig:
    config = TrainConfig.small_for_tests()
    config.epochs = 1
    return config


def kill_after_first(run: str, seed: int) -> None:
    raise Killed(f"simulated kill after {run} seed {seed}")


@pytest.fixture(scope="module")
def experiment(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Run once, 'killed' after its first trained run; then rerun to completion."""
    out = tmp_path_factory.mktemp("experiment")
    kwargs = dict(seeds=2, models=MODELS, base_config=tiny_config(), progress=False)
    with pytest.raises(Killed):
        run_experiment(tiny_data, out, on_run_done=kill_after_first, **kwargs)
    first = out / "runs" / "dnn" / "seed0" / "result.json"
    stamp = first.stat().st_mtime_ns
    report = run_experiment(tiny_data, out, **kwargs)
    return out, report, {"seed0_mtime": stamp, "seed0_path": first}


def test_resume_trains_only_the_missing_run(experiment) -> None:
    out, report, before = experiment
    assert report["trained_this_session"] == ["dnn/seed1"]
    assert before["seed0_path"].stat().st_mtime_ns == before["seed0_mtime"]


def test_partially_trained_run_resumes_instead_of_restarting(experiment, tiny_data: Path) -> None:
    out, _, _ = experiment
    run_dir = out / "runs" / "dnn" / "seed1"
    (run_dir / "result.json").unlink()  # killed after training, before its evaluation was written
    history = (run_dir / "history.json").read_text()
    report = run_experiment(tiny_data, out, seeds=2, models=MODELS, base_config=tiny_config(), progress=False)
    assert report["trained_this_session"] == ["dnn/seed1"]
    assert (run_dir / "history.json").read_text() == history  # no epoch retrained: train() resumed a finished run
    assert (run_dir / "result.json").is_file()


def test_finished_runs_with_other_settings_are_not_reused(experiment, tiny_data: Path) -> None:
    out, _, _ = experiment
    changed = tiny_config()
    changed.lr *= 2
    with pytest.raises(ExperimentError, match=r"other settings \['train.lr'\].*new --out"):
        run_experiment(tiny_data, out, seeds=2, models=MODELS, base_config=changed, progress=False)
    neutral = tiny_config()
    neutral.eval_batch_size = 7  # does not change what a run learns: the finished runs still count
    report = run_experiment(tiny_data, out, seeds=2, models=MODELS, base_config=neutral, progress=False)
    assert report["trained_this_session"] == []


def test_runs_of_the_earlier_checkpoint_rule_are_not_reused(tiny_data: Path, tmp_path: Path) -> None:
    kwargs = dict(seeds=1, models=["psad-g"], base_config=tiny_config(), progress=False)
    run_experiment(tiny_data, tmp_path, **kwargs)
    (run_dir,) = (tmp_path / "runs").glob("*/seed0")
    predate_per_model_checkpoints(run_dir)  # its teacher result would come from the student's epoch
    with pytest.raises(ExperimentError, match=r"trained by an earlier version of `psad train`.*new --out"):
        run_experiment(tiny_data, tmp_path, **kwargs)
    (run_dir / "result.json").unlink()  # a partial run is refused too, before anything trains
    with pytest.raises(ExperimentError, match="earlier version"):
        run_experiment(tiny_data, tmp_path, **kwargs)


def test_json_schema(experiment) -> None:
    out, report, _ = experiment
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"].keys() == set(MODELS)
    assert saved["seeds"] == [0, 1]
    for name, m in saved["models"].items():
        assert {"metrics", "groups", "latency_ms", "decode_steps", "ranker", "run"} <= m.keys()
        for metric in ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "map@5", "map@10", "clicks@5", "clicks@10"):
            stat = m["metrics"][metric]
            assert len(stat["values"]) == 2 and stat["std"] >= 0, (name, metric)
        assert "utility" in m["metrics"]  # synthetic data: expected utility under the simulator
    assert saved["models"]["initial"]["latency_ms"] == 0 and saved["models"]["initial"]["decode_steps"] == 0
    assert saved["models"]["dnn"]["latency_ms"] > 0 and saved["models"]["dnn"]["decode_steps"] == 1
    assert saved["models"]["initial"]["metrics"]["ndcg@10"]["std"] == 0  # nothing trained: seed-independent
    assert {t["target"] for t in saved["targets"]} and all(t["passed"] in (True, False, None) for t in saved["targets"])


def test_table_has_a_row_per_model_and_mean_std_cells(experiment) -> None:
    out, _, _ = experiment
    lines = (out / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model | evaluated"))
    start = lines.index(header)
    rows = [line for line in lines[start + 2 :] if line.startswith("|")][: len(MODELS)]
    assert [r.split("|")[1].strip() for r in rows] == MODELS
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert {"ndcg@10", "map@5", "clicks@10", "ms/list", "steps"} <= set(columns)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(columns)
        assert "±" in cells[columns.index("ndcg@10")]
    assert (out / "quality_vs_latency.png").stat().st_size > 0


def test_plan_shares_runs_and_resolves_nar() -> None:
    plan = make_plan(list(SPECS), max_list=20, base_distill="listwise")
    assert plan.spec_run["psad-g"] == plan.spec_run["psad-s"]
    assert plan.spec_run["initial"] is None
    assert plan.runs[plan.spec_run["nar"]]["block_size"] == 20
    assert len(plan.runs) == 8  # dnn, prm, dlcm, B=1, B=L, B=4 (listwise, rd, none)


def test_unknown_model_is_rejected_with_the_choices() -> None:
    with pytest.raises(ExperimentError, match="psad-s"):
        parse_models("initial,psad-x")
