"""Training loop: config validation, learning, exact resume, determinism, DDP, pickle-free checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from export.contract.schema import SchemaError
from tests.conftest import predate_per_model_checkpoints
from training.checkpoint import RunError, load_run
from training.config import ConfigError, TrainConfig
from training.train import record_best, train, update_average

REPO = Path(__file__).resolve().parents[1]


def toml_text(config: TrainConfig) -> str:
    """A TOML file for `config` (flat scalar tables only, which is all a config holds)."""

    def value(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else repr(v)

    lines = []
    for table, entries in config.to_dict().items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


def weights(run: Path, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"parameter {key} differs")


def test_shipped_configs_load() -> None:
    for path in (REPO / "configs").glob("*.toml"):
        TrainConfig.load(path)


def test_config_round_trips_through_toml_and_dict(tmp_path: Path) -> None:
    config = TrainConfig.small_for_tests()
    (tmp_path / "c.toml").write_text(toml_text(config))
    assert TrainConfig.load(tmp_path / "c.toml") == config
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("[train]\nepochz = 3\n", "epochz"),
        ("[train]\nepochs = '3'\n", "train.epochs must be an integer"),
        ("[train]\nbatch_size = 0\n", "train.batch_size must be an integer >= 1"),
        ("[train]\ndevice = 'tpu'\n", "['auto', 'cpu', 'cuda']"),
        ("[train]\nema = 1.0\n", "train.ema must be a number in [0, 1)"),
        ("[train]\nlr = inf\n", "train.lr must be a finite number"),
        ("[model]\nrd_mu = inf\n", "model.rd_mu = inf is invalid: allowed a finite number"),
        ("[model]\nblock_size = 0\n", "model.block_size"),
        ("[model]\ndistill_weight = -0.5\n", "model.distill_weight"),
        ("[model]\ndistill = 'kl'\n", "['listwise', 'rd', 'none']"),
        ("[optimizer]\nlr = 1\n", "unknown table(s) ['optimizer']"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_is_rejected_with_the_key(tmp_path: Path, edit: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(edit)
    with pytest.raises(ConfigError, match="bad.toml") as info:
        TrainConfig.load(path)
    assert expected in str(info.value)


def test_a_config_that_extends_another_takes_every_key_it_does_not_set(tmp_path: Path) -> None:
    base = TrainConfig.small_for_tests()
    (tmp_path / "base.toml").write_text(toml_text(base))
    (tmp_path / "variant.toml").write_text(
        'extends = "base.toml"\n[model]\nhistory_match = true\n[train]\nepochs = 7\n'
    )
    expected = dataclasses.replace(base, epochs=7, model=dataclasses.replace(base.model, history_match=True))
    assert TrainConfig.load(tmp_path / "variant.toml") == expected
    shipped = TrainConfig.load(REPO / "configs" / "trivago.toml")
    psad = TrainConfig.load(REPO / "configs" / "psad.toml")
    assert shipped == dataclasses.replace(
        psad, model=dataclasses.replace(psad.model, item_ids=False, history_match=True)
    )
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="makes a cycle"):
        TrainConfig.load(tmp_path / "loop.toml")
    (tmp_path / "orphan.toml").write_text('extends = "gone.toml"\n')
    with pytest.raises(ConfigError, match=r"gone.toml: config file not found \(extended by .*orphan.toml\)"):
        TrainConfig.load(tmp_path / "orphan.toml")


def test_missing_config_and_data_dir_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        TrainConfig.load(tmp_path / "nope.toml")
    with pytest.raises(SchemaError, match=r"missing-data.*psad data build"):
        train(tmp_path / "missing-data", TrainConfig.small_for_tests(), tmp_path / "run", progress=False)


def test_a_diverging_run_stops_with_advice_and_keeps_no_broken_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(TrainConfig.small_for_tests(), lr=1e30, grad_clip=0.0, epochs=1)
    with pytest.raises(RunError, match=r"training diverged\. Lower train\.lr \(now 1e\+30\)"):
        train(tiny_data, config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_training_lowers_the_loss_and_writes_the_run(tiny_run: Path) -> None:
    history = json.loads((tiny_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    assert {"initial", "student", "teacher"} <= set(history[-1]["val"])
    assert 0.0 <= history[-1]["val"]["student"]["ndcg@10"] <= 1.0
    names = {p.name for p in tiny_run.iterdir()}
    assert names >= {"config.json", "schema.json", "items.safetensors", "model.safetensors", "last.safetensors"}
    assert names >= {"state.safetensors", "history.json", "curves.png"}
    assert json.loads((tiny_run / "config.json").read_text())["data_dir"].startswith("/")


def test_checkpoints_hold_no_pickles_and_rebuild_the_model(tiny_run: Path, tiny_data: Path) -> None:
    allowed = {".json", ".safetensors", ".png"}
    assert {p.suffix for p in tiny_run.iterdir()} <= allowed
    for path in tiny_run.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            assert list(f.keys())
    with safe_open(str(tiny_run / "state.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        assert int(f.get_tensor("epoch")) == 2 and len(meta["history"]) == 2

    model, config, schema = load_run(tiny_run)
    assert not model.training and config == TrainConfig.small_for_tests() and schema.n_items > 2
    from training.data.store import load_split
    from training.evaluate import to_tensors

    data = load_split(tiny_data, "val", schema).take(list(range(4)))
    with torch.no_grad():
        scores = model.rank_scores(to_tensors(data.inputs, torch.device("cpu")))
    assert scores.shape == data.labels.shape and torch.isfinite(scores).all()


def test_load_run_reports_missing_and_corrupt_runs(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="run directory not found"):
        load_run(tmp_path / "absent")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "schema.json", "items.safetensors"):
        (broken / name).write_bytes((tiny_run / name).read_bytes())
    with pytest.raises(RunError, match=r"missing \['model.safetensors'\]"):
        load_run(broken)
    (broken / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes()[:100])
    with pytest.raises(RunError, match="model.safetensors: cannot read weights"):
        load_run(broken)


def test_each_model_is_kept_at_its_own_best_epoch_and_training_waits_for_both() -> None:
    meta: dict = {"best": {}, "bad_epochs": 0}

    def epoch(student: float, teacher: float) -> list[str]:
        val = {"initial": {"ndcg@10": 0.9}, "student": {"ndcg@10": student}, "teacher": {"ndcg@10": teacher}}
        return record_best(meta, val)

    assert epoch(0.5, 0.4) == ["student", "teacher"]
    assert epoch(0.6, 0.3) == ["student"] and meta["bad_epochs"] == 0
    assert epoch(0.55, 0.45) == ["teacher"] and meta["bad_epochs"] == 0  # the teacher still learns: go on
    assert epoch(0.6, 0.45) == [] and meta["bad_epochs"] == 1  # ties are no improvement
    assert meta["best"] == {"student": 0.6, "teacher": 0.45}
    assert record_best({"best": {}, "bad_epochs": 3}, {"student": {"ndcg@10": 0.1}}) == ["student"]  # scorers


def scripted_validation(monkeypatch: pytest.MonkeyPatch, student: list[float], teacher: list[float]) -> None:
    """validate() returns these scores, one epoch per call: best epochs that training cannot choose."""
    scores = iter(zip(student, teacher, strict=True))

    def validate(*_: object) -> dict[str, dict[str, float]]:
        s, t = next(scores)
        return {"initial": {"ndcg@10": 0.5}, "student": {"ndcg@10": s}, "teacher": {"ndcg@10": t}}

    monkeypatch.setattr("training.train.validate", validate)


def test_student_and_teacher_are_kept_at_their_own_best_epochs_and_resume_keeps_them(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    student, teacher = [0.5, 0.6, 0.55, 0.5, 0.9], [0.4, 0.3, 0.45, 0.44, 0.9]
    config = dataclasses.replace(TrainConfig.small_for_tests(), epochs=5, patience=1)
    epoch_weights = []

    def keep(run: Path) -> None:
        epoch_weights.append(weights(run))

    scripted_validation(monkeypatch, student, teacher)
    monkeypatch.setattr("training.train.plot_history", lambda history, path, metric: keep(path.parent))
    full = train(tiny_data, config, tmp_path / "full", progress=False)
    # epoch 3: only the teacher improved, which keeps training going; epoch 4: nothing did, patience 1 stops
    assert len(json.loads((full / "history.json").read_text())) == 4
    assert_same_weights(weights(full, "model.safetensors"), epoch_weights[1])  # the student's best: epoch 2
    assert_same_weights(weights(full, "teacher.safetensors"), epoch_weights[2])  # the teacher's best: epoch 3
    assert_same_weights(weights(full, "model.safetensors"), load_file(str(full / "model.safetensors")))
    model, _, _ = load_run(full, "teacher")
    assert not model.training

    scripted_validation(monkeypatch, student, teacher)  # the same scores, over a run cut after epoch 2
    split = train(tiny_data, dataclasses.replace(config, epochs=2), tmp_path / "split", progress=False)
    train(tiny_data, config, split, resume=True, progress=False)
    for name in ("last.safetensors", "model.safetensors", "teacher.safetensors"):
        assert_same_weights(weights(split, name), weights(full, name))


def test_resuming_a_run_of_the_earlier_checkpoint_rule_is_refused(
    tiny_data: Path, tiny_run: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    predate_per_model_checkpoints(old)
    config = dataclasses.replace(TrainConfig.small_for_tests(), epochs=3)
    with pytest.raises(RunError, match="earlier version of `psad train`"):
        train(tiny_data, config, old, resume=True, progress=False)


def test_a_run_without_a_teacher_checkpoint_loads_its_student_only(tiny_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no-teacher"
    shutil.copytree(tiny_run, broken)
    (broken / "teacher.safetensors").unlink()
    load_run(broken)
    with pytest.raises(RunError, match="teacher.safetensors: not found"):
        load_run(broken, "teacher")
    with pytest.raises(ValueError, match="which must be one of"):
        load_run(broken, "generator")


def test_same_seed_gives_identical_weights_and_resume_equals_uninterrupted(
    tiny_data: Path, tiny_run: Path, tmp_path: Path
) -> None:
    config = TrainConfig.small_for_tests()  # what tiny_run trained: 2 epochs
    again = train(tiny_data, config, tmp_path / "again", progress=False)
    assert_same_weights(weights(again), weights(tiny_run))

    first = dataclasses.replace(config, epochs=1)
    split = train(tiny_data, first, tmp_path / "split", progress=False)
    with pytest.raises(RunError, match="already holds a run"):
        train(tiny_data, first, split, progress=False)
    changed = dataclasses.replace(config, lr=0.5)
    with pytest.raises(RunError, match=r"changed settings \['train.lr'\]"):
        train(tiny_data, changed, split, resume=True, progress=False)
    train(tiny_data, config, split, resume=True, progress=False)
    assert_same_weights(weights(split), weights(tiny_run))
    assert_same_weights(weights(split, "model.safetensors"), weights(tiny_run, "model.safetensors"))
    history = json.loads((split / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


def test_weight_average_update_is_exact_and_outside_autograd() -> None:
    model = nn.Linear(3, 2)
    averaged = copy.deepcopy(model).requires_grad_(False)
    before = [p.clone() for p in averaged.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_average(averaged, model, 0.9)
    for old, new, current in zip(before, averaged.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * current)
        assert new.grad_fn is None and not new.requires_grad


def test_weight_average_is_validated_saved_and_resumed(tiny_data: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(TrainConfig.small_for_tests(), ema=0.9)
    full = train(tiny_data, config, tmp_path / "full", progress=False)
    raw, averaged = weights(full), weights(full, "ema.safetensors")
    moved = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], averaged[k])]
    assert moved  # the average lags the trained weights
    ndcg = [h["val"]["student"]["ndcg@10"] for h in json.loads((full / "history.json").read_text())]
    assert ndcg[1] > ndcg[0]  # so the second epoch's average is the best checkpoint, and what was validated
    assert_same_weights(weights(full, "model.safetensors"), averaged)

    split = train(tiny_data, dataclasses.replace(config, epochs=1), tmp_path / "split", progress=False)
    train(tiny_data, config, split, resume=True, progress=False)
    for name in ("last.safetensors", "ema.safetensors", "model.safetensors"):
        assert_same_weights(weights(split, name), weights(full, name))


@pytest.mark.slow
def test_two_process_ddp_training_on_gloo(tiny_data: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(TrainConfig.small_for_tests(), epochs=1, device="cpu")
    (tmp_path / "c.toml").write_text(toml_text(config))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += ["-m", "training.commands", "train", "--data", str(tiny_data), "--config", str(tmp_path / "c.toml")]
    cmd += ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run written to" in done.stdout
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["val"]["student"]["ndcg@10"] > 0
    model, _, _ = load_run(out)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_train_command_reports_bad_inputs_and_applies_overrides(tiny_data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.commands import app

    runner = CliRunner()
    done = runner.invoke(app, ["train", "--data", str(tiny_data), "--config", str(tmp_path / "nope.toml")])
    assert done.exit_code == 2 and "nope.toml: config file not found" in done.output
    done = runner.invoke(app, ["train", "--data", str(tiny_data), "--distill", "kl"])
    assert done.exit_code == 2 and "--distill" in done.output

    (tmp_path / "c.toml").write_text(toml_text(TrainConfig.small_for_tests()))
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--config", str(tmp_path / "c.toml"), "--out", str(out)]
    done = runner.invoke(app, [*args, "--epochs", "1", "--distill", "rd", "--block-size", "3", "--seed", "7"])
    assert done.exit_code == 0, done.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 1 and saved["train"]["seed"] == 7
    assert saved["model"]["distill"] == "rd" and saved["model"]["block_size"] == 3


def test_train_command_arch_overrides_the_config_and_an_unknown_arch_names_the_choices(
    tiny_data: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from training.commands import app
    from training.models.config import ARCHS

    runner = CliRunner()
    done = runner.invoke(app, ["train", "--data", str(tiny_data), "--arch", "gru"])
    message = " ".join(done.output.replace("│", " ").split())  # rich wraps the error box
    assert done.exit_code == 2 and "--arch" in message and "'gru'" in message
    assert all(f"'{arch}'" in message for arch in ARCHS)

    (tmp_path / "c.toml").write_text(toml_text(TrainConfig.small_for_tests()))  # model.arch = "psad"
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--config", str(tmp_path / "c.toml"), "--out", str(out)]
    done = runner.invoke(app, [*args, "--epochs", "1", "--arch", "dnn"])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "config.json").read_text())["model"]["arch"] == "dnn"
    model, _, _ = load_run(out)
    assert type(model).__name__ == "DNN" and not (out / "teacher.safetensors").exists()


def test_a_teacher_trained_on_the_shown_order_learns_the_simulators_click_model(tmp_path: Path) -> None:
    """On shuffled displays, the teacher's click probability of each displayed item, given the items
    displayed above it (B = 1), tracks the simulator's exact one for the same order."""
    import numpy as np

    from training.data.store import load_schema
    from training.data.synthetic import ClickModel, build_synthetic
    from training.evaluate import load_lists, to_tensors

    data_dir = tmp_path / "shuffled"
    build_synthetic(
        data_dir,
        lists=3000,
        users=60,
        items=120,
        list_length=8,
        max_history=10,
        seed=1,
        logging_policy="shuffle",
        progress=False,
    )
    config = TrainConfig.small_for_tests()
    config.epochs = 4
    config.model = dataclasses.replace(config.model, block_size=1, teacher_target="shown")
    run = train(data_dir, config, tmp_path / "run", progress=False)
    model, _, _ = load_run(run, "teacher")
    data = load_lists(data_dir, "val", load_schema(data_dir), 0)
    shown = torch.from_numpy(data.shown_order())
    inputs = to_tensors(data.inputs, torch.device("cpu"))
    with torch.no_grad():
        x, u = model._represent(inputs)
        enc = model.teacher.encode(x, inputs["cand_mask"])
        learned = torch.sigmoid(model.teacher.click_logits(enc, u, shown)).numpy()
    truth = ClickModel.load(data_dir)
    attraction, category, mask = truth.list_arrays(data)
    exact = np.take_along_axis(truth.click_probabilities(attraction, category, mask, shown.numpy()), shown.numpy(), 1)
    assert np.corrcoef(learned.ravel(), exact.ravel())[0, 1] > 0.5  # 0.66 at this seed
    assert abs(learned.mean() - exact.mean()) < 0.03


