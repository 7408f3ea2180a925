"""`psad items load`: a data set's item content written to Redis, where a sid bundle's service reads
the content of the items its vocabulary does not hold.

Offline tooling (pandas, tqdm), so it lives above the service: it writes through the key layout of
service.profiles and checks every row with export.contract.content (what the service encodes
with) before anything is written, so a bad row fails the load naming its file, row and column and
leaves Redis as it was.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis
import redis.cluster
import typer
from tqdm import tqdm

from export.contract.content import ContentError, encode_content, to_stored
from export.contract.errors import FAILED, fail
from export.contract.schema import N_RESERVED, FeatureSchema, SchemaError, Vocabularies
from service.cli import REDIS_URL, apply_overrides
from service.profiles import ITEM_LOADED_FIELD, STORE_ERRORS, item_key, items_marker_key
from training.data.store import DataError, load_schema, load_vocabs, read_parquet

ITEM_SETS = ("cold", "all")


def item_rows(data_dir: Path, schema: FeatureSchema, vocabs: Vocabularies, which: str) -> list[tuple[str, dict]]:
    """(item id, raw content) of the chosen items, every row checked: "cold" = the items after the
    known ones (first seen after training), "all" = every item. Categoricals are decoded back to
    the raw values of vocab.json (PAD: left out, so missing; OOV: the value the vocabulary lacks is
    not in the data set, so it is stored as "", which encodes as OOV again)."""
    if which not in ITEM_SETS:
        raise DataError(f"--items must be one of {list(ITEM_SETS)}, got {which!r}")
    if not schema.item_content:
        raise DataError(
            f"{data_dir}/schema.json: the data set declares no item content (schema.item_content is empty); "
            "build it with content features (docs/data.md)"
        )
    if which == "cold" and not schema.known_items:
        raise DataError(
            f"{data_dir}/schema.json: the data set has no cold items (schema.known_items = 0: every item is "
            "known to its models); pass --items all to load every item's content"
        )
    for f in schema.content_categorical:
        if "" in vocabs.item_content[f.name].tokens:
            raise DataError(f"{data_dir}/vocab.json: item_content.{f.name} holds '', which stands for OOV here")
    path = data_dir / "items.parquet"
    columns = ["item_index", "item_id", *schema.item_content]
    table = read_parquet(path)
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise DataError(f"{path}: column(s) {absent} missing; rebuild the data set with `psad data build`")
    first = N_RESERVED if which == "all" else schema.n_known_items
    table = table[columns].iloc[first:]
    return list(_checked(path, table, schema, vocabs))


def _checked(
    path: Path, table: pd.DataFrame, schema: FeatureSchema, vocabs: Vocabularies
) -> Iterator[tuple[str, dict]]:
    tokens = {f.name: vocabs.item_content[f.name].tokens for f in schema.content_categorical}
    numeric = [f.name for f in schema.content_numeric]
    for row, values in zip(table.index, table.to_dict("records"), strict=True):
        at = f"{path} row {row}"
        item_id = values["item_id"]
        if not isinstance(item_id, str) or not item_id:
            raise DataError(f"{at} column item_id: expected a non-empty item id, got {item_id!r}")
        raw: dict[str, Any] = {}
        for name, vocab in tokens.items():
            idx = values[name]
            if not isinstance(idx, (int, np.integer)) or not 0 <= idx < len(vocab) + N_RESERVED:
                raise DataError(f"{at} column {name}: {idx!r} is no index of vocab.json item_content.{name}")
            if idx >= N_RESERVED:
                raw[name] = vocab[idx - N_RESERVED]
            elif idx == 1:
                raw[name] = ""
        for name in numeric:
            x = values[name]
            raw[name] = None if isinstance(x, float) and np.isnan(x) else x  # NaN: missing (the mean)
        try:
            encode_content(schema, vocabs, raw, "content")
        except ContentError as exc:
            raise DataError(f"{at} column {str(exc).removeprefix('content.')}") from None
        yield item_id, raw


def bulk_load_items(
    redis_url: str,
    data_dir: Path,
    *,
    which: str = "cold",
    prefix: str = "psad",
    batch: int = 1000,
    progress: bool = True,
    cluster: bool = False,
) -> dict[str, Any]:
    """Write the chosen items' content (item_rows) as `<prefix>:i:<item_id>` hashes, then the
    `<prefix>:items` marker; returns items, seconds and rate. An upsert: each hash is replaced
    (DEL + HSET in one transaction per item), so a feature removed from the data set goes too."""
    data_dir = Path(data_dir)
    schema = load_schema(data_dir)
    vocabs = load_vocabs(data_dir, schema)
    rows = item_rows(data_dir, schema, vocabs, which)  # every row checked before anything is written
    client = redis.cluster.RedisCluster.from_url(redis_url) if cluster else redis.Redis.from_url(redis_url)
    start = time.perf_counter()
    loaded_at = str(int(time.time()))
    try:
        client.ping()
        bar = tqdm(total=len(rows), unit="item", disable=not progress, desc="items")
        for s in range(0, len(rows), batch):
            pipe = client.pipeline(transaction=not cluster)
            for item_id, raw in rows[s : s + batch]:
                key = item_key(prefix, item_id)
                fields = to_stored(schema, raw)
                fields[ITEM_LOADED_FIELD] = loaded_at
                pipe.delete(key)
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py types the keys invariantly: str is valid
            pipe.execute()
            bar.update(min(batch, len(rows) - s))
        bar.close()
        marker = {
            "generation": uuid.uuid4().hex,
            "loaded_at": int(loaded_at),
            "source": str(data_dir),
            "items": len(rows),
            "which": which,
        }
        client.set(items_marker_key(prefix), json.dumps(marker))  # only once all is in
    finally:
        client.close()
    seconds = time.perf_counter() - start
    return {"items": len(rows), "seconds": seconds, "rate": len(rows) / max(seconds, 1e-9)}


def items_load_command(
    data: Path = typer.Option(..., "--data", help="Data set directory (built by `psad data build`)."),
    items: str = typer.Option(
        "cold", "--items", help="cold: the items first seen after the training period; all: every item."
    ),
    redis_url: str | None = REDIS_URL,
) -> None:
    """Write a data set's item content to Redis, for sid bundles to rank new items from (an upsert)."""
    settings = apply_overrides(redis_url=redis_url)
    try:
        stats = bulk_load_items(
            settings.redis_url,
            data,
            which=items,
            prefix=settings.key_prefix,
            progress=True,
            cluster=settings.redis_cluster,
        )
    except (DataError, SchemaError) as exc:
        raise fail(exc) from None
    except STORE_ERRORS as exc:
        raise fail(
            f"Redis at {settings.redis_url}: {exc}; start redis-server or pass --redis-url, and rerun (an upsert: "
            f"the items marker {items_marker_key(settings.key_prefix)} is written only once every item is)",
            FAILED,
        ) from None
    typer.echo(
        f"loaded the content of {stats['items']:,} {items} items into {settings.redis_url} "
        f"in {stats['seconds']:.1f}s ({stats['rate']:,.0f} items/s)"
    )
