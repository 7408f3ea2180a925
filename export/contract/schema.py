"""The feature schema: the one data contract shared by training, export and the service.

A data set, a training run and a model bundle each carry a copy of the schema as JSON; the
service assembles model inputs from it, so the three agree by construction. Nothing here
imports torch: the service uses this module without it.

Index conventions (every vocabulary): 0 = padding / missing, 1 = out-of-vocabulary
(never seen in training), 2.. = known values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

SCHEMA_VERSION = 1
PAD = 0
OOV = 1
N_RESERVED = 2
# The candidate_numeric feature that carries the ranking stage's score: data builders write it, the
# service fills it from each candidate's `score`.
RANK_SCORE = "rank_score"


class SchemaError(ValueError):
    """A schema or vocabulary file is invalid; the message names the field and the fix."""


def read_json(path: Path, *, missing: str, error: type[ValueError] = SchemaError, fix: str = "") -> Any:
    """Parse a JSON file, or raise `error` naming the file: `missing` when absent, `fix` appended when invalid."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc}){fix}") from None


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    cardinality: int  # vocabulary size including the reserved PAD and OOV rows


@dataclass(frozen=True)
class NumericFeature:
    """A float feature, standardised inside the model with training-split statistics."""

    name: str
    mean: float = 0.0
    std: float = 1.0


_JSON_TYPES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
ANNOTATED_TYPES = {"int": int, "float": float, "str": str}  # dataclass field types, as postponed annotations


def typed(value: Any, kind: type, what: str) -> Any:
    """`value` if it has JSON type `kind`, else a SchemaError naming `what`.

    Checked on load so that a hand-edited file fails there, not with a TypeError deep in training.
    An integer counts as a number (and becomes a float); a boolean counts as neither.
    """
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise SchemaError(f"{what} must be {_JSON_TYPES[kind]}, got {reprlib.repr(value)}")
    return float(value) if isinstance(value, int | float) and kind is float else value


def _field(raw: dict, name: str, kind: type, where: str, default: Any = MISSING) -> Any:
    """raw[name] checked by `typed`; `default` when absent, a SchemaError when absent and required."""
    if name not in raw:
        if default is MISSING:
            raise SchemaError(f"{where}: missing required field {name!r}")
        return default
    return typed(raw[name], kind, f"{where}.{name}")


def _features(raw: dict, group: str, kind: type[CategoricalFeature] | type[NumericFeature]) -> tuple:
    """The feature list `group`, each entry checked against the fields of `kind`."""
    feats = []
    for i, entry in enumerate(_field(raw, group, list, "schema", [])):
        where = f"schema.{group}[{i}]"
        entry = typed(entry, dict, where)
        unknown = sorted(set(entry) - set(kind.__dataclass_fields__))
        if unknown:
            raise SchemaError(f"{where}: unknown field(s) {unknown}")
        values = {f.name: _field(entry, f.name, ANNOTATED_TYPES[str(f.type)], where, f.default) for f in fields(kind)}
        feats.append(kind(**values))
    return tuple(feats)


