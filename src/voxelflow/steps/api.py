"""What a step function is given and what it gives back."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["raw", "preprocessed", "predicted"]


@dataclass
class StepResult:
    """A step's answer: ``metrics`` are logged to the lifecycle's MLflow run as ``<id>.<name>`` and
    become outputs a later ``when`` may read; ``passed=False`` stops the lifecycle when the step is a
    gate (a warning otherwise), with ``reason``; ``artifacts`` (name -> local file) go under the store
    and into the run (pictures show in MLflow)."""

    metrics: dict[str, float] = field(default_factory=dict)
    passed: bool = True
    reason: str = ""
    artifacts: dict[str, str | Path] = field(default_factory=dict)


def normalise(value: Any, where: str) -> StepResult:
    """A step function's return value as a :class:`StepResult` (a mapping of metrics, or None: passed)."""
    if value is None:
        return StepResult()
    if isinstance(value, StepResult):
        result = value
    elif isinstance(value, Mapping):
        result = StepResult(metrics=dict(value))
    else:
        raise TypeError(f"step {where} returned {type(value).__name__}: a step returns a StepResult, a mapping of "
                        "metric names to numbers, or None")
    metrics: dict[str, float] = {}
    for name, v in result.metrics.items():
        if not isinstance(name, str) or not name.replace("_", "a").isalnum() or not name[:1].isalpha():
            raise ValueError(f"step {where}: metric name {name!r} is not a name ([A-Za-z][A-Za-z0-9_]*)")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"step {where}: metric {name!r} is {type(v).__name__}, not a number")
        metrics[name] = float(v)
    return StepResult(metrics, bool(result.passed), str(result.reason or ""),
                      {str(k): Path(p) for k, p in result.artifacts.items()})


def step(*, outputs: list[str] | tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the metrics a step function returns, so that a later ``when`` (checked at load) may read them.

    ``@step(outputs=["outliers"])`` over ``def my_check(ctx, ...)``. Every step also has the output
    ``passed``; the metrics named in its spec entry's ``higher_is_better`` count as declared too."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__voxelflow_outputs__ = tuple(outputs)  # type: ignore[attr-defined]
        return fn

    return mark


def outputs(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The metrics a step function declares (:func:`step`)."""
    return tuple(getattr(fn, "__voxelflow_outputs__", ()))


class CandidateRef(BaseModel):
    """The model trained in this lifecycle: its weights in the store and its config."""

    model_config = ConfigDict(extra="forbid")
    weights_key: str
    config: dict[str, Any]


class StepInputs(BaseModel):
    """Everything a step's context is made from: references only (JSON), so a step placed on a work pool
    gets the same context as one run in the lifecycle's process."""

    model_config = ConfigDict(extra="forbid")
    pipeline: str
    step_id: str
    model_name: str | None = None  # promote.model_name: where the champion is
    lifecycle_id: str | None = None  # names where a step's artifacts go before the MLflow run exists
    outputs: dict[str, dict[str, float | int | bool | str | None]] = Field(default_factory=dict)
    case_ids: list[str] = Field(default_factory=list)  # the dataset's labelled cases
    test_ids: list[str] = Field(default_factory=list)  # what "predicted" cases are
    preprocess_digest: str | None = None
    run_id: str | None = None
    candidate: CandidateRef | None = None
    model_version: str | None = None


@dataclass
class Case:
    """One case of the dataset, read from the store when first asked for."""

    id: str
    _load: Callable[[], dict[str, Any]] = field(repr=False)
    _data: dict[str, Any] | None = field(default=None, repr=False)

    def _get(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._load()
        return self._data

    @property
    def image(self) -> np.ndarray:
        return self._get()["image"]

    @property
    def label(self) -> np.ndarray | None:
        return self._get().get("label")

    @property
    def affine(self) -> np.ndarray:
        return self._get()["affine"]

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis (from the affine)."""
        a = self.affine
        return tuple(float(s) for s in np.linalg.norm(a[:3, :3], axis=0))

    @property
    def voxel_ml(self) -> float:
        """The volume of one voxel in millilitres."""
        return math.prod(self.spacing) / 1000.0


class StepContext:
    """What a step function is given (never secrets, never arrays until asked for)."""

    def __init__(self, inputs: StepInputs, store: Any, settings: Any, logger: logging.Logger | None = None,
                 layout: Any | None = None) -> None:
        from voxelflow.core.storage import Layout

        self.inputs = inputs
        self.step_id = inputs.step_id
        self.pipeline = inputs.pipeline
        self.run_id = inputs.run_id
        self.model_name = inputs.model_name
        self.model_version = inputs.model_version
        self.store = store
        self._layout = layout or Layout(store, inputs.pipeline)
        self._settings = settings
        self.logger = logger or logging.getLogger(f"voxelflow.steps.{inputs.step_id}")

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        """Outputs of the steps that ran before this one: ``ctx.outputs["ingest"]["new_cases"]``."""
        return {k: dict(v) for k, v in self.inputs.outputs.items()}

    @property
    def settings(self) -> dict[str, Any]:
        """The lifecycle's settings as plain values, secrets masked (``**********``) and URLs without passwords."""
        from voxelflow.core.redact import redact

        dumped = self._settings.model_dump(mode="json")
        return {k: redact(v) if isinstance(v, str) else v for k, v in dumped.items()}

    def cases(self, kind: Kind = "raw") -> Iterator[Case]:
        """The dataset's cases as ingested (``raw``), after preprocessing (``preprocessed``), or the test
        side with the candidate's masks as ``label`` (``predicted``, once ``train`` has run)."""
        from voxelflow.data.ingest import load_case

        if kind == "raw":
            raw = self._layout.raw
            for cid in self.inputs.case_ids:
                yield Case(cid, lambda cid=cid: load_case(raw, cid))
        elif kind == "preprocessed":
            if self.inputs.preprocess_digest is None:
                raise ValueError(f"step {self.step_id}: preprocessed cases exist once preprocess has run: place the "
                                 "step after preprocess")
            out = self._layout.preprocessed(self.inputs.preprocess_digest)
            for cid in self.inputs.case_ids:
                if out.is_committed(cid):
                    yield Case(cid, lambda cid=cid: load_case(out, cid))
        elif kind == "predicted":
            if self.inputs.candidate is None:
                raise ValueError(f"step {self.step_id}: predicted cases exist once train has run: place the step "
                                 "after train")
            from voxelflow.learn.model import Segmenter

            model = Segmenter(self.inputs.candidate.config, self.store.read_bytes(self.inputs.candidate.weights_key))
            raw = self._layout.raw

            def predicted(cid: str) -> dict[str, Any]:
                case = load_case(raw, cid)
                return {**case, "label": model.segment(case["image"], case["affine"])}

            for cid in self.inputs.test_ids:
                yield Case(cid, lambda cid=cid: predicted(cid))
        else:
            raise ValueError(f"step {self.step_id}: cases({kind!r}): expected 'raw', 'preprocessed' or 'predicted'")
