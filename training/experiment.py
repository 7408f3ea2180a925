"""`psad experiment`: every reranker trained and evaluated on the same splits, over several seeds.

A model spec names a training run (ModelConfig overrides of the base config) and the ranker of
that run to evaluate: "student" (rank_scores) or "teacher" (teacher_decode); or it is a fixed
order with nothing trained, "initial" (the ranking stage's order) or "history" (the user's
previously interacted items first, most recent first), both from training.evaluate.fixed_rankings.
Specs that need the same run share it: psad-g and psad-s are the teacher and the student of one
run. Checkpoints are chosen by train() on the validation split (each model at its own best
NDCG@10 epoch); the test split is only ever evaluated.

Layout under a data set's report directory (--out; --out/<data dir name> for several data sets):
    runs/<run>/seed<k>/              a train() run directory
    runs/<run>/seed<k>/result.json   its test evaluation, written when the run is done
    results.json, results.md, quality_vs_latency.png
A killed experiment resumes: finished runs (result.json present) are skipped, a partially
trained one continues from its last epoch (train(..., resume=True)). A finished run trained with
other settings, or any run trained by an earlier version of the checkpoint rule, is refused
before anything trains: its result would not be this experiment's. A finished run whose
result.json lacks a metric this version computes is re-evaluated, not retrained.

Targets: the comparisons the project set (PSAD-S vs PSAD-G, ...), and a wall-time budget for the
whole experiment only where one was set (TIME_BUDGETS, by data set directory name) or passed.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import typer

NAR = -1  # block_size placeholder: the data set's list length (every slot in one step)
TARGET_METRIC = "ndcg@10"
LATENCY_REPEATS = 50
# data set directory name -> (wall-time budget of the whole experiment in s, where it comes from)
TIME_BUDGETS = {"ml100k": (30 * 60, "set for ml100k on 2 cores")}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    ranker: str  # "student" | "teacher" of a run, or a fixed order: "initial" | "history"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides; empty for a fixed order
    description: str = ""

    @property
    def fixed(self) -> bool:
        """A fixed order (training.evaluate.fixed_rankings): no run, seed-independent, not timed."""
        return not self.model


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("initial", "initial", description="the ranking stage's order"),
        ModelSpec("history-first", "history", description="the user's items first (most recent first), then initial"),
        ModelSpec("dnn", "student", {"arch": "dnn"}, "pointwise MLP, BCE"),
        ModelSpec("prm", "student", {"arch": "prm"}, "PRM: transformer over the initial list"),
        ModelSpec("dlcm", "student", {"arch": "dlcm"}, "DLCM: GRU over the initial list"),
        ModelSpec("setrank", "student", {"arch": "setrank"}, "SetRank: permutation-invariant self-attention"),
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
        ModelSpec(
            "no-upn", "student", {"arch": "psad", "block_size": 4, "use_upn": False}, "PSAD-S without UPN (no history)"
        ),
        ModelSpec(
            "psad-s-sid",
            "student",
            {"arch": "psad", "block_size": 4, "item_encoder": "sid"},
            "PSAD-S with IntRR item codes from content (item_encoder sid)",
        ),
    )
}
SID_PAIR = ("psad-s-sid", "psad-s")  # the item encoders compared: sid against id, same model otherwise
SID_LATENCY_SHAPE = (100, 50)  # candidates, behaviours: where the sid latency target is set
CATALOGUE = 10_000_000  # items: the catalogue size the served-state target is set for
BASELINE_NAMES = ("dnn", "prm", "dlcm", "setrank", "seq2slate", "nar")  # trained; fixed orders are listed apart


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
        if overrides.get("use_upn") is False:
            name += "-noupn"
    if overrides.get("item_encoder", "id") != "id":
        name += f"-{overrides['item_encoder']}"
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
        if spec.fixed:
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


def save_result(run_dir: Path, result: dict) -> dict:
    """result.json marks a run finished: written last, so a killed run is never counted as done."""
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def train_and_evaluate(data_dir: Path, config: Any, run_dir: Path, progress: bool) -> dict:
    """One (run, seed): train (resuming a partial run), evaluate on test, write result.json."""
    from training.evaluate import evaluate_run
    from training.train import train

    started = time.perf_counter()
    train(data_dir, config, run_dir, resume=(run_dir / "state.safetensors").is_file(), progress=progress)
    history = json.loads((run_dir / "history.json").read_text())
    result = {
        "evaluation": evaluate_run(run_dir, "test", data_dir, per_list=True),
        "epochs": len(history),
        "train_seconds": sum(h["seconds"] for h in history),
        "session_seconds": time.perf_counter() - started,
    }
    return save_result(run_dir, result)


def evaluated_metrics(evaluation: dict) -> set[str]:
    return set(next(iter(evaluation["overall"].values())))


def outdated(evaluation: dict, current: set[str]) -> bool:
    """An evaluation from before a metric was added or the activity groups changed, or without the
    per-list values pairing needs."""
    from training.evaluate import GROUPS_VERSION

    return (
        evaluated_metrics(evaluation) != current
        or "per_list" not in evaluation
        or evaluation["activity"].get("version", 1) != GROUPS_VERSION
    )


def fixed_metrics(data_dir: Path, schema: Any, max_list: int) -> dict:
    """The fixed orders on test (seed-independent), overall and per activity group: one
    evaluation shaped like evaluate_run's, with a ranker per order of fixed_rankings."""
    from training.evaluate import (
        GROUPS,
        activity_groups,
        click_model,
        cold_candidates,
        cold_evaluation,
        compared_per_list,
        fixed_rankings,
        list_metrics,
        load_lists,
        summarise,
    )

    data = load_lists(data_dir, "test", schema, max_list)
    perms = fixed_rankings(data)
    metrics = list_metrics(perms, data, click_model(data_dir))
    groups, bounds = activity_groups(data_dir, "test", data)
    out = {
        "overall": summarise(metrics, slice(None)),
        "groups": {g: summarise(metrics, groups == i) for i, g in enumerate(GROUPS) if (groups == i).any()},
        "per_list": compared_per_list(metrics),
        "list_groups": [GROUPS[i] for i in groups],
        "activity": bounds,
    }
    cold = cold_candidates(data, schema)
    if cold is not None:
        summary, per_list = cold_evaluation(perms, data, cold, metrics)
        out["cold"] = {**summary, "per_list": per_list, "list_cold": cold.any(1).tolist()}
    return out


