"""What the benchmark sends: its configuration, the users and items of the requests, their bodies,
and the top-up of histories shorter than the run asks for.

Users with at least H behaviours in the data set are used as they are; when fewer than MIN_USERS
have that many, the longest histories are topped up through POST /events with real item ids (the
report says how many).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import typer

MIN_USERS = 20
BENCH_USERS = 200
DISTINCT_REQUESTS = 256


@dataclass
class BenchConfig:
    url: str | None = None
    data: Path = Path("data/demo")
    workers: int = 1
    list_length: int = 100
    history: int = 50
    requests: int = 2000  # per endpoint in the one-client phase
    duration_s: float = 10.0
    concurrency: int = 16
    shadow_rate: float = 0.0  # > 0: shadow sampling at this rate against 0, instead of the usual phases
    tracing: bool = False  # tracing on (spans exported over OTLP) against off, instead of the usual phases
    baseline_tree: Path | None = None  # a source tree's server against this one's, instead of the usual phases
    rates: tuple[float, ...] = ()  # open-loop arrival rates (requests/s), instead of the usual phases
    max_connections: int = 256  # open loop: the most connections opened when the others are busy
    poisson_seed: int | None = None  # open loop: Poisson arrivals from this seed (None: evenly spaced)
    var: Path = Path("var/bench")
    load_average: float = 0.0  # 1-minute load average at the start: other processes on the cores


@dataclass
class Workload:
    users: list[str]
    items: list[str]
    actions: tuple[str, ...]
    history: int  # behaviours per bench user's stored profile
    topped_up: int  # users whose history was completed through /events
    max_history: int


def plan_workload(data: Path, history: int, max_history_setting: int) -> tuple[Workload, dict[str, int]]:
    """Bench users and items, and how many behaviours each user still needs (posted via /events)."""

    from training.data.store import check_schema_files, load_schema, read_parquet

    check_schema_files(data)
    schema = load_schema(data)
    cap = max_history_setting or schema.max_history
    effective = min(history, cap)
    counts = read_parquet(data / "behaviours.parquet", columns=["user_id"])["user_id"].value_counts()
    counts = counts.clip(upper=cap)
    rich = counts[counts >= effective]
    chosen = rich if len(rich) >= MIN_USERS else counts.iloc[:MIN_USERS]
    chosen = chosen.iloc[:BENCH_USERS]
    missing = {str(u): int(effective - c) for u, c in chosen.items() if c < effective}
    items = read_parquet(data / "items.parquet", columns=["item_id"])["item_id"]
    item_ids = [str(i) for i in items[items != ""]]
    workload = Workload([str(u) for u in chosen.index], item_ids, schema.actions, effective, len(missing), cap)
    return workload, missing


def request_bodies(workload: Workload, list_length: int, seed: int = 0) -> list[bytes]:
    """DISTINCT_REQUESTS JSON bodies: a bench user and list_length distinct real items, scores descending."""
    if list_length > len(workload.items):
        raise typer.BadParameter(f"--list-length {list_length}: the data set has only {len(workload.items)} items")
    rng = np.random.default_rng(seed)
    bodies = []
    for k in range(DISTINCT_REQUESTS):
        picks = rng.choice(len(workload.items), size=list_length, replace=False)
        scores = np.sort(rng.random(list_length))[::-1]
        body = {
            "user_id": workload.users[k % len(workload.users)],
            "candidates": [
                {"item_id": workload.items[j], "score": round(float(s), 6)} for j, s in zip(picks, scores, strict=True)
            ],
        }
        bodies.append(orjson.dumps(body))
    return bodies


def top_up(base: str, workload: Workload, missing: dict[str, int]) -> None:
    """Complete short histories with real items through POST /events (timestamps in the past)."""
    if not missing:
        return
    rng = np.random.default_rng(1)
    past = int(time.time()) - 86_400
    action = workload.actions[0] if workload.actions else "click"
    for uid, n in missing.items():
        events = [
            {
                "user_id": uid,
                "item_id": workload.items[int(j)],
                "action": action,
                "timestamp": past - k,
                "event_id": f"bench-{uid}-{k}",
            }
            for k, j in enumerate(rng.integers(0, len(workload.items), size=n))
        ]
        post_json(f"{base}/events", {"events": events})


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, orjson.dumps(body), {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
