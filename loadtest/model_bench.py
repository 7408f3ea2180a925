"""`psad bench model`: latency of the served model, ONNX Runtime versus PyTorch eager, same threads.

Every (batch, list length, history length) cell is timed call by call after a warm-up, for up
to --iters calls or --seconds, whichever comes first; inputs are synthesised from the bundle's
schema (full lists, no padding). ONNX Runtime is timed through Bundle.score (what the service
calls, input checks included); PyTorch eager runs the same serving architecture (the bundle's
teacher.safetensors weights: latency does not depend on them) under
torch.inference_mode. Runs on the CPU, and on CUDA as well when a GPU is present. --profile
adds ONNX Runtime's per-operator profile of the target cell: where the time goes.

--compare-unfused (with --run) also exports the run's plain graph, --int8 adds the bundle's
int8 graph, and --versus adds another bundle of the same data set (the id model a sid one
replaces): every graph of a cell is timed in the same alternating rounds as eager PyTorch, so
the host's drift falls on all of them, and each graph's kernels per call (the nodes of the graph
ONNX Runtime runs) are reported beside its p50 by list length.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from export.contract.errors import fail, reported

TARGET_SHAPE = (1, 100, 50)  # batch, list, history
TARGET_P50_MS = 0.25
TARGET_SPEEDUP = 3.0
WARMUP_CALLS = 5
ROUNDS = 4  # each engine and graph of a cell is timed in this many alternating slices of its budget
SERVED = "served"  # the label of the bundle's own model.onnx (the fused graph for PSAD)
GRAPHS = {
    SERVED: "the bundle's model.onnx",
    "unfused": "the plain serving module's graph",
    "before": "that graph with every ONNX Runtime fusion on (SkipLayerNormalization too), as served before issue 19",
    "int8": "model_int8.onnx",
    "versus": "the --versus bundle's model.onnx (e.g. the id model a sid one replaces)",
}


@dataclass(frozen=True)
class Variant:
    """One graph to time: a bundle's model.onnx (or its model_int8.onnx), under the serving session
    options or (ort_defaults) with every ONNX Runtime fusion on, as served before issue 19."""

    label: str
    bundle: Path
    int8: bool = False
    ort_defaults: bool = False

    @property
    def model_file(self) -> Path:
        from export.contract.bundle import INT8_FILE, MODEL_FILE

        return self.bundle / (INT8_FILE if self.int8 else MODEL_FILE)

    @property
    def disabled(self) -> tuple[str, ...]:
        from export.runtime import DISABLED_OPTIMIZERS

        return () if self.ort_defaults else DISABLED_OPTIMIZERS

    def load(self, device: str, threads: int, spinning: bool):
        """The variant's Bundle (export.runtime), its session built with the variant's optimisers."""
        import dataclasses

        import onnxruntime as ort

        from export.runtime import load_bundle, session_options

        bundle = load_bundle(self.bundle, device=device, threads=threads, spinning=spinning, int8=self.int8)
        if not self.ort_defaults:
            return bundle
        options = session_options(threads, spinning, disabled=self.disabled)
        session = ort.InferenceSession(str(self.model_file), options, providers=bundle.session.get_providers())
        return dataclasses.replace(bundle, session=session)


@dataclass(frozen=True)
class Timing:
    p50: float  # milliseconds
    p90: float
    p99: float
    lists_per_s: float
    calls: int


@dataclass(frozen=True)
class Cell:
    device: str
    batch: int
    list: int
    history: int
    graphs: dict[str, Timing]  # ONNX Runtime, by variant label; the first is the served graph
    eager: Timing

    @property
    def ort(self) -> Timing:
        return next(iter(self.graphs.values()))

    @property
    def speedup(self) -> float:
        return self.eager.p50 / self.ort.p50


def time_calls(fns: dict[str, Callable[[], Any]], batch: int, seconds: float, max_iters: int) -> dict[str, Timing]:
    """Time each function for up to `seconds` or `max_iters` calls, in ROUNDS alternating slices."""
    for fn in fns.values():
        for _ in range(WARMUP_CALLS):
            fn()
    samples: dict[str, list[int]] = {label: [] for label in fns}
    for _ in range(ROUNDS):
        for label, fn in fns.items():
            taken = samples[label]
            quota = min(max_iters, len(taken) + max(WARMUP_CALLS, max_iters // ROUNDS))
            deadline = time.perf_counter() + seconds / ROUNDS
            while len(taken) < quota and (len(taken) < WARMUP_CALLS or time.perf_counter() < deadline):
                start = time.perf_counter_ns()
                fn()
                taken.append(time.perf_counter_ns() - start)
    return {label: _timing(taken, batch) for label, taken in samples.items()}


def _timing(samples: list[int], batch: int) -> Timing:
    ms = np.asarray(samples, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Timing(float(p50), float(p90), float(p99), batch * 1000.0 / float(ms.mean()), len(samples))


def parse_sizes(text: str, option: str, minimum: int) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers, e.g. 10,50,100; got {text!r}") from None
    if not sizes or min(sizes) < minimum:
        raise typer.BadParameter(f"{option} needs integers >= {minimum}, got {text!r}")
    return sizes


def run_bench(
    variants: list[Variant],
    threads: int,
    batches: list[int],
    lists: list[int],
    histories: list[int],
    seconds: float,
    max_iters: int,
    spinning: bool,
    progress: bool,
) -> tuple[list[Cell], list[str]]:
    """Time every cell on every available device, every variant in each; returns the cells and notes
    on the devices. The first variant is the served graph (and the source of the eager model)."""
    import torch
    from tqdm import tqdm

    from export.contract.fixtures import BatchMaker
    from export.exporter import load_torch_model
    from export.runtime import CUDA, load_bundle

    torch.set_num_threads(threads)
    devices, notes = ["cpu"], []
    if torch.cuda.is_available():
        devices.append("cuda")
    served = variants[0].bundle
    maker = BatchMaker(load_bundle(served, device="cpu", warmup=False).schema, seed=0)  # verifies first
    module = load_torch_model(served).serving_module().eval()
    shapes = [(b, n, h) for b in batches for n in lists for h in histories]
    cells = []
    bar = tqdm(total=len(devices) * len(shapes), desc="bench model", disable=not progress)
    for device in devices:
        bundles = {v.label: v.load(device, threads, spinning) for v in variants}
        provider = bundles[variants[0].label].provider
        notes.append(f"{device}: ONNX Runtime provider {provider}")
        if device == "cuda" and provider != CUDA:
            notes.append("cuda: skipped, ONNX Runtime has no working CUDA provider here")
            bar.update(len(shapes))
            continue
        eager = module.to(device)
        for batch, length, history in shapes:
            bar.set_postfix_str(f"{device} B={batch} L={length} H={history}")
            inputs = maker.make(batch, length, history, pad_last=False)
            fns: dict[str, Callable[[], Any]] = {label: partial(b.score, inputs) for label, b in bundles.items()}
            fns["eager"] = partial(_eager_call, eager, inputs, device)
            timings = time_calls(fns, batch, seconds, max_iters)
            eager_timing = timings.pop("eager")
            cells.append(Cell(device, batch, length, history, timings, eager_timing))
            bar.update()
    bar.close()
    return cells, notes


def _eager_call(module, inputs: dict[str, np.ndarray], device: str) -> None:
    import torch

    from export.contract.schema import INPUT_NAMES

    with torch.inference_mode():
        module(*(torch.from_numpy(inputs[n]).to(device) for n in INPUT_NAMES)).cpu()


def format_table(cells: list[Cell]) -> str:
    lines = [
        "| device | batch | list | history | ORT p50 ms | ORT p90 | ORT p99 | eager p50 ms | eager p90 | eager p99 "
        "| ORT lists/s | eager lists/s | ORT speed-up (p50) |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cells:
        o, e = c.ort, c.eager
        lines.append(
            f"| {c.device} | {c.batch} | {c.list} | {c.history} | {o.p50:.3f} | {o.p90:.3f} | {o.p99:.3f} "
            f"| {e.p50:.3f} | {e.p90:.3f} | {e.p99:.3f} | {o.lists_per_s:,.0f} | {e.lists_per_s:,.0f} "
            f"| {c.speedup:.1f}x |"
        )
    return "\n".join(lines)


def format_graphs(cells: list[Cell], kernels: dict[str, int]) -> str:
    """p50 of every graph, cell by cell, against the served graph, and each graph's kernels per call."""
    labels = list(kernels)
    others = labels[1:]
    lines = [
        "Graphs: " + "; ".join(f"{label} = {GRAPHS[label]}" for label in labels) + ".",
        "",
        "Kernels per call (nodes of the graph ONNX Runtime runs, CPU provider): "
        + ", ".join(f"{label} {n}" for label, n in kernels.items()),
        "",
        "| device | batch | list | history | "
        + " | ".join(f"{label} p50 ms" for label in labels)
        + "".join(f" | {label} / {SERVED}" for label in others)
        + " |",
        "|:--|--:|--:|--:|" + "--:|" * (len(labels) + len(others)),
    ]
    for c in cells:
        p50 = [c.graphs[label].p50 for label in labels]
        ratios = "".join(f" | {c.graphs[label].p50 / c.ort.p50:.2f}" for label in others)
        cell = f"| {c.device} | {c.batch} | {c.list} | {c.history} | "
        lines.append(cell + " | ".join(f"{t:.3f}" for t in p50) + ratios + " |")
    return "\n".join(lines)


