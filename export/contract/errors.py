"""How every `psad` command fails: one `error:` line that names the flag or file and the fix, never a
traceback, and an exit code a script can act on.

    0  done
    1  something the command depends on failed: Redis unreachable, a port taken, a server that
       did not start, an export refused by its parity gate (retrying after the fix may succeed)
    2  the input is wrong: a flag, config, data set, run or bundle (as click exits 2 for a bad flag)

The project's own errors follow the split: input errors derive from ValueError, failures from
RuntimeError or OSError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click
import typer

FAILED = 1
BAD_INPUT = 2


def fail(problem: object, code: int = BAD_INPUT) -> typer.Exit:
    """Print `error: <problem>` on stderr and return the Exit to raise."""
    typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def reported(*failures: type[BaseException]) -> Iterator[None]:
    """Turn the project's errors raised inside into one line and the policy's exit code. `failures`
    adds exception types of a dependency (e.g. redis errors) to the exit-1 family."""
    failed: tuple[type[BaseException], ...] = (RuntimeError, OSError, *failures)
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort):  # RuntimeErrors too: a command's own exit
        raise
    except ValueError as exc:
        raise fail(exc) from None
    except failed as exc:
        raise fail(exc, FAILED) from None
