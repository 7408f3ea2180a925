"""`psad experiment` in miniature: the two fixed orders and one model x two seeds on the tiny synthetic data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import predate_per_model_checkpoints
from tests.test_training import toml_text
from training.config import TrainConfig
from training.experiment import (
    SPECS,
    ExperimentError,
    make_plan,
    parse_models,
    report_dirs,
    run_experiment,
)
from training.metrics import paired_bootstrap

MODELS = ["initial", "history-first", "dnn"]
FIXED = ("initial", "history-first")


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
    for name in FIXED:  # nothing trained: not timed, seed-independent
        fixed = saved["models"][name]
        assert fixed["latency_ms"] == 0 and fixed["decode_steps"] == 0 and fixed["run"] is None
        assert fixed["metrics"]["ndcg@10"]["std"] == 0
    assert saved["models"]["history-first"]["ranker"] == "history"
    assert saved["models"]["dnn"]["latency_ms"] > 0 and saved["models"]["dnn"]["decode_steps"] == 1
    assert {t["target"] for t in saved["targets"]} and all(t["passed"] in (True, False, None) for t in saved["targets"])


def test_table_has_a_row_per_model_and_mean_std_cells(experiment) -> None:
    out, _, _ = experiment
    lines = (out / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model | evaluated"))
    start = lines.index(header)
    rows = [line for line in lines[start + 2 :] if line.startswith("|")][: len(MODELS)]
    assert [r.split("|")[1].strip() for r in rows] == MODELS
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert {"ndcg@10", "map@5", "clicks@10", "mrr", "ms/list", "steps"} <= set(columns)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(columns)
        assert "±" in cells[columns.index("ndcg@10")]
    assert (out / "quality_vs_latency.png").stat().st_size > 0
    groups = lines[lines.index(next(line for line in lines if line.startswith("## By user-activity group"))) :]
    assert {"dnn", *FIXED} <= {r.split("|")[1].strip() for r in groups if r.startswith("| ") and "model" not in r}


def test_gains_over_the_initial_order_are_paired_over_the_seed_averaged_lists(experiment) -> None:
    out, report, _ = experiment
    runs = [json.loads((out / "runs" / "dnn" / f"seed{s}" / "result.json").read_text()) for s in (0, 1)]
    dnn = np.mean([r["evaluation"]["per_list"]["student"]["ndcg@10"] for r in runs], axis=0)
    initial = np.asarray(runs[0]["evaluation"]["per_list"]["initial"]["ndcg@10"])
    gain = report["paired"]["dnn - initial"]["ndcg@10"]
    assert gain["diff"] == pytest.approx(float((dnn - initial).mean()))
    assert (gain["low"], gain["high"]) == pytest.approx(paired_bootstrap(dnn - initial))
    assert set(report["paired"]) == {"history-first - initial", "dnn - initial"}  # no psad-s in this experiment
    assert {"ndcg@10", "mrr", "utility"} <= set(gain) | set(report["paired"]["dnn - initial"])
    text = (out / "results.md").read_text()
    assert "## Gain over the initial order (paired 95% intervals)" in text
    refs = report["simulator_references"]  # tiny_data is simulated: the truth-knowing orders are reported
    greedy, attraction = refs["greedy oracle"], refs["attraction sort"]
    assert greedy["utility"] >= attraction["utility"] > report["models"]["initial"]["metrics"]["utility"]["mean"]
    assert greedy["context"] > attraction["context"]  # the oracle places items for their neighbours
    assert "| initial | " in text.split("## Against the simulator's references")[1]
    assert f"| dnn - initial | {gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" in text


def _drop_mrr(evaluation: dict) -> None:
    for ranker in evaluation["overall"].values():
        del ranker["mrr"]


def _first_groups_version(evaluation: dict) -> None:
    del evaluation["activity"]["version"]


@pytest.mark.parametrize("age", [_drop_mrr, _first_groups_version], ids=["before-mrr", "before-groups-v2"])
def test_an_outdated_evaluation_of_a_finished_run_is_redone_not_retrained(experiment, tiny_data, age) -> None:
    out, _, _ = experiment
    path = out / "runs" / "dnn" / "seed0" / "result.json"
    result = json.loads(path.read_text())
    age(result["evaluation"])
    path.write_text(json.dumps(result))
    report = run_experiment(tiny_data, out, seeds=2, models=MODELS, base_config=tiny_config(), progress=False)
    assert report["trained_this_session"] == [] and report["reevaluated_this_session"] == ["dnn/seed0"]
    assert "mrr" in json.loads(path.read_text())["evaluation"]["overall"]["student"]
    assert len(report["models"]["dnn"]["metrics"]["mrr"]["values"]) == 2


def test_plan_shares_runs_and_resolves_nar() -> None:
    plan = make_plan(list(SPECS), max_list=20, base_distill="listwise")
    assert plan.spec_run["psad-g"] == plan.spec_run["psad-s"]
    assert plan.spec_run["initial"] is None and plan.spec_run["history-first"] is None
    assert plan.runs[plan.spec_run["nar"]]["block_size"] == 20
    assert plan.runs[plan.spec_run["setrank"]] == {"arch": "setrank"}
    assert plan.runs[plan.spec_run["no-upn"]] == {"arch": "psad", "block_size": 4, "use_upn": False}
    # dnn, prm, dlcm, setrank, B=1, B=L, B=4 (listwise, rd, none, without UPN, sid)
    assert len(plan.runs) == 11


def test_the_upn_ablation_is_reported_per_activity_group(tiny_data: Path, tmp_path: Path) -> None:
    models = ["initial", "psad-s", "no-upn"]
    report = run_experiment(tiny_data, tmp_path, seeds=1, models=models, base_config=tiny_config(), progress=False)
    by_group = report["upn_by_group"]
    groups = [g for g in by_group if g != "all"]
    assert groups and sum(by_group[g]["lists"] for g in groups) == by_group["all"]["lists"]
    psad, plain = (
        json.loads((tmp_path / "runs" / r / "seed0" / "result.json").read_text())
        for r in ("psad-b4-listwise", "psad-b4-listwise-noupn")
    )
    diff = np.mean(psad["evaluation"]["per_list"]["student"]["ndcg@10"]) - np.mean(
        plain["evaluation"]["per_list"]["student"]["ndcg@10"]
    )
    assert by_group["all"]["ndcg@10"]["diff"] == pytest.approx(diff)
    assert by_group["all"]["ndcg@10"]["low"] <= by_group["all"]["ndcg@10"]["diff"] <= by_group["all"]["ndcg@10"]["high"]
    text = (tmp_path / "results.md").read_text()
    assert "## Where UPN helps" in text and f"| all | {by_group['all']['lists']:,} | " in text
    assert "Activity: the user's behaviours before the list; light <= " in text


def test_unknown_model_is_rejected_with_the_choices() -> None:
    with pytest.raises(ExperimentError, match="psad-s"):
        parse_models("initial,psad-x")


@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("data") / "other"
    build_synthetic(out, lists=300, users=40, items=60, list_length=8, max_history=10, seed=1, progress=False)
    return out


def test_several_data_sets_get_one_report_each_and_resume_each(tiny_data: Path, other_data: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from psad.cli import app

    (tmp_path / "c.toml").write_text(toml_text(tiny_config()))
    out = tmp_path / "reports"
    args = ["experiment", "--data", str(tiny_data), "--data", str(other_data), "--seeds", "1", "--out", str(out)]
    args += ["--models", "initial,dnn", "--config", str(tmp_path / "c.toml")]
    for session in range(2):
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 0, done.output
        for data, length in ((tiny_data, 10), (other_data, 8)):
            report = json.loads((out / data.name / "results.json").read_text())
            assert report["data_dir"] == str(data.resolve()) and report["list_length"] == length
            assert report["trained_this_session"] == ([] if session else ["dnn/seed0"])
            assert (out / data.name / "runs" / "dnn" / "seed0" / "result.json").is_file()
            assert f"# Reranking experiment: {data.name}" in done.output
    assert sorted(p.name for p in out.iterdir()) == sorted([tiny_data.name, other_data.name])


def test_report_directories_and_data_sets_sharing_a_name(tmp_path: Path) -> None:
    assert report_dirs([tmp_path / "a"], None) == [Path("reports") / "a"]
    assert report_dirs([tmp_path / "a"], tmp_path / "r") == [tmp_path / "r"]  # one data set: --out as before
    assert report_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / "r") == [tmp_path / "r" / "a", tmp_path / "r" / "b"]
    with pytest.raises(ExperimentError, match=r"--data: several data sets named \['a'\]"):
        report_dirs([tmp_path / "a", tmp_path / "x" / "a"], None)


def wall_targets(data_dir: Path, out: Path, **kwargs) -> list[dict]:
    report = run_experiment(data_dir, out, seeds=1, models=list(FIXED), progress=False, **kwargs)
    return [t for t in report["targets"] if t["target"].startswith("whole experiment")]


def test_the_time_target_is_ml100ks_unless_a_budget_is_passed(tiny_data: Path, tmp_path: Path) -> None:
    assert wall_targets(tiny_data, tmp_path / "tiny") == []  # no budget was set for this data set
    (tmp_path / "ml100k").symlink_to(tiny_data, target_is_directory=True)  # budgets go by data set name
    (ml100k,) = wall_targets(tmp_path / "ml100k", tmp_path / "ml")
    assert ml100k["target"] == "whole experiment under 30 min (set for ml100k on 2 cores)" and ml100k["passed"]
    (passed,) = wall_targets(tiny_data, tmp_path / "budget", time_budget_s=90)
    assert passed["target"] == "whole experiment under 1.5 min (--time-budget-min)" and passed["passed"]
    assert "1.5 min (--time-budget-min) | pass" in (tmp_path / "budget" / "results.md").read_text()
    with pytest.raises(ExperimentError, match="--time-budget-min must be > 0"):
        wall_targets(tiny_data, tmp_path / "zero", time_budget_s=0)


def test_the_item_encoders_are_compared_on_cold_items_state_and_latency(cold_data: Path, tmp_path: Path) -> None:
    models = ["initial", "psad-s", "psad-s-sid"]
    report = run_experiment(cold_data, tmp_path, seeds=1, models=models, base_config=tiny_config(), progress=False)
    cold, sid = report["cold"], report["sid"]
    result = json.loads((tmp_path / "runs" / "psad-b4-listwise-sid" / "seed0" / "result.json").read_text())
    rows = np.asarray(result["evaluation"]["cold"]["list_cold"])
    assert 0 < cold["lists"] == rows.sum() < len(rows)
    on_cold = cold["paired"]["lists with cold items"]["ndcg@10"]
    per_list = {
        r: np.asarray(
            json.loads((tmp_path / "runs" / r / "seed0" / "result.json").read_text())["evaluation"]["per_list"][
                "student"
            ]["ndcg@10"]
        )
        for r in ("psad-b4-listwise-sid", "psad-b4-listwise")
    }
    assert on_cold["diff"] == pytest.approx(
        (per_list["psad-b4-listwise-sid"] - per_list["psad-b4-listwise"])[rows].mean()
    )
    assert set(cold["models"]) == set(models)
    assert sid["state"]["psad-s-sid"]["per_item"] == 3 and sid["state"]["psad-s"]["per_item"] == 4 * 16
    assert all(ms > 0 for ms in sid["latency_ms"].values())
    targets = {t["target"].split(":")[0] for t in report["targets"]}
    assert {"lists with cold items", "all lists", "student latency at 100 candidates, 50 behaviours"} <= targets
    text = (tmp_path / "results.md").read_text()
    assert "## Cold items (first seen after the training period)" in text and "| psad-s-sid | 3 |" in text


def test_sid_models_need_a_data_set_with_content(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="item_content"):
        run_experiment(tiny_data, tmp_path, seeds=1, models=["psad-s-sid"], base_config=tiny_config(), progress=False)
