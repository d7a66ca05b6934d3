"""The spec's ``candidates:`` section: several models from one spec, the best of them the challenger.

Each candidate is a set of overrides, keyed by the same dotted paths as ``--set`` (list elements by
index or by a transform's name). A candidate's value replaces the value at its key whole: a component
given whole replaces the spec's component, it is not merged into it. ``grid`` makes every combination,
``list`` names each candidate, ``random`` draws ``n`` from a seeded space. Every candidate is validated
in full when the spec loads (:func:`expand`), and an error names the candidate and the key.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from voxelflow.spec.sections import BUILTIN_METRICS, _Section
from voxelflow.spec.step_spec import ValueAtKey

KEY = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$"
# what a candidate may change: how a model is made, not the data, the sides, the metrics or the release, so that
# every candidate is trained and scored alike
MAY_CHANGE = ("train", "preprocess", "evaluate.sliding_window", "evaluate.postprocess")
MAX_CANDIDATES = 256


def _check_key(key: str) -> str:
    if not re.fullmatch(KEY, key):
        raise ValueAtKey(key, "expected a dotted key path (train.learning_rate, preprocess.transforms.Spacingd.pixdim)")
    if not any(key == p or key.startswith(p + ".") for p in MAY_CHANGE):
        raise ValueAtKey(key, f"a candidate may change {', '.join(MAY_CHANGE)} (how a model is made), not {key}: "
                              "candidates are trained and scored on the same data and sides")
    return key


class Distribution(_Section):
    """One key's values in a random search: exactly one of ``loguniform``, ``uniform``, ``choice``."""

    loguniform: tuple[float, float] | None = Field(None, description="[low, high], both > 0: drawn uniformly "
                                                   "on a log scale")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: drawn uniformly")
    choice: list[Any] | None = Field(None, min_length=1, description="values drawn with equal chance")

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, choice (given: {given or 'none'})")
        for kind in ("loguniform", "uniform"):
            bounds = getattr(self, kind)
            if bounds is not None:
                low, high = bounds
                if not low < high:
                    raise ValueAtKey(kind, f"expected [low, high] with low < high, got {list(bounds)}")
                if kind == "loguniform" and low <= 0:
                    raise ValueAtKey(kind, f"a log scale needs low > 0, got {low}")
        return self

    def draw(self, rng: random.Random) -> Any:
        if self.loguniform is not None:
            low, high = self.loguniform
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        return copy.deepcopy(rng.choice(self.choice))  # type: ignore[arg-type]


