"""The `psad` command line: one entry point for data, training, export, serving and benchmarks.

The top layer: it only composes the commands that live beside the code they drive (see
docs/architecture.md). Heavy imports (torch, onnxruntime) happen inside the commands so that
`psad --help` and the service start fast.
"""

from __future__ import annotations

import typer

from export.cli import export_command
from loadtest.model_bench import bench_model_command
from loadtest.peers.run import bench_peers_command
from loadtest.service_bench.run import bench_service_command
from psad.load_items import items_load_command
from psad.load_profiles import profiles_load_command
from psad.shadow.cli import shadow_app
from psad.up import up_command
from service.cli import profiles_mark_command, serve_command
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

profiles_app = typer.Typer(help="User profiles in Redis.", no_args_is_help=True)
profiles_app.command("load")(profiles_load_command)
profiles_app.command("mark")(profiles_mark_command)
app.add_typer(profiles_app, name="profiles")

items_app = typer.Typer(help="Item content in Redis (sid bundles rank new items from it).", no_args_is_help=True)
items_app.command("load")(items_load_command)
app.add_typer(items_app, name="items")

bench = typer.Typer(help="Benchmarks that print figures (see docs/benchmarks.md).", no_args_is_help=True)
bench.command("model")(bench_model_command)
bench.command("service")(bench_service_command)
bench.command("peers")(bench_peers_command)
app.add_typer(bench, name="bench")
app.add_typer(shadow_app, name="shadow")

if __name__ == "__main__":
    app()
