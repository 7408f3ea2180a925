"""The feature schema and input assembly: the contract training, export and serving share."""

import json

import numpy as np
import pytest

from export.contract.inputs import EncodedProfile, assemble, cold_start_profile
from export.contract.schema import (
    OOV,
    CategoricalFeature,
    FeatureSchema,
    NumericFeature,
    SchemaError,
    Vocab,
    Vocabularies,
    model_inputs,
)


def make_schema(**overrides) -> FeatureSchema:
    base = dict(
        n_items=12,
        actions=("view", "click"),
        max_history=3,
        max_list=5,
        user_categorical=(CategoricalFeature("gender", 4),),
        user_numeric=(NumericFeature("activity", 1.0, 2.0),),
        item_numeric=(NumericFeature("quality"),),
    )
    base.update(overrides)
    return FeatureSchema(**base)


def test_round_trip(tmp_path):
    schema = make_schema()
    schema.save(tmp_path / "schema.json")
    assert FeatureSchema.load(tmp_path / "schema.json") == schema


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.update(colour="red"), "unknown field"),
        (lambda d: d.pop("n_items"), "n_items"),
        (lambda d: d.update(max_history=-1), "max_history"),
        (lambda d: d.update(label="stars"), "label"),
        (lambda d: d["user_numeric"][0].update(std=0.0), "activity.std"),
        (lambda d: d.update(n_items="x"), r"schema\.json: schema\.n_items must be an integer, got 'x'"),
        (lambda d: d.update(max_list=5.5), r"schema\.max_list must be an integer, got 5\.5"),
        (lambda d: d.update(actions="click"), r"schema\.actions must be a list"),
        (lambda d: d["user_categorical"][0].update(cardinality="10"), r"user_categorical\[0\]\.cardinality must be an"),
        (lambda d: d["user_numeric"][0].update(mean="0.2"), r"user_numeric\[0\]\.mean must be a number"),
        (lambda d: d["user_numeric"][0].pop("name"), r"user_numeric\[0\]: missing required field 'name'"),
        (lambda d: d.update(item_numeric=[[1]]), r"item_numeric\[0\] must be an object, got \[1\]"),
        (lambda d: d.update(extra=[]), r"schema\.extra must be an object"),
    ],
)
def test_invalid_schema_names_the_field(tmp_path, edit, message):
    raw = make_schema().to_dict()
    edit(raw)
    (tmp_path / "schema.json").write_text(json.dumps(raw))
    with pytest.raises(SchemaError, match=message):
        FeatureSchema.load(tmp_path / "schema.json")


def test_missing_and_corrupt_schema_files(tmp_path):
    with pytest.raises(SchemaError, match="not found"):
        FeatureSchema.load(tmp_path / "schema.json")
    (tmp_path / "schema.json").write_text("{not json")
    with pytest.raises(SchemaError, match="not valid JSON"):
        FeatureSchema.load(tmp_path / "schema.json")


def test_vocab_maps_unknown_to_oov(tmp_path):
    vocab = Vocab(["a", "b"])
    assert vocab.indices(["a", "b", "zzz"]) == [2, 3, OOV]
    schema = make_schema(n_items=4)
    vocabs = Vocabularies(items=vocab, user_categorical={"gender": Vocab(["f", "m"])})
    vocabs.save(tmp_path / "vocab.json")
    loaded = Vocabularies.load(tmp_path / "vocab.json", schema)
    assert loaded.items.index("b") == 3
    with pytest.raises(SchemaError, match="n_items"):
        Vocabularies.load(tmp_path / "vocab.json", make_schema(n_items=9))
    for text, message in [
        ("[]", "vocab must be an object"),
        ('{"version": 1}', "vocab: missing required field 'items'"),
    ]:
        (tmp_path / "vocab.json").write_text(text)
        with pytest.raises(SchemaError, match=rf"vocab\.json: {message}"):
            Vocabularies.load(tmp_path / "vocab.json", schema)


def profile(ts: list[int]) -> EncodedProfile:
    n = len(ts)
    return EncodedProfile(
        user_cat=np.array([2]),
        user_num=np.array([0.5], np.float32),
        hist_items=np.arange(2, 2 + n),
        hist_ts=np.array(ts, np.int64),
        hist_actions=np.full(n, 3),
    )


def test_assemble_pads_truncates_and_never_leaks_the_future():
    schema = make_schema()
    day = 86_400
    profiles = [profile([0, day, 2 * day, 3 * day, 10 * day]), cold_start_profile(schema)]
    out = assemble(
        schema,
        profiles,
        cand_items=[np.array([5, 6, 7]), np.array([8])],
        cand_num=[np.ones((3, 1), np.float32), np.zeros((1, 1), np.float32)],
        now=[4 * day, 4 * day],
    )
    assert [s.name for s in model_inputs(schema)] == list(out)
    # the behaviour at day 10 is after the request: excluded; the last max_history=3 kept
    assert out["hist_items"][0].tolist() == [3, 4, 5]
    assert out["hist_age"][0].tolist() == [3.0, 2.0, 1.0]
    assert out["hist_mask"].tolist() == [[True] * 3, [False] * 3]
    assert out["cand_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert out["cand_items"][1].tolist() == [8, 0, 0]
    for spec in model_inputs(schema):
        assert out[spec.name].dtype == np.dtype(spec.dtype)
