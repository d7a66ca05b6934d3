"""A user's own step in the spec's ``steps:`` list, checked against its function when the spec loads.

The graph the steps make with the built-in ones (unknown ids, cycles, what a ``when`` may read) is
checked by :func:`voxelflow.spec.graph.build`; this module checks each entry on its own.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from voxelflow.spec.components import _check_kwargs, _check_types, allowed_imports, resolve_callable

BUILTIN_STEPS = ("ingest", "preprocess", "train", "evaluate", "promote", "deploy")
STEP_ID = r"^[a-z][a-z0-9_]*$"
WORK_POOL = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a Prefect work pool's name, as deployment names carry it
USES = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
METRIC = r"[A-Za-z][A-Za-z0-9_]*"


class ValueAtKey(ValueError):
    """A validator's error that belongs to a key below the one it validates (``key``: dotted, relative)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _context_param(fn: Callable[..., Any]) -> inspect.Parameter | None:
    params = list(inspect.signature(fn).parameters.values())
    return params[0] if params else None


class StepSpec(BaseModel):
    """One step of the user's: a function run with a context and the ``with`` arguments, placed in the graph."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(pattern=STEP_ID, description="the step's name: unique, lowercase letters, digits and _, not a "
                    "built-in step (ingest, preprocess, train, evaluate, promote, deploy); its outputs are read "
                    "as <id>.<name>", examples=["qc"])
    uses: str = Field(pattern=USES, description="import path package.module:function of the step function "
                      "fn(ctx, **with), from a package VOXELFLOW_ALLOWED_IMPORTS allows (checked before it is "
                      "imported)", examples=["voxelflow.steps:label_volume_check"])
    after: str | None = Field(None, pattern=STEP_ID, description="the step (built-in or own) this one runs after; "
                              "give after or needs, not both", examples=["preprocess"])
    needs: list[str] | None = Field(None, min_length=1, description="the steps (built-in or own) that all run "
                                    "before this one; give after or needs, not both", examples=[["train", "qc"]])
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="keyword arguments of the step "
                                  "function, checked against its signature at load: known, of the annotated "
                                  "types, every parameter without a default given",
                                  examples=[{"min_ml": 20, "max_ml": 900}])
    when: str | None = Field(None, min_length=1, description="run only when this condition over earlier steps' "
                             "outputs holds (<step>.<output>, e.g. ingest.new_cases > 0); otherwise skipped",
                             examples=["ingest.new_cases > 0"])
    gate: bool = Field(False, description="a failed result (passed false) stops the lifecycle here with its "
                       "reason recorded; false: a failed result is a warning")
    retries: int = Field(0, ge=0, description="retries after a transient error (connection, timeout, temporary "
                         "unavailability); other errors fail at once")
    timeout_s: float | None = Field(None, gt=0, description="longest one attempt may run, in seconds; unset: no "
                                    "limit", examples=[600])
    work_pool: str | None = Field(None, pattern=WORK_POOL, description="run the step as its own flow run on this "
                                  "work pool (deployment step/WORK_POOL); unset: in the lifecycle's own process",
                                  examples=["cpu"])
    higher_is_better: dict[str, bool] = Field(
        default_factory=dict, description="metric -> its direction: the step's metrics promote.gates.absolute may "
        "gate on as <id>.<metric> (at least the bound when true, at most when false); they count as declared "
        "outputs", examples=[{"outliers": False}])

    _fn: Callable[..., Any] | None = PrivateAttr(None)

    @field_validator("id")
    @classmethod
    def _not_builtin(cls, value: str) -> str:
        if value in BUILTIN_STEPS:
            raise ValueError(f"{value!r} is a built-in step; choose another id (built in: {', '.join(BUILTIN_STEPS)})")
        return value

    @field_validator("needs")
    @classmethod
    def _needs(cls, value: list[str] | None) -> list[str] | None:
        for i, name in enumerate(value or []):
            if not re.fullmatch(STEP_ID[1:-1], name):
                raise ValueAtKey(str(i), f"{name!r} is not a step id ([a-z][a-z0-9_]*)")
        if value and len(set(value)) != len(value):
            raise ValueError(f"names a step twice: {value}")
        return value

    @field_validator("higher_is_better")
    @classmethod
    def _metric_names(cls, value: dict[str, bool]) -> dict[str, bool]:
        for name in value:
            if not re.fullmatch(METRIC, name):
                raise ValueAtKey(name, f"{name!r} is not a metric name ([A-Za-z][A-Za-z0-9_]*)")
        return value

    @field_validator("uses")
    @classmethod
    def _uses(cls, value: str) -> str:
        resolve_step_function(value)
        return value

    @model_validator(mode="after")
    def _placed_and_called(self) -> StepSpec:
        if self.after is not None and self.needs is not None:
            raise ValueAtKey("needs", f"step {self.id!r} gives both after and needs: after: ID runs it after one "
                             "step, needs: [IDs] after several; give one of them")
        if self.after is None and self.needs is None:
            raise ValueAtKey("after", f"step {self.id!r} is not placed: give after: ID (the step it runs after) "
                             "or needs: [IDs]")
        self._fn = resolve_step_function(self.uses)
        check_arguments(self._fn, self.uses, self.with_)
        return self

    def function(self) -> Callable[..., Any]:
        """The step function ``uses`` names (resolved when the spec loaded)."""
        if self._fn is None:
            self._fn = resolve_step_function(self.uses)
        return self._fn

    def predecessors(self) -> list[str]:
        """The steps this one runs after (``after`` or ``needs``)."""
        return [self.after] if self.after is not None else list(self.needs or [])

    def declared_outputs(self) -> set[str]:
        """The outputs a later ``when`` may read: ``passed``, the function's ``@step(outputs=...)`` and the
        metrics ``higher_is_better`` names."""
        declared = getattr(self.function(), "__voxelflow_outputs__", ())  # set by voxelflow.steps.step(outputs=...)
        return {"passed", *declared, *self.higher_is_better}


def resolve_step_function(path: str) -> Callable[..., Any]:
    """The plain function at ``path``, from an allowed package, taking the context as its first positional
    parameter and nothing else positional-only."""
    fn = resolve_callable(path, "step function", allowed_imports())
    if inspect.isclass(fn):
        raise ValueError(f"step function {path!r} is a class; uses names a function fn(ctx, **with)")
    if not inspect.isfunction(fn):
        raise ValueError(f"step function {path!r} is a {type(fn).__name__}, not a function fn(ctx, **with)")
    first = _context_param(fn)
    if first is None or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD, first.VAR_POSITIONAL):
        raise ValueError(f"step function {path!r} must take the step's context as its first positional parameter: "
                         "fn(ctx, **with)")
    later = list(inspect.signature(fn).parameters.values())[1:]
    positional_only = [p.name for p in later if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        raise ValueError(f"step function {path!r}: {', '.join(positional_only)} is positional-only, but with "
                         "passes keyword arguments")
    return fn


def check_arguments(fn: Callable[..., Any], path: str, kwargs: dict[str, Any]) -> None:
    """Refuse ``with`` arguments ``fn`` does not take, of the wrong type, or missing (no default), naming them."""
    params = list(inspect.signature(fn).parameters.values())
    first, later = params[0], params[1:]
    try:
        if first.kind is not first.VAR_POSITIONAL and first.name in kwargs:
            raise ValueError(f"step function {path!r}: {first.name!r} is the step's context, given by voxelflow, "
                             "not an argument of with")
        _check_kwargs(fn, path, kwargs, "step function")
        _check_types(fn, path, kwargs, "step function")
    except ValueError as exc:
        raise ValueAtKey("with", str(exc)) from None
    missing = [p.name for p in later if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and p.name not in kwargs]
    if missing:
        raise ValueAtKey("with", f"step function {path!r} needs the argument(s) {', '.join(missing)} in with")
