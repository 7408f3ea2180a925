"""Offline evaluation of a run: the student, the teacher and the fixed orders on one split.

Rows ("rankers"):
  initial  the ranking stage's order (identity permutation): the baseline to beat;
  history  the candidates in the user's history first, most recent first, then the initial order
           (metrics.history_first): what a reranker that reads the history must beat;
  student  sort by rank_scores (what serving runs), with the run's student weights;
  teacher  teacher_decode (generators only; kept offline for shadow evaluation), with the run's
           teacher weights (each model is evaluated at its own best validation epoch).
Metrics: NDCG@{1,3,5,10}, MAP@{5,10}, CLICKS@{5,10}, MRR (training/metrics.py), plus, when the data
set is synthetic, the expected utility under the click simulator and its list-context part
(`context`: ClickModel.context_clicks).

Versus the initial order: each ranker's mean gain in NDCG@10, MRR (and utility) over the initial
order on the same lists, with a paired bootstrap 95% interval. On a small split (ml100k's 99 test
lists) the interval is wider than the gains, and says so: a gain whose interval spans 0 is noise.

Cold items (a data set with schema.known_items: catalogue items first seen after the training
period): the metrics again on the lists that hold a cold candidate, and on the cold items' ranks
(NDCG@10 and MRR with only the cold items' labels kept, over the lists where a cold item was clicked).

User-activity groups: a list's activity is the number of behaviours its user logged strictly
before it (behaviours.parquet; the history its features are cut from, before the cut to
max_history). On MovieLens that is the user's ratings so far; on trivago, the session's (and
earlier sessions') item actions. The terciles of that count over the train split's lists give the
boundaries: light <= q1 < medium <= q2 < heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from export.contract.schema import FeatureSchema
from training.checkpoint import MODELS, check_data_matches_run, load_run, read_config
from training.data.store import DataError, ListData, check_schema_files, load_split, read_parquet
from training.metrics import (
    FIXED_RANKERS,
    history_first,
    paired_bootstrap,
    per_list_metrics,
    ranking_from_scores,
    verdict,
)
from training.models.registry import GENERATOR_ARCHS

GROUPS = ("light", "medium", "heavy")
# what an evaluation's groups mean: bumped when they change, so `psad experiment` re-evaluates old runs
GROUPS_VERSION = 2  # 2: the user's behaviours before the list (1: up to the end of training)
COMPARED = ("ndcg@10", "mrr", "utility")  # metrics whose gain over the initial order gets an interval


def load_lists(data_dir: Path, split: str, schema: FeatureSchema, max_list: int) -> ListData:
    """One split, its lists cut to the first max_list candidates (0 = keep all)."""
    data = load_split(data_dir, split, schema)
    if max_list <= 0 or data.labels.shape[1] <= max_list:
        return data
    cut = {k: v[:, :max_list] for k, v in data.inputs.items() if k.startswith("cand_")}
    return ListData(
        inputs={**data.inputs, **cut},
        labels=data.labels[:, :max_list],
        list_ids=data.list_ids,
        user_ids=data.user_ids,
        extras={k: v[:, :max_list] for k, v in data.extras.items()},
    )


def to_tensors(inputs: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}


def fixed_rankings(data: ListData) -> dict[str, np.ndarray]:
    """Permutations [N, L] of the rankers computed from the inputs alone (nothing trained, so
    seed-independent): "initial" (identity) and "history" (metrics.history_first)."""
    n, length = data.inputs["cand_mask"].shape
    perms = {"initial": np.tile(np.arange(length, dtype=np.int64), (n, 1)), "history": history_first(data.inputs)}
    return {name: perms[name] for name in FIXED_RANKERS}


@torch.no_grad()
def rank_lists(
    model: nn.Module, data: ListData, device: torch.device, batch_size: int, rankers: tuple[str, ...] = MODELS
) -> dict[str, np.ndarray]:
    """Permutations [N, L] per ranker: the fixed ones (initial, history), then those of `rankers`
    the model has (student, and teacher for generators)."""
    was_training = model.training
    model.eval()
    mask = data.inputs["cand_mask"]
    n, length = mask.shape
    perms = fixed_rankings(data)
    student = "student" in rankers
    teacher = "teacher" in rankers and hasattr(model, "teacher_decode")
    perms.update({r: np.empty((n, length), np.int64) for r, on in (("student", student), ("teacher", teacher)) if on})
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        batch = to_tensors({k: v[rows] for k, v in data.inputs.items()}, device)
        if student:
            perms["student"][rows] = ranking_from_scores(model.rank_scores(batch).float().cpu().numpy(), mask[rows])
        if teacher:
            perms["teacher"][rows] = model.teacher_decode(batch).cpu().numpy()
    model.train(was_training)
    return perms


def list_metrics(perms: dict[str, np.ndarray], data: ListData, utility: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-list metric arrays for every ranker; `utility` is a ClickModel or None."""
    mask = data.inputs["cand_mask"]
    out = {}
    for ranker, perm in perms.items():
        out[ranker] = per_list_metrics(perm, data.labels, mask)
        if utility is not None:
            out[ranker]["utility"] = np.asarray(utility.expected_utility(data, perm), dtype=np.float64)
            out[ranker]["context"] = np.asarray(utility.context_clicks(data, perm), dtype=np.float64)
    return out


