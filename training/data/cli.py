"""`psad data build <source>`: each builder writes the same on-disk format (training/data/store.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import typer

from export.contract.errors import fail
from export.contract.schema import SchemaError
from training.data.store import DataError, format_summary

app = typer.Typer(help="Build and inspect data sets.", no_args_is_help=True)
build = typer.Typer(help="Build a data set into DIR (see docs/data.md).", no_args_is_help=True)
app.add_typer(build, name="build")

OUT = typer.Option(..., "--out", help="Output directory of the data set.")
HISTORY = typer.Option(50, "--max-history", min=0, max=1000, help="Behaviours kept per list (H).")
COLD_ITEMS = typer.Option(
    False,
    "--cold-items",
    help="Keep val/test interactions on items unseen in train, as cold items (docs/data.md#cold-items).",
)
COLD_SHARE = typer.Option(
    0.0,
    "--cold-share",
    help="Also make this share of the films rated in val/test cold: their training-period interactions "
    "are dropped (implies --cold-items; docs/data.md#cold-items).",
)


def _run(builder: Callable[[], dict]) -> None:
    """Run a builder and print its summary; a bad input or --out is one `error:` line and exit code 2."""
    started = time.perf_counter()
    try:
        stats = builder()
    except (DataError, SchemaError, OSError) as exc:
        raise fail(exc) from None
    elapsed = time.perf_counter() - started
    lists = sum(s["lists"] for s in stats["splits"].values())
    typer.echo(format_summary(stats))
    typer.echo(f"built {lists:,} lists in {elapsed:.1f}s ({lists / max(elapsed, 1e-9):,.0f} lists/s)")


def _movielens(
    fmt: str, source: Path, out: Path, max_history: int, seed: int, cold_items: bool, cold_share: float
) -> None:
    from training.data.movielens import build_movielens

    _run(
        lambda: build_movielens(
            source, out, fmt=fmt, max_history=max_history, seed=seed, cold_items=cold_items, cold_share=cold_share
        )
    )


@build.command("ml100k")
def ml100k(
    source: Path = typer.Argument(Path("../shared/data/ml-100k"), help="Directory with u.data, u.user, u.item."),
    out: Path = OUT,
    max_history: int = HISTORY,
    seed: int = typer.Option(0, min=0, help="Seed of the initial ranker."),
    cold_items: bool = COLD_ITEMS,
    cold_share: float = COLD_SHARE,
) -> None:
    """MovieLens-100K (ReChorus recipe; see docs/data.md)."""
    _movielens("ml100k", source, out, max_history, seed, cold_items, cold_share)


@build.command("ml1m")
def ml1m(
    source: Path = typer.Argument(
        ..., help="Directory with ratings.dat, users.dat, movies.dat (ratings of some users only is fine)."
    ),
    out: Path = OUT,
    max_history: int = HISTORY,
    seed: int = typer.Option(0, min=0, help="Seed of the initial ranker."),
    cold_items: bool = COLD_ITEMS,
    cold_share: float = COLD_SHARE,
) -> None:
    """MovieLens-1M ('::'-separated files), same recipe as ml100k (see docs/data.md#movielens)."""
    _movielens("ml1m", source, out, max_history, seed, cold_items, cold_share)


@build.command("generic")
def generic(
    source: Path = typer.Argument(..., help="Directory with impressions.{parquet,csv} and optional side tables."),
    out: Path = OUT,
    max_history: int = HISTORY,
    history_from: str = typer.Option(
        None,
        "--history-from-impressions",
        help="Without a behaviours file, which impression rows become history: clicks (default; safe with "
        "sampled negatives) | all (every shown item, unclicked ones as `view`).",
    ),
) -> None:
    """Your own impression logs in the documented layout (docs/data.md#generic)."""
    from training.data.generic import build_generic

    _run(lambda: build_generic(source, out, max_history=max_history, history_from=history_from))


@build.command("trivago")
def trivago(
    source: Path = typer.Argument(
        Path("../shared/data/trivago-100k/trivago_val_100k.parquet"),
        help="The challenge's train.csv, or a .parquet file with its columns.",
    ),
    out: Path = OUT,
    max_history: int = HISTORY,
    memory_limit: str = typer.Option(
        "1GB", "--memory-limit", help="DuckDB's memory cap; beyond it, it spills to disk."
    ),
) -> None:
    """RecSys Challenge 2019 (trivago) session log: one list per clickout (docs/data.md#trivago)."""
    from training.data.trivago import build_trivago

    _run(lambda: build_trivago(source, out, max_history=max_history, memory_limit=memory_limit))


@build.command("synthetic")
def synthetic(
    out: Path = OUT,
    lists: int = typer.Option(20_000, min=30, help="Number of displayed lists (all splits)."),
    users: int = typer.Option(2_000, min=3, help="Number of simulated users."),
    items: int = typer.Option(2_000, min=30, help="Number of simulated items."),
    list_length: int = typer.Option(20, min=2, max=1000, help="Candidates per list."),
    max_history: int = HISTORY,
    seed: int = typer.Option(0, min=0, help="Simulator seed."),
    logging_policy: str = typer.Option(
        None,
        "--logging-policy",
        help="Order each list was shown in, clicks drawn under it: initial|shuffle|plackett-luce "
        "(unset: plackett-luce; docs/simulator.md#logging-policy).",
    ),
    temperature: float = typer.Option(
        None, "--temperature", help="plackett-luce only: softmax temperature on rank scores, > 0 (unset: 1)."
    ),
    content_dim: int = typer.Option(
        0,
        "--content-dim",
        help="Item content features content_0..content_{D-1}: a noisy projection of what "
        "drives relevance (0: none; docs/simulator.md#content).",
    ),
    content_noise: float = typer.Option(0.5, "--content-noise", help="Std of the noise on each content feature."),
    cold_items: float = typer.Option(
        0.0, "--cold-items", help="Share of items first seen after the training period (docs/simulator.md#cold-items)."
    ),
) -> None:
    """Click simulator with known ground truth (expected utility of any permutation)."""
    from training.data.synthetic import SimulatorConfig, build_synthetic

    _run(
        lambda: build_synthetic(
            out,
            lists=lists,
            users=users,
            items=items,
            list_length=list_length,
            max_history=max_history,
            seed=seed,
            logging_policy=logging_policy,
            temperature=temperature,
            config=SimulatorConfig(content_dim=content_dim, content_noise=content_noise, cold_items=cold_items),
        )
    )
