"""`psad data build <source>`: each builder writes the same on-disk format (training/data/store.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import typer

from training.commands import fail
from training.data.store import DataError, format_summary
from training.schema import SchemaError

app = typer.Typer(help="Build and inspect data sets.", no_args_is_help=True)
build = typer.Typer(help="Build a data set into DIR (see docs/data.md).", no_args_is_help=True)
app.add_typer(build, name="build")

OUT = typer.Option(..., "--out", help="Output directory of the data set.")
HISTORY = typer.Option(50, "--max-history", min=0, max=1000, help="Behaviours kept per list (H).")


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


def _movielens(fmt: str, source: Path, out: Path, max_history: int, seed: int) -> None:
    from training.data.movielens import build_movielens

    _run(lambda: build_movielens(source, out, fmt=fmt, max_history=max_history, seed=seed))


@build.command("ml100k")
def ml100k(
    source: Path = typer.Argument(Path("../shared/data/ml-100k"), help="Directory with u.data, u.user, u.item."),
    out: Path = OUT,
    max_history: int = HISTORY,
    seed: int = typer.Option(0, min=0, help="Seed of the initial ranker."),
) -> None:
    """MovieLens-100K (ReChorus recipe; see docs/data.md)."""
    _movielens("ml100k", source, out, max_history, seed)


@build.command("ml1m")
def ml1m(
    source: Path = typer.Argument(..., help="Directory with ratings.dat, users.dat, movies.dat."),
    out: Path = OUT,
    max_history: int = HISTORY,
    seed: int = typer.Option(0, min=0, help="Seed of the initial ranker."),
) -> None:
    """MovieLens-1M ('::'-separated files), same recipe as ml100k."""
    _movielens("ml1m", source, out, max_history, seed)


@build.command("generic")
def generic(
    source: Path = typer.Argument(..., help="Directory with impressions.{parquet,csv} and optional side tables."),
    out: Path = OUT,
    max_history: int = HISTORY,
) -> None:
    """Your own impression logs in the documented layout (docs/data.md#generic)."""
    from training.data.generic import build_generic

    _run(lambda: build_generic(source, out, max_history=max_history))


@build.command("synthetic")
def synthetic(
    out: Path = OUT,
    lists: int = typer.Option(20_000, min=30, help="Number of displayed lists (all splits)."),
    users: int = typer.Option(2_000, min=3, help="Number of simulated users."),
    items: int = typer.Option(2_000, min=30, help="Number of simulated items."),
    list_length: int = typer.Option(20, min=2, max=1000, help="Candidates per list."),
    max_history: int = HISTORY,
    seed: int = typer.Option(0, min=0, help="Simulator seed."),
) -> None:
    """Click simulator with known ground truth (expected utility of any permutation)."""
    from training.data.synthetic import build_synthetic

    _run(
        lambda: build_synthetic(
            out, lists=lists, users=users, items=items, list_length=list_length, max_history=max_history, seed=seed
        )
    )