def click_model(data_dir: Path) -> Any:
    """The simulator of a synthetic data set (simulator.json present), or None for other data sets."""
    from training.data.synthetic import ClickModel

    return ClickModel.load(data_dir) if (Path(data_dir) / "simulator.json").is_file() else None


def behaviours_before(
    data_dir: Path, split: str, list_ids: np.ndarray | None = None, behaviours: pd.DataFrame | None = None
) -> np.ndarray:
    """Per list of `split` (in list_ids order, or the file's): how many behaviours its user logged
    strictly before it, the history the list's features are cut from, uncapped. behaviours: the
    data set's behaviours (user_id, timestamp) when the caller has read them already."""
    rows = read_parquet(Path(data_dir) / f"{split}.parquet", columns=["list_id", "user_id", "timestamp"])
    lists = rows.drop_duplicates("list_id").set_index("list_id")
    if list_ids is not None:
        lists = lists.loc[list_ids]
    if behaviours is None:
        behaviours = read_parquet(Path(data_dir) / "behaviours.parquet", columns=["user_id", "timestamp"])
    # a list sorts before its user's behaviours of the same time: those are not strictly before it
    events = pd.concat(
        [lists.assign(behaviour=0).reset_index(drop=True), behaviours.assign(behaviour=1)], ignore_index=True
    ).sort_values(["user_id", "timestamp", "behaviour"], kind="stable")
    before = events["behaviour"].groupby(events["user_id"]).cumsum()
    return before[events["behaviour"] == 0].sort_index().to_numpy()


def activity_groups(data_dir: Path, split: str, data: ListData) -> tuple[np.ndarray, dict[str, float]]:
    """Group index (0 light, 1 medium, 2 heavy) per list of `split`, and the tercile boundaries."""
    behaviours = read_parquet(Path(data_dir) / "behaviours.parquet", columns=["user_id", "timestamp"])
    train = behaviours_before(data_dir, "train", behaviours=behaviours)
    q1, q2 = (float(q) for q in np.quantile(train, [1 / 3, 2 / 3]))
    activity = behaviours_before(data_dir, split, data.list_ids, behaviours)
    return np.digitize(activity, [q1, q2], right=True), {"light_max": q1, "medium_max": q2}


def cold_candidates(data: ListData, schema: FeatureSchema) -> np.ndarray | None:
    """bool [N, L]: the candidates the training period never saw, or None when the data set has no cold items."""
    if not schema.known_items:
        return None
    return data.inputs["cand_mask"] & (data.inputs["cand_items"] >= schema.n_known_items)


def cold_evaluation(
    perms: dict[str, np.ndarray], data: ListData, cold: np.ndarray, metrics: dict[str, dict[str, np.ndarray]]
) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """The cold-item summary (lists holding one, and the cold items' ranks) and, per ranker, the
    COMPARED metrics of the cold items' ranks per list where a cold item was clicked."""
    mask = data.inputs["cand_mask"]
    labels = np.where(cold, data.labels, 0.0)
    clicked = (labels > 0).any(1)
    lists = cold.any(1)
    ranks = {r: per_list_metrics(p[clicked], labels[clicked], mask[clicked]) for r, p in perms.items()}
    summary = {
        "lists": int(lists.sum()),
        "lists_with_cold_clicks": int(clicked.sum()),
        "candidate_share": float(cold.sum() / max(mask.sum(), 1)),
        "cold_lists": summarise(metrics, lists) if lists.any() else {},
        "cold_items": summarise(ranks, slice(None)) if clicked.any() else {},
    }
    return summary, compared_per_list(ranks)


def summarise(metrics: dict[str, dict[str, np.ndarray]], rows: np.ndarray | slice) -> dict[str, dict[str, float]]:
    return {ranker: {name: float(values[rows].mean()) for name, values in m.items()} for ranker, m in metrics.items()}