def simulator_references(data_dir: Path, schema: Any, max_list: int) -> dict[str, dict[str, float]] | None:
    """{order: {"utility", "context"}}: expected clicks on test, and their list-context part, of two
    orders that know the simulator's truth, or None for real data: the attraction sort (every item's
    true appeal, no list context) and the greedy oracle (with the item-to-item effects). What lies
    between them is what only list context can earn."""
    from training.evaluate import click_model, load_lists
    from training.metrics import ranking_from_scores

    model = click_model(data_dir)
    if model is None:
        return None
    data = load_lists(data_dir, "test", schema, max_list)
    attraction = ranking_from_scores(data.extras["attraction"], data.inputs["cand_mask"])
    orders = {"attraction sort": attraction, "greedy oracle": model.greedy_permutation(data)}
    return {
        name: {
            "utility": float(np.mean(model.expected_utility(data, perm))),
            "context": float(np.mean(model.context_clicks(data, perm))),
        }
        for name, perm in orders.items()
    }


def paired_differences(per_list: dict[str, dict[str, np.ndarray]], pairs: list[tuple[str, str]]) -> dict:
    """{"a - b": {metric: {diff, low, high}}}: mean(a - b) over the same test lists and its paired
    bootstrap 95% interval. Each model's per-list values are its seeds' mean, so the interval is over
    lists (the seeds' spread is the ± of the main table)."""
    from training.metrics import paired_bootstrap

    out: dict[str, dict[str, dict[str, float]]] = {}
    for a, b in pairs:
        for metric in (m for m in per_list[a] if m in per_list[b]):
            diff = per_list[a][metric] - per_list[b][metric]
            low, high = paired_bootstrap(diff)
            out.setdefault(f"{a} - {b}", {})[metric] = {"diff": float(diff.mean()), "low": low, "high": high}
    return out


def upn_by_group(per_list: dict[str, dict[str, np.ndarray]], list_groups: list[str]) -> dict:
    """{group: {"lists", metric: {diff, low, high}}}: PSAD-S minus PSAD-S without UPN on each
    activity group's test lists (and "all"), with paired bootstrap 95% intervals: where the history
    pays."""
    from training.evaluate import GROUPS

    groups = np.asarray(list_groups)
    out: dict[str, dict[str, Any]] = {}
    for group in ["all", *(g for g in GROUPS if g in list_groups)]:
        rows = np.ones(len(groups), bool) if group == "all" else groups == group
        sliced = {m: {k: v[rows] for k, v in per_list[m].items()} for m in ("psad-s", "no-upn")}
        out[group] = {"lists": int(rows.sum()), **paired_differences(sliced, [("psad-s", "no-upn")])["psad-s - no-upn"]}
    return out