@dataclass(frozen=True)
class FeatureSchema:
    """What a list, its user and its candidates look like to the model.

    user_*: static user features (stored in the user's profile).
    item_*: static item features (baked into the model as lookup tables by item index).
    candidate_numeric: per-impression candidate features sent with each request
        (``rank_score`` is the ranking stage's score); the initial position of a candidate
        is its index in the list the ranking stage sent.
    history: the last ``max_history`` behaviours (item, timestamp, action) before the list.
    item_content: the item features that describe what an item is (genres, a text embedding): a
        model with item_encoder "sid" assigns an item's codes from them, so an item first seen after
        training is ranked from its content (training/models/sid.py).
    known_items: items 0..known_items-1 were seen in the training period; the rows after them are
        catalogue items first seen later (a cold-item split), which an "id" model treats as OOV and
        an export leaves out (0: every row is known).
    """

    n_items: int  # item vocabulary size, reserved rows included
    actions: tuple[str, ...]  # behaviour types; index = N_RESERVED + position
    max_history: int
    max_list: int
    user_categorical: tuple[CategoricalFeature, ...] = ()
    user_numeric: tuple[NumericFeature, ...] = ()
    item_categorical: tuple[CategoricalFeature, ...] = ()
    item_numeric: tuple[NumericFeature, ...] = ()
    candidate_numeric: tuple[NumericFeature, ...] = (NumericFeature(RANK_SCORE),)
    label: str = "click"  # "click" (0/1) or "graded" (0..max_label)
    max_label: float = 1.0
    item_content: tuple[str, ...] = ()
    known_items: int = 0
    version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, not validated

    @property
    def n_actions(self) -> int:
        return len(self.actions) + N_RESERVED

    @cached_property
    def action_codes(self) -> dict[str, int]:
        """Action name -> model index, built once (the service encodes every history with it)."""
        codes: dict[str, int] = {}
        for i, action in enumerate(self.actions):
            codes.setdefault(action, i + N_RESERVED)  # a repeated name keeps its first index
        return codes

    def action_index(self, action: str) -> int:
        return self.action_codes.get(action, OOV)

    @property
    def n_known_items(self) -> int:
        """Item rows seen in the training period (reserved rows included)."""
        return self.known_items or self.n_items

    @property
    def content_categorical(self) -> tuple[CategoricalFeature, ...]:
        return tuple(f for f in self.item_categorical if f.name in self.item_content)

    @property
    def content_numeric(self) -> tuple[NumericFeature, ...]:
        return tuple(f for f in self.item_numeric if f.name in self.item_content)

    def known_only(self) -> FeatureSchema:
        """The schema of a model bundle: the items seen in training only (later ones are new to it)."""
        return dataclasses.replace(self, n_items=self.n_known_items, known_items=0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> FeatureSchema:
        if not isinstance(raw, dict):
            raise SchemaError("schema: expected a JSON object at the top level")
        version = raw.get("version")
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"schema.version is {version!r}, this release reads version {SCHEMA_VERSION}: "
                "rebuild the data set (psad data build) or re-export the model with this release"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SchemaError(f"schema: unknown field(s) {unknown}; allowed: {sorted(known)}")
        actions = _field(raw, "actions", list, "schema")
        schema = cls(
            n_items=_field(raw, "n_items", int, "schema"),
            actions=tuple(typed(a, str, f"schema.actions[{i}]") for i, a in enumerate(actions)),
            max_history=_field(raw, "max_history", int, "schema"),
            max_list=_field(raw, "max_list", int, "schema"),
            user_categorical=_features(raw, "user_categorical", CategoricalFeature),
            user_numeric=_features(raw, "user_numeric", NumericFeature),
            item_categorical=_features(raw, "item_categorical", CategoricalFeature),
            item_numeric=_features(raw, "item_numeric", NumericFeature),
            candidate_numeric=_features(raw, "candidate_numeric", NumericFeature),
            label=_field(raw, "label", str, "schema", "click"),
            max_label=_field(raw, "max_label", float, "schema", 1.0),
            item_content=tuple(
                typed(c, str, f"schema.item_content[{i}]")
                for i, c in enumerate(_field(raw, "item_content", list, "schema", []))
            ),
            known_items=_field(raw, "known_items", int, "schema", 0),
            version=SCHEMA_VERSION,
            extra=_field(raw, "extra", dict, "schema", {}),
        )
        schema.validate()
        return schema

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise SchemaError(f"schema.{msg}")

        need(self.n_items > N_RESERVED, f"n_items must exceed {N_RESERVED} (reserved rows), got {self.n_items}")
        need(self.max_history >= 0, f"max_history must be >= 0, got {self.max_history}")
        need(self.max_list >= 1, f"max_list must be >= 1, got {self.max_list}")
        need(self.label in ("click", "graded"), f"label must be 'click' or 'graded', got {self.label!r}")
        need(self.max_label > 0, f"max_label must be > 0, got {self.max_label}")
        need(len(set(self.actions)) == len(self.actions), f"actions has duplicates: {self.actions}")
        need(
            self.known_items == 0 or N_RESERVED < self.known_items <= self.n_items,
            f"known_items must be 0 (all known) or in ({N_RESERVED}, n_items={self.n_items}], got {self.known_items}",
        )
        item_features = {f.name for f in self.item_categorical} | {f.name for f in self.item_numeric}
        unknown = sorted(set(self.item_content) - item_features)
        need(not unknown, f"item_content names {unknown}, which are not item features {sorted(item_features)}")
        need(len(set(self.item_content)) == len(self.item_content), f"item_content has duplicates: {self.item_content}")
        groups: dict[str, tuple[CategoricalFeature | NumericFeature, ...]] = {
            "user_categorical": self.user_categorical,
            "user_numeric": self.user_numeric,
            "item_categorical": self.item_categorical,
            "item_numeric": self.item_numeric,
            "candidate_numeric": self.candidate_numeric,
        }
        for group, feats in groups.items():
            names = [f.name for f in feats]
            need(len(set(names)) == len(names), f"{group} has duplicate names: {names}")
            for f in feats:
                if isinstance(f, CategoricalFeature):
                    need(f.cardinality > N_RESERVED, f"{group}.{f.name}.cardinality must exceed {N_RESERVED}")
                else:
                    need(math.isfinite(f.mean), f"{group}.{f.name}.mean must be finite")
                    need(math.isfinite(f.std) and f.std > 0, f"{group}.{f.name}.std must be finite and > 0")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> FeatureSchema:
        raw = read_json(path, missing="schema file not found; rebuild the data set with `psad data build`")
        try:
            return cls.from_dict(raw)
        except SchemaError as exc:
            raise SchemaError(f"{path}: {exc}") from None


class Vocab:
    """Maps raw string values to indices; unseen values map to OOV, so new items never fail."""

    def __init__(self, tokens: list[str]):
        self.tokens = [str(t) for t in tokens]
        self._index = {t: i + N_RESERVED for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise SchemaError("vocabulary has duplicate tokens")

    def __len__(self) -> int:
        return len(self.tokens) + N_RESERVED

    def index(self, token: str) -> int:
        return self._index.get(str(token), OOV)

    def indices(self, tokens: Sequence[str]) -> list[int]:
        get = self._index.get
        return [get(str(t), OOV) for t in tokens]


@dataclass
class Vocabularies:
    """All vocabularies of a data set: items, one per categorical user feature, and one per
    categorical content feature (the service encodes a new item's content with it).

    Other item categorical features need none at serving time: they are baked into the model.
    """

    items: Vocab
    user_categorical: dict[str, Vocab]
    item_content: dict[str, Vocab] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "items": self.items.tokens,
            "user_categorical": {k: v.tokens for k, v in self.user_categorical.items()},
            "item_content": {k: v.tokens for k, v in self.item_content.items()},
        }

    def known_only(self, schema: FeatureSchema) -> Vocabularies:
        """The vocabularies of a model bundle: the items seen in training only (FeatureSchema.known_only)."""
        items = Vocab(self.items.tokens[: schema.n_known_items - N_RESERVED])
        return dataclasses.replace(self, items=items)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path, schema: FeatureSchema) -> Vocabularies:
        where = f"{path}: vocab"
        raw = typed(read_json(path, missing="vocabulary file not found"), dict, where)
        if raw.get("version") != SCHEMA_VERSION:
            raise SchemaError(f"{path}: version {raw.get('version')!r}, expected {SCHEMA_VERSION}")
        user = _field(raw, "user_categorical", dict, where, {})
        content = _field(raw, "item_content", dict, where, {})
        vocabs = cls(
            items=Vocab(_field(raw, "items", list, where)),
            user_categorical={k: Vocab(typed(v, list, f"{where}.user_categorical.{k}")) for k, v in user.items()},
            item_content={k: Vocab(typed(v, list, f"{where}.item_content.{k}")) for k, v in content.items()},
        )
        if len(vocabs.items) != schema.n_items:
            raise SchemaError(f"{path}: {len(vocabs.items)} item rows but schema.n_items={schema.n_items}")
        for f in schema.user_categorical:
            v = vocabs.user_categorical.get(f.name)
            if v is None or len(v) != f.cardinality:
                raise SchemaError(f"{path}: user_categorical.{f.name} missing or size differs from the schema")
        for f in schema.content_categorical:
            v = vocabs.item_content.get(f.name)
            if v is None or len(v) != f.cardinality:
                raise SchemaError(
                    f"{path}: item_content.{f.name} (a categorical content feature) missing or size differs from "
                    "the schema; rebuild the data set with `psad data build`"
                )
        return vocabs


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[str, ...]  # symbolic: batch, list, history, or a fixed feature count name


