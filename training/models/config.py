"""ModelConfig: every architecture and loss knob of a reranker, validated before a model is built.

One flat config (nanoGPT style) shared by PSAD and the baselines; the training config embeds it and
a run saves it as JSON. Both are strict pydantic dataclasses (`config_errors`): an unknown key, a
wrong type or an out-of-range value is refused with a ConfigError naming the key, so a typo never
trains a different model than the one asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import reprlib
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, get_type_hints

from pydantic import AfterValidator, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails, PydanticCustomError

from export.contract.content import MAX_CODEBOOK_SIZE  # a code fits one byte in a bundle's item_codes.npy

ARCHS = ("psad", "dnn", "prm", "dlcm", "setrank")
STUDENT_LOSSES = ("listwise", "bce")
DISTILL_LOSSES = ("listwise", "rd", "none")
TEACHER_TARGETS = ("own", "shown")
ITEM_ENCODERS = ("id", "sid")

# What a value of the wrong type should have been, by pydantic error type.
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "finite_number": "a finite number",
}
_NOT_ALLOWED = "config_value"  # the error type of this module's rules
# Strict: "3" is no integer and 1 no boolean; unknown keys and inf/nan are refused.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
C = TypeVar("C")


class ConfigError(ValueError):
    """A training configuration is invalid; the message names the key and the allowed values."""


def _refuse(allowed: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(_NOT_ALLOWED, "allowed {allowed}", {"allowed": allowed, **ctx})


def rule(allowed: str, ok: Callable[[Any], bool]) -> AfterValidator:
    """Refuses a value of the right type for which `ok` is false, saying what is `allowed`."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise _refuse(allowed)
        return value

    return AfterValidator(check)


def at_least(low: float, note: str = "") -> AfterValidator:
    kind = "an integer" if isinstance(low, int) else "a number"
    return rule(f"{kind} >= {low:g}{note}", lambda value: value >= low)


def above(low: float) -> AfterValidator:
    return rule(f"a number > {low:g}", lambda value: value > low)


def fraction(note: str = "") -> AfterValidator:
    return rule(f"a number in [0, 1){note}", lambda value: 0 <= value < 1)


def one_of(choices: tuple[str, ...]) -> BeforeValidator:
    """Checked before the type, so that a value of any type is answered with the choices."""

    def check(value: Any) -> Any:
        if value not in choices:
            raise _refuse(f"one of {list(choices)}")
        return value

    return BeforeValidator(check)


def unknown_keys(table: str, unknown: list[str], allowed: list[str]) -> str:
    return f"[{table}] unknown key(s) {sorted(unknown)}; allowed: {allowed}"


def _table_keys(cls: type) -> list[str]:
    """The keys of cls's TOML table: its fields, less the configs nested in it (tables of their own)."""
    hints = get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]


def _allowed(error: ErrorDetails) -> str:
    if error["type"] == _NOT_ALLOWED:
        return error["ctx"]["allowed"]
    return _EXPECTED.get(error["type"], error["msg"].removeprefix("Input should be "))


def _describe(exc: ValidationError, cls: type, table: str, problem: str) -> ConfigError:
    """pydantic's errors as one message: the unknown keys, then `problem` for each refused value."""
    errors = exc.errors(include_url=False)
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "unexpected_keyword_argument"]
    problems = [unknown_keys(table, unknown, _table_keys(cls))] if unknown else []
    for e in errors:
        if e["type"] != "unexpected_keyword_argument":
            ctx = e.get("ctx", {})
            key = ctx.get("key", ".".join(map(str, e["loc"])))
            value = reprlib.repr(ctx.get("value", e["input"]))
            problems.append(problem.format(key=key, allowed=_allowed(e), value=value))
    return ConfigError("; ".join(problems))


def config_errors(table: str, problem: str) -> Callable[[type[C]], type[C]]:
    """Makes a STRICT pydantic dataclass for the TOML table [table] refuse with ConfigErrors.

    Building one in code (a test, `dataclasses.replace`) then fails like loading one from a file:
    pydantic's ValidationError becomes a ConfigError saying `problem` ({key}, {allowed}, {value}).
    """

    def reword(cls: type[C]) -> type[C]:
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                validate(self, *args, **kwargs)
            except ValidationError as exc:
                raise _describe(exc, cls, table, problem) from None

        cls.__init__ = __init__  # type: ignore[method-assign]  # pydantic's __init__, its errors reworded
        return cls

    return reword