def test_the_shown_order_is_read_from_shown_position_and_checked() -> None:
    import numpy as np

    from training.data.store import DataError, ListData

    mask = np.array([[True, True, True], [True, True, False]])
    inputs = {"cand_mask": mask}
    labels = np.zeros((2, 3), np.float32)
    data = ListData(inputs, labels, np.array([10, 11]), np.array(["a", "b"], dtype=object))
    with pytest.raises(DataError, match=r"no `shown_position` list column.*teacher_target = \"own\""):
        data.shown_order()
    data.extras["shown_position"] = np.array([[2.0, 0.0, 1.0], [1.0, 0.0, 0.0]], np.float32)  # padded slot: junk
    np.testing.assert_array_equal(data.shown_order(), [[1, 2, 0], [1, 0, 2]])
    data.extras["shown_position"] = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]], np.float32)
    with pytest.raises(DataError, match="list 11: `shown_position` must give each candidate its own finite"):
        data.shown_order()


@pytest.mark.parametrize(
    ("table", "entry", "expected"),
    [
        ("train", "epochz = 3", "[train] unknown key(s) ['epochz']; allowed: ['epochs', 'batch_size',"),
        ("train", "model = 3", "[train] unknown key(s) ['model']; allowed: ['epochs',"),
        ("train", "seed = 1.0", "train.seed must be an integer, got 1.0"),
        ("train", "device = 1", "train.device must be one of ['auto', 'cpu', 'cuda'], got 1"),
        ("model", "blok_size = 4", "[model] unknown key(s) ['blok_size']; allowed: ['arch', 'd_model',"),
        ("model", "block_size = '4'", "model.block_size = '4' is invalid: allowed an integer"),
        ("model", "rd_dynamic = 1", "model.rd_dynamic = 1 is invalid: allowed true or false"),
    ],
)
def test_each_table_refuses_an_unknown_key_and_a_wrong_type_naming_the_table_and_key(
    tmp_path: Path, table: str, entry: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[{table}]\n{entry}\n")
    with pytest.raises(ConfigError) as info:
        TrainConfig.load(path)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_a_config_built_in_code_is_refused_like_a_loaded_one() -> None:
    from training.models.config import ModelConfig

    base = TrainConfig.small_for_tests()
    with pytest.raises(ConfigError, match=r"^train\.epochs must be an integer >= 1, got 0$"):
        dataclasses.replace(base, epochs=0)
    with pytest.raises(ConfigError, match=r"^model\.d_model = 30 is invalid: allowed a multiple of n_heads \(4\)$"):
        dataclasses.replace(base.model, d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match=r"^\[model\] unknown key\(s\) \['blok_size'\]"):
        ModelConfig(blok_size=4)
    assert json.dumps(ModelConfig(distill_weight=2).to_dict()["distill_weight"]) == "2.0"  # config.json: a float
    assigned = copy.deepcopy(base)
    assigned.model.arch = "gru"  # an assignment is checked by validate(), which every build_model calls
    with pytest.raises(ConfigError, match=r"^model\.arch = 'gru' is invalid: allowed one of \['psad', 'dnn'"):
        assigned.validate()


def test_train_command_refuses_an_unknown_device_naming_the_flag(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.commands import app

    done = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--device", "tpu"])
    message = " ".join(done.output.replace("│", " ").split())  # rich wraps the error box
    assert done.exit_code == 2 and "--device" in message and "['auto', 'cpu', 'cuda'], got 'tpu'" in message


def test_the_config_accepts_exactly_the_archs_the_registry_builds() -> None:
    from training.models.baselines import BASELINES
    from training.models.config import ARCHS
    from training.models.registry import GENERATOR_ARCHS

    assert sorted(ARCHS) == sorted(GENERATOR_ARCHS | set(BASELINES))
