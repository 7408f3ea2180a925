"""Locust load test of a PSAD deployment: POST /rerank with realistic lists, POST /events less often,
clicking items of recent answers.

    PSAD_LOADTEST_DATA=data/demo locust -f loadtest/locustfile.py --headless \\
        --host http://127.0.0.1:8000 -u 50 -r 10 -t 2m

Users and items come from a data set directory (users.parquet / items.parquet, as written by
`psad data build`) when PSAD_LOADTEST_DATA names one, so requests hit real profiles and known
items; otherwise from synthetic ids (every request is then a cold-start user with unknown items,
which the service answers as degraded).

An event acts on an answer: one of the last answers this process received, its user, and an item
drawn with a probability falling with its rank in the answer (1 / rank ** CLICK_BIAS), as users
click what they see on top. It names the answer's `request_id`, so `psad shadow run` can join it
to the sampled list. Before the first answer an event names a random user and item and no request.

Other knobs, all environment variables:

    PSAD_LOADTEST_LIST_LENGTH   candidates per request (default 100)
    PSAD_LOADTEST_EVENTS_EVERY  one /events call per this many /rerank calls (default 10)
    PSAD_LOADTEST_ACTION        action of posted events (default "click" when the data set has it, else its first)
    PSAD_LOADTEST_CLICK_BIAS    position bias of clicks: 0 = any rank alike, 1 = 1/rank (default 1.0)
    PSAD_LOADTEST_RECENT        answers remembered for clicks, per locust process (default 1000)
    PSAD_LOADTEST_SEED          seed of the request generator (default 0)
    PSAD_LOADTEST_RATE          task runs (/rerank and /events together) per second per user, locust's
                                constant_throughput (default 0: the next 0-10 ms after an answer)
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from locust import FastHttpUser, between, constant_throughput, events, task


def env_number(name: str, default: float, minimum: float, kind: type[int] | type[float] = int) -> float:
    """A numeric knob; a bad value stops locust with one line naming the variable."""
    expected = f"expected {'an integer' if kind is int else 'a number'} >= {minimum}"
    raw = os.environ.get(name, str(default))
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: {expected}") from None
    if not value >= minimum:  # also refuses nan
        raise SystemExit(f"{name}={value}: {expected}")
    return value


def env_int(name: str, default: int, minimum: int) -> int:
    return int(env_number(name, default, minimum, int))


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
    return Population(users, [str(i) for i in items[items != ""]], default_action(actions), f"data set {root}")


def default_action(actions: list[str]) -> str:
    """`click` when the data set has it, since the events pick items as users click them (biased to
    the top) and a data set's first action is often `view`; otherwise its first action."""
    return "click" if "click" in actions else actions[0]


POPULATION = load_population(os.environ.get("PSAD_LOADTEST_DATA"))
LIST_LENGTH = env_int("PSAD_LOADTEST_LIST_LENGTH", 100, 1)
EVENTS_EVERY = env_int("PSAD_LOADTEST_EVENTS_EVERY", 10, 1)
ACTION = os.environ.get("PSAD_LOADTEST_ACTION", POPULATION.action)
CLICK_BIAS = env_number("PSAD_LOADTEST_CLICK_BIAS", 1.0, 0.0, float)
RNG = random.Random(env_int("PSAD_LOADTEST_SEED", 0, 0))
RATE = env_number("PSAD_LOADTEST_RATE", 0.0, 0.0, float)
# Answers received (request id, user id, item ids in the answer's order), newest last; locust's
# users of one process are greenlets, so they share it without locks.
RECENT: deque[tuple[str, str, list[str]]] = deque(maxlen=env_int("PSAD_LOADTEST_RECENT", 1000, 1))
CLICK_WEIGHTS = list(accumulate(1.0 / rank**CLICK_BIAS for rank in range(1, LIST_LENGTH + 1)))

if len(POPULATION.items) < LIST_LENGTH:
    raise SystemExit(f"PSAD_LOADTEST_LIST_LENGTH={LIST_LENGTH}: only {len(POPULATION.items)} items available")


@events.init.add_listener
def describe(environment: object, **_kwargs: object) -> None:
    print(
        f"psad loadtest: {len(POPULATION.users):,} users, {len(POPULATION.items):,} items from {POPULATION.source}; "
        f"{LIST_LENGTH} candidates per /rerank, one /events per {EVENTS_EVERY} /rerank, "
        f"clicks on recent answers with probability 1/rank^{CLICK_BIAS:g}; "
        + (f"{RATE:g} task runs per second per user" if RATE else "each user's next task 0-10 ms after its answer")
    )


def click_event() -> dict[str, object]:
    """An /events body: a click on an item of a recent answer, biased to its top, naming its request."""
    if not RECENT:
        return {"user_id": RNG.choice(POPULATION.users), "item_id": RNG.choice(POPULATION.items)}
    request_id, user_id, items = RNG.choice(RECENT)
    (item,) = RNG.choices(items, cum_weights=CLICK_WEIGHTS[: len(items)])
    return {"user_id": user_id, "item_id": item, "request_id": request_id}


class RerankUser(FastHttpUser):
    """A ranking stage calling the reranker, and the event pipeline feeding behaviours back."""

    # A constant rate per user (PSAD_LOADTEST_RATE) holds while answers take less than 1 / rate; a user
    # still waits for its answer, so past that the rate falls (`psad bench service --rate` does not).
    wait_time = constant_throughput(RATE) if RATE else between(0.0, 0.01)

    @task(EVENTS_EVERY)
    def rerank(self) -> None:
        items = RNG.sample(POPULATION.items, LIST_LENGTH)
        scores = sorted((RNG.random() for _ in items), reverse=True)
        user = RNG.choice(POPULATION.users)
        body = {
            "user_id": user,
            "candidates": [{"item_id": i, "score": round(s, 6)} for i, s in zip(items, scores, strict=True)],
        }
        with self.client.post("/rerank", json=body, name="/rerank", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            else:
                answer = resp.json()
                if len(answer["items"]) != LIST_LENGTH:
                    resp.failure("answer does not hold every candidate")
                else:
                    RECENT.append((answer["request_id"], user, [i["item_id"] for i in answer["items"]]))

    @task(1)
    def event(self) -> None:
        body = {**click_event(), "action": ACTION, "timestamp": int(time.time())}
        with self.client.post("/events", json=body, name="/events", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