def seed_means(evaluations: list[dict], ranker: str) -> dict[str, np.ndarray]:
    """Per COMPARED metric, each test list's value averaged over the seeds' evaluations."""
    names = evaluations[0]["per_list"][ranker]
    return {n: np.mean([np.asarray(e["per_list"][ranker][n]) for e in evaluations], axis=0) for n in names}


def timed_ranker(run_dir: Path, ranker: str, data_dir: Path, length: int, history: int) -> tuple[Callable, int]:
    """What one list costs to rank, as a call on a batch of 1 (the teacher's decoding, or the served
    module on the inputs a bundle serves), and its decoding steps."""
    import torch

    from export.contract.fixtures import BatchMaker
    from training.checkpoint import load_run
    from training.evaluate import load_lists, to_tensors
    from training.models.reranker import served_inputs

    model, config, schema = load_run(run_dir, ranker)
    lists = load_lists(data_dir, "test", schema, config.max_list)
    inputs = to_tensors(BatchMaker(schema, lists.inputs).make(1, length, history, pad_last=False), torch.device("cpu"))
    if ranker == "teacher":
        return (lambda: model.teacher_decode(inputs)), model.decode_steps(length)
    scorer, served = model.serving_module().eval(), served_inputs(model, inputs)
    return (lambda: scorer(*served)), 1


def median_ms(calls: list[Callable], repeats: int = LATENCY_REPEATS) -> list[float]:
    """Median ms per call of each of `calls` on ONE CPU thread, inference_mode, measured in
    alternation (round k times every call once), so that a slower spell of the machine hits all alike."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: list[list[float]] = [[] for _ in calls]
    try:
        with torch.inference_mode():
            for call in calls * 5:
                call()
            for _ in range(repeats):
                for call, spent in zip(calls, times, strict=True):
                    start = time.perf_counter()
                    call()
                    spent.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return [1000.0 * statistics.median(t) for t in times]


def measure_latency(run_dir: Path, ranker: str, data_dir: Path, length: int, history: int) -> tuple[float, int]:
    """Median ms per list on ONE CPU thread, eager PyTorch, inference_mode, batch 1; and decoding steps."""
    call, steps = timed_ranker(run_dir, ranker, data_dir, length, history)
    return median_ms([call])[0], steps


def cold_summary(cold: dict[str, list[dict]], per_list: dict[str, dict[str, np.ndarray]]) -> dict | None:
    """The cold-item section: every model's metrics on the lists holding a cold item and on the cold
    items' ranks (mean and std over seeds), and sid minus id paired on all lists, those lists and those
    ranks. cold: model -> its seeds' evaluation["cold"] (absent: the data set has no cold items)."""
    if not cold:
        return None
    first = next(iter(cold.values()))[0]
    rows = np.asarray(first["list_cold"], dtype=bool)
    models = {}
    ranks: dict[str, dict[str, np.ndarray]] = {}
    for name, evaluations in cold.items():
        ranker = SPECS[name].ranker
        models[name] = {
            part: {m: _mean_std([e[part][ranker][m] for e in evaluations]) for m in ("ndcg@10", "mrr")}
            for part in ("cold_lists", "cold_items")
        }
        ranks[name] = seed_means([{"per_list": e["per_list"]} for e in evaluations], ranker)
    paired = {}
    a, b = SID_PAIR
    if a in cold and b in cold:
        on_lists = {m: {k: v[rows] for k, v in per_list[m].items() if k in ("ndcg@10", "mrr")} for m in SID_PAIR}
        paired = {
            "all lists": paired_differences(per_list, [SID_PAIR])[f"{a} - {b}"],
            "lists with cold items": paired_differences(on_lists, [SID_PAIR])[f"{a} - {b}"],
            "cold items' ranks": paired_differences(ranks, [SID_PAIR])[f"{a} - {b}"],
        }
    counts = {k: first[k] for k in ("lists", "lists_with_cold_clicks", "candidate_share")}
    return {**counts, "models": models, "paired": paired}