def build(cls: type[C], table: str, raw: Any, **given: Any) -> C:
    """cls(**raw, **given) from a parsed TOML/JSON table: `given` are the nested configs, built already."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{table}] must be a table, got {type(raw).__name__}")
    clash = [key for key in raw if key in given]
    if clash:
        raise ConfigError(unknown_keys(table, clash, _table_keys(cls)))
    return cls(**raw, **given)


@config_errors("model", "model.{key} = {value} is invalid: allowed {allowed}")
@dataclass(config=STRICT)
class ModelConfig:
    arch: Annotated[str, one_of(ARCHS)] = "psad"  # PSAD or one of the baselines (baselines.py)
    d_model: Annotated[int, at_least(1)] = 32  # width of every item, user and candidate representation
    n_heads: Annotated[int, at_least(1)] = 2  # attention heads (UPN read-outs, teacher encoder)
    teacher_layers: Annotated[int, at_least(0)] = 2  # transformer blocks in the teacher's candidate-set encoder
    student_hidden: Annotated[int, at_least(1)] = 128  # hidden width of the student's per-candidate MLP
    dropout: Annotated[float, fraction()] = 0.1
    # how an item becomes a vector, for UPN, teacher, student and every baseline alike (embeddings.py):
    # "id" = an id embedding + side tables; "sid" = IntRR codes assigned from the item's content (sid.py)
    item_encoder: Annotated[str, one_of(ITEM_ENCODERS)] = "id"
    item_ids: bool = True  # "id" only; False: items are known by their features only, no per-item id embedding
    sid_levels: Annotated[int, at_least(1)] = 3  # sid: codebook levels L, one code per level
    sid_codebook_size: Annotated[
        int, rule(f"an integer in [2, {MAX_CODEBOOK_SIZE}]", lambda k: 2 <= k <= MAX_CODEBOOK_SIZE)
    ] = 32
    sid_anchor_weight: Annotated[float, at_least(0.0)] = 0.1  # sid: weight of the UID anchor loss (docs/model.md)
    # sid: chance that a known item's ID embedding is withheld from the assignment in a training step, so
    # the content-only path that new items take is trained too
    sid_uid_dropout: Annotated[float, fraction()] = 0.3
    # B: slots the teacher fills per decoding step; 1 = AR, >= list length = NAR
    block_size: Annotated[int, at_least(1, " (1 = autoregressive)")] = 4
    # student label loss: "listwise" (softmax CE) or "bce" (pointwise)
    student_loss: Annotated[str, one_of(STUDENT_LOSSES)] = "listwise"
    # teacher -> student: "listwise" (position-weighted Plackett-Luce), "rd" (rank distillation) or "none"
    distill: Annotated[str, one_of(DISTILL_LOSSES)] = "listwise"
    # teacher objective: "own" = pick a clicked item on the prefix of its own greedy list; "shown" = a
    # click model of each slot given the earlier blocks of the order the list was displayed in
    # (needs the data set's shown_position, teacher.py)
    teacher_target: Annotated[str, one_of(TEACHER_TARGETS)] = "own"
    distill_weight: Annotated[float, at_least(0.0)] = 1.0  # lambda in  loss = teacher + student + lambda * distill
    # listwise distillation: ranks scored (0 = the whole list)
    distill_top_k: Annotated[int, at_least(0, " (0 = whole list)")] = 0
    rd_k: Annotated[int, at_least(1)] = 10  # RD: teacher's top-K items used as weighted positives
    rd_lambda: Annotated[float, above(0.0)] = 1.0  # RD: static weight temperature, w_r ~ exp(-r / lambda)
    rd_alpha: Annotated[float, at_least(0.0)] = 1.0  # RD: weight of the teacher term
    rd_dynamic: bool = True  # RD: multiply by the dynamic weight max(0, tanh(mu (rank_student - r)))
    rd_mu: Annotated[float, above(0.0)] = 0.1  # RD: slope of the dynamic weight
    rd_warmup_steps: Annotated[int, at_least(0)] = 200  # RD: optimiser steps before the dynamic weight switches on
    use_upn: bool = True  # False = ablation: user features only, no history, gates or personalised positions
    history_match: bool = False  # test each candidate against the history by item identity (upn.HistoryMatch)
    position_encoding: bool = True  # encode each candidate's initial position (the ranking stage's order)
    # initial decay per log1p(age in days) of the history attention
    time_decay_init: Annotated[float, at_least(0.0)] = 0.5

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise _refuse(f"a multiple of n_heads ({self.n_heads})", key="d_model", value=self.d_model)
        return self

    def validate(self) -> None:
        """Checks the fields again: a config is validated when built, not when a field is assigned."""
        self.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> ModelConfig:
        return build(cls, "model", raw)