T = TypeVar("T")


class ModelInputs(NamedTuple, Generic[T]):
    """The model signature: one T per model input, in order. The one place the inputs are named.

    T is whatever a caller holds per input: a batch's numpy arrays or torch tensors, or the
    TensorSpecs of model_inputs(). Models take the tensors positionally (`forward(*tensors)`, the
    ONNX graph's inputs in this order) and read them by field, so an input renamed or reordered
    here fails loudly everywhere instead of being read as another.
    """

    user_cat: T
    user_num: T
    hist_items: T
    hist_actions: T
    hist_age: T
    hist_mask: T
    cand_items: T
    cand_num: T
    cand_mask: T

    @classmethod
    def from_batch(cls, batch: Mapping[str, T]) -> ModelInputs[T]:
        """The model inputs of a batch keyed by name (which may hold more, e.g. training's shown_order)."""
        return cls(*(batch[name] for name in cls._fields))


# Each model input's dtype: fixed, whatever the schema (which sizes the inputs' feature dims).
INPUT_DTYPES: ModelInputs[str] = ModelInputs(
    user_cat="int64",
    user_num="float32",
    hist_items="int64",
    hist_actions="int64",
    hist_age="float32",  # days before the request, >= 0
    hist_mask="bool",
    cand_items="int64",
    cand_num="float32",
    cand_mask="bool",
)


def model_inputs(schema: FeatureSchema) -> ModelInputs[TensorSpec]:
    """The serving model's inputs, in order: ONNX input names, dtypes and dims, and the service's arrays."""
    dims = ModelInputs(
        user_cat=("batch", str(len(schema.user_categorical))),
        user_num=("batch", str(len(schema.user_numeric))),
        hist_items=("batch", "history"),
        hist_actions=("batch", "history"),
        hist_age=("batch", "history"),
        hist_mask=("batch", "history"),
        cand_items=("batch", "list"),
        cand_num=("batch", "list", str(len(schema.candidate_numeric))),
        cand_mask=("batch", "list"),
    )
    return ModelInputs(*(TensorSpec(*spec) for spec in zip(ModelInputs._fields, INPUT_DTYPES, dims, strict=True)))


MODEL_OUTPUT = TensorSpec("scores", "float32", ("batch", "list"))
INPUT_NAMES: tuple[str, ...] = ModelInputs._fields