class RandomSearch(_Section):
    """``n`` candidates drawn from ``space`` with ``seed``: the same spec draws the same candidates."""

    n: int = Field(ge=1, le=MAX_CANDIDATES, description="how many candidates to draw")
    seed: int = Field(0, description="the seed of the draws")
    space: dict[str, Distribution] = Field(min_length=1, description="key path -> its distribution")

    @field_validator("space")
    @classmethod
    def _keys(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        for key in value:
            _check_key(key)
        return value


class Select(_Section):
    """How the challenger is chosen among the candidates."""

    metric: str = Field(description="a metric evaluation computes (dice, dice_1, hausdorff95, a custom metric), "
                        "scored on the validation cases; its direction comes from the metric")


class CandidatesSpec(_Section):
    """Several candidates trained from one spec (``grid``, ``list`` or ``random``); the best on the validation
    cases by ``select.metric`` is the challenger, which alone is evaluated on the test cases and gated."""

    grid: dict[str, list[Any]] | None = Field(None, description="key path -> its values: every combination is "
                                              "a candidate", examples=[{"train.learning_rate": [0.01, 0.003]}])
    list_: list[dict[str, Any]] | None = Field(None, alias="list", min_length=1, description="each candidate's "
                                               "overrides, key path -> value",
                                               examples=[[{"train.epochs": 10}, {"train.learning_rate": 0.003}]])
    random: RandomSearch | None = Field(None, description="candidates drawn from a seeded space")
    select: Select = Field(description="how the challenger is chosen")
    max_parallel: int = Field(1, ge=1, le=64, description="candidates trained at once")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("a grid needs at least one key")
        for key, values in value.items():
            _check_key(key)
            if not values:
                raise ValueAtKey(key, "needs at least one value")
        return value

    @field_validator("list_")
    @classmethod
    def _list(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, overrides in enumerate(value or []):
            if not overrides:
                raise ValueAtKey(str(i), "a candidate needs at least one key to change")
            for key in overrides:
                try:
                    _check_key(key)
                except ValueAtKey as exc:
                    raise ValueAtKey(f"{i}.{exc.key}", str(exc)) from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> CandidatesSpec:
        given = [k for k, v in (("grid", self.grid), ("list", self.list_), ("random", self.random)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, list, random (given: {', '.join(given) or 'none'})")
        n = len(self.overrides())
        if n > MAX_CANDIDATES:
            raise ValueError(f"{n} candidates; at most {MAX_CANDIDATES}")
        return self

    def overrides(self) -> list[dict[str, Any]]:
        """Each candidate's overrides (key path -> value), in a stable order."""
        if self.grid is not None:
            keys = list(self.grid)
            return [dict(zip(keys, copy.deepcopy(combo))) for combo in itertools.product(*self.grid.values())]
        if self.list_ is not None:
            return [copy.deepcopy(o) for o in self.list_]
        assert self.random is not None
        rng = random.Random(self.random.seed)
        return [{k: d.draw(rng) for k, d in self.random.space.items()} for _ in range(self.random.n)]


@dataclass(frozen=True)
class Candidate:
    index: int
    overrides: dict[str, Any]
    spec: Any  # the PipelineSpec: the spec with these overrides, without candidates

    @property
    def label(self) -> str:
        return describe(self.overrides)


def describe(overrides: dict[str, Any]) -> str:
    """``train.learning_rate=0.01, train.epochs=3``: a candidate in one line."""
    return ", ".join(f"{k}={_short(v)}" for k, v in overrides.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("'", "").replace(" ", "")


def set_at(data: dict[str, Any], path: str, value: Any) -> None:
    """Put ``value`` at the dotted ``path`` of ``data`` in place, replacing what is there whole. The path reads as
    ``--set`` reads it: mappings by key, list elements by index or by the name of a one-key element (a transform;
    its arguments are what the name stands for)."""
    keys = path.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, dict):
            if last:
                node[key] = copy.deepcopy(value)
                return
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
        elif isinstance(node, list):
            names = [next(iter(i)) if isinstance(i, dict) and len(i) == 1 else None for i in node]
            if key.lstrip("-").isdigit():
                index = int(key)
                if not -len(node) <= index < len(node):
                    raise ValueError(f"{where}: the list has {len(node)} elements")
                if last:
                    node[index] = copy.deepcopy(value)
                    return
                node = node[index]
            elif names.count(key) == 1:
                element = node[names.index(key)]
                if last:
                    element[key] = copy.deepcopy(value)
                    return
                if not isinstance(element[key], dict):
                    element[key] = {}
                node = element[key]
            else:
                raise ValueError(f"{where}: no single element named {key!r} (elements: {[n for n in names if n]}); "
                                 "give an index instead")
        else:
            raise ValueError(f"{'.'.join(keys[:depth])}: is {type(node).__name__}, not a mapping or a list")


def expand(spec: Any, validate: Callable[[dict[str, Any]], Any]) -> list[Candidate]:
    """Every candidate of ``spec``: its spec with the candidate's overrides, validated in full by ``validate`` (the
    spec's model). A bad candidate raises ``ValueAtKey`` naming the candidate, its overrides and the key."""
    section: CandidatesSpec = spec.candidates
    base = spec.model_dump(mode="json", by_alias=True, exclude={"candidates"})
    _check_metric(spec, section.select.metric, "the spec")
    out = []
    for i, overrides in enumerate(section.overrides()):
        data = copy.deepcopy(base)
        who = f"candidate {i} ({describe(overrides)})"
        for key, value in overrides.items():
            try:
                set_at(data, key, value)
            except ValueError as exc:
                raise ValueAtKey(_where(section), f"{who}: {exc}") from None
        try:
            candidate = validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
                                 f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            raise ValueAtKey(_where(section), f"{who}: {problems}") from None
        _check_metric(candidate, section.select.metric, who)
        out.append(Candidate(i, overrides, candidate))
    return out


def _where(section: CandidatesSpec) -> str:
    kind = "grid" if section.grid is not None else "list" if section.list_ is not None else "random"
    return f"candidates.{kind}"


def _check_metric(spec: Any, metric: str, who: str) -> None:
    computed = spec.computed_metrics()
    if metric not in computed:
        raise ValueAtKey("candidates.select.metric", f"{metric!r} is not a metric evaluation computes for {who}; computed: "
                         f"{computed}")


def higher_is_better(spec: Any, metric: str) -> bool:
    """The direction of ``metric`` (``dice_1`` has the direction of ``dice``)."""
    for name in spec.evaluate.metrics:
        if metric == name or re.fullmatch(rf"{re.escape(name)}_\d+", metric):
            if name in BUILTIN_METRICS:
                return BUILTIN_METRICS[name]
            return spec.evaluate.custom_metrics[name].higher_is_better
    raise KeyError(metric)


def shared_preprocessing(candidates: list[Candidate]) -> list[int]:
    """For each candidate, the first candidate with the same preprocessing (its own index when it is the first):
    candidates with the same ``preprocess`` section share one preprocessed store."""
    first: dict[str, int] = {}
    out = []
    for c in candidates:
        key = c.spec.preprocess.model_dump_json()
        out.append(first.setdefault(key, c.index))
    return out


def listing(spec: Any) -> str:
    """The candidates of ``spec``, one a line (``voxelflow validate``); empty without candidates."""
    section: CandidatesSpec | None = spec.candidates
    if section is None:
        return ""
    found = spec.candidate_specs()
    metric = section.select.metric
    direction = "higher" if higher_is_better(spec, metric) else "lower"
    shared = shared_preprocessing(found)
    lines = [f"candidates ({_where(section).removeprefix('candidates.')}, {len(found)}; the challenger: the best "
             f"validation {metric}, {direction} is better; {section.max_parallel} at once):"]
    for c, first in zip(found, shared):
        pre = ("the spec's preprocessing" if c.spec.preprocess == spec.preprocess else
               "its own preprocessing" if first == c.index else f"the preprocessing of candidate {first}")
        lines.append(f"  {c.index}: {c.label}  [{pre}]")
    return "\n".join(lines)