def sid_comparison(setup: Setup) -> dict | None:
    """Served item state of both encoders (from the bundle format), and the latency at
    SID_LATENCY_SHAPE of what `psad export` writes for each (the fused serving module, export/fusion.py;
    seed 0), in PyTorch eager on the same test lists, items as each bundle serves them, in alternation.
    The ONNX Runtime figures of the same graphs: `psad bench model --versus` (docs/benchmarks.md)."""
    import torch

    from export.contract.bundle import ItemEncoder, served_item_bytes
    from export.contract.fixtures import BatchMaker
    from export.fusion import fused_serving_module
    from training.checkpoint import load_run
    from training.evaluate import load_lists, to_tensors
    from training.models.reranker import served_inputs

    if not set(SID_PAIR) <= set(setup.models):
        return None
    length, history = SID_LATENCY_SHAPE
    lists = load_lists(setup.data_dir, "test", setup.schema, setup.base.max_list)
    inputs = to_tensors(
        BatchMaker(setup.schema, lists.inputs).make(1, length, history, pad_last=False), torch.device("cpu")
    )
    calls, state = [], {}
    for name in SID_PAIR:
        model, config, _ = load_run(setup.run_dir(setup.plan.spec_run[name], 0))
        calls.append(partial(fused_serving_module(model).eval(), *served_inputs(model, inputs)))
        m = config.model
        encoder = ItemEncoder(m.item_encoder, m.d_model, m.sid_levels, m.sid_codebook_size)
        state[name] = catalogue_state(served_item_bytes(encoder))
    latency = dict(zip(SID_PAIR, median_ms(calls, repeats=4 * LATENCY_REPEATS), strict=True))
    return {"state": state, "latency_ms": latency, "shape": {"candidates": length, "behaviours": history}}


def catalogue_state(sizes: dict[str, int]) -> dict[str, int]:
    """served_item_bytes plus what a CATALOGUE-item catalogue takes: in the bundle, and in the service."""
    return {
        **sizes,
        "catalogue": CATALOGUE * sizes["per_item"] + sizes["fixed"],
        "catalogue_memory": CATALOGUE * sizes["runtime_per_item"] + sizes["runtime_fixed"],
    }


@dataclass
class Setup:
    """One data set's experiment, checked before anything trains."""

    data_dir: Path
    out: Path
    seeds: int
    models: list[str]
    base: Any  # the TrainConfig every run starts from
    schema: Any
    length: int
    plan: Plan
    jobs: dict[tuple[str, int], Any]  # (run, seed) -> TrainConfig
    budget: tuple[float, str] | None  # (wall-time budget in s, where it comes from), or no time target

    def run_dir(self, run: str, seed: int) -> Path:
        return self.out / "runs" / run / f"seed{seed}"