def graph_quality(variants: list[Variant], split: str, batch: int = 256) -> str:
    """NDCG@10 of every graph on one split of the served bundle's data set, each against the served
    graph with a paired 95% interval: what a lossy graph (int8) costs in ranking quality. Items the
    bundle does not know (a cold-item split's) are read as OOV; a sid bundle reads tokens."""
    from export.contract.schema import OOV
    from training.data.store import load_schema, load_split
    from training.metrics import ndcg_at_k, paired_bootstrap, ranking_from_scores

    bundles = {v.label: v.load("cpu", threads=1, spinning=False) for v in variants}
    served = bundles[SERVED]
    data_dir = Path(served.manifest["source"]["data"])
    data = load_split(data_dir, split, load_schema(data_dir))  # the data set's, cold items included
    mask = data.inputs["cand_mask"]
    per_list = {}
    for label, bundle in bundles.items():
        n = bundle.schema.n_items
        known = {k: np.where(v < n, v, OOV) if k.endswith("_items") else v for k, v in data.inputs.items()}
        scores = np.concatenate(
            [
                bundle.score(bundle.tokens({k: v[start : start + batch] for k, v in known.items()}))
                for start in range(0, len(data), batch)
            ]
        )
        per_list[label] = ndcg_at_k(ranking_from_scores(scores, mask), data.labels, mask, 10)
    lines = [
        f"NDCG@10 on the {split} split of {data_dir} ({len(data):,} lists), each graph against {SERVED}:",
        "",
        "| graph | NDCG@10 | difference | paired 95% interval |",
        "|:--|--:|--:|:--|",
    ]
    for label, values in per_list.items():
        diff = values - per_list[SERVED]
        low, high = paired_bootstrap(diff) if label != SERVED else (0.0, 0.0)
        lines.append(f"| {label} | {values.mean():.4f} | {diff.mean():+.4f} | [{low:+.4f}, {high:+.4f}] |")
    return "\n".join(lines)


