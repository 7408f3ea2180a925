"""`psad experiment`: every reranker trained and evaluated on the same splits, over several seeds.

A model spec names a training run (ModelConfig overrides of the base config) and the ranker of
that run to evaluate: "student" (rank_scores), "teacher" (teacher_decode) or "initial" (the
ranking stage's order, nothing trained). Specs that need the same run share it: psad-g and
psad-s are the teacher and the student of one run. Checkpoints are chosen by train() on the
validation split (each model at its own best NDCG@10 epoch); the test split is only ever evaluated.

Layout under --out:
    runs/<run>/seed<k>/              a train() run directory
    runs/<run>/seed<k>/result.json   its test evaluation, written when the run is done
    results.json, results.md, quality_vs_latency.png
A killed experiment resumes: finished runs (result.json present) are skipped, a partially
trained one continues from its last epoch (train(..., resume=True)). A finished run trained with
other settings, or any run trained by an earlier version of the checkpoint rule, is refused
before anything trains: its result would not be this experiment's.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer

NAR = -1  # block_size placeholder: the data set's list length (every slot in one step)
TARGET_METRIC = "ndcg@10"
LATENCY_REPEATS = 50
WALL_BUDGET_S = 30 * 60  # the whole ml100k experiment on 2 cores


@dataclass(frozen=True)
class ModelSpec:
    name: str
    ranker: str  # "initial" | "student" | "teacher"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides; empty for "initial"
    description: str = ""


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("initial", "initial", description="the ranking stage's order"),
        ModelSpec("dnn", "student", {"arch": "dnn"}, "pointwise MLP, BCE"),
        ModelSpec("prm", "student", {"arch": "prm"}, "PRM: transformer over the initial list"),
        ModelSpec("dlcm", "student", {"arch": "dlcm"}, "DLCM: GRU over the initial list"),
        ModelSpec("seq2slate", "teacher", {"arch": "psad", "block_size": 1}, "PSAD teacher, B=1 (AR)"),
        ModelSpec("nar", "teacher", {"arch": "psad", "block_size": NAR}, "PSAD teacher, B=L (NAR)"),
        ModelSpec("psad-g", "teacher", {"arch": "psad", "block_size": 4}, "PSAD-G, B=4"),
        ModelSpec("psad-s", "student", {"arch": "psad", "block_size": 4}, "PSAD-S, listwise distillation"),
        ModelSpec(
            "psad-s-rd",
            "student",
            {"arch": "psad", "block_size": 4, "distill": "rd", "student_loss": "bce"},
            "PSAD-S, RD distillation (BCE label loss + teacher top-K)",
        ),
        ModelSpec(
            "student-alone", "student", {"arch": "psad", "block_size": 4, "distill": "none"}, "PSAD-S, no distillation"
        ),
    )
}
BASELINE_NAMES = ("dnn", "prm", "dlcm", "seq2slate", "nar")


class ExperimentError(ValueError):
    """Bad experiment arguments; the message names the option and the fix."""


def resolve(spec: ModelSpec, max_list: int) -> dict[str, Any]:
    return {k: (max_list if v == NAR else v) for k, v in spec.model.items()}


def run_name(overrides: dict[str, Any], base_distill: str) -> str:
    """A stable directory name for a run: the same overrides always land in the same place."""
    name = overrides["arch"]
    if name == "psad":
        name += f"-b{overrides['block_size']}-{overrides.get('distill', base_distill)}"
        if "student_loss" in overrides:
            name += f"-{overrides['student_loss']}"
    return name


@dataclass
class Plan:
    """Which runs to train (name -> overrides) and which run each model spec reads."""

    runs: dict[str, dict[str, Any]]
    spec_run: dict[str, str | None]


def make_plan(models: list[str], max_list: int, base_distill: str) -> Plan:
    runs: dict[str, dict[str, Any]] = {}
    spec_run: dict[str, str | None] = {}
    for name in models:
        spec = SPECS[name]
        if spec.ranker == "initial":
            spec_run[name] = None
            continue
        overrides = resolve(spec, max_list)
        run = run_name(overrides, base_distill)
        runs[run] = overrides
        spec_run[name] = run
    return Plan(runs, spec_run)


def parse_models(raw: str | None) -> list[str]:
    names = list(SPECS) if raw is None else [m.strip() for m in raw.split(",") if m.strip()]
    unknown = [m for m in names if m not in SPECS]
    if unknown or not names:
        raise ExperimentError(f"--models: unknown or empty {unknown or names}; choose from {', '.join(SPECS)}")
    return list(dict.fromkeys(names))


def _mean_std(values: list[float]) -> dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def run_config(base: Any, overrides: dict[str, Any], seed: int) -> Any:
    """The TrainConfig of one (run, seed): the base config, this seed, the run's model overrides."""
    from training.config import TrainConfig

    config = TrainConfig.from_dict(base.to_dict())
    config.seed = seed
    for key, value in overrides.items():
        setattr(config.model, key, value)
    config.validate()
    return config