def prepare(
    data_dir: Path,
    out: Path,
    *,
    seeds: int = 3,
    models: list[str] | None = None,
    base_config: Any = None,
    epochs: int | None = None,
    time_budget_s: float | None = None,
) -> Setup:
    """Validate the arguments and the data set, plan the runs, and refuse finished runs that are not
    this experiment's. time_budget_s: None = the data set's TIME_BUDGETS entry, if any."""
    from training.checkpoint import predates_per_model_checkpoints, read_meta
    from training.config import TrainConfig
    from training.data.store import check_schema_files, load_schema
    from training.train import RESULT_NEUTRAL, changed_settings

    data_dir, out = Path(data_dir), Path(out)
    if seeds < 1:
        raise ExperimentError(f"--seeds must be >= 1, got {seeds}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ExperimentError(f"--time-budget-min must be > 0, got {time_budget_s / 60:g}")
    unknown = [m for m in models or [] if m not in SPECS]
    if unknown:
        raise ExperimentError(f"--models: unknown {unknown}; choose from {', '.join(SPECS)}")
    check_schema_files(data_dir)
    schema = load_schema(data_dir)
    needs_content = [m for m in SPECS if SPECS[m].model.get("item_encoder") == "sid"]
    if not schema.item_content:
        if models and set(models) & set(needs_content):
            raise ExperimentError(
                f"--models: {sorted(set(models) & set(needs_content))} assign item codes from content, and "
                f"{data_dir} declares none (schema.item_content): leave them out, or rebuild the data set with "
                "content features (docs/data.md)"
            )
        models = models or [m for m in SPECS if m not in needs_content]
    models = models or list(SPECS)
    base = TrainConfig.from_dict((base_config or TrainConfig()).to_dict())  # a copy: the caller's stays as is
    if epochs is not None:
        base.epochs = epochs
    base.validate()
    length = min(base.max_list, schema.max_list) if base.max_list else schema.max_list
    plan = make_plan(models, length, base.model.distill)
    jobs = {(run, seed): run_config(base, plan.runs[run], seed) for run in plan.runs for seed in range(seeds)}
    budget = TIME_BUDGETS.get(data_dir.name) if time_budget_s is None else (time_budget_s, "--time-budget-min")
    setup = Setup(data_dir, out, seeds, models, base, schema, length, plan, jobs, budget)

    fix = f"Write to a new --out, or delete {out / 'runs'} to retrain every run."
    for job, config in jobs.items():  # before training anything: no half-replaced experiment
        run_dir = setup.run_dir(*job)
        state = run_dir / "state.safetensors"
        if state.is_file() and predates_per_model_checkpoints(read_meta(state)):
            raise ExperimentError(
                f"{run_dir} was trained by an earlier version of `psad train` (one checkpoint for student and "
                f"teacher): its result would not be this experiment's. {fix}"
            )
        finished = (run_dir / "result.json").is_file()
        stale = changed_settings(run_dir, config, data_dir, RESULT_NEUTRAL) if finished else []
        if stale:
            raise ExperimentError(
                f"{run_dir} is a finished run with other settings {stale}: its result would not be this "
                f"experiment's. {fix}"
            )
    return setup


def execute(setup: Setup, progress: bool = True, on_run_done: Callable[[str, int], None] | None = None) -> dict:
    """Train every run x seed not finished yet, evaluate, and write results.{json,md} + the plot."""
    from tqdm import tqdm

    from training.evaluate import evaluate_run

    started = time.perf_counter()
    fixed = fixed_metrics(setup.data_dir, setup.schema, setup.base.max_list)
    current = evaluated_metrics(fixed)
    trained, reevaluated, results = [], [], {}
    bar = tqdm(setup.jobs.items(), desc=f"{setup.data_dir.name} runs", disable=not progress)
    for (run, seed), config in bar:
        bar.set_postfix_str(f"{run} seed {seed}")
        run_dir = setup.run_dir(run, seed)
        if (run_dir / "result.json").is_file():
            result = json.loads((run_dir / "result.json").read_text())
            if outdated(result["evaluation"], current):
                evaluation = evaluate_run(run_dir, "test", setup.data_dir, per_list=True)
                result = save_result(run_dir, {**result, "evaluation": evaluation})
                reevaluated.append(f"{run}/seed{seed}")
            results[run, seed] = result
            continue
        results[run, seed] = train_and_evaluate(setup.data_dir, config, run_dir, progress)
        trained.append(f"{run}/seed{seed}")
        if on_run_done is not None:
            on_run_done(run, seed)
    bar.close()

    summary: dict[str, Any] = {}
    per_list: dict[str, dict[str, np.ndarray]] = {}
    cold: dict[str, list[dict]] = {}
    for name in tqdm(setup.models, desc="latency", disable=not progress):
        spec, run = SPECS[name], setup.plan.spec_run[name]
        if run is None:
            evaluations = [fixed] * setup.seeds
            latency, steps = 0.0, 0
        else:
            evaluations = [results[run, s]["evaluation"] for s in range(setup.seeds)]
            latency, steps = measure_latency(
                setup.run_dir(run, 0), spec.ranker, setup.data_dir, setup.length, setup.schema.max_history
            )
        summary[name] = aggregate(spec, run, evaluations, latency, steps)
        per_list[name] = seed_means(evaluations, spec.ranker)
        if "cold" in evaluations[0]:
            cold[name] = [e["cold"] for e in evaluations]
    others = [m for m in setup.models if m != "initial"]
    pairs = [(m, "initial") for m in others if "initial" in per_list]
    pairs += [("psad-s", m) for m in setup.models if m not in ("psad-s", "initial") and "psad-s" in per_list]
    pairs += [("psad-g", m) for m in BASELINE_NAMES if m in per_list and "psad-g" in per_list]
    wall = time.perf_counter() - started
    report = {
        "dataset": setup.data_dir.name,
        "data_dir": str(setup.data_dir.resolve()),
        "split": "test",
        "seeds": list(range(setup.seeds)),
        "list_length": setup.length,
        "history_length": setup.schema.max_history,
        "latency": "median ms per list, 1 CPU thread, PyTorch eager (students: the served module), inference_mode, "
        "batch 1",
        "base_config": setup.base.to_dict(),
        "runs": dict(setup.plan.runs),
        "trained_this_session": trained,
        "reevaluated_this_session": reevaluated,
        "wall_seconds": wall,
        "train_seconds_total": sum(r["train_seconds"] for r in results.values()),
        "models": summary,
        "paired": paired_differences(per_list, pairs),
        "simulator_references": simulator_references(setup.data_dir, setup.schema, setup.base.max_list),
        "activity": fixed["activity"],
        "upn_by_group": upn_by_group(per_list, fixed["list_groups"]) if {"psad-s", "no-upn"} <= set(per_list) else None,
        "cold": cold_summary(cold, per_list),
        "sid": sid_comparison(setup),
    }
    report["targets"] = targets(summary, wall, resumed=len(trained) < len(setup.jobs), budget=setup.budget)
    report["targets"] += sid_targets(report["cold"], report["sid"], summary)
    write_reports(report, setup.out)
    return report


def run_experiment(
    data_dir: Path,
    out: Path,
    *,
    progress: bool = True,
    on_run_done: Callable[[str, int], None] | None = None,
    **options: Any,
) -> dict:
    """One data set's experiment into `out`; options: those of prepare (seeds, models, base_config, ...).

    on_run_done is called after each (run, seed) that trained in this session (tests use it to
    simulate a kill).
    """
    return execute(prepare(data_dir, out, **options), progress, on_run_done)


def report_dirs(data_dirs: list[Path], out: Path | None) -> list[Path]:
    """One report directory per data set: --out itself for one data set (default reports/<name>),
    --out/<name> for several (default reports/<name>)."""
    if len(data_dirs) == 1:
        return [out or Path("reports") / Path(data_dirs[0]).name]
    names = [Path(d).name for d in data_dirs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ExperimentError(
            f"--data: several data sets named {repeated}; each report goes to --out/<data dir name>: "
            "pass each data set once, or run them as separate commands with their own --out"
        )
    return [(out or Path("reports")) / name for name in names]


def run_experiments(
    data_dirs: list[Path], out: Path | None, progress: bool = True, **options: Any
) -> list[tuple[Path, dict]]:
    """(report directory, report) per data set (report_dirs); every data set is checked before any trains.
    options: those of prepare."""
    setups = [prepare(d, o, **options) for d, o in zip(data_dirs, report_dirs(data_dirs, out), strict=True)]
    return [(setup.out, execute(setup, progress)) for setup in setups]


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


def targets(models: dict[str, dict], wall: float, resumed: bool, budget: tuple[float, str] | None) -> list[dict]:
    """The project's targets, each passed / missed / n/a (a model it needs was not run); the wall
    time of the whole experiment only against a budget set for this data set (or passed)."""

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

    quality = [
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
    ]
    if budget is None:
        return quality
    seconds, origin = budget
    return [
        *quality,
        {
            "target": f"whole experiment under {seconds / 60:g} min ({origin})",
            "passed": None if resumed else wall < seconds,
            "detail": f"{wall / 60:.1f} min" + (" (resumed session: not the whole experiment)" if resumed else ""),
        },
    ]


def sid_targets(cold: dict | None, sid: dict | None, models: dict[str, dict]) -> list[dict]:
    """The item-encoder targets (sid against id), where the experiment ran both."""
    a, b = SID_PAIR
    if sid is None:
        return []
    out = []
    if cold and cold["paired"]:
        diff = cold["paired"]["lists with cold items"][TARGET_METRIC]
        out.append(
            {
                "target": f"lists with cold items: {a} above {b} ({TARGET_METRIC}, paired 95% interval excluding 0)",
                "passed": diff["low"] > 0,
                "detail": f"{diff['diff']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}] on {cold['lists']:,} lists",
            }
        )
    ndcg = {n: models[n]["metrics"][TARGET_METRIC]["mean"] for n in SID_PAIR}
    out.append(
        {
            "target": f"all lists: {a} within 1% (relative {TARGET_METRIC}) of {b}",
            "passed": ndcg[a] >= 0.99 * ndcg[b],
            "detail": f"{ndcg[a]:.4f} vs {ndcg[b]:.4f} ({ndcg[a] / ndcg[b] - 1:+.2%})",
        }
    )
    state = {n: sid["state"][n]["catalogue"] for n in SID_PAIR}
    out.append(
        {
            "target": f"served item state for a {CATALOGUE:,}-item catalogue: {a} at most a tenth of {b}",
            "passed": state[a] <= state[b] / 10,
            "detail": f"{state[a] / 1e6:.1f} MB vs {state[b] / 1e6:.1f} MB ({state[a] / state[b]:.3f}x)",
        }
    )
    ms, shape = sid["latency_ms"], sid["shape"]
    out.append(
        {
            "target": f"student latency at {shape['candidates']} candidates, {shape['behaviours']} behaviours: "
            f"{a} within 10% of {b}",
            "passed": ms[a] <= 1.1 * ms[b],
            "detail": f"{ms[a]:.3f} vs {ms[b]:.3f} ms ({ms[a] / ms[b]:.2f}x; fused serving modules, PyTorch eager, "
            "alternated, 1 thread)",
        }
    )
    return out


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
    lines += references_markdown(report)
    lines += paired_markdown(report)
    lines += cold_markdown(report)
    lines += ["", "## Targets", "", "| target | result | detail |", "|---|---|---|"]
    for t in report["targets"]:
        result = {True: "pass", False: "MISS", None: "n/a"}[t["passed"]]
        lines.append(f"| {t['target']} | {result} | {t['detail']} |")
    focus = [n for n in ("psad-s", "no-upn", "psad-g", best_baseline(models)) if n in models]
    focus += [n for n in models if SPECS[n].fixed]
    if focus:
        lines += [
            "",
            "## By user-activity group (PSAD-S, without UPN, PSAD-G, best trained baseline, fixed orders)",
            "",
            activity_note(report),
            "",
            "| model | group | " + " | ".join(metrics) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(metrics))
        for name in dict.fromkeys(focus):
            for group, values in models[name]["groups"].items():
                lines.append(f"| {name} | {group} | " + " | ".join(cell(values[k]) for k in metrics) + " |")
    lines += upn_markdown(report)
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


def cold_markdown(report: dict) -> list[str]:
    """Cold items (first seen after training): each model on all lists, the lists holding one and
    the cold items' ranks; sid minus id paired; the served item state and latency of both encoders."""
    cold, sid, lines = report.get("cold"), report.get("sid"), []
    if cold:
        lines += [
            "",
            "## Cold items (first seen after the training period)",
            "",
            f"{cold['lists']:,} test lists hold a cold candidate ({cold['candidate_share']:.1%} of candidates); a "
            f"cold item was clicked in {cold['lists_with_cold_clicks']:,}. Cold items' ranks: NDCG@10 and MRR with "
            "only the cold items' labels kept, on those lists.",
            "",
            "| model | all NDCG@10 | all MRR | cold lists NDCG@10 | cold lists MRR | cold items NDCG@10 "
            "| cold items MRR |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, m in cold["models"].items():
            overall = report["models"][name]["metrics"]
            cells = [cell(overall["ndcg@10"]), cell(overall["mrr"])]
            cells += [cell(m[part][k]) for part in ("cold_lists", "cold_items") for k in ("ndcg@10", "mrr")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if cold["paired"]:
            a, b = SID_PAIR
            lines += ["", f"{a} minus {b}, paired 95% intervals:", "", "| on | NDCG@10 | MRR |", "|---|---|---|"]
            for on, diffs in cold["paired"].items():
                text = [
                    f"{diffs[k]['diff']:+.4f} [{diffs[k]['low']:+.4f}, {diffs[k]['high']:+.4f}]"
                    for k in ("ndcg@10", "mrr")
                ]
                lines.append(f"| {on} | " + " | ".join(text) + " |")
    if sid:
        shape = sid["shape"]
        lines += [
            "",
            "## Item encoders: served state and latency",
            "",
            f"Served item state from the bundle format (docs/export.md), for a {CATALOGUE:,}-item catalogue; latency: "
            f"the served graphs (the fused serving modules `psad export` writes, in PyTorch eager; ONNX Runtime: "
            f"`psad bench model --versus`, docs/benchmarks.md) at {shape['candidates']} candidates and "
            f"{shape['behaviours']} behaviours, batch 1, 1 thread, measured in alternation in this run.",
            "",
            "| model | bundle bytes/item | fixed bytes | bundle, 10M items | service memory, 10M items | ms/list |",
            "|---|---|---|---|---|---|",
        ]
        for name, st in sid["state"].items():
            lines.append(
                f"| {name} | {st['per_item']} | {st['fixed']:,} | {st['catalogue'] / 1e6:,.1f} MB | "
                f"{st['catalogue_memory'] / 1e6:,.1f} MB | {sid['latency_ms'][name]:.3f} |"
            )
    return lines


def activity_note(report: dict) -> str:
    bounds = report["activity"]
    return (
        f"Activity: the user's behaviours before the list; light <= {bounds['light_max']:g} < medium <= "
        f"{bounds['medium_max']:g} < heavy (terciles over the training lists)."
    )


def upn_markdown(report: dict) -> list[str]:
    """Where the history pays: PSAD-S minus PSAD-S without UPN, per activity group."""
    by_group = report.get("upn_by_group")
    if not by_group:
        return []
    metrics = [m for m in next(iter(by_group.values())) if m != "lists"]
    lines = [
        "",
        "## Where UPN helps (PSAD-S minus PSAD-S without UPN, paired 95% intervals)",
        "",
        "| group | lists | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for group, row in by_group.items():
        cells = [f"{row[m]['diff']:+.4f} [{row[m]['low']:+.4f}, {row[m]['high']:+.4f}]" for m in metrics]
        lines.append(f"| {group} | {row['lists']:,} | " + " | ".join(cells) + " |")
    return lines


def references_markdown(report: dict) -> list[str]:
    """Simulated data: each model's expected clicks as a share of the gap from the attraction sort to
    the greedy oracle (0 = no list context used, 1 = the oracle's)."""
    refs = report.get("simulator_references")
    if not refs:
        return []
    low, high = refs["attraction sort"]["utility"], refs["greedy oracle"]["utility"]
    lines = [
        "",
        "## Against the simulator's references",
        "",
        f"Orders that know the truth, expected clicks on test: attraction sort {low:.4f}, greedy oracle {high:.4f}. "
        "Share of the gap = (model - attraction sort) / (greedy oracle - attraction sort). List context = the "
        "expected clicks an order earns from what its items are shown next to (ClickModel.context_clicks; "
        "negative: redundant neighbours).",
        "",
        "| order | expected clicks | share of the gap | list context |",
        "|---|---|---|---|",
    ]
    rows = [(name, r["utility"], r["context"]) for name, r in refs.items()]
    rows += [(n, m["metrics"]["utility"]["mean"], m["metrics"]["context"]["mean"]) for n, m in report["models"].items()]
    for name, utility, context in rows:
        lines.append(f"| {name} | {utility:.4f} | {(utility - low) / (high - low):+.1%} | {context:+.4f} |")
    return lines


def paired_markdown(report: dict) -> list[str]:
    """The gains over the initial order, then PSAD-S against every other model, with paired intervals."""
    paired = report.get("paired", {})
    metrics = list(dict.fromkeys(m for diffs in paired.values() for m in diffs))
    note = (
        "Mean difference over the same test lists of each model's seed-averaged per-list metric, and its paired "
        "bootstrap 95% interval over lists (training.metrics.paired_bootstrap): a difference is real only when its "
        "interval excludes 0."
    )
    sections = (
        ("## Gain over the initial order (paired 95% intervals)", [k for k in paired if k.endswith(" - initial")]),
        (
            "## PSAD-S against every other model (paired 95% intervals; against the initial order: above)",
            [k for k in paired if k.startswith("psad-s - ") and k != "psad-s - initial"],
        ),
        (
            "## PSAD-G against the trained baselines (paired 95% intervals)",
            [k for k in paired if k.startswith("psad-g - ") and k != "psad-g - initial"],
        ),
    )
    lines: list[str] = []
    for title, keys in sections:
        if not keys:
            continue
        lines += ["", title, "", *([note, ""] if not lines else []), "| difference | " + " | ".join(metrics) + " |"]
        lines.append("|---|" + "---|" * len(metrics))
        for key in keys:
            cells = [paired[key].get(m) for m in metrics]
            text = [f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]" if c else "" for c in cells]
            lines.append(f"| {key} | " + " | ".join(text) + " |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    untimed = itertools.cycle(("--", ":", "-."))  # one line style per fixed order
    for name, m in report["models"].items():
        stat = m["metrics"][TARGET_METRIC]
        if m["latency_ms"] <= 0:
            ax.axhline(stat["mean"], color="grey", linestyle=next(untimed), linewidth=1, label=name)
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
    data: list[Path] = typer.Option(
        ..., "--data", help="Data set directory built by `psad data build`; repeat --data for several data sets."
    ),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per model (mean ± std reported)."),
    models: str = typer.Option(None, "--models", help=f"Comma-separated subset of: {','.join(SPECS)} (default all)."),
    config: Path = typer.Option(Path("configs/psad.toml"), "--config", help="Base TOML config (docs/training.md)."),
    out: Path = typer.Option(
        None,
        "--out",
        help="Report directory (default reports/<data dir name>); with several --data, one per data set: "
        "--out/<data dir name> (default reports/<data dir name>).",
    ),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Override train.epochs for every run."),
    time_budget_min: float = typer.Option(
        None,
        "--time-budget-min",
        help="Wall-time target of each data set's whole experiment, in minutes (default: only ml100k's, 30).",
    ),
) -> None:
    """Train and evaluate every reranker on the same splits; write results.md/.json and a plot per data set."""
    from export.contract.errors import fail
    from export.contract.schema import SchemaError
    from training.checkpoint import RunError
    from training.config import ConfigError, TrainConfig
    from training.data.store import DataError

    try:
        reports = run_experiments(
            data,
            out,
            seeds=seeds,
            models=parse_models(models),
            base_config=TrainConfig.load(config),
            epochs=epochs,
            time_budget_s=None if time_budget_min is None else 60 * time_budget_min,
        )
    except (ExperimentError, ConfigError, DataError, SchemaError, RunError) as exc:
        raise fail(exc) from None
    for target, report in reports:
        typer.echo((target / "results.md").read_text())
        typer.echo(f"{report['dataset']}: wall time {report['wall_seconds'] / 60:.1f} min; reports in {target}")
