"""`psad shadow report`: how far the served student agrees with its teacher on live traffic, per
model version, over a time range, and what the clicks (and other events) say, as markdown with a
plot beside it.

It reads the consumer's parquet results through `psad.shadow.results.read`, which keeps one row per
result (a list by record id, an event by its event id when it has one): a record processed twice
after a crash, or an /events call retried, counts once here too. The events section compares
each /events action apart (a view is not a click) and is an offline estimate biased by position
(users saw the served order); the report says so where it shows the figures, so that no reader
takes it for an A/B test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from export.contract.errors import reported
from psad.shadow import results

FIRST_ITEMS = 3  # ids shown of each order in the disagreement table
METRICS = {  # list column -> (name in the report, the value range the plot spans)
    "kendall_tau": ("Kendall tau", (-1.0, 1.0)),
    "topk_overlap": ("top-k overlap", (0.0, 1.0)),
    "ndcg": ("NDCG@k", (0.0, 1.0)),
}
POSITION_BIAS = (
    "**This is an offline, position-biased estimate.** Users saw the served order, the student's, "
    "and view and click mostly what is near its top: those items rank high under the student because "
    "the student placed them there, while the teacher's order was never shown. Read these figures as a "
    "consistency check between the two orders, not as an A/B test of them."
)
UNMATCHED = (
    "An event is unmatched when its list was not found: the list's record was dropped or failed at the "
    "service's writer, was dead-lettered, was trimmed from the stream before a consumer processed it, "
    "expired from the join window (`--join-window-s`) before the event came, or was still pending at a "
    "consumer that died; or the event's user differs from the list's."
)


@dataclass(frozen=True)
class TimeRange:
    """Answer times in [start, end), unix seconds; None leaves that side open."""

    start: float | None = None
    end: float | None = None

    def describe(self) -> str:
        if self.start is None and self.end is None:
            return "at any time"
        since = "" if self.start is None else f"from {iso(self.start)}"
        until = "" if self.end is None else f"before {iso(self.end)}"
        return " ".join(p for p in (since, until) if p)


def iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(raw: str | None, flag: str) -> float | None:
    """An ISO 8601 time (UTC unless it names a zone) or unix seconds; the error names the flag."""
    if raw is None:
        return None
    text = raw.strip()
    try:
        when = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{flag} {raw!r}: expected an ISO 8601 time (e.g. 2025-05-01T12:00Z; UTC unless a zone is given) "
                "or unix seconds"
            ) from None
        when = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(when) or when < 0:
        raise ValueError(f"{flag} {raw!r}: expected a time after 1970-01-01")
    return when


def time_range(since: str | None, until: str | None) -> TimeRange:
    span = TimeRange(parse_time(since, "--since"), parse_time(until, "--until"))
    if span.start is not None and span.end is not None and span.start >= span.end:
        raise ValueError(f"--since {since} is not before --until {until}: pass an earlier --since or a later --until")
    return span


# Markdown ----------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; a column whose every cell is a number (or a share) is right-aligned."""
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%").replace(",", ""))
    except ValueError:
        return False
    return True


