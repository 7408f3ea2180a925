"""`psad compare`: is ranker A better than ranker B on the same lists, or is the difference noise?

`psad evaluate` gives each model's gain over the initial order, but two gains whose intervals
overlap can still differ, list by list, by more than chance (and the reverse). This ranks one
split with both rankers and reports, per metric, mean(A), mean(B), mean(A - B) and the paired
bootstrap 95% interval of that difference (training.metrics.paired_bootstrap): both rankers are
always scored on the same lists.

A ranker is a run's student (what serves), its teacher (generators), or a fixed order evaluated
on the run's data set: "initial" (the ranking stage's order) or "history" (the user's items
first), from training.evaluate.fixed_rankings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from training.metrics import FIXED_RANKERS, verdict

RANKERS = ("student", "teacher", *FIXED_RANKERS)


class CompareError(ValueError):
    """Two rankers that cannot be compared list by list; the message names the runs and the fix."""


def comparison_data(run_a: Path, run_b: Path, data_dir: Path | None) -> Path:
    """The data set both sides are evaluated on: --data, else the one both runs were trained on."""
    from training.checkpoint import read_config

    if data_dir is not None:
        return Path(data_dir)
    trained_a, trained_b = (read_config(run)[1].resolve() for run in (run_a, run_b))
    if trained_a != trained_b:
        raise CompareError(
            f"{run_a} was trained on {trained_a} but {run_b} on {trained_b}: a paired comparison needs the same "
            "lists. Compare runs of one data set, or pass --data to evaluate both on a data set they share."
        )
    return trained_a


def rank_side(run: Path, ranker: str, data_dir: Path, split: str) -> tuple[Any, Any]:
    """(ListData, permutations [N, L]) of one side: the run's model, or a fixed order on its lists."""
    import torch

    from training.checkpoint import check_data_matches_run, load_run
    from training.evaluate import load_lists, rank_lists

    model, config, schema = load_run(run, "student" if ranker in FIXED_RANKERS else ranker)
    fix = "compare runs of one data set, or pass --data with the data set they were trained on"
    check_data_matches_run(data_dir, run, schema, fix)
    data = load_lists(data_dir, split, schema, config.max_list)
    if len(data) == 0:
        raise CompareError(f"{data_dir}/{split}.parquet has no lists to compare on")
    trained = () if ranker in FIXED_RANKERS else (ranker,)  # rank_lists gives the fixed orders anyway
    return data, rank_lists(model, data, torch.device("cpu"), config.eval_batch_size, trained)[ranker]


def compare_runs(
    run_a: Path,
    run_b: Path,
    split: str = "test",
    ranker_a: str = "student",
    ranker_b: str = "student",
    data_dir: Path | None = None,
) -> dict:
    """Per metric: the means of A and B on `split`, mean(A - B) and its paired bootstrap 95% interval."""
    from training.data.store import check_schema_files
    from training.evaluate import click_model, list_metrics
    from training.metrics import paired_bootstrap

    run_a, run_b = Path(run_a), Path(run_b)
    if (run_a.resolve(), ranker_a) == (run_b.resolve(), ranker_b):
        raise CompareError(f"A and B are both the {ranker_a} of {run_a}: pass another RUN_B or --ranker-b")
    data_dir = comparison_data(run_a, run_b, data_dir)
    check_schema_files(data_dir)
    data, perm_a = rank_side(run_a, ranker_a, data_dir, split)
    data_b, perm_b = rank_side(run_b, ranker_b, data_dir, split)
    if data_b.labels.shape != data.labels.shape:
        raise CompareError(
            f"{run_a} ranks {data.labels.shape[1]} candidates per list but {run_b} {data_b.labels.shape[1]} "
            "(train.max_list differs): their metrics are not over the same lists"
        )
    metrics = list_metrics({"a": perm_a, "b": perm_b}, data, click_model(data_dir))
    rows = {}
    for name, a in metrics["a"].items():
        b = metrics["b"][name]
        low, high = paired_bootstrap(a - b)
        diff = float((a - b).mean())
        rows[name] = {"a": float(a.mean()), "b": float(b.mean()), "diff": diff, "low": low, "high": high}
    return {
        "data_dir": str(data_dir.resolve()),
        "split": split,
        "lists": len(data),
        "a": {"run": str(run_a.resolve()), "ranker": ranker_a},
        "b": {"run": str(run_b.resolve()), "ranker": ranker_b},
        "metrics": rows,
    }


def format_comparison(result: dict) -> str:
    """One row per metric: A, B, A - B, the paired 95% interval and what it says."""
    header = f"{'metric':<10} {'A':>9} {'B':>9} {'A - B':>9}  {'95% interval':<20}  verdict"
    lines = [
        f"{result['split']} split of {result['data_dir']}: {result['lists']:,} lists, paired bootstrap 95% interval",
        *(f"{side} = {result[side.lower()]['ranker']} of {result[side.lower()]['run']}" for side in ("A", "B")),
        header,
        "-" * len(header),
    ]
    for name, m in result["metrics"].items():
        interval = f"[{m['low']:+.4f}, {m['high']:+.4f}]"
        cells = f"{m['a']:>9.4f} {m['b']:>9.4f} {m['diff']:>+9.4f}"
        lines.append(f"{name:<10} {cells}  {interval:<20}  A {verdict(m['low'], m['high'], 'B')}")
    return "\n".join(lines)


def compare_command(
    run_a: Path = typer.Argument(..., help="Run directory written by `psad train` (side A)."),
    run_b: Path = typer.Argument(None, help="Run directory of side B (default: RUN_A, to compare its rankers)."),
    split: str = typer.Option("test", "--split", help="One of train|val|test."),
    ranker_a: str = typer.Option("student", "--ranker-a", help=f"A's ranker: one of {'|'.join(RANKERS)}."),
    ranker_b: str = typer.Option("student", "--ranker-b", help=f"B's ranker: one of {'|'.join(RANKERS)}."),
    data: Path = typer.Option(None, "--data", help="Data set directory (default: the one both runs trained on)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the comparison as JSON to this path."),
) -> None:
    """Two rankers on the same lists: per metric, the mean difference A - B and its paired 95% interval."""
    from export.contract.errors import fail
    from export.contract.schema import SchemaError
    from training.checkpoint import RunError
    from training.data.store import SPLITS, DataError

    choices_of = {"--split": (split, SPLITS), "--ranker-a": (ranker_a, RANKERS), "--ranker-b": (ranker_b, RANKERS)}
    for flag, (value, choices) in choices_of.items():
        if value not in choices:
            raise typer.BadParameter(f"must be one of {list(choices)}, got {value!r}", param_hint=flag)
    try:
        result = compare_runs(run_a, run_b or run_a, split, ranker_a, ranker_b, data)
    except (CompareError, DataError, SchemaError, RunError) as exc:
        raise fail(exc) from None
    typer.echo(format_comparison(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        typer.echo(f"comparison written to {json_path}")
