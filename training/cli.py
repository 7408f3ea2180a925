"""The `psad` command line: one entry point for data, training, export, serving and benchmarks.

Each command lives beside the code it drives; heavy imports (torch, onnxruntime) happen inside
the commands so that `psad --help` and the service start fast.
"""

from __future__ import annotations

import typer

from export.cli import bench_model_command, export_command
from service.cli import bench_service_command, profiles_app, serve_command, up_command
from training.commands import evaluate_command, train_command
from training.compare import compare_command
from training.data.cli import app as data_app
from training.experiment import experiment_command

app = typer.Typer(help="PSAD list reranking: data, training, export, serving.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("compare")(compare_command)
app.command("experiment")(experiment_command)
app.command("export")(export_command)
app.command("serve")(serve_command)
app.command("up")(up_command)
app.add_typer(profiles_app, name="profiles")

bench = typer.Typer(help="Benchmarks that print figures (see docs/benchmarks.md).", no_args_is_help=True)
bench.command("model")(bench_model_command)
bench.command("service")(bench_service_command)
app.add_typer(bench, name="bench")

if __name__ == "__main__":
    app()
