"""Locust load test of a PSAD deployment: POST /rerank with realistic lists, POST /events less often.

    PSAD_LOADTEST_DATA=data/demo locust -f loadtest/locustfile.py --headless \\
        --host http://127.0.0.1:8000 -u 50 -r 10 -t 2m

Users and items come from a data set directory (users.parquet / items.parquet, as written by
`psad data build`) when PSAD_LOADTEST_DATA names one, so requests hit real profiles and known
items; otherwise from synthetic ids (every request is then a cold-start user with unknown items,
which the service answers as degraded). Other knobs, all environment variables:

    PSAD_LOADTEST_LIST_LENGTH   candidates per request (default 100)
    PSAD_LOADTEST_EVENTS_EVERY  one /events call per this many /rerank calls (default 10)
    PSAD_LOADTEST_ACTION        action of posted events (default: the data set's first action, else "click")
    PSAD_LOADTEST_SEED          seed of the request generator (default 0)
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from locust import FastHttpUser, between, events, task


def env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise SystemExit(f"{name}={value}: expected an integer >= {minimum}")
    return value


@dataclass
class Population:
    users: list[str]
    items: list[str]
    action: str
    source: str


def load_population(data: str | None) -> Population:
    """Real ids from a data set directory, else synthetic ones."""
    if not data:
        return Population([f"u{i}" for i in range(10_000)], [f"i{i}" for i in range(50_000)], "click", "synthetic ids")
    import pandas as pd

    root = Path(data)
    for name in ("users.parquet", "items.parquet", "schema.json"):
        if not (root / name).is_file():
            raise SystemExit(f"PSAD_LOADTEST_DATA={data}: {name} missing; point it at a `psad data build` directory")
    users = [str(u) for u in pd.read_parquet(root / "users.parquet", columns=["user_id"])["user_id"]]
    items = pd.read_parquet(root / "items.parquet", columns=["item_id"])["item_id"]
    actions = json.loads((root / "schema.json").read_text()).get("actions") or ["click"]
    return Population(users, [str(i) for i in items[items != ""]], actions[0], f"data set {root}")


POPULATION = load_population(os.environ.get("PSAD_LOADTEST_DATA"))
LIST_LENGTH = env_int("PSAD_LOADTEST_LIST_LENGTH", 100, 1)
EVENTS_EVERY = env_int("PSAD_LOADTEST_EVENTS_EVERY", 10, 1)
ACTION = os.environ.get("PSAD_LOADTEST_ACTION", POPULATION.action)
RNG = random.Random(env_int("PSAD_LOADTEST_SEED", 0, 0))

if len(POPULATION.items) < LIST_LENGTH:
    raise SystemExit(f"PSAD_LOADTEST_LIST_LENGTH={LIST_LENGTH}: only {len(POPULATION.items)} items available")


@events.init.add_listener
def describe(environment: object, **_kwargs: object) -> None:
    print(
        f"psad loadtest: {len(POPULATION.users):,} users, {len(POPULATION.items):,} items from {POPULATION.source}; "
        f"{LIST_LENGTH} candidates per /rerank, one /events per {EVENTS_EVERY} /rerank"
    )


class RerankUser(FastHttpUser):
    """A ranking stage calling the reranker, and the event pipeline feeding behaviours back."""

    wait_time = between(0.0, 0.01)

    @task(EVENTS_EVERY)
    def rerank(self) -> None:
        items = RNG.sample(POPULATION.items, LIST_LENGTH)
        scores = sorted((RNG.random() for _ in items), reverse=True)
        body = {
            "user_id": RNG.choice(POPULATION.users),
            "candidates": [{"item_id": i, "score": round(s, 6)} for i, s in zip(items, scores, strict=True)],
        }
        with self.client.post("/rerank", json=body, name="/rerank", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif len(resp.json()["items"]) != LIST_LENGTH:
                resp.failure("answer does not hold every candidate")

    @task(1)
    def event(self) -> None:
        body = {
            "user_id": RNG.choice(POPULATION.users),
            "item_id": RNG.choice(POPULATION.items),
            "action": ACTION,
            "timestamp": int(time.time()),
        }
        with self.client.post("/events", json=body, name="/events", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
