"""`python -m loadtest.fastpath_bench`: what service.routes.FastPath saves, in one process.

The same app with and without the FastPath layer, alternating, each request driven straight
through ASGI (no sockets, Redis unreachable so the profile read fails at once and no network time
counts): CPU time per request, best of `--rounds` rounds of `--requests` requests per app.
Needs a bundle in the model repository (`psad up` makes one). docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import MutableMapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from fastapi import FastAPI

from service import routes
from service.app import create_app
from service.settings import load_settings

WARMUP = 300
CANDIDATES = [{"item_id": f"item-{k}", "score": 1.0 - k / 100} for k in range(100)]
BODIES = {  # (path, the status it must answer): body
    ("/rerank", 200): {"user_id": "u1", "candidates": CANDIDATES},
    ("/rerank", 422): {"user_id": "u1", "candidates": CANDIDATES, "top_k": 101},
    ("/bench/floor", 200): {"user_id": "u1", "candidates": CANDIDATES},
}


def http_scope(path: str, body: bytes) -> dict[str, Any]:
    headers = [(b"host", b"psad"), (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


async def cpu_per_request(app: FastAPI, path: str, body: bytes, n: int) -> tuple[float, set[int]]:
    statuses: set[int] = set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    scope = http_scope(path, body)
    start = time.process_time()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.process_time() - start) / n, statuses


async def measure(model_repo: Path, rounds: int, requests: int) -> list[str]:
    settings = load_settings(
        model_repo=model_repo, redis_url="redis://127.0.0.1:1/0", device="cpu", log_level="error",
        enable_floor_endpoint=True,
    )  # fmt: skip
    fast, routed = create_app(settings), create_app(settings)
    routed.user_middleware = [m for m in routed.user_middleware if m.cls is not routes.FastPath]
    lines = ["| request | with FastPath µs | without µs | saved µs |", "|---|---:|---:|---:|"]
    async with AsyncExitStack() as stack:
        for app in (fast, routed):
            await stack.enter_async_context(app.router.lifespan_context(app))
        for (path, status), payload in BODIES.items():
            body = json.dumps(payload).encode()
            best = {"fast": float("inf"), "routed": float("inf")}
            for app in (fast, routed):
                _, seen = await cpu_per_request(app, path, body, WARMUP)
                if seen != {status}:
                    raise RuntimeError(f"POST {path} answered {seen}, expected {status}: is a bundle in {model_repo}?")
            for _ in range(rounds):
                for name, app in (("fast", fast), ("routed", routed)):
                    best[name] = min(best[name], (await cpu_per_request(app, path, body, requests))[0])
            with_, without = best["fast"] * 1e6, best["routed"] * 1e6
            lines.append(f"| POST {path}, answered {status} | {with_:,.1f} | {without:,.1f} | {without - with_:,.1f} |")
    return lines


def main(
    model_repo: Annotated[Path, typer.Option(help="Model repository with a bundle (psad up makes models/).")] = Path(
        "models"
    ),
    rounds: Annotated[int, typer.Option(min=1, help="Rounds per app; the best round counts.")] = 8,
    requests: Annotated[int, typer.Option(min=10, help="Requests per round.")] = 1000,
) -> None:
    """CPU time per request with and without FastPath, best of the rounds."""
    logging.disable(logging.WARNING)
    typer.echo("\n".join(asyncio.run(measure(model_repo, rounds, requests))))


if __name__ == "__main__":
    typer.run(main)
