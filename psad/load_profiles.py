"""`psad profiles load`: a data set's users and behaviours written to Redis as the service reads them.

Offline tooling (pandas, tqdm), so it lives above the service: it writes through the key layout
and the append script of service.profiles, the one place they are defined.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import redis
import redis.cluster
import typer
from tqdm import tqdm

from export.contract.errors import FAILED, fail
from export.contract.schema import FeatureSchema, SchemaError, Vocabularies
from service.cli import REDIS_URL, apply_overrides
from service.profiles import APPEND_LUA, STORE_ERRORS, history_key, member, user_key, write_marker
from training.data.store import DataError, check_schema_files, load_schema, load_vocabs, read_parquet


def _user_rows(
    users: pd.DataFrame, schema: FeatureSchema, vocabs: Vocabularies
) -> Iterable[tuple[str, dict[str, str]]]:
    """users.parquet holds encoded categoricals: decode them back to raw values (PAD/OOV -> absent)."""
    cat = {f.name: vocabs.user_categorical[f.name].tokens for f in schema.user_categorical}
    num = [f.name for f in schema.user_numeric]
    for row in users.itertuples(index=False):
        values = row._asdict()
        fields = {}
        for name, tokens in cat.items():
            idx = int(values[name])
            if 2 <= idx < len(tokens) + 2:
                fields[name] = tokens[idx - 2]
        for name in num:
            x = float(values[name])
            if math.isfinite(x):
                fields[name] = repr(x)
        yield str(values["user_id"]), fields


def bulk_load(
    redis_url: str,
    data_dir: Path,
    *,
    prefix: str = "psad",
    ttl_s: int = 30 * 86_400,
    history_len: int | None = None,
    batch: int = 1000,
    progress: bool = True,
    cluster: bool = False,
) -> dict[str, float]:
    """Write a data set's users and behaviours as profiles; returns users, behaviours (written, at
    most history_len per user), seconds and rate (records written per second, users + behaviours).

    An upsert: re-loading the same data set stores nothing twice (behaviour event ids are the row
    numbers of behaviours.parquet) and keeps events appended online. history_len defaults to the
    data set's schema.max_history. Once everything is written, the load marker is (re)written.
    """
    data_dir = Path(data_dir)
    schema = load_schema(data_dir)
    vocabs = load_vocabs(data_dir, schema)
    cap = history_len if history_len is not None else schema.max_history
    users = read_parquet(data_dir / "users.parquet")
    behaviours = read_parquet(data_dir / "behaviours.parquet", columns=["user_id", "item_id", "timestamp", "action"])
    client = redis.cluster.RedisCluster.from_url(redis_url) if cluster else redis.Redis.from_url(redis_url)
    client.ping()
    script = client.register_script(APPEND_LUA)

    def append(keys: list[str], args: list, client: redis.client.Pipeline) -> None:
        if cluster:  # EVAL: routed by its keys, and no node has to have cached the script
            client.execute_command("EVAL", APPEND_LUA, len(keys), *keys, *args)
        else:
            script(keys=keys, args=args, client=client)

    start = time.perf_counter()
    bar = tqdm(total=len(users) + len(behaviours), unit="rec", disable=not progress, desc="profiles")
    n_behaviours = 0
    pipe = client.pipeline(transaction=False)
    pending = 0

    def flush() -> None:
        nonlocal pipe, pending
        pipe.execute()
        bar.update(pending)
        pipe, pending = client.pipeline(transaction=False), 0

    for uid, fields in _user_rows(users, schema, vocabs):
        if fields:
            pipe.hset(user_key(prefix, uid), mapping=fields)  # type: ignore[arg-type]  # redis-py types the keys invariantly: str is valid
            if ttl_s:
                pipe.expire(user_key(prefix, uid), ttl_s)
        pending += 1
        if pending >= batch:
            flush()
    rows = np.arange(len(behaviours))
    for uid, group in behaviours.assign(row=rows).groupby("user_id", sort=False):
        bar.update(len(group) - min(len(group), cap or len(group)))  # rows beyond the cap are skipped
        group = group.iloc[-cap:] if cap else group
        n_behaviours += len(group)
        args: list = []
        for item, ts, action, row in zip(
            group["item_id"], group["timestamp"], group["action"], group["row"], strict=True
        ):
            args += [int(ts), member(int(ts), str(action), f"b{row}", str(item))]
        append(keys=[history_key(prefix, str(uid)), user_key(prefix, str(uid))], args=[cap, ttl_s, *args], client=pipe)
        pending += len(group)
        if pending >= batch:
            flush()
    flush()
    write_marker(client, prefix, str(data_dir), users=len(users), behaviours=n_behaviours)  # only once all is in
    bar.close()
    client.close()
    seconds = time.perf_counter() - start
    total = len(users) + n_behaviours
    return {"users": len(users), "behaviours": n_behaviours, "seconds": seconds, "rate": total / max(seconds, 1e-9)}


def profiles_load_command(
    data: Path = typer.Option(..., "--data", help="Data set directory (built by `psad data build`)."),
    redis_url: str | None = REDIS_URL,
    ttl_s: int | None = typer.Option(None, "--ttl-s", min=0, help="Profile TTL (overrides PSAD_PROFILE_TTL_S)."),
) -> None:
    """Write a data set's users and behaviours to Redis as profiles (an idempotent upsert)."""
    settings = apply_overrides(redis_url=redis_url, profile_ttl_s=ttl_s)
    try:
        check_schema_files(data)
        stats = bulk_load(
            settings.redis_url,
            data,
            prefix=settings.key_prefix,
            ttl_s=settings.profile_ttl_s,
            history_len=settings.history_len or None,
            progress=True,
            cluster=settings.redis_cluster,
        )
    except (DataError, SchemaError) as exc:
        raise fail(exc) from None
    except STORE_ERRORS as exc:
        raise fail(f"Redis at {settings.redis_url}: {exc}; start redis-server or pass --redis-url", FAILED) from None
    typer.echo(
        f"loaded {stats['users']:,} users and {stats['behaviours']:,} behaviours into {settings.redis_url} "
        f"in {stats['seconds']:.1f}s ({stats['rate']:,.0f} records/s)"
    )