def check_targets(cells: list[Cell], threads: int) -> list[str]:
    """Pass/miss lines for the project's latency targets (CPU, one thread)."""
    cpu = [c for c in cells if c.device == "cpu"]
    target = next((c for c in cpu if (c.batch, c.list, c.history) == TARGET_SHAPE), None)
    batch1 = [c for c in cpu if c.batch == 1]
    b, n, h = TARGET_SHAPE
    lines = []
    if target is None or threads != 1:
        lines.append(f"- ORT p50, batch {b}, L={n}, H={h}, 1 CPU thread (<= {TARGET_P50_MS} ms): not measured")
    else:
        verdict = "pass" if target.ort.p50 <= TARGET_P50_MS else "MISS"
        lines.append(
            f"- ORT p50, batch {b}, L={n}, H={h}, 1 CPU thread: {target.ort.p50:.3f} ms "
            f"(target <= {TARGET_P50_MS} ms): **{verdict}**"
        )
    if batch1:
        worst = min(batch1, key=lambda c: c.speedup)
        verdict = "pass" if worst.speedup >= TARGET_SPEEDUP else "MISS"
        lines.append(
            f"- ORT vs PyTorch eager at batch 1 (CPU): lowest speed-up {worst.speedup:.1f}x at L={worst.list}, "
            f"H={worst.history} (target >= {TARGET_SPEEDUP:g}x): **{verdict}**"
        )
    return lines