def share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def num(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def versions(lists: pd.DataFrame) -> list[tuple[tuple[str, int], pd.DataFrame]]:
    """The lists of each (model, version), oldest version first."""
    return [((str(m), int(v)), g) for (m, v), g in lists.groupby(["model", "version"], sort=True)]


def agreement_section(lists: pd.DataFrame) -> list[str]:
    ks = lists["k"]
    k_text = f"k = {ks.iloc[0]}" if ks.nunique() == 1 else f"k = min(--k, n), from {ks.min()} to {ks.max()}"
    if (ks == lists["n"]).all():
        k_text += ", every list's length, so the top-k overlap is 1 by construction (a smaller --k tells more)"
    summary = [
        [model, str(version), f"{len(g):,}", share(g["degraded"].sum(), len(g)), share(g["first_agree"].sum(), len(g))]
        for (model, version), g in versions(lists)
    ]
    spread = [
        [model, str(version), name, num(g[col].mean()), num(g[col].median()), num(g[col].quantile(0.1))]
        for (model, version), g in versions(lists)
        for col, (name, _) in METRICS.items()
    ]
    return [
        "## Agreement per model version",
        "",
        "Each sampled list is ordered again by the teacher of the same bundle version, on the inputs the "
        f"student scored. Top-k measures: {k_text}. Degraded: answered with a cold-start or partial profile "
        "(Redis slow, down, emptied, or holding corrupt entries), which the teacher sees too.",
        "",
        *table(["model", "version", "lists", "degraded", "first item agrees"], summary),
        "",
        *degraded_reasons(lists),
        *table(["model", "version", "measure", "mean", "median", "p10"], spread),
    ]


def degraded_reasons(lists: pd.DataFrame) -> list[str]:
    counts = lists["degraded_reasons"].explode().dropna().value_counts()
    if counts.empty:
        return []
    return ["Degraded reasons: " + ", ".join(f"`{reason}` ({n:,})" for reason, n in counts.items()) + ".", ""]


def click_section(clicks: pd.DataFrame) -> list[str]:
    lines = ["## Clicks and other events", "", POSITION_BIAS, ""]
    if clicks.empty:
        return [*lines, "No events in this range (posted to /events with a `request_id`)."]
    per_action = [
        [str(action), f"{len(g):,}", f"{g['matched'].sum():,}", share(g["matched"].sum(), len(g))]
        for action, g in clicks.groupby("action", sort=True)
    ]
    lines += [
        "Every action posted to /events with a `request_id` is recorded, views as well as clicks, so each "
        "action is compared on its own.",
        "",
        *table(["action", "events", "matched", "share matched"], per_action),
        "",
    ]
    if not clicks["matched"].all():
        lines += [UNMATCHED, ""]
    matched = clicks[clicks["matched"]]
    if matched.empty:
        return lines
    ranks, votes = [], []
    for (version, action), g in matched.groupby(["version", "action"], sort=True):
        for order in ("student", "teacher", "served"):
            rank = g[f"{order}_rank"].dropna()
            ranks.append([f"{version:.0f}", str(action), order, f"{len(rank):,}", num(rank.mean()), num(rank.median())])
        listed = g.dropna(subset=["student_rank", "teacher_rank"])
        teacher, student = listed["teacher_rank"], listed["student_rank"]
        votes.append(
            [
                f"{version:.0f}",
                str(action),
                f"{len(listed):,}",
                share((teacher < student).sum(), len(listed)),
                share((teacher == student).sum(), len(listed)),
                share((teacher > student).sum(), len(listed)),
            ]
        )
    return [
        *lines,
        "Rank of the item acted on (1 = first) under each order, over the matched events on an item of the list, "
        "per action; `served` counts only events on an item of the answer (its top k).",
        "",
        *table(["version", "action", "order", "events", "mean rank", "median rank"], ranks),
        "",
        *table(["version", "action", "events", "teacher ranks it higher", "equal", "student ranks it higher"], votes),
    ]


def first_ids(items: np.ndarray, order: np.ndarray) -> str:
    return ", ".join(str(items[i]) for i in order[:FIRST_ITEMS])


def disagreement_section(lists: pd.DataFrame, worst: int) -> list[str]:
    if worst == 0:
        return []
    rows = [
        [
            str(r.record_id),
            str(r.request_id),
            str(r.user_id),
            f"{r.model} v{r.version}",
            num(r.kendall_tau),
            first_ids(np.asarray(r.items), np.asarray(r.student_order)),
            first_ids(np.asarray(r.items), np.asarray(r.teacher_order)),
        ]
        for r in lists.sort_values(["kendall_tau", "record_id"]).head(worst).itertuples()
    ]
    header = ["record id", "request id", "user", "model", "tau", "student's first", "teacher's first"]
    return [
        f"## The {len(rows)} lists where they disagree most (lowest Kendall tau)",
        "",
        f"Ids only: the first {FIRST_ITEMS} item ids of each order.",
        "",
        *table(header, rows),
    ]


def render(lists: pd.DataFrame, clicks: pd.DataFrame, source: Path, span: TimeRange, plot: str, worst: int) -> str:
    """The whole report as markdown; `plot` is the distribution figure's path relative to it."""
    lines = [
        "# Shadow evaluation: the served student against its teacher",
        "",
        f"Results in `{source}`, lists answered {span.describe()}: {len(lists):,} lists "
        f"({iso(lists['time'].min())} to {iso(lists['time'].max())}), {len(clicks):,} events naming a request id. "
        "For a scorer-only bundle the teacher is the scorer itself, so agreement near 1 is a parity check.",
        "",
        *agreement_section(lists),
        "",
        "## Distributions",
        "",
        f"![Kendall tau, top-k overlap and NDCG@k of each list, per model version]({plot})",
        "",
        *click_section(clicks),
        "",
        *disagreement_section(lists, worst),
        "",
    ]
    return "\n".join(lines)


# Plot --------------------------------------------------------------------------------------------


def plot_distributions(lists: pd.DataFrame, path: Path) -> None:
    """One panel per measure, one step histogram per model version, as shares of its lists so that
    versions with different traffic compare. Bins are centred on multiples of 0.1, where the top-k
    overlap of k = 10 falls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3.8))
    for ax, (col, (name, (low, high))) in zip(axes, METRICS.items(), strict=True):
        edges = np.linspace(low - 0.05, high + 0.05, round((high - low) * 10) + 2)
        for (model, version), g in versions(lists):
            values = g[col].to_numpy(dtype=float)
            weights = np.full(len(values), 1.0 / len(values))
            ax.hist(values, bins=edges, weights=weights, histtype="step", linewidth=1.5, label=f"{model} v{version}")
        ax.set(title=name, xlabel=name, ylabel="share of lists", xlim=(low - 0.05, high + 0.05))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    partial = path.with_suffix(".tmp.png")
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    partial.replace(path)


# Command -----------------------------------------------------------------------------------------


def write_report(root: Path, out: Path, span: TimeRange, worst: int) -> Path:
    """Write `out` and its plot (same name, .png); returns the plot's path."""
    if not root.is_dir():
        raise ValueError(f"--results {root}: no such directory; pass the --out directory of `psad shadow run`")
    lists = results.read(root, "lists", span.start, span.end)
    if lists.empty:
        raise ValueError(
            f"no shadow lists in {root} {span.describe()}: widen --since/--until, or let `psad shadow run` "
            "process the stream first (the service samples only with PSAD_SHADOW_SAMPLE_RATE > 0)"
        )
    clicks = results.read(root, "clicks", span.start, span.end)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    plot_distributions(lists, plot)
    out.write_text(render(lists, clicks, root, span, plot.name, worst))
    return plot


def report_command(
    results_dir: Path = typer.Option(Path("shadow"), "--results", help="Results of `psad shadow run` (its --out)."),
    since: str | None = typer.Option(None, help="Lists answered at or after this time: ISO 8601 (UTC) or unix s."),
    until: str | None = typer.Option(None, help="Lists answered before this time: ISO 8601 (UTC) or unix s."),
    out: Path = typer.Option(Path("reports/shadow.md"), help="Markdown report; the plot is written beside it."),
    worst: int = typer.Option(10, min=0, help="How many of the most disagreeing lists to list (0: none)."),
) -> None:
    """Markdown report of the shadow results: agreement per model version, its distribution, clicks."""
    with reported():
        plot = write_report(results_dir, out, time_range(since, until), worst)
    typer.echo(f"report: {out}\nplot:   {plot}")