def train_and_evaluate(data_dir: Path, config: Any, run_dir: Path, progress: bool) -> dict:
    """One (run, seed): train (resuming a partial run), evaluate on test, write result.json."""
    from training.evaluate import evaluate_run
    from training.train import train

    started = time.perf_counter()
    train(data_dir, config, run_dir, resume=(run_dir / "state.safetensors").is_file(), progress=progress)
    history = json.loads((run_dir / "history.json").read_text())
    result = {
        "evaluation": evaluate_run(run_dir, "test", data_dir),
        "epochs": len(history),
        "train_seconds": sum(h["seconds"] for h in history),
        "session_seconds": time.perf_counter() - started,
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def initial_metrics(data_dir: Path, schema: Any, max_list: int) -> dict:
    """The initial order on test (seed-independent): overall and per activity group."""
    from training.evaluate import GROUPS, activity_groups, click_model, list_metrics, load_lists, summarise

    data = load_lists(data_dir, "test", schema, max_list)
    length = data.labels.shape[1]
    perms = {"initial": np.tile(np.arange(length, dtype=np.int64), (len(data), 1))}
    metrics = list_metrics(perms, data, click_model(data_dir))
    groups, _ = activity_groups(data_dir, data)
    return {
        "overall": summarise(metrics, slice(None)),
        "groups": {g: summarise(metrics, groups == i) for i, g in enumerate(GROUPS) if (groups == i).any()},
    }


def measure_latency(run_dir: Path, ranker: str, data_dir: Path, length: int, history: int) -> tuple[float, int]:
    """Median ms per list on ONE CPU thread, eager PyTorch, inference_mode, batch 1; and decoding steps."""
    import torch

    from export.parity import BatchMaker
    from training.checkpoint import load_run
    from training.evaluate import load_lists, to_tensors

    model, config, schema = load_run(run_dir, ranker)
    lists = load_lists(data_dir, "test", schema, config.max_list)
    inputs = to_tensors(BatchMaker(schema, lists.inputs).make(1, length, history, pad_last=False), torch.device("cpu"))
    infer = model.teacher_decode if ranker == "teacher" else model.rank_scores
    steps = model.decode_steps(length) if ranker == "teacher" else 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(5):
                infer(inputs)
            times = []
            for _ in range(LATENCY_REPEATS):
                start = time.perf_counter()
                infer(inputs)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000.0 * statistics.median(times), steps


def run_experiment(
    data_dir: Path,
    out: Path,
    *,
    seeds: int = 3,
    models: list[str] | None = None,
    base_config: Any = None,
    epochs: int | None = None,
    progress: bool = True,
    on_run_done: Callable[[str, int], None] | None = None,
) -> dict:
    """Train every run x seed not finished yet, evaluate, and write results.{json,md} + the plot.

    base_config: the TrainConfig every run starts from (default TrainConfig()); on_run_done is
    called after each (run, seed) that trained in this session (tests use it to simulate a kill).
    """
    from tqdm import tqdm

    from training.checkpoint import predates_per_model_checkpoints, read_meta
    from training.config import TrainConfig
    from training.data.store import check_schema_files, load_schema
    from training.train import RESULT_NEUTRAL, changed_settings

    started = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    if seeds < 1:
        raise ExperimentError(f"--seeds must be >= 1, got {seeds}")
    models = models or list(SPECS)
    unknown = [m for m in models if m not in SPECS]
    if unknown:
        raise ExperimentError(f"--models: unknown {unknown}; choose from {', '.join(SPECS)}")
    check_schema_files(data_dir)
    schema = load_schema(data_dir)
    base = TrainConfig.from_dict((base_config or TrainConfig()).to_dict())  # a copy: the caller's stays as is
    if epochs is not None:
        base.epochs = epochs
    base.validate()
    length = min(base.max_list, schema.max_list) if base.max_list else schema.max_list
    history = schema.max_history
    plan = make_plan(models, length, base.model.distill)

    jobs = {(run, seed): run_config(base, plan.runs[run], seed) for run in plan.runs for seed in range(seeds)}
    run_dirs = {(run, seed): out / "runs" / run / f"seed{seed}" for run, seed in jobs}
    finished = [job for job, run_dir in run_dirs.items() if (run_dir / "result.json").is_file()]
    fix = f"Write to a new --out, or delete {out / 'runs'} to retrain every run."
    for job, run_dir in run_dirs.items():  # before training anything: no half-replaced experiment
        state = run_dir / "state.safetensors"
        if state.is_file() and predates_per_model_checkpoints(read_meta(state)):
            raise ExperimentError(
                f"{run_dir} was trained by an earlier version of `psad train` (one checkpoint for student and "
                f"teacher): its result would not be this experiment's. {fix}"
            )
        stale = changed_settings(run_dir, jobs[job], data_dir, RESULT_NEUTRAL) if job in finished else []
        if stale:
            raise ExperimentError(
                f"{run_dir} is a finished run with other settings {stale}: its result would not be this "
                f"experiment's. {fix}"
            )
    trained, results = [], {}
    bar = tqdm(jobs.items(), desc="experiment runs", disable=not progress)
    for (run, seed), config in bar:
        bar.set_postfix_str(f"{run} seed {seed}")
        run_dir = run_dirs[run, seed]
        if (run, seed) in finished:
            results[run, seed] = json.loads((run_dir / "result.json").read_text())
            continue
        results[run, seed] = train_and_evaluate(data_dir, config, run_dir, progress)
        trained.append(f"{run}/seed{seed}")
        if on_run_done is not None:
            on_run_done(run, seed)
    bar.close()

    initial = initial_metrics(data_dir, schema, base.max_list) if "initial" in models else None
    summary: dict[str, Any] = {}
    for name in tqdm(models, desc="latency", disable=not progress):
        spec, run = SPECS[name], plan.spec_run[name]
        if run is None:
            evaluations = [initial] * seeds
            latency, steps = 0.0, 0
        else:
            evaluations = [results[run, s]["evaluation"] for s in range(seeds)]
            latency, steps = measure_latency(out / "runs" / run / "seed0", spec.ranker, data_dir, length, history)
        summary[name] = aggregate(spec, run, evaluations, latency, steps)
    wall = time.perf_counter() - started
    report = {
        "dataset": data_dir.name,
        "data_dir": str(data_dir.resolve()),
        "split": "test",
        "seeds": list(range(seeds)),
        "list_length": length,
        "history_length": history,
        "latency": "median ms per list, 1 CPU thread, PyTorch eager, inference_mode, batch 1",
        "base_config": base.to_dict(),
        "runs": {run: overrides for run, overrides in plan.runs.items()},
        "trained_this_session": trained,
        "wall_seconds": wall,
        "train_seconds_total": sum(r["train_seconds"] for r in results.values()),
        "models": summary,
    }
    report["targets"] = targets(summary, wall, resumed=len(trained) < len(jobs))
    write_reports(report, out)
    return report


def aggregate(spec: ModelSpec, run: str | None, evaluations: list[dict], latency: float, steps: int) -> dict:
    ranker = spec.ranker
    names = list(evaluations[0]["overall"][ranker])
    groups = {
        g: {m: _mean_std([e["groups"][g][ranker][m] for e in evaluations]) for m in names}
        for g in evaluations[0]["groups"]
        if all(g in e["groups"] for e in evaluations)
    }
    return {
        "description": spec.description,
        "ranker": ranker,
        "run": run,
        "metrics": {m: _mean_std([e["overall"][ranker][m] for e in evaluations]) for m in names},
        "groups": groups,
        "latency_ms": latency,
        "decode_steps": steps,
    }


def targets(models: dict[str, dict], wall: float, resumed: bool) -> list[dict]:
    """The project's targets, each passed / missed / n/a (a model it needs was not run)."""

    def ndcg(name: str) -> float:
        return models[name]["metrics"][TARGET_METRIC]["mean"]

    def check(target: str, needs: tuple[str, ...], test: Callable[[], tuple[bool, str]]) -> dict:
        if not all(n in models for n in needs):
            return {"target": target, "passed": None, "detail": f"n/a: needs {', '.join(needs)}"}
        passed, detail = test()
        return {"target": target, "passed": bool(passed), "detail": detail}

    def s2s_vs_g() -> tuple[bool, str]:
        g, a = models["psad-g"], models["seq2slate"]
        gap = (ndcg("seq2slate") - ndcg("psad-g")) / ndcg("seq2slate")
        step_ratio = a["decode_steps"] / max(g["decode_steps"], 1)
        speedup = a["latency_ms"] / max(g["latency_ms"], 1e-9)
        ok = gap <= 0.01 and step_ratio >= 3 and speedup >= 2.5
        return ok, f"gap {gap:+.2%}, steps {a['decode_steps']}/{g['decode_steps']} = {step_ratio:.1f}x, " + (
            f"latency {a['latency_ms']:.2f}/{g['latency_ms']:.2f} ms = {speedup:.1f}x"
        )

    return [
        check(
            f"PSAD-S within 1% (relative {TARGET_METRIC}) of PSAD-G",
            ("psad-s", "psad-g"),
            lambda: (
                ndcg("psad-s") >= 0.99 * ndcg("psad-g"),
                f"{ndcg('psad-s'):.4f} vs {ndcg('psad-g'):.4f} ({ndcg('psad-s') / ndcg('psad-g') - 1:+.2%})",
            ),
        ),
        check(
            "PSAD-S above student-alone",
            ("psad-s", "student-alone"),
            lambda: (
                ndcg("psad-s") > ndcg("student-alone"),
                f"{ndcg('psad-s'):.4f} vs {ndcg('student-alone'):.4f}",
            ),
        ),
        check(
            "PSAD-S above PRM",
            ("psad-s", "prm"),
            lambda: (ndcg("psad-s") > ndcg("prm"), f"{ndcg('psad-s'):.4f} vs {ndcg('prm'):.4f}"),
        ),
        check(
            "PSAD-G (B=4) within 1% of Seq2Slate, >= 3x fewer steps, >= 2.5x lower latency",
            ("psad-g", "seq2slate"),
            s2s_vs_g,
        ),
        {
            "target": f"whole experiment under {WALL_BUDGET_S // 60} min (set for ml100k on 2 cores)",
            "passed": None if resumed else wall < WALL_BUDGET_S,
            "detail": f"{wall / 60:.1f} min" + (" (resumed session: not the whole experiment)" if resumed else ""),
        },
    ]


def cell(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def best_baseline(models: dict[str, dict]) -> str | None:
    present = [n for n in BASELINE_NAMES if n in models]
    return max(present, key=lambda n: models[n]["metrics"][TARGET_METRIC]["mean"]) if present else None


def markdown(report: dict) -> str:
    models = report["models"]
    metrics = list(next(iter(models.values()))["metrics"])
    lines = [
        f"# Reranking experiment: {report['dataset']}",
        "",
        f"Test split of `{report['data_dir']}`; mean ± standard deviation over seeds {report['seeds']}. "
        f"Checkpoints chosen on validation: each model at its own best epoch (student or teacher {TARGET_METRIC}). "
        f"Latency: {report['latency']}, "
        f"L = {report['list_length']}, H = {report['history_length']}. Wall time of this session: "
        f"{report['wall_seconds'] / 60:.1f} min (training {report['train_seconds_total'] / 60:.1f} min in total).",
        "",
        "| model | evaluated | " + " | ".join(metrics) + " | ms/list | steps |",
        "|---|---|" + "---|" * len(metrics) + "---|---|",
    ]
    for name, m in models.items():
        cells = " | ".join(cell(m["metrics"][k]) for k in metrics)
        lines.append(f"| {name} | {m['ranker']} | {cells} | {m['latency_ms']:.2f} | {m['decode_steps']} |")
    lines += ["", "## Targets", "", "| target | result | detail |", "|---|---|---|"]
    for t in report["targets"]:
        result = {True: "pass", False: "MISS", None: "n/a"}[t["passed"]]
        lines.append(f"| {t['target']} | {result} | {t['detail']} |")
    focus = [n for n in ("psad-s", "psad-g", best_baseline(models)) if n in models]
    if focus:
        lines += [
            "",
            "## By user-activity group (PSAD-S, PSAD-G, best baseline)",
            "",
            "| model | group | " + " | ".join(metrics) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(metrics))
        for name in dict.fromkeys(focus):
            for group, values in models[name]["groups"].items():
                lines.append(f"| {name} | {group} | " + " | ".join(cell(values[k]) for k in metrics) + " |")
    lines += [
        "",
        "## Quality versus latency",
        "",
        "![NDCG@10 versus ms per list](quality_vs_latency.png)",
        "",
        "## Runs",
        "",
        "| run | model overrides |",
        "|---|---|",
        *(f"| {run} | `{json.dumps(o)}` |" for run, o in report["runs"].items()),
        "",
        f"Base config: `{json.dumps(report['base_config'])}`",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in report["models"].items():
        stat = m["metrics"][TARGET_METRIC]
        if m["latency_ms"] <= 0:
            ax.axhline(stat["mean"], color="grey", linestyle="--", linewidth=1, label=name)
            continue
        ax.errorbar(m["latency_ms"], stat["mean"], yerr=stat["std"], fmt="o", capsize=3)
        ax.annotate(name, (m["latency_ms"], stat["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set(
        xlabel=f"ms per list (1 CPU thread, L={report['list_length']}, H={report['history_length']})",
        ylabel=f"test {TARGET_METRIC}",
        title=f"{report['dataset']}: quality vs latency",
    )
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "quality_vs_latency.png")


def experiment_command(
    data: Path = typer.Option(..., "--data", help="Data set directory built by `psad data build`."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per model (mean ± std reported)."),
    models: str = typer.Option(None, "--models", help=f"Comma-separated subset of: {','.join(SPECS)} (default all)."),
    config: Path = typer.Option(Path("configs/psad.toml"), "--config", help="Base TOML config (docs/training.md)."),
    out: Path = typer.Option(None, "--out", help="Report directory (default reports/<data dir name>)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Override train.epochs for every run."),
) -> None:
    """Train and evaluate every reranker on the same splits; write results.md/.json and a plot."""
    from training.checkpoint import RunError
    from training.config import ConfigError, TrainConfig
    from training.data.store import DataError
    from training.schema import SchemaError

    try:
        report = run_experiment(
            data,
            out or Path("reports") / data.name,
            seeds=seeds,
            models=parse_models(models),
            base_config=TrainConfig.load(config),
            epochs=epochs,
        )
    except (ExperimentError, ConfigError, DataError, SchemaError, RunError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    target = out or Path("reports") / data.name
    typer.echo((target / "results.md").read_text())
    typer.echo(f"wall time {report['wall_seconds'] / 60:.1f} min; reports in {target}")
