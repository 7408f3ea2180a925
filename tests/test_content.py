"""Item content: tokens from codes, raw content -> the assignment graph's arrays (one encoder for the
service and `psad items load`), and `psad items load` against a real redis-server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
from typer.testing import CliRunner

from export.contract.content import (
    ContentError,
    encode_content,
    encode_contents,
    from_stored,
    sid_tokens,
    to_stored,
)
from export.contract.schema import CategoricalFeature, FeatureSchema, NumericFeature, Vocab, Vocabularies
from psad.cli import app
from psad.load_items import bulk_load_items
from service.profiles import ITEM_LOADED_FIELD, item_key, items_marker_key
from tests.test_service_cli import clean_env  # noqa: F401  # a fixture: the CLI writes PSAD_* variables

DECADES = ["1970s", "1980s", "1990s"]
SCHEMA = FeatureSchema(
    n_items=5,
    actions=("click",),
    max_history=3,
    max_list=4,
    item_categorical=(CategoricalFeature("decade", len(DECADES) + 2), CategoricalFeature("studio", 4)),
    item_numeric=(NumericFeature("year", mean=1990.0, std=8.0), NumericFeature("popularity")),
    item_content=("decade", "year"),
)
VOCABS = Vocabularies(items=Vocab(["a", "b", "c"]), user_categorical={}, item_content={"decade": Vocab(DECADES)})


def test_tokens_are_the_codes_in_mixed_radix_after_the_reserved_rows():
    codes = np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0], [3, 3, 3]])
    assert sid_tokens(codes, 4).tolist() == [2, 3, 2 + 16, 2 + 63]
    assert sid_tokens(codes.astype(np.uint8)[None], 4).shape == (1, 4)  # any leading shape, byte codes
    every = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    assert len(set(sid_tokens(every, 5).tolist())) == 125  # one token per code tuple


@pytest.mark.parametrize(
    ("codes", "size", "message"),
    [
        (np.array([[0, 4]]), 4, "codes must be in 0..3"),
        (np.array([[0, 1]]), 257, "codebook_size must be in 1..256"),
        (np.array([[0.0, 1.0]]), 4, "integer array"),
        (np.zeros((1, 8), np.int64), 256, "do not fit an int64"),
    ],
)
def test_tokens_refuse_codes_they_cannot_hold(codes, size, message):
    with pytest.raises(ContentError, match=message):
        sid_tokens(codes, size)


def test_content_encodes_in_schema_order_with_missing_and_unknown_values():
    cat, num = encode_content(SCHEMA, VOCABS, {"decade": "1990s", "year": 1994}, "c")
    assert cat.dtype == np.int64 and num.dtype == np.float32
    assert cat.tolist() == [4] and num.tolist() == [1994.0]
    cat, num = encode_content(SCHEMA, VOCABS, {"decade": "2020s"}, "c")  # unknown value: OOV; missing: the mean
    assert cat.tolist() == [1] and num.tolist() == [1990.0]
    cat, num = encode_content(SCHEMA, VOCABS, {"decade": None}, "c")  # None is missing: PAD
    assert cat.tolist() == [0]
    cats, nums = encode_contents(SCHEMA, VOCABS, [{}, {"year": 2001.5}], ["a", "b"])
    assert cats.shape == (2, 1) and nums[:, 0].tolist() == [1990.0, 2001.5]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"studio": "s1"}, r"c\.studio: not a content feature .* its content features are \['decade', 'year'\]"),
        ({"genre": "x", "decade": "1990s"}, r"c\.genre: not a content feature"),
        ({"decade": 1990}, r"c\.decade: a categorical content feature takes its raw value as a string"),
        ({"year": "1994"}, r"c\.year: a numeric content feature takes a number, got str"),
        ({"year": True}, r"c\.year: a numeric content feature takes a number, got bool"),
        ({"year": float("nan")}, r"c\.year: must be a finite number"),
        ({"year": float("inf")}, r"c\.year: must be a finite number"),
        ({"year": 1e39}, r"c\.year: must be a finite number within float32 range"),
        (["decade"], r"^c: expected an object"),
    ],
)
def test_malformed_content_names_the_feature_and_the_fix(raw, message):
    with pytest.raises(ContentError, match=message):
        encode_content(SCHEMA, VOCABS, raw, "c")


def test_stored_text_reads_back_to_the_same_encoding():
    raw = {"decade": "1980s", "year": 1987.123456789}
    stored = to_stored(SCHEMA, raw)
    assert stored == {"decade": "1980s", "year": repr(1987.123456789)}
    back = from_stored(SCHEMA, stored, "redis item 'x'")
    for a, b in zip(encode_content(SCHEMA, VOCABS, back, "x"), encode_content(SCHEMA, VOCABS, raw, "x"), strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(ContentError, match=r"redis item 'x'\.year: stored value 'soon' is not a number"):
        from_stored(SCHEMA, {"year": "soon"}, "redis item 'x'")


# `psad items load`, on a simulator data set with content and cold items. Its content is numeric;
# the item category is declared content too, so categorical values are loaded as well.


@pytest.fixture(scope="module")
def content_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data.synthetic import SimulatorConfig, build_synthetic

    out = tmp_path_factory.mktemp("content") / "sim"
    config = SimulatorConfig(content_dim=3, cold_items=0.25)
    build_synthetic(
        out, lists=300, users=20, items=40, list_length=6, max_history=5, seed=0, progress=False, config=config
    )
    schema = json.loads((out / "schema.json").read_text())
    (category,) = schema["item_categorical"]
    schema["item_content"].append("category")
    (out / "schema.json").write_text(json.dumps(schema))
    vocab = json.loads((out / "vocab.json").read_text())
    vocab["item_content"]["category"] = [f"c{k}" for k in range(category["cardinality"] - 2)]
    (out / "vocab.json").write_text(json.dumps(vocab))
    return out


def stored_items(client: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    keys = sorted(k.decode() for k in client.scan_iter(item_key(prefix, "*")))
    return {
        k.removeprefix(item_key(prefix, "")): {a.decode(): b.decode() for a, b in client.hgetall(k).items()}
        for k in keys
    }


def test_items_load_writes_the_cold_items_content_as_raw_values(content_data: Path, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    stats = bulk_load_items(redis_server.url, content_data, which="cold", prefix="itemtest", progress=False)
    schema = FeatureSchema.load(content_data / "schema.json")
    items = pd.read_parquet(content_data / "items.parquet")
    cold = items.iloc[schema.n_known_items :]
    assert stats["items"] == len(cold) == 10
    stored = stored_items(client, "itemtest")
    assert sorted(stored) == sorted(cold["item_id"])
    first = cold.iloc[0]
    fields = stored[first["item_id"]]
    assert fields.pop(ITEM_LOADED_FIELD).isdigit()
    assert fields["category"] == f"c{first['category'] - 2}"
    assert float(fields["content_0"]) == float(first["content_0"])  # exact: repr of the stored float
    marker = json.loads(client.get(items_marker_key("itemtest")))
    assert marker["items"] == 10 and marker["which"] == "cold" and marker["source"] == str(content_data)
    bulk_load_items(redis_server.url, content_data, which="all", prefix="itemtest", progress=False)
    assert len(stored_items(client, "itemtest")) == schema.n_items - 2  # an upsert: all items, once each
    client.close()


def broken_copy(src: Path, dst: Path, row: int, column: str, value: object) -> Path:
    shutil.copytree(src, dst)
    items = pd.read_parquet(dst / "items.parquet")
    if isinstance(value, float):
        items[column] = items[column].astype(np.float64)
    items.loc[row, column] = value
    items.to_parquet(dst / "items.parquet", index=False)
    return dst


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("content_1", float("inf"), "column content_1: must be a finite number"),
        ("category", 99, "column category: 99 is no index of vocab.json item_content.category"),
        ("item_id", "", "column item_id: expected a non-empty item id"),
    ],
)
@pytest.mark.usefixtures("clean_env")
def test_items_load_names_the_file_row_and_column_and_writes_nothing(
    content_data: Path, redis_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, column, value, message
):
    monkeypatch.setenv("PSAD_KEY_PREFIX", "badload")
    schema = FeatureSchema.load(content_data / "schema.json")
    row = schema.n_known_items + 3
    data = broken_copy(content_data, tmp_path / "bad", row, column, value)
    result = CliRunner().invoke(app, ["items", "load", "--data", str(data), "--redis-url", redis_server.url])
    assert result.exit_code != 0
    assert f"{data / 'items.parquet'} row {row} {message}" in result.output
    client = redis.Redis.from_url(redis_server.url)
    assert not stored_items(client, "badload") and client.get(items_marker_key("badload")) is None
    client.close()


@pytest.mark.usefixtures("clean_env")
def test_items_load_says_what_to_do_without_content_or_cold_items(
    tiny_data: Path, content_data: Path, redis_server, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PSAD_KEY_PREFIX", "cliload")
    runner = CliRunner()
    no_content = runner.invoke(app, ["items", "load", "--data", str(tiny_data), "--redis-url", redis_server.url])
    assert no_content.exit_code != 0 and "declares no item content" in no_content.output
    wrong = runner.invoke(
        app, ["items", "load", "--data", str(content_data), "--items", "new", "--redis-url", redis_server.url]
    )
    assert wrong.exit_code != 0 and "--items must be one of ['cold', 'all'], got 'new'" in wrong.output
    done = runner.invoke(
        app,
        ["items", "load", "--data", str(content_data), "--items", "all", "--redis-url", redis_server.url],
    )
    assert done.exit_code == 0, done.output
    assert "loaded the content of 40 all items" in done.output
    client = redis.Redis.from_url(redis_server.url)
    assert len(stored_items(client, "cliload")) == 40
    client.close()