def evaluate_run(
    run_dir: Path, split: str = "test", data_dir: Path | None = None, device: str = "cpu", per_list: bool = False
) -> dict:
    """Metrics of a run on one split, overall and per user-activity group (a JSON-able dict).

    per_list: also each list's COMPARED metrics per ranker (`per_list`), so that several runs can
    be paired on the same lists later (psad experiment)."""
    run_dir = Path(run_dir)
    model, config, schema = load_run(run_dir)
    data_dir = Path(data_dir) if data_dir is not None else read_config(run_dir)[1]
    check_schema_files(data_dir)
    fix = "evaluate on the data set the run was trained on (item and feature encodings must match): pass --data"
    check_data_matches_run(data_dir, run_dir, schema, fix)
    data = load_lists(data_dir, split, schema, config.max_list)
    if len(data) == 0:
        raise DataError(f"{data_dir}/{split}.parquet has no lists to evaluate")
    dev = torch.device(device)
    perms = rank_lists(model.to(dev), data, dev, config.eval_batch_size, ("student",))
    if config.model.arch in GENERATOR_ARCHS:
        teacher, _, _ = load_run(run_dir, "teacher")
        perms |= rank_lists(teacher.to(dev), data, dev, config.eval_batch_size, ("teacher",))
    metrics = list_metrics(perms, data, click_model(data_dir))
    groups, bounds = activity_groups(data_dir, split, data)
    result: dict[str, Any] = {
        "run": str(run_dir.resolve()),
        "data_dir": str(Path(data_dir).resolve()),
        "split": split,
        "lists": len(data),
        "rankers": list(perms),
        "activity": {
            **bounds,
            "version": GROUPS_VERSION,
            "lists": {g: int((groups == i).sum()) for i, g in enumerate(GROUPS)},
        },
        "overall": summarise(metrics, slice(None)),
        "groups": {g: summarise(metrics, groups == i) for i, g in enumerate(GROUPS) if (groups == i).any()},
        "vs_initial": versus_initial(metrics),
    }
    cold = cold_candidates(data, schema)
    if cold is not None:
        result["cold"], cold_per_list = cold_evaluation(perms, data, cold, metrics)
    if per_list:
        result["per_list"] = compared_per_list(metrics)
        if cold is not None:
            result["cold"] |= {"per_list": cold_per_list, "list_cold": cold.any(1).tolist()}
    return result


def compared_per_list(metrics: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list[float]]]:
    """{ranker: {metric: [value per list]}} for the COMPARED metrics: what pairing needs, JSON-able."""
    return {ranker: {n: m[n].tolist() for n in COMPARED if n in m} for ranker, m in metrics.items()}


def versus_initial(metrics: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, dict[str, float]]]:
    """{ranker: {metric: {"gain", "low", "high"}}}: mean gain over the initial order on the same
    lists and its paired bootstrap 95% interval, for NDCG@10, MRR and (simulated data) utility."""
    base = metrics["initial"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for ranker, m in metrics.items():
        if ranker == "initial":
            continue
        for name in (n for n in COMPARED if n in m):
            diff = m[name] - base[name]
            low, high = paired_bootstrap(diff)
            out.setdefault(ranker, {})[name] = {"gain": float(diff.mean()), "low": low, "high": high}
    return out


def format_table(result: dict) -> str:
    """A readable table: one row per (group, ranker), one column per metric."""
    names = list(result["overall"][result["rankers"][0]])
    header = f"{'group':<10} {'ranker':<8} {'lists':>7} " + " ".join(f"{n:>9}" for n in names)
    lines = [f"{result['split']} split of {result['data_dir']}: {result['lists']:,} lists", header, "-" * len(header)]
    sections = [("overall", result["lists"], result["overall"])]
    sections += [(g, result["activity"]["lists"][g], result["groups"][g]) for g in GROUPS if g in result["groups"]]
    for group, count, rows in sections:
        for ranker, values in rows.items():
            cells = " ".join(f"{values[n]:>9.4f}" for n in names)
            lines.append(f"{group:<10} {ranker:<8} {count:>7,} {cells}")
    cold = result.get("cold")
    if cold:
        for group, count, key in (
            ("cold lists", cold["lists"], "cold_lists"),
            ("cold items", cold["lists_with_cold_clicks"], "cold_items"),
        ):
            for ranker, values in cold[key].items():
                cells = " ".join(f"{values.get(n, np.nan):>9.4f}" for n in names)
                lines.append(f"{group:<10} {ranker:<8} {count:>7,} {cells}")
        lines.append(
            f"cold = items first seen after training ({cold['candidate_share']:.1%} of candidates); cold lists: "
            "the lists holding one; cold items: only the cold items' labels, on lists where one was clicked"
        )
    bounds = result["activity"]
    lines.append(
        f"activity = the user's behaviours before the list: light <= {bounds['light_max']:g} < medium "
        f"<= {bounds['medium_max']:g} < heavy"
    )
    lines.append("gain over the initial order on the same lists, paired bootstrap 95% interval:")
    for ranker, gains in result["vs_initial"].items():
        for name, g in gains.items():
            interval = f"[{g['low']:+.4f}, {g['high']:+.4f}]"
            said = verdict(g["low"], g["high"], "the initial order")
            lines.append(f"  {ranker:<8} {name:<8} {g['gain']:+.4f}  {interval}  {said}")
    return "\n".join(lines)