def profile_ort(bundle_dir: Path, threads: int, runs: int = 200) -> str:
    """ONNX Runtime's own profile of the target cell on the CPU (the served graph): time per operator
    type and top nodes."""
    import onnx
    import onnxruntime as ort

    from export.contract.bundle import MODEL_FILE, verify_bundle
    from export.contract.fixtures import BatchMaker
    from export.contract.schema import MODEL_OUTPUT
    from export.runtime import CPU, session_options

    _, schema, _ = verify_bundle(bundle_dir)
    inputs = BatchMaker(schema, seed=0).make(*TARGET_SHAPE, pad_last=False)
    scopes = _name_scopes(onnx.load(str(bundle_dir / MODEL_FILE)))
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(bundle_dir / MODEL_FILE), options, providers=[CPU])
        for _ in range(WARMUP_CALLS):
            session.run([MODEL_OUTPUT.name], inputs)
        for _ in range(runs):
            session.run([MODEL_OUTPUT.name], inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    model_runs = [e["dur"] for e in events if e.get("name") == "model_run"][WARMUP_CALLS:]
    per_run = float(np.mean(model_runs)) if model_runs else float("nan")
    total_runs = WARMUP_CALLS + runs
    by_type: dict[str, float] = {}
    by_node: dict[str, tuple[str, float]] = {}
    for e in kernels:
        op = e["args"].get("op_name", "?")
        node = e["name"].removesuffix("_kernel_time")
        by_type[op] = by_type.get(op, 0.0) + e["dur"] / total_runs
        by_node[node] = (op, by_node.get(node, (op, 0.0))[1] + e["dur"] / total_runs)
    kernel_sum = sum(by_type.values())
    b, n, h = TARGET_SHAPE
    lines = [
        f"ONNX Runtime profile, batch {b}, L={n}, H={h}, {threads} thread(s), {runs} runs: "
        f"{per_run:.1f} us per run, {kernel_sum:.1f} us in {len(by_node)} kernels, "
        f"{per_run - kernel_sum:.1f} us outside kernels (session.run overhead, input copies)",
        "",
        "| operator | us per run | share of kernel time |",
        "|:--|--:|--:|",
    ]
    for op, us in sorted(by_type.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {op} | {us:.1f} | {us / kernel_sum:.0%} |")
    lines += ["", "| top nodes | operator | us per run | PyTorch module |", "|:--|:--|--:|:--|"]
    for node, (op, us) in sorted(by_node.items(), key=lambda kv: -kv[1][1])[:12]:
        lines.append(f"| {node} | {op} | {us:.1f} | {scopes.get(node, '(fused by ORT)')} |")
    return "\n".join(lines)


def _name_scopes(model) -> dict[str, str]:
    """ONNX node name -> the PyTorch module path the dynamo exporter recorded for it."""
    scopes = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scope = meta.get("pkg.torch.onnx.name_scopes")  # a Python list literal: ['', 'upn', ..., 'linear_1']
        if scope:
            path = ast.literal_eval(scope)
            scopes[node.name] = f"{path[-2] or '(top)'} ({path[-1]})" if len(path) >= 2 else str(path)
    return scopes


def environment(bundle_dir: Path, threads: int, spinning: bool) -> list[str]:
    import onnxruntime
    import torch

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    model = json.loads((bundle_dir / "config.json").read_text())["model"]
    knobs = ", ".join(f"{k}={model[k]}" for k in ("arch", "d_model", "n_heads", "student_hidden") if k in model)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    return [
        f"- machine: {cpu}, {os.cpu_count()} logical cores; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- software: onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}",
        f"- model: {manifest['name']}/{manifest['version']} ({knobs}); model.onnx is "
        f"{'the fused graph (export/fusion.py)' if manifest.get('graph', {}).get('fused') else 'the plain graph'}",
        f"- threads: {threads} intra-op (ORT and torch); ORT inter-op 1, sequential, "
        f"spinning {'on' if spinning else 'off'}",
    ]


def bench_model_command(
    bundle: Annotated[Path | None, typer.Option("--bundle", help="Bundle directory (REPO/NAME/VERSION).")] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Training run; exported to a temporary bundle.")] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="Intra-op threads for both engines.")] = 1,
    batches: Annotated[str, typer.Option("--batches", help="Batch sizes, comma-separated.")] = "1,32,256",
    lists: Annotated[str, typer.Option("--lists", help="List lengths, comma-separated.")] = "10,50,100,200",
    histories: Annotated[str, typer.Option("--histories", help="History lengths, comma-separated.")] = "0,50",
    seconds: Annotated[float, typer.Option("--seconds", min=0.01, help="Time budget per cell and engine.")] = 1.0,
    iters: Annotated[int, typer.Option("--iters", min=5, help="Most timed calls per cell and engine.")] = 2000,
    spinning: Annotated[bool, typer.Option("--spinning", help="Let idle ORT pool threads spin.")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="Add ONNX Runtime's operator profile.")] = False,
    compare_unfused: Annotated[
        bool, typer.Option("--compare-unfused", help="With --run: also export and time the plain (unfused) graph.")
    ] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="Also time model_int8.onnx (exported with --int8 when given --run).")
    ] = False,
    quality: Annotated[
        str | None, typer.Option("--quality", help="Also NDCG@10 of every graph on this split (val) of the data set.")
    ] = None,
    versus: Annotated[
        Path | None,
        typer.Option("--versus", help="Also time this bundle (same data set) on the same inputs, in the same rounds."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the report as markdown here.")] = None,
) -> None:
    """Model latency percentiles and throughput: ONNX Runtime versus PyTorch eager."""
    if (bundle is None) == (run is None):
        raise typer.BadParameter("pass exactly one of --bundle or --run")
    if compare_unfused and run is None:
        raise typer.BadParameter("--compare-unfused exports the run's plain graph beside the fused one: pass --run")
    sizes = (
        parse_sizes(batches, "--batches", 1),
        parse_sizes(lists, "--lists", 1),
        parse_sizes(histories, "--histories", 0),
    )
    command = ["psad", "bench", "model", "--bundle" if bundle else "--run", str(bundle or run)]
    command += ["--threads", str(threads), "--batches", batches, "--lists", lists, "--histories", histories]
    command += ["--seconds", str(seconds), "--iters", str(iters)] + ["--spinning"] * spinning + ["--profile"] * profile
    command += ["--compare-unfused"] * compare_unfused + ["--int8"] * int8 + (["--quality", quality] if quality else [])
    command += ["--versus", str(versus)] if versus else []
    command += ["--out", str(out)] if out else []
    if out is not None:
        _check_out(out)
    from export.exporter import export_run, graph_kernels

    # A bad run or bundle exits 2; a failed export or parity gate, 1.
    with reported(), tempfile.TemporaryDirectory() as tmp:
        if run is not None:
            bundle = export_run(run, Path(tmp), name="bench", version=1, int8=int8, progress=True)
        assert bundle is not None
        variants = [Variant(SERVED, bundle)]
        if compare_unfused:
            assert run is not None
            plain = export_run(run, Path(tmp), name="bench-unfused", version=1, fuse=False, progress=True)
            variants += [Variant("unfused", plain), Variant("before", plain, ort_defaults=True)]
        if int8:
            variants.append(Variant("int8", bundle, int8=True))
        if versus is not None:
            variants.append(Variant("versus", versus))
        cells, notes = run_bench(variants, threads, *sizes, seconds, iters, spinning, progress=True)
        kernels = {v.label: graph_kernels(v.model_file, v.disabled) for v in variants}
        report = [
            "## Model: ONNX Runtime vs PyTorch eager",
            "",
            f"Command: `{shlex.join(command)}`",
            "",
            *environment(bundle, threads, spinning),
            *(f"- {note}" for note in notes),
            "",
            format_table(cells),
            "",
            format_graphs(cells, kernels),
            "",
            "Targets:",
            "",
            *check_targets(cells, threads),
        ]
        if profile:
            report += ["", profile_ort(bundle, threads)]
        if quality:
            report += ["", graph_quality(variants, quality)]
    text = "\n".join(report) + "\n"
    typer.echo(text)
    if out is not None:
        out.write_text(text)
        typer.echo(f"wrote {out}")


def _check_out(out: Path) -> None:
    """Refuse an unusable --out before the benchmark runs, not after it."""
    if out.is_dir():
        raise fail(f"--out {out} is a directory; give the report's file path, e.g. {out / 'bench-model.md'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"--out {out}: cannot create its directory ({exc})") from None
