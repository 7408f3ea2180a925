"""`psad export`: the command-line front end of export.exporter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from export.contract.errors import reported


def export_command(
    run: Annotated[Path, typer.Option("--run", help="Training run directory (written by `psad train`).")],
    repo: Annotated[Path, typer.Option("--repo", help="Model repository: writes REPO/NAME/VERSION.")] = Path("models"),
    name: Annotated[str, typer.Option("--name", help="Model name (a directory name).")] = "psad",
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="Version number; default: one past the latest.")
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write model_fp16.onnx (GPUs), parity-checked.")] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write model_int8.onnx (dynamic int8 quantisation), parity-checked.")
    ] = False,
    fuse: Annotated[
        bool, typer.Option("--fuse/--no-fuse", help="PSAD: write the fused graph (fewer kernels, same scores).")
    ] = True,
) -> None:
    """Export a run as a versioned model bundle (ONNX UPN + student), gated on ONNX/PyTorch parity."""
    from export.exporter import export_run

    with reported():  # a bad run or flag exits 2; a failed export or parity gate, 1
        bundle = export_run(run, repo, name=name, version=version, fp16=fp16, int8=int8, fuse=fuse, progress=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for report in manifest["parity"].values():
        typer.echo(
            f"parity {report['model_file']}: passed on {len(report['shapes'])} shapes, "
            f"max |onnx - torch| = {report['max_abs_diff']:.3g} (tolerance {report['tolerance']['max_abs']:g})"
        )
    codes = manifest["item_encoder"].get("parity")
    if codes is not None:  # sid: the code tables' checks
        mismatched = sum(c["mismatched"] for c in codes["checks"])
        typer.echo(f"parity codes: passed {len(codes['checks'])} checks, {mismatched} items' codes differ")
    typer.echo(f"wrote {bundle}")
