"""Item content: a new item's raw feature values -> the arrays a sid bundle's assignment graph reads,
and an item's codes -> the one token its served graph reads.

One source of truth for both writers of content (`psad items load`, which checks every row before
anything is written) and its one reader (the service, for request and Redis content), so a value
the loader accepts is encoded the same way when it is served. numpy only: the service imports it
without torch.

Raw values are what the data set used: a categorical content feature takes its value as a string
(decade "1990s"), encoded with the bundle's `vocab.json` (an unknown value is OOV, like any
vocabulary), a numeric one a finite number (the model standardises it). A feature left out is
"missing": categorical index 0, numeric the feature's training mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np

from export.contract.schema import N_RESERVED, PAD, CategoricalFeature, FeatureSchema, NumericFeature, Vocabularies

MAX_CODEBOOK_SIZE = 256  # a code is stored in one byte (item_codes.npy is uint8)
SID_TOKEN_OFFSET = N_RESERVED  # tokens 0 and 1 are the item vocabulary's PAD and OOV rows
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ContentError(ValueError):
    """An item's content cannot be encoded; the message names the field (`where.<feature>`) and the fix."""


def sid_tokens(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Codes [..., L] (level 0 first) -> int64 tokens [...]: 2 + sum_l code_l * K**(L-1-l).

    Mixed radix, so a token names one code per level and decodes back without a table; the offset
    keeps 0 for padding, as in every vocabulary."""
    if not 1 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise ContentError(f"codebook_size must be in 1..{MAX_CODEBOOK_SIZE} (a code is one byte), got {codebook_size}")
    codes = np.asarray(codes)
    if codes.ndim < 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ContentError(f"codes must be an integer array [..., levels], got {codes.dtype} of shape {codes.shape}")
    levels = codes.shape[-1]
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ContentError(
            f"codes must be in 0..{codebook_size - 1} (the codebook size), got {codes.min()}..{codes.max()}"
        )
    if levels and math.log2(codebook_size) * levels > 62:
        raise ContentError(f"{levels} levels of {codebook_size} codes do not fit an int64 token; use fewer levels")
    weights = codebook_size ** np.arange(levels - 1, -1, -1, dtype=np.int64)
    return SID_TOKEN_OFFSET + (codes.astype(np.int64) * weights).sum(axis=-1)


def content_features(schema: FeatureSchema) -> list[str]:
    """The content feature names a raw value may use, in schema order (categorical, then numeric)."""
    return [f.name for f in schema.content_categorical] + [f.name for f in schema.content_numeric]


def _categorical(f: CategoricalFeature, value: Any, vocabs: Vocabularies, at: str) -> int:
    if not isinstance(value, str):
        raise ContentError(
            f"{at}: a categorical content feature takes its raw value as a string (as the data set wrote it), "
            f"got {type(value).__name__} {value!r}"
        )
    return vocabs.item_content[f.name].index(value)


def _numeric(f: NumericFeature, value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ContentError(f"{at}: a numeric content feature takes a number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
        raise ContentError(
            f"{at}: must be a finite number within float32 range, got {value!r}; leave it out if unknown"
        )
    return x


def encode_content(
    schema: FeatureSchema, vocabs: Vocabularies, raw: Mapping[str, Any], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """One item's raw content -> (categorical int64 [n_cc], numeric float32 [n_cn]) in schema order,
    what the assignment graph reads. A None value is a missing one. ContentError names
    `where.<feature>` for a name that is no content feature, a wrong type, or a non-finite number."""
    if not isinstance(raw, Mapping):
        raise ContentError(f"{where}: expected an object of content feature -> raw value, got {type(raw).__name__}")
    cats, nums = schema.content_categorical, schema.content_numeric
    unknown = sorted(set(raw) - set(content_features(schema)))
    if unknown:
        raise ContentError(
            f"{where}.{unknown[0]}: not a content feature of this model (unknown: {unknown}); "
            f"its content features are {content_features(schema)}"
        )
    cat = np.full(len(cats), PAD, dtype=np.int64)
    for j, c in enumerate(cats):
        value = raw.get(c.name)
        if value is not None:
            cat[j] = _categorical(c, value, vocabs, f"{where}.{c.name}")
    num = np.array([f.mean for f in nums], dtype=np.float32)
    for j, n in enumerate(nums):
        value = raw.get(n.name)
        if value is not None:
            num[j] = _numeric(n, value, f"{where}.{n.name}")
    return cat, num


def encode_contents(
    schema: FeatureSchema, vocabs: Vocabularies, raws: Sequence[Mapping[str, Any]], where: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """encode_content for a batch: (int64 [N, n_cc], float32 [N, n_cn]); the first bad item's ContentError."""
    if len(raws) != len(where):
        raise ValueError(f"encode_contents: {len(raws)} items but {len(where)} locations")
    encoded = [encode_content(schema, vocabs, raw, at) for raw, at in zip(raws, where, strict=True)]
    cat = np.zeros((len(raws), len(schema.content_categorical)), dtype=np.int64)
    num = np.zeros((len(raws), len(schema.content_numeric)), dtype=np.float32)
    for i, (c, n) in enumerate(encoded):
        cat[i], num[i] = c, n
    return cat, num


def to_stored(schema: FeatureSchema, raw: Mapping[str, Any]) -> dict[str, str]:
    """Raw content as stored text (a Redis hash): categoricals as they are, numerics as decimal
    strings (repr: they read back exactly); missing values are left out."""
    numeric = {f.name for f in schema.content_numeric}
    return {k: repr(float(v)) if k in numeric else str(v) for k, v in raw.items() if v is not None}


def from_stored(schema: FeatureSchema, stored: Mapping[str, str], where: str) -> dict[str, Any]:
    """Stored text -> raw content for encode_content: numerics parsed back (ContentError naming
    `where.<feature>` when one does not parse); other names pass through, for encode_content to judge."""
    numeric = {f.name for f in schema.content_numeric}
    raw: dict[str, Any] = {}
    for name, text in stored.items():
        if name not in numeric:
            raw[name] = text
            continue
        try:
            raw[name] = float(text)
        except ValueError:
            raise ContentError(
                f"{where}.{name}: stored value {text!r} is not a number; reload it with `psad items load`"
            ) from None
    return raw
