"""The shadow record format (export/contract/shadow.py): what the service writes, the consumer reads."""

from __future__ import annotations

import numpy as np
import pytest

from export.contract import shadow
from export.contract.schema import INPUT_NAMES


def list_record(n: int = 5, h: int = 3) -> shadow.ListRecord:
    rng = np.random.default_rng(0)
    inputs = {
        "user_cat": rng.integers(0, 5, (1, 2)),
        "user_num": rng.random((1, 1), dtype=np.float32),
        "hist_items": rng.integers(0, 9, (1, h)),
        "hist_actions": rng.integers(0, 3, (1, h)),
        "hist_age": rng.random((1, h), dtype=np.float32),
        "hist_mask": np.ones((1, h), dtype=bool),
        "cand_items": rng.integers(0, 9, (1, n)),
        "cand_num": rng.random((1, n, 2), dtype=np.float32),
        "cand_mask": np.ones((1, n), dtype=bool),
    }
    return shadow.ListRecord(
        request_id="req-1",
        time=1_700_000_000.25,
        model="psad",
        version=3,
        user_id="u1",
        items=[f"i{i}" for i in range(n)],
        scores=[float(s) for s in rng.random(n)],
        served=[4, 0, 2],
        degraded_reasons=["redis_timeout"],
        inputs=inputs,
    )


def test_a_list_record_survives_the_round_trip() -> None:
    record = list_record()
    back = shadow.decode(shadow.encode(record))
    assert isinstance(back, shadow.ListRecord)
    assert back.items == record.items and back.scores == record.scores and back.served == record.served
    assert (back.request_id, back.version, back.user_id, back.time) == ("req-1", 3, "u1", record.time)
    for name in INPUT_NAMES:
        assert back.inputs[name].dtype == record.inputs[name].dtype
        np.testing.assert_array_equal(back.inputs[name], record.inputs[name])


def test_a_sliced_batch_row_is_recorded_as_scored() -> None:
    """The service records row i of a padded batch: a view, not contiguous memory."""
    batch = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    record = list_record()
    record.inputs["cand_num"] = batch[1:2, :, ::2]
    back = shadow.decode(shadow.encode(record))
    np.testing.assert_array_equal(back.inputs["cand_num"], batch[1:2, :, ::2])


def test_a_click_record_survives_the_round_trip() -> None:
    click = shadow.ClickRecord("req-1", 1_700_000_001.0, "u1", "i3", "click", None)
    assert shadow.decode(shadow.encode(click)) == click


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda f: f.update({b"v": b"99"}), "field v"),
        (lambda f: f.pop(b"v"), "field v"),
        (lambda f: f.update({b"kind": b"view"}), "field kind"),
        (lambda f: f.update({b"meta": b"{not json"}), "field meta"),
        (lambda f: f.update({b"in.cand_items": f[b"in.cand_items"][:-3]}), "field in.cand_items"),
        (lambda f: f.pop(b"in.hist_mask"), "field in.hist_mask"),
    ],
)
def test_a_broken_entry_is_refused_naming_the_field(change, field: str) -> None:
    fields = shadow.encode(list_record())
    change(fields)
    with pytest.raises(shadow.RecordError, match=field):
        shadow.decode(fields)


@pytest.mark.parametrize(
    ("meta_change", "field"),
    [
        ({"version": "3"}, "meta.version"),
        ({"served": [0, 0]}, "served"),
        ({"served": [7]}, "served"),
        ({"scores": [1.0]}, "items/scores"),
        ({"time": -1.0}, "meta.time"),
    ],
)
def test_bad_metadata_is_refused_naming_the_field(meta_change: dict, field: str) -> None:
    import orjson

    fields = shadow.encode(list_record())
    meta = {**orjson.loads(fields[b"meta"]), **meta_change}
    fields[b"meta"] = orjson.dumps(meta)
    with pytest.raises(shadow.RecordError, match=field):
        shadow.decode(fields)


def test_sampling_is_deterministic_and_near_the_rate() -> None:
    ids = [f"{i:032x}" for i in range(20_000)]
    picked = [i for i in ids if shadow.sampled(i, 0.1)]
    assert picked == [i for i in ids if shadow.sampled(i, 0.1)]
    assert 1_800 < len(picked) < 2_200
    assert set(picked) <= {i for i in ids if shadow.sampled(i, 0.5)}  # a higher rate keeps the lower's sample
    assert not any(shadow.sampled(i, 0.0) for i in ids[:100])
    assert all(shadow.sampled(i, 1.0) for i in ids[:100])


def test_xadd_trims_the_stream_approximately() -> None:
    command = shadow.xadd_command("psad", {b"v": b"1"}, 1000)
    assert command[:6] == ("XADD", "psad:{shadow}:records", "MAXLEN", "~", 1000, "*")
    assert command[6:] == (b"v", b"1")


# The rule, for writers in other languages: the first 8 bytes of BLAKE2b-64 of the request id's
# UTF-8 bytes, read little-endian, divided by 2**64; sampled when below the rate.
GOLDEN = [
    ("req-1", 0.045033117725624114),
    ("2dfeef5048ea40b80000000000000e55", 0.07840650059397891),
    ("ü-42", 0.38634398490964506),
]


@pytest.mark.parametrize(("request_id", "fraction"), GOLDEN)
def test_sampling_follows_the_documented_hash(request_id: str, fraction: float) -> None:
    assert shadow.sampled(request_id, fraction + 1e-9)
    assert not shadow.sampled(request_id, fraction - 1e-9)


def test_an_input_of_another_dtype_is_refused() -> None:
    record = list_record()
    record.inputs["cand_items"] = record.inputs["cand_items"].astype(np.float32)
    with pytest.raises(shadow.RecordError, match="meta.inputs.cand_items: expected dtype int64"):
        shadow.decode(shadow.encode(record))
